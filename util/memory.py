"""Peak memory of this process: the figure the benchmark and every run's results.json report."""
from __future__ import annotations

import resource

import torch


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the pre-exec parent's
    peak into a spawned child's ru_maxrss, which would report the parent's size for every recipe."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(device: torch.device) -> float:
    """Max allocated CUDA memory on a GPU, peak RSS of the process on the CPU (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mib()
