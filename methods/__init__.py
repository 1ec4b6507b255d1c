"""The method registry: `method=<name>` in a config or on the command line picks one of these.

A method is one module here (see `methods/base.py` for what it declares, and docs/methods.md, "Adding a
method"); its name goes into MODULES, in the order the tables list methods. `python -m methods`
prints the registered methods.
"""
from __future__ import annotations

import importlib

from torch import nn

from model.presets import preset

from methods.base import REGISTRY, Method, MethodSet, register

DEFAULT = 'unimatch_v2'      # the method of a config that names none
MODULES = ('supervised', 'fixmatch', 'fixmatch_addfeataug', 'fixmatch_dualstream', 'fixmatch_addfeataug_dualstream', 'unimatch_v1', 'unimatch_v2', 'prevmatch', 'ipixmatch', 'u2pl', 'allspark')


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise KeyError(f'unknown method {name!r}; registered: {", ".join(REGISTRY)}')
    return REGISTRY[name]


def config_sections() -> list[type]:
    """Every method's `Keys` dataclass, in registry order."""
    return [cls.Keys for cls in REGISTRY.values() if cls.Keys is not None]


def enabled(cfg) -> list[type[Method]]:
    """The methods taking part in a run of `cfg`: its `method` and every method its keys turn on."""
    return [cls for cls in REGISTRY.values() if cls.enabled(cfg)]


def check_run(cfg, task, need) -> None:
    """The methods of a run, checked once against each other and against the run's task: the task
    gives what each needs, and at most one replaces the strong views' losses."""
    running = enabled(cfg)
    for cls in running:
        missing = sorted(cls.needs() - task.provides)
        need(not missing, 'method', f'{cls.name} needs {" and ".join(missing)}, which the {task.name} task does '
             f'not give (python -m methods lists the methods and what they need)')
    replacing = [cls.name for cls in running if cls.overrides('strong_losses')]
    need(len(replacing) <= 1, 'method', f'{" and ".join(replacing)} both replace the strong views\' losses; '
         f'a run takes one of them')


def create(cfg, student, device) -> MethodSet:
    """The run-time methods of `cfg`: its `method` and every method its keys turn on."""
    return MethodSet([cls(cfg, student, device) for cls in enabled(cfg)])


def runs_on(name: str, task) -> bool:
    """Whether the registered method `name` runs on `task` (a task class or object): the task
    gives all it needs (`Task.provides`)."""
    return get(name).needs() <= task.provides


def own_model(cfg) -> nn.Module | None:
    """The model of `cfg`'s method where it has one of its own (an extra head or bottleneck on
    the DINOv2 + DPT segmentor), with random weights; None for the task's own model."""
    method = get(cfg.method)
    if not method.has_own_model():
        return None
    _, spec = preset(cfg.backbone)
    return method.build_model(spec, cfg.nclass, cfg.drop_path, cfg)


for _module in MODULES:
    importlib.import_module(f'methods.{_module}')
