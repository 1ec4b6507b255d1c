"""EMA teacher: an unwrapped copy of the student, always in eval mode, updated without autograd."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_ratio(step: int, decay: float = 0.996) -> float:
    """The original's schedule: 0 at step 0 (a copy), a plain running mean until 1 - 1/(t+1) reaches
    `decay` (step 249 for 0.996), then `decay`."""
    return min(1.0 - 1.0 / (step + 1), decay)


class EMATeacher:
    def __init__(self, student: nn.Module, decay: float = 0.996):
        self.decay = decay
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _tensors(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Floating-point parameters and buffers of both models, in the same order.
        ema = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        src = [t for t in (*student.parameters(), *student.buffers()) if t.is_floating_point()]
        assert len(ema) == len(src), 'student and teacher differ in structure'
        return ema, src

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """ema = r * ema + (1 - r) * student over parameters and buffers, r = ema_ratio(step)."""
        ema, src = self._tensors(student)
        ratio = ema_ratio(step, self.decay)
        torch._foreach_lerp_(ema, [s.detach().to(e.dtype) for e, s in zip(ema, src)], 1.0 - ratio)

    @torch.no_grad()
    def update_loop(self, student: nn.Module, step: int) -> None:
        """The original's per-tensor Python loop (kept for the benchmark's `original` recipe)."""
        ratio = ema_ratio(step, self.decay)
        for e, s in zip(*self._tensors(student)):
            e.copy_(e * ratio + s.detach() * (1 - ratio))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
