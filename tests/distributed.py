"""Run a function in two CPU processes joined by a gloo process group (for multi-process tests)."""
from __future__ import annotations

import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[[int, str], None], world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        fn(rank, out_dir)
    finally:
        dist.destroy_process_group()


def run_processes(fn: Callable[[int, str], None], out_dir, world: int = 2) -> None:
    """fn(rank, out_dir) in `world` processes; fn writes what the test checks under out_dir.

    fork where there is one: spawned children re-import torch and timm (10-25 s on a busy 2-core
    machine); forked ones inherit them and, like DataLoader workers, run with one thread."""
    method = 'fork' if 'fork' in mp.get_all_start_methods() else 'spawn'
    mp.start_processes(_worker, args=(fn, world, free_port(), str(out_dir)), nprocs=world, join=True,
                       start_method=method)
