"""Change detection (tasks/change_detection.py): parity of the bi-temporal DPT with the original,
pair transforms that keep A, B and label aligned, the metrics, bad input, and the entry scripts end
to end on a tiny generated toy_cd."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_script
import predict as predict_script
import unimatch_v2
from dataset.change import ChangeDataset, aligned_geometry, check_pairs
from dataset.semi import SampleKey
from dataset.toy_cd import ensure_toy_cd
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from methods.step import SemiOptions, semi_step
from model.change_dpt import ChangeDPT
from model.presets import ModelPreset
from tasks.change_detection import ChangeDetection, change_scores
from util.losses import CrossEntropy, cutmix

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests/fixtures/tiny_cd_dpt_dinov2_reference.pt'
# The original change model's fp32 outputs (its code, another CPU): |logits| <= 0.09 and |f_A - f_B|
# <= 5.6 (fp32 ulp 4.8e-7), measured on an AMD EPYC 3.7e-8 and 9.5e-7 off. 1e-5: fp32 rounding of
# the features (~20 ulps), as tests/test_model.py's parity check.
ORIGINAL_ATOL = 1e-5
CONFIG = str(ROOT / 'configs/toy_cd.yaml')
FAST = ['crop_size=42', 'batch_size=2', 'max_iters_per_epoch=2', 'log_interval=1', 'num_workers=0',
        'pretrained=null', 'toy_train=20', 'toy_val=2', 'precision=fp32']


# ---- the model: parity with the original ------------------------------------------------------------

@pytest.fixture(scope='module')
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def reference_model(ref: dict, original_arithmetic: bool) -> ChangeDPT:
    c = ref['config']
    spec = ModelPreset(c['embed_dim'], c['depth'], c['num_heads'], tuple(c['intermediate_layers']), c['features'],
                       tuple(c['out_channels']))
    model = ChangeDPT(spec, c['nclass']).eval()
    model.load_state_dict(ref['state_dict'])          # strict: the original's parameter names
    model.set_layer_scale_folding(not original_arithmetic)
    model.set_fused_attention(not original_arithmetic)
    return model


@pytest.mark.parametrize('original_arithmetic', [True, False])
def test_parity_with_the_original_change_model(reference, original_arithmetic):
    model = reference_model(reference, original_arithmetic)
    with torch.no_grad():
        for (a, b), expected in zip(reference['inputs'], reference['logits']):
            logits = model(torch.cat((a, b), 1))
            assert logits.shape == expected.shape
            assert (logits - expected).abs().max() <= ORIGINAL_ATOL
        a, b = reference['inputs'][1]
        for diff, expected in zip(model.differences(torch.cat((a, b), 1)), reference['abs_diff_features_input2']):
            diff = diff.transpose(1, 2).reshape(expected.shape)        # tokens -> (B, C, h, w) maps
            assert (diff - expected).abs().max() <= ORIGINAL_ATOL


def test_change_model_trains_through_the_shared_step():
    """Pairs through semi_step (CutMix, complementary dropout on the difference features): every
    trainable parameter gets a gradient; swapping A and B leaves |f_A - f_B| as it is."""
    torch.manual_seed(0)
    spec = ModelPreset(32, 4, 2, (0, 1, 2, 3), 16, (8, 16, 32, 32))
    model = ChangeDPT(spec, 2)
    s, b = 28, 2
    batch_l = {'image': torch.randn(b, 6, s, s), 'mask': torch.randint(0, 2, (b, s, s))}
    boxes = torch.zeros(b, 2, s, s, dtype=torch.bool)
    boxes[:, :, 5:15, 5:15] = True
    batch_u = {'image': torch.randn(b, 6, s, s), 'strong': torch.randn(b, 2, 6, s, s), 'boxes': boxes,
               'valid': torch.ones(b, s, s, dtype=torch.bool)}
    out = semi_step(model, model, batch_l, batch_u, CrossEntropy(), SemiOptions(conf_thresh=0.0))
    out['loss'].backward()
    assert torch.isfinite(out['loss'])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    x = batch_l['image']
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(x), model(torch.cat((x[:, 3:], x[:, :3]), 1)), atol=1e-5)
    with pytest.raises(ValueError, match='6 channels'):
        model(torch.randn(1, 3, s, s))


def test_cutmix_takes_a_and_b_from_one_box():
    x = torch.arange(2 * 6 * 4 * 4, dtype=torch.float32).reshape(2, 6, 4, 4)
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[:, 1:3, 1:3] = True
    mixed = cutmix(x, box)
    assert torch.equal(mixed[0, :, 1:3, 1:3], x[1, :, 1:3, 1:3])      # all six channels, A and B
    assert torch.equal(mixed[0, :, 0], x[0, :, 0])


# ---- pair data ---------------------------------------------------------------------------------------

COORD_SIDE = 60     # px; coordinates x 4 fit in 8 bits


def coordinate_pairs(root: Path, n: int = 1) -> Path:
    """A encodes each pixel's (x, y) as (4x, 4y) in R and G, B the same swapped (4y, 4x); the label
    is a one-pixel checkerboard (x + y odd: 255). Any misalignment or non-nearest label resampling
    shows."""
    y, x = np.mgrid[:COORD_SIDE, :COORD_SIDE]
    a = np.stack([4 * x, 4 * y, np.full_like(x, 128)], -1).astype(np.uint8)
    b = np.stack([4 * y, 4 * x, np.full_like(x, 64)], -1).astype(np.uint8)
    label = ((x + y) % 2 * 255).astype(np.uint8)
    for folder, arr in (('A', a), ('B', b), ('label', label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(arr).save(root / folder / f'{i}.png')
    (root / 'list.txt').write_text(''.join(f'{i}.png\n' for i in range(n)))
    return root / 'list.txt'


def denormalized(t: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((t * std + mean) * 255).numpy()


def test_pair_geometry_keeps_a_b_and_label_aligned(tmp_path):
    split = coordinate_pairs(tmp_path)
    ds = ChangeDataset(tmp_path, split, 'train_l', crop_size=56)
    flips = set()
    for seed in range(24):
        s = ds[SampleKey(0, seed)]
        assert s['image'].shape == (6, 56, 56) and s['mask'].shape == (56, 56)
        a, b = denormalized(s['image'][:3]), denormalized(s['image'][3:])
        mask = s['mask'].numpy()
        assert set(np.unique(mask)) <= {0, 1, 255}             # 255: padding only
        real = mask != 255
        assert real.mean() > 0.5
        # B went through the same resize, crop and flip as A: its swapped coordinates agree.
        assert np.abs(b[0] - a[1])[real].max() < 1.5 and np.abs(b[1] - a[0])[real].max() < 1.5
        # The label was resampled with nearest neighbours, at A's geometry: at each pixel it is the
        # checkerboard value of the source pixel A's (bilinear) coordinates round to.
        sx, sy = a[0] / 4, a[1] / 4
        # (A's coordinates carry 1/4 px; away from half-way points and from the image border,
        # where bilinear resampling clamps, the rounding is unambiguous.)
        clear = real & (np.abs(sx % 1 - 0.5) > 0.2) & (np.abs(sy % 1 - 0.5) > 0.2)
        clear &= (sx > 2) & (sx < COORD_SIDE - 3) & (sy > 2) & (sy < COORD_SIDE - 3)
        expected = (np.round(sx) + np.round(sy)) % 2
        assert clear.sum() > 50
        assert (mask[clear] == expected[clear]).mean() > 0.97, seed
        row = sx[28][real[28]]
        flips.add(bool(row[-1] < row[0]))
    assert flips == {True, False}                               # both flipped and unflipped crops


def test_label_is_resampled_with_nearest_neighbours():
    """`aligned_geometry` on a label whose every pixel holds a code of its position: each output label
    pixel is a copy of one of the four source pixels around where A's (bilinear) coordinates say it
    came from -- never a blend of them."""
    y, x = np.mgrid[:COORD_SIDE, :COORD_SIDE]
    a = Image.fromarray(np.stack([4 * x, 4 * y, np.zeros_like(x)], -1).astype(np.uint8))
    code = lambda cx, cy: (cx % 15) * 16 + cy % 15          # noqa: E731  (< 254, the padding markers)
    label = Image.fromarray(code(x, y).astype(np.uint8))
    for seed in range(12):
        a_out, _, label_out = aligned_geometry(a, a, label, 56, 255, random.Random(seed))
        sx, sy = np.asarray(a_out, np.float64)[..., 0] / 4, np.asarray(a_out, np.float64)[..., 1] / 4
        out = np.asarray(label_out)
        inside = (out != 255) & (sx > 2) & (sx < COORD_SIDE - 3) & (sy > 2) & (sy < COORD_SIDE - 3)
        x0, y0 = np.floor(sx - 0.1).astype(int), np.floor(sy - 0.1).astype(int)
        near = [code(x0 + i, y0 + j) for i in (0, 1, 2) for j in (0, 1, 2)]
        ok = np.any([out == n for n in near], axis=0)
        assert ok[inside].all(), (seed, (~ok & inside).sum())


def test_unlabeled_pair_views(tmp_path):
    """Equal A and B: the weak pair stays equal, each strong view jitters A and B apart, one CutMix
    box per view; the same SampleKey gives the same sample."""
    rng = np.random.default_rng(0)
    for folder in ('A', 'B'):
        (tmp_path / folder).mkdir()
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for i in range(2):
        img.save(tmp_path / 'A' / f'{i}.png')
        img.save(tmp_path / 'B' / f'{i}.png')
    (tmp_path / 'u.txt').write_text('0.png\n1.png\n')
    ds = ChangeDataset(tmp_path, tmp_path / 'u.txt', 'train_u', crop_size=42, num_strong=2)
    differ = 0
    for seed in range(6):
        s = ds[SampleKey(1, seed)]
        assert s['strong'].shape == (2, 6, 42, 42) and s['boxes'].shape == (2, 42, 42)
        assert torch.equal(s['image'][:3], s['image'][3:])
        differ += sum(not torch.allclose(v[:3], v[3:]) for v in s['strong'])
        again = ds[SampleKey(1, seed)]
        assert all(torch.equal(s[k], again[k]) for k in ('image', 'strong', 'boxes', 'valid'))
    assert differ >= 8


# ---- metrics -------------------------------------------------------------------------------------------

def test_change_scores_on_a_hand_made_matrix():
    # rows truth (unchanged, changed), columns prediction: TN 80, FP 6, FN 4, TP 10
    s = change_scores([[80, 6], [4, 10]])
    assert s['changed_iou'] == pytest.approx(10 / 20 * 100)
    assert s['unchanged_iou'] == pytest.approx(80 / 90 * 100)
    assert s['oa'] == pytest.approx(90.0)
    assert s['precision'] == pytest.approx(10 / 16 * 100) and s['recall'] == pytest.approx(10 / 14 * 100)
    assert s['f1'] == pytest.approx(2 * 10 / (2 * 10 + 6 + 4) * 100)
    p_e = (86 * 84 + 14 * 16) / 100 ** 2          # truth marginals x prediction marginals
    assert s['kappa'] == pytest.approx((0.9 - p_e) / (1 - p_e) * 100)
    assert s['miou'] == pytest.approx((50 + 800 / 9) / 2)


def test_reported_figure_is_the_best_student_epoch_with_its_oa():
    history = [{'epoch': 0, 'changed_iou': 10.0, 'oa': 90.0, 'changed_iou_ema': 30.0, 'oa_ema': 80.0},
               {'epoch': 1, 'changed_iou': 20.0, 'oa': 95.0, 'changed_iou_ema': 25.0, 'oa_ema': 70.0}]
    assert ChangeDetection.results_extra(None, history, 1) == {'reported': {'changed_iou': 20.0, 'oa': 95.0,
                                                                            'epoch': 1}}


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_pairs_are_named_by_file_and_line(tmp_path):
    split = coordinate_pairs(tmp_path, n=5)
    (tmp_path / 'B/1.png').unlink()                                                       # missing in B
    problems = check_pairs(tmp_path, split, 'labeled')
    assert [str(p) for p in problems] == [f'error: {split}:2: 1.png is missing in B/: no file {tmp_path}/B/1.png']
    Image.new('RGB', (30, 30)).save(tmp_path / 'B/1.png')                                 # other size
    Image.fromarray(np.full((COORD_SIDE, COORD_SIDE), 7, np.uint8)).save(tmp_path / 'label/2.png')   # values
    (tmp_path / 'A/3.png').write_bytes(b'not a png')                                      # unreadable
    problems = [str(p) for p in check_pairs(tmp_path, split, 'labeled', full=True)]
    assert len(problems) == 3, problems
    assert problems[0].startswith(f'error: {split}:2: 1.png: sizes differ: A 60x60, B 30x30')
    assert problems[1].startswith(f'error: {split}:3: {tmp_path}/label/2.png: change label has values [7]')
    assert problems[2].startswith(f'error: {split}:4: {tmp_path}/A/3.png cannot be read')
    assert check_pairs(tmp_path, split, 'unlabeled') == []            # unlabeled lists need no label


# ---- entry scripts, end to end ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy_cd(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('toy_cd')
    ensure_toy_cd(base / 'data', base / 'splits' / 'toy_cd', n_train=20, n_val=1, n_test=2)
    return {'base': base, 'overrides': FAST + [f'data_root={base / "data"}', f'splits_root={base / "splits"}']}


def test_train_evaluate_and_predict_on_the_toy(toy_cd, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    args = ['--config', CONFIG, '--split', '5%', '--save-path', str(run_dir)]
    unimatch_v2.main(args + toy_cd['overrides'] + ['epochs=1'])
    res = json.loads((run_dir / 'results.json').read_text())
    assert res['epochs'] == 1 and len(res['changed_iou']) == 1 and len(res['changed_iou_ema']) == 1
    entry = res['history'][0]
    for key in ('changed_iou', 'oa', 'unchanged_iou', 'precision', 'recall', 'f1', 'kappa'):
        assert 0.0 <= entry[key] <= 100.0 and 0.0 <= entry[f'{key}_ema'] <= 100.0 or key == 'kappa'
    assert res['reported'] == {'changed_iou': entry['changed_iou'], 'oa': entry['oa'], 'epoch': 0}
    assert 'changed IoU' in (run_dir / 'train.log').read_text()
    ckpt = torch.load(run_dir / 'best.pth', weights_only=True)
    assert ckpt['config']['teacher'] == 'online' and ckpt['model_ema'] is not None
    unimatch_v2.main(args + toy_cd['overrides'] + ['epochs=2'])           # resumes
    assert json.loads((run_dir / 'results.json').read_text())['epochs'] == 2

    capsys.readouterr()
    vis = tmp_path / 'vis'
    result = evaluate_script.main(['--config', CONFIG, '--checkpoint', str(run_dir / 'best.pth'),
                                   '--save-dir', str(vis)] + toy_cd['overrides'])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f'changed IoU: {result["changed_iou"]:.2f}'
    report = json.loads((run_dir / 'eval_original.json').read_text())
    assert report['weights'] == 'student' and report['n_images'] == 2 and report['split'].endswith('test.txt')
    assert sorted(p.name for p in vis.iterdir()) == ['side_by_side', 'test_0000.png', 'test_0001.png']
    mask = np.array(Image.open(vis / 'test_0000.png'))
    assert mask.shape == (112, 112) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(vis / 'side_by_side/test_0000.jpg').size == (4 * 112, 112)

    data = toy_cd['base'] / 'data'
    written = predict_script.main(['--config', CONFIG, '--checkpoint', str(run_dir / 'best.pth'), '--input',
                                   str(data / 'A'), str(data / 'B'), '--labels', str(data / 'label'),
                                   '--output', str(tmp_path / 'pred')] + toy_cd['overrides'])
    assert written == 23
    pred = np.array(Image.open(tmp_path / 'pred/test_0001.png'))
    assert pred.shape == (112, 112) and set(np.unique(pred)) <= {0, 255}
    assert Image.open(tmp_path / 'pred/test_0001_pair.jpg').size == (4 * 112, 112)


def test_released_change_checkpoint_loads(toy_cd, tmp_path, capsys):
    """The original's CD checkpoint layout: model / model_ema with `module.` keys and its own best keys."""
    from model.change_dpt import build_change_model
    torch.manual_seed(0)
    student, ema = build_change_model('dinov2_tiny'), build_change_model('dinov2_tiny')
    released = {'model': {f'module.{k}': v for k, v in student.state_dict().items()},
                'model_ema': {f'module.{k}': v for k, v in ema.state_dict().items()},
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 59, 'previous_best_iou': 83.2,
                'previous_best_acc': 99.1, 'previous_best_ema_iou': 83.0, 'previous_best_ema_acc': 99.0,
                'best_epoch': 46, 'best_epoch_ema': 59}
    torch.save(released, tmp_path / 'levir_5.pth')
    for weights in ('student', 'ema'):
        result = evaluate_script.main(['--config', CONFIG, '--checkpoint', str(tmp_path / 'levir_5.pth'),
                                       '--weights', weights, '--output-json', str(tmp_path / f'{weights}.json')]
                                      + toy_cd['overrides'])
        assert 0.0 <= result['oa'] <= 100.0
    assert re.fullmatch(r'changed IoU: \d+\.\d\d', capsys.readouterr().out.strip().splitlines()[-1])


def test_bad_pairs_stop_training_before_anything_is_written(toy_cd, tmp_path, capsys):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(toy_cd['base'] / 'data', data)
    labeled = (toy_cd['base'] / 'splits/toy_cd/5%/labeled.txt').read_text().split()
    (data / 'B' / labeled[0]).unlink()
    run_dir = tmp_path / 'run'
    with pytest.raises(SystemExit) as info:
        unimatch_v2.main(['--config', CONFIG, '--split', '5%', '--save-path', str(run_dir)] + toy_cd['overrides']
                         + [f'data_root={data}'])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f'5%/labeled.txt:1: {labeled[0]} is missing in B/' in err and 'nothing was written' in err
    assert not run_dir.exists()
