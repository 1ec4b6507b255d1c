"""Pseudo-label diagnostics: how good the pseudo-labels of a model would be, measured against the
masks the unlabeled images happen to have (`pseudo_label_stats: true`, docs/diagnostics.md).

A model's pseudo-label of a pixel (or image) is the argmax of its softmax, and it is confident
where the maximum probability is at least `conf_thresh` -- as the training step labels the weak
view. Two confusion matrices (rows: true class, columns: pseudo-label) over the pixels that have a
true label hold everything: `confusion` over all of them, `confident` over the confident ones
(`confident_targets` masks the others out). `pseudo_label_stats` turns them into the figures, in
percent:

  confident_share   confident pixels / labeled pixels
  accuracy          correct confident pseudo-labels / confident pixels
  precision[c]      confident pixels labelled c that are c / confident pixels labelled c
  recall[c]         confident pixels of class c labelled c / confident pixels of class c
  confident[c]      confident pixels of class c / pixels of class c (how much of c is taught at all)
  share[c]          confident pixels labelled c / confident pixels (what the unlabeled loss teaches)
  true_share[c]     pixels of class c / labeled pixels (what it would teach with perfect labels)

A ratio whose denominator is 0 (a class never predicted confidently, say) is None.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Sequence

import numpy as np
import torch

PER_CLASS = ('precision', 'recall', 'confident', 'share', 'true_share')    # per-class figures, table order
HEADS = {'precision': 'prec', 'recall': 'recall', 'confident': 'conf', 'share': 'share', 'true_share': 'true'}


def confident_targets(probs: torch.Tensor, target: torch.Tensor, conf_thresh: float,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels, target with `ignore_index` where the pseudo-label is not confident).

    probs: float [B, C, ...] class probabilities; target: int [B, ...]. Counting the pair into a
    confusion matrix gives `confident`; counting (pseudo-labels, target) gives `confusion`."""
    conf, pred = probs.max(dim=1)
    return pred, target.masked_fill(conf < conf_thresh, ignore_index)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [float(n) / float(d) * 100 if d > 0 else None for n, d in zip(num.tolist(), den.tolist())]


def pseudo_label_stats(confusion, confident) -> dict:
    """The figures of the module docstring from the two nclass x nclass count matrices (tensors or
    nested lists; rows true class, columns pseudo-label): {'confident_share', 'accuracy',
    'precision', 'recall', 'confident', 'share', 'true_share' (lists over classes), 'pixels'}."""
    full = torch.as_tensor(confusion, dtype=torch.float64)
    conf = torch.as_tensor(confident, dtype=torch.float64)
    if full.shape != conf.shape or full.dim() != 2 or full.shape[0] != full.shape[1]:
        raise ValueError(f'confusion {tuple(full.shape)} and confident {tuple(conf.shape)} must be the same square shape')
    if (conf > full).any():
        raise ValueError('confident counts exceed the counts of all pixels: the matrices do not belong together')
    total, n_conf = full.sum(), conf.sum()
    (share_all,) = _ratio(n_conf[None], total[None])
    (accuracy,) = _ratio(conf.diag().sum()[None], n_conf[None])
    n_conf = n_conf.expand(full.shape[0])
    return {
        'confident_share': share_all,
        'accuracy': accuracy,
        'precision': _ratio(conf.diag(), conf.sum(0)),
        'recall': _ratio(conf.diag(), conf.sum(1)),
        'confident': _ratio(conf.sum(1), full.sum(1)),
        'share': _ratio(conf.sum(0), n_conf),
        'true_share': _ratio(full.sum(1), total.expand(full.shape[0])),
        'pixels': int(total),
    }


def _cell(value: float | None) -> str:
    return f'{value:6.2f}' if value is not None else f'{"-":>6}'


def format_pseudo_label_table(stats: dict[str, dict], class_names: Sequence[str], conf_thresh: float,
                              unit: str = 'pixels') -> str:
    """One block per model (stats: model name -> `pseudo_label_stats`): a line with the confident
    share and accuracy, then 'class  prec recall conf share true' lines, as the per-class IoU table."""
    width = max([len(n) for n in class_names] + [len('class')])
    blocks = []
    for model, s in stats.items():
        lines = [f'{model}: confident {_cell(s["confident_share"]).strip()} of {s["pixels"]} labeled {unit} '
                 f'(conf >= {conf_thresh}), accuracy {_cell(s["accuracy"]).strip()}',
                 f'{"id":>3}  {"class":<{width}}  ' + '  '.join(f'{HEADS[k]:>6}' for k in PER_CLASS)]
        for c, name in enumerate(class_names):
            lines.append(f'{c:>3}  {name:<{width}}  ' + '  '.join(_cell(s[k][c]) for k in PER_CLASS))
        blocks.append('\n'.join(lines))
    return '\n'.join(blocks)


def stats_scalars(stats: dict[str, dict], class_names: Sequence[str]) -> dict[str, float]:
    """Flat '<model>/<figure>' and '<model>/<figure>/<class>' scalars (TensorBoard), defined ones only."""
    out = {}
    for model, s in stats.items():
        for key in ('confident_share', 'accuracy'):
            if s[key] is not None:
                out[f'{model}/{key}'] = s[key]
        for key in PER_CLASS:
            out.update({f'{model}/{key}/{name}': v for name, v in zip(class_names, s[key]) if v is not None})
    return out


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without touching the state of Python's, numpy's and torch's global generators
    (CPU and every CUDA device): a pass inside it cannot change what the training after it draws."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
