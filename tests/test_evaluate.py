"""evaluate(): one process vs two; the centre-crop mode against hand-made crops; evaluate.py end
to end on a released-format checkpoint; predict.py on odd images."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import evaluate as evaluate_script
import predict as predict_script
from model import build_model
from tests.distributed import run_processes
from tasks.evaluation import evaluate, format_iou_table

NCLASS = 3


class PixelStub(nn.Module):
    """Logits channel k = k * x[:, 0]: a deterministic per-pixel classifier with no weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(NCLASS, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return k * x[:, :1]


class FiveImages(torch.utils.data.Dataset):
    """5 validation items of different sizes (5 does not divide by 2 processes)."""
    SIZES = [(20, 30), (28, 28), (15, 40), (33, 21), (14, 14)]

    def __len__(self) -> int:
        return len(self.SIZES)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        h, w = self.SIZES[i]
        mask = torch.randint(0, NCLASS, (h, w), generator=g)
        mask[torch.rand(h, w, generator=g) < 0.2] = 255
        return {'image': torch.randn(3, h, w, generator=g), 'mask': mask, 'name': f'img{i}'}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread start/sync costs that dominate on a
    loaded 2-core machine (10x slower end-to-end tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval_worker(rank: int, out_dir: str) -> None:
    result = evaluate(PixelStub(), FiveImages(), NCLASS, 'original', 14, progress=False)
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps(result))


def test_two_processes_match_one(tmp_path):
    single = evaluate(PixelStub(), FiveImages(), NCLASS, 'original', 14, progress=False)
    assert single['n_images'] == 5
    run_processes(_eval_worker, tmp_path)
    for rank in (0, 1):
        both = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert both['n_images'] == 5  # a padding sampler would count one image twice
        assert both['confusion'] == single['confusion']
        assert both['miou'] == pytest.approx(single['miou'])
    assert 0 < single['miou'] < 100
    table = format_iou_table(single['iou'], ['a', 'b', 'c'])
    assert table.splitlines()[-1].split()[-1] == f'{single["miou"]:.2f}'


class CentreCrops(torch.utils.data.Dataset):
    """The items of `FiveImages`, image and mask cut to their centre crop by hand, as the original
    crops both: offsets (side - crop) // 2, an axis shorter than the crop kept whole."""

    def __init__(self, crop: int):
        self.items, self.crop = FiveImages(), crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        h, w = item['mask'].shape
        ch, cw = min(self.crop, h), min(self.crop, w)
        top, left = (h - ch) // 2, (w - cw) // 2
        return {'image': item['image'][:, top:top + ch, left:left + cw],
                'mask': item['mask'][top:top + ch, left:left + cw], 'name': item['name']}


@pytest.mark.parametrize('crop', [14, 28])
def test_centre_crop_mode_scores_the_crop_only(crop):
    """evaluate(mode='center_crop') on the whole images counts exactly the pixels that the
    whole-image mode counts on their centre crops: nothing outside the crop enters the matrix."""
    cropped = evaluate(PixelStub(), CentreCrops(crop), NCLASS, 'original', crop, progress=False)
    centre = evaluate(PixelStub(), FiveImages(), NCLASS, 'center_crop', crop, progress=False)
    assert centre['confusion'] == cropped['confusion'] and centre['miou'] == cropped['miou']
    whole = evaluate(PixelStub(), FiveImages(), NCLASS, 'original', crop, progress=False)
    assert sum(map(sum, centre['confusion'])) < sum(map(sum, whole['confusion']))


# ---- evaluate.py / predict.py end to end ------------------------------------------------------

@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    """A tmp dataset of 3 images + masks, a config and a released-format checkpoint."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate([(30, 40), (50, 36), (28, 28)]):
        (root / 'img').mkdir(exist_ok=True)
        (root / 'ann').mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f'img/{i}.jpg')
        mask = rng.integers(0, NCLASS, (h, w), dtype=np.uint8)
        mask[:3] = 255
        Image.fromarray(mask).save(root / f'ann/{i}.png')
        lines.append(f'img/{i}.jpg ann/{i}.png')
    (root / 'val.txt').write_text('\n'.join(lines) + '\n')
    cfg = {'dataset': 'custom', 'data_root': str(root), 'nclass': NCLASS, 'crop_size': 28,
           'backbone': 'dinov2_tiny', 'pretrained': None, 'num_workers': 0}
    (root / 'cfg.yaml').write_text(yaml.safe_dump(cfg))

    torch.manual_seed(0)
    student, ema = build_model('dinov2_tiny', NCLASS), build_model('dinov2_tiny', NCLASS)
    released = {'model': {f'module.{k}': v for k, v in student.state_dict().items()},
                'model_ema': {f'module.{k}': v for k, v in ema.state_dict().items()},
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 3, 'previous_best': 1.0}
    ckpt = root / 'run' / 'latest.pth'
    ckpt.parent.mkdir()
    torch.save(released, ckpt)
    return root


def test_evaluate_script_on_released_checkpoint(toy_run, capsys):
    root = toy_run
    args = ['--config', str(root / 'cfg.yaml'), '--checkpoint', str(root / 'run/latest.pth'),
            '--split', str(root / 'val.txt'), '--save-dir', str(root / 'vis')]
    result = evaluate_script.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r'mIoU: \d+\.\d\d', lines[-1])
    assert lines[-1] == f'mIoU: {result["miou"]:.2f}'
    report = json.loads((root / 'run/eval_original.json').read_text())
    assert report['weights'] == 'ema' and report['n_images'] == 3
    assert list(report['iou']) == ['class_0', 'class_1', 'class_2']
    assert report['miou'] == pytest.approx(result['miou'])
    for i, (h, w) in enumerate([(30, 40), (50, 36), (28, 28)]):
        png = Image.open(root / f'vis/{i}.png')
        assert png.mode == 'P' and png.size == (w, h)
        assert np.array(png).max() < NCLASS
        assert Image.open(root / f'vis/side_by_side/{i}.jpg').size == (3 * w, h)

    out = root / 'sw.json'
    evaluate_script.main(args[:6] + ['--weights', 'student', '--mode', 'sliding_window', '--flip',
                                     '--scales', '0.75,1.0', '--output-json', str(out)])
    report = json.loads(out.read_text())
    assert (report['weights'], report['mode'], report['flip'], report['scales']) == \
        ('student', 'sliding_window', True, [0.75, 1.0])
    assert re.fullmatch(r'mIoU: \d+\.\d\d', capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_script_refuses_a_checkpoint_for_another_class_count(toy_run, tmp_path, capsys):
    ckpt = torch.load(toy_run / 'run/latest.pth', weights_only=True)
    ckpt['config'] = {'nclass': 5, 'backbone': 'dinov2_tiny'}
    torch.save(ckpt, tmp_path / 'other.pth')
    with pytest.raises(SystemExit) as info:
        evaluate_script.main(['--config', str(toy_run / 'cfg.yaml'), '--checkpoint',
                              str(tmp_path / 'other.pth'), '--split', str(toy_run / 'val.txt')])
    assert info.value.code == 1
    assert re.search(r'error: .*nclass=5.*nclass=3', capsys.readouterr().err)


def test_predict_on_odd_images(toy_run, tmp_path, capsys):
    src = tmp_path / 'in'
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(src / 'gray.png')
    Image.fromarray(rng.integers(0, 256, (25, 35, 4), dtype=np.uint8)).save(src / 'rgba.png')
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(src / 'tiny.jpg')
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(src / 'large.jpg')
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).convert('P').save(src / 'pal.gif')
    Image.fromarray(rng.integers(0, 65535, (16, 18), dtype=np.uint16)).save(src / 'deep.png')
    (src / 'notes.txt').write_text('not an image')
    out = tmp_path / 'out'
    written = predict_script.main(['--config', str(toy_run / 'cfg.yaml'), '--checkpoint',
                                   str(toy_run / 'run/latest.pth'), '--input', str(src),
                                   '--output', str(out)])
    assert written == 6
    assert 'notes.txt' in capsys.readouterr().err
    for stem, (w, h) in {'gray': (30, 40), 'rgba': (35, 25), 'tiny': (10, 10), 'large': (500, 300),
                         'pal': (24, 20), 'deep': (18, 16)}.items():
        png = Image.open(out / f'{stem}.png')
        assert png.mode == 'P' and png.size == (w, h) and np.array(png).max() < NCLASS
        assert Image.open(out / f'{stem}_overlay.jpg').size == (w, h)
