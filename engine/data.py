"""The training data: loaders over each process's shard with resumable, per-sample-seeded samplers
(`ResumableSampler`), the samples and batches per epoch of each protocol (`epoch_samples`: the
unlabeled set for semi-supervised methods, the labeled list repeated to `labeled_upsample` for
labeled-only), iterations per epoch, and CPU threads and data-loader workers sized to the machine."""
from __future__ import annotations

import os
import random
import signal
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset.semi import SampleKey
from engine.config import Config
from methods.step import SemiOptions
from util import dist

if TYPE_CHECKING:
    from engine.run import Run


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


def unlabeled_root(cfg: Config) -> str:
    return cfg.unlabeled_root or cfg.data_root


def epoch_iterations(loader: DataLoader, cfg: Config) -> int:
    """Optimizer steps per epoch: batches of the (drop_last) loader over grad_accum, at most
    max_iters_per_epoch."""
    return steps_per_epoch(loader.sampler.num_samples, loader.batch_size, cfg)


def steps_per_epoch(samples_per_process: int, batch_size: int, cfg: Config) -> int:
    """`epoch_iterations` of a loader whose sampler gives each process `samples_per_process`."""
    n = samples_per_process // batch_size // cfg.grad_accum
    return min(n, cfg.max_iters_per_epoch) if cfg.max_iters_per_epoch > 0 else n


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
