"""torch.distributed helpers that answer sensibly in a single process.

Launch many processes with `torchrun`; run one with plain `python`. Nothing else in the code checks
whether it is distributed: `world_size()` is 1 and `is_main()` is True in one process.
"""
from __future__ import annotations

import datetime
import inspect
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', 0))


def setup(timeout_min: int = 30) -> torch.device:
    """Initialise the process group when launched by torchrun (NCCL with GPUs, gloo without);
    returns this process's device."""
    use_cuda = torch.cuda.is_available()
    device = torch.device('cuda', local_rank()) if use_cuda else torch.device('cpu')
    if use_cuda and local_rank() >= torch.cuda.device_count():
        raise RuntimeError(f'process {local_rank()} of this node has no GPU: '
                           f'{torch.cuda.device_count()} visible; launch at most that many '
                           f'processes per node (or hide the GPUs with CUDA_VISIBLE_DEVICES= '
                           f'to run every process on the CPU)')
    if use_cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not is_dist():
        dist.init_process_group('nccl' if use_cuda else 'gloo',
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if use_cuda else None)
    return device


# torch 2.14 renamed DDP's `broadcast_buffers` to `forward_sync_buffers` and deprecates the old
# name; earlier releases (the 2.11 of common CUDA images) know only the old one.
_NO_FORWARD_BUFFER_SYNC = (
    {'forward_sync_buffers': False}
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel.__init__).parameters
    else {'broadcast_buffers': False})


def ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True) -> DistributedDataParallel:
    """DistributedDataParallel for `device` with no per-forward buffer broadcast (the models hold no
    buffers that need one) and, by default, gradients kept as views into the all-reduce buckets
    (one copy of every gradient less per step; False is torch's default, the original's)."""
    # Under bf16 autocast the CPU convolution backward returns the 1x1 classifier's weight gradient
    # with channels-last strides, (C, 1, C, C) for a (K, C, 1, 1) weight: the same memory as the
    # bucket's contiguous view, but DDP's stride check warns about it on every run. The filter is
    # process-wide and matches by message, so it would also hide a real stride mismatch.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    ids = [device.index] if device.type == 'cuda' else None
    return DistributedDataParallel(model, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC,
                                   find_unused_parameters=find_unused_parameters,
                                   gradient_as_bucket_view=gradient_as_bucket_view)


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op in one process); returns t."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of every process's `t` (rank order; sizes may differ between
    processes, the other dims may not); `t` itself in one process. Differentiable nowhere."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat((t, t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])
