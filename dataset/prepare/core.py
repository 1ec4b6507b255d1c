"""The skeleton every dataset converter shares: sources, jobs, atomic outputs, the final check.

- Sources: each `--src` is a folder or an archive (.zip, .tar, .tar.gz, .tgz). Archives are
  extracted once into `<dst>/.sources/<archive name>/` (a marker records which archive, by size and
  modification time, was fully extracted); members with absolute paths or `..`, links and devices
  are refused, so an archive cannot write outside that folder.
- Jobs: one output file each (`out`, relative to the dataset root) made from one source file
  (`src`, named in every error) by `write(src, tmp)`. An output that exists is skipped, so a rerun
  resumes; each is written to a temporary file and renamed into place, so none is half-written. A
  job that fails is reported by its source file after all the others ran.
- The end: every split list of the dataset is counted against what was written, then the same
  checks as `--check-data` run over every file the lists name.
"""
from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.checks import Problem
from dataset.splits import Sample, read_split
from util.checkpoint import atomic_path

ARCHIVE_SUFFIXES = ('.zip', '.tar', '.tar.gz', '.tgz')
SOURCES_DIR = '.sources'
DONE_MARKER = '.extracted'


class PrepareError(RuntimeError):
    """Input that cannot be converted; the message names the file(s)."""


# ---- sources ---------------------------------------------------------------------------------------

def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_member(name: str, archive: Path) -> str:
    parts = Path(name).parts
    if Path(name).is_absolute() or '..' in parts:
        raise PrepareError(f'{archive}: member {name!r} would be written outside the extraction folder; '
                           'refusing the archive')
    return name


def extract(archive: Path, into: Path) -> Path:
    """Extract `archive` into `into/<archive name>/` unless that was done already for this very file.
    (The folder keeps the suffix: `train2017.zip/train2017/` is not mistaken for the image folder.)"""
    out = into / archive.name
    stamp = f'{archive.stat().st_size} {archive.stat().st_mtime_ns}'
    marker = out / DONE_MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith('.zip'):
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
                for m in tqdm(members, desc=f'extract {archive.name}', unit='file', leave=False):
                    _copy_member(zf.open(m), out / _safe_member(m.filename, archive))
        else:
            with tarfile.open(archive) as tf:
                for m in tqdm(tf, desc=f'extract {archive.name}', unit='file', leave=False):
                    if m.isdir():
                        continue
                    if not m.isfile():   # links, devices, fifos: never needed by a dataset
                        raise PrepareError(f'{archive}: member {m.name!r} is not a regular file; refusing the archive')
                    _copy_member(tf.extractfile(m), out / _safe_member(m.name, archive))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise PrepareError(f'{archive} cannot be extracted (truncated or not an archive?): {err}') from None
    marker.write_text(stamp)
    return out


def _copy_member(stream, path: Path) -> None:
    with stream, atomic_path(path) as tmp, open(tmp, 'wb') as f:
        shutil.copyfileobj(stream, f, 1 << 20)


def open_sources(srcs: Sequence[str | Path], dst: Path) -> list[Path]:
    """Folders to search: the folders given, and the archives given, extracted."""
    roots = []
    for src in map(Path, srcs):
        if src.is_dir():
            roots.append(src)
        elif is_archive(src):
            roots.append(extract(src, dst / SOURCES_DIR))
        else:
            raise PrepareError(f'--src {src} is neither a folder nor a .zip/.tar/.tar.gz/.tgz archive')
    return roots


def find_dir(roots: Sequence[Path], name: str, contains: Sequence[str], what: str) -> Path:
    """The first folder called `name` (searched under each root, the root itself included) that
    holds every entry of `contains`."""
    for root in roots:
        for candidate in (root, *sorted(root.rglob(name))):
            if candidate.name == name and candidate.is_dir() and all((candidate / c).exists() for c in contains):
                return candidate
    raise PrepareError(f'{what}: no folder {name}/ holding {", ".join(contains)} under '
                       f'{", ".join(map(str, roots))}')


# ---- jobs --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    out: str                                   # output path relative to the dataset root
    src: Path                                  # the source file, named in errors
    write: Callable[[Path, Path], None]        # write(src, tmp): the output into tmp (a .png/.jpg name)


def copy_file(src: Path, tmp: Path) -> None:
    """Copy an image after PIL's structural check (headers, PNG chunk checksums; no decoding), so a
    truncated or corrupt source is reported here, by name, and not copied."""
    with Image.open(src) as img:
        img.verify()
    shutil.copyfile(src, tmp)


def save_mask(mask: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    """A single-channel 8-bit PNG of class ids (palette PNG when `palette` is given)."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode='L')
    if palette is not None:
        img = img.convert('P')
        img.putpalette(palette)
    img.save(path, format='PNG')


def read_mask(path: Path) -> np.ndarray:
    """An 8-bit single-channel mask's values (palette PNGs: the indices, not the colours)."""
    with Image.open(path) as img:
        if img.mode not in ('L', 'P'):
            raise PrepareError(f'mask mode {img.mode}, expected a single-channel 8-bit PNG (L or P)')
        return np.array(img)


def lookup_mask(table: np.ndarray) -> Callable[[Path, Path], None]:
    """A job writer mapping every value v of the source mask to table[v] (255 = ignore); a value
    the table marks -1 is an error naming it."""
    def write(src: Path, tmp: Path) -> None:
        values = read_mask(src)
        out = table[values]
        if (out < 0).any():
            raise PrepareError(f'unexpected values {sorted(set(values[out < 0].tolist()))[:10]}')
        save_mask(out, tmp)
    return write


def run_jobs(jobs: Iterable[Job], dst: Path, desc: str) -> int:
    """Make every missing output; returns how many were written. Raises PrepareError listing every
    source that failed, after all the others were written."""
    jobs = list(jobs)
    written, failed = 0, []
    for job in tqdm(jobs, desc=desc, unit='file'):
        out = dst / job.out
        if out.is_file():
            continue
        try:
            with atomic_path(out) as tmp:
                job.write(job.src, tmp)
            written += 1
        except Exception as err:   # a corrupt file raises whatever its reader raises
            failed.append(f'  {job.src}: {err}')
    if failed:
        raise PrepareError(f'{len(failed)} of {len(jobs)} files could not be converted (the others are '
                           f'in {dst}; fix or replace these and rerun to finish):\n' + '\n'.join(failed))
    return written


# ---- the final check ------------------------------------------------------------------------------

def split_files(splits_dir: Path) -> list[Path]:
    files = sorted(splits_dir.rglob('*.txt'))
    if not files:
        raise PrepareError(f'no split lists (*.txt) under {splits_dir}')
    return files


def verify_splits(dst: Path, splits_dir: Path, paths_of: Callable[[Sample, str], list[str]],
                  check: Callable[[Path, str], list[Problem]], log=print) -> None:
    """Count each split list's samples against `dst` (paths_of(sample, role): the files one line
    needs; role 'unlabeled' for unlabeled.txt, else 'val'), then run check(split, role), the
    dataset's `--check-data`, on every list whose files were all prepared. A list with some but not
    all of its files is an error; one with none (e.g. Cityscapes train_extra when it was not given)
    is skipped with a note."""
    complete = {}
    for split in split_files(splits_dir):
        role = 'unlabeled' if split.name == 'unlabeled.txt' else 'val'
        samples = read_split(split)
        present = sum(all((dst / p).is_file() for p in paths_of(s, role)) for s in samples)
        log(f'{split}: {present} of {len(samples)} listed samples present')
        if present == 0:
            log('  skipped: none of its files were among the sources')
        elif present < len(samples):
            raise PrepareError(f'{split}: only {present} of {len(samples)} listed samples were prepared; '
                               'are some sources missing?')
        else:
            complete[split] = role
    problems = [p for split, role in complete.items() for p in check(split, role)]
    for p in problems:
        if p.level == 'warning':
            log(str(p))
    errors = [str(p) for p in problems if p.level == 'error']
    if errors:
        raise PrepareError(f'{len(errors)} problem(s) in the prepared files (replace them and rerun):\n'
                           + '\n'.join(errors[:50]) + (f'\n... and {len(errors) - 50} more' if len(errors) > 50 else ''))
    log(f'checked every file of {len(complete)} split lists: no errors')
