"""The one table of model sizes: DINOv2 encoders and the DPT decoder that goes with each.

Numbers are those of the original release (UniMatch V2 `model/semseg/dpt.py` and DINOv2's
`vit_small/base/large/giant2`); `tiny` is this project's own size for tests and the toy dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

PATCH_SIZE = 14
NATIVE_IMG_SIZE = 518        # DINOv2's pretraining resolution: a 37 x 37 patch grid


@dataclass(frozen=True)
class ModelPreset:
    embed_dim: int
    depth: int
    num_heads: int
    taps: tuple[int, ...]          # blocks whose (final-LayerNorm'ed) tokens feed the decoder
    features: int                  # DPT fusion width
    out_channels: tuple[int, ...]  # DPT projection widths for the four taps
    ffn: str = 'mlp'               # 'mlp' (GELU) or 'swiglu' (giant)
    mlp_ratio: float = 4.0


PRESETS: dict[str, ModelPreset] = {
    'small': ModelPreset(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    'base': ModelPreset(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    'large': ModelPreset(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    'giant': ModelPreset(1536, 40, 24, (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536), ffn='swiglu'),
    # Small enough to train on a 2-core CPU in minutes; same architecture, random or toy-pretrained init.
    'tiny': ModelPreset(128, 6, 4, (1, 3, 4, 5), 32, (32, 64, 128, 128)),
}


def preset(backbone: str) -> tuple[str, ModelPreset]:
    """'dinov2_small' or 'small' -> ('small', PRESETS['small'])."""
    size = backbone.removeprefix('dinov2_')
    if size not in PRESETS:
        names = ', '.join(f'dinov2_{k}' for k in PRESETS)
        raise ValueError(f'unknown backbone {backbone!r}; choose one of {names}')
    return size, PRESETS[size]
