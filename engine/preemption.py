"""Stop requests (SIGTERM from a scheduler, Ctrl-C): a flag every process agrees on after each step,
so the loop saves latest.pth at the current iteration and stops (`Preempted`)."""
from __future__ import annotations

import signal
import threading
import time

import torch

from util import dist


class Preempted(Exception):
    """A stop was requested; a checkpoint at the current iteration has been saved."""


SECOND_INTERRUPT_S = 1.0    # a SIGINT this soon after the first is the same request passed on (torchrun)


class Preemption:
    """Turns a stop request into a flag the loop checks after each step: SIGTERM (a scheduler's
    preemption or time limit, `kill`, `timeout`, torchrun passing on its own signal) or a first
    SIGINT (Ctrl-C). A second SIGINT, a second or more after the first, stops at once
    (KeyboardInterrupt). Installed in the main thread; `close` (or the end of its `with` block)
    restores the previous handlers."""

    def __init__(self):
        self.requested: str | None = None      # the signal's name
        self.first_interrupt = 0.0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_interrupt and now - self.first_interrupt > SECOND_INTERRUPT_S:
                raise KeyboardInterrupt
            self.first_interrupt = self.first_interrupt or now
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> 'Preemption':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def poll(self, device: torch.device, checkpoint_due: bool) -> tuple[bool, bool]:
        """(stop, save) agreed by every process: stop when any process was signalled, save when
        stopping or when any process finds a timed checkpoint due. One all-reduce per step."""
        flags = dist.all_reduce_sum(torch.tensor([float(self.requested is not None), float(checkpoint_due)], device=device))
        stop = bool(flags[0] > 0)
        return stop, stop or bool(flags[1] > 0)
