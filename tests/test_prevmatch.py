"""PrevMatch's previous guidance: the snapshot bank (util/prevmatch.py), its place in the step
(methods/step.py), the checkpoint (engine/state.py), and a few iterations of `method=prevmatch`.

    OMP_NUM_THREADS=1 python -m pytest tests/test_prevmatch.py -q
"""
from __future__ import annotations

from dataclasses import replace

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.batches import CROP, NCLASS, fixed_box_batch
import unimatch_v2
from model import build_model
from tools import tables
import engine.build
import engine.run
import engine.state
from util.checkpoint import safe_load, save_atomic
from util.config import ConfigError
from engine.config import load_config
from util.ema import EMATeacher
from util.losses import cutmix, masked_unlabeled_loss
from util.precision import Precision
from methods.prevmatch import PrevMatch, SnapshotBank, guidance_loss, guidance_weight
import methods
from methods.base import MethodSet
from methods.step import SemiOptions, semi_step
from tests.launch import HANG_TIMEOUT_S

V1_WEIGHTS = {'loss_s1': 0.25, 'loss_s2': 0.25, 'loss_fp': 0.5}     # UniMatch V1's L_u

ROOT = Path(__file__).resolve().parents[1]


class Conv(nn.Module):
    """A 1x1 conv 'segmentor' accepting the DPT keywords; `scale` tells instances apart."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, NCLASS, 1)
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))   # a non-float buffer

    def forward(self, x, comp_drop=False, n_clean=0, need_fp=False):
        out = self.conv(x)
        return (out, self.conv(x * 0.5)) if need_fp else out


def bank_of(n: int, cap: int = 8, k: int = 3, storage: str = 'device', seed: int = 0
            ) -> tuple[SnapshotBank, list]:
    models = [Conv(seed=i + 10) for i in range(n)]
    bank = SnapshotBank(Conv(), cap=cap, max_ensemble=k, storage=storage, seed=seed)
    for e, m in enumerate(models):
        bank.add(m, epoch=e)
    return bank, models


# ---- schedule and loss ------------------------------------------------------------------------------

def test_guidance_weight_is_triangular_over_epochs():
    assert [guidance_weight(e, 8) for e in range(8)] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]
    assert guidance_weight(30, 60, peak=2.0) == 2.0 and guidance_weight(15, 60) == 0.5
    assert guidance_weight(0, 1) == 0.0


def test_guidance_loss_modes():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, NCLASS, 4, 4, generator=g)
    pseudo = torch.randint(0, NCLASS, (2, 4, 4), generator=g)
    conf = torch.rand(2, 4, 4, generator=g)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :, 2:] = False
    assert torch.equal(guidance_loss(pred, pseudo, conf, valid, 0.5, 'pixelwise'),
                       masked_unlabeled_loss(pred, pseudo, conf, valid, 0.5))
    ce = F.cross_entropy(pred, pseudo, reduction='none')
    avg = [conf[b][valid[b]].mean() for b in range(2)]
    per_pixel = sum((ce[b][valid[b]] * avg[b]).sum() for b in range(2)) / valid.sum()
    assert torch.allclose(guidance_loss(pred, pseudo, conf, valid, 0.5, 'pixelavg'), per_pixel)
    literal = ce[valid].mean() * (avg[0] + avg[1])
    assert torch.allclose(guidance_loss(pred, pseudo, conf, valid, 0.5, 'pixelavg_literal'), literal)
    with pytest.raises(ValueError):
        guidance_loss(pred, pseudo, conf, valid, 0.5, 'mean')


# ---- the snapshot bank ------------------------------------------------------------------------------

def test_bank_is_fifo_and_holds_frozen_copies():
    bank, models = bank_of(3, cap=2)
    assert len(bank) == 2 and bank.epochs == [1, 2]
    before = bank.snapshots[0]['conv.weight'].clone()
    with torch.no_grad():
        models[1].conv.weight.add_(1.0)                   # training goes on: the snapshot stays
    assert torch.equal(bank.snapshots[0]['conv.weight'], before)
    assert torch.allclose(before, models[1].conv.weight - 1.0)


@pytest.mark.parametrize('storage,dtype', [('bf16', torch.bfloat16), ('device', torch.float32),
                                           ('cpu', torch.float32)])
def test_storage(storage, dtype):
    bank, models = bank_of(1, storage=storage)
    snap = bank.snapshots[0]
    assert snap['conv.weight'].dtype == dtype and snap['calls'].dtype == torch.long
    assert snap['conv.weight'].device.type == 'cpu'        # the device is the CPU in these tests
    assert bank.runner.conv.weight.dtype == torch.float32   # every snapshot runs in fp32 weights
    x = torch.randn(2, 3, 5, 5)
    want = models[0].conv.weight.to(dtype).float()
    assert torch.allclose(bank.forward_one(0, x), F.conv2d(x, want, models[0].conv.bias.to(dtype).float()),
                          atol=1e-6)
    assert not any(p.requires_grad for p in bank.runner.parameters()) and not bank.runner.training


def test_ensemble_weights_sum_to_one_and_the_chosen_snapshots_vary():
    bank, _ = bank_of(5, k=3)
    draws = [bank.sample() for _ in range(300)]
    for chosen, w in draws:
        assert 1 <= len(chosen) <= 3 and len(set(chosen)) == len(chosen)   # without replacement
        assert len(w) == len(chosen) and (w > 0).all()
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert {len(c) for c, _ in draws} == {1, 2, 3}                           # n ~ U{1..K}
    assert {i for c, _ in draws for i in c} == set(range(5))                 # every snapshot is used
    assert len({tuple(sorted(c)) for c, _ in draws}) > 10                    # subsets vary
    assert len({round(float(w[0]), 4) for c, w in draws if len(c) == 2}) > 10  # weights vary
    # Fewer snapshots than K: at most all of them.
    small, _ = bank_of(2, k=3)
    assert max(len(small.sample()[0]) for _ in range(50)) == 2


def test_sample_ensemble_is_the_weighted_sum_of_logits():
    bank, models = bank_of(4, k=3)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(5):
        z = bank.sample_ensemble(x)
        chosen, w = bank.last_choice
        with torch.no_grad():
            expected = sum(wi * models[i](x) for i, wi in zip(chosen, w.tolist()))
        assert torch.allclose(z, expected, atol=1e-5)


def test_snapshot_triggers():
    bank, _ = bank_of(0)
    model = Conv(seed=3)
    # 'best': strictly new best mIoU of the snapshotted model, from start_epoch on.
    bank.start_epoch = 2
    taken = [bank.end_of_epoch(e, model, m) for e, m in enumerate([10.0, 20.0, 15.0, 25.0, 25.0, 30.0])]
    assert taken == [False, True, False, True, False, True] and bank.epochs == [1, 3, 5]
    # 'every': every N epochs, with or without a validation result.
    every, _ = bank_of(0)
    every.trigger, every.every = 'every', 3
    taken = [every.end_of_epoch(e, model, None) for e in range(7)]
    assert taken == [False, False, True, False, False, True, False]


def test_bank_state_round_trip_keeps_snapshots_and_the_random_stream():
    bank, _ = bank_of(3, storage='bf16', seed=5)
    bank.best_miou = 42.0
    state = bank.state_dict()
    other = SnapshotBank(Conv(), cap=8, storage='bf16', seed=99)
    other.load_state_dict(state)
    assert other.epochs == bank.epochs and other.best_miou == 42.0
    for a, b in zip(bank.snapshots, other.snapshots):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for _ in range(5):
        (c1, w1), (c2, w2) = bank.sample(), other.sample()
        assert c1 == c2 and torch.equal(w1, w2)
    # A smaller cap keeps the newest.
    small = SnapshotBank(Conv(), cap=2)
    small.load_state_dict(state)
    assert small.epochs == [1, 2]


def test_snapshots_survive_a_checkpoint_and_resume(tmp_path):
    """engine.state.checkpoint_dict writes the bank; engine.state.resume reads it into a fresh one."""
    cfg = load_config(ROOT / 'configs/toy.yaml', ['method=prevmatch', 'pretrained=null'])
    run = engine.run.Run(cfg, tmp_path, torch.device('cpu'), None, '1_16', tmp_path, tmp_path, tmp_path)

    class Log:
        def info(self, msg):
            pass

    run.log = Log()

    def training(seed: int) -> engine.state.Training:
        student = build_model('dinov2_tiny', NCLASS)
        prev = PrevMatch(replace(cfg, seed=seed), student, run.device)      # bank in bf16, the default
        return engine.state.Training(run, student, student, EMATeacher(student),
                                engine.build.build_optimizer(student, cfg),
                                Precision('fp32', run.device), engine.state.TrainState(), None, MethodSet([prev]))

    def bank(tr: engine.state.Training) -> SnapshotBank:
        return tr.methods.methods[0].bank

    torch.manual_seed(0)
    first = training(seed=1)
    for e in range(2):
        with torch.no_grad():
            for p in first.student.parameters():
                p.add_(0.1 * torch.randn_like(p))
        bank(first).add(first.student, epoch=e)
    save_atomic(engine.state.checkpoint_dict(first), tmp_path / 'latest.pth')

    second = training(seed=2)
    assert len(bank(second)) == 0
    engine.state.resume(second, safe_load(tmp_path / 'latest.pth'))
    assert bank(second).epochs == [0, 1]
    for a, b in zip(bank(first).snapshots, bank(second).snapshots):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(bank(second).snapshots[0]['head.scratch.output_conv.2.weight'],
                           bank(second).snapshots[1]['head.scratch.output_conv.2.weight'])
    x = torch.randn(1, 3, CROP, CROP)
    assert torch.equal(bank(first).sample_ensemble(x), bank(second).sample_ensemble(x))


# ---- in the step ---------------------------------------------------------------------------------------

def guidance(student: nn.Module, ensemble, weight: float, thresh: float) -> PrevMatch:
    """PrevMatch with a non-empty bank whose ensemble is `ensemble`, at lambda = `weight`."""
    m = PrevMatch(load_config(ROOT / 'configs/toy.yaml', ['method=prevmatch', f'prev_thresh={thresh}']), student,
                  torch.device('cpu'))
    m.bank.add(student)
    m.bank.sample_ensemble = ensemble
    m.lam = weight
    return m


def test_step_adds_guidance_on_mixed_ensemble_labels():
    batch_l, batch_u = fixed_box_batch()
    g = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(4, NCLASS, CROP, CROP, generator=g) * 3
    ensemble_logits = torch.randn(4, NCLASS, CROP, CROP, generator=g) * 3
    seen = []

    def ensemble(x):
        seen.append(x)
        return ensemble_logits

    student, crit = Conv(), nn.CrossEntropyLoss(ignore_index=255)
    opt = SemiOptions(conf_thresh=0.6, lossu_weight=1.0)
    base = semi_step(student, lambda x: teacher_logits, batch_l, batch_u, crit, opt)
    prev = guidance(student, ensemble, weight=0.4, thresh=0.5)
    out = semi_step(student, lambda x: teacher_logits, batch_l, batch_u, crit, opt, [prev])
    assert len(seen) == 1 and seen[0] is batch_u['image']            # the ensemble labels the weak view
    assert set(out) == set(base) | {'loss_prev', 'prev_weight', 'prev_mask_ratio'}
    conf_p, pseudo_p = ensemble_logits.softmax(1).max(1)
    with torch.no_grad():
        expected = sum(masked_unlabeled_loss(student.conv(cutmix(batch_u['strong'][:, v], box)),
                                             cutmix(pseudo_p, box), cutmix(conf_p, box),
                                             cutmix(batch_u['valid'], box), 0.5)
                       for v, box in enumerate(batch_u['boxes'].unbind(1))) / 2
    assert out['loss_prev'] > 0 and torch.allclose(out['loss_prev'], expected, atol=1e-6)
    total = (base['loss_x'] + base['loss_u'] + 0.4 * expected) / 2.4
    assert torch.allclose(out['loss'].detach(), total, atol=1e-6)
    ratio = ((conf_p >= 0.5) & batch_u['valid']).sum() / batch_u['valid'].sum()
    assert torch.allclose(out['prev_mask_ratio'], ratio)


def test_unimatch_v1_step_weights_guidance_like_its_streams():
    batch_l, batch_u = fixed_box_batch(seed=2)
    ensemble_logits = torch.randn(4, NCLASS, CROP, CROP, generator=torch.Generator().manual_seed(3)) * 3
    student, crit = Conv(), nn.CrossEntropyLoss(ignore_index=255)
    opt = replace(methods.get('unimatch_v1').options, conf_thresh=0.0)
    out = semi_step(student, None, batch_l, batch_u, crit, opt,
                    [guidance(student, lambda x: ensemble_logits, weight=1.0, thresh=0.0)])
    conf_p, pseudo_p = ensemble_logits.softmax(1).max(1)
    with torch.no_grad():
        x_w, valid = batch_u['image'], batch_u['valid']
        terms = {f'loss_s{v + 1}': masked_unlabeled_loss(student.conv(cutmix(batch_u['strong'][:, v], box)),
                                                         cutmix(pseudo_p, box), cutmix(conf_p, box),
                                                         cutmix(valid, box), 0.0)
                 for v, box in enumerate(batch_u['boxes'].unbind(1))}
        terms['loss_fp'] = masked_unlabeled_loss(student.conv(x_w * 0.5), pseudo_p, conf_p, valid, 0.0)
    expected = sum(V1_WEIGHTS[k] * terms[k] for k in V1_WEIGHTS)
    assert torch.allclose(out['loss_prev'], expected, atol=1e-6)
    assert torch.allclose(out['loss'].detach(), (out['loss_x'] + out['loss_u'] + expected) / 3, atol=1e-6)


# ---- config, tables, reproduce, end to end --------------------------------------------------------------

def test_config_keys():
    configs = ROOT / 'configs'
    assert PrevMatch.weight(load_config(configs / 'pascal.yaml')) == 0.0        # UniMatch V2 unchanged
    assert not PrevMatch.enabled(load_config(configs / 'pascal.yaml'))
    assert PrevMatch.weight(load_config(configs / 'pascal.yaml', ['method=prevmatch'])) == 1.0
    assert PrevMatch.weight(load_config(configs / 'pascal.yaml', ['prev_weight=0.5'])) == 0.5
    caps = {d: load_config(configs / f'{d}.yaml').prev_snapshots
            for d in ('pascal', 'cityscapes', 'ade20k', 'coco')}
    assert caps == {'pascal': 8, 'cityscapes': 8, 'ade20k': 5, 'coco': 5}
    for bad in (['method=prevmatch', 'prev_weight=0'], ['prev_trigger=often'], ['prev_storage=disk'],
                ['prev_source=teacher'], ['prev_loss=mean'], ['prev_snapshots=0'],
                ['method=supervised', 'prev_weight=1']):
        with pytest.raises(ConfigError, match=bad[-1].split('=')[0]):
            load_config(configs / 'toy.yaml', bad)


def test_tables_and_reproduce_know_both_methods(tmp_path):
    for method, miou in (('unimatch_v2', 40.0), ('ipixmatch', 42.0), ('prevmatch', 41.0)):
        d = tmp_path / 'toy' / method / 'dinov2_tiny' / '1_16'
        d.mkdir(parents=True)
        (d / 'results.json').write_text(json.dumps({
            'dataset': 'toy', 'method': method, 'backbone': 'dinov2_tiny', 'split': '1_16', 'epochs': 1,
            'epochs_total': 1, 'miou': [miou], 'miou_ema': [miou], 'best_miou': miou, 'best_miou_ema': miou,
            'final_miou': miou, 'final_miou_ema': miou, 'history': []}))
    md = tables.make_table('toy', tables.collect_runs(tmp_path), {})
    rows = [ln.split('|')[1].strip() for ln in md.splitlines() if ln.startswith('| ') and 'method' not in ln]
    assert rows == ['unimatch_v2', 'prevmatch', 'ipixmatch']
    env = {**os.environ, 'EXP_DIR': str(tmp_path / 'exp'), 'DRY_RUN': '1'}
    res = subprocess.run(['sh', str(ROOT / 'scripts/reproduce.sh'), 'toy'], env=env, capture_output=True,
                         text=True, timeout=HANG_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    cells = [ln.split()[2:5] for ln in res.stdout.splitlines() if ln.startswith('sh scripts/train.sh')]
    for method in ('prevmatch', 'ipixmatch'):
        assert [['toy', s, method] for s in ('1_16', '1_8', '1_4')] == [c for c in cells if c[2] == method]


# `toy` (fast training overrides on a tiny generated toy set) comes from conftest.py.


def test_prevmatch_trains_snapshots_and_resumes(toy, tmp_path):
    run_dir = tmp_path / 'prevmatch'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    over = toy + ['method=prevmatch', 'prev_thresh=0.0']
    unimatch_v2.main(args + over + ['epochs=1'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    bank = ckpt['prev_bank']
    # After epoch 0 (the first, hence best, evaluation): one snapshot of the EMA teacher, in bf16.
    assert bank['epochs'] == [0] and len(bank['snapshots']) == 1
    snap = bank['snapshots'][0]
    assert snap.keys() == ckpt['model_ema'].keys()
    assert all(torch.equal(snap[k], v.to(snap[k].dtype)) for k, v in ckpt['model_ema'].items())
    assert snap['head.scratch.output_conv.2.weight'].dtype == torch.bfloat16
    res = json.loads((run_dir / 'results.json').read_text())
    assert 'loss_prev' not in res['history'][0]           # no guidance before the first snapshot

    unimatch_v2.main(args + over + ['epochs=3'])          # resumes: the snapshot is back and used
    ckpt2 = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert ckpt2['prev_bank']['epochs'][0] == 0
    assert all(torch.equal(ckpt2['prev_bank']['snapshots'][0][k], snap[k]) for k in snap)
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['epochs'] == 3 and res['method'] == 'prevmatch'
    # lambda(1) and lambda(2) of 3 epochs
    assert [h['prev_weight'] for h in res['history'][1:]] == pytest.approx([2 / 3, 2 / 3])
    assert all(h['loss_prev'] > 0 for h in res['history'][1:])
    assert 'resumed from' in (run_dir / 'train.log').read_text()


def test_guidance_on_unimatch_v2_with_the_every_trigger(toy, tmp_path):
    run_dir = tmp_path / 'every'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    unimatch_v2.main(args + toy + ['epochs=3', 'prev_weight=1', 'prev_trigger=every', 'prev_every=2',
                                   'prev_storage=cpu', 'prev_source=student'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert ckpt['prev_bank']['epochs'] == [1]
    snap = ckpt['prev_bank']['snapshots'][0]
    assert snap['head.scratch.output_conv.2.weight'].dtype == torch.float32
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['method'] == 'unimatch_v2'
    assert 'loss_prev' not in res['history'][1] and 'loss_prev' in res['history'][2]
