"""What a method is: one class in one module, registered by name (`methods/__init__.py`).

A method says, in one place:
  * `Keys`: its config keys and defaults (a dataclass; the keys join `engine.config.Config`, flat, so
    `key=value` overrides them like any other), and `check` validates them;
  * `options`: the core step it runs (`methods.step.SemiOptions`: views, complementary dropout, ...;
    None = labeled-only training);
  * `build_model`: what it adds to the model (None = the plain DINOv2 + DPT segmentor);
  * the state it carries between steps (`self.state`: queues, memories, snapshot banks; anything
    with `state_dict()` and `load_state_dict(state, device)`), saved in the checkpoint under
    `state_key`;
  * what it adds to the step (the hooks below, called by `methods.step.semi_step`), with per-step
    settings (warm-ups, schedules) set in `begin_step`, and what it does after each evaluation;
  * its benchmark recipe (`for_benchmark`: the method in its steady state).

A method that adds a loss to the step can also run on top of another method when its own key
turns it on (`enabled`).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from methods.step import SemiOptions, StepContext, Term
from util.capabilities import OWN_MODEL, STEP_HOOKS

Need = Callable[[bool, str, str], None]     # need(ok, key, message): raise a ConfigError naming the key

HOOKS = ('teacher_kwargs', 'student_kwargs', 'strong_losses', 'terms')


class Method:
    name: ClassVar[str]
    summary: ClassVar[str] = ''
    Keys: ClassVar[type | None] = None
    options: ClassVar[SemiOptions | None] = SemiOptions()      # the core step as the paper (2 views, comp. dropout)
    state_key: ClassVar[str | None] = None      # checkpoint key of `self.state`
    benchmark_recipe: ClassVar[bool] = False     # benchmark.py times it beside the default step

    # ---- configuration (class level: no run needed) -----------------------------------------------

    @classmethod
    def check(cls, cfg, need: Need) -> None:
        """Validate this method's keys of a config (called for every registered method)."""

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether this method takes part in a run of `cfg`."""
        return cfg.method == cls.name

    @classmethod
    def build_model(cls, spec, nclass: int, drop_path: float, cfg) -> nn.Module | None:
        """The method's model (`spec`: a model.presets.ModelPreset), or None for the plain one."""
        return None

    @classmethod
    def has_own_model(cls) -> bool:
        """Whether the method builds its own model (a head or bottleneck of its own)."""
        return cls.build_model.__func__ is not Method.build_model.__func__

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether the method defines the step hook `hook` itself."""
        return getattr(cls, hook) is not getattr(Method, hook)

    @classmethod
    def needs(cls) -> frozenset[str]:
        """What it needs of the task (OWN_MODEL, STEP_HOOKS), read from what it defines, so that
        the answer cannot drift from the code."""
        return frozenset(({OWN_MODEL} if cls.has_own_model() else set())
                         | ({STEP_HOOKS} if any(cls.overrides(h) for h in HOOKS) else set()))

    # ---- a run ---------------------------------------------------------------------------------------

    def __init__(self, cfg, student: nn.Module, device: torch.device):
        self.cfg = cfg
        self.state = None      # what it carries between steps: has state_dict(), load_state_dict(state, device)

    @classmethod
    def for_benchmark(cls, cfg, student: nn.Module, device: torch.device) -> 'Method':
        """The method as it runs once its warm-ups are over and its state is full."""
        return cls(cfg, student, device)

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        """Set the coming step's schedules (`epoch` is the epoch being trained)."""

    def end_of_epoch(self, epoch: int, student: nn.Module, teacher, result: dict, result_ema: dict | None,
                     log) -> None:
        """After the epoch's evaluation, before its checkpoint."""

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.state.load_state_dict(state, device)

    # ---- hooks of the step (methods.step.semi_step) ----------------------------------------------

    def teacher_kwargs(self, s: StepContext) -> dict:
        """Keywords for the teacher's forward on the weak view."""
        return {}

    def student_kwargs(self, s: StepContext) -> dict:
        """Keywords for the student's forward on [labeled; strong views]."""
        return {}

    def strong_losses(self, s: StepContext) -> dict[str, torch.Tensor] | None:
        """{'loss_s1': ..., ...} instead of the confidence-masked CE of each strong view, or None.
        At most one method of a run may define it (`methods.check_run`)."""
        return None

    def terms(self, s: StepContext, out: dict[str, torch.Tensor]) -> dict[str, Term]:
        """Extra loss terms by name (added to `out` and the total); statistics go into `out`.

        What one hook computes for a later one in the same step goes on the step's context
        (`s.scratch[<method name>]`), never on the method object: the method's own attributes are
        its settings and the state it carries between steps."""
        return {}


REGISTRY: dict[str, type[Method]] = {}      # name -> method, in registration order


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `method=<cls.name>`."""
    if cls.name in REGISTRY:
        raise ValueError(f'method {cls.name!r} is registered twice')
    REGISTRY[cls.name] = cls
    return cls


class LossMethod(Method):
    """A method that adds one loss to the step, weighted by the config key `weight_key`: null means 1
    for this method and 0 (off) for every other, so that setting the key adds the loss to another
    semi-supervised method."""
    weight_key: ClassVar[str]

    @classmethod
    def weight(cls, cfg) -> float:
        value = getattr(cfg, cls.weight_key)
        if value is not None:
            return value
        return 1.0 if cfg.method == cls.name else 0.0

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cls.weight(cfg) > 0

    @classmethod
    def check(cls, cfg, need: Need) -> None:
        key, w = cls.weight_key, getattr(cfg, cls.weight_key)
        need(w is None or w >= 0, key, f'must be >= 0 or null, got {w}')
        need(REGISTRY[cfg.method].options is not None or not w, key, f'needs a semi-supervised method, not {cfg.method}')
        need(cfg.method != cls.name or w != 0, key, f'must not be 0 for method {cls.name} (that is its base method)')


class MethodSet:
    """The methods taking part in one run, in registry order, seen by the trainer as one."""

    def __init__(self, methods: list[Method]):
        self.methods = methods

    def __iter__(self):
        return iter(self.methods)

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        for m in self.methods:
            m.begin_step(epoch, iteration, iters_per_epoch)

    def end_of_epoch(self, *args) -> None:
        for m in self.methods:
            m.end_of_epoch(*args)

    def state_dicts(self) -> dict:
        return {m.state_key: m.state_dict() for m in self.methods if m.state_key}

    def load_state_dicts(self, ckpt: dict, device: torch.device) -> None:
        for m in self.methods:
            if m.state_key and ckpt.get(m.state_key) is not None:
                m.load_state_dict(ckpt[m.state_key], device)
