"""Table of dataset specs: task, class count, class names, palette and default evaluation mode.

`custom` and `custom_cls` datasets are not in the table's class lists: their class count and (optional) names come
from the config, and they get the generated palette.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from util.labels import IGNORE_INDEX

PASCAL_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
)

# Cityscapes trainIds 0..18 (255 = ignore).
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# ADE20K SceneParsing 150 classes; class k is mask value k and 255 is ignore (raw
# ADEChallengeData2016 annotations, 0 = 'other' and 1..150, must be converted first; SemiDataset
# rejects a mask holding 150).
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag',
)

# COCO: background + the 80 "thing" categories in category-id order.
COCO_CLASSES = (
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck',
    'boat', 'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush',
)

# The built-in generated dataset (dataset/toy.py): classes differ by texture, never by colour.
TOY_CLASSES = ('background', 'h-stripes', 'v-stripes', 'diagonal', 'checker', 'dots')

# Change detection: the two classes of every change map.
CHANGE_CLASSES = ('unchanged', 'changed')

# Classification (tasks/classification.py): the classes of each dataset in label order.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
STL10_CLASSES = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck')
SVHN_CLASSES = tuple(str(d) for d in range(10))
TOY_CLS_CLASSES = ('h-stripes', 'v-stripes', 'checker', 'dots')      # dataset/toy_cls.py


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map: bits of the label index spread over the high bits of R, G, B."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def cityscapes_palette() -> list[int]:
    """The official trainId colours; every other index (255 = ignore included) is black."""
    palette = [c for rgb in CITYSCAPES_COLORS for c in rgb]
    return palette + [0] * (768 - len(palette))


def generated_palette() -> list[int]:
    """A fixed pseudo-random palette: 0 black, 255 (ignore) white, the rest random colours."""
    rng = np.random.default_rng(12345)  # fixed: the palette must not change between runs
    colors = rng.integers(40, 256, size=(256, 3))
    colors[0] = 0
    colors[IGNORE_INDEX] = 255      # white
    return colors.astype(int).flatten().tolist()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    nclass: int | None  # None: taken from the config (custom)
    class_names: tuple[str, ...] | None
    palette: str  # 'voc' | 'cityscapes' | 'generated'
    eval_mode: str  # 'original' (whole image) | 'sliding_window'
    task: str = 'segmentation'  # the task of its runs (`tasks/`, a registered name)
    generated: bool = False  # made on first use by its task (the toys)
    eval_split: str = 'val'  # the list evaluated by default (splits/<dataset>/<eval_split>.txt)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec('pascal', 21, PASCAL_CLASSES, 'voc', 'original'),
        DatasetSpec('cityscapes', 19, CITYSCAPES_CLASSES, 'cityscapes', 'sliding_window'),
        DatasetSpec('ade20k', 150, ADE20K_CLASSES, 'generated', 'original'),
        DatasetSpec('coco', 81, COCO_CLASSES, 'generated', 'original'),
        DatasetSpec('toy', 6, TOY_CLASSES, 'generated', 'original', generated=True),
        DatasetSpec('custom', None, None, 'generated', 'original'),
        # Change detection (tasks/change_detection.py): tiles of two dates, evaluated on test.txt as the
        # original; `custom_cd` is any data in the same layout.
        DatasetSpec('levir', 2, CHANGE_CLASSES, 'generated', 'original', task='change_detection', eval_split='test'),
        DatasetSpec('whu', 2, CHANGE_CLASSES, 'generated', 'original', task='change_detection', eval_split='test'),
        DatasetSpec('toy_cd', 2, CHANGE_CLASSES, 'generated', 'original', task='change_detection', generated=True,
                    eval_split='test'),
        DatasetSpec('custom_cd', 2, CHANGE_CLASSES, 'generated', 'original', task='change_detection',
                    eval_split='test'),
        # classification: no masks (palette unused), the whole image (eval_mode unused)
        DatasetSpec('cifar10', 10, CIFAR10_CLASSES, 'generated', 'original', task='classification'),
        DatasetSpec('stl10', 10, STL10_CLASSES, 'generated', 'original', task='classification'),
        DatasetSpec('svhn', 10, SVHN_CLASSES, 'generated', 'original', task='classification'),
        DatasetSpec('imagenet', 1000, None, 'generated', 'original', task='classification'),
        DatasetSpec('toy_cls', 4, TOY_CLS_CLASSES, 'generated', 'original', task='classification', generated=True),
        # one's own images in folders by class (dataset/image_folder.py): nclass and names from the config
        DatasetSpec('custom_cls', None, None, 'generated', 'original', task='classification'),
    )
}

_PALETTES = {'voc': voc_palette, 'cityscapes': cityscapes_palette, 'generated': generated_palette}


def get_spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise KeyError(f'unknown dataset {dataset!r}; known: {sorted(DATASETS)}')
    return DATASETS[dataset]


def get_nclass(dataset: str, nclass: int | None = None) -> int:
    """The class count of `dataset`; `nclass` (from the config) must agree with it, or supply it
    for `custom`."""
    spec = get_spec(dataset)
    if spec.nclass is None:
        if nclass is None or nclass < 1:
            raise ValueError(f'dataset {dataset!r} needs nclass >= 1 from the config, got {nclass}')
        return nclass
    if nclass is not None and nclass != spec.nclass:
        raise ValueError(f'dataset {dataset!r} has {spec.nclass} classes, config says {nclass}')
    return spec.nclass


def class_names(dataset: str, nclass: int | None = None,
                names: list[str] | None = None) -> list[str]:
    """Class names of `dataset`; `custom` uses `names` from the config or 'class_<k>'."""
    spec = get_spec(dataset)
    nclass = get_nclass(dataset, nclass)
    if spec.class_names is not None:
        return list(spec.class_names)
    if names is None:
        return [f'class_{k}' for k in range(nclass)]
    if len(names) != nclass:
        raise ValueError(f'dataset {dataset!r}: {len(names)} class names given for nclass={nclass}')
    return list(names)


def get_palette(dataset: str, nclass: int | None = None) -> list[int]:
    """Flat 768-long RGB list for `PIL.Image.putpalette` (index 255 = ignore)."""
    nclass = get_nclass(dataset, nclass)
    if nclass > 255:
        raise ValueError(f'dataset {dataset!r}: {nclass} classes do not fit an 8-bit palette')
    return _PALETTES[get_spec(dataset).palette]()


def default_eval_mode(dataset: str) -> str:
    return get_spec(dataset).eval_mode
