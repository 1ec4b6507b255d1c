"""How an entry script ends when something fails (`guarded`): one line on stderr, the traceback in
train.log, every process and data-loader worker ended, exit status 1; a stop request exits 0."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from dataset.checks import DataError
from engine.loop import NonFiniteLoss
from engine.preemption import Preempted
from model import WeightsMismatchError
from util import dist
from util.checkpoint import CheckpointWriteError, NotACheckpointError, UnsafeCheckpointError
from util.config import ConfigError
from util.exits import hard_exit, one_line
from util.logger import to_file_only
from util.run_lock import RunDirBusy

# Errors whose message says all (the key, file or line and what to do): printed as they are.
EXPLAINED_ERRORS = (DataError, ConfigError, WeightsMismatchError, UnsafeCheckpointError, NotACheckpointError,
                    CheckpointWriteError, NonFiniteLoss, RunDirBusy, FileNotFoundError)


INTERRUPTED_EXIT = 130     # 128 + SIGINT, what shells report for a job ended by Ctrl-C


def guarded(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap an entry script's main. A preempted run exits 0 after its checkpoint. Any failure -- a
    step, a data-loader worker, the evaluation, a save; any exception -- ends with one line on
    stderr, `error: <message>` (`error: <Type>: <message>` for an unexpected one), the traceback in
    train.log when the run has one, and exit status 1 (130 for a Ctrl-C that is not a stop
    request). From the command line the end is `hard_exit`: data-loader workers (which ignore
    SIGTERM, `_init_worker`) are killed and no exit handler can wait for them. Called with
    arguments (tests, notebooks) it raises SystemExit instead."""
    def wrapper(*args, **kwargs):
        from_command_line = not args and not kwargs      # main() parses sys.argv: this process is the run
        try:
            return main(*args, **kwargs)
        except Preempted:
            logging.getLogger('semiseg').info('stopped on request: checkpoint saved, exiting')
            dist.cleanup()
            raise SystemExit(0)
        except SystemExit:
            raise
        except BaseException as err:            # noqa: BLE001 -- every failure ends the same way
            code = report_failure(err)
        if from_command_line:
            hard_exit(code)
        raise SystemExit(code)
    return wrapper


def report_failure(err: BaseException) -> int:
    """The one line on stderr -- and, for an unexpected error, its traceback in train.log (or in a
    file the line names, before there is a train.log); the exit status. An explained error (a
    check's: the key, file or line) leaves the run directory as it was."""
    logging.raiseExceptions = False             # a full disk: the log's own write errors stay off the console
    log = logging.getLogger('semiseg')
    if isinstance(err, KeyboardInterrupt):
        to_file_only(log, 'interrupted (Ctrl-C): exiting without a checkpoint')
        print('error: interrupted (Ctrl-C); the last checkpoint is left as it was', file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    if isinstance(err, EXPLAINED_ERRORS):      # found by a check, often before the run may write anything
        if dist.is_main() or not isinstance(err, NonFiniteLoss):     # every process finds a NaN; one says so
            print(f'error: {err}', file=sys.stderr, flush=True)
        return 1
    line = one_line(err)
    if not to_file_only(log, f'error: {line}', (type(err), err, err.__traceback__)):
        trace = Path(tempfile.gettempdir()) / f'semiseg-error-{os.getpid()}.txt'
        trace.write_text(''.join(traceback.format_exception(err)))
        line += f' (traceback in {trace})'
    prefix = f'rank {dist.rank()}: ' if dist.world_size() > 1 else ''
    print(f'error: {prefix}{line}', file=sys.stderr, flush=True)
    return 1
