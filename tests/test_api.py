"""The Python API (segmenter.Segmenter), predict.py built on it, and hubconf.py through a local
mirror of the released files.

    python -m pytest tests/test_api.py -q
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict as predict_script
from dataset.transforms import normalize
from model.hub import CACHE_ENV, MIRROR_ENV, RELEASE_HOST
from model.dpt import build_model
from segmenter import Segmenter
from tests.test_export import training_checkpoint
from model.inference import predict
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
TOY = ['backbone=dinov2_tiny', 'pretrained=null', 'crop_size=28']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    """A training-layout toy checkpoint (student and EMA different) whose saved config evaluates in
    sliding windows."""
    return training_checkpoint(tmp_path_factory.mktemp('api') / 'best.pth', 'configs/toy.yaml',
                               TOY + ['eval_mode=sliding_window'])


def photo(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_is_the_evaluation_of_the_checkpoint(checkpoint, tmp_path):
    seg = Segmenter.from_checkpoint(checkpoint, device='cpu')      # no config: the checkpoint's own
    assert (seg.weights, seg.mode, seg.cfg.crop_size, seg.nclass) == ('ema', 'sliding_window', 28, 6)
    assert not seg.model.training
    arr = photo()
    Image.fromarray(arr).save(tmp_path / 'photo.png')
    ids, probs = seg.predict(arr, probabilities=True)
    assert ids.shape == (40, 60) and ids.dtype == np.int64 and probs.shape == (6, 40, 60)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    with torch.inference_mode():    # the evaluation's inference, by hand: windows of the crop
        ref = predict(seg.model, normalize(Image.fromarray(arr))[None], 'sliding_window', 28, 6).probs
    np.testing.assert_array_equal(ids, ref.argmax(1)[0].numpy())
    whole = predict(seg.model, normalize(Image.fromarray(arr))[None], 'original', 28, 6).probs
    assert (whole.argmax(1)[0].numpy() != ids).any()    # the mode matters on this image
    for same in (tmp_path / 'photo.png', str(tmp_path / 'photo.png'), Image.fromarray(arr),
                 Image.fromarray(arr).convert('RGBA')):
        np.testing.assert_array_equal(seg.predict(same), ids)
    student = Segmenter.from_checkpoint(checkpoint, weights='student', device='cpu')
    assert (student.predict(arr) != ids).any()
    gray = seg.predict(arr[..., 0])
    assert gray.shape == (40, 60)
    with pytest.raises(ValueError, match='uint8'):
        seg.predict(arr.astype(np.float32))


def test_change_detection_takes_the_two_dates(tmp_path):
    ckpt = training_checkpoint(tmp_path / 'cd.pth', 'configs/toy_cd.yaml', ['pretrained=null', 'crop_size=28'])
    seg = Segmenter.from_checkpoint(ckpt, device='cpu')
    a, b = photo(seed=1), photo(seed=2)
    ids = seg.predict(a, b)
    assert seg.weights == 'student' and ids.shape == (40, 60) and set(np.unique(ids)) <= {0, 1}
    with pytest.raises(ValueError, match='2 image'):
        seg.predict(a)
    with pytest.raises(ValueError, match='one size'):
        seg.predict(a, photo(30, 60))


# ---- predict.py's errors (issue 27) ---------------------------------------------------------------

def run_predict(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        predict_script.main(list(args))
    return info.value.code, capsys.readouterr().err


def test_predict_script_without_config_and_its_errors(checkpoint, tmp_path, capsys):
    images = tmp_path / 'in'
    images.mkdir()
    Image.fromarray(photo()).save(images / 'a.jpg')
    out = tmp_path / 'out'
    assert predict_script.main(['--checkpoint', str(checkpoint), '--input', str(images), '--output', str(out)]) == 1
    assert Image.open(out / 'a.png').size == (60, 40)
    capsys.readouterr()

    code, err = run_predict(capsys, '--checkpoint', str(tmp_path / 'nope.pth'), '--input', str(images),
                            '--output', str(tmp_path / 'o1'))
    assert code == 1 and err.strip().splitlines() == [f'error: checkpoint {tmp_path / "nope.pth"} does not exist']
    code, err = run_predict(capsys, '--checkpoint', str(ROOT / 'configs/toy.yaml'), '--input', str(images),
                            '--output', str(tmp_path / 'o2'))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert 'toy.yaml is not a checkpoint' in err and 'could run code' not in err and '--config' in err
    empty, text_only = tmp_path / 'empty', tmp_path / 'text'
    empty.mkdir()
    text_only.mkdir()
    (text_only / 'notes.txt').write_text('not an image')
    for folder in (empty, text_only):
        code, err = run_predict(capsys, '--checkpoint', str(checkpoint), '--input', str(folder),
                                '--output', str(tmp_path / 'o3'))
        assert code == 'error: no image to predict in ' + str(folder)     # SystemExit(message): status 1
        assert not (tmp_path / 'o3').exists()
    assert not any((tmp_path / name).exists() for name in ('o1', 'o2'))


# ---- hubconf.py through a file:// mirror of the released files -----------------------------------

def test_torch_hub_loads_a_released_name_from_a_mirror(tmp_path, monkeypatch):
    name = 'pascal_unimatch_v2_92labels_dinov2_small'
    torch.manual_seed(0)
    model = build_model('dinov2_small', 21)        # the name's encoder and Pascal's classes, random init
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    mirror = tmp_path / 'mirror'
    path = mirror / urlsplit(RELEASE_HOST).path.lstrip('/') / f'{name}.pth'
    path.parent.mkdir(parents=True)
    torch.save({'model': state, 'model_ema': state, 'epoch': 59, 'previous_best': 0.0}, path)
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))

    seg = torch.hub.load(str(ROOT), 'unimatch_v2', name='pascal_92_dinov2_small', source='local', device='cpu')
    assert isinstance(seg, Segmenter)
    assert (seg.cfg.dataset, seg.cfg.backbone, seg.nclass, seg.mode) == ('pascal', 'dinov2_small', 21, 'original')
    assert (tmp_path / 'cache' / f'{name}.pth').is_file()
    for key, value in model.state_dict().items():
        assert torch.equal(seg.model.state_dict()[key], value), key
    ids = seg.predict(photo(30, 44))
    assert ids.shape == (30, 44) and ids.max() < 21
    full = torch.hub.load(str(ROOT), 'unimatch_v2', name=name, source='local', device='cpu')
    np.testing.assert_array_equal(full.predict(photo(30, 44)), ids)
    with pytest.raises(FileNotFoundError, match='pascal_unimatch_v2_92labels_dinov2_base'):
        torch.hub.load(str(ROOT), 'unimatch_v2', name='pascal_93_dinov2_small', source='local')
