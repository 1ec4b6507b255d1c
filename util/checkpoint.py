"""Checkpoint files: atomic writes and loads that never execute code.

`save_atomic` writes to a temporary file in the same directory, flushes it to disk and renames it
into place, so `latest.pth` is either the old file or the new one, never half of either; with
`keep_previous` the file it replaces stays under that name (`latest.prev.pth`: a hard link made
before the rename), so there is always a complete `latest.pth` and, after two saves, a way back.
A write that fails (a full disk, a quota) raises `CheckpointWriteError` naming the file and cause.
`atomic_path` is that temporary-file-and-rename for every file the project writes (checkpoints,
results, split lists, the toy data, prepared datasets, downloads, exports); `write_text_atomic`
and `write_bytes_atomic` write a string or bytes through it.
`safe_load` uses `torch.load(weights_only=True)`: a pickle that carries code (a class to build, a
function to call) is refused before any of it runs.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch


class UnsafeCheckpointError(RuntimeError):
    """The file holds more than tensors and plain containers; it was not loaded."""


class NotACheckpointError(RuntimeError):
    """The file is not one torch.save writes (a YAML config, an image, a truncated file...)."""


class CheckpointWriteError(OSError):
    """A file could not be written (full disk, quota); the file it would replace is left as it was."""


ZIP_MAGIC = b'PK\x03\x04'   # first bytes of a zip archive (torch.save's format): its index is at the end
PICKLE_PROTO = 0x80   # first byte of a pickle of protocol >= 2: torch.save's legacy (non-zip) format


def _check_torch_file(path: Path) -> None:
    """Raise NotACheckpointError unless `path` is a zip archive (torch.save's format) or a pickle."""
    if zipfile.is_zipfile(path):
        return
    with open(path, 'rb') as f:
        head = f.read(32)
    if head[:4] == ZIP_MAGIC:
        raise NotACheckpointError(f'{path} is not a readable checkpoint: truncated or damaged (a zip archive '
                                  f'torch.save began, without its end)')
    if head[:1] != bytes([PICKLE_PROTO]):
        text = head.decode('utf-8', 'replace').splitlines()[0] if head else ''
        raise NotACheckpointError(f'{path} is not a checkpoint: not a file torch.save writes (it starts with '
                                  f'{text!r}{"; a config goes to --config" if path.suffix in (".yaml", ".yml") else ""})')


def safe_load(path: str | Path, map_location: str | torch.device = 'cpu') -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path), device=str(map_location))
    _check_torch_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'refused to load {path}: it holds objects other than tensors and plain containers, '
            f'which could run code when unpickled. Only weights are accepted.\n  ({_refusal_reason(err)})'
        ) from None
    except (RuntimeError, EOFError) as err:
        raise NotACheckpointError(f'{path} is not a readable checkpoint (truncated or not a torch file): {err}') from None


def _refusal_reason(err: Exception) -> str:
    """The line of torch's message naming what was refused (its first line, with terminal escape
    codes, only says how to bypass the check)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or ['']
    reason = next((line for line in lines if line.startswith('WeightsUnpickler error:')), lines[0])
    return reason.removeprefix('WeightsUnpickler error:').split('. ')[0].strip()


class _WriteRecorder:
    """A file object that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError that says only 'unexpected pos' (its zip writer checks positions, not errno)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_previous: str | Path | None = None) -> Iterator[Path]:
    """The one atomic writer: a temporary path beside `path` for the block to write (not created
    here, so whatever writes it honours the umask), renamed onto `path` once the block ends; on any
    failure it is removed and `path` is left as it was. `keep_previous`: the file `path` held until
    then is kept under that name (`_keep_copy`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer: several ranks or processes may write the same file at once.
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        yield tmp
        if keep_previous is not None and path.exists():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _atomic_file(path: str | Path, mode: str, keep_previous: str | Path | None = None):
    """A file opened in `mode` ('w' or 'wb') at `atomic_path(path)`, synced to disk before the
    rename; an OSError (a full disk) becomes a CheckpointWriteError naming `path`."""
    recorder = None
    try:
        with atomic_path(path, keep_previous) as tmp, open(tmp, mode.replace('w', 'x')) as f:
            recorder = _WriteRecorder(f)
            yield recorder
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        cause = recorder.error if recorder is not None and recorder.error else err
        if isinstance(cause, OSError) and not isinstance(cause, CheckpointWriteError):
            failure = CheckpointWriteError(f'could not write {path}: {cause.strerror or cause}; '
                                           f'the file there before (if any) is left as it was')
            failure.errno = cause.errno
            raise failure from err
        raise


def _keep_copy(path: Path, keep: Path) -> None:
    """`keep` becomes a complete copy of `path` in one rename: a hard link (no bytes copied), or a
    copy where the filesystem has no hard links."""
    with atomic_path(keep) as tmp:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def save_atomic(obj: Any, path: str | Path, keep_previous: str | Path | None = None) -> None:
    """torch.save to `path` via a temporary file in the same directory and an atomic rename
    (`keep_previous`: the replaced file's new name)."""
    with _atomic_file(path, 'wb', keep_previous) as f:
        torch.save(obj, f)


def write_text_atomic(text: str, path: str | Path) -> None:
    with _atomic_file(path, 'w') as f:
        f.write(text)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    with _atomic_file(path, 'wb') as f:
        f.write(data)
