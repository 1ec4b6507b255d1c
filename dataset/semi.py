"""The semi-supervised segmentation dataset: labeled crops, unlabeled weak/strong crops, and
full-resolution validation images, read from a split file in the original on-disk layouts.

Training samples are asked for by `SampleKey` (index, seed): each sample's augmentations (rescale,
crop, flip, colours, blur, CutMix boxes) draw from a generator seeded with its own seed, which the
training samplers derive from (seed, epoch, position in the epoch). A sample is then the same
whichever worker or process draws it, with any number of workers, and after a resume. A plain
index draws from the global `random` generator instead (see dataset/transforms.py).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.splits import EXPECTED_IMAGES, Sample, derive_labeled_all, derive_unlabeled, list_images, read_split
from dataset.transforms import cutmix_box, hflip, normalize, pad_and_crop, resize, strong_color
from util.labels import IGNORE_INDEX

# Mask value marking padding in unlabeled crops: no real label, so padded pixels can be told from
# image pixels after the geometric augmentation and dropped from the unlabeled loss.
UNLABELED_PAD = 254
RESIZE_RATIO = (0.5, 2.0)  # random rescale range of the long side
CUTMIX_P = 0.5  # probability that a strong view gets a CutMix box
MODES = ('train_l', 'train_u', 'val')


@dataclass(frozen=True)
class SampleKey:
    """A training sample and the seed of its augmentations (module docstring)."""
    index: int
    seed: int


def load_mask(path: str | os.PathLike, nclass: int | None = None) -> np.ndarray:
    """A single-channel mask as uint8 [H, W] (palette PNGs give their indices). With `nclass`,
    values outside [0, nclass) and IGNORE_INDEX are an error naming the file."""
    with Image.open(path) as mask:
        arr = np.array(mask)
    if arr.ndim != 2:
        raise ValueError(f'{path}: mask must be single-channel, got array of shape {arr.shape}')
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f'{path}: mask values must lie in [0, 255], got '
                             f'[{arr.min()}, {arr.max()}]')
        arr = arr.astype(np.uint8)
    if nclass is not None and arr.size and arr.max() >= nclass:
        counts = np.bincount(arr.ravel(), minlength=256)
        bad = np.flatnonzero(counts[nclass:IGNORE_INDEX]) + nclass
        if bad.size:
            raise ValueError(f'{path}: mask values {bad.tolist()} are outside [0, {nclass}) and '
                             f'{IGNORE_INDEX} (ignore)')
    return arr


class SplitDataset(Dataset):
    """The samples of one split file under `root` in one of MODES; `nsample` repeats the list and
    truncates it to exactly `nsample` entries, as the original does to match the labeled list to the
    unlabeled one (a longer list is cut short). Subclasses say what a sample is."""

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, mode: str,
                 crop_size: int, nsample: int | None = None, num_strong: int = 2):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if num_strong < 1:
            raise ValueError(f'num_strong must be >= 1, got {num_strong}')
        self.root = Path(root)
        self.split_file = Path(split_file)
        self.mode = mode
        self.crop_size = crop_size
        self.num_strong = num_strong
        self.samples: list[Sample] = read_split(split_file)
        if nsample is not None:
            if mode == 'val':
                raise ValueError('nsample does not apply to the val mode')
            self.samples = (self.samples * math.ceil(nsample / len(self.samples)))[:nsample]

    def __len__(self) -> int:
        return len(self.samples)


class SemiDataset(SplitDataset):
    """Samples of one split file under `root`.

    mode 'train_l': {'image': float [3, S, S], 'mask': int64 [S, S] (IGNORE_INDEX on padding)}
    mode 'train_u': {'image': weak view float [3, S, S],
                     'strong': float [V, 3, S, S] (V = num_strong photometric views of the same
                               crop as the weak view),
                     'boxes': bool [V, S, S] (one CutMix box per strong view, maybe empty),
                     'valid': bool [S, S] (False on padding)}
    mode 'val':     {'image': float [3, H, W] full resolution, 'mask': int64 [H, W],
                     'name': image file stem}
    `nsample`: as `SplitDataset`.
    """

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, mode: str,
                 crop_size: int, nsample: int | None = None, num_strong: int = 2,
                 nclass: int | None = None):
        super().__init__(root, split_file, mode, crop_size, nsample, num_strong)
        self.nclass = nclass

    def image_path(self, index: int) -> Path:
        return self.root / self.samples[index].image

    def _where(self, sample: Sample) -> str:
        return f'{self.split_file}:{sample.line}'

    def _load(self, sample: Sample) -> tuple[Image.Image, Image.Image]:
        with Image.open(self.root / sample.image) as img:
            img = img.convert('RGB')
        if self.mode == 'train_u':
            # The unlabeled mask is never used for training; a zero canvas tracks where padding
            # lands through the geometric augmentation (and cannot collide with UNLABELED_PAD).
            return img, Image.new('L', img.size, 0)
        if sample.mask is None:
            raise ValueError(f'{self._where(sample)}: {self.mode} sample {sample.image} has no '
                             f'mask')
        mask = Image.fromarray(load_mask(self.root / sample.mask, self.nclass))
        if mask.size != img.size:
            raise ValueError(f'{self._where(sample)}: mask {sample.mask} is {mask.size}, image '
                             f'{sample.image} is {img.size} (width, height)')
        return img, mask

    def __getitem__(self, key: int | SampleKey) -> dict[str, torch.Tensor | str]:
        index, rng = (key.index, random.Random(key.seed)) if isinstance(key, SampleKey) else (key, random)
        sample = self.samples[index]
        img, mask = self._load(sample)
        if self.mode == 'val':
            img, mask = normalize(img, mask)
            return {'image': img, 'mask': mask, 'name': Path(sample.image).stem}

        pad_value = UNLABELED_PAD if self.mode == 'train_u' else IGNORE_INDEX
        img, mask = resize(img, mask, RESIZE_RATIO, rng=rng)
        img, mask = pad_and_crop(img, mask, self.crop_size, mask_fill=pad_value, rng=rng)
        img, mask = hflip(img, mask, p=0.5, rng=rng)
        if self.mode == 'train_l':
            img, mask = normalize(img, mask)
            return {'image': img, 'mask': mask}

        strong, boxes = [], []
        for _ in range(self.num_strong):
            strong.append(normalize(strong_color(img, rng=rng)))
            boxes.append(cutmix_box(self.crop_size, p=CUTMIX_P, rng=rng))
        return {
            'image': normalize(img),
            'strong': torch.stack(strong),
            'boxes': torch.stack(boxes),
            'valid': torch.from_numpy(np.asarray(mask) != UNLABELED_PAD),
        }


@dataclass(frozen=True)
class SplitPaths:
    labeled: Path
    unlabeled: Path
    val: Path


def coco_root(data_root: str | os.PathLike | None) -> str | os.PathLike:
    if data_root is None:
        raise ValueError('COCO lists are derived from data_root/train2017; pass data_root')
    return data_root


def listed_paths(dataset: str, split: str, splits_root: str | os.PathLike = 'splits',
                 name: str | None = None) -> SplitPaths:
    """Where `split_paths` finds the lists of `dataset`/`split` under `splits_root`/`name` (default:
    `dataset`), whether or not they exist yet: labeled `<split>/labeled.txt` (or `train.txt`,
    Cityscapes 'all'), unlabeled `<split>/unlabeled.txt` (an 'all' split without one: the labeled
    list), val `val.txt`."""
    base = Path(splits_root) / (name or dataset)
    split_dir = base / split
    labeled = split_dir / 'labeled.txt'
    if not labeled.exists() and (split_dir / 'train.txt').exists():
        labeled = split_dir / 'train.txt'
    unlabeled = split_dir / 'unlabeled.txt'
    if not unlabeled.exists() and split == 'all':
        unlabeled = labeled
    return SplitPaths(labeled, unlabeled, base / 'val.txt')


def split_paths(dataset: str, split: str, splits_root: str | os.PathLike = 'splits',
                data_root: str | os.PathLike | None = None, name: str | None = None) -> SplitPaths:
    """The split files of `dataset`/`split` under `splits_root`/`name` (`listed_paths`). For COCO,
    the unlabeled list is derived from `data_root/train2017` and cached there on first use (and so
    is COCO's 'all' labeled list: every train2017 image)."""
    paths = listed_paths(dataset, split, splits_root, name)
    if not paths.labeled.exists() and dataset == 'coco' and split == 'all':
        derive_labeled_all(coco_root(data_root), paths.labeled)
    if not paths.labeled.exists():
        raise FileNotFoundError(f'no labeled list for {name or dataset}/{split}: {paths.labeled} is missing')
    if not paths.unlabeled.exists():
        if dataset == 'coco':
            derive_unlabeled(coco_root(data_root), paths.labeled, paths.unlabeled)
        else:
            raise FileNotFoundError(f'no unlabeled list for {name or dataset}/{split}: {paths.unlabeled} is missing')
    return paths


def split_sizes(dataset: str, split: str, splits_root: str | os.PathLike = 'splits',
                data_root: str | os.PathLike | None = None, name: str | None = None) -> dict[str, int | str]:
    """Samples in the labeled, unlabeled and val lists of `split` (`listed_paths`), counted without
    opening an image or writing a list; a string says why a count is not known. A COCO list not
    derived yet counts the images of `data_root/train2017` (less the labeled ones), or the
    release's count of them when the folder is absent ('note' says which)."""
    paths = listed_paths(dataset, split, splits_root, name)
    sizes: dict[str, int | str] = {role: len(read_split(path)) if path.exists() else f'{path} is missing'
                                   for role, path in vars(paths).items()}
    if dataset == 'coco' and (not paths.labeled.exists() or not paths.unlabeled.exists()):
        folder = Path(coco_root(data_root)) / 'train2017'
        found = folder.is_dir()
        images = len(list_images(folder)) if found else EXPECTED_IMAGES['train2017']
        if not paths.labeled.exists() and split == 'all':
            sizes['labeled'] = images
        if not paths.unlabeled.exists() and isinstance(sizes['labeled'], int):
            sizes['unlabeled'] = images - sizes['labeled'] if split != 'all' else images
        sizes['note'] = (f'lists derived from the {images} images of {folder}' if found else
                         f'lists derived from train2017 ({images} images in the release; {folder} is absent)')
    return sizes


def build_semi_datasets(dataset: str, data_root: str | os.PathLike, split: str, crop_size: int,
                        nclass: int | None = None, splits_root: str | os.PathLike = 'splits',
                        num_strong: int = 2) -> tuple[SemiDataset, SemiDataset, SemiDataset]:
    """(unlabeled, labeled, val) datasets; the labeled list is repeated to the unlabeled length
    so that an epoch is one pass over the unlabeled set."""
    paths = split_paths(dataset, split, splits_root, data_root)
    trainset_u = SemiDataset(data_root, paths.unlabeled, 'train_u', crop_size,
                             num_strong=num_strong, nclass=nclass)
    trainset_l = SemiDataset(data_root, paths.labeled, 'train_l', crop_size,
                             nsample=len(trainset_u), nclass=nclass)
    valset = SemiDataset(data_root, paths.val, 'val', crop_size, nclass=nclass)
    return trainset_u, trainset_l, valset
