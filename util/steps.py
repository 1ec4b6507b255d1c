"""One training step per method: a batch in, a dict of named losses and statistics out.

`loss` is what gets back-propagated; every other entry is for logging. The caller does backward,
the optimizer step, the learning-rate update and the EMA update.

Batches (see dataset/semi.py):
  labeled   {'image': (B, 3, S, S), 'mask': (B, S, S) int64, 255 = ignore}
  unlabeled {'image': weak view (B, 3, S, S), 'strong': (B, V, 3, S, S),
             'boxes': (B, V, S, S) bool CutMix boxes, 'valid': (B, S, S) bool, False on padding}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.presets import PATCH_SIZE
from util.ipix import IPixOptions, ipix_view_loss
from util.losses import cutmix, masked_unlabeled_loss
from util.prevmatch import Guidance, guidance_loss

Batch = dict[str, torch.Tensor]


@dataclass
class SemiOptions:
    conf_thresh: float = 0.95
    lossu_weight: float = 1.0      # loss = (loss_x + w * loss_u) / (1 + w)
    views: int = 2                 # strong views per unlabeled image (FixMatch: 1)
    comp_drop: bool = True         # complementary channel dropout on the strong views' features
    fused: bool = True             # labeled and strong images in one student forward


@dataclass
class AllSparkStep:
    """AllSpark in the step (model/allspark.py): the student gets its roles and the teacher's
    probabilities for Channel Semantic Grouping; labeled keys from the memory when `use_memory`."""
    use_memory: bool = False


@torch.no_grad()
def pseudo_label(teacher: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (max softmax, fp32) and class of each pixel of the teacher's prediction."""
    prob = teacher(image).float().softmax(1)
    return prob.max(1)


def mix_targets(batch_u: Batch, tensors: tuple[torch.Tensor, ...], views: int
                ) -> list[tuple[torch.Tensor, ...]]:
    """Per strong view, each of `tensors` (B, ..., H, W) CutMix-ed with that view's box."""
    return [tuple(cutmix(t, batch_u['boxes'][:, v]) for t in tensors) for v in range(views)]


def mix_strong_views(batch_u: Batch, pseudo: torch.Tensor, conf: torch.Tensor, views: int
                     ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """CutMix each strong view with the reversed batch inside its own box, and the targets
    (pseudo-labels, confidences, valid mask) with the same box."""
    strong = [cutmix(batch_u['strong'][:, v], batch_u['boxes'][:, v]) for v in range(views)]
    return strong, mix_targets(batch_u, (pseudo, conf, batch_u['valid']), views)


def strong_losses(preds: list[torch.Tensor], targets: list[tuple[torch.Tensor, ...]], thresh: float
                  ) -> dict[str, torch.Tensor]:
    """{'loss_s1': ..., 'loss_s2': ...}: the masked unlabeled loss of each strong view."""
    return {f'loss_s{v}': masked_unlabeled_loss(pred, pseudo, conf, valid, thresh)
            for v, (pred, (pseudo, conf, valid)) in enumerate(zip(preds, targets), start=1)}


# ---- optional extra terms (util/ipix.py, util/prevmatch.py); off, the steps are unchanged -----------

def ipix_term(logits_w: torch.Tensor, pred_s: list[torch.Tensor], batch_u: Batch, ipix: IPixOptions
              ) -> torch.Tensor:
    """IPixMatch's L_IPix averaged over the strong views; the teacher's weak-view logits (B, K, H, W)
    and the valid mask are CutMix-ed with each view's box, like the pseudo-labels."""
    mixed = mix_targets(batch_u, (logits_w, batch_u['valid']), len(pred_s))
    return sum(ipix_view_loss(t, pred, valid, ipix) for pred, (t, valid) in zip(pred_s, mixed)) / len(pred_s)


@torch.no_grad()
def guidance_labels(prev: Guidance, batch_u: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """PrevMatch's second pseudo-labels: (confidence, class) of the snapshot ensemble on the weak view."""
    return prev.ensemble(batch_u['image']).float().softmax(1).max(1)


def add_ipix(out: dict[str, torch.Tensor], loss_ipix: torch.Tensor, ipix: IPixOptions) -> None:
    """The paper's Eq. 6: L = L_base + alpha * L_IPix (alpha with its warm-up ramp)."""
    out['loss'] = out['loss'] + ipix.weight * loss_ipix
    out['loss_ipix'] = loss_ipix
    out['ipix_weight'] = loss_ipix.new_tensor(ipix.weight)


def add_guidance(out: dict[str, torch.Tensor], loss_prev: torch.Tensor, conf_prev: torch.Tensor,
                 valid: torch.Tensor, prev: Guidance, lossu_weight: float) -> None:
    """PrevMatch's total: L = (L_x + w L_u + lambda L_prev) / (1 + w + lambda)."""
    lam, w = prev.weight, lossu_weight
    out['loss'] = (out['loss_x'] + w * out['loss_u'] + lam * loss_prev) / (1 + w + lam)
    out['loss_prev'] = loss_prev
    out['prev_weight'] = loss_prev.new_tensor(lam)
    out['prev_mask_ratio'] = ((conf_prev >= prev.thresh) & valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def allspark_inputs(logits_w: torch.Tensor, batch_u: Batch, n_labeled: int, views: int, allspark: AllSparkStep
                    ) -> dict:
    """The AllSpark student's keywords: roles, and the teacher's weak-view softmax CutMix-ed to each
    strong view like the pseudo-labels, area-resized to the patch grid (B * views, K, h, w)."""
    grid = (logits_w.shape[-2] // PATCH_SIZE, logits_w.shape[-1] // PATCH_SIZE)
    prob = logits_w.softmax(1)
    mixed = [F.interpolate(cutmix(prob, batch_u['boxes'][:, v]), size=grid, mode='area') for v in range(views)]
    return {'n_labeled': n_labeled, 'group_prob': torch.cat(mixed), 'use_memory': allspark.use_memory}


def supervised_step(student: nn.Module, batch_l: Batch, criterion: nn.Module) -> dict[str, torch.Tensor]:
    loss = criterion(student(batch_l['image']), batch_l['mask'])
    return {'loss': loss, 'loss_x': loss.detach()}


def weak_to_strong_step(student: nn.Module, teacher: Callable, batch_l: Batch, batch_u: Batch,
                        criterion: nn.Module, opt: SemiOptions, ipix: IPixOptions | None = None,
                        prev: Guidance | None = None, allspark: AllSparkStep | None = None
                        ) -> dict[str, torch.Tensor]:
    """UniMatch V2 (views=2, comp_drop) and FixMatch (views=1, no comp_drop).

    The teacher labels the weak view; each strong view and its targets are CutMix-ed with the same
    box; the student sees labeled and strong images (one forward when `fused`).
    ipix: add IPixMatch's inter-pixel relation loss; prev: add PrevMatch's previous guidance (only
    when the bank holds snapshots and lambda > 0); allspark: AllSpark's roles and grouping
    probabilities for the student. None (default): the plain step.
    """
    x, y = batch_l['image'], batch_l['mask']
    valid = batch_u['valid']
    if ipix is None and allspark is None:
        conf, pseudo = pseudo_label(teacher, batch_u['image'])
    else:       # IPix needs the teacher's logits, not only its labels
        with torch.no_grad():
            logits_w = teacher(batch_u['image']).float()
        conf, pseudo = logits_w.softmax(1).max(1)

    strong, targets = mix_strong_views(batch_u, pseudo, conf, opt.views)

    if opt.fused:
        extra = {} if allspark is None else allspark_inputs(logits_w, batch_u, len(x), opt.views, allspark)
        logits = student(torch.cat([x, *strong]), comp_drop=opt.comp_drop, n_clean=len(x), **extra)
        pred_x, *pred_s = logits.split([len(x)] + [len(s) for s in strong])
    else:
        assert allspark is None, 'AllSpark needs the fused student forward'   # the original: two student forwards
        pred_x = student(x)
        pred_s = student(torch.cat(strong), comp_drop=opt.comp_drop).chunk(opt.views)

    loss_x = criterion(pred_x, y)
    out = {'loss_x': loss_x}
    out.update(strong_losses(pred_s, targets, opt.conf_thresh))
    loss_u = sum(out[f'loss_s{v}'] for v in range(1, opt.views + 1)) / opt.views
    out['loss'] = (loss_x + opt.lossu_weight * loss_u) / (1 + opt.lossu_weight)
    out['loss_u'] = loss_u
    out['mask_ratio'] = ((conf >= opt.conf_thresh) & valid).sum() / valid.sum().clamp(min=1)
    if prev is not None:
        conf_p, pseudo_p = guidance_labels(prev, batch_u)
        mixed = mix_targets(batch_u, (pseudo_p, conf_p, valid), opt.views)
        loss_prev = sum(guidance_loss(pred, *t, prev.thresh, prev.loss) for pred, t in zip(pred_s, mixed))
        add_guidance(out, loss_prev / opt.views, conf_p, valid, prev, opt.lossu_weight)
    if ipix is not None:
        add_ipix(out, ipix_term(logits_w, pred_s, batch_u, ipix), ipix)
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


# UniMatch V1's weights: loss = (x + (0.25 s1 + 0.25 s2 + 0.5 fp)) / 2
V1_WEIGHTS = {'loss_s1': 0.25, 'loss_s2': 0.25, 'loss_fp': 0.5}


def unimatch_v1_step(student: nn.Module, batch_l: Batch, batch_u: Batch, criterion: nn.Module,
                     opt: SemiOptions, ipix: IPixOptions | None = None, prev: Guidance | None = None
                     ) -> dict[str, torch.Tensor]:
    """UniMatch V1 on this pipeline: pseudo-labels from the student's own weak-view prediction
    (detached, computed in the same forward as the labeled images), two image-level strong views and
    a feature-perturbation stream (channel dropout on the weak view's encoder features).
    ipix / prev as in `weak_to_strong_step`; previous guidance weights its streams like L_u (the
    original PrevMatch), IPix uses the two strong views."""
    x, y = batch_l['image'], batch_l['mask']
    valid = batch_u['valid']
    preds, preds_fp = student(torch.cat((x, batch_u['image'])), need_fp=True)
    pred_x, pred_w = preds.split([len(x), len(batch_u['image'])])
    pred_fp = preds_fp[len(x):]
    conf, pseudo = pred_w.detach().float().softmax(1).max(1)

    strong, targets = mix_strong_views(batch_u, pseudo, conf, 2)
    pred_s = student(torch.cat(strong)).chunk(2)

    out = {'loss_x': criterion(pred_x, y)}
    out.update(strong_losses(pred_s, targets, opt.conf_thresh))
    out['loss_fp'] = masked_unlabeled_loss(pred_fp, pseudo, conf, valid, opt.conf_thresh)
    loss_u = sum(w * out[k] for k, w in V1_WEIGHTS.items())
    out['loss'] = (out['loss_x'] + opt.lossu_weight * loss_u) / (1 + opt.lossu_weight)
    out['loss_u'] = loss_u
    out['mask_ratio'] = ((conf >= opt.conf_thresh) & valid).sum() / valid.sum().clamp(min=1)
    if prev is not None:
        conf_p, pseudo_p = guidance_labels(prev, batch_u)
        (s1, s2) = mix_targets(batch_u, (pseudo_p, conf_p, valid), 2)
        streams = {'loss_s1': (pred_s[0], s1), 'loss_s2': (pred_s[1], s2),
                   'loss_fp': (pred_fp, (pseudo_p, conf_p, valid))}
        loss_prev = sum(V1_WEIGHTS[k] * guidance_loss(pred, *t, prev.thresh, prev.loss)
                        for k, (pred, t) in streams.items())
        add_guidance(out, loss_prev, conf_p, valid, prev, opt.lossu_weight)
    if ipix is not None:
        add_ipix(out, ipix_term(pred_w.detach().float(), list(pred_s), batch_u, ipix), ipix)
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


METHOD_OPTIONS = {
    'unimatch_v2': SemiOptions(views=2, comp_drop=True),
    'fixmatch': SemiOptions(views=1, comp_drop=False),
    'unimatch_v1': SemiOptions(views=2, comp_drop=False),
    'prevmatch': SemiOptions(views=2, comp_drop=True),     # UniMatch V2 + previous guidance
    'ipixmatch': SemiOptions(views=2, comp_drop=True),     # UniMatch V2 + L_IPix
    'u2pl': SemiOptions(views=2, comp_drop=True),          # UniMatch V2 + U2PL's L_c (util/u2pl.py)
    'allspark': SemiOptions(views=2, comp_drop=True),      # UniMatch V2 on the AllSpark model
}
