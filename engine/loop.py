"""The training loop: one epoch of steps (`train_epoch`: gradient accumulation, non-finite losses,
timed and requested checkpoints), its step log, and the end of an epoch (`end_of_epoch`: evaluate
the student and the teacher, keep the best, save)."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch.utils.data import DataLoader

from engine.data import derived_seed, epoch_iterations, to_device
from engine.preemption import Preempted, Preemption
from engine.pseudo_labels import pseudo_label_diagnostics
from engine.run import Run
from engine.schedule import evaluation_due, set_lr
from engine.state import (STOP_MARKER, Training, read_checkpoint, resume, run_dir_owned, save_checkpoint,
                          save_results, start_run_files)
from util import dist
from util.checkpoint import write_text_atomic
from util.logger import Meter
from util.memory import peak_memory_mib


class NonFiniteLoss(RuntimeError):
    pass


def fit(tr: Training, loaders: list[DataLoader], step: Callable[..., dict[str, torch.Tensor]], valset,
        iters: int) -> None:
    """The run from its first (or next) epoch to its last, in a run directory it owns: latest.pth
    read and its settings checked before config.yaml and train.log are written, the state resumed,
    then per epoch `train_epoch` and `end_of_epoch` (evaluate when due, save). A stop request
    saves latest.pth at the current iteration and ends it (`Preempted`)."""
    run, cfg = tr.run, tr.run.cfg
    with run_dir_owned(run):                 # one run per directory: a second one stops here
        ckpt = read_checkpoint(run)          # latest.pth, its settings checked against these
        start_run_files(run)                 # only now: config.yaml, train.log
        resume(tr, ckpt)
        log_epoch_plan(tr, loaders, iters)
        with Preemption() as preemption:
            for epoch in range(tr.state.epoch + 1, cfg.epochs):
                stats = train_epoch(tr, epoch, loaders, step, preemption)
                end_of_epoch(tr, epoch, valset, stats, evaluation_due(cfg, epoch, iters))
        tr.tb.close()
    dist.cleanup()


def log_epoch_plan(tr: Training, loaders: list[DataLoader], iters: int) -> None:
    """One line: the run's methods and what an epoch is (samples of each loader, iterations)."""
    names = ('unlabeled', 'labeled') if len(loaders) == 2 else ('labeled',)
    tr.run.log.info(f'{" + ".join(m.name for m in tr.methods)}: '
                    + ', '.join(f'{len(loader.dataset)} {name} samples per epoch' for name, loader in zip(names, loaders))
                    + f', {iters} iterations per epoch')


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


def eta(seconds_per_iter: float, iters_left: int) -> str:
    s = int(seconds_per_iter * iters_left)
    return f'{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s'
