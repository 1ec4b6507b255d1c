"""Write seeded labeled/unlabeled split lists for a custom dataset, and its config.

The dataset folder holds `images/*` and single-channel `masks/<stem>.png` (class ids, 255 = ignore),
and optionally a folder of images without masks (`--unlabeled`). Examples (docs/custom_data.md):

    python tools/make_custom_split.py --root data/mine --name mine --fraction 0.1 --nclass 3 \\
        --config configs/mine.yaml
    python tools/make_custom_split.py --root data/mine --name mine --count 50 --unlabeled unlabeled

writes `splits/mine/val.txt` (20% of the images unless `--val-fraction`), `splits/mine/1_10/
{labeled,unlabeled}.txt` and `configs/mine.yaml` (`dataset: custom`, `name: mine`, `data_root`,
`nclass`), then `splits/mine/50/...`, leaving the existing val list's images out of training. The
same seed gives nested labeled sets across fractions. Errors end with one line and exit code 1.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from dataset.splits import DEFAULT_VAL_FRACTION, SplitError, make_custom_split  # noqa: E402
from util.config import ConfigError  # noqa: E402
from tools.split_writer import checked_config, write_splits  # noqa: E402

CONFIG_TEMPLATE = """\
# Custom dataset {name} (written by tools/make_custom_split.py; docs/custom_data.md). Every key not
# listed has its default (engine/config.py, RunConfig: the paper's Pascal settings -- DINOv2-S from
# pretrained/dinov2_small.pth, crop 518, 60 epochs, batch 4 per process).
dataset: custom
name: {name}              # splits/<name>/ and the run directories exp/<name>/...
data_root: {data_root}
nclass: {nclass}
class_names: null         # or a list of {nclass} names, for the logs and plots
"""


def config_text(name: str, data_root: str, nclass: int) -> str:
    """The dataset's config, checked by the config loader."""
    return checked_config(CONFIG_TEMPLATE.format(name=json.dumps(name), data_root=json.dumps(data_root), nclass=nclass))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', required=True, help='dataset folder with images/ and masks/')
    parser.add_argument('--name', required=True, help='dataset name: writes splits/<name>/...')
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument('--fraction', type=float, help='labeled fraction of the training images')
    amount.add_argument('--count', type=int, help='number of labeled images')
    parser.add_argument('--split', help='split folder name (default: 1_<k>, <p>%% or <count>)')
    parser.add_argument('--val-fraction', type=float,
                        help=f'carve splits/<name>/val.txt first (default: keep an existing one, else '
                             f'{DEFAULT_VAL_FRACTION:g}; 0: none)')
    parser.add_argument('--unlabeled', help='folder under --root of images without masks, added to the '
                                            'unlabeled list')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--splits-root', default='splits')
    parser.add_argument('--config', type=Path, help='also write this config for the dataset (needs --nclass)')
    parser.add_argument('--nclass', type=int, help='class count for --config (mask values 0..nclass-1)')
    parser.add_argument('--force', action='store_true', help='overwrite existing split files and config')
    args = parser.parse_args()
    if args.config and args.nclass is None:
        parser.error('--config needs --nclass')
    write_splits(lambda: make_custom_split(args.root, args.name, fraction=args.fraction, count=args.count,
                                           split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                                           splits_root=args.splits_root, force=args.force, unlabeled=args.unlabeled),
                 (lambda: config_text(args.name, args.root, args.nclass)) if args.config else None, args.config,
                 args.force, (FileNotFoundError, ValueError, SplitError, ConfigError))


if __name__ == '__main__':
    main()
