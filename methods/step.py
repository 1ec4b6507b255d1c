"""The training step: a batch in, a dict of named losses and statistics out.

`semi_step` is UniMatch V2's step, as the paper writes it; FixMatch (one strong view, no feature
dropout) and UniMatch V1 (the student labels itself, plus a feature-perturbation stream) are its
options (`SemiOptions`), and every other method extends it through the hooks of `methods.base.Method`.
`supervised_step` is the labeled-only baseline.

`loss` is what gets back-propagated; every other entry is for logging. The caller does backward,
the optimizer step, the learning-rate update and the EMA update.

Batches (see dataset/semi.py):
  labeled   {'image': (B, 3, S, S), 'mask': (B, S, S) int64, 255 = ignore}
  unlabeled {'image': weak view (B, 3, S, S), 'strong': (B, V, 3, S, S),
             'boxes': (B, V, S, S) bool CutMix boxes, 'valid': (B, S, S) bool, False on padding}
Classification (tasks/classification.py) runs this step as it is, on one-pixel maps: logits
(B, K, 1, 1), labels (B, 1, 1), empty boxes and every pixel valid give FixMatch's per-image losses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from util.losses import cutmix, masked_unlabeled_loss

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SemiOptions:
    conf_thresh: float = 0.95
    lossu_weight: float = 1.0      # loss = (loss_x + w * loss_u) / (1 + w)
    weighted_mean: bool = True     # False: loss = loss_x + w * loss_u (TorchSSL's and USB's
                                   # classification, config `total_loss: sum`)
    views: int = 2                 # strong views per unlabeled image (FixMatch: 1)
    comp_drop: bool = True         # complementary channel dropout on the strong views' features
    feat_drop: bool = False        # independent channel dropout on each strong view's features
                                   # (FixMatch + feature perturbation, the paper's Table 6)
    fused: bool = True             # labeled and strong images in one student forward
    fp_weight: float = 0.0         # UniMatch V1: > 0 = the student labels its own weak view, and a
                                   # channel-dropped copy of that forward is a stream of this weight
                                   # in L_u (the strong views share the rest equally)


@dataclass
class Term:
    """An extra loss term a method adds to the total.

    shared=True: it joins the weighted mean of the base terms, (L_x + w L_u + weight L) / (1 + w + weight);
    shared=False: it is added to that mean, + weight * L."""
    loss: torch.Tensor
    weight: float
    shared: bool = False


@dataclass
class StepContext:
    """What the step has computed so far: the hooks of `methods.base.Method` read it.

    streams: (name, prediction, strong view index or None for the unmixed weak view, weight in L_u)
    for every unlabeled prediction the student made (strong views, and UniMatch V1's fp stream).
    """
    teacher: Callable
    batch_l: Batch
    batch_u: Batch
    opt: SemiOptions
    logits_w: torch.Tensor | None = None         # teacher's weak-view logits (B, K, S, S), fp32, no grad
    teacher_aux: Any = None                      # whatever else the teacher returned (a method asked)
    conf: torch.Tensor | None = None             # (B, S, S) max softmax of logits_w
    pseudo: torch.Tensor | None = None           # (B, S, S) its argmax
    targets: list = field(default_factory=list)  # per strong view: CutMix-ed (pseudo, conf, valid)
    pred_x: torch.Tensor | None = None           # student logits of the labeled images
    pred_s: list = field(default_factory=list)   # student logits of each strong view
    student_aux: Any = None                      # whatever else the student returned, over [x; strong]
    streams: list = field(default_factory=list)
    scratch: dict = field(default_factory=dict)  # what a method's hook leaves for its later hooks in
                                                 # this step, under the method's name

    def mixed(self, tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per stream, `tensors` (B, ..., S, S) of the weak view CutMix-ed with that stream's box
        (unmixed for the fp stream): targets for each stream, like the pseudo-labels."""
        boxes = self.batch_u['boxes']
        return [tuple(t if v is None else cutmix(t, boxes[:, v]) for t in tensors) for _, _, v, _ in self.streams]


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


def split_output(out) -> tuple[torch.Tensor, Any]:
    """A model returns logits, or (logits, extra) when a method asked it for more (representations)."""
    return (out, None) if torch.is_tensor(out) else (out[0], out[1])


def perturbation(opt: SemiOptions) -> dict:
    """The student's keywords for the strong views' feature perturbation (feat_drop only when on,
    so that models with their own forward need not know it)."""
    return {'comp_drop': opt.comp_drop, **({'feat_drop': True} if opt.feat_drop else {})}


def merged(dicts) -> dict:
    out = {}
    for d in dicts:
        out.update(d)
    return out


def supervised_step(student: nn.Module, batch_l: Batch, criterion: nn.Module) -> dict[str, torch.Tensor]:
    loss = criterion(student(batch_l['image']), batch_l['mask'])
    return {'loss': loss, 'loss_x': loss.detach()}


def semi_step(student: nn.Module, teacher: Callable, batch_l: Batch, batch_u: Batch, criterion: nn.Module,
              opt: SemiOptions, methods: Sequence = ()) -> dict[str, torch.Tensor]:
    """UniMatch V2 (views=2, comp_drop), FixMatch (views=1), UniMatch V1 (fp_weight=0.5).

    The teacher (the EMA model, or the student itself with `teacher: online`) labels the weak
    view; each strong view and its targets are CutMix-ed with the same box; the student sees
    labeled and strong images in one forward, with complementary channel dropout on the strong
    pairs' features. `methods` (`methods.base.Method`, in registry order) add keywords to the
    teacher's and the student's forwards, may replace the strong views' losses, and add terms to
    the total. Two variants are small named pieces: UniMatch V1's weak forward and fp stream
    (`v1_weak_forward`, `fp_weight > 0`) and the original release's two forwards (`unfused_forward`,
    `fused=False`).
    """
    x, y, valid = batch_l['image'], batch_l['mask'], batch_u['valid']
    s = StepContext(teacher, batch_l, batch_u, opt)
    pred_fp = v1_weak_forward(s, student) if opt.fp_weight > 0 else None
    if pred_fp is None:
        with torch.no_grad():
            logits_w, s.teacher_aux = split_output(teacher(batch_u['image'],
                                                           **merged(m.teacher_kwargs(s) for m in methods)))
        s.logits_w = logits_w.float()
    s.conf, s.pseudo = s.logits_w.softmax(1).max(1)

    strong, s.targets = mix_strong_views(batch_u, s.pseudo, s.conf, opt.views)
    extra = merged(m.student_kwargs(s) for m in methods)
    if opt.fused and s.pred_x is None:
        out, s.student_aux = split_output(student(torch.cat([x, *strong]), n_clean=len(x),
                                                  **perturbation(opt), **extra))
        s.pred_x, *s.pred_s = out.split([len(x)] + [len(v) for v in strong])
    else:
        unfused_forward(s, student, strong, extra)
    share = (1 - opt.fp_weight) / opt.views
    s.streams = [(f'loss_s{v + 1}', pred, v, share) for v, pred in enumerate(s.pred_s)]
    if pred_fp is not None:
        s.streams.append(('loss_fp', pred_fp, None, opt.fp_weight))

    out = {'loss_x': criterion(s.pred_x, y)}
    replaced = replaced_strong_losses(s, methods)
    out.update(replaced if replaced is not None else strong_losses(s.pred_s, s.targets, opt.conf_thresh))
    if pred_fp is not None:
        out['loss_fp'] = masked_unlabeled_loss(pred_fp, s.pseudo, s.conf, valid, opt.conf_thresh)
    loss_u = sum(w * out[name] for name, _, _, w in s.streams)
    out['loss_u'] = loss_u
    out['mask_ratio'] = ((s.conf >= opt.conf_thresh) & valid).sum() / valid.sum().clamp(min=1)
    terms = {}
    for m in methods:
        for name, term in m.terms(s, out).items():
            terms[name] = term
            out[name] = term.loss
    out['loss'] = total_loss(out['loss_x'], loss_u, opt.lossu_weight, terms.values(), opt.weighted_mean)
    return {k: v if k == 'loss' else v.detach() for k, v in out.items()}


def v1_weak_forward(s: StepContext, student: nn.Module) -> torch.Tensor:
    """UniMatch V1 (`fp_weight > 0`): the student labels its own weak view, in the labeled images'
    forward, and returns the logits of its feature-perturbed (fp) copy of that view: a stream of
    its own in L_u."""
    x, u = s.batch_l['image'], s.batch_u['image']
    preds, preds_fp = student(torch.cat((x, u)), need_fp=True)
    s.pred_x, pred_w = preds.split([len(x), len(u)])
    s.logits_w = pred_w.detach().float()
    return preds_fp[len(x):]


def unfused_forward(s: StepContext, student: nn.Module, strong: list[torch.Tensor], extra: dict) -> None:
    """The original release's student forwards (`fused=False`): the labeled images, then the
    strong views, each in a forward of its own (V1 has the labeled logits already)."""
    if extra:
        raise ValueError(f'{sorted(extra)} need the fused student forward (fused=True)')
    if s.pred_x is None:
        s.pred_x = student(s.batch_l['image'])
    s.pred_s = list(student(torch.cat(strong), **perturbation(s.opt)).chunk(s.opt.views))


def replaced_strong_losses(s: StepContext, methods: Sequence) -> dict[str, torch.Tensor] | None:
    """The strong views' losses of the one method that replaces them (`methods.check_run` refuses
    two), or None for the step's own."""
    replaced = [r for r in (m.strong_losses(s) for m in methods) if r is not None]
    if len(replaced) > 1:
        raise ValueError(f'{len(replaced)} methods replace the strong views\' losses; a step takes one')
    return replaced[0] if replaced else None


def total_loss(loss_x: torch.Tensor, loss_u: torch.Tensor, w: float, terms, weighted_mean: bool = True
               ) -> torch.Tensor:
    """(L_x + w L_u + sum of shared terms) / (1 + w + their weights) + the other terms; without
    `weighted_mean` the sum is not divided."""
    num, den = loss_x + w * loss_u, 1 + w
    for t in terms:
        if t.shared:
            num, den = num + t.weight * t.loss, den + t.weight
    loss = num / den if weighted_mean else num
    for t in terms:
        if not t.shared:
            loss = loss + t.weight * t.loss
    return loss
