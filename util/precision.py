"""Mixed precision: `precision: auto | bf16 | fp16 | fp32` in the config.

`auto` (the default) is bf16 where the device multiplies bf16 matrices in hardware and fp32 where
it would emulate them: on an AVX2-only CPU (AMD EPYC without AVX-512 BF16) a bf16 step of the toy
takes about 6x a fp32 one (docs/speed.md).

Forward passes run under autocast; softmax of pseudo-labels, confidences and every loss are computed
in fp32 by the code that uses them (`.float()` on logits). fp16 gets a gradient scaler.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` has bf16 matrix products in hardware: a CUDA GPU that supports bf16, or a
    CPU with AMX tiles or AVX-512 BF16 instructions."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_precision(name: str, device: torch.device | str) -> str:
    """The precision a run on `device` uses: 'auto' is bf16 where `native_bf16`, else fp32; any other
    name is taken as it is."""
    if name != 'auto':
        return name
    return 'bf16' if native_bf16(device) else 'fp32'


class Precision:
    def __init__(self, name: str, device: torch.device):
        name = resolve_precision(name, device)
        if name not in DTYPES:
            raise ValueError(f"precision must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
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
