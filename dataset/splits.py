"""Split lists: reading them, deriving the COCO unlabeled list, and making splits for custom data.

A split file holds one sample a line, `image_path [mask_path]`, paths relative to the dataset
root. A missing mask column or the word `None` (Cityscapes train_extra) means "no mask".
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from util.checkpoint import write_text_atomic

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
NO_MASK = 'None'  # the mask column of Cityscapes train_extra lines
# Images in the official extra-image folders (facts sheet, sections 1-2): a derived list of another
# size means a partial download or a different release.
EXPECTED_IMAGES = {
    'leftImg8bit/train_extra': 19998,    # Cityscapes leftImg8bit_trainextra (one folder per city)
    'train2017': 118287,                 # COCO train2017
    'unlabeled2017': 123403,             # COCO unlabeled2017
}


@dataclass(frozen=True)
class Sample:
    image: str  # relative to the dataset root
    mask: str | None  # relative to the dataset root; None for unlabeled-only images
    line: int  # 1-based line in the split file, for error messages


class SplitError(ValueError):
    """A split file that cannot be read as `image [mask]` lines."""


def read_split(path: str | os.PathLike) -> list[Sample]:
    """Read a split file; blank lines are skipped, anything else malformed is an error naming the
    file and line."""
    path = Path(path)
    samples = []
    with open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            fields = raw.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise SplitError(f'{path}:{lineno}: expected "image [mask]", got {len(fields)} '
                                 f'fields: {raw.strip()!r}')
            mask = fields[1] if len(fields) == 2 and fields[1] != NO_MASK else None
            samples.append(Sample(fields[0], mask, lineno))
    if not samples:
        raise SplitError(f'{path}: split file is empty')
    return samples


def format_line(sample: Sample) -> str:
    return sample.image if sample.mask is None else f'{sample.image} {sample.mask}'


def write_lines_atomic(path: str | os.PathLike, lines: list[str]) -> None:
    """`lines`, one a line, written atomically (a reader never sees a half-written file)."""
    write_text_atomic(''.join(line + '\n' for line in lines), path)


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside `directory`, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f'image directory {directory} does not exist')
    return sorted(p for p in directory.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_cache(cache_path: str | os.PathLike, labeled: set[str]) -> list[Sample] | None:
    """A derived unlabeled list cached at `cache_path`, or None when there is none or it overlaps
    the labeled images (the labeled list changed: derive it again)."""
    if not Path(cache_path).exists():
        return None
    cached = read_split(cache_path)
    return None if labeled.intersection(s.image for s in cached) else cached


def derive_unlabeled(data_root: str | os.PathLike, labeled_path: str | os.PathLike,
                     cache_path: str | os.PathLike, image_dir: str = 'train2017',
                     mask_dir: str = 'masks') -> list[Sample]:
    """Every image in `data_root/image_dir` that is not in the labeled list, as samples with mask
    `mask_dir/<stem>.png` (the COCO layout; the COCO release ships no unlabeled lists).

    The list is cached at `cache_path` and re-used; a cache that overlaps the labeled list (the
    labeled list changed) is rebuilt.
    """
    labeled = {s.image for s in read_split(labeled_path)}
    cached = read_cache(cache_path, labeled)
    if cached is not None:
        return cached
    images = list_images(Path(data_root) / image_dir)
    samples = [Sample(f'{image_dir}/{p.name}', f'{mask_dir}/{p.stem}.png', i + 1)
               for i, p in enumerate(p for p in images if f'{image_dir}/{p.name}' not in labeled)]
    if not samples:
        raise SplitError(f'no unlabeled images left in {Path(data_root) / image_dir} after '
                         f'removing the {len(labeled)} labeled ones of {labeled_path}')
    write_lines_atomic(cache_path, [format_line(s) for s in samples])
    return samples


class FolderCountWarning(UserWarning):
    """An image folder holds another number of images than the paper's release of it."""


def list_images_recursive(directory: str | os.PathLike) -> list[Path]:
    """Image files anywhere under `directory` (Cityscapes keeps one sub-folder per city), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f'image directory {directory} does not exist')
    return sorted(p for p in directory.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_images(root: str | os.PathLike, folder: str) -> list[str]:
    """Every image under `root/folder`, relative to `root`; a folder of `EXPECTED_IMAGES` holding
    another count gives a `FolderCountWarning` naming it and the expected count."""
    root = Path(root)
    found = [p.relative_to(root).as_posix() for p in list_images_recursive(root / folder)]
    expected = EXPECTED_IMAGES.get(folder.strip('/'))
    if expected is not None and len(found) != expected:
        warnings.warn(f'{root / folder}: {len(found)} images, the paper\'s release has {expected} '
                      f'(partial download?)', FolderCountWarning, stacklevel=3)
    return found


def derive_labeled_all(data_root: str | os.PathLike, cache_path: str | os.PathLike, image_dir: str = 'train2017',
                       mask_dir: str = 'masks') -> list[Sample]:
    """COCO's 'all' labeled list (every train2017 image with its mask `mask_dir/<stem>.png`, the
    labeled set of the paper's Table 13), derived on first use and cached at `cache_path`."""
    cached = read_cache(cache_path, set())
    if cached is not None:
        return cached
    images = folder_images(data_root, image_dir)
    if not images:
        raise SplitError(f'no images in {Path(data_root) / image_dir}')
    samples = [Sample(image, f'{mask_dir}/{Path(image).stem}.png', i + 1) for i, image in enumerate(images)]
    write_lines_atomic(cache_path, [format_line(s) for s in samples])
    return samples


def unlabeled_from_folders(root: str | os.PathLike, folders: list[str], cache_path: str | os.PathLike,
                           exclude: set[str] = frozenset()) -> list[Sample]:
    """Every image under `root/<folder>` for each folder (paths relative to `root`, no mask), less
    the images in `exclude` (the labeled list, when it shares the root): the extra unlabeled images
    of the paper's Table 13 (Cityscapes `leftImg8bit/train_extra`, COCO `train2017`,
    `unlabeled2017`), which come with no lists.

    Cached at `cache_path` like the COCO unlabeled list (a cache that overlaps `exclude` is rebuilt).
    A folder of `EXPECTED_IMAGES` with another count gives a `FolderCountWarning` naming it."""
    cached = read_cache(cache_path, exclude)
    if cached is not None:
        return cached
    images = [image for folder in folders for image in folder_images(root, folder)]
    samples = [Sample(image, None, i + 1) for i, image in enumerate(i for i in images if i not in exclude)]
    if not samples:
        raise SplitError(f'no unlabeled images in {", ".join(str(root / f) for f in folders)}')
    write_lines_atomic(cache_path, [format_line(s) for s in samples])
    return samples


def _default_split_name(fraction: float | None, count: int | None) -> str:
    if count is not None:
        return str(count)
    inverse = 1 / fraction
    if abs(inverse - round(inverse)) < 1e-9:
        return f'1_{round(inverse)}'
    return f'{fraction * 100:g}%'


DEFAULT_VAL_FRACTION = 0.2    # of a custom dataset's images, held out as val.txt when it has none


def make_custom_split(root: str | os.PathLike, name: str, fraction: float | None = None,
                      count: int | None = None, split: str | None = None,
                      val_fraction: float | None = None, seed: int = 0,
                      splits_root: str | os.PathLike = 'splits', force: bool = False,
                      unlabeled: str | None = None) -> dict[str, Path]:
    """Write seeded `labeled.txt` / `unlabeled.txt` for a custom dataset (`root/images/*` with
    single-channel `root/masks/<stem>.png`) under `splits_root/name/split/`.

    `val_fraction` first carves `splits_root/name/val.txt` out of the images (default: an existing
    `val.txt` is kept and its images are left out of the training pool; without one,
    `DEFAULT_VAL_FRACTION`; 0: no val list). `unlabeled`: a folder under `root` of images without
    masks, added to the unlabeled list as image-only lines. A labeled set covering the whole pool
    gets unlabeled = labeled (the 'all' convention) when there are no such images. Existing files
    are not overwritten unless `force`. Returns the written paths by role ('labeled', 'unlabeled',
    and 'val' when written).
    """
    if (fraction is None) == (count is None):
        raise ValueError('give exactly one of fraction and count')
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    if count is not None and count < 1:
        raise ValueError(f'count must be >= 1, got {count}')
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')

    root = Path(root)
    images = list_images(root / 'images')
    if not images:
        raise FileNotFoundError(f'no images in {root / "images"} ({", ".join(IMAGE_EXTENSIONS)})')
    missing = [p.name for p in images if not (root / 'masks' / f'{p.stem}.png').is_file()]
    if missing:
        raise FileNotFoundError(f'{len(missing)} images in {root / "images"} have no mask '
                                f'masks/<stem>.png, e.g. {missing[:3]} (images without masks go in '
                                f'another folder, given as unlabeled)')
    if len({p.stem for p in images}) != len(images):
        raise ValueError(f'{root / "images"}: several images share a stem; masks would collide')
    lines = [f'images/{p.name} masks/{p.stem}.png' for p in images]
    random.Random(seed).shuffle(lines)
    extra = _image_only(root, unlabeled) if unlabeled else []

    out_dir = Path(splits_root) / name
    val_path = out_dir / 'val.txt'
    if val_fraction is None and not val_path.exists():
        val_fraction = DEFAULT_VAL_FRACTION
    outputs: dict[str, list[str]] = {}
    if val_fraction:
        n_val = max(1, round(val_fraction * len(lines)))
        outputs['val'], lines = lines[:n_val], lines[n_val:]
    elif val_path.exists():
        val_images = {s.image for s in read_split(val_path)}
        lines = [line for line in lines if line.split()[0] not in val_images]
    if not lines:
        raise ValueError(f'{root}: no training images left')

    n_labeled = count if count is not None else max(1, round(fraction * len(lines)))
    if n_labeled > len(lines):
        raise ValueError(f'count {n_labeled} exceeds the {len(lines)} training images')
    split = split or _default_split_name(fraction, count)
    outputs['labeled'] = lines[:n_labeled]
    outputs['unlabeled'] = (lines[n_labeled:] + extra) or lines

    paths = {role: out_dir / split / f'{role}.txt' for role in ('labeled', 'unlabeled')}
    if 'val' in outputs:
        paths['val'] = val_path
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f'split files exist: {", ".join(existing)}')
    for role, path in paths.items():
        write_lines_atomic(path, outputs[role])
    return paths


def _image_only(root: Path, folder: str) -> list[str]:
    """Lines of every image under `root/folder` (paths relative to `root`, no mask)."""
    if Path(folder).is_absolute() or '..' in Path(folder).parts:
        raise ValueError(f'unlabeled folder {folder!r} must be a folder under {root}, relative to it')
    found = list_images_recursive(root / folder)
    if not found:
        raise FileNotFoundError(f'no images in {root / folder} ({", ".join(IMAGE_EXTENSIONS)})')
    return [p.relative_to(root).as_posix() for p in found]
