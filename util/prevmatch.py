"""PrevMatch's previous guidance (Shin et al., arXiv 2405.20610; wooseok-shin/PrevMatch).

A FIFO bank of up to `cap` frozen snapshots of earlier models. Each step a random number
n ~ U{1..K} of them, chosen uniformly without replacement, is ensembled with Dirichlet(1) weights
on their *logits*; the ensemble's confident pseudo-labels (conf >= 0.9) give an extra cross-entropy
on the student's strong-view predictions, with weight lambda(e) triangular over the epochs:

    L = (L_x + w L_u + lambda(e) L_prev) / (1 + w + lambda(e))      (w = lossu_weight, 1 by default)

and L = (L_x + w L_u) / (1 + w) while the bank is empty. See SEED_METHODS.md section 1.

Port to the UniMatch V2 pipeline (the spec's section 1.3 proposals):
  * Snapshots run on the weak view only (B images, one forward per snapshot, in eval mode and under
    the step's autocast, as the EMA teacher); the CutMix partner is the reversed batch, so the
    ensemble's labels are mixed with each view's box like the teacher's.
  * What is snapshotted: the EMA teacher by default (`prev_source: ema`), the student optionally
    (PrevMatch's only model is its student; in an EMA pipeline the teacher is the natural analogue).
  * Trigger: 'best' (the paper: a new best validation mIoU of the snapshotted model, at or after
    `start_epoch`) or 'every' N epochs (default N = epochs // cap), which needs no validation set:
    choosing snapshots by the reported set is a form of test-set selection.
  * Storage: snapshots are state dicts, in bf16 on the device (default), fp32 on the device (as
    the official code) or fp32 in (pinned) CPU memory. They are copied into one fp32 runner model
    on the device before their forward, so every snapshot runs with the teacher's precision.
  * The bank (snapshots, their epochs, the best mIoU seen and its random generator) is part of the
    checkpoint: a resumed run has the same snapshots and continues the same random draws.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from util.losses import masked_unlabeled_loss

STORAGES = ('bf16', 'device', 'cpu')
TRIGGERS = ('best', 'every')
SOURCES = ('ema', 'student')
LOSSES = ('pixelwise', 'pixelavg', 'pixelavg_literal')


def guidance_weight(epoch: int, epochs: int, peak: float = 1.0) -> float:
    """lambda(e): rises linearly from 0 at epoch 0 to `peak` at epochs / 2, then falls back to 0."""
    half = epochs / 2
    frac = epoch / half if epoch < half else 1.0 - (epoch - half) / half
    return peak * max(0.0, frac)


def guidance_loss(pred: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
                  thresh: float, mode: str = 'pixelwise') -> torch.Tensor:
    """CE of a student prediction (B, K, H, W) on the ensemble's labels (B, H, W).

    pixelwise         (Pascal, COCO, ADE20K in the paper): CE on pixels with conf >= thresh, summed
                      and divided by the number of valid pixels (the unlabeled loss of this code).
    pixelavg          (the intent of the paper's Cityscapes mode): no threshold; each pixel's CE
                      weighted by its image's mean ensemble confidence (over valid pixels).
    pixelavg_literal  what the official code computes for pixelavg (inherited from SemiVL): the
                      mean valid CE times the *sum* over images of their mean confidence, about
                      B * mean conf times larger than pixelavg.
    """
    if mode == 'pixelwise':
        return masked_unlabeled_loss(pred, pseudo, conf, valid, thresh)
    ce = F.cross_entropy(pred.float(), pseudo, reduction='none')
    v = valid.float()
    n = v.sum().clamp(min=1)
    avgconf = (conf * v).sum((1, 2)) / v.sum((1, 2)).clamp(min=1)               # (B,)
    if mode == 'pixelavg':
        return (ce * avgconf[:, None, None] * v).sum() / n
    if mode == 'pixelavg_literal':
        return (ce * v).sum() / n * avgconf.sum()
    raise ValueError(f'prev loss must be one of {LOSSES}, got {mode!r}')


@dataclass
class Guidance:
    """Previous guidance for one step: the ensemble to run on the weak images and the loss weight."""
    ensemble: Callable[[torch.Tensor], torch.Tensor]   # weak images (B, 3, H, W) -> logits (B, K, H, W)
    weight: float                                      # lambda(e) at this epoch
    thresh: float = 0.9
    loss: str = 'pixelwise'


class SnapshotBank:
    """Up to `cap` frozen snapshots of a model, first in first out.

    template: a model of the snapshots' architecture; a copy of it on `device` is the runner that
        each snapshot is loaded into for its forward. storage: 'bf16' / 'device' / 'cpu' (see the
        module docstring). max_ensemble: K, the largest number of snapshots ensembled per step.
    """

    def __init__(self, template: nn.Module, cap: int = 8, max_ensemble: int = 3, storage: str = 'bf16',
                 device: torch.device | str = 'cpu', seed: int = 0, trigger: str = 'best', every: int = 1,
                 start_epoch: int = 0):
        if storage not in STORAGES:
            raise ValueError(f'prev storage must be one of {STORAGES}, got {storage!r}')
        if trigger not in TRIGGERS:
            raise ValueError(f'prev trigger must be one of {TRIGGERS}, got {trigger!r}')
        self.cap, self.max_ensemble, self.storage = cap, max_ensemble, storage
        self.trigger, self.every, self.start_epoch = trigger, max(1, every), start_epoch
        self.device = torch.device(device)
        self.runner = copy.deepcopy(template).to(self.device).eval().requires_grad_(False)
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.epochs: list[int] = []            # the epoch after which each snapshot was taken
        self.ids: list[int] = []               # to skip reloading the runner with what it holds
        self.best_miou = float('-inf')         # of the snapshotted model, for the 'best' trigger
        self.generator = torch.Generator().manual_seed(seed)
        self.last_choice: tuple[list[int], torch.Tensor] | None = None   # (indices, weights)
        self._loaded: int | None = None
        self._next_id = itertools.count()

    def __len__(self) -> int:
        return len(self.snapshots)

    # ---- storing ----------------------------------------------------------------------------

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.storage == 'cpu':
            t = t.to('cpu', copy=True)
            return t.pin_memory() if torch.cuda.is_available() else t
        dtype = torch.bfloat16 if (self.storage == 'bf16' and t.is_floating_point()) else t.dtype
        return t.to(self.device, dtype=dtype, copy=True)

    @torch.no_grad()
    def add(self, model: nn.Module, epoch: int = -1) -> None:
        """Store a frozen copy of `model`'s state; the oldest snapshot goes when `cap` are held."""
        self.snapshots.append({k: self._store(v) for k, v in model.state_dict().items()})
        self.epochs.append(epoch)
        self.ids.append(next(self._next_id))
        if len(self.snapshots) > self.cap:
            del self.snapshots[0], self.epochs[0], self.ids[0]

    def end_of_epoch(self, epoch: int, model: nn.Module, miou: float | None) -> bool:
        """The snapshot rule, after epoch `epoch` was evaluated: snapshot `model` when its mIoU is a
        new best ('best') or every `every` epochs ('every'), from epoch `start_epoch` on (the paper
        checks at the start of epoch e >= base_only_epoch for the model after epoch e - 1).
        Returns whether a snapshot was taken."""
        new_best = miou is not None and miou > self.best_miou
        if new_best:
            self.best_miou = miou
        due = new_best if self.trigger == 'best' else (epoch + 1) % self.every == 0
        if due and epoch + 1 >= self.start_epoch:
            self.add(model, epoch)
            return True
        return False

    # ---- the ensemble ---------------------------------------------------------------------------

    def sample(self) -> tuple[list[int], torch.Tensor]:
        """Indices of n ~ U{1..K} snapshots (at most all held), without replacement, and their
        Dirichlet(1) weights (normalised Exp(1) draws), from the bank's own generator."""
        if not self.snapshots:
            raise RuntimeError('the snapshot bank is empty')
        n = int(torch.randint(1, self.max_ensemble + 1, (1,), generator=self.generator))
        chosen = torch.randperm(len(self.snapshots), generator=self.generator)[:n].tolist()
        w = torch.empty(len(chosen)).exponential_(generator=self.generator)
        return chosen, w / w.sum()

    @torch.no_grad()
    def _load(self, i: int) -> None:
        if self._loaded != self.ids[i]:
            state = self.snapshots[i]
            for name, t in itertools.chain(self.runner.named_parameters(), self.runner.named_buffers()):
                if name in state:
                    t.copy_(state[name], non_blocking=True)
            self._loaded = self.ids[i]

    @torch.no_grad()
    def forward_one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of snapshot i on x (eval mode, the caller's autocast)."""
        self._load(i)
        return self.runner(x)

    @torch.no_grad()
    def sample_ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """sum_i w_i f_i(x) over a random subset of snapshots, in fp32: (B, 3, H, W) -> (B, K, H, W).
        The draw is kept in `last_choice`."""
        chosen, weights = self.sample()
        self.last_choice = (chosen, weights)
        out = None
        for i, w in zip(chosen, weights.tolist()):
            z = self.forward_one(i, x).float() * w
            out = z if out is None else out + z
        return out

    # ---- checkpoint ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {'snapshots': self.snapshots, 'epochs': list(self.epochs), 'best_miou': self.best_miou,
                'generator': self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        keep = slice(-self.cap, None)       # a smaller cap than the saved run's keeps the newest
        self.snapshots = [{k: self._store(v) for k, v in s.items()} for s in state['snapshots'][keep]]
        self.epochs = list(state['epochs'][keep])
        self.ids = [next(self._next_id) for _ in self.snapshots]
        self.best_miou = float(state['best_miou'])
        self.generator.set_state(state['generator'])
        self._loaded = None
