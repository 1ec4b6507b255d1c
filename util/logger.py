"""Run logging: a log file and console lines on the main process, TensorBoard scalars, running means."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from collections import defaultdict
from pathlib import Path

from util import dist


FORMAT = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%Y-%m-%d %H:%M:%S')


def get_logger(run_dir: str | Path | None = None, name: str = 'semiseg', hold: bool = False) -> logging.Logger:
    """Console + `<run_dir>/train.log` on the main process; warnings only elsewhere. `hold`: the
    lines logged until `open_log_file` are kept and written into train.log then (a run writes
    nothing into its directory before it is built, checked, and the directory is its own)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(FORMAT)
    logger.addHandler(console)
    if hold:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))
    elif run_dir is not None:
        open_log_file(logger, run_dir)
    return logger


def open_log_file(logger: logging.Logger, run_dir: str | Path) -> None:
    """Append to `<run_dir>/train.log` from now on (main process), after the lines held so far."""
    held = [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    for h in held:
        logger.removeHandler(h)
    if dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / 'train.log')
        handler.setFormatter(FORMAT)
        logger.addHandler(handler)
        for h in held:
            for record in h.buffer:
                handler.handle(record)
    for h in held:
        h.buffer.clear()
        h.close()


def to_file_only(logger: logging.Logger, msg: str, exc_info=None) -> bool:
    """An error line (with `exc_info`'s traceback) into train.log only, not on the console; False
    when there is no train.log yet."""
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, None, exc_info)
    for h in files:
        h.handle(record)
    return bool(files)


class TensorBoard:
    """SummaryWriter on the main process, nothing elsewhere; made (with `<run_dir>/tb/`) at the first
    scalar, so that building a run writes nothing into its directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir, self.writer = Path(run_dir), None

    def scalars(self, values: dict[str, float], step: int, prefix: str = '') -> None:
        if self.writer is None and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / 'tb'))
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Meter:
    """Running means of named scalars."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def state_dict(self) -> dict:
        return {'sums': dict(self.sums), 'counts': dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.update(state['sums'])
        self.counts.update(state['counts'])

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def __str__(self) -> str:
        return ', '.join(f'{k}: {v:.4f}' for k, v in self.means().items())
