"""Inference helpers: whole image, sliding window, centre crop, flips and scales.

They know nothing about datasets: each takes a model in eval mode (call them under
`torch.inference_mode()`) and a normalised image batch `[B, 3, H, W]`, and returns tensors on the
image's device at the image's resolution. `model(x)` must return logits `[B, C, h', w']` for an
input whose sides are multiples of its patch (`patch_of`: DINOv2 14, DINOv3 16); the DPT model
returns them at the input size.

The three modes of the original UniMatch V2 evaluation:
- `original`: resize the whole image so each side is the nearest multiple of the patch (14 for
  DINOv2, at least one patch), predict, resize the logits back (bilinear, align_corners=True both ways).
- `sliding_window`: square windows of side `crop_size`, stride int(crop_size * 2 / 3), the last
  window on each axis clamped flush to the border; softmax probabilities summed where windows
  overlap. Each window goes through `original`, so a window that is not a patch multiple, or an
  axis shorter than the window (then one window spanning that axis), is resized rather than padded.
- `center_crop`: only the centre `crop_size` square (clipped to the image) is predicted, like
  `original`, and scored; the original release asserts this mode but never implements it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.presets import PATCH_SIZE

EVAL_MODES = ('original', 'center_crop', 'sliding_window')
SLIDING_STRIDE = 2 / 3  # the original's window overlap: stride = int(window * 2 / 3)


class Prediction(NamedTuple):
    probs: torch.Tensor  # float [B, C, H, W] class probabilities (sum to 1 per scored pixel)
    valid: torch.Tensor  # bool [B, H, W]; False where nothing was predicted (outside a centre crop)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True (the original's choice both ways); no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


def resize_to_patch_multiple(h: float, w: float, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """Nearest multiple of `patch` per side, as the original: int(h / 14 + 0.5) * 14 for DINOv2.
    Sides under half a patch, which the original would round to 0, get one patch."""
    def side(n: float) -> int:
        return max(int(n / patch + 0.5), 1) * patch
    return side(h), side(w)


def patch_of(model: nn.Module | None) -> int:
    """The patch of `model`'s grid: its `patch_size` (DINOv2 14; DINOv3, BEiT, SAM 16), else DINOv2's
    14, also for encoders without a patch grid (ResNet, MiT: patch_size 1), as before they had one."""
    patch = getattr(model, 'patch_size', PATCH_SIZE)
    return patch if patch > 1 else PATCH_SIZE


def predict_whole(model: nn.Module, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mode `original`: logits [B, C, H, W] of the whole image.

    The image is resized once to the patch multiple nearest (H * scale, W * scale), so a scale
    for test-time augmentation costs no second interpolation."""
    h, w = image.shape[-2:]
    logits = model(resize(image, resize_to_patch_multiple(h * scale, w * scale, patch_of(model))))
    return resize(logits, (h, w))


def window_starts(size: int, window: int) -> list[int]:
    """Window offsets along one axis: 0, stride, 2 * stride, ... with the last one moved back so
    the window ends at the border; [0] when the axis is no longer than the window.
    window_starts(1024, 798) == [0, 226]; window_starts(2048, 798) == [0, 532, 1064, 1250]."""
    stride = max(int(window * SLIDING_STRIDE), 1)
    starts, pos = [], 0
    while True:
        starts.append(max(min(pos, size - window), 0))
        if pos + window >= size:
            return starts
        pos += stride


def _sliding(model: nn.Module, image: torch.Tensor, window: int, nclass: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed softmax [B, C, H, W], number of windows covering each pixel [H, W])."""
    b, _, h, w = image.shape
    total = image.new_zeros(b, nclass, h, w, dtype=torch.float32)
    count = image.new_zeros(h, w, dtype=torch.float32)
    for top in window_starts(h, window):
        for left in window_starts(w, window):
            rows, cols = slice(top, top + window), slice(left, left + window)
            logits = predict_whole(model, image[:, :, rows, cols])
            if logits.shape[1] != nclass:
                raise ValueError(f'model returned {logits.shape[1]} classes, expected nclass={nclass}')
            total[:, :, rows, cols] += logits.float().softmax(dim=1)
            count[rows, cols] += 1
    return total, count


def center_crop_box(h: int, w: int, crop: int) -> tuple[slice, slice]:
    """Rows and columns of the centre crop (the original's (size - crop) // 2 offsets), clipped
    to the image on a short axis."""
    ch, cw = min(crop, h), min(crop, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return slice(top, top + ch), slice(left, left + cw)


def _paste(x: torch.Tensor, rows: slice, cols: slice, h: int, w: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop values x [B, C, h', w'] placed at (rows, cols) of a zero [B, C, h, w] map, and the
    bool [B, h, w] map of where they are."""
    full = x.new_zeros(*x.shape[:2], h, w)
    full[:, :, rows, cols] = x
    valid = torch.zeros(x.shape[0], h, w, dtype=torch.bool, device=x.device)
    valid[:, rows, cols] = True
    return full, valid


def _probs_at_scale(model: nn.Module, image: torch.Tensor, mode: str, crop_size: int, nclass: int,
                    scale: float) -> torch.Tensor:
    """Probabilities [B, C, H, W] for `image` predicted at `scale` in `mode` (whole image or
    sliding window; the centre crop is cut out by the caller)."""
    h, w = image.shape[-2:]
    if mode == 'sliding_window':
        scaled = resize(image, (max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)))
        total, count = _sliding(model, scaled, crop_size, nclass)
        return resize(total / count, (h, w))  # count >= 1 everywhere: windows cover the image
    return predict_whole(model, image, scale).float().softmax(dim=1)


def predict(model: nn.Module, image: torch.Tensor, mode: str, crop_size: int, nclass: int,
            flip: bool = False, scales: Sequence[float] = (1.0,)) -> Prediction:
    """Class probabilities at the image resolution, averaged over scales (and horizontal flips).

    Always probabilities, whatever the mode: sliding-window sums are divided by the number of
    windows covering each pixel (argmax unchanged), so views can be averaged. At scale s the image
    is resized by s, predicted in `mode` (windows keep side `crop_size`), and the probabilities
    are resized back. In `center_crop` the crop is cut first and the flips and scales apply to it.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f'mode must be one of {EVAL_MODES}, got {mode!r}')
    if not scales:
        raise ValueError('scales must hold at least one scale')
    h, w = image.shape[-2:]
    inner_mode, region = mode, image
    if mode == 'center_crop':
        rows, cols = center_crop_box(h, w, crop_size)
        inner_mode, region = 'original', image[:, :, rows, cols]

    probs = None
    for scale in scales:
        for flipped in ((False, True) if flip else (False,)):
            view = region.flip(-1) if flipped else region
            p = _probs_at_scale(model, view, inner_mode, crop_size, nclass, scale)
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
    probs = probs / (len(scales) * (2 if flip else 1))

    if mode == 'center_crop':
        return Prediction(*_paste(probs, rows, cols, h, w))
    valid = torch.ones(image.shape[0], h, w, dtype=torch.bool, device=image.device)
    return Prediction(probs, valid)
