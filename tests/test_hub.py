"""Weights on demand (model/hub.py) without a network: a local `file://` mirror stands in for the
official hosts (SEMISEG_MIRROR), an empty one for a machine without network."""
from pathlib import Path

import pytest
import torch

import evaluate as evaluate_script
import unimatch_v2
from model import build_model
from model import hub
from model.loading import WeightsMismatchError

ROOT = Path(__file__).resolve().parents[1]
TINY_URL = f'{hub.DINOV2_HOST}/dinov2_vitt14/dinov2_vitt14_pretrain.pth'   # a stand-in official file
NCLASS = 6   # the toy's classes


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """An empty cache and an empty mirror, the working directory without pretrained/, and the
    tiny encoder given an 'official' address (only the mirror ever serves it)."""
    cache, mirror = tmp_path / 'cache', tmp_path / 'mirror'
    mirror.mkdir()
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    monkeypatch.setenv(hub.MIRROR_ENV, mirror.as_uri())
    monkeypatch.setitem(hub.DINOV2_WEIGHTS, 'dinov2_tiny', hub.Remote(TINY_URL))
    return {'cache': cache, 'mirror': mirror}


def publish(mirror: Path, url: str, obj) -> Path:
    """Put `obj` on the mirror where `url`'s file would be."""
    path = mirror / hub.urlsplit(url).path.lstrip('/')
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model('dinov2_tiny', NCLASS).backbone.state_dict()


def no_download(*args, **kwargs):
    raise AssertionError('downloaded although the file was already there')


def test_missing_encoder_error_says_which_file_to_put_where(offline):
    with pytest.raises(hub.WeightsUnavailableError) as err:
        hub.encoder_file('dinov2_small', verify=no_download, progress=False)
    message = str(err.value)
    print(message)
    assert 'dinov2_vits14_pretrain.pth' in message
    assert 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth' in message
    assert str(Path('pretrained/dinov2_small.pth')) in message and str(offline['cache']) in message
    assert not list(offline['cache'].glob('*.pth')) and not list(offline['cache'].glob('.*.tmp'))


def test_encoder_is_fetched_once_from_the_mirror_and_loads(offline, monkeypatch):
    state = encoder_state(seed=1)
    publish(offline['mirror'], TINY_URL, state)
    model = build_model('dinov2_tiny', NCLASS)
    path = hub.load_pretrained(model, 'auto', 'dinov2_tiny', progress=False)
    assert path == offline['cache'] / 'dinov2_vitt14_pretrain.pth' and path.is_file()
    for key, value in state.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert [p.name for p in offline['cache'].iterdir() if not p.name.endswith('.lock')] == [path.name]

    monkeypatch.setattr(hub.torch.hub, 'download_url_to_file', no_download)
    assert hub.load_pretrained(build_model('dinov2_tiny', NCLASS), 'auto', 'dinov2_tiny') == path


def test_pretrained_dir_comes_before_the_cache(offline, monkeypatch):
    monkeypatch.setattr(hub.torch.hub, 'download_url_to_file', no_download)
    Path('pretrained').mkdir()
    torch.save(encoder_state(), 'pretrained/dinov2_tiny.pth')
    assert hub.load_pretrained(build_model('dinov2_tiny', NCLASS), 'auto', 'dinov2_tiny') == \
        Path('pretrained/dinov2_tiny.pth')


def test_download_that_does_not_load_strictly_is_not_kept(offline):
    state = encoder_state()
    state['blocks.0.attn.qkv.weight'] = state['blocks.0.attn.qkv.weight'][:, :7]
    publish(offline['mirror'], TINY_URL, state)
    with pytest.raises(WeightsMismatchError, match='shape mismatch backbone.blocks.0.attn.qkv.weight'):
        hub.load_pretrained(build_model('dinov2_tiny', NCLASS), 'auto', 'dinov2_tiny', progress=False)
    assert sorted(p.name for p in offline['cache'].iterdir()) == ['.dinov2_vitt14_pretrain.pth.lock']


def test_download_with_the_wrong_sha256_is_not_kept(offline, monkeypatch):
    publish(offline['mirror'], TINY_URL, encoder_state())
    monkeypatch.setitem(hub.DINOV2_WEIGHTS, 'dinov2_tiny', hub.Remote(TINY_URL, sha256='0' * 64))
    with pytest.raises(WeightsMismatchError, match='SHA-256 .* differs from the published 0000'):
        hub.load_pretrained(build_model('dinov2_tiny', NCLASS), 'auto', 'dinov2_tiny', progress=False)
    assert not list(offline['cache'].glob('*.pth')) and not list(offline['cache'].glob('.*.tmp'))


class Payload:
    """Unpickling this would build an object of a class: code a weights-only load refuses to run."""


def test_download_carrying_code_is_refused_and_not_kept(offline):
    publish(offline['mirror'], TINY_URL, {'pos_embed': Payload()})
    with pytest.raises(Exception, match='refused to load'):
        hub.load_pretrained(build_model('dinov2_tiny', NCLASS), 'auto', 'dinov2_tiny', progress=False)
    assert not list(offline['cache'].glob('*.pth'))


# ---- end to end: training and evaluation from names ------------------------------------------------

def train_argv(toy: list[str], run_dir: Path, extra: list[str]) -> list[str]:
    return (['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
            + toy + ['epochs=1', 'max_iters_per_epoch=1'] + extra)


def test_training_without_the_encoder_stops_with_the_message(offline, toy, capsys):
    with pytest.raises(SystemExit) as exit_:
        unimatch_v2.main(train_argv(toy, Path('run'), ['pretrained=auto']))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    print(err)
    assert 'the dinov2_tiny encoder (dinov2_vitt14_pretrain.pth) is not on disk and could not be downloaded' in err
    assert not Path('run/latest.pth').exists()


def test_training_with_the_encoder_from_the_mirror(offline, toy, capsys):
    publish(offline['mirror'], TINY_URL, encoder_state())
    unimatch_v2.main(train_argv(toy, Path('run'), ['pretrained=auto']))
    log = Path('run/train.log').read_text()
    assert f'loaded pretrained weights {offline["cache"] / "dinov2_vitt14_pretrain.pth"}' in log
    assert Path('run/latest.pth').is_file()


RELEASED_NAME = 'toy_unimatch_v2_1_16labels_dinov2_tiny'


@pytest.fixture
def released(offline, monkeypatch) -> dict:
    """A released-format checkpoint of the tiny model on the mirror, listed under RELEASED_NAME."""
    monkeypatch.setitem(hub.RELEASED, RELEASED_NAME, hub.Released('toy', '1_16', 'dinov2_tiny', confirmed=True))
    torch.manual_seed(3)
    state = {f'module.{k}': v for k, v in build_model('dinov2_tiny', NCLASS).state_dict().items()}
    url = hub.released_remote(RELEASED_NAME).url
    assert url == 'https://huggingface.co/LiheYoung/UniMatch-V2/resolve/main/toy_unimatch_v2_1_16labels_dinov2_tiny.pth'
    publish(offline['mirror'], url, {'model': state, 'model_ema': state, 'epoch': 59})
    return {**offline, 'state': state}


def test_list_released_prints_the_names(capsys):
    evaluate_script.main(['--list-released'])
    out = capsys.readouterr().out
    assert 'pascal_unimatch_v2_92labels_dinov2_base' in out and 'coco_unimatch_v2_1_512labels_dinov2_base' in out
    assert len(out.splitlines()) == 1 + len(hub.RELEASED) + 1      # header, names, legend


def test_evaluate_a_released_checkpoint_by_name(released, toy, toy_root, monkeypatch):
    argv = ['--config', str(ROOT / 'configs/toy.yaml'), '--checkpoint', f'released:{RELEASED_NAME}',
            '--split', str(toy_root / 'splits/toy/val.txt'), '--output-json', 'eval.json'] + toy
    result = evaluate_script.main(argv)
    assert 0 <= result['miou'] <= 100
    assert (released['cache'] / f'{RELEASED_NAME}.pth').is_file()
    monkeypatch.setattr(hub.torch.hub, 'download_url_to_file', no_download)
    assert evaluate_script.main(argv)['miou'] == result['miou']


def test_fine_tune_from_a_released_checkpoint(released, toy):
    unimatch_v2.main(train_argv(toy, Path('run'), [f'pretrained=released:{RELEASED_NAME}']))
    assert 'loaded pretrained weights' in Path('run/train.log').read_text()


def test_unknown_released_name_lists_the_names(offline):
    with pytest.raises(hub.WeightsUnavailableError, match=r"no released checkpoint 'pascal_93'(.|\n)*pascal_unimatch_v2_92labels_dinov2_base"):
        hub.released_file('released:pascal_93')


def test_concurrent_processes_share_one_download(offline, monkeypatch):
    """Two loaders at once (as torchrun ranks start): one downloads, the other waits for its file."""
    import threading
    import time
    publish(offline['mirror'], TINY_URL, encoder_state())
    real, calls = hub.torch.hub.download_url_to_file, []

    def slow_download(url, dst, progress=True):
        calls.append(url)
        time.sleep(0.5)
        real(url, dst, progress=False)

    monkeypatch.setattr(hub.torch.hub, 'download_url_to_file', slow_download)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(hub.encoder_file('dinov2_tiny', lambda tmp: None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
