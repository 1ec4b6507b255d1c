"""What a run carries from step to step and from run to run: `Training` (models, optimizer,
state) and `TrainState`, latest.pth / best.pth / results.json, the run directory's lock and first
files, and resuming -- with the saved settings checked against the new ones (`check_resume`)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.run import Run
from methods.base import MethodSet
from util import dist
from util.checkpoint import NotACheckpointError, safe_load, save_atomic, write_text_atomic
from util.config import ConfigError, save_config, to_dict
from util.ema import EMATeacher
from util.logger import open_log_file
from util.precision import Precision
from util.run_lock import RunDirBusy, RunDirLock


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


STOP_MARKER = 'stopped'     # in the run directory while the last run ended on a stop request
