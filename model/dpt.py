"""DPT decoder and the full segmentation model (`DPTSegmentor`: an encoder + DPT head).

Module and parameter names follow the original release (`backbone.*`, `head.projects`,
`head.resize_layers`, `head.scratch.layer{1..4}_rn`, `head.scratch.refinenet{1..4}`,
`head.scratch.output_conv`), so its checkpoints load unchanged.

The encoder is DINOv2 (`model/dinov2.py`: four token maps of one patch grid) or one a library
builds (`model/encoders.py`: four NCHW maps, each with its own width and stride; DINOv3's are token
maps of its 16-pixel patch grid, as DINOv2's). The head takes per-tap widths and brings the taps to
strides r, 2r, 4r, 8r (r = a quarter of the third tap's stride) by the original's resize layers, or
none where a tap is already there.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.dinov2 import DinoV2Encoder
from model.presets import PATCH_SIZE, DinoV3Preset, LibraryPreset, ModelPreset, default_decoder, preset

VIT_SCALES = (4, 2, 1, 0.5)    # one-stride taps (a ViT's) -> 4x, 2x, 1x and 1/2x the patch grid


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as everywhere in the original DPT."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=True)


def to_input_size(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The classifier's map resized to the input size, in fp32 and NCHW: the layout the losses and
    softmaxes over channels want (on the CPU they, and the resize's backward, run 2-3x slower on
    channels-last or bf16 maps; the map is cast before the resize, where it is 3x smaller)."""
    return upsample(logits.float().contiguous(), size)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        return out + x


class FeatureFusionBlock(nn.Module):
    """Adds a skip (through resConfUnit1), refines (resConfUnit2), upsamples, projects (out_conv)."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = upsample(x, size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2))
        return self.out_conv(x)


def resize_scales(reductions: Sequence[int]) -> tuple[float, ...]:
    """How much each tap is resized so the four reach strides r, 2r, 4r, 8r with 4r the third tap's
    stride: ViT taps (16, 16, 16, 16) -> (4, 2, 1, 0.5); ResNet's (4, 8, 16, 32) -> (1, 1, 1, 1)."""
    base = reductions[2]
    scales = tuple(r / (base * 2.0 ** (i - 2)) for i, r in enumerate(reductions))
    if not all(s == 0.5 or (s >= 1 and s == int(s)) for s in scales):
        raise ValueError(f'taps at strides {tuple(reductions)} need resizes {scales}; the DPT head '
                         f'upsamples by whole factors or halves')
    return scales


def resize_layer(channels: int, scale: float) -> nn.Module:
    """The original's resize of one tap: a transposed conv for upsampling, a strided 3x3 conv for
    halving, none where the tap is already at its stride."""
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
    return nn.ConvTranspose2d(channels, channels, kernel_size=int(scale), stride=int(scale))


class DPTHead(nn.Module):
    def __init__(self, nclass: int, in_channels: int | Sequence[int], features: int,
                 out_channels: Sequence[int], scales: Sequence[float] = VIT_SCALES):
        """in_channels: one width for all four taps (a ViT) or one per tap; scales: how much each tap
        is resized (VIT_SCALES, or `resize_scales` of the taps' strides)."""
        super().__init__()
        c = list(out_channels)
        widths = [in_channels] * len(c) if isinstance(in_channels, int) else list(in_channels)
        self.projects = nn.ModuleList([nn.Conv2d(w, ch, 1) for w, ch in zip(widths, c)])
        self.resize_layers = nn.ModuleList([resize_layer(ch, s) for ch, s in zip(c, scales)])
        self.scratch = nn.Module()
        for i, ch in enumerate(c, start=1):
            setattr(self.scratch, f'layer{i}_rn', nn.Conv2d(ch, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f'refinenet{i}', FeatureFusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(True), nn.Conv2d(features, nclass, 1))
        # refinenet4 fuses no skip, so its resConfUnit1 is never used. It stays in the state dict for
        # compatibility and is frozen, so every trainable parameter gets a gradient (no DDP
        # find_unused_parameters).
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)

    def fuse(self, features: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Four (B, h*w, C) token maps of an h x w grid, or four (B, C_i, h_i, w_i) maps -> the fused
        (B, features, 2h_1, 2w_1) map before the classifier (h_1 x w_1: the first tap after its
        resize; 8h x 8w for tokens)."""
        s = self.scratch
        layers = []
        for i, x in enumerate(features):
            if x.dim() == 3:    # tokens (B, N, C) -> (B, C, h, w)
                x = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)
            x = self.resize_layers[i](self.projects[i](x))
            layers.append(getattr(s, f'layer{i + 1}_rn')(x))
        l1, l2, l3, l4 = layers
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        return s.refinenet1(path, l1)

    def forward(self, features: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        return self.scratch.output_conv(self.fuse(features, grid))


def complementary_masks(pairs: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Channel masks (2 * pairs, C) for [s1; s2]: m in {0, 2} for s1 and 2 - m for s2, both 1 for a
    random floor(pairs / 2) of the pairs (the original keeps half the pairs undropped)."""
    m1 = torch.bernoulli(torch.full((pairs, channels), 0.5, device=like.device, dtype=like.dtype)) * 2
    m2 = 2 - m1
    kept = torch.randperm(pairs, device=like.device)[:pairs // 2]
    m1[kept] = 1
    m2[kept] = 1
    return torch.cat((m1, m2))


def channel_dropout_masks(n: int, channels: int, like: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Plain per-(image, channel) dropout masks (n, C) scaled by 1 / (1 - p) (UniMatch V1's feature
    perturbation)."""
    keep = torch.full((n, channels), 1 - p, device=like.device, dtype=like.dtype)
    return torch.bernoulli(keep) / (1 - p)


class DPTSegmentor(nn.Module):
    """Encoder + DPT decoder. `forward(x)` -> logits (B, nclass, H // p * p, W // p * p), p the
    encoder's patch size (DINOv2: 14; DINOv3, BEiT, SAM: 16; ResNet, MiT: 1, the input size)."""
    comp_drop_at: str = 'features'     # where complementary dropout acts (`set_comp_drop_at`)

    def __init__(self, spec: ModelPreset | LibraryPreset, nclass: int, drop_path: float = 0.0):
        super().__init__()
        if isinstance(spec, (LibraryPreset, DinoV3Preset)):
            from model.encoders import build_encoder
            self.backbone = build_encoder(spec, drop_path)
            self.taps = self.backbone.taps if hasattr(self.backbone, 'taps') else tuple(range(4))
            self.patch_size = self.backbone.patch_size
            widths, reductions = self.backbone.widths, self.backbone.reductions
            features, out_channels = spec.features, spec.out_channels
            if features is None or out_channels is None:
                features, out_channels = default_decoder(widths, reductions)
            self.head = DPTHead(nclass, widths, features, out_channels, resize_scales(reductions))
            return
        self.taps = tuple(spec.taps)
        self.patch_size = PATCH_SIZE
        self.backbone = DinoV2Encoder.from_preset(spec, drop_path)
        self.head = DPTHead(nclass, spec.embed_dim, spec.features, spec.out_channels)

    @property
    def is_dinov2(self) -> bool:
        return isinstance(self.backbone, DinoV2Encoder)

    @property
    def nclass(self) -> int:
        return self.head.scratch.output_conv[-1].out_channels

    def set_comp_drop_at(self, site: str) -> None:
        """Complementary dropout on the encoder's features ('features', the paper's method) or on
        the input of the decoder's classifier ('classifier', the paper's Table 12)."""
        if site not in COMP_DROP_SITES:
            raise ValueError(f'comp_drop_at must be one of {COMP_DROP_SITES}, got {site!r}')
        self.comp_drop_at = site

    def lock_backbone(self) -> None:
        self.backbone.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.is_dinov2:
            self.backbone.grad_checkpointing = enable
        else:
            self.backbone.set_grad_checkpointing(enable)

    def set_fused_attention(self, enable: bool = True) -> None:
        """Attention through F.scaled_dot_product_attention (True) or as matmul-softmax-matmul
        (False, the original's arithmetic); the outputs agree to rounding."""
        if not self.is_dinov2:
            self.backbone.set_fused_attention(enable)
            return
        for block in self.backbone.blocks:
            block.attn.fused_attn = enable

    def set_layer_scale_folding(self, enable: bool = True) -> None:
        """LayerScale folded into the projections before it (True, the default) or applied as its
        own multiply (False, the original's arithmetic); the outputs agree to rounding. DINOv2 only
        (other encoders run their library's forward)."""
        if not self.is_dinov2:
            return
        for block in self.backbone.blocks:
            block.fold_layer_scale = enable

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four taps: (B, h*w, C) tokens for DINOv2 and DINOv3, (B, C_i, h_i, w_i) maps for other encoders."""
        if self.is_dinov2:
            return self.backbone.get_intermediate_layers(x, self.taps)
        return self.backbone(x)

    def patch_grid(self, x: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, cols) of the encoder's patch grid for input `x`, and the logits' size (H // p * p,
        W // p * p): the encoder sees only whole patches."""
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        return grid, (grid[0] * p, grid[1] * p)

    def decoder_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four feature maps the head decodes: the encoder's taps (a subclass may combine them,
        e.g. the two dates' differences)."""
        return self.encode(x)

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0,
                need_fp: bool = False, feat_drop: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        x: (B, 3, H, W) normalised images.
        comp_drop: images x[n_clean:] are two strong views [s1; s2] of the same images; they get
            complementary channel dropout (the first n_clean, e.g. labeled images, are left
            untouched, so labeled and strong images can share one forward), on the encoder features
            or, with `comp_drop_at = 'classifier'`, on the classifier's input.
        feat_drop: independent channel dropout (p 0.5) on the encoder features of every image of
            x[n_clean:] (single-stream feature perturbation, the paper's Table 6).
        need_fp: also return logits from channel-dropped features of every image (UniMatch V1's
            feature-perturbation stream), computed in the same decoder pass.
        """
        grid, out_size = self.patch_grid(x)
        at_features = comp_drop and self.comp_drop_at == 'features'
        features = self.perturb(self.decoder_inputs(x), at_features, n_clean, need_fp, feat_drop)
        if comp_drop and not at_features:
            logits = to_input_size(self.classify_with_comp_drop(self.head.fuse(features, grid), n_clean), out_size)
        else:
            logits = self.decode(features, grid, out_size)
        if need_fp:
            return logits.chunk(2)
        return logits

    def decode(self, features: list[torch.Tensor], grid: tuple[int, int], out_size: tuple[int, int]
               ) -> torch.Tensor:
        """The head's logits for the decoder inputs of a `grid` of patches, brought to `out_size`
        (`patch_grid`)."""
        return to_input_size(self.head(features, grid), out_size)

    def classify_with_comp_drop(self, fused: torch.Tensor, n_clean: int) -> torch.Tensor:
        """The head's output convolutions with complementary channel dropout on the strong pairs'
        classifier input (the last 1x1 convolution's, (B, features, h, w)) instead of on the encoder
        features (the paper's Table 12)."""
        *body, classifier = self.head.scratch.output_conv
        hidden = nn.Sequential(*body)(fused)
        masks = strong_masks(hidden.shape[0], n_clean, hidden.shape[1], hidden, independent=False)
        return classifier(apply_channel_mask(hidden, masks))

    @staticmethod
    def perturb(features: list[torch.Tensor], comp_drop: bool, n_clean: int, need_fp: bool,
                feat_drop: bool = False) -> list[torch.Tensor]:
        """The encoder taps ((B, N, C) tokens or (B, C, h, w) maps) after complementary dropout of the
        strong images (comp_drop) or independent dropout of each (feat_drop), and with the
        channel-dropped copy appended (need_fp); see `forward`.

        One mask per distinct tap width: taps of equal width share it (the original's one mask for
        a ViT's four taps), and all widths' masks come from one draw over their channels side by
        side, so the undropped pairs are the same at every tap (and a ViT's draw is the original's)."""
        b = features[0].shape[0]
        widths = list(dict.fromkeys(channels(f) for f in features))   # distinct, in tap order
        c = sum(widths)
        if comp_drop or feat_drop:
            masks = strong_masks(b, n_clean, c, features[0], independent=not comp_drop)
            per_width = dict(zip(widths, masks.split(widths, dim=1)))
            features = [apply_channel_mask(f, per_width[channels(f)]) for f in features]
        if need_fp:
            masks = channel_dropout_masks(b, c, features[0])
            per_width = dict(zip(widths, masks.split(widths, dim=1)))
            features = [torch.cat((f, apply_channel_mask(f, per_width[channels(f)]))) for f in features]
        return features


def strong_masks(b: int, n_clean: int, c: int, like: torch.Tensor, independent: bool) -> torch.Tensor:
    """(b, c) channel masks: ones for the first n_clean images; for the strong images after them,
    complementary masks over their [s1; s2] pairs, or (independent) plain dropout masks."""
    if independent:
        masks = channel_dropout_masks(b - n_clean, c, like)
    else:
        pairs = (b - n_clean) // 2
        assert pairs * 2 == b - n_clean, 'comp_drop needs an even number of strong images'
        masks = complementary_masks(pairs, c, like)
    return torch.cat((masks.new_ones(n_clean, c), masks))


COMP_DROP_SITES = ('features', 'classifier')


def channels(f: torch.Tensor) -> int:
    """Channels of a tap: (B, N, C) tokens or (B, C, h, w) maps."""
    return f.shape[-1] if f.dim() == 3 else f.shape[1]


def apply_channel_mask(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f * mask per (image, channel); mask (B, C)."""
    return f * (mask[:, None, :] if f.dim() == 3 else mask[:, :, None, None])


def build_model(backbone: str, nclass: int, drop_path: float = 0.0) -> DPTSegmentor:
    """`build_model('dinov2_small', 21)`: random init; load weights with `model.loading`. Its state
    dict is that of the original release. Other encoders by name ('resnet152', 'mit_b5', ...,
    'timm:<name>'; `model.presets`). (A method's model, with its own head or bottleneck, is
    built by the method: `methods.build_model(cfg)`.)"""
    _, spec = preset(backbone)
    return DPTSegmentor(spec, nclass, drop_path)
