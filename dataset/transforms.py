"""Image/mask transforms of the UniMatch V2 data pipeline, on PIL images.

Randomness: every random draw goes through `rng`, an object with the `random.Random` methods. The
default is the `random` module itself (its global generator). Inside DataLoader workers, torch
seeds `random` with `base_seed + worker_id`, and `base_seed` is drawn from the main process's torch
generator, so `torch.manual_seed(s)` (plus `random.seed(s)` for `num_workers=0`) makes a run
repeatable while workers still augment differently. Datasets must therefore use the global
generator rather than hold a `random.Random` of their own, which every worker would copy.
"""
from __future__ import annotations

import math
import random
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from util.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_to_normalized_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class RNG(Protocol):
    def random(self) -> float: ...
    def randint(self, a: int, b: int) -> int: ...
    def uniform(self, a: float, b: float) -> float: ...
    def sample(self, population, k: int) -> list: ...


def rescaled_size(size: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0),
                  rng: RNG = random) -> tuple[int, int]:
    """(w, h) with the long side L rescaled to randint[ratio_lo*L, ratio_hi*L], aspect kept."""
    w, h = size
    long_side = rng.randint(int(max(w, h) * ratio_range[0]), int(max(w, h) * ratio_range[1]))
    if h > w:
        return int(w * long_side / h + 0.5), long_side
    return long_side, int(h * long_side / w + 0.5)


def resize(img: Image.Image, mask: Image.Image, ratio_range: tuple[float, float] = (0.5, 2.0),
           rng: RNG = random) -> tuple[Image.Image, Image.Image]:
    """Rescale so the long side L becomes randint[ratio_lo*L, ratio_hi*L], keeping the aspect
    ratio (bilinear image, nearest mask)."""
    size = rescaled_size(img.size, ratio_range, rng)
    return img.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)


def pad_to(img: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """Pad right/bottom with `fill` up to `size` per side (unchanged when large enough)."""
    w, h = img.size
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        img = ImageOps.expand(img, border=(0, 0, pad_w, pad_h), fill=fill)
    return img


def crop_box(img_size: tuple[int, int], size: int, rng: RNG = random) -> tuple[int, int, int, int]:
    """A random size x size box (left, top, right, bottom) inside an image of `img_size` (w, h)."""
    w, h = img_size
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    return x, y, x + size, y + size


def pad_and_crop(img: Image.Image, mask: Image.Image, size: int, mask_fill: int = IGNORE_INDEX,
                 rng: RNG = random) -> tuple[Image.Image, Image.Image]:
    """Pad right/bottom up to `size` (image 0, mask `mask_fill`), then take a random size x size
    crop."""
    img, mask = pad_to(img, size, 0), pad_to(mask, size, mask_fill)
    box = crop_box(img.size, size, rng)
    return img.crop(box), mask.crop(box)


def hflip(img: Image.Image, mask: Image.Image, p: float = 0.5,
          rng: RNG = random) -> tuple[Image.Image, Image.Image]:
    if rng.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def normalize(img: Image.Image, mask: Image.Image | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB -> float [3, H, W] with ImageNet mean/std; mask -> int64 [H, W]."""
    img = _to_normalized_tensor(img)
    if mask is None:
        return img
    return img, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def color_jitter(img: Image.Image, brightness: float = 0.5, contrast: float = 0.5,
                 saturation: float = 0.5, hue: float = 0.25, rng: RNG = random) -> Image.Image:
    """torchvision ColorJitter(brightness, contrast, saturation, hue): the same factor ranges and
    random order, drawn from `rng` instead of torch's global generator."""
    factors = [rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
               rng.uniform(-hue, hue)]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in rng.sample(range(4), 4):
        img = ops[i](img, factors[i])
    return img


def blur(img: Image.Image, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
         rng: RNG = random) -> Image.Image:
    """PIL Gaussian blur with radius sigma ~ U(sigma), as the original does."""
    if rng.random() < p:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*sigma)))
    return img


def strong_color(img: Image.Image, rng: RNG = random, grayscale: bool = True) -> Image.Image:
    """The strong view's photometric augmentation: ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8,
    grayscale p 0.2 (not drawn at all with grayscale=False, change detection's), Gaussian blur
    sigma in [0.1, 2] p 0.5."""
    if rng.random() < 0.8:
        img = color_jitter(img, 0.5, 0.5, 0.5, 0.25, rng=rng)
    if grayscale and rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return blur(img, p=0.5, rng=rng)


def cutmix_box(size: int | tuple[int, int], p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3), rng: RNG = random) -> torch.Tensor:
    """Bool [H, W], True inside one CutMix box; all False with probability 1 - p.

    The box area is U(area) * H * W and its aspect h/w is U(ratio); aspect and corner are
    resampled until the box lies inside the image (the area stays fixed), as in the original.
    """
    h, w = (size, size) if isinstance(size, int) else size
    box = torch.zeros(h, w, dtype=torch.bool)
    if rng.random() > p:
        return box
    box_area = rng.uniform(*area) * h * w
    while True:
        aspect = rng.uniform(*ratio)
        box_w, box_h = int(math.sqrt(box_area / aspect)), int(math.sqrt(box_area * aspect))
        x, y = rng.randint(0, w - 1), rng.randint(0, h - 1)
        if x + box_w <= w and y + box_h <= h:
            break
    box[y:y + box_h, x:x + box_w] = True
    return box
