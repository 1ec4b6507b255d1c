"""Encoders other than DINOv2, taken from the libraries that ship them, behind one small interface.

Each wraps a library model and returns four feature maps (B, C_i, H / r_i, W / r_i) at the taps
its preset names; `widths` (C_i) and `reductions` (r_i) tell the DPT head what it gets, so the head
never knows which encoder it has:

- `TimmEncoder`: any timm model with `forward_intermediates` (ResNet, BEiT, SAM, ... by timm name),
  built with random weights, then pruned by timm's own `prune_intermediate_layers` to what the taps
  use (blocks after the last tap, the classifier, the final norm or SAM's neck), so every parameter
  gets a gradient.
- `SegformerEncoder`: the Mix Transformer (MiT) encoder of transformers' `SegformerModel`; the
  library is imported only when this encoder is built.
- `DinoV3Encoder`: DINOv3 (`backbone=dinov3_<size>`), timm's `vit_*_patch16_dinov3` at a preset's
  sizes; like DINOv2's encoder it returns the tapped blocks' patch tokens (B, h*w, C) after the
  final LayerNorm, so the DPT head, complementary dropout and the methods treat both alike.

`from_library(state)` turns a state dict in the library's own format (what the library model saves,
classifier included; for DINOv3 also Meta's and Hugging Face's, `model.convert`) into this encoder's
keys; loading it is then strict (`model.loading`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from model.convert import to_timm_dinov3
from model.presets import DINOV3_PATCH_SIZE, DinoV3Preset, LibraryPreset


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x cropped at the bottom and right to sides that are multiples of `multiple` (what a
    stride-`multiple` patch embedding sees anyway)."""
    if multiple <= 1:
        return x
    return x[..., :x.shape[-2] // multiple * multiple, :x.shape[-1] // multiple * multiple]


def spread_taps(count: int, n: int = 4) -> tuple[int, ...]:
    """n taps spread evenly over `count` equal-stride stages, ending at the last: 12 -> (2, 5, 8, 11)."""
    return tuple(round((i + 1) * count / n) - 1 for i in range(n))


class LibraryEncoder(nn.Module):
    """What the DPT head and `DPTSegmentor` need from a non-DINOv2 encoder."""
    widths: tuple[int, ...]       # channels of each tap
    reductions: tuple[int, ...]   # stride of each tap relative to the input
    patch_size: int = 1           # inputs are cropped to multiples of this (1: any size)

    def from_library(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def set_fused_attention(self, enable: bool = True) -> None:
        """timm's attention modules choose F.scaled_dot_product_attention by `fused_attn`."""
        for m in self.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = enable


class TimmEncoder(LibraryEncoder):
    """`timm.create_model(name, pretrained=False, **kwargs)`, cut to its taps; forward -> the taps'
    maps (NCHW) from timm's `forward_intermediates` (no final norm: SAM's would be its neck)."""

    def __init__(self, name: str, taps: Sequence[int] | None, kwargs: Mapping[str, object] = (),
                 drop_path: float = 0.0):
        super().__init__()
        import timm
        model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **dict(kwargs))
        if not hasattr(model, 'forward_intermediates'):
            raise ValueError(f'timm model {name!r} has no forward_intermediates, so its feature maps '
                             f'cannot be tapped; choose another')
        info = model.feature_info
        if taps is None:   # equal strides (a ViT): spread over the blocks; else the last four stages
            same = len({f['reduction'] for f in info}) == 1
            taps = spread_taps(len(info)) if same else tuple(range(len(info) - 4, len(info)))
        self.taps = tuple(taps)
        if len(self.taps) != 4 or not all(0 <= t < len(info) for t in self.taps):
            raise ValueError(f'timm model {name!r}: taps {self.taps} must be four of its {len(info)} '
                             f'feature levels 0..{len(info) - 1}')
        self.widths = tuple(int(info[t]['num_chs']) for t in self.taps)
        self.reductions = tuple(int(info[t]['reduction']) for t in self.taps)
        patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', 1)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        full = set(model.state_dict())
        model.prune_intermediate_layers(list(self.taps), prune_norm=True, prune_head=True)
        self.model = model
        # Keys of the library's full model that the taps never use (classifier, final norm or
        # neck, blocks after the last tap): dropped from library files before the strict load.
        self.unused_keys = frozenset(full - set(model.state_dict()))
        self.name = name

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = crop_to_multiple(x, self.patch_size)
        return self.model.forward_intermediates(x, indices=list(self.taps), norm=False,
                                                intermediates_only=True)

    def from_library(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # timm's own state dict keys, without this module's `model.` level.
        return {f'model.{k}': v for k, v in state.items() if k not in self.unused_keys}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


class SegformerEncoder(LibraryEncoder):
    """The MiT encoder of transformers' `SegformerModel`, built from a `SegformerConfig` (random
    weights); forward -> its four stages' maps (NCHW, strides 4, 8, 16, 32)."""

    LIBRARY_PREFIX = 'segformer.'                        # Segformer task models keep it under this
    TASK_HEADS = ('classifier.', 'decode_head.')         # their heads, unused here

    def __init__(self, kwargs: Mapping[str, object] = (), drop_path: float = 0.0):
        super().__init__()
        from transformers import SegformerConfig, SegformerModel
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(kwargs).items()}
        config = SegformerConfig(**args, drop_path_rate=drop_path)
        self.model = SegformerModel(config)
        self.widths = tuple(config.hidden_sizes)
        self.reductions = (4, 8, 16, 32)     # stride 4 patch embedding, then 2x per stage
        assert len(self.widths) == 4 and tuple(config.strides) == (4, 2, 2, 2), config

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values=x, output_hidden_states=True).hidden_states)

    def from_library(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            k = k.removeprefix(self.LIBRARY_PREFIX)
            if not k.startswith(self.TASK_HEADS):
                out[f'model.{k}'] = v
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


class DinoV3Encoder(LibraryEncoder):
    """DINOv3 ViT/16 as timm builds it (`timm.models.eva.Eva`: RoPE on the patch tokens, a class and 4
    register tokens, LayerScale, q/v biases), at the preset's sizes, cut after its last tap.
    forward(x) -> per tap the patch tokens (B, h*w, C) of an (H // 16, W // 16) grid, after the final
    LayerNorm (Meta's `get_intermediate_layers(norm=True)`), class and register tokens dropped.

    Positions are those of evaluation in training too: Meta's and transformers' models rescale the
    RoPE coordinates at random in train mode (pretraining's augmentation), timm's do not."""

    def __init__(self, spec: DinoV3Preset, drop_path: float = 0.0):
        super().__init__()
        import timm
        # timm's SwiGLU width is int(embed_dim * mlp_ratio), Meta's (and the preset's) 2/3 of that.
        ratio = spec.mlp_ratio * 2 / 3 if spec.ffn == 'swiglu' else spec.mlp_ratio
        model = timm.create_model(spec.timm_name, pretrained=False, embed_dim=spec.embed_dim, depth=spec.depth,
                                  num_heads=spec.num_heads, mlp_ratio=ratio, drop_path_rate=drop_path)
        assert model.patch_embed.patch_size == (DINOV3_PATCH_SIZE,) * 2, model.patch_embed.patch_size
        self.taps = tuple(spec.taps)
        self.widths = (spec.embed_dim,) * len(self.taps)
        self.reductions = (DINOV3_PATCH_SIZE,) * len(self.taps)
        self.patch_size = DINOV3_PATCH_SIZE
        full = set(model.state_dict())
        model.prune_intermediate_layers(list(self.taps), prune_norm=False, prune_head=True)
        self.model = model
        self.unused_keys = frozenset(full - set(model.state_dict()))    # blocks after the last tap

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = crop_to_multiple(x, self.patch_size)
        return self.model.forward_intermediates(x, indices=list(self.taps), norm=True, output_fmt='NLC',
                                                intermediates_only=True)

    def from_library(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Meta's, Hugging Face's or timm's DINOv3 weights under this module's keys."""
        has_bias = self.model.blocks[0].attn.q_bias is not None
        state, _ = to_timm_dinov3(state, self.model.rope.periods, has_bias)
        return {f'model.{k}': v for k, v in state.items() if k not in self.unused_keys}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_encoder(spec: LibraryPreset | DinoV3Preset, drop_path: float = 0.0) -> LibraryEncoder:
    if isinstance(spec, DinoV3Preset):
        return DinoV3Encoder(spec, drop_path)
    if spec.library == 'timm':
        return TimmEncoder(spec.name, spec.taps, dict(spec.kwargs), drop_path)
    if spec.library == 'transformers' and spec.name == 'SegformerModel':
        return SegformerEncoder(dict(spec.kwargs), drop_path)
    raise ValueError(f'no encoder {spec.name!r} from {spec.library!r}: timm models and transformers\' '
                     f'SegformerModel are supported')
