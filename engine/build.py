"""What a run trains: the student (the task's model, its pretrained weights and speed settings), the
optimizer's parameter groups, the DDP wrapper and the step the loop calls (`make_step`: the
method's core step with the run's criterion and hooks)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

import methods
import tasks
from engine.config import Config, fused_attention
from engine.schedule import lr_scale
from methods.step import SemiOptions, semi_step, supervised_step
from model.dpt import DPTSegmentor
from model.hub import load_pretrained
from tasks.base import Task
from util import dist
from util.config import ConfigError
from util.losses import build_criterion

if TYPE_CHECKING:
    from engine.state import Training


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


def build_model(cfg: Config, task: Task | None = None) -> nn.Module:
    """The run's model with random weights: its method's own (an extra head or bottleneck on the
    segmentor: `methods.own_model`) where it has one, else its task's (`tasks.for_config`)."""
    model = methods.own_model(cfg)
    return model if model is not None else (task or tasks.for_config(cfg)).build_model(cfg)


def build_student(cfg: Config, device: torch.device, log=None, task: Task | None = None) -> nn.Module:
    model = build_model(cfg, task)
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


def wrap_ddp(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """DDP without find_unused_parameters (every trainable parameter gets a gradient), optionally
    compiled. The unwrapped model stays the one to save and to copy into the EMA teacher."""
    if dist.is_dist():
        model = dist.ddp(model, device)
    return torch.compile(model) if compile else model
