"""Ending a failed process at once: its error on one line, its child processes killed, a hard exit.

A trainer that fails with data-loader workers alive must not wait for them: multiprocessing's exit
handler terminates (SIGTERM) and joins them, and they ignore SIGTERM (a stop request is the
trainer's to handle, `engine/data.py: _init_worker`), so the process would never end. `hard_exit`
kills them (SIGKILL) and leaves with `os._exit`, past every exit handler, once the streams and the
log are flushed.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys

WORKER_TRACEBACK = 'Original Traceback (most recent call last):'   # torch's re-raised worker error


def one_line(err: BaseException) -> str:
    """`<Type>: <message>` on one line. An error torch re-raises from a data-loader worker
    ('Caught OSError in DataLoader worker process 0.' + the worker's traceback) is named by the
    worker's own last line: 'OSError in DataLoader worker process 0: image file is truncated'."""
    text = str(err)
    if WORKER_TRACEBACK in text:
        where, _, trace = text.partition(WORKER_TRACEBACK)
        last = next((line.strip() for line in reversed(trace.splitlines()) if line.strip()), type(err).__name__)
        where = where.strip().rstrip('.').removeprefix('Caught ')
        return f'{last} (raised in {where.split(" in ", 1)[-1]})'
    first = next((line.strip() for line in text.splitlines() if line.strip()), '')
    return f'{type(err).__name__}: {first}' if first else type(err).__name__


def end_child_processes(timeout_s: float = 2.0) -> None:
    """SIGKILL every process this one started through multiprocessing (data-loader workers) and
    reap them. SIGCHLD goes back to its default first: torch's handler would raise an error for a
    worker that dies, which is now expected."""
    if hasattr(signal, 'SIGCHLD'):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        try:
            child.kill()
        except (OSError, ValueError):       # already gone, or closed
            pass
    for child in children:
        child.join(timeout_s)


def hard_exit(code: int) -> None:
    """Flush the streams and every log handler, kill the children, end the process now."""
    for handler in logging.getLogger('semiseg').handlers:
        try:
            handler.flush()
        except Exception:       # a full disk: the exit must not depend on the log
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    end_child_processes()
    os._exit(code)
