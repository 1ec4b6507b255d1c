"""The samples of the pseudo-label diagnostics (`pseudo_label_stats: true`, docs/diagnostics.md):
the unlabeled list read as a labeled one -- each image with its mask, as the evaluation reads its
images -- and a fixed subset of it. Nothing here reaches the training step: its unlabeled samples
carry no mask (dataset/semi.py, dataset/change.py)."""
from __future__ import annotations

from torch.utils.data import Dataset, Subset

from dataset.checks import spread

ROLE = 'unlabeled (pseudo_label_stats)'    # the unlabeled list's role in the checks: one that needs masks


def spread_subset(dataset: Dataset, n: int) -> Subset:
    """`n` samples of `dataset` (all of them when it has no more), evenly spaced from the first to
    the last: the same samples at every epoch, and no generator drawn."""
    return Subset(dataset, spread(list(range(len(dataset))), n))
