"""Image classifiers for classification with few labels (the paper's Tables 15-18).

* `WideResNet`: the wide ResNets of the USB protocol (and of its predecessors), written from their
  standard definition (timm ships only the ImageNet `wide_resnet50_2`/`101_2`, not these CIFAR-sized
  ones): a 3x3 stem of 16 channels, groups of pre-activation basic blocks (BN - LeakyReLU(0.1) -
  conv3x3, twice), the first block of each group changing width and stride with a 1x1 shortcut
  (fed as TorchSSL's and USB's `activate_before_residual` says: `BasicBlock`), a final BN -
  LeakyReLU, global average pooling and a linear classifier. BatchNorm momentum 0.001 and eps
  0.001 and biased convolutions, as TorchSSL's networks (the original's logs are TorchSSL's; USB's
  convolutions have no bias). Sizes are in `WRN_PRESETS`:
  `wrn_28_2` (CIFAR-10, SVHN: 1.47M parameters with 10 classes) and `wrn_var_37_2` (STL-10's
  variant, 5.93M: a fourth group 256 wide and a stride-2 first group for 96 x 96 inputs), the
  counts of FACTS §8 (tested in tests/test_classification.py).
* `DinoV2Classifier`: a DINOv2 encoder (`model/dinov2.py`, the segmentor's) with a linear head on
  its final class token; inputs are resized to a multiple of the patch size first.

Both answer the training step's keywords (methods/step.py): `comp_drop` puts complementary
channel dropout on the pooled features of the strong pairs [s1; s2] after the first `n_clean`
images (the same masks and kept-pair rule as the segmentor's, `model.dpt.strong_masks`),
`feat_drop` independent dropout, and `need_fp` adds a channel-dropped stream of every image. The
forward returns logits as a (B, K, 1, 1) map -- an image is a one-pixel "segmentation" -- so the
step's losses, pseudo-labels and statistics apply unchanged; `classify` returns (B, K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.dpt import channel_dropout_masks, strong_masks
from model.presets import PATCH_SIZE, PRESETS

BN_MOMENTUM = 0.001    # USB: running statistics averaged over ~1000 steps (of 2^20)
BN_EPS = 0.001
LEAKY_SLOPE = 0.1
STEM_WIDTH = 16


@dataclass(frozen=True)
class WRNPreset:
    widths: tuple[int, ...]     # output channels of each group of blocks
    blocks: int                 # basic blocks per group
    first_stride: int           # stride of the first group (2 halves STL-10's 96 x 96 early)
    bn_momentum: float = BN_MOMENTUM    # a short run needs its evaluation statistics sooner


WRN_PRESETS: dict[str, WRNPreset] = {
    # depth 28 = 3 groups x 4 blocks x 2 convs + 4; widening factor 2
    'wrn_28_2': WRNPreset((32, 64, 128), 4, 1),
    # USB's WideResNetVar ("wrn_var_37_2"): one more group, 256 wide
    'wrn_var_37_2': WRNPreset((32, 64, 128, 256), 4, 2),
    # a small size for tests and short CPU runs: depth 16, widening factor 1, 0.18M parameters (its
    # BatchNorm statistics average over ~100 steps: with 0.001 they would still be 30% the initial
    # ones after 1200 steps, and the evaluation near chance)
    'wrn_16_1': WRNPreset((16, 32, 64), 2, 1, bn_momentum=0.01),
}
# Parameters (millions) the paper's logs give for these networks with 10 classes (FACTS §8).
PAPER_PARAMS_M = {'wrn_28_2': 1.47, 'wrn_var_37_2': 5.93}


def bn_act(channels: int, momentum: float = BN_MOMENTUM) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, momentum=momentum, eps=BN_EPS),
                         nn.LeakyReLU(LEAKY_SLOPE))


class BasicBlock(nn.Module):
    """Pre-activation block. One that keeps width and stride: x + conv(act(conv(act(x)))). One that
    changes them adds a 1x1 shortcut and, as TorchSSL's and USB's `activate_before_residual`, feeds
    both branches act(x) when `activate_before_residual` (the first block of the first group) and
    the raw x otherwise (the first block of every later group). There `act1` is never used:
    TorchSSL computes and discards it; it is kept here, frozen, so that the parameter count (the
    logs' 1,469,642 and 5,933,770) stays and no parameter without a gradient reaches the optimizer
    or DDP."""

    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float = BN_MOMENTUM,
                 activate_before_residual: bool = False):
        super().__init__()
        self.act1 = bn_act(cin, bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.act2 = bn_act(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.activate_before_residual = activate_before_residual
        if self.shortcut is not None and not activate_before_residual:
            self.act1.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x + self.conv2(self.act2(self.conv1(self.act1(x))))
        a = self.act1(x) if self.activate_before_residual else x
        return self.shortcut(a) + self.conv2(self.act2(self.conv1(a)))


class WideResNetTrunk(nn.Module):
    """Stem, groups of blocks, final BN - LeakyReLU and global average pooling: (B, 3, H, W) ->
    (B, C) features."""

    def __init__(self, spec: WRNPreset):
        super().__init__()
        self.stem = nn.Conv2d(3, STEM_WIDTH, 3, 1, 1)
        blocks, cin = [], STEM_WIDTH
        for g, width in enumerate(spec.widths):
            for b in range(spec.blocks):
                stride = (spec.first_stride if g == 0 else 2) if b == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, spec.bn_momentum, activate_before_residual=g == 0))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.final = bn_act(cin, spec.bn_momentum)
        self.width = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.blocks(self.stem(x))).mean((2, 3))


class ImageClassifier(nn.Module):
    """`backbone` (images -> (B, C) features) + linear `head`; the step's keywords (module
    docstring) act on the features."""

    def __init__(self, backbone: nn.Module, width: int, nclass: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, nclass)

    @property
    def nclass(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def lock_backbone(self) -> None:
        """Train the head only (a linear probe of a pretrained encoder)."""
        self.backbone.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError(f'{type(self).__name__} has no gradient checkpointing')

    def set_fused_attention(self, enable: bool = True) -> None:
        """No attention in a convolutional network."""

    def classify(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0, feat_drop: bool = False,
                 need_fp: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K). comp_drop: x[n_clean:] are two strong views [s1; s2] of the same images,
        whose pooled features get complementary channel masks; feat_drop: independent masks;
        need_fp: also the logits of channel-dropped features of every image (the fp stream)."""
        f = self.features(x)
        if comp_drop or feat_drop:
            f = f * strong_masks(f.shape[0], n_clean, f.shape[1], f, independent=not comp_drop)
        if need_fp:
            return self.head(f), self.head(f * channel_dropout_masks(f.shape[0], f.shape[1], f))
        return self.head(f)

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0, feat_drop: bool = False,
                need_fp: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits as a (B, K, 1, 1) map, the layout of the training step (module docstring)."""
        out = self.classify(x, comp_drop, n_clean, feat_drop, need_fp)
        return tuple(o[:, :, None, None] for o in out) if need_fp else out[:, :, None, None]


class WideResNet(ImageClassifier):
    def __init__(self, spec: WRNPreset, nclass: int):
        trunk = WideResNetTrunk(spec)
        super().__init__(trunk, trunk.width, nclass)
        for m in self.modules():      # USB's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)


class DinoV2Classifier(ImageClassifier):
    """DINOv2 (the segmentor's encoder, `backbone.*` as DINOv2's release, so `pretrained=` loads
    the same files) + a linear head on the final class token. Inputs are resized (bilinear) to
    `input_size`, a multiple of the 14-pixel patch: 224 makes CIFAR's 32 x 32 a 16 x 16 grid."""

    def __init__(self, size: str, nclass: int, input_size: int = 224, drop_path: float = 0.0):
        from model.dinov2 import DinoV2Encoder
        if input_size % PATCH_SIZE:
            raise ValueError(f'input_size must be a multiple of {PATCH_SIZE}, got {input_size}')
        spec = PRESETS[size]
        super().__init__(DinoV2Encoder.from_preset(spec, drop_path), spec.embed_dim, nclass)
        self.input_size = input_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        for block in self.backbone.blocks:
            block.attn.fused_attn = enable

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode='bilinear', align_corners=False)
        return self.backbone.forward_features(x)[:, 0]


def classifier_names() -> tuple[str, ...]:
    return (*WRN_PRESETS, *(f'dinov2_{s}' for s in PRESETS))


def build_classifier(backbone: str, nclass: int, drop_path: float = 0.0, input_size: int = 224) -> ImageClassifier:
    """'wrn_28_2', 'wrn_var_37_2' or 'dinov2_<size>' (random init)."""
    if backbone in WRN_PRESETS:
        return WideResNet(WRN_PRESETS[backbone], nclass)
    size = backbone.removeprefix('dinov2_')
    if backbone.startswith('dinov2_') and size in PRESETS:
        return DinoV2Classifier(size, nclass, input_size, drop_path)
    raise ValueError(f'unknown classifier backbone {backbone!r}; known: {", ".join(classifier_names())}')
