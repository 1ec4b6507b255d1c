"""Training, for every method: arguments, run set-up, data loaders, model and optimizer
construction, the learning-rate schedule, checkpoints and `results.json`, per-epoch evaluation.

`train` reads top-down (build, loop, evaluate and save); the entry scripts (`unimatch_v2.py`,
`supervised.py`) call it. It names no method and no task: `methods.get(cfg.method)` says which step
runs, and the run's methods (`methods.create`) add to the model, the step, the checkpoint and the
epoch end; the dataset's task (`tasks.for_config`) gives the data, the model and the evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dataset.checks import DataError, raise_on_errors
from dataset.semi import SampleKey
from dataset.splits import read_split, unlabeled_from_folders
import methods
import tasks
from methods.base import MethodSet
from methods.step import SemiOptions, semi_step, supervised_step
from model import WeightsMismatchError
from model.dpt import DPTSegmentor
from model.hub import load_pretrained
from tasks.base import Task
from util import dist
from util.checkpoint import (CheckpointWriteError, NotACheckpointError, UnsafeCheckpointError, safe_load, save_atomic,
                             write_text_atomic)
from util.config import Config, ConfigError, fused_attention, load_config, run_directory, save_config, to_dict
from util.ema import EMATeacher
from util.exits import hard_exit, one_line
from util.logger import Meter, TensorBoard, get_logger, open_log_file, to_file_only
from util.losses import build_criterion
from util.memory import peak_memory_mib
from util.precision import Precision
from util.pseudo_labels import format_pseudo_label_table, preserved_rng, stats_scalars
from util.run_lock import RunDirBusy, RunDirLock


# ---- a training run -----------------------------------------------------------------------------

def train(args: argparse.Namespace, method: str | None = None) -> 'Training':
    """Train `args.config`'s method (or `method`) and evaluate it after every epoch; resumes from
    the run directory's latest.pth. Labeled-only methods get one labeled loader and no teacher.
    Returns what was trained (for tests and notebooks)."""
    run = setup_run(args, method)
    cfg = run.cfg
    options = methods.get(cfg.method).options          # the core step's options; None: labeled only
    loaders = train_loaders(run, options)
    valset = val_dataset(run)

    student = build_student(cfg, run.device, run.log, run.task)
    teacher = EMATeacher(student, cfg.ema_decay) if options else None    # from the unwrapped student, before DDP
    tr = Training(run, student, wrap_ddp(student, run.device, cfg.compile), teacher, build_optimizer(student, cfg),
                  Precision(cfg.precision, run.device), TrainState(), TensorBoard(run.run_dir),
                  methods.create(cfg, student, run.device))
    iters = epoch_iterations(loaders[0], cfg)
    step = make_step(tr, options, iters)     # the criterion: the last thing built before the run directory

    with run_dir_owned(run):                 # one run per directory: a second one stops here
        ckpt = read_checkpoint(run)          # latest.pth, its settings checked against these
        start_run_files(run)                 # only now: config.yaml, train.log
        resume(tr, ckpt)
        run.log.info(f'{" + ".join(m.name for m in tr.methods)}: '
                     + ', '.join(f'{len(loader.dataset)} {name} samples per epoch'
                                 for name, loader in zip(('unlabeled', 'labeled') if options else ('labeled',), loaders))
                     + f', {iters} iterations per epoch')
        preemption = Preemption()
        try:
            for epoch in range(tr.state.epoch + 1, cfg.epochs):
                stats = train_epoch(tr, epoch, loaders, step, preemption)
                end_of_epoch(tr, epoch, valset, stats, evaluation_due(cfg, epoch, iters))
        finally:
            preemption.close()
        tr.tb.close()
    dist.cleanup()
    return tr


def train_loaders(run: 'Run', options: SemiOptions | None) -> list[DataLoader]:
    """[unlabeled, labeled] loaders: an epoch is one pass over the unlabeled set (batches of
    batch_size x unlabeled_ratio), with the labeled list repeated to as many batches of batch_size.
    Labeled only (options None), as the original: one loader at twice the batch size, the labeled
    list repeated to `labeled_upsample` samples when it is shorter."""
    cfg, task = run.cfg, run.task
    if options is None:
        ((n, batch),) = epoch_samples(cfg, options, len(task.dataset(run.labeled, 'train_l')))
        return [make_loader(task.dataset(run.labeled, 'train_l', nsample=n), cfg, batch)]
    trainset_u = task.dataset(run.unlabeled, 'train_u', num_strong=options.views, root=unlabeled_root(cfg))
    (_, batch_u), (n_l, batch_l) = epoch_samples(cfg, options, None, len(trainset_u))
    return [make_loader(trainset_u, cfg, batch_u),
            make_loader(task.dataset(run.labeled, 'train_l', nsample=n_l), cfg, batch_l, seed_offset=1)]


def epoch_samples(cfg: Config, options: SemiOptions | None, n_labeled: int | None,
                  n_unlabeled: int | None = None) -> list[tuple[int, int]]:
    """(samples per epoch, batch size per process) of each of `train_loaders`' loaders, from the
    labeled list's length (labeled only) or the unlabeled set's (semi-supervised, as the task's
    dataset holds it: `Task.epoch_unlabeled`)."""
    if options is None:
        return [(max(n_labeled, cfg.labeled_upsample), cfg.batch_size * 2)]
    return [(n_unlabeled, cfg.batch_size * cfg.unlabeled_ratio), (n_unlabeled // cfg.unlabeled_ratio, cfg.batch_size)]


def make_step(tr: 'Training', options: SemiOptions | None, iters_per_epoch: int) -> Callable:
    """The step the loop calls with one batch per loader: the run's methods set their schedules
    for it (`begin_step`), then run their hooks inside it."""
    cfg = tr.run.cfg
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.kwargs)
    if options is None:
        return lambda batch_l: supervised_step(tr.ddp, batch_l, criterion)
    options = replace(options, conf_thresh=cfg.conf_thresh, lossu_weight=cfg.lossu_weight,
                      weighted_mean=cfg.total_loss == 'mean')
    hooks = list(tr.methods)
    # teacher: online (Table 10) labels with the student as it is (train mode, as the original's
    # remote-sensing code), under the step's no_grad; the EMA is still updated and evaluated.
    labeler = tr.teacher if cfg.teacher == 'ema' else tr.student

    def step(batch_u: dict, batch_l: dict) -> dict[str, torch.Tensor]:
        tr.methods.begin_step(tr.state.epoch + 1, tr.state.iteration, iters_per_epoch)
        return semi_step(tr.ddp, labeler, batch_l, batch_u, criterion, options, hooks)
    return step


# ---- arguments and run directory -------------------------------------------------------------------

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
             f'{dist.world_size()} process(es) on {device.type}')
    return Run(cfg, run_dir, device, log, split, labeled, unlabeled, val, task)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data ---------------------------------------------------------------------------------------------

def cpus_per_process() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cpus // max(1, torch.cuda.device_count() if torch.cuda.is_available() else dist.world_size()))


def num_workers(cfg: Config) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return max(0, min(8, cpus_per_process() - 1))


def size_cpu_threads(cfg: Config) -> None:
    """Training on the CPU: compute threads = this process's cores minus its data-loader workers, so
    the workers do not fight the model for cores. An OMP_NUM_THREADS set by the user wins."""
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(max(1, cpus_per_process() - num_workers(cfg)))


def derived_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (numpy's SeedSequence): (seed, epoch, position) for a
    sample, (seed, rank, step, micro-batch) for a step."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way: `set_epoch(epoch, skip)` drops the first
    `skip` samples of this process's (seeded, epoch-dependent) order, so a run resumed mid-epoch
    sees exactly the samples it had not seen yet. It yields `SampleKey`s: each index with the seed
    of its augmentations, derived from (seed, epoch, its position in the epoch's global order)."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())       # this process's: positions rank, rank + replicas, ...
        keys = [SampleKey(i, derived_seed(self.seed, self.epoch, self.rank + j * self.num_replicas))
                for j, i in enumerate(indices)]
        return iter(keys[getattr(self, 'skip', 0):])

    def __len__(self) -> int:
        return self.num_samples - getattr(self, 'skip', 0)


def make_loader(dataset, cfg: Config, batch_size: int, seed_offset: int = 0) -> DataLoader:
    """Shuffled, drop_last loader over this process's shard (the same sampler in one process and
    many), with workers, pinning and persistence sized to the machine."""
    sampler = ResumableSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                               shuffle=True, seed=cfg.seed + seed_offset)
    workers = num_workers(cfg)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=workers > 0, worker_init_fn=_init_worker)


def _init_worker(worker_id: int) -> None:
    """A stop request (SIGTERM, Ctrl-C: to the whole process group, as schedulers and terminals
    send it) is the main process's to handle: workers ignore it and serve batches until the
    checkpoint is saved; they exit with the main process. Augmentations are seeded per sample
    (`SampleKey`); the global generators are seeded for anything else."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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


def unlabeled_root(cfg: Config) -> str:
    return cfg.unlabeled_root or cfg.data_root


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


# ---- model and optimizer ------------------------------------------------------------------------------

def build_student(cfg: Config, device: torch.device, log=None, task: Task | None = None) -> nn.Module:
    model = (task or tasks.for_config(cfg)).build_model()
    if cfg.pretrained:   # 'auto', released:<name> or a path; found, fetched or refused in model/hub.py
        path = load_pretrained(model, cfg.pretrained, cfg.backbone, progress=dist.is_main())
        if log:
            log.info(f'loaded pretrained weights {path}')
    if cfg.comp_drop_at != 'features':
        if type(model) is not DPTSegmentor:
            raise ConfigError(f"config key 'comp_drop_at': {cfg.comp_drop_at!r} needs the plain DPT model; "
                              f'method {cfg.method} builds its own ({type(model).__name__})')
        model.set_comp_drop_at(cfg.comp_drop_at)
    if cfg.lock_backbone:
        model.lock_backbone()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.set_fused_attention(fused_attention(cfg, device.type))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if log:
        n = sum(p.numel() for p in model.parameters())
        log.info(f'model {cfg.backbone} ({type(model).__name__}): {n / 1e6:.2f}M parameters')
    return model.to(device)


def lr_scale(cfg: Config, processes: int | None = None) -> float:
    """The paper's lr is for `reference_gpus` processes; it follows the global batch linearly.
    processes: this run's (default) or a planned count (`--plan`)."""
    processes = dist.world_size() if processes is None else processes
    return processes * cfg.grad_accum / cfg.reference_gpus if cfg.scale_lr else 1.0


def build_optimizer(model: nn.Module, cfg: Config, fused: bool = True,
                    processes: int | None = None) -> torch.optim.Optimizer:
    """Two groups: trainable encoder parameters at lr, everything else at lr * lr_multi. AdamW (the
    paper's segmentation recipe; weight decay on every parameter) or, `optimizer: sgd`, SGD with
    momentum (its classification recipe, TorchSSL's and USB's FixMatch): as theirs, no weight decay
    on biases and BatchNorm parameters, which get two more groups, [encoder, head, encoder's
    exempt, head's exempt] (set_lr gives odd groups the head's lr).

    fused: one fused AdamW kernel per parameter group (this project's default; on the CPU about 3x
    faster than False, torch's default there, a Python loop over the tensors, which the original used).
    processes: as `lr_scale`."""
    base = cfg.lr * lr_scale(cfg, processes)
    enc = [p for n, p in model.named_parameters() if n.startswith('backbone.') and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith('backbone.') and p.requires_grad]
    if cfg.optimizer == 'sgd':
        exempt = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                  if n == 'bias' or isinstance(m, nn.modules.batchnorm._BatchNorm)}
        lrs = (base, base * cfg.lr_multi)
        groups = [{'params': [p for p in ps if id(p) not in exempt], 'lr': lr} for ps, lr in zip((enc, head), lrs)]
        groups += [{'params': [p for p in ps if id(p) in exempt], 'lr': lr, 'weight_decay': 0.0}
                   for ps, lr in zip((enc, head), lrs)]
        return torch.optim.SGD(groups, lr=base, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    groups = [{'params': enc, 'lr': base}, {'params': head, 'lr': base * cfg.lr_multi}]
    return torch.optim.AdamW(groups, lr=base, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(schedule: str, it: int, total: int) -> float:
    """The learning rate at step `it` of `total`, as a fraction of the base: 'poly' (1 - t/T)^0.9, the
    original's; 'cosine' cos(7 pi t / 16 T), FixMatch's and USB's (0.2 of the base at the end)."""
    if schedule == 'cosine':
        return math.cos(7 * math.pi * it / (16 * total))
    return (1 - it / total) ** 0.9


EVAL_FINAL_FRACTION = 0.8    # TorchSSL's loop evaluates every eval_interval_final iterations past 80% of the run


def torchssl_evaluations(iterations: int, interval: int, final: int, total: int) -> int:
    """How many times TorchSSL's training loop has evaluated after `iterations` iterations of
    `total`: after iteration it (from 0) when it % interval == 0, and once it > 0.8 total when
    it % final == 0 (its fixmatch.py: num_eval_iter, then 1000)."""
    if iterations <= 0:
        return 0
    last, switch = iterations - 1, math.floor(EVAL_FINAL_FRACTION * total)     # switch: last it on `interval`
    return min(last, switch) // interval + 1 + max(0, last // final - switch // final)


def evaluation_due(cfg: Config, epoch: int, iters_per_epoch: int) -> bool:
    """Whether `epoch` ends with an evaluation: every epoch (eval_interval 0), else each epoch during
    which TorchSSL's loop would have evaluated (torchssl_evaluations with eval_interval and
    eval_interval_final), so that the best figure is a maximum over as many evaluations as its."""
    if cfg.eval_interval == 0:
        return True
    rule = (cfg.eval_interval, cfg.eval_interval_final or cfg.eval_interval, iters_per_epoch * cfg.epochs)
    return torchssl_evaluations((epoch + 1) * iters_per_epoch, *rule) > torchssl_evaluations(epoch * iters_per_epoch, *rule)


def set_lr(optimizer: torch.optim.Optimizer, cfg: Config, it: int, total: int) -> float:
    """lr = base * lr_factor(it) (head x lr_multi), set after optimizer step `it` (epoch *
    iterations + i) for the steps after it, as the original: step it + 1 runs at lr(it), so the
    first two steps run at the base lr."""
    lr = cfg.lr * lr_scale(cfg) * lr_factor(cfg.lr_schedule, it, total)
    for i, group in enumerate(optimizer.param_groups):     # [encoder, head(, encoder, head)]
        group['lr'] = lr * cfg.lr_multi if i % 2 else lr
    return lr


def wrap_ddp(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """DDP without find_unused_parameters (every trainable parameter gets a gradient), optionally
    compiled. The unwrapped model stays the one to save and to copy into the EMA teacher."""
    if dist.is_dist():
        model = dist.ddp(model, device)
    return torch.compile(model) if compile else model


# ---- state, checkpoints, results -------------------------------------------------------------------

@dataclass
class TrainState:
    epoch: int = -1                      # last completed epoch
    iteration: int = 0                   # iterations already done in epoch + 1 (mid-epoch checkpoints)
    global_step: int = 0                 # optimizer steps taken over the whole run
    skipped_steps: int = 0               # steps skipped for a non-finite loss (on_nonfinite: skip)
    epoch_stats: dict | None = None      # running sums of the epoch in progress (mid-epoch checkpoints)
    best: float = 0.0                    # best of the task's metric (mIoU, changed IoU, ...), student
    best_ema: float = 0.0                # ... and EMA teacher
    best_epoch: int = -1
    best_epoch_ema: int = -1
    history: list = field(default_factory=list)    # per epoch: {'epoch', <score>, <score>_ema, ...}


@dataclass
class Training:
    """Everything one training run updates, built once by the entry script."""
    run: Run
    student: nn.Module                   # unwrapped
    ddp: nn.Module                       # the student, DDP-wrapped when distributed
    teacher: EMATeacher | None
    optimizer: torch.optim.Optimizer
    precision: Precision
    state: TrainState
    tb: object
    methods: MethodSet = field(default_factory=lambda: MethodSet([]))   # their state goes in the checkpoint
    last_nonfinite: dict | None = None


def checkpoint_dict(tr: Training) -> dict:
    s, cfg = tr.state, tr.run.cfg
    return {
        'model': tr.student.state_dict(),
        'model_ema': tr.teacher.state_dict() if tr.teacher else None,
        'optimizer': tr.optimizer.state_dict(),
        'scaler': tr.precision.state_dict(),
        'epoch': s.epoch,
        'iteration': s.iteration,
        'global_step': s.global_step,
        'skipped_steps': s.skipped_steps,
        'epoch_stats': s.epoch_stats,
        'previous_best': s.best,
        'previous_best_ema': s.best_ema,
        'best_epoch': s.best_epoch,
        'best_epoch_ema': s.best_epoch_ema,
        'history': s.history,
        'config': to_dict(cfg),
        'split': tr.run.split,
        **tr.methods.state_dicts(),
    }


LATEST, PREVIOUS = 'latest.pth', 'latest.prev.pth'    # the file it replaced: a way back from a bad one


def save_checkpoint(tr: Training, best: bool = False) -> None:
    if dist.is_main():
        ckpt = checkpoint_dict(tr)
        save_atomic(ckpt, tr.run.run_dir / LATEST, keep_previous=tr.run.run_dir / PREVIOUS)
        if best:
            save_atomic(ckpt, tr.run.run_dir / 'best.pth')
    dist.barrier()


@contextlib.contextmanager
def run_dir_owned(run: Run):
    """The run directory's lock (`util/run_lock.py`) for the time of the block, taken by the main
    process; every process gets its outcome, so all stop together when the directory is busy."""
    lock, busy = None, None
    if dist.is_main():
        try:
            lock = RunDirLock(run.run_dir)
        except RunDirBusy as err:
            busy = str(err)
    busy = dist.broadcast_object(busy)
    if busy:
        raise RunDirBusy(busy)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def read_checkpoint(run: Run) -> dict | None:
    """`<run_dir>/latest.pth` if there is one, its settings checked against the run's
    (`check_resume`); an unreadable one is refused with the ways out."""
    path = run.run_dir / LATEST
    if not path.exists():
        return None
    try:
        ckpt = safe_load(path)
    except NotACheckpointError as err:
        previous = run.run_dir / PREVIOUS
        back = f'to resume from the checkpoint before it: mv {previous} {path}; ' if previous.exists() else ''
        raise NotACheckpointError(f'{err}. {back}to start the run over: move {path} aside') from None
    check_resume(ckpt.get('config'), ckpt.get('split'), run, path)
    return ckpt


def start_run_files(run: Run) -> None:
    """What a run writes first into its (owned) directory: config.yaml and train.log (with the
    lines held so far); the `stopped` marker a stopped run left goes."""
    if dist.is_main():
        save_config(run.cfg, run.run_dir / 'config.yaml')
        (run.run_dir / STOP_MARKER).unlink(missing_ok=True)
    open_log_file(run.log, run.run_dir)


def resume(tr: Training, ckpt: dict | None) -> None:
    """Continue from the run directory's checkpoint `ckpt` (`read_checkpoint`), if any: after its
    last epoch, or mid-epoch."""
    if ckpt is None:
        return
    tr.student.load_state_dict(ckpt['model'])
    if tr.teacher is not None and ckpt.get('model_ema') is not None:
        tr.teacher.load_state_dict(ckpt['model_ema'])
    tr.optimizer.load_state_dict(ckpt['optimizer'])
    tr.precision.load_state_dict(ckpt.get('scaler', {}))
    tr.methods.load_state_dicts(ckpt, tr.run.device)
    tr.state = TrainState(ckpt['epoch'], ckpt.get('iteration', 0), ckpt.get('global_step', 0),
                          ckpt.get('skipped_steps', 0), ckpt.get('epoch_stats'), ckpt['previous_best'],
                          ckpt.get('previous_best_ema', 0.0), ckpt.get('best_epoch', -1),
                          ckpt.get('best_epoch_ema', -1), ckpt.get('history', []))
    where = f'epoch {tr.state.epoch + 1} iteration {tr.state.iteration}' if tr.state.iteration \
        else f'the end of epoch {tr.state.epoch}'
    tr.run.log.info(f'resumed from {tr.run.run_dir / LATEST} at {where} (step {tr.state.global_step})')


# Keys a checkpoint cannot be resumed with another value of: its weights and state belong to them
# (another seed is another run).
FIXED_ON_RESUME = ('nclass', 'backbone', 'model', 'dataset', 'method', 'seed')
# Keys that do not change what a run computes (speed, logging, workers, where the initial weights
# came from): a resume takes any value of these, and a larger `epochs`. Any other key that differs
# from the checkpoint's config stops the resume unless `resume_changes: allow`.
FREE_ON_RESUME = ('num_workers', 'log_interval', 'checkpoint_minutes', 'compile', 'grad_checkpointing',
                  'channels_last', 'attention', 'pretrained', 'download', 'eval_batch_size', 'on_nonfinite',
                  'resume_changes', 'pseudo_label_stats', 'pseudo_label_stats_images')


def check_resume(saved: dict | None, saved_split: str | None, run: Run, path: Path) -> None:
    """The run's settings against those `path` was trained with: a FIXED_ON_RESUME key that differs
    is refused; other differences (but FREE_ON_RESUME keys and a larger `epochs`) are named and
    refused unless `resume_changes: allow`, which logs them."""
    if not saved:
        return
    new = to_dict(run.cfg)
    for key in FIXED_ON_RESUME:
        if key in saved and saved[key] != new[key]:
            raise ConfigError(f'{path} was trained with {key}={saved[key]!r} but the config has '
                              f'{key}={new[key]!r}; use another --save-path or fix the config')
    changes = [f'{key}: {saved[key]!r} -> {new[key]!r}' for key in new
               if key in saved and saved[key] != new[key] and key not in FREE_ON_RESUME
               and not (key == 'epochs' and new[key] >= saved[key])]
    if saved_split is not None and saved_split != run.split:
        changes.append(f'split: {saved_split!r} -> {run.split!r}')
    if not changes:
        return
    if run.cfg.resume_changes != 'allow':
        raise ConfigError(f'{path} was trained with other settings ({"; ".join(changes)}): resuming would '
                          f'change the run. Undo the changes, use another --save-path, or add '
                          f'resume_changes=allow to resume with them')
    run.log.warning(f'resuming {path} with changed settings (resume_changes=allow): {"; ".join(changes)}')


def save_results(tr: Training) -> None:
    """results.json: the task's metric per epoch, best and final, for student and EMA, the history
    of every score, and what the task adds."""
    s, cfg, semi, task = tr.state, tr.run.cfg, tr.teacher is not None, tr.run.task
    hist, m = s.history, task.metric
    results = {
        'dataset': cfg.dataset, 'method': cfg.method, 'backbone': cfg.backbone, 'split': tr.run.split,
        'epochs': s.epoch + 1, 'epochs_total': cfg.epochs, 'global_step': s.global_step,
        'skipped_steps': s.skipped_steps,
        'epoch_stats': s.epoch_stats,
        m: [h[m] for h in hist],
        f'{m}_ema': [h[f'{m}_ema'] for h in hist] if semi else None,
        f'best_{m}': s.best if hist else None,
        f'best_{m}_ema': s.best_ema if (hist and semi) else None,
        f'final_{m}': hist[-1][m] if hist else None,
        f'final_{m}_ema': hist[-1][f'{m}_ema'] if (hist and semi) else None,
        'best_epoch': s.best_epoch, 'best_epoch_ema': s.best_epoch_ema if semi else None,
        **task.results_extra(hist, s.best_epoch),
        'history': hist,
    }
    if dist.is_main():
        write_text_atomic(json.dumps(results, indent=2) + '\n', tr.run.run_dir / 'results.json')


# ---- the training loop ----------------------------------------------------------------------------

class Preempted(Exception):
    """A stop was requested; a checkpoint at the current iteration has been saved."""


class NonFiniteLoss(RuntimeError):
    pass


STOP_MARKER = 'stopped'     # in the run directory while the last run ended on a stop request
SECOND_INTERRUPT_S = 1.0    # a SIGINT this soon after the first is the same request passed on (torchrun)


class Preemption:
    """Turns a stop request into a flag the loop checks after each step: SIGTERM (a scheduler's
    preemption or time limit, `kill`, `timeout`, torchrun passing on its own signal) or a first
    SIGINT (Ctrl-C). A second SIGINT, a second or more after the first, stops at once
    (KeyboardInterrupt). Installed in the main thread; `close` restores the previous handlers."""

    def __init__(self):
        self.requested: str | None = None      # the signal's name
        self.first_interrupt = 0.0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_interrupt and now - self.first_interrupt > SECOND_INTERRUPT_S:
                raise KeyboardInterrupt
            self.first_interrupt = self.first_interrupt or now
        self.requested = self.requested or signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def poll(self, device: torch.device, checkpoint_due: bool) -> tuple[bool, bool]:
        """(stop, save) agreed by every process: stop when any process was signalled, save when
        stopping or when any process finds a timed checkpoint due. One all-reduce per step."""
        flags = dist.all_reduce_sum(torch.tensor([float(self.requested is not None), float(checkpoint_due)], device=device))
        stop = bool(flags[0] > 0)
        return stop, stop or bool(flags[1] > 0)


def epoch_iterations(loader: DataLoader, cfg: Config) -> int:
    """Optimizer steps per epoch: batches of the (drop_last) loader over grad_accum, at most
    max_iters_per_epoch."""
    return steps_per_epoch(loader.sampler.num_samples, loader.batch_size, cfg)


def steps_per_epoch(samples_per_process: int, batch_size: int, cfg: Config) -> int:
    """`epoch_iterations` of a loader whose sampler gives each process `samples_per_process`."""
    n = samples_per_process // batch_size // cfg.grad_accum
    return min(n, cfg.max_iters_per_epoch) if cfg.max_iters_per_epoch > 0 else n


def train_epoch(tr: Training, epoch: int, loaders: list[DataLoader],
                step_fn: Callable[..., dict[str, torch.Tensor]], preemption: Preemption) -> dict:
    """One epoch over zip(*loaders) (the first loader sets its length), from `tr.state.iteration`.

    step_fn(*batches) -> dict of losses/statistics with 'loss'. An iteration is one optimizer step
    over `grad_accum` batches. Non-finite losses stop the run (or skip the step, `on_nonfinite:
    skip`) without writing a checkpoint. On a stop request (`Preemption`), or every
    `checkpoint_minutes`, latest.pth is written at the current iteration, with the epoch's running
    statistics; after a stop request, on every process, and the loop raises `Preempted`.
    Each micro-batch's step runs from torch's generator seeded with (seed, rank, epoch, iteration,
    micro-batch), so dropout masks and sampled anchors do not depend on where a run was resumed.
    """
    run, cfg, state = tr.run, tr.run.cfg, tr.state
    iters, accum = epoch_iterations(loaders[0], cfg), cfg.grad_accum
    start = state.iteration
    for loader in loaders:
        loader.sampler.set_epoch(epoch, skip=start * accum * loader.batch_size)
    batches = zip(*loaders)
    step_log = StepLog(run, tr.tb, epoch, iters, start, state.epoch_stats if start else None)
    last_save = time.time()
    tr.ddp.train()
    for i in range(start, iters):
        it = epoch * iters + i
        out = accumulate(tr, step_fn, batches, accum, seed=(cfg.seed, dist.rank(), epoch, i))
        if out is None:
            handle_nonfinite(tr, epoch, i)
            continue
        tr.precision.step(tr.optimizer)
        lr = set_lr(tr.optimizer, cfg, it, iters * cfg.epochs)
        if tr.teacher is not None:
            tr.teacher.update(tr.student, it)
        state.iteration, state.global_step = i + 1, state.global_step + 1
        step_log(i, out, lr)
        due = cfg.checkpoint_minutes > 0 and time.time() - last_save > 60 * cfg.checkpoint_minutes
        stop, save = preemption.poll(run.device, due)
        if save:
            state.epoch_stats = step_log.meter.state_dict()
            save_checkpoint(tr)
            last_save = time.time()
            run.log.info(f'checkpoint at epoch {epoch} iteration {i + 1} (step {state.global_step})')
        if stop:
            if dist.is_main():
                write_text_atomic(f'{preemption.requested or "a stop request on another process"} at epoch '
                                  f'{epoch} iteration {i + 1} (step {state.global_step})\n',
                                  run.run_dir / STOP_MARKER)
            raise Preempted
    state.iteration, state.epoch_stats = 0, None
    return step_log.summary()


def accumulate(tr: Training, step_fn: Callable, batches, accum: int, seed: tuple[int, ...] | None = None
               ) -> dict[str, torch.Tensor] | None:
    """Forward and backward `accum` batches (gradients summed, DDP synchronising on the last only);
    returns the averaged loss dict, or None (gradients cleared, the offending dict kept in
    `tr.last_nonfinite`) when a loss is not finite on any process. `seed`: torch's generator is
    seeded with (*seed, k) before micro-batch k."""
    total: dict[str, torch.Tensor] = {}
    for k in range(accum):
        if seed is not None:
            torch.manual_seed(derived_seed(*seed, k))
        sync = k == accum - 1 or not hasattr(tr.ddp, 'no_sync')
        with (contextlib.nullcontext() if sync else tr.ddp.no_sync()), tr.precision.autocast():
            out = step_fn(*(to_device(b, tr.run.device) for b in next(batches)))
        if not all_finite(out):
            tr.optimizer.zero_grad(set_to_none=True)
            tr.last_nonfinite = out
            return None
        with (contextlib.nullcontext() if sync else tr.ddp.no_sync()):
            tr.precision.backward(out['loss'] / accum)
        for key, value in out.items():
            total[key] = total.get(key, 0) + value.detach() / accum
    return total


def all_finite(out: dict[str, torch.Tensor]) -> bool:
    """Every loss term finite on every process."""
    bad = torch.tensor([0.0 if torch.isfinite(out['loss']).all() else 1.0], device=out['loss'].device)
    return bool(dist.all_reduce_sum(bad).item() == 0)


def handle_nonfinite(tr: Training, epoch: int, i: int) -> None:
    """Log the step and every loss term; stop (raise) or count the skipped step."""
    terms = ', '.join(f'{k}={float(v.detach()):.4g}' for k, v in tr.last_nonfinite.items())
    msg = f'non-finite loss at epoch {epoch} iteration {i} (step {tr.state.global_step}): {terms}'
    if tr.run.cfg.on_nonfinite == 'skip':
        tr.run.log.warning(msg + ' -- step skipped')
        tr.state.skipped_steps += 1
        return
    tr.run.log.error(msg + ' -- stopping; the last checkpoint is left as it was')
    raise NonFiniteLoss(msg)


# Errors whose message says all (the key, file or line and what to do): printed as they are.
EXPLAINED_ERRORS = (DataError, ConfigError, WeightsMismatchError, UnsafeCheckpointError, NotACheckpointError,
                    CheckpointWriteError, NonFiniteLoss, RunDirBusy, FileNotFoundError)
INTERRUPTED_EXIT = 130     # 128 + SIGINT, what shells report for a job ended by Ctrl-C


def guarded(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap an entry script's main. A preempted run exits 0 after its checkpoint. Any failure -- a
    step, a data-loader worker, the evaluation, a save; any exception -- ends with one line on
    stderr, `error: <message>` (`error: <Type>: <message>` for an unexpected one), the traceback in
    train.log when the run has one, and exit status 1 (130 for a Ctrl-C that is not a stop
    request). From the command line the end is `hard_exit`: data-loader workers (which ignore
    SIGTERM, `_init_worker`) are killed and no exit handler can wait for them. Called with
    arguments (tests, notebooks) it raises SystemExit instead."""
    def wrapper(*args, **kwargs):
        from_command_line = not args and not kwargs      # main() parses sys.argv: this process is the run
        try:
            return main(*args, **kwargs)
        except Preempted:
            logging.getLogger('semiseg').info('stopped on request: checkpoint saved, exiting')
            dist.cleanup()
            raise SystemExit(0)
        except SystemExit:
            raise
        except BaseException as err:            # noqa: BLE001 -- every failure ends the same way
            code = report_failure(err)
        if from_command_line:
            hard_exit(code)
        raise SystemExit(code)
    return wrapper


def report_failure(err: BaseException) -> int:
    """The one line on stderr -- and, for an unexpected error, its traceback in train.log (or in a
    file the line names, before there is a train.log); the exit status. An explained error (a
    check's: the key, file or line) leaves the run directory as it was."""
    logging.raiseExceptions = False             # a full disk: the log's own write errors stay off the console
    log = logging.getLogger('semiseg')
    if isinstance(err, KeyboardInterrupt):
        to_file_only(log, 'interrupted (Ctrl-C): exiting without a checkpoint')
        print('error: interrupted (Ctrl-C); the last checkpoint is left as it was', file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    if isinstance(err, EXPLAINED_ERRORS):      # found by a check, often before the run may write anything
        if dist.is_main() or not isinstance(err, NonFiniteLoss):     # every process finds a NaN; one says so
            print(f'error: {err}', file=sys.stderr, flush=True)
        return 1
    line = one_line(err)
    if not to_file_only(log, f'error: {line}', (type(err), err, err.__traceback__)):
        trace = Path(tempfile.gettempdir()) / f'semiseg-error-{os.getpid()}.txt'
        trace.write_text(''.join(traceback.format_exception(err)))
        line += f' (traceback in {trace})'
    prefix = f'rank {dist.rank()}: ' if dist.world_size() > 1 else ''
    print(f'error: {prefix}{line}', file=sys.stderr, flush=True)
    return 1


# ---- evaluation at the end of an epoch ----------------------------------------------------------------

def val_dataset(run: Run):
    return run.task.dataset(run.val, 'val')


def end_of_epoch(tr: Training, epoch: int, valset, train_stats: dict, evaluate: bool = True) -> None:
    """Evaluate student (and EMA), update best figures, save latest/best checkpoints and results.json.
    best.pth follows the figure the task reports: the EMA model's when the task says so
    (`Task.reports_ema`) and there is one, else the student's. Without `evaluate` (`evaluation_due`)
    only latest.pth and results.json are written; the history holds evaluated epochs."""
    run, state, task = tr.run, tr.state, tr.run.task
    if not evaluate:
        state.epoch = epoch
        run.log.info(f'epoch {epoch}: not evaluated (eval_interval {run.cfg.eval_interval})')
        save_checkpoint(tr)
        save_results(tr)
        return
    m = task.metric
    t0 = time.time()
    res = task.evaluate(tr.student, valset, run.device)
    res_ema = task.evaluate(tr.teacher.model, valset, run.device) if tr.teacher else None
    scores, scores_ema = task.scores(res), task.scores(res_ema) if res_ema else None
    entry = {'epoch': epoch}
    for key, value in scores.items():
        entry[key], entry[f'{key}_ema'] = value, scores_ema[key] if scores_ema else None
    state.history.append({**entry, **train_stats})
    state.epoch = epoch
    reported_ema = res_ema is not None and task.reports_ema
    improved = res_ema[m] >= state.best_ema if reported_ema else res[m] >= state.best
    if res[m] >= state.best:
        state.best, state.best_epoch = res[m], epoch
    if res_ema and res_ema[m] >= state.best_ema:
        state.best_ema, state.best_epoch_ema = res_ema[m], epoch

    run.log.info(f'epoch {epoch} {task.result_title} ({"EMA" if res_ema else "model"}, {task.eval_mode()}):\n'
                 + task.format_result(res_ema or res))
    label = task.metric_label
    ema_txt = f', EMA {label} {res_ema[m]:.2f} (best {state.best_ema:.2f})' if res_ema else ''
    run.log.info(f'epoch {epoch}: {label} {res[m]:.2f} (best {state.best:.2f}){ema_txt}, '
                 f'eval {time.time() - t0:.1f}s')
    tr.tb.scalars({k: v for k, v in {**scores, **{f'{k}_ema': v for k, v in (scores_ema or {}).items()}}.items()
                   if isinstance(v, float)}, epoch, 'val/')
    state.history[-1].update(pseudo_label_diagnostics(tr, epoch))
    tr.methods.end_of_epoch(epoch, tr.student, tr.teacher, res, res_ema, run.log)
    save_checkpoint(tr, best=improved)
    save_results(tr)


# ---- pseudo-label diagnostics (docs/diagnostics.md) ----------------------------------------------------

def check_pseudo_label_masks(task: Task, unlabeled: Path, cfg: Config) -> None:
    """`pseudo_label_stats: true` needs a mask for every unlabeled image: the first one missing is
    an error naming its file (before anything is written)."""
    errors = [p for p in task.check_pseudo_label_masks(unlabeled, unlabeled_root(cfg)) if p.level == 'error']
    if errors:
        more = f' (and {len(errors) - 1} more problem(s))' if len(errors) > 1 else ''
        raise DataError(f'pseudo_label_stats: true needs the unlabeled images\' masks: {errors[0].where}: '
                        f'{errors[0].message}{more}; give them, or set pseudo_label_stats=false')


def pseudo_label_diagnostics(tr: Training, epoch: int) -> dict:
    """With `pseudo_label_stats`: the pseudo-labels of the student and of the EMA on the fixed
    subset of the unlabeled list (`Task.pseudo_label_set`), measured against its masks; logged as
    a table and to TensorBoard, returned as {'pseudo_labels': {model: stats}} for the epoch's
    history (results.json). Eval mode, no gradient, the global generators left as they were: the
    training after it is the same with the flag on or off. The masks go nowhere else."""
    run, cfg, task = tr.run, tr.run.cfg, tr.run.task
    if not cfg.pseudo_label_stats:
        return {}
    t0 = time.time()
    models = {'student': tr.student, **({'ema': tr.teacher.model} if tr.teacher else {})}
    with preserved_rng():
        dataset = task.pseudo_label_set(run.unlabeled, unlabeled_root(cfg))
        stats = {name: task.pseudo_label_stats(model, dataset, run.device) for name, model in models.items()}
    names = task.class_names()
    labeller = ({'ema': 'the EMA', 'online': 'the student'}[cfg.teacher] + ' labels the weak view in training'
                if tr.teacher else 'labeled-only: no pseudo-labels in training')
    run.log.info(f'epoch {epoch} pseudo-labels on {len(dataset)} unlabeled images ({labeller}; '
                 f'{time.time() - t0:.1f}s), percent:\n'
                 + format_pseudo_label_table(stats, names, cfg.conf_thresh, task.pseudo_label_unit))
    tr.tb.scalars(stats_scalars(stats, names), epoch, 'pseudo_labels/')
    return {'pseudo_labels': stats}


class StepLog:
    """Per-step bookkeeping of a training epoch: process-averaged statistics, running means,
    TensorBoard scalars and a console line every `log_interval` steps with speed and ETA."""

    def __init__(self, run: Run, tb, epoch: int, iters: int, start: int = 0, restored: dict | None = None):
        self.run, self.tb, self.epoch, self.iters, self.start = run, tb, epoch, iters, start
        self.total = iters * run.cfg.epochs
        self.meter, self.t0 = Meter(), time.time()
        if restored:      # resumed mid-epoch: the epoch's means continue over the steps before the stop
            self.meter.load_state_dict(restored)

    def __call__(self, i: int, out: dict[str, torch.Tensor], lr: float) -> None:
        it = self.epoch * self.iters + i
        stats = {k: float(dist.all_reduce_mean(v.detach().float().clone())) for k, v in out.items()}
        self.meter.update(stats)
        self.tb.scalars({**stats, 'lr': lr}, it, 'train/')
        if (i + 1) % self.run.cfg.log_interval == 0 or i + 1 == self.iters:
            spi = (time.time() - self.t0) / (i + 1 - self.start)
            self.run.log.info(f'epoch {self.epoch} iter {i + 1}/{self.iters}: {self.meter}, lr {lr:.2e}, '
                              f'{spi:.2f} s/it, ETA {eta(spi, self.total - it - 1)}')

    def summary(self) -> dict:
        done = max(1, self.iters - self.start)
        return {**self.meter.means(), 'sec_per_iter': (time.time() - self.t0) / done,
                'peak_mem_mib': peak_memory_mib(self.run.device)}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def eta(seconds_per_iter: float, iters_left: int) -> str:
    s = int(seconds_per_iter * iters_left)
    return f'{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s'
