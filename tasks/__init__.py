"""The task registry: a dataset's spec (`dataset/registry.py`) names its task, one of these.

A task is one module here (see `tasks/base.py` for what it provides); its name goes into MODULES.
"""
from __future__ import annotations

import importlib

from dataset.registry import get_spec
from tasks.base import REGISTRY, Task, register

MODULES = ('segmentation', 'change_detection', 'classification')


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> type[Task]:
    if name not in REGISTRY:
        raise KeyError(f'unknown task {name!r}; registered: {", ".join(REGISTRY)}')
    return REGISTRY[name]


def of_dataset(dataset: str) -> type[Task]:
    """The task class of a dataset name."""
    return get(get_spec(dataset).task)


def for_config(cfg) -> Task:
    """The task of `cfg`'s dataset, for that config."""
    return of_dataset(cfg.dataset)(cfg)


for _module in MODULES:
    importlib.import_module(f'tasks.{_module}')
