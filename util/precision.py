"""Mixed precision: `precision: bf16 | fp16 | fp32` in the config.

Forward passes run under autocast; softmax of pseudo-labels, confidences and every loss are computed
in fp32 by the code that uses them (`.float()` on logits). fp16 gets a gradient scaler.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in DTYPES:
            raise ValueError(f'precision must be one of {sorted(DTYPES)}, got {name!r}')
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == 'fp16' else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == 'fp32':
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step on the accumulated gradients, then clear them."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.backward(loss)
        self.step(optimizer)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
