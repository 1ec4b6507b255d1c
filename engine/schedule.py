"""When things happen over a run: the learning rate at each step (`lr_factor`, `set_lr`: poly or
cosine, scaled with the global batch) and which epochs end with an evaluation (`evaluation_due`,
TorchSSL's points for the classification recipe)."""
from __future__ import annotations

import math

import torch

from engine.config import Config
from util import dist


def lr_scale(cfg: Config, processes: int | None = None) -> float:
    """The paper's lr is for `reference_gpus` processes; it follows the global batch linearly.
    processes: this run's (default) or a planned count (`--plan`)."""
    processes = dist.world_size() if processes is None else processes
    return processes * cfg.grad_accum / cfg.reference_gpus if cfg.scale_lr else 1.0


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
