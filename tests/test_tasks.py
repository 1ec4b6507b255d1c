"""The task registry (tasks/): every dataset names a registered task, the shared code names none,
and the segmentation task gives what the trainer and the entry scripts ask of a task."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tasks
from dataset.registry import DATASETS
from tasks.base import Task
from util.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ('util/trainer.py', 'util/evaluation.py', 'evaluate.py', 'predict.py', 'benchmark.py', 'unimatch_v2.py',
          'supervised.py')


def test_every_dataset_names_a_registered_task():
    assert set(tasks.MODULES) <= set(tasks.names())
    for name, spec in DATASETS.items():
        assert issubclass(tasks.get(spec.task), Task), name
    with pytest.raises(KeyError, match='unknown task'):
        tasks.get('nonsense')


def task_names_in_code(source: str) -> list[int]:
    """Lines where a task's name is a string constant or an identifier (docstrings and comments,
    which may describe the tasks, are not code)."""
    names = set(tasks.names())
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() in names:
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in names or isinstance(node, ast.Attribute) and node.attr in names:
            lines.append(node.lineno)
    return lines


def test_shared_code_names_no_task():
    """The trainer, the evaluation and the entry scripts loop over what the task gives: no task
    name appears in their code (no `if task == ...`)."""
    for f in SHARED:
        assert not task_names_in_code((ROOT / f).read_text()), f
    assert task_names_in_code("if cfg.task == 'segmentation':\n    pass\n") == [1]     # the check can fail


def test_task_is_chosen_by_the_dataset():
    task = tasks.for_config(load_config(ROOT / 'configs/toy.yaml'))
    assert task.name == 'segmentation' and task.metric == 'miou' and task.reports_ema
    assert task.eval_mode() == 'original'
    assert task.scores({'miou': 50.0, 'iou': [40.0, 60.0]}) == {'miou': 50.0, 'iou': [40.0, 60.0]}
