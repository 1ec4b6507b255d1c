"""IPixMatch's inter-pixel relation loss and its place in the step (methods/ipixmatch.py, methods/step.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_ipix.py -q

Hand-made tensors for the loss (zero for identical distributions, a hand computation, no NaN without
confident pixels), stubs for the step, and a few iterations of `method=ipixmatch` on the toy data.
"""
from __future__ import annotations

from dataclasses import replace

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.batches import CROP, NCLASS, fixed_box_batch
import unimatch_v2
from util.config import ConfigError
from engine.config import load_config
from methods.ipixmatch import (IPixMatch, IPixOptions, ipix_loss, ipix_view_loss, loss_size, resample,
                               warmup_ramp)
from util.losses import cutmix
import methods
from methods.step import SemiOptions, semi_step

ROOT = Path(__file__).resolve().parents[1]


def logits_with_confident(conf_pixels: list[bool], c: int = 2, seed: int = 0) -> torch.Tensor:
    """(1, c, 1, N) logits: pixel j is confident (max softmax ~0.98) where conf_pixels[j], else ~0.5."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(1, c, 1, len(conf_pixels))
    for j, confident in enumerate(conf_pixels):
        k = int(torch.randint(0, c, (1,), generator=g))
        z[0, k, 0, j] = 4.0 + j if confident else 0.05
    return z


# ---- the loss on hand-made tensors -----------------------------------------------------------------

@pytest.mark.parametrize('kind', ['kl', 'cr'])
def test_identical_distributions_give_zero(kind):
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 6, 6) * 6
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    assert ipix_loss(teacher, teacher.clone(), valid, 0.5, 4.0, kind).abs() < 1e-5
    # The distributions are spatial: a per-(image, class) offset of the student's logits changes
    # nothing, whereas moving one pixel's logit does.
    shifted = teacher + torch.randn(2, 4, 1, 1) * 3
    assert ipix_loss(teacher, shifted, valid, 0.5, 4.0, kind).abs() < 1e-5
    moved = teacher.clone()
    moved[:, :, 0, 0] += 8.0
    assert ipix_loss(teacher, moved, valid, 0.5, 4.0, kind) > 1e-3


def test_kl_matches_a_hand_computation():
    # Three pixels, two classes; pixels 0 and 1 are confident, pixel 2 is not (it must not count).
    teacher = torch.tensor([[[[4.0, 0.0, 0.1]], [[0.0, 3.0, 0.0]]]])       # (1, 2, 1, 3)
    student = torch.tensor([[[[1.0, 2.0, 9.0]], [[0.5, -1.0, -9.0]]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    t = 4.0

    def psi(values):            # spatial softmax over the confident pixels 0 and 1
        e = [math.exp(v / t) for v in values]
        return [x / sum(e) for x in e]

    expected = 0.0
    for k in range(2):
        p, q = psi(teacher[0, k, 0, :2].tolist()), psi(student[0, k, 0, :2].tolist())
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))   # KL(teacher || student)
    expected /= 2 * math.log(2)                                            # C log|Omega|
    got = ipix_loss(teacher, student, valid, thresh=0.8, temperature=t, loss='kl')
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The check is sharp: KL(student || teacher), the other direction, is another number.
    reverse = sum(sum(qi * math.log(qi / pi) for pi, qi in zip(psi(teacher[0, k, 0, :2].tolist()),
                                                               psi(student[0, k, 0, :2].tolist())))
                  for k in range(2)) / (2 * math.log(2))
    assert abs(reverse - expected) > 1e-3


def test_correlation_matches_a_hand_computation():
    import statistics
    teacher = torch.tensor([[[[5.0, 0.0, 6.0, 0.05]], [[0.0, 4.5, 1.0, 0.0]]]])   # pixel 3 not confident
    student = torch.tensor([[[[0.3, -1.0, 2.0, 7.0]], [[1.5, 0.2, -0.4, -7.0]]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    t = 4.0
    expected = 0.0
    for k in range(2):
        ep = [math.exp(v / t) for v in teacher[0, k, 0, :3].tolist()]
        eq = [math.exp(v / t) for v in student[0, k, 0, :3].tolist()]
        rho = statistics.correlation([x / sum(ep) for x in ep], [x / sum(eq) for x in eq])
        expected += 1 - rho
    expected /= 2 * math.log(3)
    got = ipix_loss(teacher, student, valid, thresh=0.8, temperature=t, loss='cr')
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_no_confident_pixels_gives_zero_and_no_nan():
    torch.manual_seed(1)
    teacher = torch.zeros(2, NCLASS, 5, 5)                  # max softmax 1/3 < 0.8 everywhere
    student = torch.randn(2, NCLASS, 5, 5, requires_grad=True)
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    for kind in ('kl', 'cr'):
        loss = ipix_loss(teacher, student, valid, 0.8, 4.0, kind)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(student.grad).all() and student.grad.abs().sum() == 0
        student.grad = None
    # Confident pixels that are all padding count as none.
    loss = ipix_loss(teacher + torch.tensor([9.0, 0, 0])[:, None, None], student, ~valid, 0.8, 4.0, 'kl')
    assert loss.item() == 0.0


def test_images_with_fewer_than_two_pixels_count_as_zero_in_the_batch_mean():
    one = logits_with_confident([True, True, False], seed=2)
    student = torch.randn(1, 2, 1, 3, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    alone = ipix_loss(one, student, valid)
    assert alone > 0
    single = logits_with_confident([True, False, False], seed=2)   # |Omega| = 1: log|Omega| = 0
    batch = ipix_loss(torch.cat([one, single]), torch.cat([student, student]), torch.cat([valid, valid]))
    assert batch.item() == pytest.approx(alone.item() / 2, rel=1e-6)


def test_padding_pixels_are_outside_omega():
    torch.manual_seed(3)
    teacher = torch.randn(1, NCLASS, 4, 4) * 8
    student = torch.randn(1, NCLASS, 4, 4)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :, 3] = False
    base = ipix_loss(teacher, student, valid, 0.5)
    student2 = student.clone()
    student2[0, :, :, 3] += torch.randn(NCLASS, 4) * 5         # change only padded pixels
    assert torch.allclose(ipix_loss(teacher, student2, valid, 0.5), base)


def test_gradient_reaches_the_student_only():
    torch.manual_seed(4)
    teacher = (torch.randn(2, NCLASS, 6, 6) * 6).requires_grad_()
    student = torch.randn(2, NCLASS, 6, 6, requires_grad=True)
    ipix_loss(teacher, student, torch.ones(2, 6, 6, dtype=torch.bool), 0.5).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_warmup_ramp():
    assert warmup_ramp(0, 100) == pytest.approx(math.exp(-5))
    assert warmup_ramp(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert warmup_ramp(100, 100) == warmup_ramp(5000, 100) == warmup_ramp(0, 0) == 1.0
    ramps = [warmup_ramp(i, 100) for i in range(101)]
    assert ramps == sorted(ramps)


def test_resolutions():
    assert loss_size(518, 518, 'native') == (296, 296)           # the DPT head's logit grid
    assert loss_size(798, 518, 'patch') == (57, 37)
    assert loss_size(42, 42, 'crop') == (42, 42)
    t, s = torch.randn(1, NCLASS, 28, 28), torch.randn(1, NCLASS, 28, 28)
    valid = torch.ones(1, 28, 28, dtype=torch.bool)
    valid[:, :, 20:] = False
    t2, s2, v2 = resample(t, s, valid, 'native')
    assert t2.shape == s2.shape == (1, NCLASS, 16, 16) and v2.shape == (1, 16, 16)
    assert v2[:, :, :11].all() and not v2[:, :, 12:].any()       # padding shrinks to its own cells
    opts = IPixOptions(resolution='crop', thresh=0.0)
    assert torch.equal(ipix_view_loss(t, s, valid, opts), ipix_loss(t, s, valid, 0.0))


# ---- in the step --------------------------------------------------------------------------------------

class ConvStudent(nn.Module):
    """A 1x1 conv 'segmentor' accepting the DPT keywords."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, NCLASS, 1)

    def forward(self, x, comp_drop=False, n_clean=0, need_fp=False):
        out = self.conv(x)
        return (out, self.conv(x * 0.5)) if need_fp else out


def ipix_method(overrides: list[str]) -> IPixMatch:
    return IPixMatch(load_config(ROOT / 'configs/toy.yaml', overrides), None, torch.device('cpu'))


def test_step_adds_alpha_times_the_view_mean_of_mixed_teacher_logits():
    batch_l, batch_u = fixed_box_batch(boxless=(1, 0))
    teacher_logits = torch.randn(4, NCLASS, CROP, CROP, generator=torch.Generator().manual_seed(5)) * 5
    student = ConvStudent()
    crit = nn.CrossEntropyLoss(ignore_index=255)
    opt = SemiOptions(conf_thresh=0.6)
    ipix = ipix_method(['ipix_weight=0.7', 'ipix_thresh=0.6', 'ipix_resolution=crop'])
    torch.manual_seed(0)
    base = semi_step(student, lambda x: teacher_logits, batch_l, batch_u, crit, opt)
    torch.manual_seed(0)
    out = semi_step(student, lambda x: teacher_logits, batch_l, batch_u, crit, opt, [ipix])
    assert set(out) == set(base) | {'loss_ipix', 'ipix_weight'}
    for k in base:
        assert torch.allclose(out[k].detach(), base[k].detach()) or k == 'loss', k
    with torch.no_grad():
        expected = 0.0
        for v in range(2):
            box = batch_u['boxes'][:, v]
            pred = student.conv(cutmix(batch_u['strong'][:, v], box))
            expected += ipix_loss(cutmix(teacher_logits, box), pred, cutmix(batch_u['valid'], box), 0.6)
        expected /= 2
    assert out['loss_ipix'] > 0
    assert torch.allclose(out['loss_ipix'], expected, atol=1e-6)
    assert torch.allclose(out['loss'].detach(), base['loss'].detach() + 0.7 * expected, atol=1e-6)
    assert out['ipix_weight'].item() == pytest.approx(0.7)
    # Unmixed teacher logits would give another value: the mixing is checked.
    with torch.no_grad():
        pred = student.conv(cutmix(batch_u['strong'][:, 0], batch_u['boxes'][:, 0]))
        unmixed = ipix_loss(teacher_logits, pred, batch_u['valid'], 0.6)
        mixed = ipix_loss(cutmix(teacher_logits, batch_u['boxes'][:, 0]), pred,
                          cutmix(batch_u['valid'], batch_u['boxes'][:, 0]), 0.6)
    assert not torch.allclose(unmixed, mixed)


def test_unimatch_v1_step_with_ipix():
    batch_l, batch_u = fixed_box_batch(seed=6, boxless=(1, 0))
    student = ConvStudent()
    crit = nn.CrossEntropyLoss(ignore_index=255)
    opt = replace(methods.get('unimatch_v1').options, conf_thresh=0.0)
    base = semi_step(student, None, batch_l, batch_u, crit, opt)
    out = semi_step(student, None, batch_l, batch_u, crit, opt,
                    [ipix_method(['ipix_weight=2.0', 'ipix_thresh=0.0', 'ipix_resolution=crop'])])
    assert out['loss_ipix'] > 0
    assert torch.allclose(out['loss'].detach(), base['loss'].detach() + 2.0 * out['loss_ipix'], atol=1e-6)


# ---- config and end to end ------------------------------------------------------------------------------

def test_config_keys():
    toy = ROOT / 'configs/toy.yaml'
    assert IPixMatch.weight(load_config(toy)) == 0.0                      # UniMatch V2 unchanged
    assert not IPixMatch.enabled(load_config(toy))
    assert IPixMatch.weight(load_config(toy, ['method=ipixmatch'])) == 1.0
    assert IPixMatch.weight(load_config(toy, ['method=ipixmatch', 'ipix_weight=0.5'])) == 0.5
    assert IPixMatch.weight(load_config(toy, ['method=fixmatch', 'ipix_weight=0.5'])) == 0.5
    for bad in (['method=ipixmatch', 'ipix_weight=0'], ['ipix_loss=l2'], ['ipix_resolution=half'],
                ['ipix_temperature=0'], ['method=supervised', 'ipix_weight=1'], ['ipix_weight=-1']):
        with pytest.raises(ConfigError, match=bad[-1].split('=')[0]):
            load_config(toy, bad)


# `toy` (fast training overrides on a tiny generated toy set) comes from conftest.py.


@pytest.mark.parametrize('method,extra', [('ipixmatch', ['ipix_loss=cr']),
                                          ('fixmatch', ['ipix_weight=0.5', 'ipix_resolution=patch'])])
def test_ipix_trains_and_resumes(toy, tmp_path, method, extra):
    run_dir = tmp_path / method
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    # A low threshold so that a random-init teacher has confident pixels.
    over = toy + [f'method={method}', 'ipix_thresh=0.2', 'ipix_warmup_epochs=0.5'] + extra
    unimatch_v2.main(args + over + ['epochs=1'])
    unimatch_v2.main(args + over + ['epochs=2'])
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['method'] == method and res['epochs'] == 2
    assert all(0.0 < h['loss_ipix'] and math.isfinite(h['loss_ipix']) for h in res['history'])
    # Epoch 0 is inside the warm-up (1 iteration of 2), epoch 1 past it.
    alpha = 1.0 if method == 'ipixmatch' else 0.5
    weights = [h['ipix_weight'] for h in res['history']]
    assert weights[0] < alpha and weights[1] == pytest.approx(alpha)
    assert 'resumed from' in (run_dir / 'train.log').read_text()
