"""RandAugment as TorchSSL and USB define it for their FixMatch (their own `RandAugment(3, 5)` in
datasets/augmentation/randaugment.py, not torchvision's): `n` operations drawn with replacement from
the fourteen below, each with a magnitude drawn uniformly over that operation's own range (the `5`
is unused there), then Cutout. Written here on torchvision.transforms.functional and PIL from that
list of operations and ranges:

  operation                           magnitude
  AutoContrast, Equalize, Identity    none
  Brightness, Color, Contrast,        enhancement factor in [0.05, 0.95] (1 = the image;
  Sharpness                           Color is saturation)
  Posterize                           bits kept in [4, 8], as an integer
  Rotate                              degrees in [-30, 30]
  ShearX, ShearY                      shear in [-0.3, 0.3], about the image's corner (PIL affine)
  Solarize                            threshold in [0, 256]
  TranslateX, TranslateY              a fraction in [-0.3, 0.3] of the width / height
  Cutout (always, last)               a square of side U(0, 0.5) x the width (dataset/classification.py)

Geometric operations leave black where the image moved out, with nearest-neighbour sampling, as
theirs. Every draw comes from the `random.Random` passed in, so a sample's seed fixes its view.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image
from torchvision.transforms import functional as TF

NUM_OPS = 3              # TorchSSL's and USB's RandAugment(3, 5)


@dataclass(frozen=True)
class Op:
    name: str
    low: float
    high: float
    apply: Callable[[Image.Image, float], Image.Image]


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """PIL's affine transform: output (x, y) takes the input at (a x + b y + c, d x + e y + f)."""
    return img.transform(img.size, Image.AFFINE, matrix)


OPS: tuple[Op, ...] = (
    Op('AutoContrast', 0, 1, lambda img, _: TF.autocontrast(img)),
    Op('Brightness', 0.05, 0.95, TF.adjust_brightness),
    Op('Color', 0.05, 0.95, TF.adjust_saturation),
    Op('Contrast', 0.05, 0.95, TF.adjust_contrast),
    Op('Equalize', 0, 1, lambda img, _: TF.equalize(img)),
    Op('Identity', 0, 1, lambda img, _: img),
    Op('Posterize', 4, 8, lambda img, v: TF.posterize(img, int(v))),
    Op('Rotate', -30, 30, lambda img, v: TF.rotate(img, v)),
    Op('Sharpness', 0.05, 0.95, TF.adjust_sharpness),
    Op('ShearX', -0.3, 0.3, lambda img, v: _affine(img, (1, v, 0, 0, 1, 0))),
    Op('ShearY', -0.3, 0.3, lambda img, v: _affine(img, (1, 0, 0, v, 1, 0))),
    Op('Solarize', 0, 256, lambda img, v: TF.solarize(img, v)),
    Op('TranslateX', -0.3, 0.3, lambda img, v: _affine(img, (1, 0, v * img.width, 0, 1, 0))),
    Op('TranslateY', -0.3, 0.3, lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.height))),
)


def draw_ops(rng: random.Random, n: int = NUM_OPS) -> list[tuple[Op, float]]:
    """`n` operations (with replacement) and a magnitude for each, uniform over its range."""
    return [(op, rng.uniform(op.low, op.high)) for op in rng.choices(OPS, k=n)]


def rand_augment(img: Image.Image, rng: random.Random, n: int = NUM_OPS) -> Image.Image:
    """The operations of `draw_ops` applied in turn (Cutout is the caller's, after this)."""
    for op, magnitude in draw_ops(rng, n):
        img = op.apply(img, magnitude)
    return img
