"""Semi-supervised classification data: CIFAR-10, STL-10, SVHN, ImageNet-1K, the generated
`toy_cls` and one's own images in folders by class (`custom_cls`, dataset/image_folder.py), as samples in the training step's layout (methods/step.py).

Files: CIFAR-10, STL-10 and SVHN are read by torchvision's dataset classes from `data_root` in
their official formats (CIFAR's python pickle batches under `cifar-10-batches-py/`, STL-10's
binaries under `stl10_binary/`, SVHN's `train_32x32.mat`, `extra_32x32.mat` and `test_32x32.mat`),
and downloaded there by torchvision when they are missing and `download` is on. Files that are present are taken as they
are (torchvision's md5 checks of a 2.6 GB STL-10 file on every start are left to the download).
ImageNet-1K is the standard folder layout `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`
(torchvision's ImageFolder). `toy_cls` is written in CIFAR-10's format on first use
(dataset/toy_cls.py) and read like CIFAR-10.

Splits: `<N>_labels_per_class` takes N labeled images of every class, `<P>%` (ImageNet) P percent of
every class (at least one), `all` every label; the labeled images are drawn with a generator seeded
by the run's seed, so the three seeds of a table are three labeled sets (as USB). The unlabeled set
is the whole training set, labeled images included (as USB and FixMatch), plus STL-10's 100,000
unlabeled images; SVHN's training set is train + extra (604,388 images), as TorchSSL and USB.
Validation is the test set.

Samples, asked for by `SampleKey` (index, seed) like dataset/semi.py, so every augmentation is
the same whichever worker draws it and after a resume:
  train_l  {'image': (3, S, S) weak view, 'mask': (1, 1) int64 class}
  train_u  {'image': (3, S, S) weak view, 'strong': (V, 3, S, S), 'boxes': (V, 1, 1) all False
            (no CutMix: Cutout is in the strong view), 'valid': (1, 1) all True}
  val      {'image': (3, S, S), 'label': int}
An image is a one-pixel map: the step's losses and statistics then are FixMatch's per-image ones.
Weak view: horizontal flip and a random crop of the image padded by 4 pixels (reflect), as
TorchSSL for every dataset (SVHN too; USB flips SVHN as well); ImageNet: resize to S / 0.875 on the
short side and a random S crop. Strong view, in TorchSSL's order: TorchSSL's and USB's own
RandAugment(3, 5) on the image (dataset/randaugment.py: 3 operations, each magnitude uniform over
its own range), their Cutout (a square of up to half the side), then the weak view's geometry.
"""
from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dataset.checks import DataError
from dataset.image_folder import list_labels
from dataset.randaugment import rand_augment
from dataset.semi import SampleKey

PAD_PIXELS = 4              # weak view: pad by 4 pixels (reflect) and crop back (TorchSSL, every dataset)
CROP_RATIO = 0.875          # ImageNet: resize to size / 0.875, crop size (USB)
CUTOUT_MAX = 0.5            # Cutout square: side up to half the image side (TorchSSL, USB)
CUTOUT_FILL = (125, 123, 114)   # TorchSSL's and USB's Cutout colour
MODES = ('train_l', 'train_u', 'val')
# TorchSSL's normalisation (datasets/ssl_dataset.py), in 0..255 where it writes them so.
CIFAR_MEAN, CIFAR_STD = tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7))
SVHN_MEAN, SVHN_STD = (0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744)
STL_MEAN, STL_STD = tuple(v / 255 for v in (112.4, 109.1, 98.6)), tuple(v / 255 for v in (68.4, 66.6, 68.5))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassificationSpec:
    """How a dataset's images are read and augmented (its classes: dataset/registry.py)."""
    name: str
    size: int                   # training and evaluation image side (the config's crop_size overrides)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool                 # weak views flipped (every dataset, as TorchSSL and USB)
    files: str                  # what data_root must hold, for error messages


SPECS: dict[str, ClassificationSpec] = {s.name: s for s in (
    ClassificationSpec('cifar10', 32, CIFAR_MEAN, CIFAR_STD, True,
                       'cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}'),
    ClassificationSpec('stl10', 96, STL_MEAN, STL_STD, True,
                       'stl10_binary/{train_X,train_y,unlabeled_X,test_X,test_y}.bin'),
    ClassificationSpec('svhn', 32, SVHN_MEAN, SVHN_STD, True, 'train_32x32.mat, extra_32x32.mat, test_32x32.mat'),
    ClassificationSpec('imagenet', 224, IMAGENET_MEAN, IMAGENET_STD, True,
                       'train/<class>/*.JPEG, val/<class>/*.JPEG'),
    ClassificationSpec('toy_cls', 32, CIFAR_MEAN, CIFAR_STD, True,
                       'cifar-10-batches-py/ (generated on first use)'),
    # one's own images (any size: resized to crop_size x crop_size, then CIFAR's weak geometry);
    # ImageNet's statistics, those of the pretrained encoders
    ClassificationSpec('custom_cls', 32, IMAGENET_MEAN, IMAGENET_STD, True,
                       'train/<class>/*, val/<class>/*, optionally unlabeled/*, and splits/<name>/ lists'),
)}


def get_spec(dataset: str) -> ClassificationSpec:
    if dataset not in SPECS:
        raise KeyError(f'unknown classification dataset {dataset!r}; known: {sorted(SPECS)}')
    return SPECS[dataset]


# ---- files -------------------------------------------------------------------------------------

class Images:
    """Images and labels of one split: `labels` int64 (N,) (-1 = no label), `image(i)` -> PIL RGB."""

    def __init__(self, labels: np.ndarray, arrays: np.ndarray | None = None, chw: bool = False,
                 paths: Sequence[str] | None = None):
        self.labels, self.arrays, self.chw, self.paths = labels, arrays, chw, paths

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if self.arrays is None:
            with Image.open(self.paths[i]) as img:
                return img.convert('RGB')
        a = self.arrays[i]
        return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)) if self.chw else a)

    def __add__(self, other: 'Images') -> 'Images':
        """STL-10's train + unlabeled images, SVHN's train + extra (arrays of the same layout)."""
        return Images(np.concatenate((self.labels, other.labels)), np.concatenate((self.arrays, other.arrays)),
                      self.chw)


def _present(cls):
    """`cls` (a torchvision dataset class) taking the files that are there as they are: their md5
    sums are not recomputed on every start (module docstring); a download still checks its archive."""
    def _check_integrity(self) -> bool:
        if hasattr(self, 'split_list'):     # SVHN: one file per split
            return (Path(self.root) / self.filename).is_file()
        folder = Path(self.root) / self.base_folder
        return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)
    attrs = {'_check_integrity': _check_integrity}
    if hasattr(cls, 'meta'):                # CIFAR's batches.meta: present is enough
        attrs['meta'] = {**cls.meta, 'md5': None}
    return type(cls.__name__, (cls,), attrs)


def read_images(dataset: str, root: str | os.PathLike, part: str, download: bool = False) -> Images:
    """`part`: 'train', 'unlabeled' (STL-10's extra images) or 'test'. Errors name the dataset,
    the root and the files it should hold."""
    from torchvision import datasets
    spec, root = get_spec(dataset), Path(root)
    try:
        if dataset in ('cifar10', 'toy_cls'):
            d = _present(datasets.CIFAR10)(str(root), train=part == 'train', download=download)
            return Images(np.asarray(d.targets, np.int64), d.data)
        if dataset == 'stl10':
            d = _present(datasets.STL10)(str(root), split=part, download=download)
            return Images(np.asarray(d.labels, np.int64), d.data, chw=True)
        if dataset == 'svhn':       # training: train + extra (604,388 images), as TorchSSL and USB
            images = [Images(np.asarray(d.labels, np.int64), d.data, chw=True)
                      for d in (_present(datasets.SVHN)(str(root), split=p, download=download)
                                for p in (('train', 'extra') if part == 'train' else (part,)))]
            return images[0] if len(images) == 1 else images[0] + images[1]
        folder = root / ('train' if part == 'train' else 'val')
        if not folder.is_dir():
            raise FileNotFoundError(f'no folder {folder}')
        d = datasets.ImageFolder(str(folder))
        if len(d.classes) != nclass_of(dataset):      # labels are folder ranks: a missing one shifts them
            raise ValueError(f'{len(d.classes)} class folders in {folder}, not {nclass_of(dataset)}')
        return Images(np.asarray(d.targets, np.int64), paths=[p for p, _ in d.samples])
    except Exception as err:      # torchvision's RuntimeError, a broken pickle, a .mat without X ...
        raise DataError(f'{dataset}: cannot read its {part} images from {root} ({type(err).__name__}: {err}); '
                        f'expected {spec.files}{" (download=true fetches them)" if not download and dataset != "imagenet" else ""}') from None


def read_list(root: str | os.PathLike, path: str | os.PathLike, role: str, classes: list[str]) -> Images:
    """The images of one `custom_cls` list (dataset/image_folder.py), with their classes (-1: none)."""
    labels, images = list_labels(path, role, classes)
    return Images(labels, paths=[str(Path(root) / p) for p in images])


def nclass_of(dataset: str) -> int:
    from dataset.registry import get_spec as registry_spec
    return registry_spec(dataset).nclass


def check_images(dataset: str, images: Images, part: str, root: str | os.PathLike) -> None:
    nclass = nclass_of(dataset)
    labels = images.labels[images.labels >= 0]
    if len(images) == 0:
        raise DataError(f'{dataset}: no {part} images under {root}')
    if labels.size and labels.max() >= nclass:
        raise DataError(f'{dataset}: {part} labels under {root} reach {int(labels.max())}, '
                        f'but the dataset has {nclass} classes')


# ---- splits --------------------------------------------------------------------------------------

SPLIT_PATTERN = re.compile(r'^(?:(\d+)_labels_per_class|(\d+(?:\.\d+)?)%|all)$')


def parse_split(split: str) -> tuple[str, float]:
    """'25_labels_per_class' -> ('per_class', 25), '10%' -> ('percent', 10), 'all' -> ('all', 0)."""
    m = SPLIT_PATTERN.match(split)
    if not m or (m.group(1) is not None and int(m.group(1)) < 1) or (
            m.group(2) is not None and not 0 < float(m.group(2)) <= 100):
        raise DataError(f'split {split!r}: expected <N>_labels_per_class (N >= 1), <P>% (0 < P <= 100) or all')
    if m.group(1) is not None:
        return 'per_class', int(m.group(1))
    return ('percent', float(m.group(2))) if m.group(2) is not None else ('all', 0)


def labeled_indices(labels: np.ndarray, nclass: int, split: str, seed: int, dataset: str = '') -> np.ndarray:
    """Indices of the labeled images of `split`, drawn per class by a generator seeded with `seed`;
    sorted. N per class more than a class has is an error naming the class."""
    kind, n = parse_split(split)
    if kind == 'all':
        return np.flatnonzero(labels >= 0)
    rng = np.random.default_rng([seed, 22])     # 22: a stream of its own, apart from the run's others
    chosen = []
    for c in range(nclass):
        members = np.flatnonzero(labels == c)
        k = int(n) if kind == 'per_class' else max(1, math.floor(len(members) * n / 100))
        if k > len(members):
            raise DataError(f'{dataset} split {split!r} asks for {k} labeled images of class {c}, '
                            f'which has only {len(members)} training images')
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


# ---- augmentation ---------------------------------------------------------------------------------

def weak_geometry(img: Image.Image, spec: ClassificationSpec, rng: random.Random) -> Image.Image:
    """Flip (where the spec says) and translate: a random crop of the image padded by PAD_PIXELS;
    ImageNet: a random crop after the short side is resized to size / CROP_RATIO."""
    if spec.name == 'imagenet':
        img = TF.resize(img, math.floor(spec.size / CROP_RATIO))
    else:
        if img.size != (spec.size, spec.size):
            img = img.resize((spec.size, spec.size), Image.BILINEAR)
        img = TF.pad(img, PAD_PIXELS, padding_mode='reflect')
    w, h = img.size
    x, y = rng.randint(0, w - spec.size), rng.randint(0, h - spec.size)
    img = img.crop((x, y, x + spec.size, y + spec.size))
    if spec.hflip and rng.random() < 0.5:
        img = TF.hflip(img)
    return img


def cutout(img: Image.Image, rng: random.Random) -> Image.Image:
    """A square of CUTOUT_FILL, side U(0, CUTOUT_MAX) x the image side, at a uniform centre (clipped)."""
    w, h = img.size
    side = rng.uniform(0, CUTOUT_MAX) * min(w, h)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    box = tuple(int(round(v)) for v in (max(0, cx - side / 2), max(0, cy - side / 2),
                                          min(w, cx + side / 2), min(h, cy + side / 2)))
    img = img.copy()
    if box[2] > box[0] and box[3] > box[1]:
        img.paste(CUTOUT_FILL, box)
    return img


def strong_view(img: Image.Image, spec: ClassificationSpec, rng: random.Random) -> Image.Image:
    """TorchSSL's strong view: its RandAugment(3, 5) and Cutout on the image, then the weak view's
    geometry (TorchSSL inserts RandAugment before the flip and crop of its weak transform)."""
    return weak_geometry(cutout(rand_augment(img, rng), rng), spec, rng)


def eval_view(img: Image.Image, spec: ClassificationSpec) -> Image.Image:
    if spec.name == 'imagenet':
        return TF.center_crop(TF.resize(img, math.floor(spec.size / CROP_RATIO)), spec.size)
    return img if img.size == (spec.size, spec.size) else img.resize((spec.size, spec.size), Image.BILINEAR)


# ---- the dataset ----------------------------------------------------------------------------------------

class ClassificationDataset(Dataset):
    """Samples of `images` at `indices` in one of MODES (module docstring). `nsample` repeats the
    index list to exactly that length (an epoch of a fixed number of iterations)."""

    def __init__(self, spec: ClassificationSpec, images: Images, indices: Sequence[int], mode: str,
                 nsample: int | None = None, num_strong: int = 2):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.spec, self.images, self.mode, self.num_strong = spec, images, mode, num_strong
        self.indices = np.asarray(indices, dtype=np.int64)
        if nsample is not None:
            self.indices = np.resize(self.indices, nsample)    # repeated, then cut to nsample
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, rng = (key.index, random.Random(key.seed)) if isinstance(key, SampleKey) else (key, random)
        i = int(self.indices[index])
        img, label = self.images.image(i), int(self.images.labels[i])
        if self.mode == 'val':
            return {'image': self.normalize(eval_view(img, self.spec)), 'label': label}
        weak = self.normalize(weak_geometry(img, self.spec, rng))
        if self.mode == 'train_l':
            return {'image': weak, 'mask': torch.full((1, 1), label, dtype=torch.int64)}
        strong = [self.normalize(strong_view(img, self.spec, rng)) for _ in range(self.num_strong)]
        return {'image': weak, 'strong': torch.stack(strong),
                'boxes': torch.zeros(self.num_strong, 1, 1, dtype=torch.bool),
                'valid': torch.ones(1, 1, dtype=torch.bool)}


@dataclass
class ClassificationData:
    """What a run reads: the spec, the training images, the labeled indices, the test images."""
    spec: ClassificationSpec
    train: Images
    labeled: np.ndarray
    unlabeled: Images             # the whole training set (+ STL-10's unlabeled images)
    test: Images


def load_classification(dataset: str, root: str | os.PathLike, split: str, seed: int,
                        download: bool = False, semi: bool = True) -> ClassificationData:
    """Read and check everything a run needs, before anything is written (errors: DataError)."""
    spec = get_spec(dataset)
    parse_split(split)
    if dataset == 'toy_cls':
        from dataset.toy_cls import ensure_toy_cls
        ensure_toy_cls(root)
    train = read_images(dataset, root, 'train', download)
    check_images(dataset, train, 'train', root)
    labeled = labeled_indices(train.labels, nclass_of(dataset), split, seed, dataset)
    unlabeled = train
    if semi and dataset == 'stl10':
        unlabeled = train + read_images(dataset, root, 'unlabeled', download)
    test = read_images(dataset, root, 'test', download)
    check_images(dataset, test, 'test', root)
    return ClassificationData(spec, train, labeled, unlabeled, test)
