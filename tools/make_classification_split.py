"""Write seeded split lists for classification on one's own images (`custom_cls`), and its config.

The dataset folder holds train/<class>/*, val/<class>/* and optionally unlabeled/* (images without
a class), torchvision's ImageFolder conventions (dataset/image_folder.py; docs/custom_classification.md):

    python tools/make_classification_split.py --root data/digits --name digits --labels-per-class 4 \\
        --config configs/digits.yaml

writes `splits/digits/val.txt` (every val/ image), `splits/digits/4_labels_per_class/labeled.txt`
(4 images of every class, drawn with --seed), `.../unlabeled.txt` (every train/ image and every
unlabeled/ image) and `configs/digits.yaml` (`dataset: custom_cls`, `name`, `data_root`, `nclass`,
`class_names` from the folders, and a training recipe). The same seed gives nested labeled sets
across N; another seed, another labeled set (`--split` names its folder). Errors end with one line
and exit code 1; nothing is written then.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from dataset.checks import DataError  # noqa: E402
from dataset.image_folder import UNLABELED, classes_of, make_classification_split  # noqa: E402
from tools.split_writer import checked_config, write_splits  # noqa: E402
from util.config import ConfigError  # noqa: E402

CONFIG_TEMPLATE = """\
# Classification on one's own images: {name} (written by tools/make_classification_split.py;
# docs/custom_classification.md). The recipe below is OURS (the paper has none for custom data):
# configs/imagenet.yaml's DINOv2-S + linear head at 224 x 224 (pretrained/dinov2_small.pth), SGD
# 0.001 for the encoder and 0.03 for the head, cosine schedule, batch 32 labeled + 32 unlabeled,
# threshold 0.95, EMA 0.999, 30 epochs of 256 iterations. Every other key: engine/config.py.
dataset: custom_cls
name: {name}              # splits/<name>/ and the run directories exp/<name>/...
data_root: {data_root}
nclass: {nclass}
class_names: {class_names}   # the sorted class folder names of train/: class k is the k-th
crop_size: 224            # every image is resized to crop_size x crop_size
backbone: dinov2_small
pretrained: auto
input_size: 224
epochs: 30
max_iters_per_epoch: 256  # classification: every epoch has exactly this many iterations
batch_size: 32
unlabeled_ratio: 1
labeled_upsample: 16384   # supervised: max_iters_per_epoch x 2 x batch_size labeled samples per epoch
optimizer: sgd
lr: 0.001
lr_multi: 30.0
momentum: 0.9
nesterov: true
weight_decay: 0.0005
lr_schedule: cosine
reference_gpus: 1
conf_thresh: 0.95
total_loss: sum
ema_decay: 0.999
eval_batch_size: 64
"""


def config_text(name: str, data_root: str, classes: list[str]) -> str:
    """The dataset's config, checked by the config loader."""
    return checked_config(CONFIG_TEMPLATE.format(name=json.dumps(name), data_root=json.dumps(data_root),
                                                 nclass=len(classes), class_names=json.dumps(classes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', required=True, help='dataset folder with train/<class>/ and val/<class>/')
    parser.add_argument('--name', required=True, help='dataset name: writes splits/<name>/...')
    parser.add_argument('--labels-per-class', type=int, required=True, help='labeled images of every class')
    parser.add_argument('--split', help='split folder name (default: <N>_labels_per_class)')
    parser.add_argument('--unlabeled', default=UNLABELED,
                        help=f'folder under --root of images without a class (default: {UNLABELED}, if it exists)')
    parser.add_argument('--seed', type=int, default=0, help='the labeled draw (default 0)')
    parser.add_argument('--splits-root', default='splits')
    parser.add_argument('--config', type=Path, help='also write this config for the dataset')
    parser.add_argument('--force', action='store_true', help='overwrite existing split files and config')
    args = parser.parse_args()
    write_splits(lambda: make_classification_split(args.root, args.name, args.labels_per_class, seed=args.seed,
                                                   split=args.split, splits_root=args.splits_root,
                                                   unlabeled=args.unlabeled, force=args.force),
                 (lambda: config_text(args.name, args.root, classes_of(args.root))) if args.config else None,
                 args.config, args.force, (DataError, ConfigError))


if __name__ == '__main__':
    main()
