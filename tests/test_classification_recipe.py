"""The classification recipe of the original's logs (TorchSSL's format for STL-10 and SVHN; its
CIFAR script's own log), point by point against TorchSSL's and USB's FixMatch
(docs/classification.md): the total loss, RandAugment(3, 5), SVHN's files and flips, the wide
ResNet's `activate_before_residual`, weight decay off biases and BatchNorm, TorchSSL's evaluation
points.

    python -m pytest tests/test_classification_recipe.py -q
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torch import nn

import methods
from dataset import randaugment
from dataset.classification import get_spec, load_classification, strong_view, weak_geometry
from methods.base import MethodSet
from model.classifiers import build_classifier
from tests.test_classification import TEST, TRAIN, write_cifar, write_svhn
from engine.config import load_config
from util.ema import EMATeacher
from engine.build import build_optimizer, make_step
from engine.schedule import evaluation_due, set_lr, torchssl_evaluations

ROOT = Path(__file__).resolve().parents[1]


def config(name: str, *overrides: str):
    return load_config(ROOT / f'configs/{name}.yaml', ['download=false', *overrides])


# ---- the total loss: L_x + L_u ------------------------------------------------------------------------

def classification_batch(bl: int = 4, bu: int = 6, side: int = 32) -> tuple[dict, dict]:
    torch.manual_seed(0)
    return ({'image': torch.randn(bl, 3, side, side), 'mask': torch.randint(0, 10, (bl, 1, 1))},
            {'image': torch.randn(bu, 3, side, side), 'strong': torch.randn(bu, 2, 3, side, side),
             'boxes': torch.zeros(bu, 2, 1, 1, dtype=torch.bool), 'valid': torch.ones(bu, 1, 1, dtype=torch.bool)})


def trainer_step(cfg, student: nn.Module):
    """The step engine/build.py builds for `cfg` (UniMatch V2), around `student` and its EMA."""
    tr = SimpleNamespace(run=SimpleNamespace(cfg=cfg), methods=MethodSet([]), teacher=EMATeacher(student, cfg.ema_decay),
                         student=student, ddp=student, state=SimpleNamespace(epoch=-1, iteration=0))
    return make_step(tr, methods.get(cfg.method).options, 1024)


@pytest.mark.parametrize('dataset', ['cifar10', 'stl10', 'svhn'])
def test_classification_step_adds_the_losses(dataset):
    """TorchSSL's total_loss = sup_loss + lambda_u * unsup_loss (STL-10's log at 5000 iterations:
    0.0052 + 0.2130 = 0.2181), not the segmentation step's (L_x + L_u) / 2."""
    student = build_classifier('wrn_16_1', 10)
    student.head.weight.data *= 30          # confident teacher: some pseudo-labels pass 0.95
    batch_l, batch_u = classification_batch()
    torch.manual_seed(1)
    out = trainer_step(config(dataset, 'backbone=wrn_16_1'), student)(batch_u, batch_l)
    assert out['loss_u'] > 0 and out['mask_ratio'] > 0
    assert torch.equal(out['loss'].detach(), out['loss_x'] + out['loss_u'])


def test_segmentation_step_still_takes_the_mean():
    from model import build_model
    student = build_model('dinov2_tiny', 6)
    torch.manual_seed(0)
    s = 28
    batch_l = {'image': torch.randn(2, 3, s, s), 'mask': torch.randint(0, 6, (2, s, s))}
    batch_u = {'image': torch.randn(2, 3, s, s), 'strong': torch.randn(2, 2, 3, s, s),
               'boxes': torch.zeros(2, 2, s, s, dtype=torch.bool), 'valid': torch.ones(2, s, s, dtype=torch.bool)}
    out = trainer_step(config('toy', 'pretrained=null', 'conf_thresh=0'), student)(batch_u, batch_l)
    assert torch.equal(out['loss'].detach(), (out['loss_x'] + out['loss_u']) / 2)


# ---- RandAugment(3, 5) -------------------------------------------------------------------------------

# TorchSSL's augment_list() (and USB's): operation -> magnitude range.
TORCHSSL_OPS = {'AutoContrast': (0, 1), 'Brightness': (0.05, 0.95), 'Color': (0.05, 0.95),
                'Contrast': (0.05, 0.95), 'Equalize': (0, 1), 'Identity': (0, 1), 'Posterize': (4, 8),
                'Rotate': (-30, 30), 'Sharpness': (0.05, 0.95), 'ShearX': (-0.3, 0.3), 'ShearY': (-0.3, 0.3),
                'Solarize': (0, 256), 'TranslateX': (-0.3, 0.3), 'TranslateY': (-0.3, 0.3)}


def test_randaugment_ops_and_their_ranges():
    assert {op.name: (op.low, op.high) for op in randaugment.OPS} == TORCHSSL_OPS
    rng, seen = random.Random(0), {}
    for _ in range(4000):
        ops = randaugment.draw_ops(rng)
        assert len(ops) == 3
        for op, v in ops:
            seen.setdefault(op.name, []).append(v)
    assert set(seen) == set(TORCHSSL_OPS)                    # drawn with replacement from all 14
    for name, values in seen.items():                        # uniform over the op's own range
        low, high = TORCHSSL_OPS[name]
        assert low <= min(values) < low + 0.05 * (high - low) and high - 0.05 * (high - low) < max(values) <= high
        assert np.mean(values) == pytest.approx((low + high) / 2, abs=0.05 * (high - low))


def test_strong_view_applies_three_ops_then_cutout_then_the_weak_geometry(monkeypatch):
    calls = []
    recording = tuple(randaugment.Op(op.name, op.low, op.high,
                                     lambda img, v, op=op: (calls.append(np.array(img)), op.apply(img, v))[1])
                      for op in randaugment.OPS)
    monkeypatch.setattr(randaugment, 'OPS', recording)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for seed in range(5):
        calls.clear()
        out = strong_view(img, get_spec('stl10'), random.Random(seed))
        assert len(calls) == 3 and out.size == (96, 96)
        assert np.array_equal(calls[0], np.array(img))      # on the image itself, before the flip and crop


def test_op_semantics_match_pil():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ops = {op.name: op for op in randaugment.OPS}
    for name, enhancer in (('Brightness', ImageEnhance.Brightness), ('Color', ImageEnhance.Color),
                           ('Contrast', ImageEnhance.Contrast), ('Sharpness', ImageEnhance.Sharpness)):
        assert np.array_equal(np.array(ops[name].apply(img, 0.3)), np.array(enhancer(img).enhance(0.3))), name
    shifted = np.array(ops['TranslateX'].apply(img, 0.25))    # 0.25 of the width: 8 pixels
    assert np.array_equal(shifted[:, :24], np.array(img)[:, 8:]) and not shifted[:, 24:].any()
    sheared = np.array(ops['ShearY'].apply(img, 0.25))        # about the corner: column x moves by 0.25 x
    assert np.array_equal(sheared[:, 0], np.array(img)[:, 0]) and np.array_equal(sheared[:24, 4], np.array(img)[1:25, 4])


# ---- SVHN: train + extra, flipped ----------------------------------------------------------------------

def test_svhn_trains_on_train_and_extra(tmp_path):
    extra = [k % 10 for k in range(90)]
    write_svhn(tmp_path, TRAIN, TEST, extra)
    data = load_classification('svhn', tmp_path, '8_labels_per_class', seed=0)
    assert data.train.labels.tolist() == TRAIN + extra            # train_32x32.mat, then extra_32x32.mat
    assert len(data.unlabeled) == len(TRAIN) + len(extra) and data.test.labels.tolist() == TEST
    assert data.labeled.max() >= len(TRAIN)                        # labels drawn from both (TorchSSL, USB)
    (tmp_path / 'extra_32x32.mat').unlink()
    from dataset.checks import DataError
    with pytest.raises(DataError, match='extra_32x32.mat'):
        load_classification('svhn', tmp_path, '4_labels_per_class', seed=0)


@pytest.mark.parametrize('dataset', ['cifar10', 'stl10', 'svhn'])
def test_weak_views_are_flipped_on_every_dataset(dataset):
    spec = get_spec(dataset)
    half = np.zeros((spec.size, spec.size, 3), np.uint8)
    half[:, spec.size // 2:] = 255                                 # dark left, bright right
    lefts = {bool(np.array(weak_geometry(Image.fromarray(half), spec, random.Random(s)))[:, :4].mean() > 128)
             for s in range(40)}
    assert lefts == {False, True}


def test_weak_view_pads_four_pixels():
    """TorchSSL's RandomCrop(size, padding=4, reflect) on every dataset: a dot at the centre of an
    STL-10 image moves by at most 4 pixels (USB's 12.5% would be 12)."""
    spec = get_spec('stl10')
    dot = np.zeros((96, 96, 3), np.uint8)
    dot[48, 48] = 255
    rows = set()
    for s in range(300):
        view = np.array(weak_geometry(Image.fromarray(dot), spec, random.Random(s)))[..., 0]
        ys, xs = np.nonzero(view)
        rows.add(int(ys[0]))
    assert rows == set(range(44, 53))


# ---- the wide ResNet's activate_before_residual ----------------------------------------------------

def branch_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """{block index: (block input, conv1's input, shortcut's input or None)} of one forward."""
    seen = {}
    for i, block in enumerate(model.backbone.blocks):
        seen[i] = {}
        block.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__('x', a[0]))
        block.conv1.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__('conv1', a[0]))
        if block.shortcut is not None:
            block.shortcut.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__('shortcut', a[0]))
    model(x)
    return seen


@pytest.mark.parametrize('name, firsts', [('wrn_28_2', (0, 4, 8)), ('wrn_var_37_2', (0, 4, 8, 12))])
def test_first_blocks_feed_the_raw_input_after_the_first_group(name, firsts):
    torch.manual_seed(0)
    model = build_classifier(name, 10).eval()
    seen = branch_inputs(model, torch.randn(2, 3, 32, 32))
    blocks = model.backbone.blocks
    for i, s in seen.items():
        activated = blocks[i].act1(s['x'])
        if i == firsts[0]:                   # group 1: activate_before_residual -> BN-LeakyReLU(x) to both
            assert torch.equal(s['conv1'], activated) and torch.equal(s['shortcut'], activated)
        elif i in firsts:                    # groups 2, 3 (4): the raw input to both
            assert torch.equal(s['conv1'], s['x']) and torch.equal(s['shortcut'], s['x'])
        else:                                # width kept: conv1 on BN-LeakyReLU(x), identity shortcut
            assert torch.equal(s['conv1'], activated) and 'shortcut' not in s


@pytest.mark.parametrize('name, count, frozen', [('wrn_28_2', 1_469_642, 2 * (32 + 64)),
                                                 ('wrn_var_37_2', 5_933_770, 2 * (32 + 64 + 128))])
def test_unused_batchnorm_is_kept_frozen_and_every_trainable_parameter_learns(name, count, frozen):
    """The logs' parameter counts stay (FACTS §8); the BatchNorm TorchSSL computes and discards in
    those blocks is frozen, and every trainable parameter gets a gradient (DDP without
    find_unused_parameters)."""
    model = build_classifier(name, 10)
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- weight decay off biases and BatchNorm --------------------------------------------------------------

def test_sgd_exempts_biases_and_batchnorm_from_weight_decay():
    cfg = config('stl10', 'scale_lr=false', 'lr_multi=2.0')
    model = build_classifier('wrn_28_2', 10)
    opt = build_optimizer(model, cfg)
    assert len(opt.param_groups) == 4
    enc, head, enc_exempt, head_exempt = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in (enc, head) for p in g['params']}
    exempt = {names[id(p)] for g in (enc_exempt, head_exempt) for p in g['params']}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith('weight') and p.dim() > 1}
    assert exempt == {n for n, p in model.named_parameters() if p.requires_grad and (n.endswith('bias') or p.dim() == 1)}
    assert enc['weight_decay'] == head['weight_decay'] == 5e-4 and enc_exempt['weight_decay'] == head_exempt['weight_decay'] == 0
    assert {names[id(p)] for p in head['params']} == {'head.weight'}
    set_lr(opt, cfg, 512, 1024)
    assert enc['lr'] == enc_exempt['lr'] and head['lr'] == head_exempt['lr'] == pytest.approx(2 * enc['lr'])


def test_segmentation_adamw_groups_are_unchanged():
    from model import build_model
    model = build_model('dinov2_tiny', 6)
    opt = build_optimizer(model, config('toy', 'pretrained=null'))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    assert all(g['weight_decay'] == 0.01 for g in opt.param_groups)
    assert sum(len(g['params']) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


# ---- evaluation where TorchSSL evaluates ------------------------------------------------------------------

def torchssl_loop_points(total: int, interval: int, final: int) -> list[int]:
    """The iterations after which TorchSSL's fixmatch.py loop evaluates, by running its rule."""
    points, n = [], interval
    for it in range(total):
        if it % n == 0:
            points.append(it)
        if it + 1 > 0.8 * total:
            n = final
    return points


def test_evaluation_points_are_torchssls():
    total = 2 ** 20
    points = torchssl_loop_points(total, 5000, 1000)
    # The STL-10 and SVHN logs: 378 evaluations, every 5000 iterations up to 835000, then every 1000
    # from 839000 to 1048000.
    assert points == list(range(0, 835001, 5000)) + list(range(839000, 1048001, 1000)) and len(points) == 378
    for it in (0, 1, 4999, 5000, 5001, 838860, 838861, 839000, 839001, 1048000, 1048001, total):
        assert torchssl_evaluations(it, 5000, 1000, total) == sum(p < it for p in points), it
    for name in ('stl10', 'svhn'):
        cfg = config(name)
        due = [e for e in range(cfg.epochs) if evaluation_due(cfg, e, cfg.max_iters_per_epoch)]
        assert due == sorted({p // cfg.max_iters_per_epoch for p in points}) and len(due) == 373
    cifar = config('cifar10')                 # its own script evaluates after every epoch of 1024
    assert all(evaluation_due(cifar, e, 1024) for e in range(cifar.epochs))


def test_a_run_evaluates_only_at_the_due_epochs(tmp_path):
    import unimatch_v2
    root = tmp_path / 'cifar'
    write_cifar(root, TRAIN, TEST)
    overrides = [f'data_root={root}', 'download=false', 'backbone=wrn_16_1', 'max_iters_per_epoch=2', 'batch_size=4',
                 'unlabeled_ratio=2', 'labeled_upsample=16', 'num_workers=0', 'eval_batch_size=8', 'epochs=5',
                 'eval_interval=3', 'eval_interval_final=1']
    unimatch_v2.main(['--config', str(ROOT / 'configs/cifar10.yaml'), '--split', '2_labels_per_class',
                      '--save-path', str(tmp_path / 'run')] + overrides)
    res = json.loads((tmp_path / 'run/results.json').read_text())
    cfg = config('cifar10', *overrides)
    due = [e for e in range(5) if evaluation_due(cfg, e, 2)]
    # 10 iterations: it 0, 3, 6 at interval 3; past 8 every iteration: 8, 9 -> epochs 0, 1, 3, 4
    assert due == [0, 1, 3, 4] and [h['epoch'] for h in res['history']] == due
    assert res['epochs'] == 5 == res['epochs_total'] and len(res['top1_ema']) == 4
    assert torch.load(tmp_path / 'run/latest.pth', weights_only=True)['epoch'] == 4
