"""U2PL / U2PL+ (methods/u2pl.py): the entropy partition, the negative masks of
Eqs. 26/28, the class queues, the contrastive loss, two-process queue filling, and a few
iterations of `method=u2pl` on the toy data that evaluate.py then loads.

    OMP_NUM_THREADS=1 python -m pytest tests/test_u2pl.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import engine.build
import unimatch_v2
from model import build_model
from engine.config import load_config
from tests.distributed import run_processes
from methods.u2pl import (ClassQueues, U2PLMemory, contrastive_loss, entropy, entropy_threshold, labeled_negatives,
                       unlabeled_negatives, unreliable_share)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- entropy partition ------------------------------------------------------------------------------

def test_unreliable_share_decays_linearly():
    assert unreliable_share(0, 10) == pytest.approx(0.2)
    assert unreliable_share(5, 10) == pytest.approx(0.1)
    assert unreliable_share(10, 10) == 0.0


@pytest.mark.parametrize('alpha', [0.2, 0.1, 0.5])
def test_entropy_partition_shares(alpha):
    g = torch.Generator().manual_seed(0)
    prob = torch.randn(2, 5, 16, 16, generator=g).mul(3).softmax(1)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[1, :8] = False                                       # padding is not counted
    ent = entropy(prob)
    gamma = entropy_threshold(ent, valid, alpha)
    share = ((ent > gamma) & valid).sum() / valid.sum()
    assert share == pytest.approx(alpha, abs=1 / valid.sum().item())
    # the invalid pixels do not move the threshold
    ent2 = ent.clone()
    ent2[~valid] = 100.0
    assert entropy_threshold(ent2, valid, alpha) == gamma
    assert entropy_threshold(ent, valid, 0.0) == ent[valid].max()       # alpha 0: nothing unreliable


# ---- negative masks against a hand-made example -------------------------------------------------------

def hand_probs() -> torch.Tensor:
    """2 images x 1 pixel, K = 5. Image 0 ranks classes 0 > 1 > 2 > 3 > 4, image 1 ranks 4 > 3 > 2 > 1 > 0."""
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    return torch.stack((p0, p0.flip(0)))[:, :, None, None]


def test_labeled_negatives_follow_eq26():
    prob = hand_probs()
    label = torch.tensor([1, 4]).view(2, 1, 1)
    neg = labeled_negatives(prob, label, low_rank=3)[:, :, 0, 0]
    # image 0: top-3 are {0, 1, 2}, label 1 -> negatives 0 and 2; image 1: top-3 {4, 3, 2}, label 4
    assert neg.tolist() == [[True, False, True, False, False], [False, False, True, True, False]]
    ignored = labeled_negatives(prob, torch.full((2, 1, 1), 255), low_rank=3)
    assert not ignored.any()


def test_unlabeled_negatives_follow_eq28():
    prob = hand_probs()
    unreliable = torch.tensor([True, True]).view(2, 1, 1)
    neg = unlabeled_negatives(prob, unreliable, low_rank=1, high_rank=3)[:, :, 0, 0]
    # ranks 1 and 2: classes {1, 2} in image 0, {3, 2} in image 1 (the official one-hot would fill
    # image 0 only, and its mask `pseudo == c` would leave this empty)
    assert neg.tolist() == [[False, True, True, False, False], [False, False, True, True, False]]
    assert not unlabeled_negatives(prob, ~unreliable, 1, 3).any()       # reliable pixels: none


# ---- queues --------------------------------------------------------------------------------------------

def test_queue_bounds_and_fifo_order():
    q = ClassQueues([4, 3], dim=2)
    assert q.bound_bytes() == 7 * 2 * 4
    for i in range(6):
        q.push(0, torch.full((1, 2), float(i)))
    assert q.get(0)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]              # oldest first, the first two gone
    q.push(1, torch.arange(10.).view(5, 2))                              # a push larger than the queue
    assert q.get(1)[:, 0].tolist() == [4.0, 6.0, 8.0]
    assert q.data[1].shape == (3, 2) and q.count == [4, 3]
    q2 = ClassQueues([4, 3], dim=2)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.get(0), q.get(0)) and torch.equal(q2.get(1), q.get(1))
    q2.push(0, torch.full((1, 2), 9.0))                                  # continues the same FIFO
    assert q2.get(0)[:, 0].tolist() == [3.0, 4.0, 5.0, 9.0]


def test_memory_bound_of_the_pascal_config():
    from engine.config import load_config
    cfg = load_config(ROOT / 'configs/pascal.yaml')
    mem = U2PLMemory(cfg.nclass, cfg.u2pl_rep_dim, cfg.u2pl_queue_size, cfg.u2pl_queue_size_bg)
    assert mem.queues.bound_bytes() == (20 * 30000 + 50000) * 256 * 4      # 0.67 GB, as the docs say


def test_momentum_prototypes():
    mem = U2PLMemory(3, dim=2, queue_size=5, queue_size_bg=5, momentum=0.9)
    sums, counts = torch.tensor([[2., 0.], [0., 0.], [0., 4.]]), torch.tensor([2, 0, 2])
    proto, present = mem.positives(sums, counts)
    assert present.tolist() == [True, False, True] and proto[0].tolist() == [1.0, 0.0]
    proto, _ = mem.positives(torch.tensor([[0., 2.], [0., 0.], [0., 0.]]), torch.tensor([2, 0, 0]))
    assert proto[0].tolist() == pytest.approx([0.9, 0.1]) and proto[2].tolist() == [0.0, 2.0]


# ---- the contrastive loss ---------------------------------------------------------------------------

def test_contrastive_loss_decreases_on_a_separable_embedding():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(3, 8), dim=1)
    queues = ClassQueues([100] * 3, dim=8)
    for c in range(3):          # negatives of class c: points of the other classes
        others = centers[[o for o in range(3) if o != c]]
        queues.push(c, others.repeat(20, 1) + 0.05 * torch.randn(40, 8))
    emb = torch.nn.Parameter(torch.randn(3, 10, 8))                     # 10 anchors per class, random
    optim = torch.optim.SGD([emb], lr=5.0)
    losses = []
    for _ in range(60):
        loss = contrastive_loss(list(emb), centers, torch.ones(3, dtype=torch.bool), queues, 32, 10, 0.5)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    floor = torch.log(1 + 10 * torch.exp(torch.tensor(-2.0 / 0.5))).item()    # anchors at their centre
    assert last < first - 0.5 * (first - floor), (first, last, floor)
    # no negatives or no positive: the class is skipped; none left -> None
    assert contrastive_loss(list(emb), centers, torch.zeros(3, dtype=torch.bool), queues) is None
    assert contrastive_loss(list(emb), centers, torch.ones(3, dtype=torch.bool), ClassQueues([5] * 3, 8)) is None


# ---- two processes --------------------------------------------------------------------------------

def _queue_worker(rank: int, out_dir: str) -> None:
    mem = U2PLMemory(2, dim=3, queue_size=10, queue_size_bg=10)
    n = 2 + rank                                   # different pixel counts per process
    keys = torch.full((n, 3), float(rank))
    masks = torch.zeros(n, 2, dtype=torch.bool)
    masks[:, rank] = True                          # rank r's keys are negatives of class r
    masks[0, 1 - rank] = True
    mem.enqueue(keys, masks)
    sums = torch.zeros(2, 3)
    sums[rank] = 1.0
    proto, present = mem.positives(sums, torch.tensor([1, 1]) if rank == 0 else torch.tensor([0, 1]))
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps({
        'q0': mem.queues.get(0)[:, 0].tolist(), 'q1': mem.queues.get(1)[:, 0].tolist(),
        'proto': proto.tolist(), 'present': present.tolist()}))


def test_two_processes_fill_the_same_queues(tmp_path):
    run_processes(_queue_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert r0 == r1
    # class 0: rank 0's two keys, then rank 1's first; class 1: rank 0's first, then rank 1's three
    assert r0['q0'] == [0.0, 0.0, 1.0] and r0['q1'] == [0.0, 1.0, 1.0, 1.0]
    # positives are means over both processes' candidates (sum 1 over count 1 for class 0, 2 for 1)
    assert r0['proto'][0] == [1.0, 1.0, 1.0] and r0['proto'][1] == [0.5, 0.5, 0.5]


# ---- model and end to end -------------------------------------------------------------------------

def test_rep_head_is_optional_and_named():
    plain = build_model('dinov2_tiny', 3)
    u2pl = engine.build.build_model(load_config(ROOT / 'configs/toy.yaml', ['method=u2pl', 'nclass=3', 'u2pl_rep_dim=16']))
    extra = set(u2pl.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(u2pl.state_dict()) and extra
    assert all(k.startswith('rep_head.') for k in extra)
    x = torch.randn(2, 3, 28, 28)
    logits, rep = u2pl.eval()(x, need_rep=True)
    assert logits.shape == (2, 3, 28, 28) and rep.shape == (2, 16, 8, 8)     # grid 2: fused 16^2, pooled 8^2
    assert torch.equal(u2pl(x), logits)


def test_u2pl_trains_resumes_and_evaluates(toy, toy_root, tmp_path):
    over, base = toy, toy_root      # conftest's fast overrides and the toy set's directory
    run_dir = tmp_path / 'u2pl'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    over = over + ['method=u2pl', 'u2pl_anchor_thresh=0.0', 'u2pl_unsup=sce', 'u2pl_proto_momentum=0.99',
                   'u2pl_anchors=16', 'u2pl_negatives=8', 'u2pl_warmup_epochs=1']
    unimatch_v2.main(args + over + ['epochs=1'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    queues = ckpt['u2pl_memory']['queues']['keys']
    assert len(queues) == 6 and sum(len(q) for q in queues) > 0
    assert all(len(q) <= 2000 for q in queues)
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['history'][0]['u2pl_weight'] == 0.0       # warm-up epoch: queues fill, lambda_c = 0

    unimatch_v2.main(args + over + ['epochs=2'])          # resumes with the queues, L_c on
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['epochs'] == 2 and res['history'][1]['loss_c'] > 0 and res['history'][1]['u2pl_weight'] == 0.25
    assert 'resumed from' in (run_dir / 'train.log').read_text()

    result = evaluate.main(['--config', str(ROOT / 'configs/toy.yaml'), '--checkpoint', str(run_dir / 'latest.pth'),
                            '--split', str(base / 'splits/toy/val.txt'), '--output-json',
                            str(tmp_path / 'eval.json')] + toy)
    assert 0 <= result['miou'] <= 100


def test_positive_keys_average_every_labeled_and_reliable_pixel_once(monkeypatch):
    """Eqs. 15-17: the class-c positive is the mean teacher rep over every labeled pixel of class c
    (whatever its teacher probability: delta_p filters anchors only) and every reliable weak-view
    pixel labeled c, each counted once however many strong views there are."""
    from methods.u2pl import contrastive_term
    cfg = load_config(ROOT / 'configs/toy.yaml', ['method=u2pl', 'nclass=3', 'u2pl_low_rank=1', 'u2pl_high_rank=3',
                                                   'u2pl_anchor_thresh=0.9'])
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([[[0, 0], [1, 255]]])                          # one labeled image, 2 x 2
    prob_tl = torch.full((1, 3, 2, 2), 1 / 3)                        # p_t(y) = 1/3 < delta_p everywhere
    prob_w = torch.tensor([0.1, 0.1, 0.8])[None, :, None, None].expand(1, 3, 2, 2).clone()   # class 2
    rep_tl, rep_w = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    rep_x, rep_s = torch.randn(1, 4, 2, 2), [torch.randn(1, 4, 2, 2) for _ in range(2)]
    memory = U2PLMemory(3, 4, 10, 10)
    seen = {}
    real = memory.positives
    monkeypatch.setattr(memory, 'positives', lambda sums, counts: seen.update(sums=sums, counts=counts)
                        or real(sums, counts))
    contrastive_term(memory, cfg, torch.tensor(10.0), y, torch.ones(1, 2, 2, dtype=torch.bool),
                     torch.zeros(1, 2, 2, 2, dtype=torch.bool), prob_w, rep_w, prob_tl, rep_tl, rep_x, rep_s)
    assert seen['counts'].tolist() == [2, 1, 4]
    expected = torch.stack([rep_tl[0, :, 0, :].sum(1), rep_tl[0, :, 1, 0], rep_w[0].flatten(1).sum(1)])
    assert torch.allclose(seen['sums'], expected, atol=1e-6)
