"""Shared test settings."""
import os

import torch

# Tests run tiny tensors; one intra-op thread avoids OpenMP threads spinning against each other (and
# against torchrun children and DataLoader workers) on a 2-core machine, which is ~10x slower.
torch.set_num_threads(1)
os.environ.setdefault('OMP_NUM_THREADS', '1')
