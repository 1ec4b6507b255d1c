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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LossMethod, register
from methods.step import StepContext, Term
from util import dist
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

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        keep = slice(-self.cap, None)       # a smaller cap than the saved run's keeps the newest
        self.snapshots = [{k: self._store(v) for k, v in s.items()} for s in state['snapshots'][keep]]
        self.epochs = list(state['epochs'][keep])
        self.ids = [next(self._next_id) for _ in self.snapshots]
        self.best_miou = float(state['best_miou'])
        self.generator.set_state(state['generator'])
        self._loaded = None


# ---- the method ------------------------------------------------------------------------------------

@dataclass
class Keys:
    prev_weight: float | None = None     # peak of lambda(e); null = 1 for method prevmatch, 0 (off) otherwise
    prev_thresh: float = 0.9             # confidence of the ensemble's pseudo-labels
    prev_snapshots: int = 8              # L_max: snapshots kept (FIFO); the paper: 5 for COCO/ADE20K
    prev_ensemble: int = 3               # K: at most this many snapshots ensembled per step
    prev_trigger: str = 'best'           # 'best' val mIoU of the snapshotted model, or 'every' N epochs
    prev_every: int = 0                  # N for 'every' (0 = epochs // prev_snapshots)
    prev_start_epoch: int = 0            # no snapshot before this epoch (the paper's base_only_epoch)
    prev_source: str = 'ema'             # snapshot the EMA teacher or the student
    prev_storage: str = 'bf16'           # snapshots in bf16 on the device, fp32 on the 'device', or 'cpu'
    prev_loss: str = 'pixelwise'         # or 'pixelavg' / 'pixelavg_literal' (the paper's Cityscapes mode)


@register
class PrevMatch(LossMethod):
    """UniMatch V2 + previous guidance. Also on any other semi-supervised method with
    `prev_weight` > 0; its streams weigh the guidance like L_u (UniMatch V1: 0.25 / 0.25 / 0.5)."""
    name = 'prevmatch'
    summary = 'UniMatch V2 + guidance from earlier snapshots (or prev_weight=1 on any method)'
    Keys = Keys
    benchmark_recipe = True
    state_key = 'prev_bank'
    weight_key = 'prev_weight'      # the peak of lambda(e)

    @classmethod
    def check(cls, cfg, need) -> None:
        super().check(cfg, need)
        for key, choices in (('prev_trigger', TRIGGERS), ('prev_source', SOURCES), ('prev_storage', STORAGES),
                             ('prev_loss', LOSSES)):
            need(getattr(cfg, key) in choices, key, f'must be one of {choices}, got {getattr(cfg, key)!r}')
        need(0.0 <= cfg.prev_thresh <= 1.0, 'prev_thresh', f'must be in [0, 1], got {cfg.prev_thresh}')
        for key in ('prev_snapshots', 'prev_ensemble'):
            need(getattr(cfg, key) >= 1, key, f'must be >= 1, got {getattr(cfg, key)}')
        for key in ('prev_every', 'prev_start_epoch'):
            need(getattr(cfg, key) >= 0, key, f'must be >= 0, got {getattr(cfg, key)}')

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        every = cfg.prev_every or max(1, cfg.epochs // cfg.prev_snapshots)
        self.bank = SnapshotBank(student, cfg.prev_snapshots, cfg.prev_ensemble, cfg.prev_storage, device,
                                 seed=cfg.seed + dist.rank(), trigger=cfg.prev_trigger, every=every,
                                 start_epoch=cfg.prev_start_epoch)
        self.state = self.bank
        self.lam = 0.0             # lambda(e) of the coming step

    @classmethod
    def for_benchmark(cls, cfg, student, device) -> 'PrevMatch':
        m = cls(replace(cfg, prev_weight=1.0), student, device)
        for _ in range(cfg.prev_snapshots):
            m.bank.add(student)
        m.lam = 1.0
        return m

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        self.lam = guidance_weight(epoch, self.cfg.epochs, self.weight(self.cfg))

    def terms(self, s: StepContext, out: dict) -> dict[str, Term]:
        """L_prev: each stream's CE on the snapshot ensemble's confident labels, CutMix-ed like the
        teacher's, weighted like the stream in L_u; it joins the weighted mean (shared)."""
        if len(self.bank) == 0 or self.lam <= 0:
            return {}
        valid = s.batch_u['valid']
        with torch.no_grad():
            conf, pseudo = self.bank.sample_ensemble(s.batch_u['image']).float().softmax(1).max(1)
        loss = sum(w * guidance_loss(pred, *t, self.cfg.prev_thresh, self.cfg.prev_loss)
                   for (_, pred, _, w), t in zip(s.streams, s.mixed((pseudo, conf, valid))))
        out['prev_weight'] = loss.new_tensor(self.lam)
        out['prev_mask_ratio'] = ((conf >= self.cfg.prev_thresh) & valid).sum() / valid.sum().clamp(min=1)
        return {'loss_prev': Term(loss, self.lam, shared=True)}

    def end_of_epoch(self, epoch, student, teacher, result, result_ema, log) -> None:
        """The snapshot rule for the configured source (EMA teacher or student) and its mIoU; before
        the checkpoint, so that a resumed run holds the snapshot."""
        ema = self.cfg.prev_source == 'ema' and teacher is not None
        model, res = (teacher.model, result_ema) if ema else (student, result)
        if self.bank.end_of_epoch(epoch, model, res['miou']):
            log.info(f'PrevMatch: snapshot of the {"EMA teacher" if ema else "student"} after epoch '
                     f'{epoch} ({len(self.bank)}/{self.bank.cap} held)')
