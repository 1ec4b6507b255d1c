"""The original's published files by their real names (model/hub.py RELEASED): the address each
kind of name gives, and the whole path -- evaluate.py, predict.py, fine-tuning from
`pretrained=released:<name>`, tools/prepare_data.py fetching LEVIR-CD.zip -- through local
mirrors that hold files under exactly the repository's names (`5%labels` with its `%`): an
http://127.0.0.1 server and a file:// folder, in place of the official host (SEMISEG_MIRROR).

    python -m pytest tests/test_released.py -q
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_script
import predict as predict_script
import unimatch_v2
from dataset.toy_cd import ensure_toy_cd
from model import build_model, hub
from model.change_dpt import build_change_model
from tools import prepare_data

ROOT = Path(__file__).resolve().parents[1]
HF = 'https://huggingface.co/LiheYoung/UniMatch-V2/resolve/main'
REPO_PATH = 'LiheYoung/UniMatch-V2/resolve/main'      # the official URL's path, kept under a mirror

# The names of the repository's "Upload checkpoints" commit (its listing cut off after whu) and the
# ADE20K checkpoint of the original's issue #17.
LISTED = ([f'pascal_unimatch_v2_{n}labels_dinov2_{e}' for n in (92, 183, 366, 732, 1464)
           for e in ('small', 'base', 'large')]
          + [f'levir_cd_unimatch_v2_{p}%labels_dinov2_{e}' for p in (5, 10, 20, 40) for e in ('small', 'base')]
          + [f'whu_cd_unimatch_v2_{p}%labels_dinov2_{e}' for p in (20, 40) for e in ('small', 'base')]
          + ['ade20k_unimatch_v2_1_16labels_dinov2_base'])


# ---- names and addresses ---------------------------------------------------------------------------

@pytest.mark.parametrize('name, url, confirmed', [
    ('pascal_unimatch_v2_92labels_dinov2_base', f'{HF}/pascal_unimatch_v2_92labels_dinov2_base.pth', True),
    ('pascal_unimatch_v2_1464labels_dinov2_large', f'{HF}/pascal_unimatch_v2_1464labels_dinov2_large.pth', True),
    ('levir_cd_unimatch_v2_5%labels_dinov2_base', f'{HF}/levir_cd_unimatch_v2_5%25labels_dinov2_base.pth', True),
    ('whu_cd_unimatch_v2_40%labels_dinov2_small', f'{HF}/whu_cd_unimatch_v2_40%25labels_dinov2_small.pth', True),
    ('ade20k_unimatch_v2_1_16labels_dinov2_base', f'{HF}/ade20k_unimatch_v2_1_16labels_dinov2_base.pth', True),
    ('cityscapes_unimatch_v2_1_16labels_dinov2_base', f'{HF}/cityscapes_unimatch_v2_1_16labels_dinov2_base.pth', False),
    ('coco_unimatch_v2_1_512labels_dinov2_small', f'{HF}/coco_unimatch_v2_1_512labels_dinov2_small.pth', False),
])
def test_url_of_each_kind_of_name(name, url, confirmed):
    remote = hub.released_remote(name)
    assert remote.url == url
    assert remote.filename == f'{name}.pth'            # the name on disk keeps its '%'
    assert hub.RELEASED[name].confirmed is confirmed


def test_every_listed_name_is_confirmed_and_only_those():
    assert sorted(n for n, r in hub.RELEASED.items() if r.confirmed) == sorted(LISTED)
    assert hub.RELEASED['levir_cd_unimatch_v2_10%labels_dinov2_small'].dataset == 'levir'
    assert {r.dataset for r in hub.RELEASED.values()} == {'pascal', 'cityscapes', 'ade20k', 'coco', 'levir', 'whu'}


def test_listing_says_which_names_are_confirmed(capsys):
    predict_script.main(['--list-released'])
    lines = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert lines['pascal_unimatch_v2_92labels_dinov2_base'] == 'confirmed'
    assert lines['levir_cd_unimatch_v2_5%labels_dinov2_base'] == 'confirmed'
    assert lines['cityscapes_unimatch_v2_1_2labels_dinov2_base'] == 'pattern'
    assert len(lines) == len(hub.RELEASED)


# ---- mirrors ----------------------------------------------------------------------------------------

def mirrored(root: Path, filename: str) -> Path:
    """Where a mirror keeps the repository's file `filename` (its real name, unescaped)."""
    path = root / REPO_PATH / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.chdir(tmp_path)
    return tmp_path / 'cache'


@pytest.fixture
def http_mirror(tmp_path, monkeypatch):
    """An http://127.0.0.1 server over a folder, set as SEMISEG_MIRROR; yields (folder, requested paths)."""
    root, requests = tmp_path / 'http_mirror', []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(hub.MIRROR_ENV, f'http://127.0.0.1:{server.server_address[1]}')
    yield root, requests
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def file_mirror(tmp_path, monkeypatch) -> Path:
    root = tmp_path / 'file_mirror'
    root.mkdir()
    monkeypatch.setenv(hub.MIRROR_ENV, root.as_uri())
    return root


def released_format(model: torch.nn.Module) -> dict:
    """The original's checkpoint layout: DDP-prefixed model and EMA states and its counters."""
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    return {'model': state, 'model_ema': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 59,
            'previous_best': 86.3, 'previous_best_ema': 86.2, 'best_epoch': 50, 'best_epoch_ema': 57}


# ---- segmentation through an http mirror ---------------------------------------------------------------

def test_segmentation_checkpoint_by_name_through_an_http_mirror(http_mirror, cache, toy, toy_root, tmp_path):
    root, requests = http_mirror
    name = 'pascal_unimatch_v2_92labels_dinov2_base'
    torch.manual_seed(0)
    torch.save(released_format(build_model('dinov2_tiny', 6)), mirrored(root, f'{name}.pth'))
    config = str(ROOT / 'configs/toy.yaml')

    result = evaluate_script.main(['--config', config, '--checkpoint', f'released:{name}', '--split',
                                   str(toy_root / 'splits/toy/val.txt'), '--output-json', 'eval.json'] + toy)
    assert 0 <= result['miou'] <= 100 and json.loads(Path('eval.json').read_text())['weights'] == 'ema'
    assert (cache / f'{name}.pth').is_file() and requests == [f'/{REPO_PATH}/{name}.pth']

    image = toy_root / 'data/images/val_00000.jpg'
    assert predict_script.main(['--config', config, '--checkpoint', f'released:{name}', '--input', str(image),
                                '--output', str(tmp_path / 'pred')] + toy) == 1
    unimatch_v2.main(['--config', config, '--split', '1_16', '--save-path', str(tmp_path / 'run')] + toy
                     + ['epochs=1', 'max_iters_per_epoch=1', f'pretrained=released:{name}'])
    assert f'loaded pretrained weights {cache / f"{name}.pth"}' in (tmp_path / 'run/train.log').read_text()
    assert len(requests) == 1                  # fetched once, then taken from the cache


def test_missing_pattern_name_says_it_is_a_guess(http_mirror, cache):
    name = 'cityscapes_unimatch_v2_1_16labels_dinov2_base'
    with pytest.raises(hub.WeightsUnavailableError) as err:
        hub.released_file(f'released:{name}', progress=False)
    message = str(err.value)
    assert f'{HF}/{name}.pth' in message and 'not seen in its listing' in message
    assert not list(cache.glob('*.pth'))


# ---- change detection through a file:// mirror, '%' in the name ---------------------------------------

CD_FAST = ['crop_size=42', 'batch_size=2', 'max_iters_per_epoch=1', 'log_interval=1', 'num_workers=0',
           'pretrained=null', 'precision=fp32', 'epochs=1']


def test_change_detection_checkpoint_by_name_through_a_file_mirror(file_mirror, cache, tmp_path):
    base = tmp_path / 'toy_cd'
    ensure_toy_cd(base / 'data', base / 'splits' / 'toy_cd', n_train=20, n_val=1, n_test=2)
    overrides = CD_FAST + [f'data_root={base / "data"}', f'splits_root={base / "splits"}']
    config = str(ROOT / 'configs/toy_cd.yaml')
    name = 'levir_cd_unimatch_v2_5%labels_dinov2_small'
    torch.manual_seed(0)
    path = mirrored(file_mirror, f'{name}.pth')
    torch.save(released_format(build_change_model('dinov2_tiny')), path)
    assert path.name == 'levir_cd_unimatch_v2_5%labels_dinov2_small.pth'

    result = evaluate_script.main(['--config', config, '--checkpoint', f'released:{name}',
                                   '--output-json', 'eval.json'] + overrides)
    assert 0 <= result['changed_iou'] <= 100 and 0 <= result['oa'] <= 100
    assert (cache / f'{name}.pth').read_bytes() == path.read_bytes()

    pair = tmp_path / 'pair'
    for folder in ('A', 'B'):
        (pair / folder).mkdir(parents=True)
        (pair / folder / 'test_0000.png').write_bytes((base / 'data' / folder / 'test_0000.png').read_bytes())
    assert predict_script.main(['--config', config, '--checkpoint', f'released:{name}', '--input',
                                str(pair / 'A'), str(pair / 'B'), '--output', str(tmp_path / 'pred')] + overrides) == 1
    unimatch_v2.main(['--config', config, '--split', '5%', '--save-path', str(tmp_path / 'run')] + overrides
                     + [f'pretrained=released:{name}'])
    assert f'loaded pretrained weights {cache / f"{name}.pth"}' in (tmp_path / 'run/train.log').read_text()


# ---- tools/prepare_data.py fetches the original's zip ----------------------------------------------------

def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


def test_prepare_data_fetches_the_published_zip(http_mirror, tmp_path, capsys):
    root, requests = http_mirror
    tiles = ['train_1_1.png', 'train_1_2.png', 'test_7_16.png']
    label = np.zeros((8, 8), np.uint8)
    label[2:5, 2:6] = 255
    with zipfile.ZipFile(mirrored(root, 'LEVIR-CD.zip'), 'w') as zf:
        for i, tile in enumerate(tiles):
            zf.writestr(f'LEVIR-CD/A/{tile}', png(np.full((8, 8, 3), i)))
            zf.writestr(f'LEVIR-CD/B/{tile}', png(np.full((8, 8, 3), 2 * i)))
            zf.writestr(f'LEVIR-CD/label/{tile}', png(label))
    splits = tmp_path / 'splits'
    for rel, names in {'5%/labeled.txt': tiles[:1], '5%/unlabeled.txt': tiles[1:2], 'test.txt': tiles[2:]}.items():
        (splits / rel).parent.mkdir(parents=True, exist_ok=True)
        (splits / rel).write_text(''.join(f'{n}\n' for n in names))
    dst = tmp_path / 'data/levir'

    assert prepare_data.main(['levir', '--dst', str(dst), '--splits', str(splits)]) == 0, capsys.readouterr().err
    assert requests == [f'/{REPO_PATH}/LEVIR-CD.zip']
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob('*') if p.is_file()) == \
        sorted(f'{folder}/{tile}' for folder in ('A', 'B', 'label') for tile in tiles)
    np.testing.assert_array_equal(np.array(Image.open(dst / 'label' / tiles[0])), label)


def test_prepare_data_without_the_zip_names_the_address(http_mirror, tmp_path, capsys):
    assert prepare_data.main(['whu', '--dst', str(tmp_path / 'whu')]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the original's WHU-CD.zip is not on disk and could not be downloaded")
    assert f'download {HF}/WHU-CD.zip on another machine' in err
    assert not list((tmp_path / 'whu').rglob('*.zip'))
    assert prepare_data.main(['pascal', '--dst', str(tmp_path / 'pascal')]) == 1
    assert 'pascal needs --src: VOCtrainval_11-May-2012.tar and SBD benchmark.tgz' in capsys.readouterr().err
