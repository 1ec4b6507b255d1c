"""The built-in classification toy (`toy_cls`): generated in seconds, no download, written in
CIFAR-10's python format so that it is read exactly as CIFAR-10 is (dataset/classification.py).

    python -m dataset.toy_cls --root data/toy_cls

Each 32 x 32 image holds one textured shape over most of the image, on a blotchy background; the
class is the texture (the segmentation toy's, dataset/toy.py): horizontal stripes, vertical
stripes, checker, dots. Colours (object, pattern and background), the pattern's period (its scale:
3.5-7 px), its phase, a small tilt, the shape and the brightness are nuisances drawn for every
image, so a model has to learn patterns. The toy's diagonal stripes are left out: RandAugment's
rotations (up to 30 degrees) would turn them into another class. 4,000 train images (1,000 per
class) and 1,000 test images; `4_labels_per_class` is the smallest split (16 labels).

Layout: `<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` (pickled dicts:
'data' uint8 (N, 3072) in CHW order, 'labels' list; 'label_names'); a marker with the generation
parameters is written last, so a half-written or differently made tree is regenerated.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np

from dataset.toy import _shape, _smooth_field, _texture, _two_colors, needs_generation
from util.checkpoint import write_bytes_atomic

CLASSES = ('h-stripes', 'v-stripes', 'checker', 'dots')
SIDE = 32
N_TRAIN = 4000
N_TEST = 1000
TRAIN_BATCHES = 5           # CIFAR-10 keeps its train set in five pickles
PERIOD = (3.5, 7.0)         # px: 4.5-9 periods across; >= 3 px after the weak view's translation
EXTENT = (22, 40)           # px across the shape
TILT_DEG = 10.0
NOISE_STD = 6.0
BRIGHTNESS = (0.8, 1.2)
MARKER = '.toy_cls_complete'
_PARAMS = dict(classes=CLASSES, side=SIDE, period=PERIOD, extent=EXTENT, tilt=TILT_DEG, noise=NOISE_STD,
               brightness=BRIGHTNESS, version=1)


def make_image(rng: np.random.Generator, cls: int) -> np.ndarray:
    """uint8 (SIDE, SIDE, 3): a shape textured as class `cls` on a smooth random background."""
    tilt = rng.uniform(-TILT_DEG, TILT_DEG)
    kind, angle = [('stripes', 90.0), ('stripes', 0.0), ('checker', 0.0), ('dots', 0.0)][cls]
    img = _smooth_field(rng, SIDE, SIDE, int(rng.integers(2, 5)), channels=3) * 255
    while True:
        region = _shape(rng, SIDE, SIDE, EXTENT)
        if region.mean() > 0.3:      # the texture must cover enough of the image to be seen
            break
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    pattern = _texture(rng, kind, angle + tilt, x, y, PERIOD)
    c1, c2 = _two_colors(rng)
    img[region] = np.where(pattern[region, None], c1, c2)
    img = img * rng.uniform(*BRIGHTNESS) + rng.standard_normal(img.shape, dtype=np.float32) * NOISE_STD
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_set(seed: int, part: int, n: int) -> tuple[np.ndarray, list[int]]:
    """n images, classes balanced and shuffled: (n, 3072) uint8 in CIFAR's CHW order, labels."""
    rng = np.random.default_rng([seed, part])
    labels = rng.permutation(np.arange(n) % len(CLASSES)).tolist()
    images = np.stack([make_image(rng, c) for c in labels])
    return images.transpose(0, 3, 1, 2).reshape(n, -1), labels


def _dump(obj: dict, path: Path) -> None:
    write_bytes_atomic(pickle.dumps(obj), path)


def ensure_toy_cls(root: str | os.PathLike = 'data/toy_cls', seed: int = 0) -> bool:
    """Write the toy unless a complete one with these parameters exists; True if it was written."""
    folder = Path(root) / 'cifar-10-batches-py'
    marker = Path(root) / MARKER
    params = dict(_PARAMS, seed=seed, n_train=N_TRAIN, n_test=N_TEST)
    if not needs_generation(marker, params):
        return False
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    data, labels = make_set(seed, 0, N_TRAIN)
    for b, rows in enumerate(np.array_split(np.arange(N_TRAIN), TRAIN_BATCHES), start=1):
        _dump({'data': data[rows], 'labels': [labels[i] for i in rows]}, folder / f'data_batch_{b}')
    data, labels = make_set(seed, 1, N_TEST)
    _dump({'data': data, 'labels': labels}, folder / 'test_batch')
    _dump({'label_names': list(CLASSES)}, folder / 'batches.meta')
    marker.write_text(json.dumps(params))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description='Generate the classification toy (CIFAR-10 format).')
    parser.add_argument('--root', default='data/toy_cls')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    print('written' if ensure_toy_cls(args.root, args.seed) else 'already there', args.root)


if __name__ == '__main__':
    main()
