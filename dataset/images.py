"""Images in and out: reading any image as RGB (`load_rgb`, `to_rgb`), the inputs of a folder
(`list_inputs`), and pictures of predictions (palette PNGs of class ids, overlays, side-by-side
panels)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from util.labels import IGNORE_INDEX

OVERLAY_ALPHA = 0.5  # weight of the class colours over the image in overlays
MAX_PALETTE_CLASSES = 255  # class ids must fit a palette PNG next to IGNORE_INDEX
HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')  # gray > 8 bit


def _numpy(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    return ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)


def palette_image(ids: torch.Tensor | np.ndarray, palette: list[int]) -> Image.Image:
    """Class ids [H, W] (values <= 255) as a PIL 'P' image whose pixel values are the ids."""
    ids = _numpy(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_PALETTE_CLASSES):
        raise ValueError(f'class ids must lie in [0, {MAX_PALETTE_CLASSES}] for a palette PNG')
    img = Image.fromarray(ids.astype(np.uint8))  # 'L'; putpalette makes it 'P', same values
    img.putpalette(palette)
    return img


def save_prediction(ids: torch.Tensor, palette: list[int], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette_image(ids, palette).save(path)


def denormalize(image: torch.Tensor) -> Image.Image:
    """Normalised float [3, H, W] (ImageNet mean/std) -> PIL RGB."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    rgb = ((image * std + mean).clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb)


def save_side_by_side(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor,
                      palette: list[int], path: str | Path) -> None:
    """image [3, H, W] normalised | ground truth [H, W] | prediction [H, W], as one JPEG."""
    save_panels([denormalize(image), palette_image(mask.clamp(0, 255), palette).convert('RGB'),
                 palette_image(pred, palette).convert('RGB')], path)


def save_panels(panels: Sequence[Image.Image], path: str | Path) -> None:
    """Images of one size side by side, left to right, as one JPEG."""
    w, h = panels[0].size
    canvas = Image.new('RGB', (len(panels) * w, h))
    for k, panel in enumerate(panels):
        canvas.paste(panel.convert('RGB'), (k * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90)


def overlay(image: Image.Image, ids: torch.Tensor | np.ndarray, palette: list[int],
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """Class colours blended over an RGB image; pixels marked IGNORE_INDEX show the image only."""
    image = image.convert('RGB')
    blended = Image.blend(image, palette_image(ids, palette).convert('RGB'), alpha)
    unpredicted = _numpy(ids) == IGNORE_INDEX
    if unpredicted.any():
        blended.paste(image, mask=Image.fromarray(unpredicted.astype(np.uint8) * 255))
    return blended


def load_rgb(path: Path) -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation) and as 8-bit RGB; raises
    UnidentifiedImageError or OSError for files that are not readable images."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB: gray of more than 8 bits stretched to 0..255, palette and
    alpha images flattened."""
    if img.mode in HIGH_BIT_DEPTH_MODES:  # stretch to 8 bit; convert('RGB') would clip at 255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    if img.mode in ('P', 'LA', 'PA') or 'transparency' in img.info:
        img = img.convert('RGBA')  # resolve palette transparency before dropping alpha
    return img.convert('RGB')


def list_inputs(path: Path) -> list[Path]:
    """One file, or the files of a folder (not searched recursively), sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    raise SystemExit(f'error: input {path} does not exist')


def output_stem(path: Path, taken: set[str]) -> str:
    """The file stem, or stem_<ext> when another input (a.jpg next to a.png) already has it."""
    stem = path.stem if path.stem not in taken else f'{path.stem}_{path.suffix.lstrip(".")}'
    taken.add(stem)
    return stem
