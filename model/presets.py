"""The one table of model sizes: the encoders and the DPT decoder that goes with each.

DINOv2 (`PRESETS`): numbers of the original release (UniMatch V2 `model/semseg/dpt.py` and DINOv2's
`vit_small/base/large/giant2`); `tiny` is this project's own size for tests and the toy dataset.
Other encoders (`ENCODERS`, the paper's Table 9, and `timm:<name>` for any timm model): built by
their libraries (`model/encoders.py`), with the taps and decoder sizes that reproduce the paper's
parameter counts (`PAPER_PARAMS_M`). `python -m model --params` prints ours beside them.
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


@dataclass(frozen=True)
class LibraryPreset:
    """An encoder that a library builds (`model/encoders.py`) and the DPT decoder that goes with it."""
    library: str                               # 'timm' or 'transformers'
    name: str                                  # timm model name; 'SegformerModel' for transformers
    taps: tuple[int, ...] | None               # indices into timm's feature_info; None: chosen by
    #                                            `TimmEncoder` (last four levels, or spread over a ViT)
    features: int | None = None                # DPT fusion width (None: `default_decoder`)
    out_channels: tuple[int, ...] | None = None
    kwargs: tuple[tuple[str, object], ...] = ()   # extra constructor arguments (timm / SegformerConfig)


# The paper's decoder sizes: a ViT-B-wide encoder gets DINOv2-B's decoder, anything wider and every
# hierarchical encoder gets DINOv2-L's. These reproduce every count of FACTS §8 (`PAPER_PARAMS_M`).
DPT_BASE = (128, (96, 192, 384, 768))
DPT_LARGE = (256, (256, 512, 1024, 1024))
MIT_B5 = (('depths', (3, 6, 40, 3)), ('hidden_sizes', (64, 128, 320, 512)),
          ('num_attention_heads', (1, 2, 5, 8)), ('sr_ratios', (8, 4, 2, 1)))

ENCODERS: dict[str, LibraryPreset] = {
    # Deep 3x3 stem (64-64-128 wide), as the ResNets of UniMatch V1 and mmseg's V1c: 58.3M as the paper.
    'resnet152': LibraryPreset('timm', 'resnet152s', (1, 2, 3, 4), *DPT_LARGE),
    # BEiT's relative position tables are sized by the input: 512 x 512 (the paper's 86.2M), fixed.
    'beit_base': LibraryPreset('timm', 'beit_base_patch16_224', (2, 5, 8, 11), *DPT_BASE, (('img_size', 512),)),
    'beit_large': LibraryPreset('timm', 'beit_large_patch16_224', (4, 11, 17, 23), *DPT_LARGE, (('img_size', 512),)),
    'mit_b5': LibraryPreset('transformers', 'SegformerModel', None, *DPT_LARGE, MIT_B5),
    # SAM's image encoder at its native 1024 (64 x 64 position grid, resized to any input); taps at
    # its global-attention blocks; without its neck (88.9M, as the paper).
    'sam_base': LibraryPreset('timm', 'samvit_base_patch16', (2, 5, 8, 11), *DPT_BASE),
    'sam_large': LibraryPreset('timm', 'samvit_large_patch16', (5, 11, 17, 23), *DPT_LARGE),
}
TIMM_PREFIX = 'timm:'     # backbone=timm:<any timm model name>

# Parameters (millions) the paper reports for its segmentors (FACTS §8; Table 9's encoders were run
# on ADE20K, 150 classes, which the DINOv2-B row's 11.0M decoder for 150 classes also shows).
PAPER_PARAMS_M = {'dinov2_small': 24.8, 'dinov2_base': 97.5, 'dinov2_large': 335.6,
                  'beit_base': 97.2, 'beit_large': 335.9, 'mit_b5': 99.2, 'resnet152': 78.6,
                  'sam_base': 99.8, 'sam_large': 338.7}


def default_decoder(widths: tuple[int, ...], reductions: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """DPT sizes for an encoder no preset names: DINOv2-S's or -B's decoder for a ViT up to that
    width, DINOv2-L's for a wider one and for any hierarchical encoder (as the paper's)."""
    if len(set(reductions)) == 1 and max(widths) <= 384:
        return PRESETS['small'].features, PRESETS['small'].out_channels
    if len(set(reductions)) == 1 and max(widths) <= 768:
        return DPT_BASE
    return DPT_LARGE


def preset(backbone: str) -> tuple[str, ModelPreset | LibraryPreset]:
    """'dinov2_small' or 'small' -> ('small', PRESETS['small']); 'resnet152' -> ('resnet152',
    ENCODERS['resnet152']); 'timm:convnext_tiny' -> ('timm:convnext_tiny', a LibraryPreset)."""
    if backbone in ENCODERS:
        return backbone, ENCODERS[backbone]
    if backbone.startswith(TIMM_PREFIX):
        return backbone, LibraryPreset('timm', backbone[len(TIMM_PREFIX):], None)
    size = backbone.removeprefix('dinov2_')
    if size not in PRESETS:
        names = ', '.join([f'dinov2_{k}' for k in PRESETS] + list(ENCODERS) + [f'{TIMM_PREFIX}<timm model name>'])
        raise ValueError(f'unknown backbone {backbone!r}; choose one of {names}')
    return size, PRESETS[size]

