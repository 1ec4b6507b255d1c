"""Losses: the masked unlabeled loss, CutMix, OHEM and the criterion factory (util/losses.py).

    python -m pytest tests/test_losses.py -q

Hand computations on tiny tensors and hand-written references on random logits; CPU, well under a second.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from util.labels import IGNORE_INDEX
from util.losses import OhemCrossEntropy, build_criterion, cutmix, masked_unlabeled_loss


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- masked unlabeled loss -------------------------------------------------------------------------

def test_masked_unlabeled_loss_by_hand():
    # One image, 2 classes, 1 x 4 pixels. Logits (log 3, 0): p = (3/4, 1/4).
    logits = torch.tensor([[[[math.log(3), math.log(3), 50.0, math.log(3)]],
                            [[0.0, 0.0, 0.0, 0.0]]]])            # (1, 2, 1, 4)
    pseudo = torch.tensor([[[0, 0, 1, 1]]])                       # (1, 1, 4)
    conf = torch.tensor([[[0.96, 0.50, 0.99, 0.95]]])
    valid = torch.tensor([[[True, True, False, True]]])
    # pixel 0: confident, valid, CE = -log(3/4)          -> counted
    # pixel 1: valid but not confident                   -> only in the denominator
    # pixel 2: confident but invalid (huge CE, ~50)      -> nowhere
    # pixel 3: conf == thresh (>= keeps it), CE = -log(1/4) -> counted
    expected = (math.log(4 / 3) + math.log(4)) / 3               # normalised by 3 valid pixels, not 2 confident
    loss = masked_unlabeled_loss(logits, pseudo, conf, valid, thresh=0.95)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masked_unlabeled_loss_matches_reference_on_random_tensors():
    g = gen(1)
    logits = torch.randn(3, 5, 6, 7, generator=g) * 2
    pseudo = torch.randint(0, 5, (3, 6, 7), generator=g)
    conf = torch.rand(3, 6, 7, generator=g)
    valid = torch.rand(3, 6, 7, generator=g) > 0.3
    ce = F.cross_entropy(logits, pseudo, reduction='none')
    keep = (conf >= 0.6) & valid
    expected = ce[keep].sum() / valid.sum()
    assert torch.allclose(masked_unlabeled_loss(logits, pseudo, conf, valid, 0.6), expected, atol=1e-6)


def test_masked_unlabeled_loss_without_valid_pixels_is_zero_and_finite():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    pseudo = torch.zeros(2, 4, 4, dtype=torch.long)
    conf = torch.ones(2, 4, 4)
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    loss = masked_unlabeled_loss(logits, pseudo, conf, valid, 0.95)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


# ---- CutMix ------------------------------------------------------------------------------------------

def _check_cutmix(x: torch.Tensor, box: torch.Tensor) -> None:
    out = cutmix(x, box)
    assert out.shape == x.shape and out.dtype == x.dtype
    b = len(x)
    for i in range(b):
        inside, outside = box[i], ~box[i]
        # (..., H, W) -> (..., n) selection works alike for (C, H, W) and (H, W)
        assert torch.equal(out[i][..., inside], x[b - 1 - i][..., inside])
        assert torch.equal(out[i][..., outside], x[i][..., outside])


@pytest.mark.parametrize('kind', ['image', 'label', 'conf', 'bool'])
def test_cutmix_takes_the_reversed_batch_inside_the_box(kind):
    g = gen(2)
    b, h, w = 3, 8, 10
    box = torch.zeros(b, h, w, dtype=torch.bool)
    box[0, 1:5, 2:7] = True
    box[1, 0:3, 0:10] = True      # image 1 is its own mirror (b - 1 - 1 = 1): the box changes nothing
    box[2, 4:8, 5:9] = True
    x = {'image': torch.randn(b, 3, h, w, generator=g),
         'label': torch.randint(0, 21, (b, h, w), generator=g),
         'conf': torch.rand(b, h, w, generator=g),
         'bool': torch.rand(b, h, w, generator=g) > 0.5}[kind]
    _check_cutmix(x, box)
    # Something did change for images 0 and 2 (otherwise the check above is vacuous).
    out = cutmix(x, box)
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[2], x[2])


def test_cutmix_with_even_batch_and_random_boxes():
    g = gen(3)
    x = torch.arange(4 * 2 * 5 * 5, dtype=torch.float32).reshape(4, 2, 5, 5)
    box = torch.rand(4, 5, 5, generator=g) > 0.5
    _check_cutmix(x, box)
    assert torch.equal(cutmix(x, torch.zeros_like(box)), x)
    assert torch.equal(cutmix(x, torch.ones_like(box)), x.flip(0))


# ---- OHEM ------------------------------------------------------------------------------------------

def ohem_reference(logits, target, thresh, min_kept, ignore=IGNORE_INDEX):
    """A plain transcription of the original's `ProbOhemCrossEntropy2d`; also returns the kept mask."""
    valid = target != ignore
    n = int(valid.sum())
    if n < min_kept or n == 0:
        return F.cross_entropy(logits, target, ignore_index=ignore), valid
    prob = logits.softmax(1)
    t = target.clone()
    t[~valid] = 0
    true_prob = prob.gather(1, t[:, None])[:, 0]
    threshold = thresh
    if min_kept > 0:
        kth = true_prob[valid].sort().values[min(min_kept, n) - 1].item()
        threshold = max(thresh, kth)
    keep = valid & (true_prob <= threshold)
    ce = F.cross_entropy(logits, t, reduction='none')
    return ce[keep].mean(), keep


def _random_problem(seed: int):
    g = gen(seed)
    logits = torch.randn(2, 4, 8, 8, generator=g) * 3
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[torch.rand(2, 8, 8, generator=g) < 0.2] = IGNORE_INDEX
    return logits, target


def test_ohem_is_plain_ce_with_fewer_valid_pixels_than_min_kept():
    logits, target = _random_problem(4)
    n_valid = int((target != IGNORE_INDEX).sum())
    loss = OhemCrossEntropy(thresh=0.7, min_kept=n_valid + 1)(logits, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX), atol=1e-6)


@pytest.mark.parametrize('thresh, min_kept', [(0.7, 10), (0.0, 20), (0.5, 1), (0.7, 0)])
def test_ohem_keeps_pixels_below_max_of_thresh_and_kth_probability(thresh, min_kept):
    logits, target = _random_problem(5)
    expected, keep = ohem_reference(logits, target, thresh, min_kept)
    valid = target != IGNORE_INDEX
    assert 0 < keep.sum() < valid.sum(), 'the case must actually drop some valid pixels'
    if thresh == 0.0:
        assert keep.sum() == min_kept            # the kth probability sets the threshold here

    logits = logits.clone().requires_grad_(True)
    loss = OhemCrossEntropy(thresh=thresh, min_kept=min_kept)(logits, target)
    assert torch.allclose(loss, expected, atol=1e-6)
    # Exactly the kept pixels carry gradient.
    loss.backward()
    has_grad = logits.grad.abs().sum(1) > 0
    assert torch.equal(has_grad, keep)


def test_ohem_ignores_ignore_index_pixels():
    logits, target = _random_problem(6)
    crit = OhemCrossEntropy(thresh=0.7, min_kept=5)
    base = crit(logits, target)
    # Changing the logits at ignored pixels changes nothing.
    ignored = (target == IGNORE_INDEX)[:, None].expand_as(logits)
    noisy = torch.where(ignored, torch.randn_like(logits) * 10, logits)
    assert torch.allclose(crit(noisy, target), base, atol=1e-6)
    # A custom ignore index is honoured too.
    t7 = target.masked_fill(target == IGNORE_INDEX, 7)
    assert torch.allclose(OhemCrossEntropy(ignore_index=7, thresh=0.7, min_kept=5)(logits, t7), base, atol=1e-6)


# ---- build_criterion --------------------------------------------------------------------------------

def test_build_criterion_celoss():
    crit = build_criterion('CELoss', {'ignore_index': 255})
    assert isinstance(crit, nn.Module) and not isinstance(crit, OhemCrossEntropy)
    assert crit.ignore_index == 255
    logits, target = _random_problem(7)
    assert torch.allclose(crit(logits, target), F.cross_entropy(logits, target, ignore_index=255), atol=1e-6)
    # bf16 logits (autocast) still give an fp32 loss.
    assert build_criterion('CELoss', {})(logits.bfloat16(), target).dtype == torch.float32
    # A custom ignore index is honoured.
    crit3 = build_criterion('CELoss', {'ignore_index': 3})
    t3 = target.masked_fill(target == IGNORE_INDEX, 3)
    assert crit3.ignore_index == 3
    assert torch.allclose(crit3(logits, t3), F.cross_entropy(logits, t3, ignore_index=3), atol=1e-6)


def test_build_criterion_ohem_takes_config_kwargs():
    crit = build_criterion('OHEM', {'ignore_index': 255, 'thresh': 0.7, 'min_kept': 200000})
    assert isinstance(crit, OhemCrossEntropy)
    assert (crit.ignore_index, crit.thresh, crit.min_kept) == (255, 0.7, 200000)
    crit = build_criterion('OHEM', {'ignore_index': 0, 'thresh': 0.6, 'min_kept': 10})
    assert (crit.ignore_index, crit.thresh, crit.min_kept) == (0, 0.6, 10)
    logits, target = _random_problem(8)
    target = target.masked_fill(target == IGNORE_INDEX, 1)     # here 0 is the ignored label
    expected, _ = ohem_reference(logits, target, 0.6, 10, ignore=0)
    assert torch.allclose(crit(logits, target), expected, atol=1e-6)


def test_build_criterion_rejects_unknown_names():
    with pytest.raises(ValueError, match='Focal'):
        build_criterion('Focal', {})
