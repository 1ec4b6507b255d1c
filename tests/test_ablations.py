"""The paper's ablation switches (Figures 5-6, Tables 6-13): each changes what it should and nothing
else.

    python -m pytest tests/test_ablations.py -q

`teacher: online` labels with the student (no gradient through the labels) while the EMA is still
updated; `comp_drop_at: classifier` leaves the encoder features untouched; Table 6's FixMatch
variants; extra unlabeled images from image folders (Table 13) in the official layouts; the
reproduce grids and `tools/tables.py` on a fake experiment tree.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import methods
from dataset.semi import SemiDataset, split_paths
from dataset.splits import FolderCountWarning, read_split, unlabeled_from_folders
from methods.step import SemiOptions, semi_step
from model import build_model
from tests.test_tables import reproduce, write_run
from tools import tables
import engine.build
import engine.data
import engine.run
import unimatch_v2
from util.config import ConfigError
from engine.config import Config, from_dict, load_config
from util.ema import EMATeacher
from util.labels import IGNORE_INDEX
from util.losses import build_criterion, cutmix

ROOT = Path(__file__).resolve().parents[1]
NCLASS = 3
CROP = 28


def batches(b: int = 2, views: int = 2, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(b, views, CROP, CROP, dtype=torch.bool)
    boxes[:, :, 4:16, 6:20] = True
    return ({'image': torch.randn(b, 3, CROP, CROP, generator=g),
             'mask': torch.randint(0, NCLASS, (b, CROP, CROP), generator=g)},
            {'image': torch.randn(b, 3, CROP, CROP, generator=g),
             'strong': torch.randn(b, views, 3, CROP, CROP, generator=g), 'boxes': boxes,
             'valid': torch.ones(b, CROP, CROP, dtype=torch.bool)})


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model('dinov2_tiny', NCLASS).train()


def criterion():
    return build_criterion('CELoss', {'ignore_index': IGNORE_INDEX})


# ---- teacher: online ---------------------------------------------------------------------------------

def fake_training(teacher: str, student: torch.nn.Module, ema: EMATeacher) -> SimpleNamespace:
    cfg = from_dict({'teacher': teacher, 'conf_thresh': 0.0})
    return SimpleNamespace(run=SimpleNamespace(cfg=cfg), ddp=student, student=student, teacher=ema,
                           methods=methods.MethodSet([]), state=SimpleNamespace(epoch=-1, iteration=0))


def record_calls(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(input, output, training) of every forward of `module`."""
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append((args[0], out, m.training)))
    return calls


@pytest.mark.parametrize('teacher', ['online', 'ema'])
def test_online_teacher_labels_with_the_student_without_gradient(teacher):
    student = tiny(0)
    ema = EMATeacher(tiny(1))       # other weights: its labels differ from the student's
    student_calls, ema_calls = record_calls(student), record_calls(ema.model)
    x, u = batches()
    step = engine.build.make_step(fake_training(teacher, student, ema), methods.get('unimatch_v2').options, 10)
    out = step(u, x)
    weak = [c for c in student_calls if torch.equal(c[0], u['image'])]
    if teacher == 'ema':       # the paper: the EMA model labels, the student never sees the weak view
        assert len(ema_calls) == 1 and not weak
        return
    assert not ema_calls and len(weak) == 1
    _, logits_w, training = weak[0]
    assert not logits_w.requires_grad       # no gradient through the pseudo-labels
    assert training                         # the student as it is, as the original labels
    # The pseudo-labels are the student's own: with threshold 0 every valid pixel counts, and the
    # unlabeled loss is the student's CE against the argmax of its weak-view prediction.
    pseudo = logits_w.argmax(1)
    assert float(out['mask_ratio']) == 1.0
    pred_s1 = student_calls[-1][1][len(x['image']):len(x['image']) + len(u['image'])]
    target = cutmix(pseudo, u['boxes'][:, 0])
    expected = torch.nn.functional.cross_entropy(pred_s1.float(), target)
    assert torch.allclose(out['loss_s1'], expected, rtol=1e-5, atol=1e-6)
    out['loss'].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_online_teacher_run_keeps_and_evaluates_the_ema(toy, tmp_path, monkeypatch):
    updates = []
    original = EMATeacher.update
    monkeypatch.setattr(EMATeacher, 'update', lambda self, s, step: (updates.append(step), original(self, s, step)))
    called = []
    monkeypatch.setattr(EMATeacher, '__call__', lambda self, *a, **k: called.append(1) or self.model(*a, **k))
    args = engine.run.parse_args('t', ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16',
                                    '--save-path', str(tmp_path / 'run'), *toy, 'epochs=1', 'teacher=online'])
    tr = unimatch_v2.train(args)
    assert updates == [0, 1]            # the EMA follows the student at every step
    assert not called                   # ... but never labels
    res = (tmp_path / 'run' / 'results.json').read_text()
    assert '"miou_ema": [' in res       # and is evaluated
    ema, student = tr.teacher.model.state_dict(), tr.student.state_dict()
    assert any(not torch.equal(ema[k], student[k]) for k in ema)


# ---- comp_drop_at: classifier ----------------------------------------------------------------------

def test_comp_drop_at_classifier_leaves_the_encoder_features_untouched():
    model = tiny(0)
    x = torch.randn(2, 3, CROP, CROP)
    s = torch.randn(2, 3, CROP, CROP)
    batch = torch.cat((x, s, s))                 # labeled, then the pair [s1; s2] of the same images
    seen = {}
    fuse = model.head.fuse
    model.head.fuse = lambda feats, grid: (seen.__setitem__('features', feats), fuse(feats, grid))[1]
    model.head.scratch.output_conv[-1].register_forward_pre_hook(
        lambda m, args: seen.__setitem__('classifier_in', args[0]))
    with torch.no_grad():
        encoded = model.encode(batch)
        model.set_comp_drop_at('classifier')
        model(batch, comp_drop=True, n_clean=2)
        assert all(torch.equal(a, b) for a, b in zip(seen['features'], encoded))   # untouched
        clean = torch.nn.Sequential(*model.head.scratch.output_conv[:-1])(fuse(encoded, (2, 2)))
        h = seen['classifier_in']
        assert torch.equal(h[:2], clean[:2])                                       # labeled: no dropout
        assert torch.allclose(h[2:4] + h[4:6], 2 * clean[2:4], atol=1e-6)          # complementary pair
        assert not torch.equal(h[2:], clean[2:])
        model.set_comp_drop_at('features')       # the paper's site: the features do change
        model(batch, comp_drop=True, n_clean=2)
        assert not all(torch.equal(a, b) for a, b in zip(seen['features'], encoded))
        assert torch.equal(seen['features'][0][:2], encoded[0][:2])


def test_comp_drop_at_is_validated_and_needs_the_plain_model(toy):
    with pytest.raises(ConfigError, match='comp_drop_at'):
        from_dict({'comp_drop_at': 'decoder'})
    with pytest.raises(ConfigError, match='teacher'):
        from_dict({'teacher': 'mean'})
    cfg = load_config(ROOT / 'configs/toy.yaml', toy + ['method=u2pl', 'comp_drop_at=classifier'])
    with pytest.raises(ConfigError, match='comp_drop_at'):
        engine.build.build_student(cfg, torch.device('cpu'))
    cfg = load_config(ROOT / 'configs/toy.yaml', toy + ['comp_drop_at=classifier'])
    assert engine.build.build_student(cfg, torch.device('cpu')).comp_drop_at == 'classifier'
    assert Config().teacher == 'ema' and Config().comp_drop_at == 'features'


# ---- Table 6: FixMatch variants -------------------------------------------------------------------------

def test_table6_variants_are_fixmatch_plus_one_change():
    opts = {n: methods.get(n).options for n in methods.names()}
    assert opts['fixmatch_addfeataug'] == SemiOptions(views=1, comp_drop=False, feat_drop=True)
    assert opts['fixmatch_dualstream'] == SemiOptions(views=2, comp_drop=False)
    assert opts['fixmatch_addfeataug_dualstream'] == SemiOptions(views=2, comp_drop=False, feat_drop=True)
    for name, views in [('fixmatch_addfeataug', 1), ('fixmatch_dualstream', 2), ('fixmatch_addfeataug_dualstream', 2)]:
        x, u = batches(views=views)
        out = semi_step(tiny(0), EMATeacher(tiny(0)), x, u, criterion(), opts[name])
        assert {f'loss_s{v + 1}' for v in range(views)} <= set(out) and torch.isfinite(out['loss'])


def test_feature_dropout_is_independent_per_strong_view():
    torch.manual_seed(0)
    feats = [torch.ones(6, 4, 32)] * 4           # 2 labeled + 4 strong images, (B, N, C) tokens
    out = build_model('dinov2_tiny', NCLASS).perturb(feats, False, 2, False, feat_drop=True)
    f = out[0][:, 0]                             # (B, C): the per-image channel mask
    assert torch.equal(f[:2], torch.ones(2, 32))
    assert set(f[2:].unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(f[2:4] + f[4:6], torch.full((2, 32), 2.0))   # not complementary
    assert all(torch.equal(o, out[0]) for o in out)                       # one mask for the four taps


# ---- Table 13: extra unlabeled images ---------------------------------------------------------------------

def write_image(path: Path, size=(40, 32), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_cityscapes_train_extra_list_is_derived_cached_and_counted(tmp_path):
    root = tmp_path / 'cityscapes'
    for city, n in (('augsburg', 2), ('bad-honnef', 1)):
        for i in range(n):
            write_image(root / 'leftImg8bit/train_extra' / city / f'{city}_{i:06d}_000019_leftImg8bit.png')
    (root / 'leftImg8bit/train_extra/README.txt').write_text('not an image')
    cache = tmp_path / 'splits/cityscapes/all/unlabeled+leftImg8bit_train_extra.txt'
    with pytest.warns(FolderCountWarning, match=r'train_extra.*3 images.*19998'):
        samples = unlabeled_from_folders(root, ['leftImg8bit/train_extra'], cache)
    assert [s.image for s in samples] == [
        'leftImg8bit/train_extra/augsburg/augsburg_000000_000019_leftImg8bit.png',
        'leftImg8bit/train_extra/augsburg/augsburg_000001_000019_leftImg8bit.png',
        'leftImg8bit/train_extra/bad-honnef/bad-honnef_000000_000019_leftImg8bit.png']
    assert all(s.mask is None for s in samples) and len(read_split(cache)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter('error')           # the cache is read: no listing, no count warning
        assert [s.image for s in unlabeled_from_folders(root, ['leftImg8bit/train_extra'], cache)] == \
            [s.image for s in samples]


def test_labeled_from_one_dataset_unlabeled_from_another(tmp_path):
    """ADE20K's labels with COCO's train2017 + unlabeled2017 images (Table 13), and COCO's 'all'."""
    ade, coco = tmp_path / 'ade20k', tmp_path / 'coco'
    write_image(ade / 'images/training/ADE_train_00000001.jpg')
    Image.fromarray(np.ones((32, 40), np.uint8)).save(ade / 'labeled_mask.png')
    splits = tmp_path / 'splits'
    (splits / 'ade20k/all').mkdir(parents=True)
    (splits / 'ade20k/all/labeled.txt').write_text('images/training/ADE_train_00000001.jpg labeled_mask.png\n')
    for i in range(2):
        write_image(coco / f'train2017/{i:012d}.jpg', value=10 * i)
        Image.fromarray(np.zeros((32, 40), np.uint8)).save((coco / 'masks').mkdir(exist_ok=True) or
                                                           coco / f'masks/{i:012d}.png')
    write_image(coco / 'unlabeled2017/000000999999.jpg')
    cfg = from_dict({'dataset': 'ade20k', 'data_root': str(ade), 'nclass': 150, 'splits_root': str(splits),
                     'unlabeled_root': str(coco), 'unlabeled_dirs': ['train2017', 'unlabeled2017']})
    args = SimpleNamespace(labeled_id_path=None, unlabeled_id_path=None, split='all')
    labeled, unlabeled, _ = engine.run.data_paths(cfg, args)
    assert labeled == splits / 'ade20k/all/labeled.txt'
    assert unlabeled == splits / 'ade20k/all/unlabeled+train2017+unlabeled2017.txt'
    assert [s.image for s in read_split(unlabeled)] == [
        'train2017/000000000000.jpg', 'train2017/000000000001.jpg', 'unlabeled2017/000000999999.jpg']
    item = SemiDataset(engine.data.unlabeled_root(cfg), unlabeled, 'train_u', CROP, num_strong=2)[2]
    assert item['image'].shape == (3, CROP, CROP)
    # COCO 'all': the labeled list is every train2017 image with its mask, derived on first use.
    (splits / 'coco').mkdir()
    with pytest.warns(FolderCountWarning, match='118287'):
        paths = split_paths('coco', 'all', splits, coco)
    assert [s.mask for s in read_split(paths.labeled)] == ['masks/000000000000.png', 'masks/000000000001.png']
    assert paths.unlabeled == paths.labeled


def test_a_run_with_unlabeled_images_from_another_root(toy, tmp_path):
    extra = tmp_path / 'other'
    for i in range(4):
        write_image(extra / f'unlabeled2017/{i:012d}.jpg', size=(48, 48), value=40 * i)
    run_dir = tmp_path / 'run'
    args = engine.run.parse_args('t', ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16',
                                    '--save-path', str(run_dir), *toy, 'epochs=1', f'unlabeled_root={extra}',
                                    'unlabeled_dirs=[unlabeled2017]', 'comp_drop_at=classifier'])
    unimatch_v2.train(args)
    log = (run_dir / 'train.log').read_text()
    assert '4 unlabeled samples per epoch' in log
    with pytest.raises(ConfigError, match='unlabeled_dirs'):
        from_dict({'unlabeled_dirs': ['/abs/path']})


# ---- reproduce.sh and tools/tables.py ----------------------------------------------------------------------

GRID_SIZES = {'figure5': 40, 'figure6': 32, 'table06': 50, 'table07': 38, 'table08': 20, 'table09': 24,
              'table10': 7, 'table11': 5, 'table12': 7, 'table13': 4}


@pytest.mark.parametrize('table', sorted(GRID_SIZES))
def test_reproduce_prints_each_ablation_grid(tmp_path, table):
    res = reproduce('--dry-run', table, exp=tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if 'sh scripts/train.sh' in ln]
    assert len(cmds) == GRID_SIZES[table]
    tagged = [c for c in cmds if c.startswith(f'EXP_DIR={tmp_path}/')]
    # every ablation cell has its own directory; the untagged cells are the plain runs it compares with
    for c in tagged:
        tag = c.split()[0].removeprefix(f'EXP_DIR={tmp_path}/')
        assert tag in tables.TAGS and tables.TAGS[tag][0] == table, c
        assert 'tag=' not in c
    assert f'--tables {table} ' in res.stdout


def test_reproduce_cell_runs_go_under_their_tag(tmp_path):
    """A finished ablation run is found in its own directory; a finished plain run of the same
    dataset/method/backbone/split does not stand in for it."""
    done = dict(miou=[80.0] * 60, miou_ema=[81.0] * 60, epochs_total=60)
    write_run(tmp_path, 'pascal', 'unimatch_v2', 'dinov2_base', '92', prefix='table10/teacher=online', **done)
    write_run(tmp_path, 'pascal', 'unimatch_v2', 'dinov2_base', '183', **done)
    res = reproduce('--dry-run', 'table10', exp=tmp_path)
    cmds = [ln for ln in res.stdout.splitlines() if 'scripts/train.sh' in ln]
    assert len(cmds) == 6 and f'skip pascal 92 unimatch_v2 ({tmp_path}/table10/teacher=online/pascal' in res.stderr
    assert cmds[0] == (f'EXP_DIR={tmp_path}/table10/teacher=online sh scripts/train.sh pascal 183 unimatch_v2 '
                       'backbone=dinov2_base teacher=online')


def fake_exp(exp: Path) -> None:
    """A few tiny results.json files in the layout reproduce.sh gives them, finished (60 epochs)."""
    def run(dataset, method, backbone, split, best, best_ema, prefix=''):
        write_run(exp, dataset, method, backbone, split, miou=[best - 1] * 59 + [best],
                  miou_ema=[best_ema - 1] * 59 + [best_ema], epochs_total=60, prefix=prefix)
    run('pascal', 'unimatch_v2', 'dinov2_base', '183', 86.9, 87.5, prefix='figure5/conf_thresh=0.7')
    run('pascal', 'unimatch_v2', 'dinov2_base', '183', 87.0, 88.0)      # the plain run: conf_thresh 0.95
    run('ade20k', 'fixmatch_dualstream', 'dinov2_base', '1_64', 37.0, 37.5)
    run('pascal', 'unimatch_v2', 'dinov2_base', '92', 83.0, 84.0, prefix='table10/teacher=online')
    run('ade20k', 'unimatch_v2', 'mit_b5', '1_64', 28.0, 20.0, prefix='table09')


def test_tables_put_the_papers_value_beside_each_ablation_run(tmp_path):
    fake_exp(tmp_path)
    runs, paper = tables.collect_runs(tmp_path), tables.paper_values(ROOT / 'reference/paper_tables.csv')
    fig5 = tables.make_table('figure5', runs, paper)
    assert '| unimatch_v2 | dinov2_base | conf_thresh=0.7 | 87.5 (87.4, +0.1) |' in fig5     # ours (paper)
    assert '| unimatch_v2 | dinov2_base | conf_thresh=0.95 | 88.0 (87.9, +0.1) |' in fig5   # the plain run
    t6 = tables.make_table('table06', runs, paper)
    assert '| fixmatch_dualstream | dinov2_base | figure4b_fixmatch+dual_stream | 37.5 (37.3, +0.2) |' in t6
    t9 = tables.make_table('table09', runs, paper)
    assert '| unimatch_v2 | mitb5 | default | 28.0 (27.9, +0.1) |' in t9    # the model's best, as the paper
    t10 = tables.make_table('table10', runs, paper)
    assert '| unimatch_v2 | dinov2_base | noEMA(online_model_as_teacher) | 83.0 (83.5, -0.5) |' in t10
    # ablation runs fill their own tables, not extra rows of the main ones
    assert 'figure5' not in tables.make_table('table01', runs, paper)
    assert tables.default_tables(runs, paper)[5:9] == ['figure5', 'table06', 'table09', 'table10']
