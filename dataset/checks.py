"""Input checks run before training or evaluation touches anything on disk.

Fast checks (always): each split file parses and is not empty, every path it names exists, no id is
listed twice, labeled and unlabeled lists do not overlap (a warning: the original's `all` splits
do); and the masks of up to `SAMPLED_MASKS` lines of each labeled and evaluation list, spread over
the list, are read: their values against nclass and their size against the image's (a label above
nclass or a mask of another size would otherwise stop the run mid-epoch). Full checks (`--check-data`): every image and mask opens and decodes, masks are single-channel
with values in [0, nclass) or 255, mask and image sizes agree, and images that are not 8-bit RGB are
reported (gray, RGBA and palette images are converted; 16-bit and other modes are refused).
Every problem names the split file, the line and the path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.splits import Sample, SplitError, read_split
from util.labels import IGNORE_INDEX

CONVERTED_MODES = {'L': 'gray', 'LA': 'gray with alpha', 'RGBA': 'RGBA', 'P': 'palette',
                   'CMYK': 'CMYK', 'YCbCr': 'YCbCr'}      # PIL converts these to RGB faithfully
MASK_MODES = {'L', 'P'}                                    # single-channel 8-bit class ids
SAMPLED_MASKS = 64     # masks read per list before every run (toy's 1_16 and val lists: +50 ms)


@dataclass(frozen=True)
class Problem:
    level: str            # 'error' or 'warning'
    where: str            # split file and line
    message: str

    def __str__(self) -> str:
        return f'{self.level}: {self.where}: {self.message}'


class DataError(RuntimeError):
    """At least one input error; the message lists every problem found."""


def _where(split: Path, sample: Sample | None = None) -> str:
    return f'{split}:{sample.line}' if sample else str(split)


def check_split(root: str | os.PathLike, split: str | os.PathLike, role: str, nclass: int,
                full: bool = False, sample: bool = True,
                masks: bool | None = None) -> tuple[list[Problem], list[Sample]]:
    """Problems of one split file (role: 'labeled', 'unlabeled' or 'val'). Not `full`: the masks
    of a sample of its lines (`sample`) are read, up to the first bad one. `masks`: whether its
    lines need a mask (default: every role but 'unlabeled'; False for classification lists, whose
    sampled lines then have their images' headers read)."""
    root, split = Path(root), Path(split)
    problems: list[Problem] = []
    if not split.is_file():
        return [Problem('error', str(split), f'{role} split file does not exist')], []
    try:
        samples = read_split(split)
    except SplitError as err:
        return [Problem('error', str(split), str(err).removeprefix(f'{split}: '))], []
    if not samples:
        return [Problem('error', str(split), f'{role} split is empty')], []

    needs_mask = role != 'unlabeled' if masks is None else masks
    seen: dict[str, int] = {}
    for s in samples:
        if s.image in seen:
            problems.append(Problem('error', _where(split, s),
                                    f'{s.image} is listed twice (first on line {seen[s.image]})'))
        seen.setdefault(s.image, s.line)
        if needs_mask and s.mask is None:
            problems.append(Problem('error', _where(split, s), f'{role} line has no mask path'))
        for path in (s.image, s.mask if needs_mask else None):
            if path is not None and not (root / path).is_file():
                problems.append(Problem('error', _where(split, s), f'missing file {root / path}'))
    if any(p.level == 'error' for p in problems):
        return problems, samples
    if full:
        for s in samples:
            problems.extend(_check_files(root, split, s, nclass, with_mask=needs_mask))
    elif not needs_mask and masks is False and sample:
        for s in spread(samples, SAMPLED_MASKS):
            found = _check_header(root, split, s)
            if found:
                problems += found
                break
    elif needs_mask and sample:
        for s in spread(samples, SAMPLED_MASKS):
            found = _check_mask(root, split, s, nclass)
            if found:
                problems += found[:1]
                break
    return problems, samples


def spread(items: list, n: int) -> list:
    """At most `n` of `items`, evenly spaced from the first to the last."""
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / max(n - 1, 1))] for k in range(n)]


def _check_header(root: Path, split: Path, s: Sample) -> list[Problem]:
    """The image's header opens (a file that is not an image at all)."""
    try:
        with Image.open(root / s.image):
            return []
    except Exception as err:   # PIL raises many types for corrupt files
        return [Problem('error', _where(split, s), f'image {root / s.image} cannot be read: {err}')]


def _check_mask(root: Path, split: Path, s: Sample, nclass: int) -> list[Problem]:
    """The mask's mode, values and size against its image's (read from the image's header only)."""
    try:
        with Image.open(root / s.image) as img:
            size = img.size
    except Exception as err:   # PIL raises many types for corrupt files
        return [Problem('error', _where(split, s), f'image {root / s.image} cannot be read: {err}')]
    return _mask_problems(root, split, s, nclass, size)


def _check_files(root: Path, split: Path, s: Sample, nclass: int, with_mask: bool) -> list[Problem]:
    where = _where(split, s)
    out = []
    try:
        with Image.open(root / s.image) as img:
            img.load()
            size, mode = img.size, img.mode
    except Exception as err:   # PIL raises many types for corrupt files
        return [Problem('error', where, f'image {root / s.image} cannot be read: {err}')]
    if mode in CONVERTED_MODES:
        out.append(Problem('warning', where, f'image {s.image} is {CONVERTED_MODES[mode]} ({mode}); '
                                             'it is converted to RGB'))
    elif mode != 'RGB':
        out.append(Problem('error', where, f'image {s.image} has mode {mode} (e.g. 16-bit); only 8-bit '
                                           'RGB, gray, RGBA or palette images are accepted'))
    if not with_mask or s.mask is None:
        return out
    return out + _mask_problems(root, split, s, nclass, size)


def _mask_problems(root: Path, split: Path, s: Sample, nclass: int, size: tuple[int, int]) -> list[Problem]:
    where, out = _where(split, s), []
    try:
        with Image.open(root / s.mask) as mask:
            mask.load()
            msize, mmode, values = mask.size, mask.mode, np.unique(np.asarray(mask))
    except Exception as err:
        return [Problem('error', where, f'mask {root / s.mask} cannot be read: {err}')]
    if mmode not in MASK_MODES:
        out.append(Problem('error', where, f'mask {s.mask} has mode {mmode}; masks must be single-channel '
                                           '8-bit PNGs of class ids (L or P)'))
        return out
    if msize != size:
        out.append(Problem('error', where, f'mask {s.mask} is {msize[0]}x{msize[1]} but image {s.image} '
                                           f'is {size[0]}x{size[1]}'))
    bad = [int(v) for v in values if v >= nclass and v != IGNORE_INDEX]
    if bad:
        out.append(Problem('error', where, f'mask {s.mask} has values {bad[:10]} outside [0, {nclass}) '
                                           f'and {IGNORE_INDEX} (ignore): nclass is {nclass}'))
    return out


def check_inputs(root: str | os.PathLike, splits: dict[str, str | os.PathLike], nclass: int,
                 full: bool = False, roots: dict[str, str | os.PathLike] | None = None) -> list[Problem]:
    """Problems of every split (role -> file), plus labeled/unlabeled overlap. A role's images live
    under `roots[role]` when given (unlabeled images from another dataset), else under `root`."""
    problems, lists = [], {}
    roots = roots or {}
    for role, path in splits.items():
        found, samples = check_split(roots.get(role, root), path, role, nclass, full,
                                     sample=not any(p.level == 'error' for p in problems))
        problems += found
        lists[role] = samples
    same_root = Path(roots.get('unlabeled', root)).resolve() == Path(roots.get('labeled', root)).resolve()
    if 'labeled' in lists and 'unlabeled' in lists and splits['labeled'] != splits['unlabeled'] and same_root:
        overlap = {s.image for s in lists['labeled']} & {s.image for s in lists['unlabeled']}
        if overlap:
            problems.append(Problem('warning', f'{splits["labeled"]} / {splits["unlabeled"]}',
                                    f'{len(overlap)} images are both labeled and unlabeled '
                                    f'(e.g. {sorted(overlap)[0]})'))
    return problems


def raise_on_errors(problems: list[Problem], log=print) -> None:
    for p in problems:
        if p.level == 'warning':
            log(str(p))
    errors = [p for p in problems if p.level == 'error']
    if len(errors) == 1:
        raise DataError(f'{errors[0].where}: {errors[0].message} (nothing was written)')
    if errors:
        shown = '\n'.join(str(p) for p in errors[:50])
        more = f'\n... and {len(errors) - 50} more' if len(errors) > 50 else ''
        raise DataError(f'{len(errors)} input error(s); nothing was written:\n{shown}{more}')
