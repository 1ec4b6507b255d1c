"""A run's set-up: the entry scripts' arguments, the config and the data checks, the split files
and the run directory (`setup_run` -> `Run`). Writes nothing into the run directory."""
from __future__ import annotations

import argparse
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import methods
import tasks
from dataset.checks import DataError, raise_on_errors
from dataset.splits import read_split, unlabeled_from_folders
from engine.config import Config, load_config
from engine.data import size_cpu_threads, unlabeled_root
from tasks.base import Task
from util import dist
from util.config import run_directory
from util.logger import get_logger
from util.precision import resolve_precision


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', required=True, help='configs/<dataset>.yaml')
    p.add_argument('--split', help='split name under splits/<dataset>/ (e.g. 92, 1_16)')
    p.add_argument('--labeled-id-path', help='labeled split file (original flag; overrides --split)')
    p.add_argument('--unlabeled-id-path', help='unlabeled split file (original flag)')
    p.add_argument('--save-path', help='run directory (default exp/<dataset>/<method>/<backbone>/<split>)')
    p.add_argument('--check-data', action='store_true', help='check every image and mask, then exit')
    p.add_argument('--plan', nargs='?', const=0, type=process_count, metavar='PROCESSES',
                   help="print the run's resolved plan for PROCESSES processes (default: the config's "
                        'reference_gpus, the paper\'s) and exit without training (docs/plan.md)')
    p.add_argument('overrides', nargs='*', help='config overrides key=value, anywhere among the flags')
    args = p.parse_intermixed_args(argv)
    if not args.split and not args.labeled_id_path:
        p.error('give --split or --labeled-id-path')
    return args


def process_count(text: str) -> int:
    """`--plan`'s PROCESSES: a positive integer (an override right after `--plan` is refused by name)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a process count: give one (--plan 4) or put --plan '
                                         'after the key=value overrides')
    return int(text)


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    log: object
    split: str
    labeled: Path
    unlabeled: Path
    val: Path
    task: Task | None = None             # the dataset's task (None: found from cfg)

    def __post_init__(self):
        if self.task is None:
            self.task = tasks.for_config(self.cfg)


def setup_run(args: argparse.Namespace, method: str | None = None) -> Run:
    """Config and data checks; `--check-data` checks every file and exits. Writes nothing into the
    run directory: its log lines are held until `start_run_files`, once the whole run is built and
    the directory is this run's (`run_dir_owned`)."""
    device = dist.setup()
    overrides = list(args.overrides) + ([f'method={method}'] if method else [])
    cfg = load_config(args.config, overrides)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))    # 'auto' made concrete
    if device.type == 'cpu':
        size_cpu_threads(cfg)
    task = tasks.for_config(cfg)
    split = args.split or Path(args.labeled_id_path).parent.name
    labeled, unlabeled, val = data_paths(cfg, args, task)
    splits = {'labeled': labeled, 'val': val}
    if methods.get(cfg.method).options is not None:     # semi-supervised
        splits['unlabeled'] = unlabeled
    problems = task.check_inputs(splits, full=args.check_data, roots={'unlabeled': unlabeled_root(cfg)})
    raise_on_errors(problems, log=lambda m: print(m, flush=True) if dist.is_main() else None)
    if cfg.pseudo_label_stats:
        check_pseudo_label_masks(task, unlabeled, cfg)
    if args.check_data:
        print(f'checked every file of {", ".join(str(p) for p in splits.values())}: no errors')
        raise SystemExit(0)

    run_dir = Path(args.save_path) if args.save_path else run_directory('exp', cfg.data_name, cfg.method, cfg.backbone, split)
    seed_everything(cfg.seed + dist.rank())
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True   # autotuned convolutions, as the original
    log = get_logger(hold=True)
    log.info(f'config {args.config} ({" ".join(overrides) or "no overrides"}) -> {run_dir}, '
             f'{dist.world_size()} process(es) on {device.type}, precision {cfg.precision}')
    return Run(cfg, run_dir, device, log, split, labeled, unlabeled, val, task)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_paths(cfg: Config, args: argparse.Namespace, task: Task | None = None) -> tuple[Path, Path, Path]:
    """(labeled, unlabeled, val) split files: the original flags win over --split. A generated
    dataset (the toys) is made here on first use."""
    task = task or tasks.for_config(cfg)
    if dist.is_main():
        task.prepare()
    dist.barrier()
    if args.labeled_id_path:
        labeled = Path(args.labeled_id_path)
        unlabeled = Path(args.unlabeled_id_path) if args.unlabeled_id_path else labeled
        val = task.eval_split_path()
    else:
        labeled, unlabeled, val = task.split_paths(args.split)
    if cfg.unlabeled_dirs:
        unlabeled = extra_unlabeled(cfg, labeled)
    return labeled, unlabeled, val


def extra_unlabeled(cfg: Config, labeled: Path) -> Path:
    """The unlabeled list made of every image in `cfg.unlabeled_dirs` under the unlabeled root
    (Table 13), derived by the main process on first use and cached beside the labeled list."""
    cache = labeled.parent / f'unlabeled+{"+".join(d.strip("/").replace("/", "_") for d in cfg.unlabeled_dirs)}.txt'
    if dist.is_main():
        same_root = Path(unlabeled_root(cfg)).resolve() == Path(cfg.data_root).resolve()
        exclude = {s.image for s in read_split(labeled)} if same_root else set()
        with warnings.catch_warnings(record=True) as caught:      # shown before the run's log exists
            warnings.simplefilter('always')
            unlabeled_from_folders(unlabeled_root(cfg), cfg.unlabeled_dirs, cache, exclude)
        for w in caught:
            print(f'warning: {w.message}', flush=True)
    dist.barrier()
    return cache


def check_pseudo_label_masks(task: Task, unlabeled: Path, cfg) -> None:
    """`pseudo_label_stats: true` needs a mask for every unlabeled image: the first one missing is
    an error naming its file (before anything is written)."""
    errors = [p for p in task.check_pseudo_label_masks(unlabeled, unlabeled_root(cfg)) if p.level == 'error']
    if errors:
        more = f' (and {len(errors) - 1} more problem(s))' if len(errors) > 1 else ''
        raise DataError(f'pseudo_label_stats: true needs the unlabeled images\' masks: {errors[0].where}: '
                        f'{errors[0].message}{more}; give them, or set pseudo_label_stats=false')
