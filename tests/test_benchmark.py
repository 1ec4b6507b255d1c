"""benchmark.py: the two recipes are what they claim to be, and the command prints its figures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

import benchmark
from engine.config import load_config
from tests.launch import HANG_TIMEOUT_S
from util.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['pretrained=null', 'crop_size=42', 'batch_size=2']


@pytest.fixture(scope='module')
def trainers():
    """Both recipes' trainers, in a one-process group that is torn down afterwards (other tests
    start their own groups)."""
    benchmark.init_single_process_group()
    cfg = load_config(ROOT / 'configs/toy.yaml', SMALL)
    device = torch.device('cpu')
    yield {name: benchmark.Trainer(benchmark.recipe(name, cfg), cfg, device) for name in ('original', 'default')}
    tdist.destroy_process_group()


def test_original_recipe_is_the_original_step(trainers):
    t = trainers['original']
    blocks = t.student.backbone.blocks
    assert t.precision.name == 'fp32' and not t.opt.fused
    assert not any(b.attn.fused_attn or b.fold_layer_scale for b in blocks)
    assert not t.optimizer.defaults['fused']                          # torch's default AdamW
    assert t.ddp.find_unused_parameters and not t.ddp.gradient_as_bucket_view
    assert t.student.head.projects[0].weight.is_contiguous()          # no channels-last


def test_default_recipe_uses_every_speed_option(trainers):
    t = trainers['default']
    assert t.precision.name == resolve_precision('auto', 'cpu') and t.opt.fused   # the config's auto
    assert all(b.fold_layer_scale for b in t.student.backbone.blocks)
    assert t.optimizer.defaults['fused']
    assert not t.ddp.find_unused_parameters and t.ddp.gradient_as_bucket_view
    assert t.student.head.projects[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_recipes_take_a_step_on_the_same_batch(trainers):
    cfg = trainers['default'].cfg
    batch = benchmark.make_batch(cfg, torch.device('cpu'), seed=0)
    for name, t in trainers.items():
        assert t.step(*batch) > 0, name
        assert all(torch.isfinite(p).all() for p in t.student.parameters()), name


def test_command_prints_the_speedup_line():
    out = subprocess.run(
        [sys.executable, 'benchmark.py', '--config', 'configs/toy.yaml', '--recipes', 'original,default',
         '--steps', '1', '--warmup', '0', '--memory-steps', '1', *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith('speedup: ') and lines[-1].endswith('x'), lines[-3:]
    assert any(line.startswith('original ') for line in lines) and any(line.startswith('default ') for line in lines)


def test_profile_prints_every_part_of_the_default_step():
    out = subprocess.run(
        [sys.executable, 'benchmark.py', '--config', 'configs/toy.yaml', '--profile', '--steps', '1', *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    for part in ('teacher forward', 'student encoder forward', 'student encoder backward',
                 'student decoder and losses backward', 'optimizer', 'EMA update'):
        assert part in out.stdout, (part, out.stdout)


def test_op_ratios_print_each_class_of_operation_for_both_recipes():
    out = subprocess.run(
        [sys.executable, 'benchmark.py', '--config', 'configs/toy.yaml', '--op-ratios', '--steps', '1', *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:42].strip(): line[42:].split() for line in out.stdout.splitlines()[2:]}
    assert set(benchmark.OP_CLASSES) | {'other', 'all operations', 'step'} <= set(rows), out.stdout
    for name in ('matrix products (mm, addmm, bmm)', 'all operations', 'step'):
        original_ms, default_ms, ratio = map(float, rows[name])
        assert original_ms > 0 and default_ms > 0 and ratio > 0, (name, rows[name])
    classes = sum(float(rows[name][0]) for name in (*benchmark.OP_CLASSES, 'other'))
    assert abs(classes - float(rows['all operations'][0])) <= len(benchmark.OP_CLASSES) + 1   # rounding


def test_change_detection_recipes_run_on_pairs():
    """configs/levir.yaml: pairs (6 channels) through the task's model; the original recipe labels
    with the online model, as the config's teacher; methods with a head of their own are left out."""
    cfg = benchmark.load_config(ROOT / 'configs/levir.yaml', ['pretrained=null', 'backbone=dinov2_tiny',
                                                               'crop_size=28', 'batch_size=2'])
    recipes = benchmark.task_recipes(cfg)
    assert {'original', 'default'} <= set(recipes) and 'u2pl' not in recipes and 'allspark' not in recipes
    batch_l, batch_u = benchmark.make_batch(cfg, torch.device('cpu'), 0)
    assert batch_l['image'].shape[1] == 6 and batch_u['strong'].shape[2] == 6
    started = not tdist.is_initialized()      # the module's trainers may hold a group already
    benchmark.init_single_process_group()
    try:
        t = benchmark.Trainer(benchmark.recipe('original', cfg), cfg, torch.device('cpu'))
        assert type(t.student).__name__ == 'ChangeDPT'
        ema_calls = []
        t.teacher.model.register_forward_hook(lambda *_: ema_calls.append(1))
        assert t.step(batch_l, batch_u) > 0
        assert not ema_calls        # the weak view was labeled by the online model, not the EMA teacher
    finally:
        if started:
            tdist.destroy_process_group()


def test_a_task_benchmark_does_not_time_is_refused_by_name():
    out = subprocess.run([sys.executable, 'benchmark.py', '--config', 'configs/toy_cls.yaml', '--steps', '1'],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 2
    assert 'configs/toy_cls.yaml: benchmark.py does not time the classification task (dataset toy_cls)' in out.stderr
