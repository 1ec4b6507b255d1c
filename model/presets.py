"""The one table of model sizes: the encoders and the DPT decoder that goes with each.

DINOv2 (`PRESETS`): numbers of the original release (UniMatch V2 `model/semseg/dpt.py` and DINOv2's
`vit_small/base/large/giant2`); `tiny` is this project's own size for tests and the toy dataset.
DINOv3 (`DINOV3_PRESETS`, `backbone=dinov3_<size>`): Meta's sizes (facebookresearch/dinov3
`hub/backbones.py`), built by timm (`model/encoders.py`), with DINOv2's taps and decoders
(docs/encoders.md).
Other encoders (`ENCODERS`, the paper's Table 9, and `timm:<name>` for any timm model): built by
their libraries (`model/encoders.py`), with the taps and decoder sizes that reproduce the paper's
parameter counts (`PAPER_PARAMS_M`). `python -m model --params` prints ours beside them.
"""
from __future__ import annotations

import re
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


DINOV3_PREFIX = 'dinov3_'     # backbone=dinov3_<size>
DINOV3_PATCH_SIZE = 16
DINOV3_WEIGHTS_PAGE = 'https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/'   # by request
DINOV3_LICENCE = 'https://ai.meta.com/resources/models-and-libraries/dinov3-license/'


@dataclass(frozen=True)
class DinoV3Preset(ModelPreset):
    """A DINOv3 ViT/16: RoPE, a class and 4 register tokens, LayerScale, q and v biases.

    Sizes as Meta's `dinov3_vit*16` (`ffn`, `mlp_ratio`: Meta's `ffn_layer`, `ffn_ratio`; a SwiGLU is
    `mlp_ratio * embed_dim * 2 / 3` wide, rounded up to 8, as DINOv2-giant's). `timm_name`: timm's
    registered model of this architecture, which `model.encoders.DinoV3Encoder` builds at these sizes
    (the `_qkvb` variants: q and v biases, as Meta's `qkv_bias=True` with the key part masked; the 7B
    has none).
    `meta_arch`, `meta_hash`: Meta's release file and Hugging Face repository of the weights."""
    timm_name: str = ''
    meta_arch: str = ''       # 'vits16', ...
    meta_hash: str = ''       # the 8 hex digits in Meta's file name

    @property
    def meta_file(self) -> str:
        return f'dinov3_{self.meta_arch}_pretrain_lvd1689m-{self.meta_hash}.pth'

    @property
    def hf_repo(self) -> str:
        return f'facebook/dinov3-{self.meta_arch}-pretrain-lvd1689m'


# Taps at DINOv2's depth fractions: S/B's [2, 5, 8, 11] of 12 blocks, L's [4, 11, 17, 23] of 24, and the
# quarters (DINOv2-giant's [9, 19, 29, 39] of 40) for H+'s 32 and the 7B's 40. DPT sizes: those of
# the DINOv2 of the same width; DINOv2-giant's (the widest) for H+ (1280) and the 7B (4096).
DINOV3_PRESETS: dict[str, DinoV3Preset] = {
    'small': DinoV3Preset(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384),
                          timm_name='vit_small_patch16_dinov3_qkvb', meta_arch='vits16', meta_hash='08c60483'),
    'small_plus': DinoV3Preset(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384), ffn='swiglu', mlp_ratio=6.0,
                               timm_name='vit_small_plus_patch16_dinov3_qkvb', meta_arch='vits16plus',
                               meta_hash='4057cbaa'),
    'base': DinoV3Preset(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768),
                         timm_name='vit_base_patch16_dinov3_qkvb', meta_arch='vitb16', meta_hash='73cec8be'),
    'large': DinoV3Preset(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024),
                          timm_name='vit_large_patch16_dinov3_qkvb', meta_arch='vitl16', meta_hash='8aa4cbdd'),
    'huge_plus': DinoV3Preset(1280, 32, 20, (7, 15, 23, 31), 384, (1536, 1536, 1536, 1536), ffn='swiglu',
                              mlp_ratio=6.0, timm_name='vit_huge_plus_patch16_dinov3_qkvb', meta_arch='vith16plus',
                              meta_hash='7c1da9a5'),
    # Meta's SwiGLU here rounds to 64 (`swiglu64`, as timm's): the same 8192 as rounding to 8.
    '7b': DinoV3Preset(4096, 40, 32, (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536), ffn='swiglu', mlp_ratio=3.0,
                       timm_name='vit_7b_patch16_dinov3', meta_arch='vit7b16', meta_hash='a955f4ea'),
    # DINOv2's tiny size (head width 32: RoPE needs a multiple of 4) for tests; no weights exist.
    'tiny': DinoV3Preset(128, 6, 4, (1, 3, 4, 5), 32, (32, 64, 128, 128), timm_name='vit_small_patch16_dinov3_qkvb'),
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


# Meta's published encoder sizes (millions; facebookresearch/dinov3 MODEL_CARD.md: "ViT-S (21M
# parameters)", S+ 29M, B 86M, L 300M, H+ 840M, "ViT-7B (6716M parameters)"; README: 6,716M).
META_PARAMS_M = {'small': 21, 'small_plus': 29, 'base': 86, 'large': 300, 'huge_plus': 840, '7b': 6716}


def default_decoder(widths: tuple[int, ...], reductions: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """DPT sizes for an encoder no preset names: DINOv2-S's or -B's decoder for a ViT up to that
    width, DINOv2-L's for a wider one and for any hierarchical encoder (as the paper's)."""
    if len(set(reductions)) == 1 and max(widths) <= 384:
        return PRESETS['small'].features, PRESETS['small'].out_channels
    if len(set(reductions)) == 1 and max(widths) <= 768:
        return DPT_BASE
    return DPT_LARGE


def preset(backbone: str) -> tuple[str, ModelPreset | LibraryPreset]:
    """'dinov2_small' or 'small' -> ('small', PRESETS['small']); 'dinov3_base' -> ('dinov3_base',
    DINOV3_PRESETS['base']); 'resnet152' -> ('resnet152', ENCODERS['resnet152']);
    'timm:convnext_tiny' -> ('timm:convnext_tiny', a LibraryPreset)."""
    if backbone in ENCODERS:
        return backbone, ENCODERS[backbone]
    if backbone.startswith(TIMM_PREFIX):
        return backbone, LibraryPreset('timm', backbone[len(TIMM_PREFIX):], None)
    if backbone.startswith(DINOV3_PREFIX) and backbone[len(DINOV3_PREFIX):] in DINOV3_PRESETS:
        return backbone, DINOV3_PRESETS[backbone[len(DINOV3_PREFIX):]]
    size = backbone.removeprefix('dinov2_')
    if size not in PRESETS:
        names = ', '.join([f'dinov2_{k}' for k in PRESETS] + [f'{DINOV3_PREFIX}{k}' for k in DINOV3_PRESETS]
                          + list(ENCODERS) + [f'{TIMM_PREFIX}<timm model name>'])
        raise ValueError(f'unknown backbone {backbone!r}; choose one of {names}')
    return size, PRESETS[size]


def patch_size(backbone: str) -> int:
    """The encoder's patch: the model's output covers the input cropped to a multiple of it
    (`DPTSegmentor.forward`). DINOv2 14, DINOv3 16; a library ViT's is in its timm name
    (BEiT's and SAM's `..._patch16...`: 16); 1 for ResNet, MiT and the other pyramid encoders."""
    name, spec = preset(backbone)
    if isinstance(spec, DinoV3Preset):
        return DINOV3_PATCH_SIZE
    if isinstance(spec, ModelPreset):
        return PATCH_SIZE
    found = re.search(r'patch(\d+)', spec.name)
    return int(found.group(1)) if found else 1


def required_crop_multiple(backbone: str) -> int:
    """What a training crop side must be a multiple of for `backbone`: its patch, so that the
    model's logits have the crop's size (the losses and CutMix compare them pixel for pixel)."""
    return patch_size(backbone)


def nearest_multiples(value: int, multiple: int) -> list[int]:
    """The multiples of `multiple` either side of `value`: 100, 14 -> [98, 112]."""
    below = value // multiple * multiple
    return [m for m in (below, below + multiple) if m > 0]
