"""U2PL's model: the DPT segmentor plus a representation head g parallel to the classifier
(SEED_METHODS.md section 3.3; docs/u2pl_allspark.md).

g reads the decoder's fused map (the input of `head.scratch.output_conv`, (B, F, 8h, 8w) for an
h x w patch grid), average-pooled 2x to 4h x 4w (148^2 for a 518 crop: stride 3.5, about U2PL's 1/4):
    Conv3x3(F->F)-GN-ReLU -> Conv3x3(F->D)-GN-ReLU -> Conv1x1(D->D),  D = rep_dim (256).
GroupNorm instead of U2PL's BatchNorm: DPT has no BN, and GN keeps the teacher's eval-mode
representation equal to its train-mode one (no batch statistics, pitfall 6 of the spec).
Its parameters are `rep_head.*`; every other key is the plain model's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.dpt import DPTSegmentor, to_input_size
from model.presets import PATCH_SIZE, ModelPreset


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class RepHead(nn.Module):
    def __init__(self, features: int, dim: int = 256):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(features, features, 3, padding=1, bias=False),
                                    group_norm(features), nn.ReLU(True))
        self.block2 = nn.Sequential(nn.Conv2d(features, dim, 3, padding=1, bias=False),
                                    group_norm(dim), nn.ReLU(True))
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, F, 8h, 8w) fused decoder map -> (B, D, 4h, 4w) representations (not normalised)."""
        return self.proj(self.block2(self.block1(F.avg_pool2d(fused, 2))))


class U2PLSegmentor(DPTSegmentor):
    """`forward(x, ..., need_rep=True)` -> (logits, rep); otherwise exactly `DPTSegmentor`."""

    def __init__(self, spec: ModelPreset, nclass: int, drop_path: float = 0.0, rep_dim: int = 256):
        super().__init__(spec, nclass, drop_path)
        self.rep_head = RepHead(spec.features, rep_dim)

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0, need_fp: bool = False,
                need_rep: bool = False):
        if not need_rep:
            return super().forward(x, comp_drop, n_clean, need_fp)
        assert not need_fp, 'need_rep and need_fp together are not supported'
        grid = (x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE)
        out_size = (grid[0] * PATCH_SIZE, grid[1] * PATCH_SIZE)
        features = self.perturb(self.encode(x), comp_drop, n_clean, False)
        fused = self.head.fuse(features, grid)
        logits = to_input_size(self.head.scratch.output_conv(fused), out_size)
        return logits, self.rep_head(fused)
