"""Classification on one's own images (`dataset: custom_cls`): an image-folder layout with any
number of classes, its split lists and their checks.

    <data_root>/train/<class>/...   training images, one folder per class (sub-folders allowed)
    <data_root>/val/<class>/...     evaluation images, folders named as train's (a subset of them)
    <data_root>/unlabeled/...       optional: images without a class (any names, sub-folders allowed)

torchvision's ImageFolder conventions (`find_classes`, `make_dataset`): the classes are the sorted
names of train/'s sub-folders and class k is the k-th of them; an image is a file ending in one of
torchvision's `IMG_EXTENSIONS` (any case); other files are not images and are left out.

Split lists (tools/make_classification_split.py), one image a line, relative to data_root, under
`splits/<name>/`:
    val.txt                       every image of val/
    <split>/labeled.txt           N images of every class of train/, drawn by a seeded generator
    <split>/unlabeled.txt         every image of train/ (the labeled ones included, as USB and the
                                  built-in classification datasets) and every image of unlabeled/
A line's class is its folder: `train/<class>/...` and `val/<class>/...`; `unlabeled/...` lines
have none (-1). Every error names the folder, the class or the list file and line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from dataset.checks import DataError, Problem, check_split
from dataset.splits import read_split, write_lines_atomic

TRAIN, VAL, UNLABELED = 'train', 'val', 'unlabeled'     # the layout's folders under data_root
LABELED_STREAM = 31     # the labeled draw's generator: np.random.default_rng([seed, 31]), a stream of its own


@dataclass(frozen=True)
class Layout:
    """What the folders hold: the class names (sorted) and, relative to the root, the images of
    train/ and val/ by class index and of unlabeled/."""
    root: Path
    classes: list[str]
    train: list[list[str]]
    val: list[list[str]]
    unlabeled: list[str]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def _class_images(root: Path, folder: str, classes: list[str], names: list[str]) -> list[list[str]]:
    """Images of the class folders `names` under root/folder (torchvision's make_dataset walk), by
    index in `classes` (empty for a class without a folder); an empty class folder is an error."""
    found = make_dataset(root / folder, {c: classes.index(c) for c in names}, extensions=IMG_EXTENSIONS,
                         allow_empty=True)
    by_class: list[list[str]] = [[] for _ in classes]
    for path, k in found:
        by_class[k].append(Path(path).relative_to(root).as_posix())
    for name in names:
        if not by_class[classes.index(name)]:
            raise DataError(f'{root / folder / name}: empty class folder (no {"/".join(IMG_EXTENSIONS)} '
                            'file); remove it or add images')
    return by_class


def classes_of(root: str | os.PathLike) -> list[str]:
    """The class names: train/'s sub-folders, sorted (torchvision's `find_classes`)."""
    folder = Path(root) / TRAIN
    if not folder.is_dir():
        raise DataError(f'{folder}: no such folder; a custom_cls data_root holds train/<class>/..., '
                        'val/<class>/... and optionally unlabeled/ (docs/custom_classification.md)')
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        raise DataError(f'{folder}: no class folders in it (expected train/<class>/<image>)') from None
    if len(classes) < 2:
        raise DataError(f'{folder}: {len(classes)} class folder ({classes[0]}); classification needs at least 2')
    return classes


def scan(root: str | os.PathLike, unlabeled: str | None = UNLABELED) -> Layout:
    """Read the layout (no image opened). Errors: no train/ or val/, fewer than two classes, an
    empty class folder, a val class that train/ has not, an empty unlabeled folder."""
    root = Path(root)
    classes = classes_of(root)
    train = _class_images(root, TRAIN, classes, classes)
    if not (root / VAL).is_dir():
        raise DataError(f'{root / VAL}: no such folder; the evaluation images go in val/<class>/...')
    val_classes = sorted(e.name for e in os.scandir(root / VAL) if e.is_dir())
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        raise DataError(f'{root / VAL / unknown[0]}: class {unknown[0]!r} is not a class of {root / TRAIN} '
                        f'({", ".join(classes)})')
    if not val_classes:
        raise DataError(f'{root / VAL}: no class folders in it (expected val/<class>/<image>)')
    val = _class_images(root, VAL, classes, val_classes)
    extra: list[str] = []
    if unlabeled:
        if Path(unlabeled).is_absolute() or '..' in Path(unlabeled).parts:
            raise DataError(f'unlabeled folder {unlabeled!r} must be a folder under {root}, relative to it')
        folder = root / unlabeled
        if folder.is_dir():
            extra = sorted(p.relative_to(root).as_posix() for p in folder.rglob('*')
                           if p.is_file() and _is_image(p.name))
            if not extra:
                raise DataError(f'{folder}: no images in it ({"/".join(IMG_EXTENSIONS)}); remove it or add images')
        elif unlabeled != UNLABELED:
            raise DataError(f'{folder}: no such folder (--unlabeled)')
    return Layout(root, classes, train, val, extra)


# ---- splits ----------------------------------------------------------------------------------------

def default_split_name(labels_per_class: int) -> str:
    """The classification recipe's split names (docs/classification.md): `<N>_labels_per_class`."""
    return f'{labels_per_class}_labels_per_class'


def draw_labeled(layout: Layout, labels_per_class: int, seed: int) -> list[str]:
    """`labels_per_class` images of every class of train/, drawn per class by a generator seeded
    with `seed` (the same seed: nested sets across N). A class with fewer images is an error naming it."""
    if labels_per_class < 1:
        raise DataError(f'labels per class must be >= 1, got {labels_per_class}')
    rng = np.random.default_rng([seed, LABELED_STREAM])
    chosen = []
    for name, images in zip(layout.classes, layout.train):
        if len(images) < labels_per_class:
            raise DataError(f'{layout.root / TRAIN / name}: class {name!r} has {len(images)} images, fewer than '
                            f'the {labels_per_class} labels per class asked for')
        chosen += [images[i] for i in sorted(rng.permutation(len(images))[:labels_per_class])]
    return chosen


def split_lists(layout: Layout, labels_per_class: int, seed: int) -> dict[str, list[str]]:
    """The lines of val.txt, labeled.txt and unlabeled.txt (module docstring)."""
    return {'val': [p for images in layout.val for p in images],
            'labeled': draw_labeled(layout, labels_per_class, seed),
            'unlabeled': [p for images in layout.train for p in images] + layout.unlabeled}


def make_classification_split(root: str | os.PathLike, name: str, labels_per_class: int, seed: int = 0,
                              split: str | None = None, splits_root: str | os.PathLike = 'splits',
                              unlabeled: str | None = UNLABELED, force: bool = False) -> dict[str, Path]:
    """Write `splits_root/name/val.txt` and `splits_root/name/<split>/{labeled,unlabeled}.txt`
    (default split name `<N>_labels_per_class`). An existing val.txt with the same lines is kept
    (several splits of one dataset share it); other existing files are an error unless `force`.
    Returns the paths by role."""
    lists = split_lists(scan(root, unlabeled), labels_per_class, seed)
    out = Path(splits_root) / name
    split = split or default_split_name(labels_per_class)
    paths = {'val': out / 'val.txt', 'labeled': out / split / 'labeled.txt',
             'unlabeled': out / split / 'unlabeled.txt'}
    same_val = paths['val'].is_file() and paths['val'].read_text().split() == lists['val']
    existing = [str(p) for role, p in paths.items() if p.exists() and not (role == 'val' and same_val)]
    if existing and not force:
        raise FileExistsError(f'split files exist: {", ".join(existing)}')
    for role, path in paths.items():
        if not (role == 'val' and same_val):
            write_lines_atomic(path, lists[role])
    return paths


# ---- reading the lists for a run ----------------------------------------------------------------------

def list_labels(path: str | os.PathLike, role: str, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """(labels int64, image paths relative to the root) of one list: a `train/<class>/` or
    `val/<class>/` line has that class's index, an `unlabeled/` line (unlabeled lists only) -1.
    A line of another folder or class is an error naming the file and line."""
    folder = VAL if role == 'val' else TRAIN
    labels, images = [], []
    for s in read_split(path):
        parts = Path(s.image).parts
        if parts[0] == folder and len(parts) >= 3:
            if parts[1] not in classes:
                raise DataError(f'{path}:{s.line}: {s.image}: class {parts[1]!r} is not a class of '
                                f'{TRAIN}/ ({", ".join(classes)})')
            labels.append(classes.index(parts[1]))
        elif role == 'unlabeled' and parts[0] not in (TRAIN, VAL):
            labels.append(-1)
        else:
            also = ' or an image of an unlabeled folder' if role == 'unlabeled' else ''
            raise DataError(f'{path}:{s.line}: {s.image}: a {role} line must name {folder}/<class>/<image>{also}')
        images.append(s.image)
    return np.asarray(labels, np.int64), images


def check_list(root: str | os.PathLike, path: str | os.PathLike, role: str, classes: list[str],
               full: bool = False) -> list[Problem]:
    """Problems of one list: the split file's (dataset/checks.py: empty, a line twice, a missing
    file; the headers of a sample of its images, every image decoded when `full`) and its classes."""
    problems, _ = check_split(root, path, role, len(classes), full=full, masks=False)
    if any(p.level == 'error' for p in problems):
        return problems
    try:
        list_labels(path, role, classes)
    except DataError as err:
        where, _, message = str(err).partition(': ')
        problems.append(Problem('error', where, message))
    return problems


def check_classes(root: str | os.PathLike, nclass: int, names: list[str] | None) -> list[str]:
    """The class names of the folders, which the config's `nclass` (and `class_names`, if given)
    must match: labels are the ranks of the sorted folder names."""
    classes = classes_of(root)
    if nclass != len(classes):
        raise DataError(f'{Path(root) / TRAIN}: {len(classes)} class folders ({", ".join(classes)}), but the '
                        f'config says nclass: {nclass}')
    if names is not None and list(names) != classes:
        raise DataError(f'{Path(root) / TRAIN}: class folders {classes} (sorted), but the config says '
                        f'class_names: {list(names)}; class k is the k-th folder name')
    return classes
