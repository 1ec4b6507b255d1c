"""Split lists: reading them, deriving the COCO unlabeled list, and making splits for custom data.

A split file holds one sample a line, `image_path [mask_path]`, paths relative to the dataset
root. A missing mask column or the word `None` (Cityscapes train_extra) means "no mask".
"""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
NO_MASK = 'None'  # the mask column of Cityscapes train_extra lines


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
    """Write `lines` to `path` through a temporary file and a rename, so a reader never sees a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer (several ranks may write the same file); open() honours the umask.
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'x') as f:
            f.write(''.join(line + '\n' for line in lines))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside `directory`, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f'image directory {directory} does not exist')
    return sorted(p for p in directory.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def derive_unlabeled(data_root: str | os.PathLike, labeled_path: str | os.PathLike,
                     cache_path: str | os.PathLike, image_dir: str = 'train2017',
                     mask_dir: str = 'masks') -> list[Sample]:
    """Every image in `data_root/image_dir` that is not in the labeled list, as samples with mask
    `mask_dir/<stem>.png` (the COCO layout; the COCO release ships no unlabeled lists).

    The list is cached at `cache_path` and re-used; a cache that overlaps the labeled list (the
    labeled list changed) is rebuilt.
    """
    labeled = {s.image for s in read_split(labeled_path)}
    cache_path = Path(cache_path)
    if cache_path.exists():
        cached = read_split(cache_path)
        if not labeled.intersection(s.image for s in cached):
            return cached
    images = list_images(Path(data_root) / image_dir)
    samples = [Sample(f'{image_dir}/{p.name}', f'{mask_dir}/{p.stem}.png', i + 1)
               for i, p in enumerate(p for p in images if f'{image_dir}/{p.name}' not in labeled)]
    if not samples:
        raise SplitError(f'no unlabeled images left in {Path(data_root) / image_dir} after '
                         f'removing the {len(labeled)} labeled ones of {labeled_path}')
    write_lines_atomic(cache_path, [format_line(s) for s in samples])
    return samples


def _default_split_name(fraction: float | None, count: int | None) -> str:
    if count is not None:
        return str(count)
    inverse = 1 / fraction
    if abs(inverse - round(inverse)) < 1e-9:
        return f'1_{round(inverse)}'
    return f'{fraction * 100:g}%'


def make_custom_split(root: str | os.PathLike, name: str, fraction: float | None = None,
                      count: int | None = None, split: str | None = None,
                      val_fraction: float | None = None, seed: int = 0,
                      splits_root: str | os.PathLike = 'splits', force: bool = False,
                      ) -> dict[str, Path]:
    """Write seeded `labeled.txt` / `unlabeled.txt` for a custom dataset (`root/images/*` with
    single-channel `root/masks/<stem>.png`) under `splits_root/name/split/`.

    `val_fraction` first carves `splits_root/name/val.txt` out of the images; without it an
    existing `val.txt` is kept and its images are left out of the training pool. A labeled set
    covering the whole pool gets unlabeled = labeled (the 'all' convention). Existing files are
    not overwritten unless `force`. Returns the written paths by role ('labeled', 'unlabeled',
    and 'val' when written).
    """
    if (fraction is None) == (count is None):
        raise ValueError('give exactly one of fraction and count')
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    if count is not None and count < 1:
        raise ValueError(f'count must be >= 1, got {count}')
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')

    root = Path(root)
    images = list_images(root / 'images')
    missing = [p.name for p in images if not (root / 'masks' / f'{p.stem}.png').is_file()]
    if missing:
        raise FileNotFoundError(f'{len(missing)} images in {root / "images"} have no mask '
                                f'masks/<stem>.png, e.g. {missing[:3]}')
    if len({p.stem for p in images}) != len(images):
        raise ValueError(f'{root / "images"}: several images share a stem; masks would collide')
    lines = [f'images/{p.name} masks/{p.stem}.png' for p in images]
    random.Random(seed).shuffle(lines)

    out_dir = Path(splits_root) / name
    val_path = out_dir / 'val.txt'
    outputs: dict[str, list[str]] = {}
    if val_fraction is not None:
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
    outputs['unlabeled'] = lines[n_labeled:] or lines

    paths = {role: out_dir / split / f'{role}.txt' for role in ('labeled', 'unlabeled')}
    if 'val' in outputs:
        paths['val'] = val_path
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f'split files exist (pass force to overwrite): {existing}')
    for role, path in paths.items():
        write_lines_atomic(path, outputs[role])
    return paths
