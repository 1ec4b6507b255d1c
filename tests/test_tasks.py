"""The task registry (tasks/): every dataset names a registered task, the shared code names none,
and the segmentation task gives what the trainer and the entry scripts ask of a task."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tasks
from dataset.registry import DATASETS
from tasks.base import Task
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = (*(str(p.relative_to(ROOT)) for p in sorted((ROOT / 'engine').glob('*.py'))), 'tasks/evaluation.py',
          'evaluate.py', 'predict.py', 'benchmark.py', 'unimatch_v2.py', 'supervised.py')


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


# ---- which methods run on which task: one answer (methods.base.Method.needs <= Task.provides) ----------

import methods  # noqa: E402
from methods.base import HOOKS, OWN_MODEL, STEP_HOOKS, Method  # noqa: E402
from util.config import ConfigError  # noqa: E402

PIXEL_METHODS = {'prevmatch', 'ipixmatch'}        # step hooks on pixel maps, the plain model
OWN_MODEL_METHODS = {'u2pl', 'allspark'}          # a head or bottleneck on the DPT segmentor (and hooks)


def test_each_task_runs_the_methods_whose_needs_it_gives():
    core = set(methods.names()) - PIXEL_METHODS - OWN_MODEL_METHODS
    expected = {'segmentation': set(methods.names()), 'change_detection': core | PIXEL_METHODS,
                'classification': core}
    assert {t: {m for m in methods.names() if methods.runs_on(m, tasks.get(t))} for t in expected} == expected
    assert {m for m in methods.names() if methods.get(m).needs()} == PIXEL_METHODS | OWN_MODEL_METHODS
    assert all(OWN_MODEL in methods.get(m).needs() for m in OWN_MODEL_METHODS)


@pytest.mark.parametrize('hook', HOOKS)
def test_a_method_needs_step_hooks_when_it_defines_one(hook):
    cls = type('Probe', (Method,), {'name': 'probe', hook: lambda self, s, *a: None})
    assert cls.needs() == {STEP_HOOKS} and cls.overrides(hook)
    assert type('Plain', (Method,), {'name': 'plain'}).needs() == frozenset()


@pytest.mark.parametrize('config, overrides, words', [
    ('toy_cd', ['method=u2pl'], 'u2pl needs a model of its own'),
    ('toy_cd', ['method=allspark'], 'allspark needs a model of its own'),
    ('toy_cls', ['prev_weight=1'], 'prevmatch needs step hooks on pixel maps'),     # turned on by its key
    ('toy_cls', ['method=ipixmatch'], 'ipixmatch needs step hooks on pixel maps'),
])
def test_a_method_the_task_cannot_run_is_a_config_error(config, overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(ROOT / 'configs' / f'{config}.yaml', overrides)
    load_config(ROOT / 'configs' / 'toy.yaml', overrides)        # segmentation gives everything


def test_two_methods_replacing_the_strong_losses_are_a_config_error(monkeypatch):
    rival = type('Rival', (Method,), {'name': 'rival', 'enabled': classmethod(lambda cls, cfg: True),
                                      'strong_losses': lambda self, s: None})
    monkeypatch.setitem(methods.REGISTRY, 'rival', rival)
    with pytest.raises(ConfigError, match='u2pl and rival both replace the strong views'):
        load_config(ROOT / 'configs' / 'toy.yaml', ['method=u2pl'])
    load_config(ROOT / 'configs' / 'toy.yaml', ['method=unimatch_v2'])    # one replacement is fine
