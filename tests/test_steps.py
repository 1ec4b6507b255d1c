"""The training step (methods/step.py) and the optimizer / learning-rate schedule (engine/build.py, engine/schedule.py).

    python -m pytest tests/test_steps.py -q

CPU, a few seconds: the `dinov2_tiny` DPT model at 28 x 28 px with batches of 2, and stub students
and teachers where a test needs to see exactly what the step feeds them.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.step as steps
from model import build_model
from engine.config import Config
from util.ema import EMATeacher
from util.labels import IGNORE_INDEX
from util.losses import build_criterion
import methods
from methods.step import SemiOptions, mix_strong_views, pseudo_label, semi_step, supervised_step
from engine.build import build_optimizer
from engine.schedule import lr_scale, set_lr

NCLASS = 3
CROP = 28            # a 2 x 2 patch grid
V2_KEYS = {'loss', 'loss_x', 'loss_s1', 'loss_s2', 'loss_u', 'mask_ratio'}


def random_boxes(b: int, views: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(B, V, S, S) bool: one random rectangle per image and view."""
    boxes = torch.zeros(b, views, size, size, dtype=torch.bool)
    for i in range(b):
        for v in range(views):
            h, w = torch.randint(size // 4, size // 2 + 1, (2,), generator=g).tolist()
            y, x = torch.randint(0, size - h + 1, (1,), generator=g).item(), \
                torch.randint(0, size - w + 1, (1,), generator=g).item()
            boxes[i, v, y:y + h, x:x + w] = True
    return boxes


def make_batch(b: int = 2, size: int = CROP, views: int = 2, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, NCLASS, (b, size, size), generator=g)
    mask[:, :3] = IGNORE_INDEX
    valid = torch.ones(b, size, size, dtype=torch.bool)
    valid[0, :, size - 6:] = False                       # padding of a crop smaller than the crop size
    batch_l = {'image': torch.randn(b, 3, size, size, generator=g), 'mask': mask}
    batch_u = {'image': torch.randn(b, 3, size, size, generator=g),
               'strong': torch.randn(b, views, 3, size, size, generator=g),
               'boxes': random_boxes(b, views, size, g),
               'valid': valid}
    return batch_l, batch_u


@pytest.fixture(scope='module')
def student() -> nn.Module:
    torch.manual_seed(0)
    return build_model('dinov2_tiny', NCLASS).train()


@pytest.fixture(scope='module')
def criterion() -> nn.Module:
    return build_criterion('CELoss', {'ignore_index': IGNORE_INDEX})


def assert_finite(out: dict) -> None:
    for k, v in out.items():
        assert torch.isfinite(v).all(), k


# ---- stubs that record what the step feeds them ------------------------------------------------------

class RecordingStudent(nn.Module):
    """A 1x1 conv 'segmentor' that accepts the DPT keywords and records every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, NCLASS, 1)
        self.calls: list[dict] = []

    def forward(self, x, comp_drop=False, n_clean=0, need_fp=False):
        self.calls.append({'x': x.detach().clone(), 'comp_drop': comp_drop, 'n_clean': n_clean})
        return self.conv(x)


class FixedTeacher:
    """Returns the same logits for any input; records the input."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x):
        self.inputs.append(x)
        return self.logits


def expected_mix(t: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Independent of util.losses.cutmix: image i takes image B-1-i inside its box, pixel by pixel."""
    out = t.clone()
    b = len(t)
    for i in range(b):
        out[i][..., box[i]] = t[b - 1 - i][..., box[i]]
    return out


# ---- CutMix of strong views and targets ----------------------------------------------------------------

def test_mix_strong_views_uses_each_views_box_for_images_and_targets():
    g = torch.Generator().manual_seed(2)
    b = 4                                                 # 4 tells the reversed batch from a roll
    _, batch_u = make_batch(b=b, seed=2)
    batch_u['boxes'][:, 1] = ~batch_u['boxes'][:, 0]      # the two views' boxes are complementary
    pseudo = torch.randint(0, NCLASS, (b, CROP, CROP), generator=g)
    conf = torch.rand(b, CROP, CROP, generator=g)
    strong, targets = mix_strong_views(batch_u, pseudo, conf, views=2)
    assert len(strong) == len(targets) == 2
    for v in range(2):
        box = batch_u['boxes'][:, v]
        assert torch.equal(strong[v], expected_mix(batch_u['strong'][:, v], box))
        mixed_pseudo, mixed_conf, mixed_valid = targets[v]
        assert torch.equal(mixed_pseudo, expected_mix(pseudo, box))
        assert torch.equal(mixed_conf, expected_mix(conf, box))
        assert torch.equal(mixed_valid, expected_mix(batch_u['valid'], box))
    # And with views=1 only the first view (and its box) is used.
    strong1, targets1 = mix_strong_views(batch_u, pseudo, conf, views=1)
    assert len(strong1) == 1 and torch.equal(strong1[0], strong[0])
    assert torch.equal(targets1[0][0], targets[0][0])


@pytest.mark.parametrize('fused', [True, False])
def test_step_mixes_images_and_pseudo_labels_with_the_same_box(monkeypatch, fused):
    b = 4
    g = torch.Generator().manual_seed(3)
    batch_l, batch_u = make_batch(b=b, seed=3)
    teacher_logits = torch.randn(b, NCLASS, CROP, CROP, generator=g) * 3
    teacher = FixedTeacher(teacher_logits)
    student = RecordingStudent()
    seen = []

    def recording_loss(pred, pseudo, conf, valid, thresh):
        seen.append({'pred': pred.detach(), 'pseudo': pseudo, 'conf': conf, 'valid': valid, 'thresh': thresh})
        return real_loss(pred, pseudo, conf, valid, thresh)

    real_loss = steps.masked_unlabeled_loss
    monkeypatch.setattr(steps, 'masked_unlabeled_loss', recording_loss)
    opt = SemiOptions(conf_thresh=0.6, fused=fused)
    out = semi_step(student, teacher, batch_l, batch_u, nn.CrossEntropyLoss(ignore_index=255), opt)

    # The teacher labels the weak view.
    assert len(teacher.inputs) == 1 and teacher.inputs[0] is batch_u['image']
    prob = teacher_logits.softmax(1)
    conf_ref, pseudo_ref = prob.max(1)

    # What the student saw: labeled images, then strong view v mixed inside box v.
    mixed = [expected_mix(batch_u['strong'][:, v], batch_u['boxes'][:, v]) for v in range(2)]
    if fused:
        assert len(student.calls) == 1
        call = student.calls[0]
        assert call['comp_drop'] is True and call['n_clean'] == b
        assert torch.equal(call['x'], torch.cat([batch_l['image'], *mixed]))
    else:
        assert len(student.calls) == 2
        assert torch.equal(student.calls[0]['x'], batch_l['image'])
        assert student.calls[0]['comp_drop'] is False
        assert student.calls[1]['comp_drop'] is True
        assert torch.equal(student.calls[1]['x'], torch.cat(mixed))
    for i in range(b):   # spelled out once: inside box v, image i is strong view v of image b-1-i
        for v in range(2):
            box = batch_u['boxes'][i, v]
            x_sv = student.calls[-1]['x'][(b if fused else 0) + v * b + i]
            assert torch.equal(x_sv[:, box], batch_u['strong'][b - 1 - i, v][:, box])
            assert torch.equal(x_sv[:, ~box], batch_u['strong'][i, v][:, ~box])

    # The targets of view v were mixed with the same box v; the prediction is view v's.
    assert len(seen) == 2
    with torch.no_grad():
        for v in range(2):
            box = batch_u['boxes'][:, v]
            assert torch.equal(seen[v]['pseudo'], expected_mix(pseudo_ref, box))
            assert torch.allclose(seen[v]['conf'], expected_mix(conf_ref, box))
            assert torch.equal(seen[v]['valid'], expected_mix(batch_u['valid'], box))
            assert seen[v]['thresh'] == 0.6
            assert torch.allclose(seen[v]['pred'], student.conv(mixed[v]), atol=1e-6)

    # mask_ratio: confident share of the valid pixels of the (unmixed) weak view.
    valid = batch_u['valid']
    expected_ratio = ((conf_ref >= 0.6) & valid).sum() / valid.sum()
    assert 0 < expected_ratio < 1
    assert torch.allclose(out['mask_ratio'], expected_ratio)


# ---- the UniMatch V2 / FixMatch step on the tiny model ----------------------------------------------

def test_step_outputs_and_every_trainable_parameter_gets_a_gradient(student, criterion):
    batch_l, batch_u = make_batch()
    student.zero_grad(set_to_none=True)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, criterion,
                              SemiOptions(conf_thresh=0.0))
    assert set(out) == V2_KEYS
    assert_finite(out)
    assert out['loss'].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != 'loss')
    out['loss'].backward()
    missing = [n for n, p in student.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing
    student.zero_grad(set_to_none=True)


@pytest.mark.parametrize('w', [1.0, 0.5])
def test_total_loss_weights(student, criterion, w):
    batch_l, batch_u = make_batch(seed=4)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, criterion,
                              SemiOptions(conf_thresh=0.0, lossu_weight=w))
    assert out['loss_s1'] > 0 and out['loss_s2'] > 0
    assert torch.allclose(out['loss_u'], (out['loss_s1'] + out['loss_s2']) / 2, atol=1e-6)
    assert torch.allclose(out['loss'].detach(), (out['loss_x'] + w * out['loss_u']) / (1 + w), atol=1e-6)
    # The labeled loss is the criterion on the student's labeled prediction.
    with torch.no_grad():
        assert torch.allclose(out['loss_x'], criterion(student(batch_l['image']), batch_l['mask']), atol=1e-5)


def test_threshold_above_one_masks_every_pixel(student, criterion):
    batch_l, batch_u = make_batch(seed=5)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, criterion,
                              SemiOptions(conf_thresh=1.01))
    assert out['loss_s1'] == 0 and out['loss_s2'] == 0 and out['loss_u'] == 0
    assert out['mask_ratio'] == 0
    assert torch.allclose(out['loss'].detach(), out['loss_x'] / 2)


def test_zero_threshold_with_the_student_as_teacher(student, criterion):
    # noEMA: the online model labels its own weak view; every valid pixel is confident.
    batch_l, batch_u = make_batch(seed=6)
    out = semi_step(student, student, batch_l, batch_u, criterion, SemiOptions(conf_thresh=0.0))
    assert out['loss_u'] > 0
    assert out['mask_ratio'] == 1


def test_pseudo_label_is_max_softmax_and_argmax():
    logits = torch.tensor([[[[2.0]], [[0.0]], [[1.0]]]])          # (1, 3, 1, 1)
    conf, pseudo = pseudo_label(lambda x: logits, torch.zeros(1, 3, 1, 1))
    p = torch.tensor([2.0, 0.0, 1.0]).softmax(0)
    assert pseudo.item() == 0 and conf.item() == pytest.approx(p[0].item())


def test_fixmatch_options_use_one_strong_view(student, criterion):
    batch_l, batch_u = make_batch(seed=7)
    opt = methods.get('fixmatch').options
    assert opt.views == 1 and opt.comp_drop is False
    opt = SemiOptions(conf_thresh=0.0, views=1, comp_drop=False)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, criterion, opt)
    assert set(out) == V2_KEYS - {'loss_s2'}
    assert_finite(out)
    assert out['loss_s1'] > 0 and torch.equal(out['loss_u'], out['loss_s1'])
    assert torch.allclose(out['loss'].detach(), (out['loss_x'] + out['loss_u']) / 2, atol=1e-6)

    # The student sees labeled + one strong view, without complementary dropout.
    rec = RecordingStudent()
    semi_step(rec, FixedTeacher(torch.randn(2, NCLASS, CROP, CROP)), batch_l, batch_u,
                        criterion, opt)
    assert len(rec.calls) == 1 and len(rec.calls[0]['x']) == 4 and rec.calls[0]['comp_drop'] is False


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fused_and_unfused_steps(model: nn.Module, teacher: EMATeacher, batch_l: dict, batch_u: dict,
                            criterion: nn.Module) -> list[tuple[dict, dict]]:
    """(outputs, gradients) of the step with labeled and strong images in one student forward, then
    in separate forwards, each from the same dropout draw."""
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        out = semi_step(model, teacher, batch_l, batch_u, criterion,
                                  SemiOptions(conf_thresh=0.0, fused=fused))
        out['loss'].backward()
        results.append((out, _grads(model)))
    return results


def test_fused_and_unfused_forwards_agree(criterion):
    # Same losses and gradients whether labeled and strong images share one forward or not: the
    # complementary-dropout masks are drawn in the same order and the labeled images are left clean.
    torch.manual_seed(0)
    model = build_model('dinov2_tiny', NCLASS, drop_path=0.0).train()
    teacher = EMATeacher(model)
    batch_l, batch_u = make_batch(seed=8)
    (out_f, grad_f), (out_u, grad_u) = fused_and_unfused_steps(model, teacher, batch_l, batch_u, criterion)
    assert out_f['loss_s1'] > 0
    for k in V2_KEYS:
        assert torch.allclose(out_f[k].detach(), out_u[k].detach(), atol=1e-5), k
    assert set(grad_f) == set(grad_u) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in grad_f:
        assert torch.allclose(grad_f[n], grad_u[n], atol=1e-5), n

    # The check is sharp: a different dropout draw changes the strong losses.
    torch.manual_seed(124)
    other = semi_step(model, teacher, batch_l, batch_u, criterion,
                                SemiOptions(conf_thresh=0.0, fused=True))
    assert not torch.allclose(other['loss_s1'], out_f['loss_s1'], atol=1e-5)


# ---- UniMatch V1 and supervised steps -------------------------------------------------------------

def test_unimatch_v1_step_weights(student, criterion):
    batch_l, batch_u = make_batch(seed=9)
    student.zero_grad(set_to_none=True)
    out = semi_step(student, None, batch_l, batch_u, criterion, replace(methods.get('unimatch_v1').options, conf_thresh=0.0))
    assert {'loss', 'loss_x', 'loss_s1', 'loss_s2', 'loss_fp'} <= set(out)
    assert_finite(out)
    assert out['loss_s1'] > 0 and out['loss_s2'] > 0 and out['loss_fp'] > 0
    expected = (out['loss_x'] + 0.25 * out['loss_s1'] + 0.25 * out['loss_s2'] + 0.5 * out['loss_fp']) / 2
    assert torch.allclose(out['loss'].detach(), expected, atol=1e-6)
    out['loss'].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    student.zero_grad(set_to_none=True)

    out = semi_step(student, None, batch_l, batch_u, criterion, replace(methods.get('unimatch_v1').options, conf_thresh=1.01))
    assert out['loss_s1'] == out['loss_s2'] == out['loss_fp'] == 0


def test_supervised_step(student, criterion):
    batch_l, _ = make_batch(seed=10)
    out = supervised_step(student, batch_l, criterion)
    assert set(out) == {'loss', 'loss_x'}
    assert out['loss'].requires_grad and not out['loss_x'].requires_grad
    with torch.no_grad():
        expected = F.cross_entropy(student(batch_l['image']), batch_l['mask'], ignore_index=IGNORE_INDEX)
    assert torch.allclose(out['loss'].detach(), expected, atol=1e-5)
    assert torch.equal(out['loss_x'], out['loss'].detach())


# ---- optimizer and learning-rate schedule -----------------------------------------------------------

FROZEN = ('backbone.mask_token', 'head.scratch.refinenet4.resConfUnit1.')


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_build_optimizer_groups(student):
    cfg = Config(lr=1e-4, lr_multi=10.0, scale_lr=False)
    opt = build_optimizer(student, cfg)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    enc, head = opt.param_groups
    named = dict(student.named_parameters())
    want_enc = {id(p) for n, p in named.items() if n.startswith('backbone.') and p.requires_grad}
    want_head = {id(p) for n, p in named.items() if not n.startswith('backbone.') and p.requires_grad}
    assert _ids(enc['params']) == want_enc and _ids(head['params']) == want_head
    assert enc['lr'] == pytest.approx(1e-4) and head['lr'] == pytest.approx(1e-3)
    assert enc['weight_decay'] == head['weight_decay'] == 0.01
    in_opt = _ids(enc['params']) | _ids(head['params'])
    frozen = [n for n in named if n.startswith(FROZEN)]
    assert frozen and not any(id(named[n]) in in_opt for n in frozen)
    assert tuple(opt.defaults['betas']) == (0.9, 0.999)


def test_build_optimizer_with_locked_backbone():
    model = build_model('dinov2_tiny', NCLASS)
    model.lock_backbone()
    opt = build_optimizer(model, Config(lr=1e-4, lr_multi=40.0, scale_lr=False, lock_backbone=True))
    enc, head = opt.param_groups
    assert enc['params'] == []
    named = dict(model.named_parameters())
    assert _ids(head['params']) == {id(p) for n, p in named.items()
                                    if n.startswith('head.') and not n.startswith(FROZEN[1])}
    assert head['lr'] == pytest.approx(4e-3)


def test_set_lr():
    model = nn.Sequential(nn.Linear(2, 2))
    cfg = Config(lr=2e-4, lr_multi=40.0, scale_lr=False)
    opt = torch.optim.AdamW([{'params': [], 'lr': 0.0}, {'params': model.parameters(), 'lr': 0.0}])
    for it, total in [(0, 100), (1, 100), (37, 100), (99, 100), (100, 100)]:
        lr = set_lr(opt, cfg, it, total)
        expected = 2e-4 * (1 - it / total) ** 0.9
        assert lr == pytest.approx(expected, abs=1e-15)
        assert opt.param_groups[0]['lr'] == pytest.approx(expected, abs=1e-15)
        assert opt.param_groups[1]['lr'] == pytest.approx(expected * 40, abs=1e-15)
    # The scaled base: 1 process, grad_accum 2, reference 4 -> half the lr.
    cfg = Config(lr=2e-4, lr_multi=40.0, scale_lr=True, grad_accum=2, reference_gpus=4)
    assert set_lr(opt, cfg, 50, 100) == pytest.approx(1e-4 * 0.5 ** 0.9)


def test_sgd_and_cosine_schedule():
    """The classification recipe: SGD with nesterov momentum, cosine lr ending at cos(7 pi / 16)."""
    cfg = Config(optimizer='sgd', lr=0.03, lr_multi=1.0, weight_decay=5e-4, scale_lr=False, lr_schedule='cosine')
    opt = build_optimizer(nn.Sequential(nn.Linear(2, 2)), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults['momentum'] == 0.9 and opt.defaults['nesterov'] and opt.defaults['weight_decay'] == 5e-4
    assert set_lr(opt, cfg, 0, 100) == pytest.approx(0.03)
    assert set_lr(opt, cfg, 50, 100) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    assert set_lr(opt, cfg, 100, 100) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    assert opt.param_groups[1]['lr'] == pytest.approx(0.03 * math.cos(7 * math.pi / 16))


def test_lr_scale(monkeypatch):
    assert lr_scale(Config(scale_lr=True, reference_gpus=4, grad_accum=1)) == 0.25
    assert lr_scale(Config(scale_lr=True, reference_gpus=4, grad_accum=4)) == 1.0
    assert lr_scale(Config(scale_lr=False, reference_gpus=4, grad_accum=3)) == 1.0
    monkeypatch.setattr('util.dist.world_size', lambda: 8)
    assert lr_scale(Config(scale_lr=True, reference_gpus=4, grad_accum=2)) == 4.0
    assert lr_scale(Config(scale_lr=False, reference_gpus=4, grad_accum=2)) == 1.0
    # build_optimizer uses the scaled lr.
    opt = build_optimizer(nn.Linear(2, 2), Config(lr=1e-4, lr_multi=10.0, scale_lr=True, reference_gpus=4))
    assert opt.param_groups[1]['lr'] == pytest.approx(1e-4 * 2 * 10)


class _Replacing:
    """A stand-in method whose hook replaces the strong views' losses with a constant."""
    def __init__(self, value: float):
        self.value = value

    def teacher_kwargs(self, s):
        return {}

    def student_kwargs(self, s):
        return {}

    def strong_losses(self, s):
        return {'loss_s1': torch.tensor(self.value), 'loss_s2': torch.tensor(self.value)}

    def terms(self, s, out):
        return {}


def test_one_replacing_method_sets_the_strong_losses_and_two_are_an_error(student, criterion):
    batch_l, batch_u = make_batch(seed=8)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, criterion, SemiOptions(conf_thresh=0.0),
                    [_Replacing(0.25)])
    assert out['loss_s1'] == 0.25 and torch.allclose(out['loss_u'], torch.tensor(0.25))
    with pytest.raises(ValueError, match="2 methods replace the strong views' losses"):
        semi_step(student, EMATeacher(student), batch_l, batch_u, criterion, SemiOptions(conf_thresh=0.0),
                  [_Replacing(0.25), _Replacing(0.5)])


def test_the_unfused_forward_refuses_a_methods_student_keywords(student, criterion):
    class AsksForMore(_Replacing):
        def student_kwargs(self, s):
            return {'return_features': True}

        def strong_losses(self, s):
            return None

    batch_l, batch_u = make_batch(seed=9)
    with pytest.raises(ValueError, match=r"\['return_features'\] need the fused student forward"):
        semi_step(student, EMATeacher(student), batch_l, batch_u, criterion,
                  SemiOptions(conf_thresh=0.0, fused=False), [AsksForMore(0.0)])
