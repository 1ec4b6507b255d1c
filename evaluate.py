"""Evaluate a checkpoint on a labeled split: per-class IoU and mIoU for segmentation; changed IoU,
OA, precision, recall, F1 and kappa for change detection; top-1 and top-5 accuracy on the test set
for classification (the config's dataset names the task).

    python evaluate.py --config configs/pascal.yaml --checkpoint exp/pascal/92/best.pth
    python evaluate.py --config configs/levir.yaml --checkpoint released/levir_5.pth --save-dir exp/vis
    python evaluate.py --config configs/cityscapes.yaml --checkpoint released/cityscapes_1_16.pth \
        --weights student --mode sliding_window --flip --scales 0.75,1.0,1.25 \
        --save-dir exp/vis data_root=/data/cityscapes
    torchrun --nproc_per_node 4 evaluate.py --config configs/ade20k.yaml --checkpoint best.pth

Checkpoints: this project's, the released UniMatch V2 ones (`model` / `model_ema` with `module.`
keys; change detection's too) and plain state dicts. Defaults: the weights the task reports (EMA
where there is one for segmentation, the student for change detection, as the paper); mode = the
config's `eval_mode` or the dataset's (sliding window for Cityscapes, whole image elsewhere); split =
the dataset's evaluation list (`splits/<dataset>/val.txt`; change detection: `test.txt`), whose
paths are relative to `data_root`. Trailing `key=value` words override the config.

Prints the task's table and, as its last line, its headline figure (`mIoU: NN.NN`, `changed IoU:
NN.NN`); writes the same as JSON (default: next to the checkpoint, `eval_<mode>[_flip][_ms].json`,
`_student` added with `--weights student`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import tasks
from dataset.checks import raise_on_errors
from model.hub import format_released

from util.checkpoint import write_text_atomic
from engine.config import load_config
from engine.eval_model import build_eval_model, parse_scales
from engine.failures import guarded
from model.inference import EVAL_MODES
from util.dist import cleanup, is_main, setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    listing = '--list-released' in (sys.argv[1:] if argv is None else argv)   # needs nothing else
    p.add_argument('--list-released', action='store_true', help='print the released checkpoint names and exit')
    p.add_argument('--config', required=not listing)
    p.add_argument('--checkpoint', required=not listing, help='a file, or released:<name> (see --list-released)')
    p.add_argument('--weights', choices=('ema', 'student'), default=None,
                   help='which weights of a checkpoint holding both (default: ema)')
    p.add_argument('--mode', choices=EVAL_MODES, default=None)
    p.add_argument('--flip', action='store_true', help='average with the horizontally flipped image')
    p.add_argument('--scales', default='1.0', help='comma-separated test scales, e.g. 0.75,1.0,1.25')
    p.add_argument('--split', default=None, help="split file (default: the dataset's evaluation list)")
    p.add_argument('--save-dir', default=None, help='write prediction PNGs and side-by-side JPEGs here')
    p.add_argument('--output-json', default=None)
    p.add_argument('--check-data', action='store_true', help='check every image and mask of the split, then exit')
    p.add_argument('overrides', nargs='*', help='config overrides, key=value')
    return p.parse_args(argv)


def default_json_path(checkpoint: str, mode: str, flip: bool, scales: tuple[float, ...],
                      weights: str | None) -> Path:
    name = f'eval_{mode}{"_flip" if flip else ""}{"_ms" if scales != (1.0,) else ""}'
    name += '_student' if weights == 'student' else ''  # asked for: keep it apart from the EMA's
    return Path(checkpoint).resolve().parent / f'{name}.json'


def report_json(report: dict) -> str:
    """Indented JSON with one line per confusion-matrix row (nclass x nclass numbers), where the
    task reports one (classification does not)."""
    text = json.dumps({k: v for k, v in report.items() if k != 'confusion'}, indent=1)
    if 'confusion' not in report:
        return text + '\n'
    rows = ',\n  '.join(json.dumps(row) for row in report['confusion'])
    return text[:-2] + f',\n "confusion": [\n  {rows}\n ]\n}}\n'


def publish(task, result: dict, run: dict, out: Path) -> None:
    """Print the task's table and, last, its headline (`mIoU: NN.NN`); write the JSON report (a
    failed write only warns: the numbers are on screen)."""
    report = {**run, **task.report(result)}
    print(f'{run["dataset"]} {Path(run["split"]).name}: {result["n_images"]} images, '
          f'mode {run["mode"]}, flip {run["flip"]}, scales {run["scales"]}, {run["weights"]} weights')
    print(task.format_result(result))
    try:
        write_text_atomic(report_json(report), out)
        print(f'wrote {out}')
    except OSError as err:
        print(f'warning: could not write {out}: {err}', file=sys.stderr)
    print(task.headline(result), flush=True)


@guarded
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.list_released:
        print(format_released())
        return {}
    device = setup()
    cfg = load_config(args.config, args.overrides)
    task = tasks.for_config(cfg)
    mode = task.eval_mode(args.mode)
    scales = parse_scales(args.scales)
    split = Path(args.split) if args.split else task.eval_split_path()
    raise_on_errors(task.check_inputs({'val': split}, full=args.check_data),
                    log=lambda m: print(m) if is_main() else None)
    if args.check_data:
        print(f'checked every file of {split}: no errors')
        return {}

    model, which = build_eval_model(args.checkpoint, args.weights, cfg, args.config)
    model.to(device).eval()
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(4, os.cpu_count() or 1)
    result = task.evaluate(model, task.dataset(split, 'val'), device, mode=mode, flip=args.flip, scales=scales,
                           save_dir=args.save_dir, progress=True, num_workers=workers)
    if is_main():
        run = {'checkpoint': str(args.checkpoint), 'weights': which, 'config_file': str(args.config),
               'dataset': cfg.dataset, 'split': str(split), 'mode': mode, 'flip': args.flip,
               'scales': list(scales)}
        out = Path(args.output_json) if args.output_json else default_json_path(
            args.checkpoint, mode, args.flip, scales, args.weights)
        publish(task, result, run, out)
    cleanup()
    return result


if __name__ == '__main__':
    main()
