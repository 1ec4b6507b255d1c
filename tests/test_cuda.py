"""What only a GPU runs: the CUDA kernels, autocast there, the gradient scaler, the memory figure.

    python -m pytest -q tests/test_cuda.py

They skip where torch sees no CUDA device (CI has none). Elsewhere the suite also runs on a GPU when
one is visible: training, evaluation and the benchmark pick CUDA themselves. These tests add what a
CPU cannot show: fp32 parity with the original on the GPU's kernels, the fused and unfused step
agreeing there, every precision (fp16 with its scaler) training, and two runs of one seed agreeing
to rounding (they are not equal bit for bit on CUDA: tests/test_robustness.py checks that on the CPU).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model
from tests.test_model import REFERENCE_FIXTURE, max_abs_diff, reference_model
from tests.test_robustness import short_run, toy  # noqa: F401 (toy is a fixture)
from tests.test_steps import V2_KEYS, fused_and_unfused_steps, make_batch
from util.ema import EMATeacher
from util.labels import IGNORE_INDEX
from util.losses import build_criterion
from tests.launch import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device('cuda', 0)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 comparisons against fp32 references: TF32 matrix products would round to 10 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_cuda(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


@pytest.mark.parametrize('fused_attention', [True, False])
def test_reference_logits_on_cuda(fused_attention):
    if not REFERENCE_FIXTURE.is_file():
        pytest.skip(f'reference fixture {REFERENCE_FIXTURE} is absent')
    ref = torch.load(REFERENCE_FIXTURE, weights_only=True)
    model = reference_model(ref).to(CUDA)
    model.set_fused_attention(fused_attention)
    with torch.no_grad():
        for x, expected in zip(ref['inputs'], ref['logits']):
            assert max_abs_diff(model(x.to(CUDA)).cpu(), expected) <= 1e-4
            with torch.autocast('cuda', dtype=torch.bfloat16):
                logits = model(x.to(CUDA))
            assert logits.dtype == torch.float32
            assert max_abs_diff(logits.cpu(), expected) < 0.05 * expected.abs().max()


def test_fused_and_unfused_steps_agree_on_cuda():
    """tests/test_steps.py's check on the GPU's kernels: one student forward for labeled and strong
    images gives the losses and gradients of separate forwards."""
    criterion = build_criterion('CELoss', {'ignore_index': IGNORE_INDEX})
    torch.manual_seed(0)
    model = build_model('dinov2_tiny', 3, drop_path=0.0).to(CUDA).train()
    teacher = EMATeacher(model)
    batch_l, batch_u = (to_cuda(b) for b in make_batch(seed=8))
    (out_f, grad_f), (out_u, grad_u) = fused_and_unfused_steps(model, teacher, batch_l, batch_u, criterion)
    assert out_f['loss_s1'] > 0
    for k in V2_KEYS:
        torch.testing.assert_close(out_f[k], out_u[k], atol=1e-5, rtol=1e-5, msg=k)
    assert set(grad_f) == set(grad_u) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in grad_f:
        torch.testing.assert_close(grad_f[n], grad_u[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'fp32'])
def test_each_precision_trains_on_cuda(toy, tmp_path, precision):  # noqa: F811 (the toy fixture)
    lines, ckpt = short_run(toy, tmp_path / precision, f'precision={precision}')
    assert len(lines) == 3, lines
    log = (tmp_path / precision / 'train.log').read_text()
    assert '1 process(es) on cuda' in log
    losses = [float(v) for v in re.findall(r'loss_x: ([\d.einf-]+)', ' '.join(lines))]
    assert len(losses) == 3 and all(0 < v < 100 for v in losses), lines
    scaler = ckpt['scaler']
    if precision == 'fp16':
        assert scaler['scale'] > 0 and scaler['_growth_tracker'] >= 0   # the scaler ran and is saved
    else:
        assert scaler == {}


def step_losses(lines: list[str]) -> list[float]:
    return [float(v) for line in lines for v in re.findall(r'loss\w*: ([\d.e+-]+)', line)]


def test_two_runs_of_one_seed_agree_on_cuda(toy, tmp_path):  # noqa: F811 (the toy fixture)
    a, ckpt_a = short_run(toy, tmp_path / 'a', 'seed=3')
    b, ckpt_b = short_run(toy, tmp_path / 'b', 'seed=3')
    c, _ = short_run(toy, tmp_path / 'c', 'seed=4')
    assert step_losses(a) == pytest.approx(step_losses(b), rel=1e-2, abs=1e-4)
    assert step_losses(a) != pytest.approx(step_losses(c), rel=1e-2, abs=1e-4)
    # A weight whose gradient is rounding noise gets AdamW's full step, about lr, in either direction.
    # The decoder's lr (5 x the encoder's) summed over the 3 steps is 2.1e-3, so two runs may differ
    # by twice that there; the mass of the weights, with real gradients, agrees much closer.
    diff = torch.cat([(ckpt_b['model'][k] - v).abs().flatten() for k, v in ckpt_a['model'].items()
                      if v.is_floating_point()])
    assert diff.max() <= 6e-3 and diff.mean() <= 1e-4, (diff.max(), diff.mean())


def test_benchmark_reports_cuda_memory():
    out = subprocess.run(
        [sys.executable, 'benchmark.py', '--config', 'configs/toy.yaml', '--recipes', 'original,default',
         '--steps', '2', '--warmup', '1', '--memory-steps', '1', 'crop_size=56'],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ', cuda (' in out.stdout and 'max allocated' in out.stdout, out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith('speedup: ')
