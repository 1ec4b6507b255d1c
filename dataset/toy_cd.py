"""The built-in change-detection toy: bi-temporal tiles generated in seconds, in LEVIR-CD's layout.

    python -m dataset.toy_cd --root data/toy_cd --splits-root splits/toy_cd

Each pair shows one scene at two dates. Buildings (bright roofs with a cast shadow on textured
terrain) appear, vanish or move between the dates: that is the change, labelled 255 where a building
stands at one date and not at the other. The rest differs too and is not change: the second date's
illumination and colour balance (per-channel gain and offset), the season (terrain tinted and its
texture partly redrawn), a misregistration of up to 2 px, and sensor noise. A model must learn to
see buildings come and go through those nuisances; with 15 labeled pairs (5%) that is hard.

Layout: `<root>/{A,B,label}/<id>.png` (labels 0/255 'L'), `<splits_root>/{5%,10%,20%,40%}/
{labeled,unlabeled}.txt`, `train.txt`, `val.txt` and `test.txt`, one tile id a line, as
`splits/levir`. Deterministic in (seed, part, index); a marker written last makes it idempotent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataset.splits import write_lines_atomic
from dataset.toy import _save_atomic, _smooth_field, _write_splits, needs_generation

TILE = 112                    # px per side (LEVIR's tiles are 256; 8 ViT patches here)
N_TRAIN, N_VAL, N_TEST = 300, 40, 80
SPLITS = {'5%': 0.05, '10%': 0.10, '20%': 0.20, '40%': 0.40}
BUILDINGS = (3, 8)            # buildings at the first date
SIDE = (10, 26)               # building side, px
FATE = (0.6, 0.2, 0.2)        # a first-date building at the second date: stays, vanishes, moves
NEW_BUILDINGS = (0, 3)        # buildings that appear
SHADOW = 3                    # px, towards bottom right
GAIN, OFFSET = (0.75, 1.25), (-20.0, 20.0)     # second date's per-channel illumination
SEASON_TINT = (0.75, 1.2)     # per-channel factor of the terrain at the second date
SEASON_REDRAW = 0.5           # share of the terrain texture drawn anew at the second date
SHIFT_PX = 2                  # misregistration of the second date, at most, per axis
NOISE_STD = 4.0
MARKER = '.toy_cd_complete'
_PARAMS = dict(tile=TILE, buildings=BUILDINGS, side=SIDE, fate=FATE, new=NEW_BUILDINGS, shadow=SHADOW, gain=GAIN,
               offset=OFFSET, tint=SEASON_TINT, redraw=SEASON_REDRAW, shift=SHIFT_PX, noise=NOISE_STD, version=1)


def _terrain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Terrain colour (low frequency, greens and browns) and texture (high frequency), float [T, T, 3]
    and [T, T, 1]."""
    base = np.array([70.0, 110.0, 60.0]) + rng.uniform(-25, 25, 3)
    colour = base + (_smooth_field(rng, TILE, TILE, int(rng.integers(3, 7)), 3) - 0.5) * 80
    texture = (_smooth_field(rng, TILE, TILE, 28, 1) - 0.5) * 60
    return colour, texture


def _building(rng: np.random.Generator, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A rotated rectangle's footprint bool [T, T] not touching `taken`, and its shadow; None if no
    free place was found."""
    for _ in range(20):
        w, h = rng.uniform(*SIDE, size=2)
        cx, cy = rng.uniform(w / 2, TILE - w / 2), rng.uniform(h / 2, TILE - h / 2)
        rot = rng.uniform(-0.3, 0.3)
        px, py = np.array([-w, w, w, -w]) / 2, np.array([-h, -h, h, h]) / 2
        xs, ys = cx + px * math.cos(rot) - py * math.sin(rot), cy + px * math.sin(rot) + py * math.cos(rot)
        masks = []
        for dx in (0, SHADOW):
            canvas = Image.new('L', (TILE, TILE), 0)
            ImageDraw.Draw(canvas).polygon(list(zip((xs + dx).tolist(), (ys + dx).tolist())), fill=1)
            masks.append(np.asarray(canvas, dtype=bool))
        roof, shadow = masks
        if not (roof | shadow)[taken].any():
            return roof, shadow & ~roof
    return None


def _paint(img: np.ndarray, buildings: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    for roof, shadow, colour in buildings:
        img[shadow] *= 0.45
        img[roof] = colour
    return img


def make_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (uint8 [T, T, 3]), B (same) and the change label (uint8 [T, T], 0/255)."""
    colour, texture = _terrain(rng)
    taken = np.zeros((TILE, TILE), bool)
    first = []
    for _ in range(int(rng.integers(BUILDINGS[0], BUILDINGS[1] + 1))):
        b = _building(rng, taken)
        if b is not None:
            roof_colour = rng.choice([[200, 200, 205], [185, 80, 60], [90, 120, 190], [225, 215, 170]]) \
                + rng.uniform(-20, 20, 3)
            first.append((b[0], b[1], roof_colour))
            taken |= b[0] | b[1]
    second, taken2 = [], np.zeros((TILE, TILE), bool)
    movers = []
    for roof, shadow, c in first:
        fate = rng.choice(3, p=FATE)
        if fate == 0:
            second.append((roof, shadow, c))
            taken2 |= roof | shadow
        elif fate == 2:
            movers.append(c)
    for c in movers + [None] * int(rng.integers(NEW_BUILDINGS[0], NEW_BUILDINGS[1] + 1)):
        b = _building(rng, taken2)
        if b is not None:
            c = c if c is not None else rng.uniform(60, 230, 3)
            second.append((b[0], b[1], c))
            taken2 |= b[0] | b[1]

    a = _paint(colour + texture, first)
    tint = rng.uniform(*SEASON_TINT, 3)
    redrawn = (1 - SEASON_REDRAW) * texture + SEASON_REDRAW * (_smooth_field(rng, TILE, TILE, 28, 1) - 0.5) * 60
    b = _paint(colour * tint + redrawn, second)
    b = b * rng.uniform(*GAIN, 3) + rng.uniform(*OFFSET, 3)
    dx, dy = (int(v) for v in rng.integers(-SHIFT_PX, SHIFT_PX + 1, 2))
    b = np.pad(b, ((SHIFT_PX, SHIFT_PX), (SHIFT_PX, SHIFT_PX), (0, 0)), mode='edge')
    b = b[SHIFT_PX + dy:SHIFT_PX + dy + TILE, SHIFT_PX + dx:SHIFT_PX + dx + TILE]
    roofs_a = np.any([r for r, _, _ in first], axis=0) if first else taken & False
    roofs_b = np.any([r for r, _, _ in second], axis=0) if second else taken & False
    label = (roofs_a ^ roofs_b).astype(np.uint8) * 255
    pair = [np.clip(x + rng.standard_normal(x.shape) * NOISE_STD + 0.5, 0, 255).astype(np.uint8) for x in (a, b)]
    return pair[0], pair[1], label


def _ids(prefix: str, n: int) -> list[str]:
    return [f'{prefix}_{i:04d}.png' for i in range(n)]


def split_lists(seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, list[str]]:
    train = _ids('train', n_train)
    order = list(train)
    random.Random(seed).shuffle(order)
    lists = {'train.txt': train, 'val.txt': _ids('val', n_val), 'test.txt': _ids('test', n_test)}
    for name, share in SPLITS.items():
        k = max(1, round(n_train * share))
        lists[f'{name}/labeled.txt'], lists[f'{name}/unlabeled.txt'] = order[:k], order[k:]
    return lists


def ensure_toy_cd(data_root: str | os.PathLike = 'data/toy_cd', splits_root: str | os.PathLike = 'splits/toy_cd',
                  seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL, n_test: int = N_TEST,
                  force: bool = False) -> bool:
    """Generate the pairs unless a complete set with the same parameters exists; write the split
    lists where they differ. Returns True if pairs were generated."""
    data_root, splits_root = Path(data_root), Path(splits_root)
    if n_train < 20 or n_val < 1 or n_test < 1:
        raise ValueError(f'need n_train >= 20 (5% labeled), n_val >= 1, n_test >= 1; got {n_train}, {n_val}, {n_test}')
    params = dict(_PARAMS, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    marker = data_root / MARKER
    generate = force or needs_generation(marker, params)
    if generate:
        marker.unlink(missing_ok=True)
        for folder in ('A', 'B', 'label'):
            (data_root / folder).mkdir(parents=True, exist_ok=True)
        for part, (prefix, n) in enumerate((('train', n_train), ('val', n_val), ('test', n_test))):
            for k, name in enumerate(_ids(prefix, n)):
                for folder, arr in zip(('A', 'B', 'label'), make_pair(np.random.default_rng([seed, part, k]))):
                    _save_atomic(Image.fromarray(arr), data_root / folder / name, format='PNG')
    _write_splits(splits_root, split_lists(seed, n_train, n_val, n_test))
    if generate:
        write_lines_atomic(marker, [json.dumps(params)])
    return generate


def main() -> None:
    p = argparse.ArgumentParser(description='Generate the change-detection toy dataset.')
    p.add_argument('--root', default='data/toy_cd')
    p.add_argument('--splits-root', default='splits/toy_cd')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true')
    args = p.parse_args()
    start = time.perf_counter()
    done = ensure_toy_cd(args.root, args.splits_root, args.seed, force=args.force)
    print(f'toy_cd {"generated" if done else "already complete"}: {args.root}, splits in {args.splits_root} '
          f'[{time.perf_counter() - start:.1f} s]')


if __name__ == '__main__':
    main()
