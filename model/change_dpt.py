"""The bi-temporal DPT of change detection, with the original release's parameter names.

A pair is one 6-channel image `[A; B]` (channels 0-2 the first date, 3-5 the second), so the
training step, CutMix (one box for A and B), EMA, losses and checkpoints treat it as any image.
The model splits it, runs ONE encoder pass over cat([A, B]) along the batch, takes |f_A - f_B| at
each of the four taps, and decodes the differences with the segmentation DPT head (2 classes:
unchanged, changed); complementary channel dropout acts on the strong pairs' difference features
with segmentation's rule (`DPTSegmentor.perturb`). Logits come back at the input size.

The state dict is the segmentor's (`backbone.*`, `head.*`), so DINOv2 weights and the original's
change-detection checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.dpt import DPTSegmentor
from model.presets import ModelPreset, preset

PAIR_CHANNELS = 6       # [A; B], three colour channels each


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 6, H, W) -> A (B, 3, H, W), B (B, 3, H, W)."""
    if x.shape[1] != PAIR_CHANNELS:
        raise ValueError(f'a change-detection input has {PAIR_CHANNELS} channels ([A; B]), got {x.shape[1]}')
    return x[:, :3], x[:, 3:]


class ChangeDPT(DPTSegmentor):
    """DINOv2 (or DINOv3) + DPT on the absolute difference of the two dates' features. `forward(x)` with x
    (B, 6, H, W) -> logits (B, nclass, H, W)."""

    def __init__(self, spec: ModelPreset, nclass: int = 2, drop_path: float = 0.0):
        if not isinstance(spec, ModelPreset):
            raise ValueError('change detection runs on a DINOv2 or DINOv3 encoder (backbone=dinov2_<size>, dinov3_<size>)')
        super().__init__(spec, nclass, drop_path)

    def differences(self, x: torch.Tensor) -> list[torch.Tensor]:
        """|f_A - f_B| at each tap: (B, h*w, C) tokens, from one encoder pass over both dates."""
        a, b = split_pair(x)
        features = self.encode(torch.cat((a, b)))
        return [(fa - fb).abs() for fa, fb in (f.chunk(2) for f in features)]

    decoder_inputs = differences

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0,
                need_fp: bool = False, feat_drop: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As `DPTSegmentor.forward`, on pairs: the perturbations act on the difference features."""
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        features = self.perturb(self.decoder_inputs(x), comp_drop, n_clean, need_fp, feat_drop)
        logits = self.head(features, grid).float().contiguous()
        logits = F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=True)
        return logits.chunk(2) if need_fp else logits


def build_change_model(backbone: str, nclass: int = 2, drop_path: float = 0.0) -> ChangeDPT:
    """`build_change_model('dinov2_small')`: random init; its state dict is the original's."""
    _, spec = preset(backbone)
    return ChangeDPT(spec, nclass, drop_path)
