"""EMA teacher (util/ema.py): the ratio schedule, the update over parameters and floating buffers,
eval mode and frozen parameters, and agreement of the foreach update with the Python loop.

    python -m pytest tests/test_ema.py -q
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from util.ema import EMATeacher, ema_ratio


class Small(nn.Module):
    """Parameters plus a floating buffer (as a BatchNorm running mean would be) and an integer one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.conv = nn.Conv2d(3, 2, 1)
        self.register_buffer('running', torch.zeros(3))
        self.register_buffer('count', torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.fc(x) + self.running


def perturb_(model: nn.Module, seed: int) -> None:
    """New random values in every parameter and floating buffer of the student (a training step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))


def floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


# ---- the ratio ------------------------------------------------------------------------------------

def test_ema_ratio_schedule():
    assert ema_ratio(0) == 0.0               # first update copies the student
    assert ema_ratio(1) == pytest.approx(0.5)
    assert ema_ratio(3) == pytest.approx(0.75)
    assert ema_ratio(249) == pytest.approx(0.996)
    assert ema_ratio(250) == 0.996
    assert ema_ratio(10 ** 6) == 0.996
    for t in range(0, 400, 7):
        assert ema_ratio(t) == pytest.approx(min(1 - 1 / (t + 1), 0.996))
    assert ema_ratio(10 ** 6, decay=0.999) == 0.999


# ---- the update -----------------------------------------------------------------------------------

def test_teacher_is_an_eval_mode_frozen_copy():
    torch.manual_seed(0)
    student = Small().train()
    teacher = EMATeacher(student)
    assert student.training, 'building the teacher must not touch the student'
    assert not teacher.model.training and all(not m.training for m in teacher.model.modules())
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    # A copy, not a view: changing the student leaves the teacher alone.
    before = floating_state(teacher.model)
    perturb_(student, 1)
    for k, v in floating_state(teacher.model).items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(2, 4)
    assert torch.equal(teacher(x), teacher.model(x))


@pytest.mark.parametrize('method', ['update', 'update_loop'])
def test_update_is_ratio_weighted_mean_of_parameters_and_buffers(method):
    torch.manual_seed(0)
    student = Small()
    teacher = EMATeacher(student)
    update = getattr(teacher, method)

    # Step 0: ratio 0, the teacher becomes the student (whatever it held before).
    perturb_(teacher.model, 10)
    perturb_(student, 11)
    update(student, 0)
    for k, v in floating_state(student).items():
        assert torch.equal(teacher.model.state_dict()[k], v), k

    for step in (1, 5, 300):
        r = ema_ratio(step)
        old = floating_state(teacher.model)
        perturb_(student, 100 + step)
        new_student = floating_state(student)
        update(student, step)
        state = teacher.model.state_dict()
        assert 'running' in new_student        # the floating buffer is among the checked tensors
        for k in old:
            expected = r * old[k] + (1 - r) * new_student[k]
            assert torch.allclose(state[k], expected, atol=1e-6), (step, k)
            assert not torch.equal(state[k], old[k]), (step, k)      # it did move

    # Still an eval-mode frozen copy after updates, and the student was not written to.
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    for k, v in floating_state(student).items():
        assert torch.equal(v, new_student[k]), k


def test_update_reaches_every_parameter_and_buffer():
    # A different way to see the same thing: after the step-0 copy every tensor equals the student's.
    torch.manual_seed(0)
    student = Small()
    teacher = EMATeacher(student)
    perturb_(student, 3)
    teacher.update(student, 0)
    names = [n for n, t in student.state_dict().items() if t.is_floating_point()]
    assert set(names) == {'fc.weight', 'fc.bias', 'conv.weight', 'conv.bias', 'running'}
    for n in names:
        assert torch.equal(teacher.model.state_dict()[n], student.state_dict()[n]), n


def test_foreach_update_and_python_loop_agree():
    torch.manual_seed(0)
    student = Small()
    a, b = EMATeacher(student), EMATeacher(student)
    for step in range(6):
        perturb_(student, step)
        a.update(student, step)
        b.update_loop(student, step)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


def test_state_dict_round_trip():
    torch.manual_seed(0)
    student = Small()
    teacher = EMATeacher(student)
    perturb_(student, 4)
    teacher.update(student, 1)
    other = EMATeacher(Small())
    other.load_state_dict(teacher.state_dict())
    for k, v in teacher.state_dict().items():
        assert torch.equal(other.model.state_dict()[k], v), k
