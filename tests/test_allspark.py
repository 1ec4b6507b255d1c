"""AllSpark (model/allspark.py and its hook in util/steps.py): attention shapes, batch independence
at inference, the semantic memory (grouping, FIFO, warm-up switch, kept out of the EMA),
two-process memory consistency, and a few iterations of `method=allspark` evaluated by evaluate.py.

    OMP_NUM_THREADS=1 python -m pytest tests/test_allspark.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import evaluate
import unimatch_v2
import engine.build
from model import build_model
from engine.config import load_config
from tests.distributed import run_processes
from methods.allspark import AllSparkBottleneck, SemanticMemory
from util.ema import EMATeacher

ROOT = Path(__file__).resolve().parents[1]
K, C, D, GRID = 3, 16, 8, (3, 3)
N = GRID[0] * GRID[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bottleneck(**kw) -> AllSparkBottleneck:
    torch.manual_seed(0)
    return AllSparkBottleneck(C, K, dim=D, heads=2, dropout=0.0, **kw)


def allspark_model() -> nn.Module:
    return engine.build.build_model(load_config(ROOT / 'configs/toy.yaml', ['method=allspark', f'nclass={K}']))


def test_attention_shapes():
    m = bottleneck().train()
    e = torch.randn(4, N, D)
    assert m.self_attention(e).shape == (4, N, D)
    assert m.cross_attention(e[:1], e[1:]).shape == (1, N, D)            # keys: 3 shared blocks
    assert m.cross_attention(e, e[:, None]).shape == (4, N, D)           # keys: one block per image
    out = m(torch.randn(5, N, C), GRID, n_labeled=1, group_prob=torch.rand(4, K, *GRID))
    assert out.shape == (5, N, C) and torch.isfinite(out).all()
    assert m(torch.randn(2, N, C), GRID).shape == (2, N, C)


def test_inference_does_not_depend_on_the_batch():
    model = allspark_model().eval()
    x = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)
    # training without roles (n_labeled None) is the same self mode
    block = bottleneck().train()
    t = torch.randn(3, N, C)
    torch.testing.assert_close(block(t, GRID)[:1], block(t[:1], GRID), rtol=1e-4, atol=1e-5)


def test_grouping_writes_channels_to_their_class():
    m = bottleneck()
    prob = torch.zeros(1, K, *GRID)
    for k in range(K):
        prob[0, k].view(-1)[k * 3:(k + 1) * 3] = 1.0          # class k owns positions 3k..3k+2
    e_u = torch.zeros(1, N, D)
    for c in range(D):                                        # channel c lives where class c % K is
        e_u[0, (c % K) * 3:(c % K) * 3 + 3, c] = c + 1.0
    m.group_and_store(e_u, prob, GRID)
    mem = m.memory
    assert mem.bank.shape == (K, D, N) and mem.filled.sum(1).tolist() == [3, 3, 2]
    assert [mem.bank[0, i].max().item() for i in range(3)] == [1.0, 4.0, 7.0]   # channels 0, 3, 6 in order
    assert mem.ptr.tolist() == [3, 3, 2]


def test_memory_is_a_fifo_per_class():
    mem = SemanticMemory(2, slots=3)
    mem.update(torch.arange(5.)[:, None].repeat(1, 4), torch.tensor([0, 0, 1, 0, 0]))
    assert mem.bank[0, :, 0].tolist() == [1.0, 3.0, 4.0]       # 0, 1, 3, 4 into 3 slots: the newest 3
    assert mem.ptr.tolist() == [0, 1] and mem.filled.tolist() == [[True] * 3, [True, False, False]]
    mem.update(torch.full((1, 4), 5.0), torch.tensor([0]))
    assert mem.bank[0, :, 0].tolist() == [5.0, 3.0, 4.0]       # the oldest (1) goes
    mem2 = SemanticMemory(2, slots=3)
    mem2.load_state_dict(mem.state_dict())
    assert torch.equal(mem2.bank, mem.bank) and torch.equal(mem2.ptr, mem.ptr)


def test_warmup_switch_and_never_filled_classes(monkeypatch):
    m = bottleneck().train()
    seen = []
    real = m.cross_attention
    monkeypatch.setattr(m, 'cross_attention', lambda e, source: seen.append(source.shape) or real(e, source))
    tokens = torch.randn(3, N, C)
    m.memory.update(torch.randn(D, N), torch.full((D,), 1))   # only class 1 has channels
    m(tokens, GRID, n_labeled=1, use_memory=False)
    assert seen[-1] == (2, N, D)                               # warm-up: the 2 unlabeled images
    m(tokens, GRID, n_labeled=1, use_memory=True)
    assert seen[-1] == (1, N, D)                               # memory: class 1 only, 0 and 2 never filled
    assert m.memory.filled_classes().tolist() == [False, True, False]
    empty = bottleneck().train()
    monkeypatch.setattr(empty, 'cross_attention', lambda e, source: seen.append(source.shape) or real(e, source))
    empty(tokens, GRID, n_labeled=1, use_memory=True)          # nothing stored yet: in-batch keys
    assert seen[-1] == (2, N, D)


def test_memory_stays_out_of_the_state_dict_and_the_ema():
    plain = build_model('dinov2_tiny', K)
    model = allspark_model()
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(model.state_dict()) and extra
    assert all(k.startswith('allspark.') for k in extra) and not any('memory' in k for k in extra)
    model.allspark.memory.update(torch.randn(4, 9), torch.tensor([0, 1, 2, 0]))
    teacher = EMATeacher(model)
    assert teacher.model.allspark.memory.bank is None           # the teacher's copy starts empty
    bank = model.allspark.memory.bank.clone()
    teacher.update(model, 10)
    assert torch.equal(model.allspark.memory.bank, bank) and teacher.model.allspark.memory.bank is None


# ---- two processes --------------------------------------------------------------------------------

def _memory_worker(rank: int, out_dir: str) -> None:
    m = bottleneck().train()
    torch.manual_seed(100 + rank)                          # different images on each process
    for _ in range(2):
        m(torch.randn(3, N, C), GRID, n_labeled=1, group_prob=torch.rand(2, K, *GRID))
    torch.save(m.memory.state_dict(), Path(out_dir, f'rank{rank}.pt'))


def test_two_processes_hold_the_same_memory(tmp_path):
    run_processes(_memory_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in ('bank', 'filled', 'ptr'))
    assert r0['filled'].any()


# ---- end to end -------------------------------------------------------------------------------------

def test_allspark_trains_resumes_and_evaluates(toy, toy_root, tmp_path):
    over, base = toy, toy_root      # conftest's fast overrides and the toy set's directory
    run_dir = tmp_path / 'allspark'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    over = over + ['method=allspark', 'allspark_dim=32']
    unimatch_v2.main(args + over + ['epochs=1'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    mem = ckpt['allspark_memory']
    assert mem['bank'].shape == (6, 32, 9) and mem['filled'].any()
    assert not any('memory' in k for k in ckpt['model'])
    unimatch_v2.main(args + over + ['epochs=2'])          # resumes; epoch 1 uses the memory
    ckpt2 = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert int(ckpt2['allspark_memory']['filled'].sum()) >= int(mem['filled'].sum())
    assert 'resumed from' in (run_dir / 'train.log').read_text()
    result = evaluate.main(['--config', str(ROOT / 'configs/toy.yaml'), '--checkpoint', str(run_dir / 'latest.pth'),
                            '--split', str(base / 'splits/toy/val.txt'), '--output-json',
                            str(tmp_path / 'eval.json')] + toy)
    assert 0 <= result['miou'] <= 100


def _thinning_worker(rank: int, out_dir: str) -> None:
    memory = SemanticMemory(nclass=2, slots=8)
    channels = torch.arange(4.0)[:, None].repeat(1, 5) + 100 * rank      # rank 0: 0..3, rank 1: 100..103
    memory.update(channels, torch.zeros(4, dtype=torch.long))
    torch.save(memory.state_dict(), Path(out_dir, f'thin{rank}.pt'))


def test_several_processes_write_one_in_world_size_of_the_gathered_channels(tmp_path):
    """Two processes gather 8 class-0 channels; every second one is written, from both processes,
    so a slot lives as long as on one process of the official code (module docstring)."""
    run_processes(_thinning_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f'thin{r}.pt', weights_only=True) for r in (0, 1))
    assert torch.equal(r0['bank'], r1['bank'])
    assert r0['filled'][0].sum() == 4 and not r0['filled'][1].any()
    assert r0['bank'][0, :4, 0].tolist() == [0.0, 2.0, 100.0, 102.0]
