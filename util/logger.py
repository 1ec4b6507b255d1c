"""Run logging: a log file and console lines on the main process, TensorBoard scalars, running means."""
from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

from util import dist


def get_logger(run_dir: str | Path | None = None, name: str = 'semiseg') -> logging.Logger:
    """Console + `<run_dir>/train.log` on the main process; warnings only elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    fmt = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None and dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / 'train.log')
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger



def to_file_only(logger: logging.Logger, msg: str, exc_info=None) -> bool:
    """An error line (with `exc_info`'s traceback) into train.log only, not on the console; False
    when there is no train.log yet."""
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, None, exc_info)
    for h in files:
        h.handle(record)
    return bool(files)


class TensorBoard:
    """SummaryWriter on the main process, nothing elsewhere (and nothing if tensorboard is missing)."""

    def __init__(self, run_dir: str | Path):
        self.writer = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / 'tb'))

    def scalars(self, values: dict[str, float], step: int, prefix: str = '') -> None:
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
