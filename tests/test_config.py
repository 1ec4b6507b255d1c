"""Config (engine/config.py; loading in util/config.py): every shipped config loads and holds the paper's values; unknown keys,
wrong types and invalid choices are errors naming the key; `key=value` overrides; save/load round trip;
an original UniMatch V2 config loads unchanged.

    python -m pytest tests/test_config.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest

from util.config import ConfigError, save_config
from engine.config import Config, from_dict, load_config
from util.losses import build_criterion

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
CONFIG_FILES = sorted(CONFIGS.glob('*.yaml'))

# The original release's configs/pascal.yaml, verbatim apart from the data path.
ORIGINAL_PASCAL = """\
# arguments for dataset
dataset: pascal
nclass: 21
crop_size: 518
data_root: Your/Pascal/Path

# arguments for training
epochs: 60
batch_size: 4 # per GPU x 4 GPUs
lr: 0.000005
lr_multi: 40.0
criterion:
  name: CELoss
  kwargs:
    ignore_index: 255
conf_thresh: 0.95

# arguments for model
model: dpt
backbone: dinov2_small
lock_backbone: False
"""


def write(tmp_path: Path, text: str, name: str = 'c.yaml') -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_there_are_configs():
    names = {p.stem for p in CONFIG_FILES}
    assert {'pascal', 'cityscapes', 'ade20k', 'coco'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    build_criterion(cfg.criterion.name, cfg.criterion.kwargs)   # its criterion kwargs fit the loss


# The paper's recipe (UNIMATCH_V2_FACTS.md §1).
PAPER = {
    'pascal': dict(nclass=21, crop_size=518, epochs=60, batch_size=4, criterion='CELoss'),
    'cityscapes': dict(nclass=19, crop_size=798, epochs=180, batch_size=2, criterion='OHEM'),
    'ade20k': dict(nclass=150, crop_size=518, epochs=60, batch_size=2, criterion='CELoss'),
    'coco': dict(nclass=81, crop_size=518, epochs=20, batch_size=4, criterion='CELoss'),
}


@pytest.mark.parametrize('dataset', sorted(PAPER))
def test_dataset_configs_hold_the_papers_values(dataset):
    cfg = load_config(CONFIGS / f'{dataset}.yaml')
    want = PAPER[dataset]
    assert cfg.dataset == dataset
    assert (cfg.nclass, cfg.crop_size, cfg.epochs, cfg.batch_size) == (
        want['nclass'], want['crop_size'], want['epochs'], want['batch_size'])
    assert cfg.lr == pytest.approx(5e-6) and cfg.lr_multi == 40.0
    assert cfg.conf_thresh == 0.95
    assert cfg.criterion.name == want['criterion']
    assert cfg.criterion.kwargs.get('ignore_index', 255) == 255
    if dataset == 'cityscapes':
        assert cfg.criterion.kwargs['thresh'] == 0.7 and cfg.criterion.kwargs['min_kept'] == 200000
    assert cfg.lock_backbone is False
    assert cfg.method == 'unimatch_v2' and cfg.ema_decay == 0.996 and cfg.weight_decay == 0.01
    assert cfg.reference_gpus == 4 and cfg.lossu_weight == 1.0


def test_original_config_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, ORIGINAL_PASCAL))
    assert cfg.dataset == 'pascal' and cfg.nclass == 21 and cfg.crop_size == 518
    assert cfg.data_root == 'Your/Pascal/Path'
    assert cfg.epochs == 60 and cfg.batch_size == 4
    assert cfg.lr == 5e-6 and cfg.lr_multi == 40.0
    assert cfg.criterion.name == 'CELoss' and cfg.criterion.kwargs == {'ignore_index': 255}
    assert cfg.conf_thresh == 0.95
    assert cfg.model == 'dpt' and cfg.backbone == 'dinov2_small' and cfg.lock_backbone is False


# ---- errors name the key ------------------------------------------------------------------------------

def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match='learning_rate'):
        load_config(write(tmp_path, ORIGINAL_PASCAL + 'learning_rate: 0.1\n'))
    with pytest.raises(ConfigError, match='no_such_key'):
        load_config(CONFIGS / 'pascal.yaml', ['no_such_key=1'])


def test_criterion_with_unknown_field_is_an_error(tmp_path):
    text = ORIGINAL_PASCAL.replace('  name: CELoss\n', '  name: CELoss\n  weight: 2\n')
    with pytest.raises(ConfigError, match='criterion'):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize('key, value', [
    ('epochs', 'ten'),
    ('epochs', '1.5'),           # float for an int key
    ('epochs', 'true'),          # bool is not an int
    ('lock_backbone', '3'),
    ('lr', 'fast'),
    ('conf_thresh', '[0.9]'),
    ('dataset', '7'),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / 'pascal.yaml', [f'{key}={value}'])
    lines = [ln for ln in ORIGINAL_PASCAL.splitlines() if not ln.startswith(f'{key}:')]
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, '\n'.join(lines) + f'\n{key}: {value}\n'))


@pytest.mark.parametrize('key, value', [
    ('method', 'meanteacher'),
    ('precision', 'fp8'),
    ('eval_mode', 'whole'),
    ('criterion.name', 'Focal'),
])
def test_invalid_choice_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / 'pascal.yaml', [f'{key}={value}'])


def test_valid_choices_are_accepted():
    cfg = load_config(CONFIGS / 'pascal.yaml',
                      ['method=fixmatch', 'precision=bf16', 'eval_mode=sliding_window'])
    assert (cfg.method, cfg.precision, cfg.eval_mode) == ('fixmatch', 'bf16', 'sliding_window')


def test_ints_are_accepted_for_float_keys():
    cfg = from_dict({'lr': 1, 'lr_multi': 40, 'conf_thresh': 1, 'lossu_weight': 2})
    assert (cfg.lr, cfg.lr_multi, cfg.conf_thresh, cfg.lossu_weight) == (1.0, 40.0, 1.0, 2.0)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.lr_multi, cfg.conf_thresh, cfg.lossu_weight))


# ---- overrides -------------------------------------------------------------------------------------

def test_overrides_apply():
    cfg = load_config(CONFIGS / 'pascal.yaml', [
        'lr=1e-5', 'criterion.name=OHEM', 'criterion.kwargs.thresh=0.7', 'lock_backbone=true',
        'epochs=3', 'pretrained=null'])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.criterion.name == 'OHEM'
    # The nested override adds a key and keeps the file's others.
    assert cfg.criterion.kwargs == {'ignore_index': 255, 'thresh': 0.7}
    assert cfg.lock_backbone is True and cfg.epochs == 3 and cfg.pretrained is None
    # The file's other values are untouched.
    assert cfg.crop_size == 518 and cfg.lr_multi == 40.0


def test_exponent_floats_in_yaml_files(tmp_path):
    # YAML 1.1 (PyYAML) reads `5e-6` without a dot as a string; a config written that way still loads.
    cfg = load_config(write(tmp_path, ORIGINAL_PASCAL.replace('lr: 0.000005', 'lr: 5e-6')))
    assert cfg.lr == 5e-6


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match='key=value'):
        load_config(CONFIGS / 'pascal.yaml', ['lr'])


# ---- save / load -------------------------------------------------------------------------------------

@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_save_config_round_trips(tmp_path, path):
    cfg = load_config(path, ['criterion.name=OHEM', 'criterion.kwargs.min_kept=10', 'lr=1e-5',
                             'eval_mode=center_crop', 'pretrained=null'])
    out = tmp_path / 'config.yaml'
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert [p.name for p in tmp_path.iterdir()] == ['config.yaml']      # no temporary file left


@pytest.mark.parametrize('dataset', ['levir', 'whu'])
def test_change_detection_configs_hold_the_originals_values(dataset):
    """FACTS §7: crop 252, batch 8 on one GPU, 60 epochs, lr 5e-6 x 40, threshold 0.95, pseudo-labels
    from the online model; 2 classes; the segmentation configs keep the EMA teacher."""
    cfg = load_config(CONFIGS / f'{dataset}.yaml')
    assert (cfg.dataset, cfg.nclass, cfg.crop_size, cfg.epochs, cfg.batch_size) == (dataset, 2, 252, 60, 8)
    assert cfg.lr == pytest.approx(5e-6) and cfg.lr_multi == 40.0 and cfg.conf_thresh == 0.95
    assert cfg.teacher == 'online' and cfg.reference_gpus == 1
    assert load_config(CONFIGS / 'pascal.yaml').teacher == 'ema'
    with pytest.raises(ConfigError, match="'nclass'"):
        load_config(CONFIGS / f'{dataset}.yaml', ['nclass=3'])
    with pytest.raises(ConfigError, match="'method'"):
        load_config(CONFIGS / f'{dataset}.yaml', ['method=u2pl'])
