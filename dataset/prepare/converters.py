"""One converter per dataset: from the files its publisher distributes to the layout the split
lists name (docs/data.md). Each returns the jobs of `core.run_jobs`; the skeleton does
the writing, resuming and checking.

Conventions (mask values are class ids; 255 = ignore):
- pascal: VOC2012 trainval + SBD (`benchmark.tgz`). A mask for every image with a VOC
  `SegmentationClass/*.png` (palette indices, 255 on VOC's object borders) or an SBD
  `cls/*.mat` (`GTcls.Segmentation`, 0..20, no borders); VOC's wins where both exist, as in the
  augmented set the original links (SegmentationClassAug). Masks are written as VOC-palette PNGs.
- cityscapes: `*_gtFine_labelIds.png` -> `*_gtFine_labelTrainIds.png` with the 19 trainIds of
  the official label table, 255 for every other id; train, val and (if given) train_extra images.
- ade20k: ADEChallengeData2016 annotations, 0 ("other") -> 255 and 1..150 -> 0..149.
- coco: 81 classes, 0 = background and 1..80 = the 80 categories in increasing category id
  (`dataset.registry.COCO_CLASSES`, checked against the annotation file's names). Every instance
  of `instances_<split>2017.json`, crowd regions included, is painted with its class, largest
  first, so a smaller object lying on a larger one stays visible. Each instance's region is the
  one pycocotools' `COCO.annToMask` gives (polygons rasterised by `frPyObjects`, parts merged, RLE
  of both encodings decoded by `decode`), as every COCO mask set of the field and the original's;
  polygon parts of fewer than three points cover no pixel there and are skipped.
- levir / whu: the original's published `LEVIR-CD.zip` / `WHU-CD.zip` (256 x 256 tiles in `A/`,
  `B/`, `label/`, labels 0 / 255), copied as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dataset.checks import Problem
from dataset.prepare.core import (Job, PrepareError, copy_file, find_dir, lookup_mask, read_mask,
                                  save_mask)
from dataset.registry import COCO_CLASSES, voc_palette
from util.labels import IGNORE_INDEX

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def copies(src_dir: Path, out_dir: str, pattern: str = '*') -> list[Job]:
    """A copy job for every file matching `pattern` under `src_dir`, same relative path."""
    return [Job(f'{out_dir}/{p.relative_to(src_dir).as_posix()}', p, copy_file)
            for p in sorted(src_dir.rglob(pattern)) if p.is_file() and not p.name.startswith('.')]


# ---- pascal ------------------------------------------------------------------------------------------

def read_sbd_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat   # MATLAB v5 reader; data only, nothing in the file runs
    try:
        return np.asarray(loadmat(path)['GTcls']['Segmentation'][0, 0], dtype=np.uint8)
    except (KeyError, IndexError, ValueError) as err:
        raise PrepareError(f'no GTcls.Segmentation in the .mat file ({err})') from None


def pascal_mask_from_voc(src: Path, tmp: Path) -> None:
    save_mask(read_mask(src), tmp, voc_palette())


def pascal_mask_from_sbd(src: Path, tmp: Path) -> None:
    save_mask(read_sbd_mat(src), tmp, voc_palette())


def pascal(roots: Sequence[Path]) -> list[Job]:
    voc = find_dir(roots, 'VOC2012', ['JPEGImages', 'SegmentationClass'], 'VOC2012 trainval (VOCtrainval_11-May-2012.tar)')
    sbd = find_dir(roots, 'dataset', ['cls', 'img'], 'SBD (benchmark.tgz, benchmark_RELEASE/dataset)')
    masks = {p.stem: (p, pascal_mask_from_sbd) for p in sorted((sbd / 'cls').glob('*.mat'))}
    masks.update({p.stem: (p, pascal_mask_from_voc) for p in sorted((voc / 'SegmentationClass').glob('*.png'))})
    jobs = []
    for stem, (src, write) in sorted(masks.items()):
        image = voc / 'JPEGImages' / f'{stem}.jpg'
        image = image if image.is_file() else sbd / 'img' / f'{stem}.jpg'
        jobs.append(Job(f'JPEGImages/{stem}.jpg', image, copy_file))
        jobs.append(Job(f'SegmentationClass/{stem}.png', src, write))
    return jobs


# ---- cityscapes ----------------------------------------------------------------------------------

# labelId -> trainId for the 19 evaluated classes (the official table's trainId column).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LABEL_IDS = 34   # labelIds 0..33; -1 (license plate) never appears in the PNGs


def cityscapes_table() -> np.ndarray:
    table = np.full(256, -1, dtype=np.int16)
    table[:CITYSCAPES_LABEL_IDS] = IGNORE_INDEX
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def cityscapes(roots: Sequence[Path]) -> list[Job]:
    images = find_dir(roots, 'leftImg8bit', ['train', 'val'], 'Cityscapes images (leftImg8bit_trainvaltest.zip)')
    labels = find_dir(roots, 'gtFine', ['train', 'val'], 'Cityscapes fine labels (gtFine_trainvaltest.zip)')
    jobs, write = [], lookup_mask(cityscapes_table())
    for split in ('train', 'val'):
        jobs += copies(images / split, f'leftImg8bit/{split}', '*_leftImg8bit.png')
        jobs += [Job(f'gtFine/{split}/{p.relative_to(labels / split).as_posix()}'.replace(
                     '_gtFine_labelIds.png', '_gtFine_labelTrainIds.png'), p, write)
                 for p in sorted((labels / split).rglob('*_gtFine_labelIds.png'))]
    try:   # leftImg8bit_trainextra.zip: optional, unlabeled only
        extra = find_dir(roots, 'leftImg8bit', ['train_extra'], 'Cityscapes train_extra')
        jobs += copies(extra / 'train_extra', 'leftImg8bit/train_extra', '*_leftImg8bit.png')
    except PrepareError:
        pass
    return jobs


# ---- ade20k ------------------------------------------------------------------------------------------

ADE20K_CLASSES = 150


def ade20k_table() -> np.ndarray:
    table = np.full(256, -1, dtype=np.int16)
    table[0] = IGNORE_INDEX
    table[1:ADE20K_CLASSES + 1] = np.arange(ADE20K_CLASSES)
    return table


def ade20k(roots: Sequence[Path]) -> list[Job]:
    root = find_dir(roots, 'ADEChallengeData2016', ['images', 'annotations'], 'ADEChallengeData2016.zip')
    jobs, write = [], lookup_mask(ade20k_table())
    for split in ('training', 'validation'):
        jobs += copies(root / 'images' / split, f'images/{split}', '*.jpg')
        jobs += [Job(f'annotations/{split}/{p.name}', p, write)
                 for p in sorted((root / 'annotations' / split).glob('*.png'))]
    return jobs


# ---- coco --------------------------------------------------------------------------------------------

def instance_region(segmentation, height: int, width: int) -> np.ndarray:
    """The bool (height, width) region of one instance, as pycocotools' `COCO.annToMask` makes it:
    polygons -> one RLE per part (`frPyObjects`), merged; uncompressed RLE (crowd regions) ->
    `frPyObjects`; compressed RLE as it is; then `decode`."""
    from pycocotools import mask as coco_mask
    if isinstance(segmentation, list):
        parts = [p for p in segmentation if len(p) >= 6]    # annToMask covers nothing with a shorter one
        if not parts:
            return np.zeros((height, width), bool)
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, height, width))).astype(bool)
    if list(segmentation['size']) != [height, width]:
        raise PrepareError(f'RLE size {segmentation["size"]} differs from the image {height} x {width}')
    counts = segmentation['counts']
    if isinstance(counts, list):
        if sum(counts) != height * width:
            raise PrepareError(f'RLE run lengths sum to {sum(counts)}, not {height} x {width}')
        return coco_mask.decode(coco_mask.frPyObjects(segmentation, height, width)).astype(bool)
    try:
        region = coco_mask.decode(segmentation)
    except Exception as err:       # pycocotools: runs past the image
        raise PrepareError(f'compressed RLE {counts[:20]!r}...: {err}') from None
    # Runs that stop short of height x width leave the rest of the decoded array uninitialised:
    # a well-formed string is the one encode gives back for what it decodes to.
    if coco_mask.encode(np.asfortranarray(region))['counts'] != (counts.encode() if isinstance(counts, str) else counts):
        raise PrepareError(f'compressed RLE {counts[:20]!r}... does not cover {height} x {width} pixels')
    return region.astype(bool)


def coco_classes(annotations: dict, path: Path) -> dict[int, int]:
    """COCO category id -> class (1..80), checked against dataset.registry.COCO_CLASSES."""
    categories = sorted(annotations['categories'], key=lambda c: c['id'])
    names = tuple(c['name'] for c in categories)
    if names != COCO_CLASSES[1:]:
        diff = next((f'position {i + 1}: {a!r} vs {b!r}' for i, (a, b) in enumerate(zip(names, COCO_CLASSES[1:]))
                     if a != b), f'{len(names)} categories vs {len(COCO_CLASSES) - 1}')
        raise PrepareError(f'{path}: the categories are not the 80 COCO classes in id order ({diff})')
    return {c['id']: i + 1 for i, c in enumerate(categories)}


def coco_mask(image: dict, instances: list[dict], classes: dict[int, int]) -> np.ndarray:
    """The uint8 class map of one image: every instance painted with its class, largest first (by
    the annotation's `area`), so a smaller object lying on a larger one stays visible."""
    mask = np.zeros((image['height'], image['width']), np.uint8)
    for ann in sorted(instances, key=lambda a: -a['area']):
        mask[instance_region(ann['segmentation'], image['height'], image['width'])] = classes[ann['category_id']]
    return mask


def coco_mask_writer(image: dict, instances: list[dict], classes: dict[int, int]) -> Callable[[Path, Path], None]:
    def write(src: Path, tmp: Path) -> None:
        save_mask(coco_mask(image, instances, classes), tmp)
    return write


def coco(roots: Sequence[Path]) -> list[Job]:
    ann_dir = find_dir(roots, 'annotations', ['instances_train2017.json', 'instances_val2017.json'],
                       'COCO annotations (annotations_trainval2017.zip)')
    jobs = []
    for split in ('train2017', 'val2017'):
        images = find_dir(roots, split, [], f'COCO {split} images ({split}.zip)')
        path = ann_dir / f'instances_{split}.json'
        try:
            annotations = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PrepareError(f'{path} is not readable JSON: {err}') from None
        classes = coco_classes(annotations, path)
        by_image: dict[int, list[dict]] = {}
        for ann in annotations['annotations']:
            by_image.setdefault(ann['image_id'], []).append(ann)
        for image in sorted(annotations['images'], key=lambda i: i['file_name']):
            stem = Path(image['file_name']).stem
            jobs.append(Job(f'{split}/{image["file_name"]}', images / image['file_name'], copy_file))
            jobs.append(Job(f'masks/{stem}.png', path,
                            _labelled(coco_mask_writer(image, by_image.get(image['id'], []), classes),
                                      f'image {image["file_name"]} (id {image["id"]})')))
    return jobs


def _labelled(write: Callable[[Path, Path], None], what: str) -> Callable[[Path, Path], None]:
    """`write`, with errors naming `what` (the image whose annotations a shared file holds)."""
    def wrapped(src: Path, tmp: Path) -> None:
        try:
            write(src, tmp)
        except Exception as err:
            raise PrepareError(f'{what}: {err}') from None
    return wrapped


# ---- levir / whu (change detection) ----------------------------------------------------------------

CD_FOLDERS = ('A', 'B', 'label')


def change_detection(roots: Sequence[Path]) -> list[Job]:
    root = find_dir_with(roots, CD_FOLDERS)
    return [job for folder in CD_FOLDERS for job in copies(root / folder, folder, '*.png')]


def check_change_detection(root: Path, split: Path) -> list[Problem]:
    """`--check-data` for a change-detection list (one tile name a line): the A, B and label
    tiles open, have one size, and labels are single-channel 0 / 255 (dataset/change.py)."""
    from dataset.change import check_pairs
    return check_pairs(root, split, 'labeled', full=True)


def find_dir_with(roots: Sequence[Path], contains: Sequence[str]) -> Path:
    for root in roots:
        for candidate in (root, *sorted(p for p in root.rglob('*') if p.is_dir())):
            if all((candidate / c).is_dir() for c in contains):
                return candidate
    raise PrepareError(f'no folder holding {"/, ".join(contains)}/ under {", ".join(map(str, roots))} '
                       '(the original\'s LEVIR-CD.zip / WHU-CD.zip)')
