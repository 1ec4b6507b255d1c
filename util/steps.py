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
from torch import nn

from util.losses import cutmix, masked_unlabeled_loss

Batch = dict[str, torch.Tensor]


@dataclass
class SemiOptions:
    conf_thresh: float = 0.95
    lossu_weight: float = 1.0      # loss = (loss_x + w * loss_u) / (1 + w)
    views: int = 2                 # strong views per unlabeled image (FixMatch: 1)
    comp_drop: bool = True         # complementary channel dropout on the strong views' features
    fused: bool = True             # labeled and strong images in one student forward


@torch.no_grad()
def pseudo_label(teacher: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (max softmax, fp32) and class of each pixel of the teacher's prediction."""
    prob = teacher(image).float().softmax(1)
    return prob.max(1)


def mix_strong_views(batch_u: Batch, pseudo: torch.Tensor, conf: torch.Tensor, views: int
                     ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """CutMix each strong view with the reversed batch inside its own box, and the targets
    (pseudo-labels, confidences, valid mask) with the same box."""
    strong, targets = [], []
    for v in range(views):
        box = batch_u['boxes'][:, v]
        strong.append(cutmix(batch_u['strong'][:, v], box))
        targets.append(tuple(cutmix(t, box) for t in (pseudo, conf, batch_u['valid'])))
    return strong, targets


def strong_losses(preds: list[torch.Tensor], targets: list[tuple[torch.Tensor, ...]], thresh: float
                  ) -> dict[str, torch.Tensor]:
    """{'loss_s1': ..., 'loss_s2': ...}: the masked unlabeled loss of each strong view."""
    return {f'loss_s{v}': masked_unlabeled_loss(pred, pseudo, conf, valid, thresh)
            for v, (pred, (pseudo, conf, valid)) in enumerate(zip(preds, targets), start=1)}


def supervised_step(student: nn.Module, batch_l: Batch, criterion: nn.Module) -> dict[str, torch.Tensor]:
    loss = criterion(student(batch_l['image']), batch_l['mask'])
    return {'loss': loss, 'loss_x': loss.detach()}


def weak_to_strong_step(student: nn.Module, teacher: Callable, batch_l: Batch, batch_u: Batch,
                        criterion: nn.Module, opt: SemiOptions) -> dict[str, torch.Tensor]:
    """UniMatch V2 (views=2, comp_drop) and FixMatch (views=1, no comp_drop).

    The teacher labels the weak view; each strong view and its targets are CutMix-ed with the same
    box; the student sees labeled and strong images (one forward when `fused`).
    """
    x, y = batch_l['image'], batch_l['mask']
    valid = batch_u['valid']
    conf, pseudo = pseudo_label(teacher, batch_u['image'])

    strong, targets = mix_strong_views(batch_u, pseudo, conf, opt.views)

    if opt.fused:
        logits = student(torch.cat([x, *strong]), comp_drop=opt.comp_drop, n_clean=len(x))
        pred_x, *pred_s = logits.split([len(x)] + [len(s) for s in strong])
    else:   # the original: two student forwards
        pred_x = student(x)
        pred_s = student(torch.cat(strong), comp_drop=opt.comp_drop).chunk(opt.views)

    loss_x = criterion(pred_x, y)
    out = {'loss_x': loss_x}
    out.update(strong_losses(pred_s, targets, opt.conf_thresh))
    loss_u = sum(out[f'loss_s{v}'] for v in range(1, opt.views + 1)) / opt.views
    out['loss'] = (loss_x + opt.lossu_weight * loss_u) / (1 + opt.lossu_weight)
    out['loss_u'] = loss_u
    out['mask_ratio'] = ((conf >= opt.conf_thresh) & valid).sum() / valid.sum().clamp(min=1)
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


# UniMatch V1's weights: loss = (x + (0.25 s1 + 0.25 s2 + 0.5 fp)) / 2
V1_WEIGHTS = {'loss_s1': 0.25, 'loss_s2': 0.25, 'loss_fp': 0.5}


def unimatch_v1_step(student: nn.Module, batch_l: Batch, batch_u: Batch, criterion: nn.Module,
                     opt: SemiOptions) -> dict[str, torch.Tensor]:
    """UniMatch V1 on this pipeline: pseudo-labels from the student's own weak-view prediction
    (detached, computed in the same forward as the labeled images), two image-level strong views and
    a feature-perturbation stream (channel dropout on the weak view's encoder features)."""
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
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


METHOD_OPTIONS = {
    'unimatch_v2': SemiOptions(views=2, comp_drop=True),
    'fixmatch': SemiOptions(views=1, comp_drop=False),
    'unimatch_v1': SemiOptions(views=2, comp_drop=False),
}
