"""U2PL / U2PL+ (Wang et al., CVPR'22 and the journal extension; SEED_METHODS.md section 3) on the
UniMatch V2 step. Implemented from the paper's equations, not the official code (its one-hot
helper fills only the first image and its negative mask contradicts Eqs. 25-28; spec 3.6).

Per step (docs/u2pl_allspark.md gives every decision):
  * the EMA teacher labels the weak view and, with a second no-grad forward, the labeled images;
    it returns probabilities and representations (model/u2pl.py);
  * entropy partition: gamma_t = the (1 - alpha_t) quantile of the weak-view entropy over valid
    pixels, alpha_t = alpha0 (1 - epoch / epochs); entropy < gamma_t is reliable;
  * L_u: UniMatch V2's confidence-masked CE (default 'conf'), or the paper's reliable-pixel CE
    ('entropy') or U2PL+'s symmetric CE on reliable pixels ('sce');
  * L_c (Eq. 10) at the representation resolution (nearest-downsampled labels and probabilities):
    anchors = student reps of x_l (y = c, p_t(c) > delta_p) and of each strong view (reliable
    mixed pseudo-label c, p_t(c) > delta_p); positive = mean teacher rep of those candidates over
    every process, or its momentum average (U2PL+); negatives sampled from class queues;
  * negatives (Eqs. 25-28), each pixel once from x_l and the unmixed weak view: labeled pixel for
    c when y != c and rank(c) < r_l; unlabeled pixel for c when it is unreliable and
    r_l <= rank(c) < r_h. Teacher reps of negatives from every process go into per-class FIFOs.
  * L = (L_x + w L_u) / (1 + w) + lambda_c L_c (lambda_c = 0 during the warm-up, queues filling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from util import dist
from util.losses import IGNORE_INDEX, cutmix
from util.steps import Batch, SemiOptions, mix_strong_views, strong_losses

UNSUP_LOSSES = ('conf', 'entropy', 'sce')
EPS = 1e-10


# ---- the entropy partition and the negative masks ---------------------------------------------------

def unreliable_share(epoch: int, epochs: int, alpha0: float = 0.2) -> float:
    """alpha_t = alpha0 (1 - t / T), per epoch (paper Eq. 13)."""
    return alpha0 * (1.0 - epoch / epochs)


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities -> (B, H, W) entropy."""
    return -(prob * torch.log(prob + EPS)).sum(1)


def entropy_threshold(ent: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """gamma_t: the (1 - alpha) quantile of `ent` over valid pixels (kthvalue: no 16M-element
    limit). Pixels with entropy > gamma are the unreliable ~alpha share. inf without valid pixels."""
    values = ent[valid].float()
    if values.numel() == 0:
        return ent.new_tensor(float('inf'))
    k = min(values.numel(), max(1, math.ceil((1.0 - alpha) * values.numel())))
    return values.kthvalue(k).values


def class_ranks(prob: torch.Tensor) -> torch.Tensor:
    """O(c): rank of each class in the descending order of the pixel's probabilities (0 = argmax);
    (B, K, H, W) long."""
    return prob.argsort(1, descending=True).argsort(1)


def labeled_negatives(prob: torch.Tensor, label: torch.Tensor, low_rank: int) -> torch.Tensor:
    """Eq. 26: n_l(c) = [y != c] [O(c) < r_l] on labeled pixels (not ignored); (B, K, H, W) bool."""
    k = prob.shape[1]
    classes = torch.arange(k, device=prob.device).view(1, k, 1, 1)
    known = (label != IGNORE_INDEX)[:, None]
    return known & (label[:, None] != classes) & (class_ranks(prob) < low_rank)


def unlabeled_negatives(prob: torch.Tensor, unreliable: torch.Tensor, low_rank: int, high_rank: int
                        ) -> torch.Tensor:
    """Eq. 28: n_u(c) = [H > gamma] [r_l <= O(c) < r_h]; (B, K, H, W) bool."""
    rank = class_ranks(prob)
    return unreliable[:, None] & (rank >= low_rank) & (rank < high_rank)


# ---- memory: class queues of negative keys and momentum prototypes ----------------------------------

class ClassQueues:
    """One FIFO of key vectors per class, each at most `sizes[c]` long (a preallocated ring
    buffer, made on the device of the first keys pushed). Memory bound: sum(sizes) * dim * 4 bytes."""

    def __init__(self, sizes: list[int], dim: int):
        self.sizes, self.dim = list(sizes), dim
        self.data: list[torch.Tensor | None] = [None] * len(sizes)
        self.ptr = [0] * len(sizes)
        self.count = [0] * len(sizes)

    def bound_bytes(self) -> int:
        return sum(self.sizes) * self.dim * 4

    @torch.no_grad()
    def push(self, c: int, keys: torch.Tensor) -> None:
        """Append keys (n, dim); the oldest leave once the queue is full (only the newest
        sizes[c] of a larger push are kept)."""
        cap = self.sizes[c]
        keys = keys.detach()[-cap:]
        n = keys.shape[0]
        if n == 0:
            return
        if self.data[c] is None:
            self.data[c] = keys.new_zeros(cap, self.dim, dtype=torch.float32)
        idx = (self.ptr[c] + torch.arange(n, device=keys.device)) % cap
        self.data[c][idx] = keys.float()
        self.ptr[c] = (self.ptr[c] + n) % cap
        self.count[c] = min(self.count[c] + n, cap)

    def get(self, c: int) -> torch.Tensor:
        """Class c's keys, oldest first: (count, dim)."""
        data, n = self.data[c], self.count[c]
        if data is None:
            return torch.zeros(0, self.dim)
        if n < self.sizes[c]:
            return data[:n]
        return torch.cat((data[self.ptr[c]:], data[:self.ptr[c]]))

    def state_dict(self) -> dict:
        return {'keys': [self.get(c).clone() for c in range(len(self.sizes))]}

    def load_state_dict(self, state: dict, device: torch.device | str = 'cpu') -> None:
        self.data = [None] * len(self.sizes)
        self.ptr, self.count = [0] * len(self.sizes), [0] * len(self.sizes)
        for c, keys in enumerate(state['keys'][:len(self.sizes)]):
            self.push(c, keys.to(device))


class U2PLMemory:
    """What U2PL carries from step to step: the negative-key queues and, for U2PL+, the momentum
    class prototypes (momentum 0: the batch mean each step, U2PL)."""

    def __init__(self, nclass: int, dim: int = 256, queue_size: int = 30000, queue_size_bg: int = 50000,
                 momentum: float = 0.0):
        self.queues = ClassQueues([queue_size_bg] + [queue_size] * (nclass - 1), dim)
        self.momentum = momentum
        self.prototypes: torch.Tensor | None = None       # (K, dim)
        self.proto_valid: torch.Tensor | None = None      # (K,) bool

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, masks: torch.Tensor) -> None:
        """keys (P, dim) with their negative-class masks (P, K), gathered from every process
        (the same order everywhere, so the queues stay identical across processes)."""
        keys = dist.all_gather_cat(keys.float().contiguous())
        masks = dist.all_gather_cat(masks.to(torch.uint8).contiguous()).bool()
        for c in range(masks.shape[1]):
            self.queues.push(c, keys[masks[:, c]])

    @torch.no_grad()
    def positives(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive keys (K, dim) and which exist (K,), from per-class sums and counts of teacher
        reps over anchor candidates, summed over processes: the batch mean, or (momentum > 0) the
        prototype m * proto + (1 - m) * batch mean, started at the first batch mean."""
        sums, counts = dist.all_reduce_sum(sums.float().clone()), dist.all_reduce_sum(counts.float().clone())
        present = counts > 0
        mean = sums / counts.clamp(min=1)[:, None]
        if self.momentum <= 0:
            return mean, present
        if self.prototypes is None:
            self.prototypes, self.proto_valid = torch.zeros_like(mean), torch.zeros_like(present)
        fresh = present & ~self.proto_valid
        upd = present & self.proto_valid
        self.prototypes[fresh] = mean[fresh]
        self.prototypes[upd] = self.momentum * self.prototypes[upd] + (1 - self.momentum) * mean[upd]
        self.proto_valid |= present
        return self.prototypes, self.proto_valid

    def state_dict(self) -> dict:
        return {'queues': self.queues.state_dict(), 'prototypes': self.prototypes,
                'proto_valid': self.proto_valid}

    def load_state_dict(self, state: dict, device: torch.device | str = 'cpu') -> None:
        self.queues.load_state_dict(state['queues'], device)
        self.prototypes = state['prototypes'].to(device) if state.get('prototypes') is not None else None
        self.proto_valid = state['proto_valid'].to(device) if state.get('proto_valid') is not None else None


# ---- losses -------------------------------------------------------------------------------------------

def contrastive_loss(anchors: list[torch.Tensor], positives: torch.Tensor, present: torch.Tensor,
                     queues: ClassQueues, num_anchors: int = 256, num_negatives: int = 50,
                     temperature: float = 0.5) -> torch.Tensor | None:
    """Eq. 10: mean over classes c (with anchors, a positive key and negatives) and M anchors
    (sampled with replacement) of -log softmax of [<a, z_c+>, <a, z_cj->]_{j=1..N} / tau, cosine
    similarities, N negatives per anchor sampled uniformly with replacement from queue c.
    None when no class qualifies."""
    losses = []
    for c, a in enumerate(anchors):
        neg = queues.get(c)
        if a.shape[0] == 0 or not bool(present[c]) or neg.shape[0] == 0:
            continue
        neg = neg.to(a.device)
        anc = F.normalize(a[torch.randint(a.shape[0], (num_anchors,), device=a.device)].float(), dim=1)
        negs = F.normalize(neg[torch.randint(neg.shape[0], (num_anchors, num_negatives), device=a.device)], dim=-1)
        pos = F.normalize(positives[c].float(), dim=0)
        logits = torch.cat(((anc @ pos)[:, None], torch.einsum('md,mnd->mn', anc, negs)), 1) / temperature
        losses.append(F.cross_entropy(logits, logits.new_zeros(num_anchors, dtype=torch.long)))
    return torch.stack(losses).mean() if losses else None


def reliable_loss(logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor, mode: str,
                  sce: tuple[float, float] = (1.0, 0.1)) -> torch.Tensor:
    """Paper Eq. 14 with lambda_u = BHW / #kept: the mean over kept (reliable, valid) pixels of CE
    ('entropy') or of xi1 CE + xi2 reverse CE with the one-hot clamped to [1e-4, 1] ('sce')."""
    ce = F.cross_entropy(logits.float(), pseudo, reduction='none')
    if mode == 'sce':
        prob = logits.float().softmax(1)
        onehot = F.one_hot(pseudo, logits.shape[1]).permute(0, 3, 1, 2).float().clamp(1e-4, 1.0)
        ce = sce[0] * ce + sce[1] * -(prob * onehot.log()).sum(1)
    return (ce * keep).sum() / keep.sum().clamp(min=1)


# ---- the step ----------------------------------------------------------------------------------------

@dataclass
class U2PLOptions:
    memory: U2PLMemory
    weight: float = 1.0              # lambda_c at this step (0 during the warm-up)
    alpha: float = 0.2               # alpha_t, the unreliable share at this epoch
    low_rank: int = 3
    high_rank: int = 20
    num_anchors: int = 256
    num_negatives: int = 50
    temperature: float = 0.5
    anchor_thresh: float = 0.3       # delta_p
    unsup: str = 'conf'              # L_u: 'conf' (UniMatch V2), 'entropy' (U2PL) or 'sce' (U2PL+)
    sce: tuple[float, float] = (1.0, 0.1)


def _down(t: torch.Tensor, size) -> torch.Tensor:
    """Nearest downsampling of (B, H, W) or (B, K, H, W) to `size`, dtype kept."""
    x = t if t.dim() == 4 else t[:, None]
    out = F.interpolate(x.float(), size=tuple(size), mode='nearest')
    out = out if t.dim() == 4 else out[:, 0]
    return out.to(t.dtype)


def u2pl_step(student: nn.Module, teacher, batch_l: Batch, batch_u: Batch, criterion: nn.Module,
              opt: SemiOptions, u2pl: U2PLOptions) -> dict[str, torch.Tensor]:
    x, y = batch_l['image'], batch_l['mask']
    valid = batch_u['valid']
    with torch.no_grad():
        logits_w, rep_w = teacher(batch_u['image'], need_rep=True)
        logits_tl, rep_tl = teacher(x, need_rep=True)
        prob_w, prob_tl = logits_w.float().softmax(1), logits_tl.float().softmax(1)
    conf, pseudo = prob_w.max(1)
    gamma = entropy_threshold(entropy(prob_w), valid, u2pl.alpha)

    strong, targets = mix_strong_views(batch_u, pseudo, conf, opt.views)
    logits, rep = student(torch.cat([x, *strong]), comp_drop=opt.comp_drop, n_clean=len(x), need_rep=True)
    sizes = [len(x)] + [len(s) for s in strong]
    pred_x, *pred_s = logits.split(sizes)
    rep_x, *rep_s = rep.split(sizes)

    out = {'loss_x': criterion(pred_x, y)}
    if u2pl.unsup == 'conf':
        out.update(strong_losses(pred_s, targets, opt.conf_thresh))
    else:
        reliable = entropy(prob_w) < gamma
        for v, (pred, (ps, _, val)) in enumerate(zip(pred_s, targets), start=1):
            keep = cutmix(reliable, batch_u['boxes'][:, v - 1]) & val
            out[f'loss_s{v}'] = reliable_loss(pred, ps, keep, u2pl.unsup, u2pl.sce)
    loss_u = sum(out[f'loss_s{v}'] for v in range(1, opt.views + 1)) / opt.views

    loss_c, stats = contrastive_term(u2pl, gamma, y, valid, batch_u['boxes'], prob_w, rep_w, prob_tl, rep_tl,
                                     rep_x, rep_s)
    if loss_c is None:          # no class qualifies: keep the rep head in the graph (DDP)
        loss_c = rep.float().sum() * 0.0
    out['loss'] = (out['loss_x'] + opt.lossu_weight * loss_u) / (1 + opt.lossu_weight) + u2pl.weight * loss_c
    out['loss_u'] = loss_u
    out['loss_c'] = loss_c         # logged during the warm-up too, where its weight is 0
    out['u2pl_weight'] = loss_c.new_tensor(u2pl.weight)
    out['mask_ratio'] = ((conf >= opt.conf_thresh) & valid).sum() / valid.sum().clamp(min=1)
    out.update(stats)
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


def contrastive_term(u2pl: U2PLOptions, gamma: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                     boxes: torch.Tensor, prob_w: torch.Tensor, rep_w: torch.Tensor, prob_tl: torch.Tensor,
                     rep_tl: torch.Tensor, rep_x: torch.Tensor, rep_s: list[torch.Tensor]
                     ) -> tuple[torch.Tensor | None, dict]:
    """Enqueue this step's negatives, then L_c over labeled and strong-view anchors. Everything at
    the representation resolution (B, D, h, w); labels, masks and probabilities nearest-downsampled."""
    size, k = rep_w.shape[-2:], prob_w.shape[1]
    with torch.no_grad():
        prob_w, prob_tl = _down(prob_w, size), _down(prob_tl, size)
        y, valid = _down(y, size), _down(valid, size)
        ent = entropy(prob_w)
        reliable, unreliable = (ent < gamma) & valid, (ent > gamma) & valid
        # negatives: every pixel once (labeled images and the unmixed weak view), teacher reps
        neg = torch.cat((labeled_negatives(prob_tl, y, u2pl.low_rank),
                         unlabeled_negatives(prob_w, unreliable, u2pl.low_rank, u2pl.high_rank)))
        keys = torch.cat((rep_tl, rep_w)).permute(0, 2, 3, 1).reshape(-1, rep_w.shape[1])
        neg = neg.permute(0, 2, 3, 1).reshape(-1, k)
        has = neg.any(1)
        u2pl.memory.enqueue(keys[has], neg[has])

        # anchor candidates: labels, their teacher probability, eligibility; teacher reps
        conf_w, pseudo_w = prob_w.max(1)
        p_l = prob_tl.gather(1, y.clamp(max=k - 1)[:, None].long())[:, 0]
        labels = [y.long()]
        eligible = [(y != IGNORE_INDEX) & (p_l > u2pl.anchor_thresh)]
        teacher_reps = [rep_tl]
        for v in range(len(rep_s)):
            box = _down(boxes[:, v], size)
            labels.append(cutmix(pseudo_w, box))
            eligible.append(cutmix(reliable & (conf_w > u2pl.anchor_thresh), box))
            teacher_reps.append(cutmix(rep_w, box))
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
        labels, eligible = torch.cat([t.flatten() for t in labels]), torch.cat([t.flatten() for t in eligible])
        t_reps = torch.cat([flat(t) for t in teacher_reps]).float()
        sums = t_reps.new_zeros(k, t_reps.shape[1]).index_add_(0, labels[eligible], t_reps[eligible])
        counts = torch.bincount(labels[eligible], minlength=k)
        positives, present = u2pl.memory.positives(sums, counts)
    s_reps = torch.cat([flat(t) for t in [rep_x, *rep_s]])
    anchors = [s_reps[eligible & (labels == c)] for c in range(k)]
    loss = contrastive_loss(anchors, positives, present, u2pl.memory.queues, u2pl.num_anchors,
                            u2pl.num_negatives, u2pl.temperature)
    stats = {'reliable_ratio': reliable.sum() / valid.sum().clamp(min=1),
             'negatives': has.sum().float(), 'gamma': gamma.float()}
    return loss, stats
