"""Segmentation and change-detection metrics from a confusion matrix, and classification top-k
accuracy, accumulated on the device.

Counts are summed over the whole evaluation set and, once at the end, over processes; per-class
IoU follows the original UniMatch V2 formula `I / (U + 1e-10) * 100`. A class that appears in
neither the prediction nor the ground truth anywhere has I = U = 0 and therefore IoU 0, and the
mean is taken over all `nclass` classes, so such a class pulls mIoU down. That is what the original
does (and what its reported numbers include); it never happens on the real validation sets, where
every class is present.
"""
from __future__ import annotations

import torch

from util.dist import all_reduce_sum

EPS = 1e-10         # the original's guard against 0 / 0


class ConfusionMatrix:
    """`mat[t, p]` = number of pixels of true class t predicted as p (int64, on `device`).

    Targets outside [0, nclass) (IGNORE_INDEX included) are skipped. Predictions must lie in
    [0, nclass) (they come from an argmax over nclass channels).
    """

    def __init__(self, nclass: int, device: torch.device | str = 'cpu'):
        self.nclass = nclass
        self.mat = torch.zeros(nclass, nclass, dtype=torch.int64, device=device)
        self.n_images = 0
        self._reduced = False

    @classmethod
    def from_counts(cls, counts) -> 'ConfusionMatrix':
        """A (reduced) matrix from nclass x nclass counts, e.g. a saved 'confusion' list."""
        mat = torch.as_tensor(counts, dtype=torch.int64)
        cm = cls(mat.shape[0], mat.device)
        cm.mat, cm._reduced = mat.clone(), True
        return cm

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: int [B, H, W] or [H, W] of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f'pred {tuple(pred.shape)} and target {tuple(target.shape)} '
                             f'differ in shape')
        self.n_images += pred.shape[0] if pred.dim() == 3 else 1
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = (target >= 0) & (target < self.nclass)
        index = target[keep] * self.nclass + pred[keep]
        self.mat += torch.bincount(index, minlength=self.nclass ** 2).view(self.nclass, self.nclass)

    def reduce(self) -> ConfusionMatrix:
        """Sum the counts (and image counts) over processes in one all-reduce; idempotent."""
        if not self._reduced:
            packed = torch.cat((self.mat.view(-1), self.mat.new_tensor([self.n_images])))
            all_reduce_sum(packed)
            self.mat = packed[:-1].view(self.nclass, self.nclass)
            self.n_images = int(packed[-1])
            self._reduced = True
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU in percent, float64 [nclass]; 0 for classes absent from pred and target."""
        mat = self.mat.double()
        intersection = mat.diag()
        union = mat.sum(0) + mat.sum(1) - intersection
        return intersection / (union + EPS) * 100

    def miou(self) -> float:
        return self.iou().mean().item()

    def pixel_acc(self) -> float:
        """Correct / scored pixels, in percent (0 when nothing was scored)."""
        total = self.mat.sum().item()
        return self.mat.diag().sum().item() / total * 100 if total else 0.0

    def precision(self) -> torch.Tensor:
        """Per-class precision TP / (TP + FP) in percent, float64 [nclass] (0 where nothing was
        predicted as the class)."""
        mat = self.mat.double()
        return mat.diag() / (mat.sum(0) + EPS) * 100

    def recall(self) -> torch.Tensor:
        """Per-class recall TP / (TP + FN) in percent (0 for a class absent from the targets)."""
        mat = self.mat.double()
        return mat.diag() / (mat.sum(1) + EPS) * 100

    def f1(self) -> torch.Tensor:
        """Per-class F1 = 2PR / (P + R), in percent (= 2TP / (2TP + FP + FN))."""
        mat = self.mat.double()
        tp = mat.diag()
        return 2 * tp / (mat.sum(0) + mat.sum(1) + EPS) * 100

    def kappa(self) -> float:
        """Cohen's kappa (p_o - p_e) / (1 - p_e) over every scored pixel, in percent: agreement
        beyond what the two marginals give by chance."""
        mat = self.mat.double()
        total = mat.sum()
        if total == 0:
            return 0.0
        p_o = mat.diag().sum() / total
        p_e = (mat.sum(0) * mat.sum(1)).sum() / total ** 2
        return float((p_o - p_e) / (1 - p_e + EPS) * 100)


class TopKAccuracy:
    """Top-k accuracy counts of a classifier, accumulated on the device and reduced once.

    `correct[j]` = images whose true class is among the `ks[j]` highest logits; k larger than the
    class count counts every image (the true class is always among all of them).
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5), device: torch.device | str = 'cpu'):
        self.ks = ks
        self.correct = torch.zeros(len(ks), dtype=torch.int64, device=device)
        self.n_images = 0
        self._reduced = False

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, K), target (B,) int."""
        k_max = min(max(self.ks), logits.shape[1])
        hits = logits.topk(k_max, dim=1).indices == target[:, None]      # (B, k_max), one True at most
        rank_hit = hits.cumsum(1)                                        # (B, k_max): hit within the top j+1
        for j, k in enumerate(self.ks):
            self.correct[j] += rank_hit[:, min(k, k_max) - 1].sum()
        self.n_images += len(target)

    def reduce(self) -> 'TopKAccuracy':
        if not self._reduced:
            packed = torch.cat((self.correct, self.correct.new_tensor([self.n_images])))
            all_reduce_sum(packed)
            self.correct, self.n_images = packed[:-1], int(packed[-1])
            self._reduced = True
        return self

    def accuracy(self) -> dict[str, float]:
        """{'top1': percent, 'top5': percent, ...}; 0 when no image was scored."""
        n = max(self.n_images, 1)
        return {f'top{k}': self.correct[j].item() / n * 100 if self.n_images else 0.0 for j, k in enumerate(self.ks)}
