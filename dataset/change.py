"""Change-detection pairs in the original's layout: `<root>/A/<id>`, `<root>/B/<id>` (the two dates,
co-registered, same size) and `<root>/label/<id>` (0 unchanged, 255 changed; 0/1 is read too). A
split file lists one tile id a line (`splits/levir/5%/labeled.txt`: `train_369_10.png`).

A sample's `image` is the pair as one 6-channel tensor `[A; B]`, so the training step, CutMix, the
EMA teacher and the losses take it as any image (model/change_dpt.py splits it again). The
original's augmentations: one long-side rescale in [0.8, 1.2], one crop and one flip shared by A, B
and label (bilinear images, nearest label); each strong view gets colour jitter and blur drawn
independently for A and for B (no grayscale) and one CutMix box, which covers A and B alike.
Samples asked for by `SampleKey` draw every augmentation from their own seeded generator, as
`dataset/semi.py` (resume stays exact).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.checks import Problem
from dataset.semi import CUTMIX_P, UNLABELED_PAD, SampleKey, SplitDataset
from dataset.splits import Sample, SplitError, read_split
from dataset.transforms import crop_box, cutmix_box, normalize, pad_to, rescaled_size, strong_color
from util.labels import IGNORE_INDEX

FOLDERS = ('A', 'B', 'label')      # first date, second date, change mask
RESIZE_RATIO = (0.8, 1.2)          # the original's rescale range for change detection
CHANGED = 255                      # a changed pixel in the label files (1 is read as changed too)
LABEL_VALUES = ({0, 255}, {0, 1})  # a label holds values of one of these sets


def label_to_classes(arr: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """0/255 (or 0/1) change mask -> uint8 0/1; any other value is an error naming the file."""
    values = set(np.unique(arr).tolist())
    if not any(values <= allowed for allowed in LABEL_VALUES):
        bad = sorted(values - {0, 1, 255})[:10] or sorted(values)
        raise ValueError(f'{path}: change label has values {bad}; expected 0 (unchanged) and 255 or 1 (changed)')
    return (arr > 0).astype(np.uint8)


def load_label(path: str | os.PathLike) -> np.ndarray:
    """A single-channel change mask as uint8 0/1 [H, W]."""
    with Image.open(path) as img:
        if img.mode not in ('L', 'P', '1'):
            raise ValueError(f'{path}: change label must be single-channel (L, P or 1), got mode {img.mode}')
        arr = np.asarray(img.convert('L') if img.mode == '1' else img)
    return label_to_classes(arr, path)


class ChangeDataset(SplitDataset):
    """Pairs of one split file under `root`.

    mode 'train_l': {'image': float [6, S, S] ([A; B]), 'mask': int64 [S, S] (0/1, IGNORE_INDEX on padding)}
    mode 'train_u': {'image': weak pair [6, S, S], 'strong': [V, 6, S, S], 'boxes': bool [V, S, S]
                     (one CutMix box per strong view, for A and B), 'valid': bool [S, S]}
    mode 'val':     {'image': [6, H, W] full resolution, 'mask': int64 [H, W] 0/1, 'name': tile stem}
    `nsample` repeats the list to exactly that many entries (`SplitDataset`).
    """

    def _load(self, sample: Sample) -> tuple[Image.Image, Image.Image, Image.Image]:
        """A, B and the label (0/1 'L'; for unlabeled pairs a zero canvas that tracks padding)."""
        where = f'{self.split_file}:{sample.line}'
        pair = []
        for folder in FOLDERS[:2]:
            path = self.root / folder / sample.image
            try:
                with Image.open(path) as img:
                    pair.append(img.convert('RGB'))
            except (OSError, ValueError) as err:
                raise ValueError(f'{where}: {path} cannot be read: {err}') from None
        a, b = pair
        if a.size != b.size:
            raise ValueError(f'{where}: A/{sample.image} is {a.size} but B/{sample.image} is {b.size} (width, height)')
        if self.mode == 'train_u':
            return a, b, Image.new('L', a.size, 0)
        try:
            label = Image.fromarray(load_label(self.root / 'label' / sample.image))
        except (OSError, ValueError) as err:
            raise ValueError(f'{where}: {err}') from None
        if label.size != a.size:
            raise ValueError(f'{where}: label/{sample.image} is {label.size} but A and B are {a.size}')
        return a, b, label

    def __getitem__(self, key: int | SampleKey) -> dict[str, torch.Tensor | str]:
        index, rng = (key.index, random.Random(key.seed)) if isinstance(key, SampleKey) else (key, random)
        sample = self.samples[index]
        a, b, label = self._load(sample)
        if self.mode == 'val':
            return {'image': pair_tensor(a, b), 'mask': torch.from_numpy(np.asarray(label, dtype=np.int64).copy()),
                    'name': Path(sample.image).stem}

        a, b, label = aligned_geometry(a, b, label, self.crop_size,
                                       UNLABELED_PAD if self.mode == 'train_u' else IGNORE_INDEX, rng)
        if self.mode == 'train_l':
            return {'image': pair_tensor(a, b), 'mask': torch.from_numpy(np.asarray(label, dtype=np.int64).copy())}
        strong, boxes = [], []
        for _ in range(self.num_strong):
            strong.append(pair_tensor(strong_color(a, rng, grayscale=False), strong_color(b, rng, grayscale=False)))
            boxes.append(cutmix_box(self.crop_size, p=CUTMIX_P, rng=rng))
        return {'image': pair_tensor(a, b), 'strong': torch.stack(strong), 'boxes': torch.stack(boxes),
                'valid': torch.from_numpy(np.asarray(label) != UNLABELED_PAD)}


def pair_tensor(a: Image.Image, b: Image.Image) -> torch.Tensor:
    """Two RGB images -> float [6, H, W], each normalised with the ImageNet mean/std."""
    return torch.cat((normalize(a), normalize(b)))


def aligned_geometry(a: Image.Image, b: Image.Image, label: Image.Image, crop: int, label_fill: int,
                     rng) -> tuple[Image.Image, Image.Image, Image.Image]:
    """One rescale, one pad-and-crop and one flip, drawn once and applied to A, B and label
    (bilinear images, nearest label; padding 0 in the images and `label_fill` in the label)."""
    size = rescaled_size(a.size, RESIZE_RATIO, rng)
    a, b, label = a.resize(size, Image.BILINEAR), b.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
    a, b, label = pad_to(a, crop), pad_to(b, crop), pad_to(label, crop, label_fill)
    box = crop_box(a.size, crop, rng)
    a, b, label = a.crop(box), b.crop(box), label.crop(box)
    if rng.random() < 0.5:
        a, b, label = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (a, b, label))
    return a, b, label


# ---- checks before anything is written ----------------------------------------------------------

def check_pairs(root: str | os.PathLike, split: str | os.PathLike, role: str, full: bool = False) -> list[Problem]:
    """Problems of one change-detection split file: each id exists in A, B (and label, except for
    unlabeled lists), no id twice; `full` also opens every file: A and B readable and of one size,
    the label single-channel 0/255 (or 0/1) of that size. Each problem names the file and line."""
    root, split = Path(root), Path(split)
    if not split.is_file():
        return [Problem('error', str(split), f'{role} split file does not exist')]
    try:
        samples = read_split(split)
    except SplitError as err:
        return [Problem('error', str(split), str(err).removeprefix(f'{split}: '))]
    folders = FOLDERS[:2] if role == 'unlabeled' else FOLDERS
    problems, seen = [], {}
    for s in samples:
        where = f'{split}:{s.line}'
        if s.mask is not None:
            problems.append(Problem('error', where, f'expected one tile id a line, got {s.image} {s.mask}'))
        if s.image in seen:
            problems.append(Problem('error', where, f'{s.image} is listed twice (first on line {seen[s.image]})'))
        seen.setdefault(s.image, s.line)
        for folder in folders:
            if not (root / folder / s.image).is_file():
                problems.append(Problem('error', where, f'{s.image} is missing in {folder}/: no file {root / folder / s.image}'))
    if full and not problems:
        for s in samples:
            problems += _check_pair_files(root, f'{split}:{s.line}', s.image, folders)
    return problems


def _check_pair_files(root: Path, where: str, name: str, folders: tuple[str, ...]) -> list[Problem]:
    sizes, out = {}, []
    for folder in folders:
        path = root / folder / name
        try:
            if folder == 'label':
                with Image.open(path) as img:
                    sizes[folder] = img.size
                load_label(path)
            else:
                with Image.open(path) as img:
                    img.load()
                    sizes[folder] = img.size
        except ValueError as err:
            out.append(Problem('error', where, str(err)))
        except Exception as err:   # PIL raises many types for corrupt files
            out.append(Problem('error', where, f'{path} cannot be read: {err}'))
    if len(set(sizes.values())) > 1:
        out.append(Problem('error', where, f'{name}: sizes differ: '
                                           + ', '.join(f'{k} {w}x{h}' for k, (w, h) in sizes.items())))
    return out


def check_change_inputs(root: str | os.PathLike, splits: dict[str, str | os.PathLike], full: bool = False,
                        roots: dict[str, str | os.PathLike] | None = None) -> list[Problem]:
    """Problems of every split (role -> file); a role's tiles live under `roots[role]` when given."""
    roots = roots or {}
    return [p for role, path in splits.items() for p in check_pairs(roots.get(role, root), path, role, full)]
