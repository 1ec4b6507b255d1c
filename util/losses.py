"""Losses: labeled cross-entropy / OHEM, and the masked unlabeled loss of weak-to-strong training."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from util.labels import IGNORE_INDEX


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hardest pixels (the original's `ProbOhemCrossEntropy2d`): pixels whose
    probability for the true class is at most max(thresh, p_k), p_k the min_kept-th smallest such
    probability; all valid pixels when fewer than min_kept are valid."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, thresh: float = 0.7, min_kept: int = 100000):
        super().__init__()
        self.ignore_index, self.thresh, self.min_kept = ignore_index, thresh, int(min_kept)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        num_valid = int(valid.sum())
        if num_valid > 0 and num_valid >= self.min_kept:
            with torch.no_grad():
                prob = logits.float().softmax(1)
                true_prob = prob.gather(1, (target * valid).unsqueeze(1)).squeeze(1)
                true_prob = true_prob.masked_fill(~valid, 1.0)
                threshold = self.thresh
                if self.min_kept > 0:
                    k = min(true_prob.numel(), self.min_kept)
                    kth = true_prob.flatten().kthvalue(k).values
                    threshold = max(threshold, float(kth))
                valid = valid & (true_prob <= threshold)
            target = target.masked_fill(~valid, self.ignore_index)
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)


class CrossEntropy(nn.Module):
    """Cross-entropy in fp32 whatever the logits' dtype (autocast)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)


# The labeled loss by its config name (`criterion.name`); its `criterion.kwargs` are the class's
# arguments, checked against its signature when the config loads (`engine/config.py`).
CRITERIA: dict[str, type[nn.Module]] = {'CELoss': CrossEntropy, 'OHEM': OhemCrossEntropy}


def build_criterion(name: str, kwargs: dict) -> nn.Module:
    if name not in CRITERIA:
        raise ValueError(f'unknown criterion {name!r} ({" or ".join(CRITERIA)})')
    return CRITERIA[name](**kwargs)


def masked_unlabeled_loss(logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor,
                          valid: torch.Tensor, thresh: float) -> torch.Tensor:
    """sum(CE(logits, pseudo) over confident valid pixels) / number of valid pixels.

    logits (B, K, H, W); pseudo (B, H, W) int; conf (B, H, W) float; valid (B, H, W) bool.
    Normalised by valid pixels, not by confident ones, as the original does.
    """
    ce = F.cross_entropy(logits.float(), pseudo, reduction='none')
    keep = (conf >= thresh) & valid
    return (ce * keep).sum() / valid.sum().clamp(min=1)


def cutmix(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Inside each image's box, take the content of the reversed batch (sample i <- B-1-i).

    x (B, ...) with trailing spatial dims (H, W); box (B, H, W) bool. Used alike for strong images,
    pseudo-labels, confidences and valid masks.
    """
    box = box.reshape(box.shape[0], *([1] * (x.dim() - 3)), *box.shape[1:])
    return torch.where(box, x.flip(0), x)
