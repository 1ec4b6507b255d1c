"""Loading weights into a `DPTSegmentor` from every format users have.

(a) public DINOv2 files `dinov2_vit{s,b,l,g}14_pretrain.pth`: the encoder's plain state dict, and
    the same encoders as timm and Hugging Face transformers save them (renamed on load,
    `model/convert.py`);
(b) released UniMatch V2 checkpoints: {'model', 'model_ema', ...} with keys prefixed `module.`;
(c) this project's checkpoints (same layout, unprefixed) and plain model state dicts (.pth or
    .safetensors);
(d) for encoders a library builds (`model/encoders.py`: ResNet, BEiT, SAM, MiT, timm:<name>), the
    library's own state dict of that model (timm's, or transformers' SegformerModel and its task
    models), classifier and unused parts dropped by the encoder's `from_library`;
(e) DINOv3 encoders: Meta's release files `dinov3_vit*16_pretrain_lvd1689m-*.pth`, timm's and
    Hugging Face's (`model.safetensors`) state dicts of the same models (`model/convert.py`).
Every file goes through `util.checkpoint.safe_load` (weights only, no code runs). A state dict that
does not fit raises `WeightsMismatchError` naming missing and unexpected keys and shape mismatches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from model.convert import ConversionError, to_dinov2_keys
from model.encoders import LibraryEncoder
from model.presets import DINOV3_LICENCE, DINOV3_PREFIX, DINOV3_PRESETS, DINOV3_WEIGHTS_PAGE
from util.checkpoint import safe_load

DDP_PREFIX = 'module.'
CLASSIFIER_KEY = 'head.scratch.output_conv.2.weight'
DECODER_PREFIX = 'head.scratch.'          # a whole segmentor's keys (a timm encoder's classifier is `head.*`)
OPTIONAL_ENCODER_KEYS = {'mask_token'}   # unused by segmentation; absent from some encoder exports


class WeightsMismatchError(RuntimeError):
    pass


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = DDP_PREFIX) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def model_state_from(obj: object, weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The model state dict inside a loaded file, and which one it was ('ema', 'student' or 'plain').

    weights: 'ema' or 'student' for checkpoints that hold both; None = EMA where there is one.
    """
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f'expected a dict of weights, got {type(obj).__name__}')
    if 'model' in obj or 'model_ema' in obj:
        want = weights or ('ema' if obj.get('model_ema') is not None else 'student')
        key = {'ema': 'model_ema', 'student': 'model'}[want]
        if obj.get(key) is None:
            raise WeightsMismatchError(f'checkpoint has no {key!r} weights (it has {sorted(obj)})')
        return strip_prefix(obj[key]), want
    if 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
        return strip_prefix(obj['state_dict']), 'plain'
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f'not a state dict: keys {bad[:5]} do not hold tensors')
    return strip_prefix(dict(obj)), 'plain'


def _describe(n: int, keys: list[str]) -> str:
    shown = ', '.join(keys[:8])
    return f'{n} ({shown}{", ..." if n > 8 else ""})'


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                 optional: set[str] = frozenset(), prefix: str = '') -> None:
    """`module.load_state_dict(state)` that explains every mismatch before loading anything."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        lines = [f'weights in {source} do not fit the model:']
        if missing:
            lines.append(f'  missing keys: {_describe(len(missing), [prefix + k for k in missing])}')
        if unexpected:
            lines.append(f'  unexpected keys: {_describe(len(unexpected), [prefix + k for k in unexpected])}')
        for k in shapes[:8]:
            lines.append(f'  shape mismatch {prefix}{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}')
        if CLASSIFIER_KEY in shapes:
            lines.append(f'  -> the file was trained for {state[CLASSIFIER_KEY].shape[0]} classes, the model '
                         f'has {own[CLASSIFIER_KEY].shape[0]} (config nclass)')
        if any(k.endswith('pos_embed') or k.endswith('cls_token') for k in shapes):
            lines.append('  -> the encoder size differs (config backbone)')
        raise WeightsMismatchError('\n'.join(lines))
    module.load_state_dict(state, strict=not optional)


def is_encoder_state(state: Mapping[str, torch.Tensor]) -> bool:
    return 'pos_embed' in state and not any(k.startswith('head.') for k in state)


def encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An encoder state dict in any supported format, under DINOv2's keys."""
    try:
        return to_dinov2_keys(strip_prefix(state, 'backbone.'))[0]
    except KeyError as err:
        raise WeightsMismatchError(err.args[0]) from None


def load_pretrained_encoder(model: nn.Module, path: str | Path) -> None:
    """DINOv2 weights (DINOv2's, timm's or transformers' format) into `model.backbone` (strict after
    conversion, apart from the unused mask_token); for another encoder, its library's weights
    (strict after `from_library`)."""
    state, _ = model_state_from(safe_load(path))
    if isinstance(model.backbone, LibraryEncoder):
        try:
            state = model.backbone.from_library(state)
        except ConversionError as err:
            raise WeightsMismatchError(f'{path}: {err}') from None
        load_checked(model.backbone, state, str(path), prefix='backbone.')
        return
    state = encoder_state(state)
    if not is_encoder_state(state):
        raise WeightsMismatchError(f'{path} is not a DINOv2 encoder state dict (no pos_embed, or it has head.* keys)')
    load_checked(model.backbone, state, str(path), optional=OPTIONAL_ENCODER_KEYS, prefix='backbone.')


def load_weights(model: nn.Module, path: str | Path, weights: str | None = None) -> str:
    """Load a full-model file (any format above) into `model`; returns which weights were used.
    An encoder-only file is loaded into the encoder."""
    obj = safe_load(path)
    state, which = model_state_from(obj, weights)
    if isinstance(model.backbone, LibraryEncoder) and not any(k.startswith(DECODER_PREFIX) for k in state):
        load_pretrained_encoder(model, path)
        return 'encoder'
    if is_encoder_state(encoder_state(state)) and not any(k.startswith('head.') for k in state):
        load_pretrained_encoder(model, path)
        return 'encoder'
    load_checked(model, state, str(path))
    return which


# ---- DINOv3's licence-gated weights -------------------------------------------------------------------

def dinov3_weight_files(backbone: str, folders: Sequence[Path]) -> list[Path]:
    """Where `pretrained: auto` looks for `backbone`'s DINOv3 weights, in order: `<backbone>.pth` or
    `.safetensors`, then Meta's file name (where `torch.hub.load('facebookresearch/dinov3', ...)` would
    leave it), in each folder."""
    spec = DINOV3_PRESETS[backbone[len(DINOV3_PREFIX):]]
    names = [f'{backbone}.pth', f'{backbone}.safetensors'] + ([spec.meta_file] if spec.meta_arch else [])
    return [Path(folder) / name for folder in folders for name in names]


def find_dinov3_weights(backbone: str, folders: Sequence[Path]) -> Path | None:
    return next((p for p in dinov3_weight_files(backbone, folders) if p.is_file()), None)


def dinov3_weights_help(backbone: str, folders: Sequence[Path]) -> str:
    """Why `backbone`'s weights are not fetched, which file to get, and where to put it."""
    spec = DINOV3_PRESETS[backbone[len(DINOV3_PREFIX):]]
    if not spec.meta_arch:
        return f'no weights exist for {backbone} (a size for tests): use pretrained=null for random weights'
    names = [p.name for p in dinov3_weight_files(backbone, folders[:1])]
    return (f'the {backbone} encoder is not on disk (looked for {", ".join(names)} in '
            f'{" and ".join(f"{folder}/" for folder in folders)}), and DINOv3 weights are never downloaded '
            f'here: Meta releases them under the DINOv3 License ({DINOV3_LICENCE}) to those who request them.\n'
            f'  Request them at {DINOV3_WEIGHTS_PAGE} (Meta e-mails the download links; the file is '
            f'{spec.meta_file}), or accept the licence at https://huggingface.co/{spec.hf_repo} '
            f'(model.safetensors; timm\'s copy: timm/{spec.timm_name}.lvd1689m).\n'
            f'  Put the file in {folders[0]}/ under one of those names, or set pretrained=<path>: Meta\'s, '
            f'Hugging Face\'s and timm\'s formats all load. pretrained=null trains from random weights.')
