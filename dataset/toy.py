"""The built-in toy dataset: generated in seconds, no download, same on-disk form as the real ones.

    python -m dataset.toy --root data/toy --splits-root splits/toy --seed 0

Images hold 3-6 textured shapes on a blotchy background. The 6 classes (background, h-stripes,
v-stripes, diagonal, checker, dots) differ only in texture: every object's two colours and the
background's colours come from one distribution, so colour says nothing about the class and a
model has to learn patterns. 400 train images make 1_16 a 25-image labeled set, where labels (not
optimisation) limit a model started from the shipped pretrained encoder, so unlabeled images can
help (docs/toys.md, "The toy comparison").

Layout: `<root>/images/<id>.jpg` (JPEG q95), `<root>/masks/<id>.png` (8-bit 'L'), split lists
`<splits_root>/{1_16,1_8,1_4,all}/{labeled,unlabeled}.txt` and `<splits_root>/val.txt` with lines
`images/<id>.jpg masks/<id>.png`. The labeled sets are nested prefixes of one seeded shuffle.
`ensure_toy` is idempotent: a marker holding the generation parameters is written last, so a
half-written tree, or one made with other parameters, is regenerated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from dataset.registry import TOY_CLASSES
from dataset.splits import write_lines_atomic

NCLASS = len(TOY_CLASSES)
N_TRAIN = 400  # train images; 1_16 then has 25 labeled, few enough that labels are what limits
N_VAL = 100  # val images: ~350 objects, a stable mIoU over 6 classes
IMAGE_SIDE = (112, 168)  # px per side, drawn independently: 8-12 ViT patches, often not x14
OBJECTS_PER_IMAGE = (3, 6)
OBJECT_EXTENT = (48, 100)  # px across a shape: 3-7 patches and >= 3 texture periods
PERIOD = (9.0, 14.0)  # texture period px: still >= 4.5 px at the 0.5x training rescale, and survives blur
DUTY = (0.4, 0.6)  # fraction of a stripe period in the first colour
DOT_RADIUS = (0.25, 0.35)  # dot radius in periods
TILT_DEG = 8.0  # random tilt of stripes/grids: orientation classes stay 30+ degrees apart
WARP_PX = 1.0  # amplitude of a smooth coordinate warp: textures are not pixel-perfect
WARP_CELLS = 4  # coarse grid of the warp field per side
MIN_COLOR_DIST = 80.0  # RGB distance between an object's two colours: the texture stays visible
BACKGROUND_CELLS = (3, 7)  # colour blotches per side: low-frequency, no regular pattern
NOISE_STD = 6.0  # per-pixel Gaussian noise (0-255 scale)
BRIGHTNESS = (0.8, 1.2)  # global brightness factor
JPEG_QUALITY = 95
SPLITS = {'1_16': 16, '1_8': 8, '1_4': 4}  # split name -> labeled fraction 1/k of the train set

MARKER = '.toy_complete'
_PARAMS = dict(nclass=NCLASS, image_side=IMAGE_SIDE, objects=OBJECTS_PER_IMAGE,
               extent=OBJECT_EXTENT, period=PERIOD, duty=DUTY, dot_radius=DOT_RADIUS,
               tilt=TILT_DEG, warp=WARP_PX, warp_cells=WARP_CELLS, min_color=MIN_COLOR_DIST,
               background=BACKGROUND_CELLS, noise=NOISE_STD, brightness=BRIGHTNESS,
               jpeg=JPEG_QUALITY, version=3)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int,
                  channels: int = 1) -> np.ndarray:
    """Random values on a coarse cells x cells grid, bicubically upsampled: float32 [h, w, C]."""
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC))
                     for c in range(channels)], axis=-1)


@dataclass(frozen=True)
class Scene:
    """How many objects, how large, how fine their patterns: the toy's by default."""
    objects: tuple[int, int] = OBJECTS_PER_IMAGE
    extent: tuple[int, int] = OBJECT_EXTENT
    period: tuple[float, float] = PERIOD


def _texture(rng: np.random.Generator, kind: str, angle: float, x: np.ndarray,
             y: np.ndarray, period: tuple[float, float] = PERIOD) -> np.ndarray:
    """Bool [h, w] pattern over (warped) pixel coordinates x, y: 'stripes' whose colour varies
    along direction `angle` (degrees), or a 'checker' / 'dots' lattice rotated by `angle`."""
    period = rng.uniform(*period)
    angle = math.radians(angle)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period + rng.random()
    if kind == 'stripes':
        return (u % 1.0) < rng.uniform(*DUTY)
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period + rng.random()
    if kind == 'checker':  # two cells per period
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    radius = rng.uniform(*DOT_RADIUS)  # dots on a square lattice
    return (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < radius ** 2


def toy_texture(rng: np.random.Generator, cls: int) -> tuple[str, float]:
    """The toy classes 1..5: stripes at 90 / 0 / +-45 degrees, checker, dots, each tilted by up to
    TILT_DEG, so the orientation classes stay 30+ degrees apart."""
    tilt = rng.uniform(-TILT_DEG, TILT_DEG)
    if cls in (1, 2, 3):
        return 'stripes', {1: 90.0, 2: 0.0, 3: float(rng.choice([45.0, -45.0]))}[cls] + tilt
    return ('checker' if cls == 4 else 'dots'), tilt


def _shape(rng: np.random.Generator, h: int, w: int,
           extent: tuple[int, int] = OBJECT_EXTENT) -> np.ndarray:
    """Bool [h, w]: a rotated ellipse, rectangle or random star-convex polygon centred in the
    image (it may run over the border)."""
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx, ry = rng.uniform(*extent, size=2) / 2
    rot = rng.uniform(0, math.pi)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        px, py = rx * np.cos(t), ry * np.sin(t)
    elif kind == 1:  # rectangle
        px, py = np.array([-rx, rx, rx, -rx]), np.array([-ry, -ry, ry, ry])
    else:  # triangle .. hexagon
        n = int(rng.integers(3, 7))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = max(rx, ry) * rng.uniform(0.6, 1.0, n)
        px, py = r * np.cos(t), r * np.sin(t)
    xs = cx + px * math.cos(rot) - py * math.sin(rot)
    ys = cy + px * math.sin(rot) + py * math.cos(rot)
    canvas = Image.new('L', (w, h), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)
    return np.asarray(canvas, dtype=bool)


def _two_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours at least MIN_COLOR_DIST apart; the same law for every class."""
    c1 = rng.uniform(0, 255, 3)
    while True:
        c2 = rng.uniform(0, 255, 3)
        if np.linalg.norm(c1 - c2) >= MIN_COLOR_DIST:
            return c1, c2


def make_sample(rng: np.random.Generator, nclass: int = NCLASS,
                texture: Callable[[np.random.Generator, int], tuple[str, float]] = toy_texture,
                scene: Scene = Scene()) -> tuple[np.ndarray, np.ndarray]:
    """One image uint8 [h, w, 3] and its mask uint8 [h, w] with values 0..nclass-1; object class
    c in 1..nclass-1 is drawn with the pattern `texture(rng, c)` names (kind, angle)."""
    h, w = (int(s) for s in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    cells = int(rng.integers(BACKGROUND_CELLS[0], BACKGROUND_CELLS[1] + 1))
    img = _smooth_field(rng, h, w, cells, channels=3) * 255
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(scene.objects[0], scene.objects[1] + 1))):
        cls = int(rng.integers(1, nclass))
        region = _shape(rng, h, w, scene.extent)
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        if rows.size == 0:
            continue
        # Texture only over the shape's bounding box; coordinates stay image-global.
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        y, x = np.mgrid[box].astype(np.float32)
        warp = (_smooth_field(rng, *y.shape, WARP_CELLS, channels=2) - 0.5) * (2 * WARP_PX)
        pattern = _texture(rng, *texture(rng, cls), x + warp[..., 0], y + warp[..., 1], scene.period)
        c1, c2 = _two_colors(rng)
        inside = region[box]
        img[box][inside] = np.where(pattern[inside, None], c1, c2)
        mask[box][inside] = cls
    noise = rng.standard_normal(img.shape, dtype=np.float32) * NOISE_STD
    img = img * rng.uniform(*BRIGHTNESS) + noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


def _save_atomic(image: Image.Image, path: Path, **kwargs) -> None:
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    image.save(tmp, format=kwargs.pop('format'), **kwargs)
    os.replace(tmp, path)


def _write_sample(job: tuple[Path, str, tuple[int, int, int]]) -> None:
    data_root, sample_id, key = job
    img, mask = make_sample(np.random.default_rng(list(key)))
    _save_atomic(Image.fromarray(img), data_root / 'images' / f'{sample_id}.jpg',
                 format='JPEG', quality=JPEG_QUALITY)
    _save_atomic(Image.fromarray(mask), data_root / 'masks' / f'{sample_id}.png', format='PNG')


def _sample_ids(n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    return [f'train_{i:05d}' for i in range(n_train)], [f'val_{i:05d}' for i in range(n_val)]


def _line(sample_id: str) -> str:
    return f'images/{sample_id}.jpg masks/{sample_id}.png'


def split_lists(seed: int, n_train: int, n_val: int) -> dict[str, list[str]]:
    """Split file (relative to the splits root) -> lines."""
    train_ids, val_ids = _sample_ids(n_train, n_val)
    order = list(train_ids)
    random.Random(seed).shuffle(order)
    lists = {'val.txt': [_line(i) for i in val_ids],
             'all/labeled.txt': [_line(i) for i in train_ids],
             'all/unlabeled.txt': [_line(i) for i in train_ids]}
    for name, k in SPLITS.items():
        n_labeled = max(1, n_train // k)
        lists[f'{name}/labeled.txt'] = [_line(i) for i in order[:n_labeled]]
        lists[f'{name}/unlabeled.txt'] = [_line(i) for i in order[n_labeled:]]
    return lists


def _write_splits(splits_root: Path, lists: dict[str, list[str]]) -> None:
    for rel, lines in lists.items():
        path = splits_root / rel
        text = ''.join(line + '\n' for line in lines)
        if not path.exists() or path.read_text() != text:
            write_lines_atomic(path, lines)


def needs_generation(marker: Path, params: dict) -> bool:
    """Whether the tree whose completion `marker` records must be (re)made: no marker, an unreadable
    one, or one written for other generation parameters."""
    try:
        return json.loads(marker.read_text()) != json.loads(json.dumps(params))
    except (OSError, ValueError):
        return True


def ensure_toy(data_root: str | os.PathLike = 'data/toy',
               splits_root: str | os.PathLike = 'splits/toy', seed: int = 0,
               n_train: int = N_TRAIN, n_val: int = N_VAL, force: bool = False,
               workers: int | None = None) -> bool:
    """Generate the toy dataset unless a complete one with the same parameters exists; the split
    lists are (re)written only where they differ. Returns True if images were generated.

    Deterministic: image k is drawn from a generator seeded by (seed, split, k), whatever the
    number of `workers` processes (default: the CPU count, at most 8). Under
    torchrun, call it on one rank and barrier (or on all: the writes are atomic and identical).
    """
    data_root, splits_root = Path(data_root), Path(splits_root)
    if n_train < max(SPLITS.values()) or n_val < 1:
        raise ValueError(f'need n_train >= {max(SPLITS.values())} and n_val >= 1, '
                         f'got {n_train}, {n_val}')
    params = dict(_PARAMS, seed=seed, n_train=n_train, n_val=n_val)
    marker = data_root / MARKER
    generate = force or needs_generation(marker, params)
    if generate:
        marker.unlink(missing_ok=True)
        (data_root / 'images').mkdir(parents=True, exist_ok=True)
        (data_root / 'masks').mkdir(parents=True, exist_ok=True)
        train_ids, val_ids = _sample_ids(n_train, n_val)
        jobs = [(data_root, sample_id, (seed, split_code, k))
                for split_code, ids in enumerate((train_ids, val_ids))
                for k, sample_id in enumerate(ids)]
        workers = min(workers or os.cpu_count() or 1, 8, len(jobs))
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_sample, jobs, chunksize=64))
        else:
            for job in jobs:
                _write_sample(job)
    _write_splits(splits_root, split_lists(seed, n_train, n_val))
    if generate:
        write_lines_atomic(marker, [json.dumps(params)])
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description='Generate the toy segmentation dataset.')
    parser.add_argument('--root', default='data/toy')
    parser.add_argument('--splits-root', default='splits/toy')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--n-train', type=int, default=N_TRAIN)
    parser.add_argument('--n-val', type=int, default=N_VAL)
    parser.add_argument('--force', action='store_true', help='regenerate even if complete')
    parser.add_argument('--workers', type=int, default=None, help='processes (default: CPUs)')
    args = parser.parse_args()
    start = time.perf_counter()
    generated = ensure_toy(args.root, args.splits_root, args.seed, args.n_train, args.n_val,
                           args.force, args.workers)
    state = 'generated' if generated else 'already complete'
    print(f'toy dataset {state}: {args.root} ({args.n_train} train, {args.n_val} val), splits in '
          f'{args.splits_root} [{time.perf_counter() - start:.1f} s]')


if __name__ == '__main__':
    main()
