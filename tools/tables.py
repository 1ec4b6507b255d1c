"""Markdown tables of our runs next to the paper's numbers.

    python tools/tables.py                                    # every table, printed
    python tools/tables.py --exp exp --out tables.md          # ... and written to tables.md
    python tools/tables.py --tables table01,table05,toy       # only these

Walks every `results.json` under the experiment root (`<exp>/<dataset>/<method>/<backbone>/<split>/`,
as `scripts/train.sh` writes them). Paper tables (`table01` Pascal, `table02` Cityscapes, `table03`
ADE20K, `table04` COCO, `table05` FixMatch / UniMatch V1 vs V2) have rows = method x encoder and
columns = splits, as the paper lays them out; each cell reads `ours (paper, delta)`. The reported
statistic is the paper's (see the facts sheet, section 9): best-epoch EMA mIoU for semi-supervised
methods, best mIoU for the supervised baseline. Runs the paper has no number for still appear: as
extra rows of their dataset's table, or, for datasets with no paper table (`toy`, custom data), in a
per-run listing with the best mIoU, seconds per iteration and epochs completed. `runs` lists every
run that way.

`table14` is the change-detection table (LEVIR-CD, WHU-CD; `scripts/reproduce.sh table14`): each cell
reads `ours IoU/OA (paper IoU/OA, delta IoU)`, the paper's figure being the best changed IoU of the
online model (not the EMA) with the OA of that epoch (facts sheet, section 9), as `results.json`'s
`reported` holds it. Runs of other change-detection datasets (`toy_cd`) are listed with changed IoU.

Runs under a deeper prefix (`EXP_DIR=exp/frozen sh scripts/train.sh ...` puts them in
`exp/frozen/<dataset>/...`) are shown as extra rows tagged `[frozen]`, never in a paper cell --
except the ablations' tags (`scripts/reproduce.sh figure5 ... table13` writes them): the catalogue
(`tools/catalogue.py`, read here as `TAGS`) says
which table and paper variant each one is (`figure5/conf_thresh=0.7` is Figure 5's threshold 0.7),
and `figure5`, `figure6`, `table06` ... `table13` lay those runs out beside the paper's values,
with the plain runs they compare against (the paper's default setting) as rows of their own.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the project root, for `methods`
import methods  # noqa: E402
import tasks  # noqa: E402
from dataset.registry import DATASETS  # noqa: E402
from tools import catalogue  # noqa: E402

# Metric names in paper_tables.csv: what the paper reports for each kind of method (facts section 9).
SEMI_METRIC = 'best_mIoU_ema'
SUPERVISED_METRIC = 'best_mIoU'
DEFAULT_VARIANT = catalogue.DEFAULT_VARIANT

# The tables, their titles, tags and compared rows: the one catalogue of experiments (tools/catalogue.py).
PAPER_TABLES = catalogue.tables_of('paper')
ABLATION_TABLES = catalogue.tables_of('ablation')
CD_TABLE, = catalogue.tables_of('change')
TITLES = {g.table: g.title for g in catalogue.GRIDS}
TAGS = catalogue.tags()                  # run directory tag -> (table, the csv's variant)
BASELINES = {g.table: g.baselines for g in catalogue.GRIDS if g.baselines}
SEED_TABLES = catalogue.seed_cells()     # table -> its (dataset, split) cells
SEEDS = catalogue.SEEDS
# The dataset's own table (a paper grid of one dataset); its unimatch_v2 / supervised rows also feed
# table05's comparison rows.
MAIN_TABLE = {datasets.pop(): g.table for g in catalogue.GRIDS if g.kind == 'paper'
              and len(datasets := {c.dataset for c in g.cells(catalogue.Options())}) == 1}

# Change detection (Table 14): our dataset name -> the csv's, and the csv's metrics.
CD_DATASETS = {'levir': 'levir_cd', 'whu': 'whu_cd'}
CD_METRIC, CD_OA = 'best_changed_IoU', 'OA_at_best_changed_IoU'

# Rows a paper table compares against although the csv files them under another table.
COMPARISON_METHODS = {'table05': ('unimatch_v2',)}
# Our methods that are a paper variant of another: method -> (table, csv method, csv variant).
METHOD_VARIANTS = {
    'fixmatch_addfeataug': ('table06', 'fixmatch', 'figure4a_fixmatch+feature_perturbation(addfeataug)'),
    'fixmatch_dualstream': ('table06', 'fixmatch', 'figure4b_fixmatch+dual_stream'),
    'fixmatch_addfeataug_dualstream': ('table06', 'fixmatch', 'figure4c_fixmatch+feature_perturbation+dual_stream'),
}
# Tables whose paper value is another statistic than the method's usual one (facts sheet, section 6).
TABLE_METRIC = {'table09': 'best_mIoU', 'table10': 'best_mIoU'}
# The default setting's value of a swept key, for the baseline row's label.
DEFAULT_LABEL = {'figure5': 'conf_thresh=0.95', 'figure6': 'unlabeled_loss_weight=1.0'}

# The csv's name of each seed's best EMA top-1 (facts sheet, section 9): CIFAR's own script, USB's eval.
PAPER_TOP1 = ('best_top1_acc_ema', 'best_top1_acc_EMAeval(BEST_EVAL_ACC)')

DATASET_ORDER = ('pascal', 'cityscapes', 'ade20k', 'coco')
METHOD_ORDER = methods.names()      # registry order
ENCODER_ORDER = ('dinov2_tiny', 'dinov2_small', 'dinov2_base', 'dinov2_large', 'dinov2_giant')
CSV_ENCODERS = {'mit_b5': 'mitb5'}     # our backbone name -> the csv's where they differ

# Marks, explained under every table.
INCOMPLETE = '*'       # our run stopped before its planned epochs
OTHER_BUDGET = '†'     # our run planned a different number of epochs than the paper's run
PAPER_INCOMPLETE = '‡'  # the paper's log stops before its planned epochs (value = best so far)
NONE = '–'

Key = tuple  # (table, dataset, split, encoder, method, variant)


# ---- names ---------------------------------------------------------------------------------------

def encoder_name(backbone: str) -> str:
    """Our `backbone` value as the csv writes encoders: 'small' or 'dinov2_small' -> 'dinov2_small'."""
    size = backbone.removeprefix('dinov2_')
    return f'dinov2_{size}' if f'dinov2_{size}' in ENCODER_ORDER else CSV_ENCODERS.get(backbone, backbone)


def split_name(split: str) -> str:
    """Split as the csv spells it: '1/16' -> '1_16', '92' -> '92'."""
    return split.replace('/', '_')


def split_label(split: str) -> str:
    """Column header as the paper prints it: '1_16' -> '1/16'."""
    return split.replace('_', '/') if split.startswith('1_') else split


def split_sort_key(split: str) -> tuple:
    """Fewest labels first, 'all' last: 92 < 183 < ..., 1_64 < 1_32 < ..., 5% < 10%."""
    try:
        if split.startswith('1_'):
            return (0, 1 / float(split[2:]), split)
        if split.endswith('%'):
            return (0, float(split[:-1]) / 100, split)
        return (0, float(split), split)
    except ValueError:
        return (1 if split == 'all' else 2, 0.0, split)


def _order(value: str, order: tuple) -> tuple:
    return (order.index(value), value) if value in order else (len(order), value)


def row_sort_key(row: tuple[str, str, str]) -> tuple:
    """Rows (method, encoder, tag): grouped by encoder as the paper does, then method, tagged last."""
    method, encoder, tag = row
    return (_order(encoder, ENCODER_ORDER), tag != '', tag, _order(method, METHOD_ORDER))


# ---- our runs --------------------------------------------------------------------------------------

def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def read_run(path: Path, exp_root: Path) -> dict:
    """One run's summary from its results.json (older files name no split: the run directory's name)."""
    res = json.loads(path.read_text())
    run_dir = path.parent
    parts = run_dir.relative_to(exp_root).parts
    dataset, method, backbone = res['dataset'], res['method'], res['backbone']
    # exp/<prefix...>/<dataset>/<method>/<backbone>/<split>: anything before dataset is a tag.
    tag = ''
    if len(parts) >= 4 and tuple(parts[-4:-1]) == (dataset, method, backbone):
        tag = '/'.join(parts[:-4])
    m = tasks.of_dataset(dataset).metric if dataset in DATASETS else 'miou'     # the task's figure
    semi = res.get(f'{m}_ema') is not None
    history = res.get('history') or []
    epochs, total = res.get('epochs', len(history)), res.get('epochs_total')
    reported = res.get('reported') or {}       # change detection: the paper's figure and its OA
    return {
        'dataset': dataset, 'method': method, 'backbone': backbone, 'encoder': encoder_name(backbone),
        'split': split_name(str(res.get('split') or run_dir.name)), 'tag': tag, 'semi': semi,
        'metric': m,
        'reported': reported.get(m) if m in reported else res.get(f'best_{m}_ema') if semi else res.get(f'best_{m}'),
        'reported_oa': reported.get('oa'),
        'best_miou': res.get('best_miou'), 'best_miou_ema': res.get('best_miou_ema'),
        'best': res.get(f'best_{m}'), 'best_ema': res.get(f'best_{m}_ema'), 'final': res.get(f'final_{m}'),
        'final_miou': res.get('final_miou'), 'final_miou_ema': res.get('final_miou_ema'),
        'epochs': epochs, 'epochs_total': total,
        'complete': total is not None and epochs >= total,
        'sec_per_iter': _mean([h.get('sec_per_iter') for h in history]),
        'peak_mem_mib': max((h['peak_mem_mib'] for h in history if h.get('peak_mem_mib')), default=None),
        'path': str(run_dir),
    }


def collect_runs(exp_root: str | Path) -> list[dict]:
    """Every run under `exp_root` (one dict per results.json); unreadable files are reported and skipped."""
    exp_root = Path(exp_root)
    runs = []
    for path in sorted(exp_root.rglob('results.json')):
        try:
            runs.append(read_run(path, exp_root))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f'tables: skipping {path}: {e!r}', file=sys.stderr)
    return runs


# ---- paper values ----------------------------------------------------------------------------------

def paper_values(csv_path: str | Path) -> dict[Key, dict[str, float]]:
    """{(table, dataset, split, encoder, method, variant): {metric: value}} from paper_tables.csv.

    Non-numeric values (a missing log) are left out.
    """
    values: dict[Key, dict[str, float]] = {}
    with open(csv_path, newline='') as f:
        for row in csv.DictReader(f):
            try:
                value = float(row['value'])
            except ValueError:
                continue
            key = (row['table'], row['dataset'], row['split'], row['encoder'], row['method'],
                   row['variant'])
            values.setdefault(key, {})[row['metric']] = value
    return values


def reported_metric(method: str) -> str:
    """Best EMA mIoU for semi-supervised methods, best mIoU for labeled-only ones (as the paper)."""
    labeled_only = method in methods.REGISTRY and methods.REGISTRY[method].options is None
    return SUPERVISED_METRIC if labeled_only else SEMI_METRIC


def paper_entry(paper: dict, table: str, dataset: str, split: str, encoder: str,
                method: str) -> dict[str, float] | None:
    """The paper's metrics for a cell: filed under `table`, else under the dataset's main table
    (table05's UniMatch V2 row is Table 1/3/4's)."""
    for t in (table, MAIN_TABLE.get(dataset)):
        entry = paper.get((t, dataset, split, encoder, method, DEFAULT_VARIANT))
        if entry and reported_metric(method) in entry:
            return entry
    return None


def paper_rows(paper: dict, table: str, dataset: str) -> set[tuple[str, str]]:
    """(method, encoder) rows the paper gives for `dataset` in `table`, comparison rows included."""
    rows = {(k[4], k[3]) for k, v in paper.items()
            if k[0] == table and k[1] == dataset and k[5] == DEFAULT_VARIANT
            and reported_metric(k[4]) in v}
    for method in COMPARISON_METHODS.get(table, ()):
        rows |= {(method, encoder) for _, encoder in list(rows)}
    return rows


def table_datasets(paper: dict, table: str) -> list[str]:
    found = {k[1] for k in paper if k[0] == table}
    return sorted(found, key=lambda d: _order(d, DATASET_ORDER))


# ---- formatting ------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return f'{value:+.{digits}f}' if sign else f'{value:.{digits}f}'


def run_marks(run: dict, paper: dict[str, float] | None = None) -> str:
    marks = '' if run['complete'] else INCOMPLETE
    planned = (paper or {}).get('epochs_planned')
    if planned is not None and run['epochs_total'] is not None and run['epochs_total'] != planned:
        marks += OTHER_BUDGET
    return marks


def paper_incomplete(entry: dict[str, float]) -> bool:
    last, planned = entry.get('last_epoch_evaluated'), entry.get('epochs_planned')
    return last is not None and planned is not None and last + 1 < planned  # epochs count from 0


# Our statistic of each paper metric.
OURS = {'best_mIoU': 'best_miou', 'best_mIoU_ema': 'best_miou_ema'}


def cell(run: dict | None, entry: dict[str, float] | None, method: str, digits: int,
         metric: str | None = None) -> str:
    """`ours (paper, delta)`; `– (paper)` without a run; `ours (–)` without a paper value. `metric`:
    the paper's statistic (default: the method's reported one)."""
    if run is None and entry is None:
        return ''
    metric = metric or reported_metric(method)
    value = None if run is None else run[OURS[metric]]
    ours = NONE if run is None else fmt(value, digits) + run_marks(run, entry)
    if entry is None or metric not in entry:
        return f'{ours} ({NONE})'
    theirs = entry[metric]
    paper_txt = fmt(theirs, digits) + (PAPER_INCOMPLETE if paper_incomplete(entry) else '')
    if value is None:
        return f'{ours} ({paper_txt})'
    return f'{ours} ({paper_txt}, {fmt(value - theirs, digits, sign=True)})'


LEGEND = (f'Cells: ours (paper, Δ = ours − paper); `{NONE}` no run or no paper value. Reported: '
          'best-epoch EMA mIoU for semi-supervised methods, best mIoU for supervised (as the paper). '
          f'`{INCOMPLETE}` run not finished (best so far), `{OTHER_BUDGET}` run planned for a different '
          f'number of epochs than the paper\'s, `{PAPER_INCOMPLETE}` the paper\'s log stops early.')


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def row_label(method: str, tag: str) -> str:
    return f'{method} [{tag}]' if tag else method


# ---- tables ----------------------------------------------------------------------------------------

def placed_in_paper(run: dict, paper: dict) -> bool:
    """Whether a run fills a paper row of some table (else it becomes an extra row)."""
    if any(ablation_row(run, paper, t) for t in ABLATION_TABLES):
        return True
    return run['tag'] == '' and any(
        (run['method'], run['encoder']) in paper_rows(paper, t, run['dataset'])
        for t in PAPER_TABLES if run['dataset'] in table_datasets(paper, t))


def paper_table_section(table: str, dataset: str, runs: list[dict], paper: dict, digits: int) -> str:
    rows = {(m, e, '') for m, e in paper_rows(paper, table, dataset)}
    mine = [r for r in runs if r['dataset'] == dataset
            and ((r['tag'] == '' and (r['method'], r['encoder'], '') in rows)
                 or (MAIN_TABLE.get(dataset) == table and not placed_in_paper(r, paper)))]
    rows |= {(r['method'], r['encoder'], r['tag']) for r in mine}
    by_cell = {(r['method'], r['encoder'], r['tag'], r['split']): r for r in mine}
    splits = {k[2] for k in paper if k[0] == table and k[1] == dataset} | {r['split'] for r in mine}
    splits = sorted(splits, key=split_sort_key)
    body = []
    for method, encoder, tag in sorted(rows, key=row_sort_key):
        cells = [cell(by_cell.get((method, encoder, tag, s)),
                      None if tag else paper_entry(paper, table, dataset, s, encoder, method),
                      method, digits) for s in splits]
        body.append([row_label(method, tag), encoder] + cells)
    return markdown(['method', 'encoder'] + [split_label(s) for s in splits], body)


# ---- ablation tables -------------------------------------------------------------------------------------

def run_variant(run: dict) -> tuple[str | None, str, str]:
    """(table or None for a plain run, the csv's method, the csv's variant) of one of our runs."""
    if run['tag']:
        table, variant = TAGS.get(run['tag'], ('', ''))
        return table, run['method'], variant
    if run['method'] in METHOD_VARIANTS:
        return METHOD_VARIANTS[run['method']]
    return None, run['method'], DEFAULT_VARIANT


def ablation_rows(paper: dict, table: str, dataset: str) -> set[tuple[str, str, str]]:
    """(method, encoder, variant) rows of an ablation table for `dataset`: the paper's, and the
    default setting it compares with."""
    rows = {(k[4], k[3], k[5]) for k, v in paper.items() if k[0] == table and k[1] == dataset}
    return rows | {(m, e, DEFAULT_VARIANT) for m, e in BASELINES.get(table, ())}


def ablation_row(run: dict, paper: dict, table: str) -> tuple[str, str, str] | None:
    """The row of `table` a run fills, or None: a run of the table's own tag or method, or a
    plain run of one of its baseline rows."""
    own, method, variant = run_variant(run)
    row = (method, run['encoder'], variant)
    if own == table or (own is None and run['tag'] == ''):
        return row if row in ablation_rows(paper, table, run['dataset']) else None
    return None


def ablation_entry(paper: dict, table: str, dataset: str, split: str, row: tuple[str, str, str]
                   ) -> dict[str, float] | None:
    """The paper's metrics for a cell; a baseline row's from the table that has it (Table 5 for
    FixMatch, the dataset's own table for UniMatch V2)."""
    method, encoder, variant = row
    for t in (table, 'table05', MAIN_TABLE.get(dataset)):
        entry = paper.get((t, dataset, split, encoder, method, variant))
        if entry:
            return entry
    return None


def ablation_section(table: str, dataset: str, runs: list[dict], paper: dict, digits: int) -> str:
    rows = ablation_rows(paper, table, dataset)
    by_cell = {}
    for r in runs:
        row = ablation_row(r, paper, table) if r['dataset'] == dataset else None
        if row:
            by_cell[(*row, r['split'])] = r
    splits = sorted({k[2] for k in paper if k[0] == table and k[1] == dataset}, key=split_sort_key)
    body = []
    for method, encoder, variant in sorted(rows, key=lambda r: (r[2] != DEFAULT_VARIANT, r[2], row_sort_key(r[:2] + ('',)))):
        metric = TABLE_METRIC.get(table, reported_metric(method))
        cells = [cell(by_cell.get((method, encoder, variant, s)),
                      ablation_entry(paper, table, dataset, s, (method, encoder, variant)), method, digits, metric)
                 for s in splits]
        label = DEFAULT_LABEL.get(table, DEFAULT_VARIANT) if variant == DEFAULT_VARIANT else variant
        ours = next((m for m, v in METHOD_VARIANTS.items() if v == (table, method, variant)), method)
        body.append([ours, encoder, label] + cells)
    return markdown(['method', 'encoder', 'variant'] + [split_label(s) for s in splits], body)


METRIC_LABELS = {'miou': 'mIoU', 'changed_iou': 'changed IoU', 'top1': 'top-1'}


def run_listing(runs: list[dict], digits: int, with_dataset: bool = False) -> str:
    """One row per run: reported, best, best EMA and final figure of the run's task (mIoU, changed
    IoU, top-1), seconds/iteration, epochs."""
    labels = {METRIC_LABELS.get(r['metric'], r['metric']) for r in runs}
    label = labels.pop() if len(labels) == 1 else 'figure'
    header = (['dataset'] if with_dataset else []) + [
        'method', 'encoder', 'split', 'reported', f'best {label}', f'best EMA {label}', f'final {label}',
        's/iter', 'peak MiB', 'epochs']
    order = sorted(runs, key=lambda r: (_order(r['dataset'], DATASET_ORDER),
                                        row_sort_key((r['method'], r['encoder'], r['tag'])),
                                        split_sort_key(r['split'])))
    body = []
    for r in order:
        total = NONE if r['epochs_total'] is None else r['epochs_total']
        spi = NONE if r['sec_per_iter'] is None else f'{r["sec_per_iter"]:.3g}'
        mem = NONE if r['peak_mem_mib'] is None else f'{r["peak_mem_mib"]:.0f}'
        body.append(([r['dataset']] if with_dataset else []) + [
            row_label(r['method'], r['tag']), r['encoder'], split_label(r['split']),
            fmt(r['reported'], digits) + run_marks(r), fmt(r['best'], digits),
            fmt(r['best_ema'], digits), fmt(r['final'], digits), spi, mem,
            f'{r["epochs"]}/{total}' + run_marks(r)])
    return markdown(header, body)


LISTING_LEGEND = ('Reported: best-epoch EMA mIoU (classification: top-1) for semi-supervised methods, the '
                  'best of the model for supervised; change detection: best changed IoU of the model (not the EMA). '
                  's/iter: mean over epochs of the training seconds per iteration. '
                  f'peak MiB: the training process\'s peak memory (RSS on CPU, max allocated on CUDA). '
                  f'`{INCOMPLETE}` run not finished.')


def cd_cell(run: dict | None, entry: dict[str, float] | None, digits: int) -> str:
    """`IoU/OA (paper IoU/OA, delta IoU)` of a change-detection cell."""
    if run is None and entry is None:
        return ''
    ours = NONE if run is None else f'{fmt(run["reported"], digits)}/{fmt(run["reported_oa"], digits + 1)}' \
        + run_marks(run, entry)
    if not entry or CD_METRIC not in entry:
        return f'{ours} ({NONE})'
    paper_txt = f'{fmt(entry[CD_METRIC], digits)}/{fmt(entry.get(CD_OA), digits + 1)}'
    if run is None or run['reported'] is None:
        return f'{ours} ({paper_txt})'
    return f'{ours} ({paper_txt}, {fmt(run["reported"] - entry[CD_METRIC], digits, sign=True)})'


def change_table(runs: list[dict], paper: dict, digits: int) -> str:
    """Table 14: per dataset, rows method x encoder, columns splits; our plain runs of levir / whu."""
    parts = [f'## {TITLES[CD_TABLE]}']
    for ours, theirs in CD_DATASETS.items():
        keys = [k for k in paper if k[0] == CD_TABLE and k[1] == theirs and k[5] == DEFAULT_VARIANT]
        mine = [r for r in runs if r['dataset'] == ours and r['tag'] == '']
        rows = {(k[4], k[3]) for k in keys} | {(r['method'], r['encoder']) for r in mine}
        splits = sorted({k[2] for k in keys} | {r['split'] for r in mine}, key=split_sort_key)
        by_cell = {(r['method'], r['encoder'], r['split']): r for r in mine}
        body = [[method, encoder] + [cd_cell(by_cell.get((method, encoder, s)),
                                             paper.get((CD_TABLE, theirs, s, encoder, method, DEFAULT_VARIANT)), digits)
                                     for s in splits]
                for method, encoder in sorted(rows, key=lambda r: row_sort_key(r + ('',)))]
        parts += [f'### {ours} ({theirs})', markdown(['method', 'encoder'] + splits, body)]
    parts.append(f'Cells: ours changed IoU/OA (paper, Δ changed IoU = ours − paper); `{NONE}` no run or no paper '
                 f'value; `{INCOMPLETE}` run not finished, `{OTHER_BUDGET}` other epochs than the paper\'s.')
    return '\n\n'.join(parts) + '\n'


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (the facts sheet's spread over seeds)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def seed_cell(values: list[float], digits: int) -> str:
    if not values:
        return NONE
    mean, std = mean_std(values)
    return f'{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})'


def seed_table(table: str, runs: list[dict], paper: dict, digits: int) -> str:
    """Tables 15-18: per (dataset, split), each seed's best EMA top-1 (ours, and the paper's
    where its log has it), and the mean ± std over seeds beside the paper's. Our runs of seed N
    are those under the tag `<table>/seed=N` (scripts/reproduce.sh)."""
    body = []
    for dataset, split in SEED_TABLES[table]:
        ours, theirs = [], []
        for seed in SEEDS:
            run = next((r for r in runs if r['tag'] == f'{table}/seed={seed}' and r['dataset'] == dataset
                        and r['split'] == split and r['method'] == 'unimatch_v2'), None)
            entry = next((v for k, v in paper.items() if k[:3] == (table, dataset, split) and k[5] == f'seed{seed}'), {})
            value = next((entry[m] for m in PAPER_TOP1 if m in entry), None)
            ours.append(None if run is None else run['reported'])
            theirs.append(value)
            marks = '' if run is None else run_marks(run)
            body.append([dataset, split, str(seed), fmt(ours[-1], digits) + marks, fmt(value, digits)])
        got, paper_got = [v for v in ours if v is not None], [v for v in theirs if v is not None]
        delta = (mean_std(got)[0] - mean_std(paper_got)[0]) if got and paper_got else None
        body.append([dataset, split, 'mean ± std', seed_cell(got, digits),
                     seed_cell(paper_got, digits) + (f', Δ {fmt(delta, digits, sign=True)}' if delta is not None else '')])
    return markdown(['dataset', 'split', 'seed', 'ours: best EMA top-1', 'paper'], body)


SEED_LEGEND = (f'Best EMA top-1 accuracy (%) of UniMatch V2 per seed (each seed its own labeled set), '
               f'mean ± population std over the seeds present; Δ = our mean − the paper\'s. `{NONE}` no run or '
               f'no paper value; `{INCOMPLETE}` run not finished (best so far).')


def make_table(table: str, runs: list[dict], paper: dict, digits: int = 1) -> str:
    """Markdown for one table: a paper table (`table01`..`table05`, `table14`, `table15`..`table18`),
    `runs` (every run listed), or a dataset name (its runs listed, e.g. `toy`, `toy_cd`)."""
    if table == CD_TABLE:
        return change_table(runs, paper, digits)
    if table in SEED_TABLES:
        # two decimals at least: the seeds differ by tenths (FACTS §9: SVHN 98.21 ± 0.01)
        return f'## {TITLES[table]}\n\n{seed_table(table, runs, paper, max(digits, 2))}\n\n{SEED_LEGEND}\n'
    if table in PAPER_TABLES or table in ABLATION_TABLES:
        section = paper_table_section if table in PAPER_TABLES else ablation_section
        parts = [f'## {TITLES[table]}']
        for dataset in table_datasets(paper, table):
            if len(table_datasets(paper, table)) > 1:
                parts.append(f'### {dataset}')
            parts.append(section(table, dataset, runs, paper, digits))
        parts.append(LEGEND)
        return '\n\n'.join(parts) + '\n'
    chosen = runs if table == 'runs' else [r for r in runs if r['dataset'] == table]
    title = 'All runs' if table == 'runs' else f'{table} (no paper numbers)'
    if not chosen:
        return f'## {title}\n\nNo runs found.\n'
    return (f'## {title}\n\n' + run_listing(chosen, digits, with_dataset=table == 'runs')
            + f'\n\n{LISTING_LEGEND}\n')


def default_tables(runs: list[dict], paper: dict) -> list[str]:
    """Every paper table, `toy`, and a listing for each other dataset with runs but no paper table
    (Table 14 when there are LEVIR or WHU runs; Tables 15-18 when there are runs under their tags)."""
    covered = {d for t in PAPER_TABLES for d in table_datasets(paper, t)} | set(CD_DATASETS)
    seeds = [t for t in SEED_TABLES if any(r['tag'].startswith(f'{t}/') for r in runs)]
    covered |= {d for t in seeds for d, _ in SEED_TABLES[t]}
    others = sorted({r['dataset'] for r in runs} - covered - {'toy'})
    ablations = [t for t in ABLATION_TABLES if any(
        run_variant(r)[0] == t and ablation_row(r, paper, t) for r in runs)]
    change = [CD_TABLE] if any(r['dataset'] in CD_DATASETS for r in runs) else []
    return list(PAPER_TABLES) + ablations + change + seeds + ['toy'] + others


def make_report(runs: list[dict], paper: dict, tables: list[str] | None = None, digits: int = 1) -> str:
    tables = tables or default_tables(runs, paper)
    return '\n'.join(make_table(t, runs, paper, digits) for t in tables)


def main(argv: list[str] | None = None) -> None:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--exp', default='exp', help='experiment root to search for results.json')
    p.add_argument('--paper', default=str(repo / 'reference' / 'paper_tables.csv'))
    p.add_argument('--out', help='also write the markdown here')
    p.add_argument('--tables', help='comma-separated: table01..table05, figure5, figure6, table06..table14, '
                                    'toy, runs, or a dataset (default: every main paper table, the '
                                    'ablations with runs, toy, other datasets with runs)')
    p.add_argument('--digits', type=int, default=1, help='decimals (the paper prints 1)')
    args = p.parse_args(argv)
    runs = collect_runs(args.exp) if Path(args.exp).is_dir() else []
    if not runs:
        print(f'tables: no results.json under {args.exp}', file=sys.stderr)
    paper = paper_values(args.paper)
    tables = [t.strip() for t in args.tables.split(',') if t.strip()] if args.tables else None
    text = make_report(runs, paper, tables, args.digits)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
