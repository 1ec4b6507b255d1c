"""Shared test settings."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Tests run tiny tensors; one intra-op thread avoids OpenMP threads spinning against each other (and
# against torchrun children and DataLoader workers) on a 2-core machine, which is ~10x slower.
torch.set_num_threads(1)
os.environ.setdefault('OMP_NUM_THREADS', '1')


# Fast training overrides for end-to-end tests: a few iterations at crop 42 on a tiny toy set, without
# the toys' pseudo-label diagnostics (a pass over unlabeled images per epoch; tests/test_pseudo_label_stats.py
# turns them on).
FAST_TRAIN = ['crop_size=42', 'batch_size=2', 'max_iters_per_epoch=2', 'log_interval=1', 'num_workers=0',
              'toy_train=32', 'toy_val=3', 'pretrained=null', 'pseudo_label_stats=false']


@pytest.fixture(scope='session', autouse=True)
def interpreter_first_on_path():
    """Every script a test launches (scripts/*.sh call a bare `python` and `torchrun`) runs with the
    interpreter that runs the tests: its directory first on PATH, whether or not a virtual
    environment is activated (a subprocess's env built from os.environ inherits it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
        yield


@pytest.fixture
def on_the_cpu(monkeypatch):
    """Training in the test runs on the CPU even where a GPU is visible: bit-for-bit claims hold on
    the CPU (on CUDA the bilinear resizes' backward adds with atomics in no fixed order;
    docs/reproducibility.md)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory) -> Path:
    """A 32-image toy dataset (data/ and splits/toy/), generated once per test session."""
    from dataset.toy import ensure_toy
    base = tmp_path_factory.mktemp('toy')
    ensure_toy(base / 'data', base / 'splits' / 'toy', n_train=32, n_val=3)
    return base


@pytest.fixture(scope='session')
def toy(toy_root) -> list[str]:
    """Config overrides that train a few fast iterations on `toy_root`."""
    return FAST_TRAIN + [f'data_root={toy_root / "data"}', f'splits_root={toy_root / "splits"}']
