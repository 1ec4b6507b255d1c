"""What the training entry scripts share: arguments, run set-up, data loaders, model and optimizer
construction, the learning-rate schedule, checkpoints and `results.json`, per-epoch evaluation.

The scripts (`unimatch_v2.py`, `supervised.py`) keep their own loops; everything here is a named
piece they call in order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dataset.registry import default_eval_mode
from dataset.semi import SemiDataset, split_paths
from model import build_model, load_pretrained_encoder, load_weights
from util import dist
from util.checkpoint import safe_load, save_atomic, write_text_atomic
from util.config import Config, ConfigError, from_dict, load_config, save_config, to_dict
from util.ema import EMATeacher
from util.logger import Meter, get_logger
from util.precision import Precision


# ---- arguments and run directory -------------------------------------------------------------------

def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', required=True, help='configs/<dataset>.yaml')
    p.add_argument('--split', help='split name under splits/<dataset>/ (e.g. 92, 1_16)')
    p.add_argument('--labeled-id-path', help='labeled split file (original flag; overrides --split)')
    p.add_argument('--unlabeled-id-path', help='unlabeled split file (original flag)')
    p.add_argument('--save-path', help='run directory (default exp/<dataset>/<method>/<backbone>/<split>)')
    p.add_argument('overrides', nargs='*', help='config overrides key=value')
    args = p.parse_args(argv)
    if not args.split and not args.labeled_id_path:
        p.error('give --split or --labeled-id-path')
    return args


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    log: object
    split: str


def setup_run(args: argparse.Namespace, method: str | None = None) -> Run:
    device = dist.setup()
    overrides = list(args.overrides) + ([f'method={method}'] if method else [])
    cfg = load_config(args.config, overrides)
    split = args.split or Path(args.labeled_id_path).parent.name
    run_dir = Path(args.save_path or f'exp/{cfg.dataset}/{cfg.method}/{cfg.backbone}/{split}')
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / 'config.yaml')
    dist.barrier()
    seed_everything(cfg.seed + dist.rank())
    log = get_logger(run_dir)
    log.info(f'config {args.config} ({" ".join(overrides) or "no overrides"}) -> {run_dir}, '
             f'{dist.world_size()} process(es) on {device.type}')
    return Run(cfg, run_dir, device, log, split)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data ---------------------------------------------------------------------------------------------

def num_workers(cfg: Config) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    per_process = cpus // max(1, torch.cuda.device_count() if torch.cuda.is_available() else dist.world_size())
    return max(0, min(8, per_process - 1))


def make_loader(dataset, cfg: Config, batch_size: int, seed_offset: int = 0) -> DataLoader:
    """Shuffled, drop_last loader over this process's shard (DistributedSampler in every case, so
    one process and many follow the same code)."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                                 shuffle=True, seed=cfg.seed + seed_offset)
    workers = num_workers(cfg)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def data_paths(cfg: Config, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(labeled, unlabeled, val) split files: the original flags win over --split. The toy dataset
    is generated here on first use."""
    splits_root = Path(cfg.splits_root)
    if cfg.dataset == 'toy':
        from dataset.toy import ensure_toy
        if dist.is_main():
            ensure_toy(cfg.data_root, splits_root / 'toy', seed=cfg.toy_seed, n_train=cfg.toy_train,
                       n_val=cfg.toy_val)
        dist.barrier()
    val = splits_root / cfg.dataset / 'val.txt'
    if args.labeled_id_path:
        labeled = Path(args.labeled_id_path)
        unlabeled = Path(args.unlabeled_id_path) if args.unlabeled_id_path else labeled
        return labeled, unlabeled, val
    paths = split_paths(cfg.dataset, args.split, splits_root, cfg.data_root)
    return paths.labeled, paths.unlabeled, paths.val


# ---- model and optimizer ------------------------------------------------------------------------------

def build_student(cfg: Config, device: torch.device, log=None) -> nn.Module:
    model = build_model(cfg.backbone, cfg.nclass, drop_path=cfg.drop_path)
    path = cfg.pretrained
    if path == 'auto':
        path = f'pretrained/{cfg.backbone}.pth'
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f'pretrained encoder {path} not found: put the DINOv2 weights there (see README), '
                f'or set pretrained=null to start from random weights')
        load_weights(model, path) if _is_full_model(path) else load_pretrained_encoder(model, path)
        if log:
            log.info(f'loaded pretrained weights {path}')
    if cfg.lock_backbone:
        model.lock_backbone()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if log:
        n = sum(p.numel() for p in model.parameters())
        log.info(f'model {cfg.backbone} + DPT: {n / 1e6:.1f}M parameters')
    return model.to(device)


def _is_full_model(path: str) -> bool:
    obj = safe_load(path)
    return isinstance(obj, dict) and ('model' in obj or any(k.startswith('head.') for k in obj))


def lr_scale(cfg: Config) -> float:
    """The paper's lr is for `reference_gpus` processes; it follows the global batch linearly."""
    return dist.world_size() * cfg.grad_accum / cfg.reference_gpus if cfg.scale_lr else 1.0


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW, two groups: trainable encoder parameters at lr, everything else at lr * lr_multi."""
    base = cfg.lr * lr_scale(cfg)
    enc = [p for n, p in model.named_parameters() if n.startswith('backbone.') and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith('backbone.') and p.requires_grad]
    return torch.optim.AdamW([{'params': enc, 'lr': base}, {'params': head, 'lr': base * cfg.lr_multi}],
                             lr=base, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, cfg: Config, it: int, total: int) -> float:
    """lr = base * (1 - it / total) ** 0.9 (head x lr_multi), set after each step as the original."""
    lr = cfg.lr * lr_scale(cfg) * (1 - it / total) ** 0.9
    optimizer.param_groups[0]['lr'] = lr
    optimizer.param_groups[1]['lr'] = lr * cfg.lr_multi
    return lr


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_dist():
        return model
    ids = [device.index] if device.type == 'cuda' else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


# ---- state, checkpoints, results -------------------------------------------------------------------

@dataclass
class TrainState:
    epoch: int = -1                      # last completed epoch
    best_miou: float = 0.0
    best_miou_ema: float = 0.0
    best_epoch: int = -1
    best_epoch_ema: int = -1
    history: list = field(default_factory=list)    # per epoch: {'epoch', 'miou', 'miou_ema', ...}


def checkpoint_dict(student: nn.Module, teacher: EMATeacher | None, optimizer, state: TrainState,
                    cfg: Config) -> dict:
    return {
        'model': student.state_dict(),
        'model_ema': teacher.state_dict() if teacher else None,
        'optimizer': optimizer.state_dict(),
        'epoch': state.epoch,
        'previous_best': state.best_miou,
        'previous_best_ema': state.best_miou_ema,
        'best_epoch': state.best_epoch,
        'best_epoch_ema': state.best_epoch_ema,
        'history': state.history,
        'config': to_dict(cfg),
    }


def resume(run_dir: Path, student: nn.Module, teacher: EMATeacher | None, optimizer, cfg: Config,
           log) -> TrainState:
    path = run_dir / 'latest.pth'
    if not path.exists():
        return TrainState()
    ckpt = safe_load(path)
    check_compatible(ckpt.get('config'), cfg, path)
    student.load_state_dict(ckpt['model'])
    if teacher is not None and ckpt.get('model_ema') is not None:
        teacher.load_state_dict(ckpt['model_ema'])
    optimizer.load_state_dict(ckpt['optimizer'])
    state = TrainState(ckpt['epoch'], ckpt['previous_best'], ckpt.get('previous_best_ema', 0.0),
                       ckpt.get('best_epoch', -1), ckpt.get('best_epoch_ema', -1), ckpt.get('history', []))
    log.info(f'resumed from {path} after epoch {state.epoch}')
    return state


def check_compatible(saved: dict | None, cfg: Config, path: Path) -> None:
    if not saved:
        return
    for key in ('nclass', 'backbone', 'dataset'):
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f'{path} was trained with {key}={saved[key]!r} but the config has '
                              f'{key}={getattr(cfg, key)!r}; use another --save-path or fix the config')


def save_results(run_dir: Path, state: TrainState, cfg: Config, semi: bool, extra: dict | None = None) -> None:
    hist = state.history
    results = {
        'dataset': cfg.dataset, 'method': cfg.method, 'backbone': cfg.backbone,
        'epochs': len(hist), 'epochs_total': cfg.epochs,
        'miou': [h['miou'] for h in hist],
        'miou_ema': [h['miou_ema'] for h in hist] if semi else None,
        'best_miou': state.best_miou if hist else None,
        'best_miou_ema': state.best_miou_ema if (hist and semi) else None,
        'final_miou': hist[-1]['miou'] if hist else None,
        'final_miou_ema': hist[-1]['miou_ema'] if (hist and semi) else None,
        'best_epoch': state.best_epoch, 'best_epoch_ema': state.best_epoch_ema if semi else None,
        'history': hist,
        **(extra or {}),
    }
    write_text_atomic(json.dumps(results, indent=2) + '\n', run_dir / 'results.json')


# ---- evaluation at the end of an epoch ----------------------------------------------------------------

def eval_mode(cfg: Config) -> str:
    return cfg.eval_mode or default_eval_mode(cfg.dataset)


def val_dataset(cfg: Config, val_path: Path) -> SemiDataset:
    return SemiDataset(cfg.data_root, val_path, 'val', cfg.crop_size, nclass=cfg.nclass)


def end_of_epoch(run: Run, epoch: int, student: nn.Module, teacher: EMATeacher | None, optimizer,
                 state: TrainState, valset, train_stats: dict) -> None:
    """Evaluate student (and EMA), update best figures, save latest/best checkpoints and results.json."""
    from util.evaluation import evaluate, format_iou_table
    cfg, log = run.cfg, run.log
    mode = eval_mode(cfg)
    t0 = time.time()
    res = evaluate(student, valset, cfg.nclass, mode, cfg.crop_size, device=run.device, progress=False)
    res_ema = evaluate(teacher.model, valset, cfg.nclass, mode, cfg.crop_size, device=run.device,
                       progress=False) if teacher else None
    student.train()
    entry = {'epoch': epoch, 'miou': res['miou'], 'miou_ema': res_ema['miou'] if res_ema else None,
             'iou': res['iou'], 'iou_ema': res_ema['iou'] if res_ema else None, **train_stats}
    state.history.append(entry)
    state.epoch = epoch
    if res['miou'] > state.best_miou:
        state.best_miou, state.best_epoch = res['miou'], epoch
    improved = res['miou'] >= state.best_miou if teacher is None else res_ema['miou'] >= state.best_miou_ema
    if res_ema and res_ema['miou'] > state.best_miou_ema:
        state.best_miou_ema, state.best_epoch_ema = res_ema['miou'], epoch

    from dataset.registry import class_names
    names = class_names(cfg.dataset, cfg.nclass, cfg.class_names)
    best = res_ema or res
    log.info(f'epoch {epoch} per-class IoU ({"EMA" if res_ema else "model"}, {mode}):\n'
             + format_iou_table(best['iou'], names))
    ema_txt = f', EMA mIoU {res_ema["miou"]:.2f} (best {state.best_miou_ema:.2f})' if res_ema else ''
    log.info(f'epoch {epoch}: mIoU {res["miou"]:.2f} (best {state.best_miou:.2f}){ema_txt}, '
             f'eval {time.time() - t0:.1f}s')
    if dist.is_main():
        ckpt = checkpoint_dict(student, teacher, optimizer, state, cfg)
        save_atomic(ckpt, run.run_dir / 'latest.pth')
        if improved:
            save_atomic(ckpt, run.run_dir / 'best.pth')
        save_results(run.run_dir, state, cfg, semi=teacher is not None)
    dist.barrier()


class StepLog:
    """Per-step bookkeeping of a training epoch: process-averaged statistics, running means,
    TensorBoard scalars and a console line every `log_interval` steps with speed and ETA."""

    def __init__(self, run: Run, tb, epoch: int, iters: int):
        self.run, self.tb, self.epoch, self.iters = run, tb, epoch, iters
        self.total = iters * run.cfg.epochs
        self.meter, self.t0 = Meter(), time.time()

    def __call__(self, i: int, out: dict[str, torch.Tensor], lr: float) -> None:
        it = self.epoch * self.iters + i
        stats = {k: float(dist.all_reduce_mean(v.detach().float().clone())) for k, v in out.items()}
        self.meter.update(stats)
        self.tb.scalars({**stats, 'lr': lr}, it, 'train/')
        if (i + 1) % self.run.cfg.log_interval == 0 or i + 1 == self.iters:
            spi = (time.time() - self.t0) / (i + 1)
            self.run.log.info(f'epoch {self.epoch} iter {i + 1}/{self.iters}: {self.meter}, lr {lr:.2e}, '
                              f'{spi:.2f} s/it, ETA {eta(spi, self.total - it - 1)}')

    def summary(self) -> dict:
        return {**self.meter.means(), 'sec_per_iter': (time.time() - self.t0) / max(1, self.iters)}


def optimizer_step(loss: torch.Tensor, optimizer, precision: Precision, cfg: Config, it: int,
                   total: int) -> float:
    """Backward, step, then the poly learning rate for the next iteration; returns that lr."""
    precision.backward_step(loss, optimizer)
    return set_poly_lr(optimizer, cfg, it + 1, total)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def iteration_budget(loader_len: int, cfg: Config) -> int:
    return min(loader_len, cfg.max_iters_per_epoch) if cfg.max_iters_per_epoch > 0 else loader_len


def eta(seconds_per_iter: float, iters_left: int) -> str:
    s = int(seconds_per_iter * iters_left)
    return f'{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s'


def math_isfinite(values: dict[str, torch.Tensor]) -> bool:
    return all(math.isfinite(float(v)) for v in values.values())
