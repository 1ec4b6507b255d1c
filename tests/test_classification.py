"""Semi-supervised classification (the paper's Tables 15-18): networks, data in each official
format, the step on one-pixel maps, top-k accuracy.

    python -m pytest tests/test_classification.py -q

CPU, seconds: tiny files written here in CIFAR-10's, STL-10's and SVHN's own formats.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.checks import DataError
from dataset.classification import (ClassificationDataset, get_spec, labeled_indices, load_classification,
                                    parse_split, read_images)
from dataset.semi import SampleKey
from methods.step import SemiOptions, semi_step
from model.classifiers import PAPER_PARAMS_M, build_classifier
from util.losses import CrossEntropy
from util.metrics import TopKAccuracy
from tests.launch import HANG_TIMEOUT_S


# ---- files in each official format ----------------------------------------------------------------

def images_of(labels: list[int], side: int, seed: int = 0) -> np.ndarray:
    """(N, side, side, 3) uint8: a plain colour per class plus noise, so labels can be read back."""
    rng = np.random.default_rng(seed)
    base = np.array(labels)[:, None, None, None] * 20
    return np.clip(base + rng.integers(0, 10, (len(labels), side, side, 3)), 0, 255).astype(np.uint8)


def write_cifar(root: Path, train: list[int], test: list[int]) -> None:
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train)), 5)
    data = images_of(train, 32).transpose(0, 3, 1, 2).reshape(len(train), -1)
    for b, rows in enumerate(chunks, start=1):
        with open(folder / f'data_batch_{b}', 'wb') as f:
            pickle.dump({'data': data[rows], 'labels': [train[i] for i in rows]}, f)
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({'data': images_of(test, 32).transpose(0, 3, 1, 2).reshape(len(test), -1), 'labels': test}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'c{k}' for k in range(10)]}, f)


def write_stl(root: Path, train: list[int], test: list[int], n_unlabeled: int) -> None:
    """STL-10's binaries: images as (N, 3, 96, 96) stored column-major, labels 1..10 as uint8."""
    folder = root / 'stl10_binary'
    folder.mkdir(parents=True)
    for name, labels in (('train', train), ('test', test), ('unlabeled', [0] * n_unlabeled)):
        images = images_of(labels, 96).transpose(0, 3, 2, 1)         # (N, 3, W, H)
        images.tofile(folder / f'{name}_X.bin')
        if name != 'unlabeled':
            (np.array(labels, np.uint8) + 1).tofile(folder / f'{name}_y.bin')


def write_svhn(root: Path, train: list[int], test: list[int], extra: list[int] = ()) -> None:
    """SVHN's .mat: X (32, 32, 3, N), y (N, 1) with 10 standing for the digit 0."""
    root.mkdir(parents=True, exist_ok=True)
    for name, labels in (('train', train), ('extra', list(extra)), ('test', test)):
        y = np.array([10 if c == 0 else c for c in labels], np.uint8)[:, None]
        scipy.io.savemat(root / f'{name}_32x32.mat', {'X': images_of(labels, 32).transpose(1, 2, 3, 0), 'y': y})


TRAIN = [k % 10 for k in range(60)]          # 6 images per class
TEST = [k % 10 for k in range(20)]


@pytest.mark.parametrize('dataset', ['cifar10', 'stl10', 'svhn'])
def test_reads_each_official_format(tmp_path, dataset):
    {'cifar10': lambda: write_cifar(tmp_path, TRAIN, TEST),
     'stl10': lambda: write_stl(tmp_path, TRAIN, TEST, 7),
     'svhn': lambda: write_svhn(tmp_path, TRAIN, TEST)}[dataset]()
    data = load_classification(dataset, tmp_path, '4_labels_per_class', seed=0)
    assert data.train.labels.tolist() == TRAIN and data.test.labels.tolist() == TEST
    side = get_spec(dataset).size
    for i in (0, 13):       # pixels come back where they were written: class k is about 20 k
        img = np.asarray(data.train.image(i))
        assert img.shape == (side, side, 3) and abs(img.mean() - 20 * TRAIN[i] - 4.5) < 1
    assert len(data.labeled) == 40 and np.bincount(data.train.labels[data.labeled]).tolist() == [4] * 10
    assert len(data.unlabeled) == 60 + (7 if dataset == 'stl10' else 0)      # STL-10's unlabeled images join


def test_reads_imagenet_folders(tmp_path, monkeypatch):
    """ImageNet-1K's standard layout (train/<wnid>/, val/<wnid>/), and a percentage per class (two
    classes stand for the thousand here; a folder count that is not the class count is refused)."""
    from dataclasses import replace

    from PIL import Image

    from dataset.registry import DATASETS
    for part, n in (('train', 10), ('val', 2)):
        for c, wnid in enumerate(('n01440764', 'n01443537')):
            (tmp_path / part / wnid).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(images_of([c], 40)[0]).save(tmp_path / part / wnid / f'{k}.JPEG')
    with pytest.raises(DataError, match='2 class folders in .*train, not 1000'):
        load_classification('imagenet', tmp_path, '20%', seed=0)
    monkeypatch.setitem(DATASETS, 'imagenet', replace(DATASETS['imagenet'], nclass=2))
    data = load_classification('imagenet', tmp_path, '20%', seed=0)
    assert data.train.labels.tolist() == [0] * 10 + [1] * 10 and len(data.test) == 4
    assert np.bincount(data.train.labels[data.labeled]).tolist() == [2, 2]
    view = ClassificationDataset(data.spec, data.test, range(4), 'val')[3]
    assert view['image'].shape == (3, 224, 224) and view['label'] == 1


def test_labeled_subsets_are_seeded_and_nested_in_classes():
    labels = np.array(TRAIN)
    a, b = labeled_indices(labels, 10, '2_labels_per_class', 0), labeled_indices(labels, 10, '2_labels_per_class', 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, labeled_indices(labels, 10, '2_labels_per_class', 1))
    assert len(labeled_indices(labels, 10, '50%', 0)) == 30
    assert len(labeled_indices(labels, 10, 'all', 0)) == 60
    assert parse_split('25_labels_per_class') == ('per_class', 25) and parse_split('10%') == ('percent', 10.0)


@pytest.mark.parametrize('split', ['7_labels_per_class', '0_labels_per_class', '250', '0%'])
def test_bad_label_counts_are_refused(split):
    with pytest.raises(DataError, match=split if split != '7_labels_per_class' else 'class 0, which has only 6'):
        labeled_indices(np.array(TRAIN), 10, split, 0, 'cifar10')


def test_wrong_root_or_format_names_it(tmp_path):
    with pytest.raises(DataError, match=f'cifar10: cannot read its train images from {tmp_path}.*cifar-10-batches-py'):
        read_images('cifar10', tmp_path, 'train')
    (tmp_path / 'train_32x32.mat').write_bytes(b'not a mat file')
    with pytest.raises(DataError, match='svhn: cannot read its train images'):
        read_images('svhn', tmp_path, 'train')
    with pytest.raises(KeyError, match="unknown classification dataset 'cifar100'"):
        get_spec('cifar100')


def test_samples_are_seeded_per_sample_and_in_the_steps_layout(tmp_path):
    write_cifar(tmp_path, TRAIN, TEST)
    data = load_classification('cifar10', tmp_path, '2_labels_per_class', seed=0)
    u = ClassificationDataset(data.spec, data.unlabeled, range(60), 'train_u', nsample=100)
    assert len(u) == 100
    torch.manual_seed(0)
    first = u[SampleKey(5, 123)]
    torch.manual_seed(1)      # the global generators do not matter
    again = u[SampleKey(5, 123)]
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = u[SampleKey(5, 124)]
    assert not torch.equal(first['strong'], other['strong'])
    assert first['strong'].shape == (2, 3, 32, 32) and not first['boxes'].any() and first['valid'].all()
    assert not torch.equal(first['strong'][0], first['strong'][1])     # two different strong views
    lab = ClassificationDataset(data.spec, data.train, data.labeled, 'train_l')[SampleKey(3, 9)]
    assert lab['mask'].shape == (1, 1) and lab['mask'].item() == TRAIN[int(data.labeled[3])]


def weak_views(img, side: int) -> np.ndarray:
    """(V, side, side, 3) uint8: every weak view USB's augmentation can make of `img` (side x side):
    a crop of the image reflect-padded by 1/8 of the side, mirrored or not."""
    pad = side // 8
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode='reflect')
    crops = [arr[y:y + side, x:x + side] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return np.stack(crops + [c[:, ::-1] for c in crops])


@pytest.mark.parametrize('mode', ['train_l', 'train_u'])
def test_the_weak_view_is_a_flip_and_a_translation_only(tmp_path, mode):
    """The image the teacher labels (train_u) and the labeled image (train_l) are exactly a weak
    view of the file's image: no colour operation, no Cutout, which only the strong views get."""
    write_cifar(tmp_path, TRAIN, TEST)
    data = load_classification('cifar10', tmp_path, '2_labels_per_class', seed=0)
    ds = ClassificationDataset(data.spec, data.train, range(60), mode)
    strong_is_weak = []
    for k in range(8):
        item = ds[SampleKey(k, 1000 + k)]
        views = torch.stack([ds.normalize(Image.fromarray(v.copy())) for v in weak_views(data.train.image(k), 32)])
        assert (views == item['image']).flatten(1).all(1).any(), k
        if mode == 'train_u':
            strong_is_weak += [bool((views == s).flatten(1).all(1).any()) for s in item['strong']]
    assert mode == 'train_l' or not all(strong_is_weak)        # the check tells a strong view apart


# ---- networks --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, count', [('wrn_28_2', 1_469_642), ('wrn_var_37_2', 5_933_770)])
def test_parameter_counts_match_the_paper(name, count):
    """FACTS §8's 1.47M and 5.93M; the exact counts pin the definition (biased convolutions, as USB)."""
    n = sum(p.numel() for p in build_classifier(name, 10).parameters())
    assert n == count and round(n / 1e6, 2) == PAPER_PARAMS_M[name]


def test_complementary_dropout_on_pooled_features():
    """Labeled images pass clean; a strong pair's masks sum to 2 per channel, so through the linear
    head the pair's mean logit equals the undropped one, while each view alone differs."""
    torch.manual_seed(0)
    model = build_classifier('wrn_28_2', 10).eval()
    x, s = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        clean = model.classify(torch.cat((x, s, s)))
        out = model(torch.cat((x, s, s)), comp_drop=True, n_clean=2)
    assert out.shape == (10, 10, 1, 1)
    out = out.flatten(1)
    assert torch.allclose(out[:2], clean[:2], atol=1e-5)
    assert torch.allclose((out[2:6] + out[6:]) / 2, clean[2:6], atol=1e-4)
    assert not torch.allclose(out[2:6], clean[2:6], atol=1e-3)


def test_dinov2_linear_head_resizes_and_gets_every_gradient():
    model = build_classifier('dinov2_tiny', 4)
    out = model(torch.randn(4, 3, 32, 32), comp_drop=True, n_clean=2)
    assert out.shape == (4, 4, 1, 1)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the step on one-pixel maps ---------------------------------------------------------------------

def test_semi_step_on_classifier_logits_is_fixmatchs_loss():
    """The unchanged segmentation step, given (B, K, 1, 1) logits and (B, 1, 1) labels with empty
    CutMix boxes, computes FixMatch's per-image losses: CE over labeled images, and the mean over
    unlabeled images of CE against confident pseudo-labels."""
    torch.manual_seed(0)
    model = build_classifier('wrn_28_2', 10)
    teacher = build_classifier('wrn_28_2', 10).eval()
    bl, bu = 3, 4
    batch_l = {'image': torch.randn(bl, 3, 32, 32), 'mask': torch.randint(0, 10, (bl, 1, 1))}
    batch_u = {'image': torch.randn(bu, 3, 32, 32), 'strong': torch.randn(bu, 1, 3, 32, 32),
               'boxes': torch.zeros(bu, 1, 1, 1, dtype=torch.bool), 'valid': torch.ones(bu, 1, 1, dtype=torch.bool)}
    with torch.no_grad():     # an untrained net's eval-mode logits saturate the softmax: scale them to spread
        teacher.head.weight /= teacher.classify(batch_u['image']).std()
        conf, pseudo = teacher.classify(batch_u['image']).softmax(1).max(1)
    thresh = conf.sort().values[1:3].mean().item()        # two images confident, two not
    torch.manual_seed(1)
    out = semi_step(model, teacher, batch_l, batch_u, CrossEntropy(), SemiOptions(views=1, comp_drop=False,
                                                                                   conf_thresh=thresh))
    torch.manual_seed(1)
    logits = model.classify(torch.cat((batch_l['image'], batch_u['strong'][:, 0])))
    loss_x = F.cross_entropy(logits[:bl], batch_l['mask'].flatten())
    loss_u = (F.cross_entropy(logits[bl:], pseudo, reduction='none') * (conf >= thresh)).mean()
    assert (conf >= thresh).sum() == 2
    assert torch.allclose(out['loss_x'], loss_x, atol=1e-5) and torch.allclose(out['loss_u'], loss_u, atol=1e-5)
    assert torch.allclose(out['loss'], (loss_x + loss_u) / 2, atol=1e-5)
    assert out['mask_ratio'] == pytest.approx((conf >= thresh).float().mean().item())


# ---- metrics ----------------------------------------------------------------------------------------

def test_top_k_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.05, 0.03, 0.02],     # true 0: top-1
                           [0.1, 0.2, 0.3, 0.4],        # true 1: rank 3 -> top-3 only
                           [0.5, 0.4, 0.05, 0.05]])     # true 1: rank 2
    acc = TopKAccuracy((1, 2, 3, 5))
    acc.update(logits, torch.tensor([0, 1, 1]))
    got = acc.reduce().accuracy()
    assert got == pytest.approx({'top1': 100 / 3, 'top2': 200 / 3, 'top3': 100.0, 'top5': 100.0})
    assert acc.n_images == 3


# ---- end to end: the trainer, evaluate.py, predict.py ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('cifar')
    write_cifar(root, TRAIN, TEST)
    return root


def fast(root: Path) -> list[str]:
    """configs/cifar10.yaml on the written files, a toy network, two iterations of small batches."""
    return [f'data_root={root}', 'download=false', 'backbone=wrn_16_1', 'max_iters_per_epoch=2', 'batch_size=4',
            'unlabeled_ratio=2', 'labeled_upsample=16', 'num_workers=0', 'eval_batch_size=8', 'log_interval=1']


def train_args(run_dir: Path, split: str = '2_labels_per_class') -> list[str]:
    return ['--config', str(ROOT / 'configs/cifar10.yaml'), '--split', split, '--save-path', str(run_dir)]


def results_of(run_dir: Path) -> dict:
    import json
    return json.loads((run_dir / 'results.json').read_text())


@pytest.mark.usefixtures('on_the_cpu')
def test_unimatch_v2_resume_is_the_same_run(cifar_root, tmp_path, monkeypatch):
    """Two epochs in one go, and the same run stopped after its first epoch and resumed, end with
    the same weights, EMA, optimizer state and accuracies: every augmentation (RandAugment
    included) is seeded per sample."""
    import unimatch_v2
    import engine.loop
    import engine.preemption
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    unimatch_v2.main(train_args(straight) + fast(cifar_root) + ['epochs=2'])
    real = engine.loop.end_of_epoch

    def stop_after(tr, epoch, *args):
        real(tr, epoch, *args)
        raise engine.preemption.Preempted
    monkeypatch.setattr(engine.loop, 'end_of_epoch', stop_after)
    with pytest.raises(SystemExit):
        unimatch_v2.main(train_args(resumed) + fast(cifar_root) + ['epochs=2'])
    assert results_of(resumed)['epochs'] == 1
    monkeypatch.setattr(engine.loop, 'end_of_epoch', real)
    unimatch_v2.main(train_args(resumed) + fast(cifar_root) + ['epochs=2'])
    a, b = (torch.load(d / 'latest.pth', weights_only=True) for d in (straight, resumed))
    for key in ('model', 'model_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x['momentum_buffer'], y['momentum_buffer'])
               for x, y in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()))
    res = results_of(resumed)
    assert res['top1_ema'] == results_of(straight)['top1_ema'] and len(res['top1_ema']) == 2
    assert {'best_top1', 'best_top1_ema', 'final_top1_ema', 'top5_ema', 'best_top5_ema'} <= set(res)
    assert res['history'][0]['loss_s2'] >= 0 and 0 <= res['best_top1_ema'] <= 100


def test_best_pth_holds_the_emas_best_the_reported_figure(cifar_root, tmp_path, monkeypatch):
    """The reported figure is the best EMA top-1, so best.pth is the checkpoint of the EMA's best
    epoch, not the student's. A real three-epoch run whose scores are scripted so the two disagree
    (student best at epoch 0, EMA at epoch 2): real accuracies of a tiny run would rarely."""
    import unimatch_v2
    from tasks.classification import Classification
    scripted = iter([60.0, 10.0, 10.0, 20.0, 10.0, 30.0])          # per epoch: student, then EMA
    real = Classification.evaluate

    def evaluate(self, model, *args, **kwargs):
        return {**real(self, model, *args, **kwargs), 'top1': next(scripted)}
    monkeypatch.setattr(Classification, 'evaluate', evaluate)
    unimatch_v2.main(train_args(tmp_path) + fast(cifar_root) + ['epochs=3'])
    res = results_of(tmp_path)
    assert (res['best_epoch'], res['best_top1']) == (0, 60.0)
    assert (res['best_epoch_ema'], res['best_top1_ema']) == (2, 30.0)
    best, latest = (torch.load(tmp_path / name, weights_only=True) for name in ('best.pth', 'latest.pth'))
    assert best['epoch'] == 2 and best['previous_best_ema'] == 30.0
    assert all(torch.equal(best['model_ema'][k], v) for k, v in latest['model_ema'].items())


@pytest.mark.parametrize('method', ['fixmatch', 'supervised'])
def test_baselines_train(cifar_root, tmp_path, method):
    import unimatch_v2
    unimatch_v2.main(train_args(tmp_path) + fast(cifar_root) + ['epochs=1', f'method={method}'])
    res = results_of(tmp_path)
    assert res['method'] == method and res['epochs'] == 1 and res['global_step'] == 2
    assert (res['best_top1_ema'] is None) == (method == 'supervised')


def test_evaluate_and_predict_a_checkpoint(cifar_root, tmp_path, capsys):
    import evaluate
    import predict
    import unimatch_v2
    from PIL import Image
    unimatch_v2.main(train_args(tmp_path / 'run') + fast(cifar_root) + ['epochs=1', 'method=fixmatch'])
    ckpt = tmp_path / 'run' / 'best.pth'
    result = evaluate.main(['--config', str(ROOT / 'configs/cifar10.yaml'), '--checkpoint', str(ckpt)] + fast(cifar_root))
    assert result['n_images'] == len(TEST)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'top-1: {result["top1"]:.2f}'
    images = tmp_path / 'images'
    images.mkdir()
    for k in range(3):
        Image.fromarray(images_of([k], 32)[0]).save(images / f'{k}.png')
    predict.main(['--config', str(ROOT / 'configs/cifar10.yaml'), '--checkpoint', str(ckpt), '--input', str(images),
                  '--output', str(tmp_path / 'out')] + fast(cifar_root))
    rows = (tmp_path / 'out' / 'predictions.csv').read_text().splitlines()
    assert rows[0] == 'file,class,probability,top5' and [r.split(',')[0] for r in rows[1:]] == ['0.png', '1.png', '2.png']


@pytest.mark.parametrize('override, message', [
    ('data_root={missing}', 'cifar10: cannot read its train images from {missing}'),
    ('split=7_labels_per_class', "split '7_labels_per_class' asks for 7 labeled images of class 0, which has only 6"),
    ('dataset=cifar100', "config key 'dataset' must be one of"),
    ('split=250', "split '250': expected <N>_labels_per_class"),
])
def test_bad_input_is_named_before_anything_is_written(cifar_root, tmp_path, capsys, override, message):
    import unimatch_v2
    missing = tmp_path / 'nowhere'
    override, message = override.format(missing=missing), message.format(missing=missing)
    split = override.split('=', 1)[1] if override.startswith('split=') else '2_labels_per_class'
    extra = [] if override.startswith('split=') else [override]
    run_dir = tmp_path / 'run'
    with pytest.raises(SystemExit) as exit_info:
        unimatch_v2.main(train_args(run_dir, split) + fast(cifar_root) + extra)
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_loaders_of_one_epoch(cifar_root, tmp_path):
    """batch_size labeled + batch_size x unlabeled_ratio unlabeled images per step, both loaders
    max_iters_per_epoch batches long; labeled-only: twice the batch, labeled_upsample samples."""
    import tasks
    from methods.step import SemiOptions
    from engine.config import load_config
    from engine.data import train_loaders
    from engine.run import Run
    cfg = load_config(ROOT / 'configs/cifar10.yaml', fast(cifar_root))
    task = tasks.for_config(cfg)
    run = Run(cfg, tmp_path, torch.device('cpu'), None, '2_labels_per_class', *task.split_paths('2_labels_per_class'), task)
    unlabeled, labeled = train_loaders(run, SemiOptions())
    assert (unlabeled.batch_size, labeled.batch_size) == (8, 4) and len(unlabeled) == len(labeled) == 2
    batch = next(iter(unlabeled))
    assert batch['strong'].shape == (8, 2, 3, 32, 32) and batch['boxes'].shape == (8, 2, 1, 1)
    (only,) = train_loaders(run, None)
    assert only.batch_size == 8 and len(only) == 2


def test_reproduce_runs_three_seeds_per_cell():
    import subprocess
    out = subprocess.run(['sh', str(ROOT / 'scripts/reproduce.sh'), '--dry-run', 'table17'], capture_output=True,
                         text=True, check=True, timeout=HANG_TIMEOUT_S).stdout.splitlines()
    assert out[:2] == ['EXP_DIR=exp/table17/seed=0 sh scripts/train.sh svhn 4_labels_per_class unimatch_v2 seed=0',
                       'EXP_DIR=exp/table17/seed=0 sh scripts/train.sh svhn 25_labels_per_class unimatch_v2 seed=0']
    assert len(out) == 7 and out[-1].endswith('--tables table17 --out exp/tables.md')
