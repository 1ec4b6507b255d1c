"""Write scikit-learn's handwritten digits as PNGs in the custom_cls folder layout: real images that
nobody here made, for trying classification on one's own data end to end on a CPU.

    python tools/write_digits.py --dst data/digits

`sklearn.datasets.load_digits`: 1,797 8 x 8 gray scans of handwritten digits 0-9 (16 gray levels,
the UCI "optical recognition of handwritten digits" test set), shipped inside the package (no
download). Each is scaled to 0..255 and upscaled (bilinear) to --size and written as RGB; per class, a seeded draw
puts --val-fraction of the images in val/<digit>/, --unlabeled-fraction in unlabeled/ (no class)
and the rest in train/<digit>/. Existing files are an error unless --force.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

MAX_LEVEL = 16      # load_digits' pixel values are 0..16


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8 x 8 scan (0..16) as a gray size x size image."""
    gray = Image.fromarray(np.round(pixels.reshape(8, 8) * 255 / MAX_LEVEL).astype(np.uint8), mode='L')
    return gray.resize((size, size), Image.BILINEAR).convert('RGB')   # RGB, as the pretrained encoders read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dst', type=Path, required=True)
    parser.add_argument('--size', type=int, default=32, help='image side (default 32)')
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--unlabeled-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true')
    args = parser.parse_args()
    if args.dst.exists() and any(args.dst.iterdir()) and not args.force:
        raise SystemExit(f'error: {args.dst} is not empty; nothing was written (--force overwrites)')
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    counts = {'train': 0, 'val': 0, 'unlabeled': 0}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == digit))
        n_val, n_unl = round(len(members) * args.val_fraction), round(len(members) * args.unlabeled_fraction)
        for rank, i in enumerate(members):
            folder = 'val' if rank < n_val else 'unlabeled' if rank < n_val + n_unl else 'train'
            out = args.dst / folder / ('' if folder == 'unlabeled' else str(digit)) / f'digit_{i:04d}.png'
            out.parent.mkdir(parents=True, exist_ok=True)
            digit_image(digits.data[i], args.size).save(out)
            counts[folder] += 1
    print(', '.join(f'{folder} {n}' for folder, n in counts.items()), f'images of {args.size} x {args.size} in {args.dst}')


if __name__ == '__main__':
    sys.exit(main())
