"""One owner per run directory: an exclusive lock on `<run_dir>/.lock`, held for the whole run.

The kernel releases the lock when the process that holds it ends, however it ends (an exception,
SIGKILL, a crashed node), so a lock is never left stuck; its text (host, pid, start time, command)
says who holds it while it is held (it is emptied on release). A POSIX record lock (`fcntl.lockf`), not `flock`: it
belongs to the trainer process alone, so the data-loader workers it forks do not inherit it and
keep it held after the trainer has ended (as they would an inherited flock), and it works on NFS.
A second run on the same directory finds the lock taken and stops before it writes anything there
(docs/robustness.md#one-run-per-directory).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = '.lock'


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory."""


class RunDirLock:
    """`RunDirLock(run_dir)` takes the lock (or raises `RunDirBusy` naming the owner); `release()`
    or the end of the process gives it back. The file stays: removing it would race with a run
    that has just opened it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: the text belongs to the owner until this process holds the lock.
        self.owned = False
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            owner = os.pread(self.fd, 4096, 0).decode(errors='replace').strip() or 'another process'
            self.release()
            raise RunDirBusy(f'{self.path.parent} is in use by a live run ({owner}); wait for it to end, '
                             f'stop it, or use another --save-path') from None
        self.owned = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, owner_text().encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Empty the owner text (nobody owns the directory now), then give the lock back. A process
        that ends without calling this (SIGKILL) leaves its text, but the kernel frees the lock."""
        if self.fd is not None:
            if self.owned:
                os.ftruncate(self.fd, 0)
            os.close(self.fd)        # releases the lock
            self.fd = None

    def __enter__(self) -> 'RunDirLock':
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner_text() -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())
    return (f'host {socket.gethostname()}, pid {os.getpid()}, started {started}, '
            f'command: {shlex.join([sys.executable] + sys.argv)}\n')
