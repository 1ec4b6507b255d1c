"""Pictures of one training run from its results.json.

    python tools/plot_run.py exp/toy/unimatch_v2/dinov2_tiny/1_16            # PNGs into the run dir
    python tools/plot_run.py exp/pascal/unimatch_v2/dinov2_base/92 --out figs

writes `curves.png` (student and EMA mIoU per epoch; the loss terms; the confident-pixel ratio — only
the panels the run logged), `per_class_iou.png` (per-class IoU at the best epoch of the EMA model
when there is one, else of the student; class names from the dataset registry and the run's
config.yaml) and, for a run with `pseudo_label_stats: true`, `pseudo_labels.png` (docs/diagnostics.md:
confident share and accuracy per epoch; each class's share among the confident pixels against its
true share; per-class precision and recall at the last epoch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from dataset.registry import class_names  # noqa: E402


class RunError(RuntimeError):
    """The run directory cannot be plotted; the message names the file."""


def load_run(run_dir: str | Path) -> tuple[dict, dict]:
    """(results.json, config.yaml as a dict; empty when the run has none)."""
    run_dir = Path(run_dir)
    path = run_dir / 'results.json'
    if not run_dir.is_dir():
        raise RunError(f'{run_dir} is not a directory')
    if not path.is_file():
        raise RunError(f'{path} does not exist: not a run directory, or its run has not finished an epoch')
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f'{path} is not valid JSON ({err})') from None
    cfg_path = run_dir / 'config.yaml'
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    return results, cfg or {}


def loss_keys(history: list[dict]) -> list[str]:
    """Loss terms logged in any epoch, total first: ['loss', 'loss_x', 'loss_u', ...]."""
    keys = {k for h in history for k, v in h.items() if k.startswith('loss') and v is not None}
    return sorted(keys, key=lambda k: (k != 'loss', k))


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(h['epoch'], h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(results: dict, path: Path, title: str = '') -> Path:
    history = results.get('history') or []
    panels = ['miou']
    if loss_keys(history):
        panels.append('loss')
    if any(h.get('mask_ratio') is not None for h in history):
        panels.append('mask_ratio')
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    # the run's headline metric: mIoU, or changed IoU for a change-detection run
    metric, name = ('changed_iou', 'changed IoU') if 'best_changed_iou' in results else ('miou', 'mIoU')
    for ax, panel in zip(axes[0], panels):
        if panel == 'miou':
            for key, label in ((metric, 'student'), (f'{metric}_ema', 'EMA')):
                x, y = series(history, key)
                if y:
                    ax.plot(x, y, marker='o', ms=3, label=label)
            ax.set(title=name, ylabel=f'{name} (%)')
        elif panel == 'loss':
            for key in loss_keys(history):
                x, y = series(history, key)
                ax.plot(x, y, marker='o', ms=3, label=key, lw=2 if key == 'loss' else 1)
            ax.set(title='training losses (epoch means)')
        else:
            x, y = series(history, 'mask_ratio')
            ax.plot(x, y, marker='o', ms=3, color='tab:green')
            ax.set(title='confident-pixel ratio', ylim=(0, 1.02))
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f'{title} — {results.get("epochs")}/{results.get("epochs_total")} epochs', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_epoch_iou(results: dict) -> tuple[str, int, list[float]] | None:
    """('EMA' or 'student', epoch, per-class IoU) at the model's best epoch; None without history."""
    history = {h['epoch']: h for h in results.get('history') or []}
    for model, epoch_key, iou_key in (('EMA', 'best_epoch_ema', 'iou_ema'),
                                      ('student', 'best_epoch', 'iou')):
        entry = history.get(results.get(epoch_key))
        if entry and entry.get(iou_key):
            return model, entry['epoch'], entry[iou_key]
    return None


def run_class_names(results: dict, cfg: dict, n: int) -> list[str]:
    """The registry's names for the run's dataset (nclass / class_names from its config.yaml);
    numbered classes when the registry does not know the dataset or the count disagrees."""
    try:
        names = class_names(cfg.get('dataset', results.get('dataset')), cfg.get('nclass', n),
                            cfg.get('class_names'))
    except (KeyError, ValueError):
        names = []
    return names if len(names) == n else [f'class_{k}' for k in range(n)]


def plot_per_class(results: dict, cfg: dict, path: Path) -> Path | None:
    best = best_epoch_iou(results)
    if best is None:
        return None
    model, epoch, iou = best
    names = run_class_names(results, cfg, len(iou))
    width = max(5.0, 0.28 * len(iou) + 1.5)  # ~0.28 in per bar keeps 150 ADE20K labels legible
    fig, ax = plt.subplots(figsize=(width, 4.2))
    ax.bar(range(len(iou)), iou, color='tab:blue')
    miou = sum(iou) / len(iou)
    ax.axhline(miou, color='tab:red', ls='--', lw=1, label=f'mIoU {miou:.1f}')
    ax.set_xticks(range(len(iou)), names, rotation=90, fontsize=7 if len(iou) > 30 else 9)
    ax.set(ylabel='IoU (%)', ylim=(0, 100), xlim=(-0.6, len(iou) - 0.4),
           title=f'per-class IoU, {model} model, best epoch {epoch}')
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def labeller(history: list[dict], cfg: dict) -> str:
    """The model whose pseudo-labels train the run: 'ema', 'student' (teacher: online, or
    labeled-only runs, which have only the student's diagnostics)."""
    models = set(history[-1]['pseudo_labels'])
    return 'ema' if 'ema' in models and cfg.get('teacher', 'ema') == 'ema' else 'student'


def plot_pseudo_labels(results: dict, cfg: dict, path: Path) -> Path | None:
    """Three panels from the epochs' `pseudo_labels`: confident share and accuracy of every model;
    the labeller's share of each class among confident pixels per epoch, its true share dashed;
    the labeller's per-class precision and recall at the last epoch. None when the run has none."""
    history = [h for h in results.get('history') or [] if h.get('pseudo_labels')]
    if not history:
        return None
    model = labeller(history, cfg)
    last = history[-1]['pseudo_labels'][model]
    names = run_class_names(results, cfg, len(last['share']))
    epochs = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))

    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    ax = axes[0]
    for k, name in enumerate(history[-1]['pseudo_labels']):
        for key, style in (('confident_share', '-'), ('accuracy', '--')):
            values = [h['pseudo_labels'][name][key] for h in history]
            ax.plot(epochs, [v if v is not None else float('nan') for v in values], style, marker='o', ms=3,
                    color=colors[k % len(colors)], label=f'{name} {key.replace("_", " ")}')
    ax.set(title=f'pseudo-labels (conf >= {cfg.get("conf_thresh", "?")})', ylabel='%', ylim=(0, 102))

    ax = axes[1]
    for c, name in enumerate(names):
        color = colors[c % len(colors)]
        ax.plot(epochs, [h['pseudo_labels'][model]['share'][c] or 0.0 for h in history], marker='o', ms=3,
                color=color, label=name)
        ax.axhline(last['true_share'][c], color=color, ls=':', lw=1)
    ax.set(title=f'share among confident pixels, {model} (dotted: true share)', ylabel='%')

    ax = axes[2]
    x = range(len(names))
    for offset, key in ((-0.2, 'precision'), (0.2, 'recall')):
        ax.bar([k + offset for k in x], [v or 0.0 for v in last[key]], width=0.4, label=key)
    ax.set_xticks(list(x), names, rotation=90, fontsize=7 if len(names) > 30 else 9)
    ax.set(title=f'confident pseudo-labels per class, {model}, epoch {epochs[-1]}', ylabel='%', ylim=(0, 102))
    ax.set_xlabel('')

    for ax in axes[:2]:
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs into `out` (default: the run directory); returns the paths written."""
    results, cfg = load_run(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(results.get(k)) for k in ('dataset', 'method', 'backbone', 'split')]
    title = ' '.join(names[:3] + [names[3] if results.get('split') else Path(run_dir).name])
    written = [plot_curves(results, out / 'curves.png', title)]
    per_class = plot_per_class(results, cfg, out / 'per_class_iou.png')
    pseudo = plot_pseudo_labels(results, cfg, out / 'pseudo_labels.png')
    return written + [p for p in (per_class, pseudo) if p]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dir', help='run directory holding results.json (and config.yaml)')
    p.add_argument('--out', help='output directory (default: the run directory)')
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except RunError as err:
        raise SystemExit(f'error: {err}') from None
    for path in paths:
        print(path)


if __name__ == '__main__':
    main()
