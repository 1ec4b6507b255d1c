"""U2PL / U2PL+ (Wang et al., CVPR'22 and the journal extension; SEED_METHODS.md section 3) on the
UniMatch V2 step. Implemented from the paper's equations, not the official code (its one-hot
helper fills only the first image and its negative mask contradicts Eqs. 25-28; spec 3.6).

Per step (docs/u2pl_allspark.md gives every decision):
  * the EMA teacher labels the weak view and, with a second no-grad forward, the labeled images;
    it returns probabilities and representations (the representation head below);
  * entropy partition: gamma_t = the (1 - alpha_t) quantile of the weak-view entropy over valid
    pixels, alpha_t = alpha0 (1 - epoch / epochs); entropy < gamma_t is reliable;
  * L_u: UniMatch V2's confidence-masked CE (default 'conf'), or the paper's reliable-pixel CE
    ('entropy') or U2PL+'s symmetric CE on reliable pixels ('sce');
  * L_c (Eq. 10) at the representation resolution (nearest-downsampled labels and probabilities):
    anchors = student reps of x_l (y = c, p_t(c) > delta_p) and of each strong view (reliable
    mixed pseudo-label c, p_t(c) > delta_p); positive (Eqs. 15-17) = mean teacher rep over every
    labeled pixel of class c and every reliable weak-view pixel labeled c (each pixel once), over
    every process, or its momentum average (U2PL+); negatives sampled from class queues;
  * negatives (Eqs. 25-28), each pixel once from x_l and the unmixed weak view: labeled pixel for
    c when y != c and rank(c) < r_l; unlabeled pixel for c when it is unreliable and
    r_l <= rank(c) < r_h. Teacher reps of negatives from every process go into per-class FIFOs.
  * L = (L_x + w L_u + lambda_c L_c) / (1 + w): lambda_c weighs L_c against L_x as the paper's
    Eq. 9 (L_s + lambda_u L_u + lambda_c L_c) does (lambda_c = 0 during the warm-up, queues filling).
    Default 0.25: the official code's effective weight on the paper's 4 GPUs (its lambda_c = 1 is
    divided by the number of processes, spec 3.6 pitfall 4); the author advises 0.1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.step import StepContext, Term
from model.dpt import DPTSegmentor, to_input_size
from model.presets import ModelPreset
from util import dist
from util.labels import IGNORE_INDEX
from util.losses import cutmix

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


# ---- the representation head and the model ---------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class RepHead(nn.Module):
    """g, parallel to the classifier (spec 3.3): reads the decoder's fused map (the input of
    `head.scratch.output_conv`, (B, F, 8h, 8w) for an h x w patch grid) average-pooled 2x to 4h x 4w
    (148^2 for a 518 crop: stride 3.5, about U2PL's 1/4):
        Conv3x3(F->F)-GN-ReLU -> Conv3x3(F->D)-GN-ReLU -> Conv1x1(D->D),  D = rep_dim (256).
    GroupNorm instead of U2PL's BatchNorm: DPT has no BN, and GN keeps the teacher's eval-mode
    representation equal to its train-mode one (no batch statistics, spec pitfall 6)."""

    def __init__(self, features: int, dim: int = 256):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(features, features, 3, padding=1, bias=False),
                                    group_norm(features), nn.ReLU(True))
        self.block2 = nn.Sequential(nn.Conv2d(features, dim, 3, padding=1, bias=False),
                                    group_norm(dim), nn.ReLU(True))
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, F, 8h, 8w) fused decoder map -> (B, D, 4h, 4w) representations (not normalised)."""
        return self.proj(self.block2(self.block1(F.avg_pool2d(fused, 2))))


class U2PLSegmentor(DPTSegmentor):
    """The DPT segmentor plus `rep_head.*`; `forward(x, ..., need_rep=True)` -> (logits, rep),
    otherwise exactly `DPTSegmentor` (every other key is the plain model's)."""

    def __init__(self, spec: ModelPreset, nclass: int, drop_path: float = 0.0, rep_dim: int = 256):
        super().__init__(spec, nclass, drop_path)
        self.rep_head = RepHead(spec.features, rep_dim)

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0, need_fp: bool = False,
                need_rep: bool = False):
        if not need_rep:
            return super().forward(x, comp_drop, n_clean, need_fp)
        assert not need_fp, 'need_rep and need_fp together are not supported'
        grid, out_size = self.patch_grid(x)
        features = self.perturb(self.encode(x), comp_drop, n_clean, False)
        fused = self.head.fuse(features, grid)
        logits = to_input_size(self.head.scratch.output_conv(fused), out_size)
        return logits, self.rep_head(fused)


# ---- the contrastive term -------------------------------------------------------------------------

def _down(t: torch.Tensor, size) -> torch.Tensor:
    """Nearest downsampling of (B, H, W) or (B, K, H, W) to `size`, dtype kept."""
    x = t if t.dim() == 4 else t[:, None]
    out = F.interpolate(x.float(), size=tuple(size), mode='nearest')
    out = out if t.dim() == 4 else out[:, 0]
    return out.to(t.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B * h * w, D)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def contrastive_term(memory: U2PLMemory, keys: 'Keys', gamma: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
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
        neg = torch.cat((labeled_negatives(prob_tl, y, keys.u2pl_low_rank),
                         unlabeled_negatives(prob_w, unreliable, keys.u2pl_low_rank, keys.u2pl_high_rank)))
        teacher_keys = _flat(torch.cat((rep_tl, rep_w)))
        neg = neg.permute(0, 2, 3, 1).reshape(-1, k)
        has = neg.any(1)
        memory.enqueue(teacher_keys[has], neg[has])

        # positive keys (Eqs. 15-17): teacher reps of every labeled pixel of class c and of every
        # reliable weak-view pixel labeled c, each pixel once
        conf_w, pseudo_w = prob_w.max(1)
        known = y != IGNORE_INDEX
        pos_labels = torch.cat((y.long().flatten(), pseudo_w.flatten()))
        pos_ok = torch.cat((known.flatten(), reliable.flatten()))
        pos_reps = teacher_keys.float()
        sums = pos_reps.new_zeros(k, pos_reps.shape[1]).index_add_(0, pos_labels[pos_ok], pos_reps[pos_ok])
        positives, present = memory.positives(sums, torch.bincount(pos_labels[pos_ok], minlength=k))

        # anchor candidates: labeled pixels with p_t(y) > delta_p, reliable mixed strong-view pixels
        # whose pseudo-label has p_t > delta_p
        p_l = prob_tl.gather(1, y.clamp(max=k - 1)[:, None].long())[:, 0]
        labels = [y.long()]
        eligible = [known & (p_l > keys.u2pl_anchor_thresh)]
        for v in range(len(rep_s)):
            box = _down(boxes[:, v], size)
            labels.append(cutmix(pseudo_w, box))
            eligible.append(cutmix(reliable & (conf_w > keys.u2pl_anchor_thresh), box))
        labels, eligible = torch.cat([t.flatten() for t in labels]), torch.cat([t.flatten() for t in eligible])
    s_reps = torch.cat([_flat(t) for t in [rep_x, *rep_s]])
    anchors = [s_reps[eligible & (labels == c)] for c in range(k)]
    loss = contrastive_loss(anchors, positives, present, memory.queues, keys.u2pl_anchors,
                            keys.u2pl_negatives, keys.u2pl_temperature)
    stats = {'reliable_ratio': reliable.sum() / valid.sum().clamp(min=1),
             'negatives': has.sum().float(), 'gamma': gamma.float()}
    return loss, stats


# ---- the method ------------------------------------------------------------------------------------

@dataclass
class Keys:
    u2pl_weight: float = 0.25            # lambda_c: L_c against L_x as the paper's Eq. 9 (module docstring)
    u2pl_warmup_epochs: int = 1          # lambda_c = 0 before this epoch (queues fill; U2PL's sup_only_epoch)
    u2pl_unsup: str = 'conf'             # L_u: 'conf' (UniMatch V2), 'entropy' (U2PL), 'sce' (U2PL+)
    u2pl_sce_ce: float = 1.0             # xi1, xi2 of U2PL+'s symmetric CE
    u2pl_sce_rce: float = 0.1
    u2pl_alpha0: float = 0.2             # initial unreliable share (drop_percent 80)
    u2pl_low_rank: int = 3               # r_l
    u2pl_high_rank: int = 20             # r_h
    u2pl_anchors: int = 256              # M anchors per class
    u2pl_negatives: int = 50             # N negatives per anchor
    u2pl_temperature: float = 0.5
    u2pl_anchor_thresh: float = 0.3      # delta_p
    u2pl_rep_dim: int = 256
    u2pl_queue_size: int = 30000         # negative keys per class; class 0 gets u2pl_queue_size_bg
    u2pl_queue_size_bg: int = 50000
    u2pl_proto_momentum: float = 0.0     # U2PL+ momentum prototypes (0.999); 0 = batch mean (U2PL)


@register
class U2PL(Method):
    """UniMatch V2 on U2PL's model (+ representation head) with U2PL's contrastive term and,
    optionally, its reliable-pixel L_u (U2PL+: symmetric CE, momentum prototypes)."""
    name = 'u2pl'
    summary = 'UniMatch V2 + contrastive loss on unreliable pixels (U2PL+: u2pl_unsup=sce)'
    Keys = Keys
    benchmark_recipe = True
    state_key = 'u2pl_memory'

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.u2pl_unsup in UNSUP_LOSSES, 'u2pl_unsup', f'must be one of {UNSUP_LOSSES}, got {cfg.u2pl_unsup!r}')
        need(0.0 <= cfg.u2pl_alpha0 < 1.0, 'u2pl_alpha0', f'must be in [0, 1), got {cfg.u2pl_alpha0}')
        need(0 <= cfg.u2pl_low_rank < cfg.u2pl_high_rank, 'u2pl_low_rank',
             f'must be >= 0 and below u2pl_high_rank, got {cfg.u2pl_low_rank}')
        for key in ('u2pl_anchors', 'u2pl_negatives', 'u2pl_rep_dim', 'u2pl_queue_size', 'u2pl_queue_size_bg'):
            need(getattr(cfg, key) >= 1, key, f'must be >= 1, got {getattr(cfg, key)}')
        for key in ('u2pl_weight', 'u2pl_warmup_epochs'):
            need(getattr(cfg, key) >= 0, key, f'must be >= 0, got {getattr(cfg, key)}')
        need(cfg.u2pl_temperature > 0, 'u2pl_temperature', f'must be > 0, got {cfg.u2pl_temperature}')
        need(0.0 <= cfg.u2pl_proto_momentum < 1.0, 'u2pl_proto_momentum',
             f'must be in [0, 1), got {cfg.u2pl_proto_momentum}')

    @classmethod
    def build_model(cls, spec, nclass, drop_path, cfg) -> U2PLSegmentor:
        return U2PLSegmentor(spec, nclass, drop_path, cfg.u2pl_rep_dim)

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        self.memory = U2PLMemory(cfg.nclass, cfg.u2pl_rep_dim, cfg.u2pl_queue_size, cfg.u2pl_queue_size_bg,
                                 cfg.u2pl_proto_momentum)
        self.state = self.memory
        self.weight, self.alpha = 0.0, cfg.u2pl_alpha0    # lambda_c and alpha_t of the coming step

    @classmethod
    def for_benchmark(cls, cfg, student, device) -> 'U2PL':
        m = cls(cfg, student, device)
        m.weight = cfg.u2pl_weight
        return m

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        cfg = self.cfg
        self.weight = cfg.u2pl_weight if epoch >= cfg.u2pl_warmup_epochs else 0.0
        self.alpha = unreliable_share(epoch, cfg.epochs, cfg.u2pl_alpha0)

    def teacher_kwargs(self, s: StepContext) -> dict:
        return {'need_rep': True}

    def student_kwargs(self, s: StepContext) -> dict:
        return {'need_rep': True}

    def strong_losses(self, s: StepContext) -> dict[str, torch.Tensor] | None:
        """The entropy partition of the weak view (left on the step's context for `terms`); the reliable-pixel L_u of
        each strong view for 'entropy' / 'sce', None (UniMatch V2's) for 'conf'."""
        prob_w = s.logits_w.softmax(1)
        gamma = s.scratch[self.name] = entropy_threshold(entropy(prob_w), s.batch_u['valid'], self.alpha)
        if self.cfg.u2pl_unsup == 'conf':
            return None
        reliable = entropy(prob_w) < gamma
        sce = (self.cfg.u2pl_sce_ce, self.cfg.u2pl_sce_rce)
        out = {}
        for v, (pred, (pseudo, _, valid)) in enumerate(zip(s.pred_s, s.targets)):
            keep = cutmix(reliable, s.batch_u['boxes'][:, v]) & valid
            out[f'loss_s{v + 1}'] = reliable_loss(pred, pseudo, keep, self.cfg.u2pl_unsup, sce)
        return out

    def terms(self, s: StepContext, out: dict) -> dict[str, Term]:
        x = s.batch_l['image']
        with torch.no_grad():
            logits_tl, rep_tl = s.teacher(x, need_rep=True)
        rep = s.student_aux
        rep_x, *rep_s = rep.split([len(x)] + [len(p) for p in s.pred_s])
        loss_c, stats = contrastive_term(self.memory, self.cfg, s.scratch[self.name], s.batch_l['mask'], s.batch_u['valid'],
                                         s.batch_u['boxes'], s.logits_w.softmax(1), s.teacher_aux,
                                         logits_tl.float().softmax(1), rep_tl, rep_x, rep_s)
        if loss_c is None:          # no class qualifies: keep the rep head in the graph (DDP)
            loss_c = rep.float().sum() * 0.0
        out['u2pl_weight'] = loss_c.new_tensor(self.weight)
        out.update(stats)
        return {'loss_c': Term(loss_c, self.weight / (1 + s.opt.lossu_weight))}
