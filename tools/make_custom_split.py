"""Write seeded labeled/unlabeled split lists for a custom dataset.

The dataset folder holds `images/*` and single-channel `masks/<stem>.png`. Examples:

    python tools/make_custom_split.py --root data/mine --name mine --fraction 0.1 --val-fraction 0.2
    python tools/make_custom_split.py --root data/mine --name mine --count 50

writes `splits/mine/1_10/{labeled,unlabeled}.txt` (and `splits/mine/val.txt`), then
`splits/mine/50/...`, leaving the existing val list's images out of training. The same seed gives
nested labeled sets across fractions.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from dataset.splits import make_custom_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', required=True, help='dataset folder with images/ and masks/')
    parser.add_argument('--name', required=True, help='dataset name: writes splits/<name>/...')
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument('--fraction', type=float, help='labeled fraction of the training images')
    amount.add_argument('--count', type=int, help='number of labeled images')
    parser.add_argument('--split', help='split folder name (default: 1_<k>, <p>%% or <count>)')
    parser.add_argument('--val-fraction', type=float, help='carve splits/<name>/val.txt first')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--splits-root', default='splits')
    parser.add_argument('--force', action='store_true', help='overwrite existing split files')
    args = parser.parse_args()
    paths = make_custom_split(args.root, args.name, fraction=args.fraction, count=args.count,
                              split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                              splits_root=args.splits_root, force=args.force)
    for role, path in paths.items():
        n = sum(1 for line in open(path) if line.strip())
        print(f'{role:9s} {n:6d}  {path}')


if __name__ == '__main__':
    main()
