"""`--plan [PROCESSES]` (tools/plan.py, docs/plan.md) against the original release: every shipped
config at the paper's process count gives the iterations per epoch, batches, learning rates and
evaluation points of the original's logs and of /work/shared/reference/UNIMATCH_V2_FACTS.md
(FACTS below), and the plan's numbers are the ones the training loaders and optimizer really get.

    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import methods
import tasks
from tests.launch import HANG_TIMEOUT_S
from tools.plan import make_plan
from util import dist
from util.config import ConfigError
from engine.config import load_config
from engine.build import build_optimizer
from engine.data import epoch_iterations, train_loaders
from engine.run import parse_args

ROOT = Path(__file__).resolve().parents[1]
FACTS_TABLES = Path('/work/shared/reference/paper_tables.csv')    # the original's logged values, where present


def plan_of(script_method: str | None, config: str, split: str, *extra: str, processes: str | None = None):
    argv = ['--config', str(ROOT / 'configs' / config), '--split', split, *extra, '--plan']
    return make_plan(parse_args('plan', argv + ([processes] if processes else [])), script_method)


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)           # the configs' splits_root and data_root are relative to it


# ---- iterations per epoch at the paper's process count, against FACTS ---------------------------------

# FACTS §2: "Iterations/epoch (4 GPUs): Pascal 655/650/638/615/570 (92…1464); Cityscapes
# 349/325/279/186; ADE20K 2487/2447/2368/2210/1895 (1_64…1_4); COCO 7378/7364/7335/7277/7162
# (1_512…1_32)." An epoch is one pass over the unlabeled set ("Labeled list is repeated to
# len(unlabeled) (`nsample`), an epoch = one pass over the unlabeled set (DistributedSampler,
# drop_last)"); COCO's unlabeled list is train2017 (118287) less the labeled images, derived here
# without the data.
SEMI_4_GPUS = [('pascal', s, n) for s, n in zip(('92', '183', '366', '732', '1464'), (655, 650, 638, 615, 570))] + \
    [('cityscapes', s, n) for s, n in zip(('1_16', '1_8', '1_4', '1_2'), (349, 325, 279, 186))] + \
    [('ade20k', s, n) for s, n in zip(('1_64', '1_32', '1_16', '1_8', '1_4'), (2487, 2447, 2368, 2210, 1895))] + \
    [('coco', s, n) for s, n in zip(('1_512', '1_256', '1_128', '1_64', '1_32'), (7378, 7364, 7335, 7277, 7162))]


@pytest.mark.parametrize('dataset, split, iterations', SEMI_4_GPUS)
def test_semi_supervised_iterations_are_the_originals(dataset, split, iterations):
    plan = plan_of(None, f'{dataset}.yaml', split)
    assert plan.processes == 4                                       # FACTS §1: "all segmentation runs use 4 GPUs"
    assert plan.iterations == iterations
    assert plan.total == iterations * plan.cfg.epochs
    unlabeled, labeled = plan.loaders
    # FACTS §1: "global semi batch (l+u)" pascal/coco 16 + 16, cityscapes/ade20k 8 + 8.
    per_gpu = {'pascal': 4, 'coco': 4, 'cityscapes': 2, 'ade20k': 2}[dataset]
    assert (unlabeled.batch, labeled.batch) == (per_gpu, per_gpu)
    assert unlabeled.samples == plan.sizes['unlabeled'] == labeled.samples    # labeled repeated to len(unlabeled)


# FACTS §2: "Supervised: labeled set up-sampled to 3000 (pascal, cityscapes), 6000 (ade20k), 30000
# (coco), 3000 (CD) only if larger than the list; e.g. Pascal 93 it/ep, Cityscapes 187, ADE20K 375,
# COCO 937." Batch = 2x the semi-supervised one (FACTS §1), 4 GPUs.
SUPERVISED_4_GPUS = [('pascal', s, 93) for s in ('92', '183', '366', '732', '1464')] + \
    [('cityscapes', s, 187) for s in ('1_16', '1_8', '1_4', '1_2')] + \
    [('ade20k', s, 375) for s in ('1_64', '1_32', '1_16', '1_8', '1_4')] + \
    [('coco', s, 937) for s in ('1_512', '1_256', '1_128', '1_64', '1_32')]


@pytest.mark.parametrize('dataset, split, iterations', SUPERVISED_4_GPUS)
def test_labeled_only_iterations_are_the_originals(dataset, split, iterations):
    plan = plan_of('supervised', f'{dataset}.yaml', split)
    assert (plan.processes, plan.iterations) == (4, iterations)
    (labeled,) = plan.loaders
    assert labeled.batch == 2 * plan.cfg.batch_size


# FACTS §1 and §7: LEVIR-CD / WHU-CD on **1 GPU**, bs 8 (sup 16), 60 epochs; §2 split sizes
# "levir (CD) | 5% 356/6764, 10% 712/6408, 20% 1424/5696, 40% 2848/4272", "whu (CD) | 5% 297/5650,
# 10% 594/5353, 20% 1189/4758, 40% 2378/3569": an epoch is one pass over the unlabeled pairs at
# batch 8, 6764 // 8 = 845 on LEVIR 5%; labeled only, 3000 pairs at batch 16 = 187 (the
# table14-levir_cd_labeled_only logs: 187 iterations per epoch).
CD = [('levir', s, u // 8) for s, u in (('5%', 6764), ('10%', 6408), ('20%', 5696), ('40%', 4272))] + \
     [('whu', s, u // 8) for s, u in (('5%', 5650), ('10%', 5353), ('20%', 4758), ('40%', 3569))]


@pytest.mark.parametrize('dataset, split, iterations', CD)
def test_change_detection_iterations_are_the_originals(dataset, split, iterations):
    plan = plan_of(None, f'{dataset}.yaml', split)
    assert (plan.processes, plan.iterations, plan.cfg.epochs) == (1, iterations, 60)
    assert [x.batch for x in plan.loaders] == [8, 8]
    supervised = plan_of('supervised', f'{dataset}.yaml', split)
    assert (supervised.iterations, supervised.loaders[0].batch) == (187, 16)
    # FACTS §9: "Remote sensing: README = best **non-EMA** changed IoU"
    assert not plan.task.reports_ema and plan.cfg.teacher == 'online'    # FACTS §7: pseudo-labels from the online model


def test_levir_as_printed_by_the_entry_scripts(tmp_path):
    """The world's commands, in a subprocess: `unimatch_v2.py ... --plan` and `supervised.py ... --plan`."""
    out = {}
    for script in ('unimatch_v2.py', 'supervised.py'):
        res = subprocess.run([sys.executable, script, '--config', 'configs/levir.yaml', '--split', '5%',
                              '--save-path', str(tmp_path / 'run'), '--plan'],
                             cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
        assert res.returncode == 0, res.stderr
        out[script] = res.stdout
    assert 'iterations: 845 per epoch x 60 epochs = 50,700' in out['unimatch_v2.py']
    assert 'iterations: 187 per epoch x 60 epochs = 11,220' in out['supervised.py']
    assert "best.pth: the student's best changed IoU" in out['unimatch_v2.py']
    assert 'encoder: lr 5e-06' in out['supervised.py'] and 'head: lr 0.0002' in out['supervised.py']
    assert not (tmp_path / 'run').exists()                               # nothing trained, no run directory


# ---- learning rates after scaling --------------------------------------------------------------------

def test_learning_rates_follow_the_global_batch():
    """FACTS §1: AdamW, "backbone params with requires_grad (lr) and all non-backbone params
    (lr*lr_multi)", lr 5e-6 and head 40x (= 2e-4) at 4 GPUs; "otherwise scale lr linearly with
    global batch (author, issue #29)"."""
    at = {n: plan_of(None, 'pascal.yaml', '92', processes=None if n == 4 else str(n)) for n in (1, 4, 8)}
    for n, plan in at.items():
        assert plan.optimizer == 'AdamW'
        assert [g.name for g in plan.groups] == ['encoder', 'head']
        assert [g.lr for g in plan.groups] == pytest.approx([5e-6 * n / 4, 2e-4 * n / 4], rel=1e-12)
        assert all(g.weight_decay == 0.01 for g in plan.groups)      # FACTS §1: "weight_decay 0.01 on ALL params"
        # the same epoch split over n processes: ceil(10490 / n) // 4
        assert plan.iterations == math.ceil(10490 / n) // 4
    assert at[4].groups[0].elements == 22_056_576 - 384     # FACTS §10: ViT-S 22,056,576 parameters, less the unused mask_token
    frozen = plan_of(None, 'pascal.yaml', '92', 'lock_backbone=true')
    assert frozen.groups[0].tensors == 0 and frozen.groups[1].lr == pytest.approx(2e-4)   # FACTS §6: "empty group 0 ... head 2e-4"


# ---- classification: the TorchSSL logs' schedule -------------------------------------------------------

def logged(dataset: str, metric: str) -> list[int]:
    with FACTS_TABLES.open() as f:
        return [int(float(r['value'])) for r in csv.DictReader(f) if r['dataset'] == dataset and r['metric'] == metric]


@pytest.mark.parametrize('config, split', [('stl10.yaml', '25_labels_per_class'), ('svhn.yaml', '25_labels_per_class'),
                                           ('svhn.yaml', '4_labels_per_class')])
def test_classification_runs_the_torchssl_schedule(config, split):
    """FACTS §9: "STL/SVHN: USB-style, 2^20 iters, bs 64, uratio 7, SGD lr 0.03 mom 0.9 wd 5e-4,
    ema 0.999, p_cutoff 0.95, eval every 5000 it" (and every 1000 in TorchSSL's last fifth: the
    logs' best_at_iter values past 80% are multiples of 1000, paper_tables.csv)."""
    plan = plan_of(None, config, split)
    assert plan.processes == 1 and plan.total == 2 ** 20
    assert [x.batch for x in plan.loaders] == [7 * 64, 64]
    assert plan.optimizer == 'SGD' and all(g.lr == pytest.approx(0.03) for g in plan.groups)
    assert {g.weight_decay for g in plan.groups} == {5e-4, 0.0}      # wd 5e-4, none on biases and BatchNorm
    assert plan.cfg.ema_decay == 0.999 and plan.cfg.conf_thresh == 0.95
    # TorchSSL evaluates at 168 points of 5000 (0 ... 835,000) and 210 of 1000 past 838,860: 378;
    # epochs of 1024 iterations hold one or two of them, and 373 epochs end with an evaluation.
    assert len(plan.evaluated_epochs) == 373
    for it in logged(plan.cfg.dataset, 'best_at_iter') + logged(plan.cfg.dataset, 'last_iter_logged'):
        assert it // 1024 in plan.evaluated_epochs, it               # the logs' evaluation points fall in evaluated epochs
    supervised = plan_of('supervised', config, split)
    assert supervised.total == 2 ** 20 and supervised.loaders[0].batch == 128
    # on 2 processes an epoch is still max_iters_per_epoch iterations: the unlabeled set is repeated
    # to fill them on every process, and the lr doubles with the global batch
    two = plan_of(None, config, split, processes='2')
    assert two.total == 2 ** 20 and two.loaders[0].samples == 2 * 1024 * 7 * 64
    assert all(g.lr == pytest.approx(0.06) for g in two.groups)


def test_cifar_evaluates_every_epoch():
    """FACTS §9: "CIFAR: custom script, 1024 epochs x 1024 it"; its logs' last_epoch_evaluated is 1023
    (paper_tables.csv): an evaluation after every epoch."""
    plan = plan_of(None, 'cifar10.yaml', '25_labels_per_class')
    assert (plan.iterations, plan.cfg.epochs, len(plan.evaluated_epochs)) == (1024, 1024, 1024)
    assert set(logged('cifar10', 'last_epoch_evaluated')) == {1023}
    assert plan.task.reports_ema                                      # FACTS §9: best-EMA accuracy is reported


# ---- the plan is what training gets ----------------------------------------------------------------------

@pytest.mark.parametrize('config, split, method, processes', [
    ('pascal.yaml', '92', None, 4), ('pascal.yaml', '92', 'supervised', 3), ('cityscapes.yaml', '1_16', 'fixmatch', 8),
    ('levir.yaml', '10%', None, 1), ('ade20k.yaml', '1_32', 'supervised', 4),
])
def test_plan_is_what_the_training_loaders_and_optimizer_get(monkeypatch, config, split, method, processes):
    """The trainer's own loaders (split lists read, no image opened) and optimizer, with the launch's
    process count set to the planned one, give the plan's iterations, batches and learning rates."""
    plan = plan_of(method, config, split, processes=str(processes))
    monkeypatch.setattr(dist, 'world_size', lambda: processes)
    cfg = load_config(ROOT / 'configs' / config, [f'method={method}'] if method else [])
    task = tasks.for_config(cfg)
    labeled, unlabeled, _ = task.split_paths(split)
    loaders = train_loaders(SimpleNamespace(cfg=cfg, task=task, labeled=labeled, unlabeled=unlabeled),
                            methods.get(cfg.method).options)
    assert epoch_iterations(loaders[0], cfg) == plan.iterations
    assert [(len(x.dataset), x.batch_size, x.sampler.num_samples) for x in loaders] == \
        [(x.samples, x.batch, x.per_process) for x in plan.loaders]
    model = task.build_model()
    assert [g['lr'] for g in build_optimizer(model, cfg).param_groups] == [g.lr for g in plan.groups]


# ---- what cannot be known, and wrong arguments -------------------------------------------------------------

def test_a_count_that_cannot_be_known_is_said_so(tmp_path):
    out = subprocess.run([sys.executable, 'unimatch_v2.py', '--config', 'configs/toy.yaml', '--split', '1_16',
                          f'splits_root={tmp_path}', '--plan'], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert f'unlabeled: unknown ({tmp_path}/toy/1_16/unlabeled.txt is missing)' in out.stdout
    assert 'iterations: unknown per epoch' in out.stdout and 'evaluations: unknown' in out.stdout
    assert not any(tmp_path.iterdir())                                # the plan generated nothing


def test_plan_refuses_an_override_taken_for_the_process_count():
    out = subprocess.run([sys.executable, 'supervised.py', '--config', 'configs/pascal.yaml', '--split', '92',
                          '--plan', 'lr=1e-5'], cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 2 and out.stdout == ''
    assert "'lr=1e-5' is not a process count" in out.stderr.splitlines()[-1]


def test_plan_needs_a_split_name():
    with pytest.raises(ConfigError, match='--plan takes --split'):
        make_plan(parse_args('plan', ['--config', 'configs/pascal.yaml', '--labeled-id-path', 'splits/pascal/92/labeled.txt',
                                      '--plan']))


SPLIT_OF = {'pascal': '92', 'cityscapes': '1_16', 'ade20k': '1_64', 'coco': '1_512', 'levir': '5%', 'whu': '5%',
            'cifar10': '25_labels_per_class', 'stl10': '25_labels_per_class', 'svhn': '25_labels_per_class',
            'imagenet': '1%', 'toy': '1_16', 'toy_cd': '5%', 'toy_cls': '4_labels_per_class'}


def test_every_shipped_config_plans(capsys):
    """Every config in configs/ prints a plan through the entry scripts' main, semi-supervised and
    labeled only (the generated toys' lists, absent before their first run, are counted as unknown)."""
    import supervised
    import unimatch_v2
    configs = sorted((ROOT / 'configs').glob('*.yaml'))
    assert {c.stem for c in configs} == set(SPLIT_OF)
    for config in configs:
        for main in (unimatch_v2.main, supervised.main):
            main(['--config', str(config), '--split', SPLIT_OF[config.stem], '--plan'])
            out = capsys.readouterr().out
            assert out.startswith(f'plan of {config} --split {SPLIT_OF[config.stem]}:'), config
            assert 'best.pth:' in out and 'augmentations:' in out, config
