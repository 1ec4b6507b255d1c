"""Command-line and input errors, as a user meets them: each launch (the entry script, scripts/train.sh,
the tools, in a subprocess with a time limit) ends with exit code 1 and ONE line on stderr that
names the key, the value's source (the config file or the command line) or the file, and nothing is
written into the run directory."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_TRAIN

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300       # a guard against a hang (a run that fails must exit), not a speed check


def launch(args: list[str], cwd: Path = ROOT, env: dict | None = None) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                         env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    return out.returncode, out.stdout, out.stderr, time.monotonic() - t0


def assert_one_line_error(code: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1, f'expected one line on stderr, got {len(lines)}:\n{err}'
    for word in words:
        assert word in lines[0], f'{word!r} not in {lines[0]!r}'
    return lines[0]


def train(config: str | Path, run_dir: Path, *overrides: str, split: str = '1_16') -> list[str]:
    return [sys.executable, str(ROOT / 'unimatch_v2.py'), '--config', str(config), '--split', split,
            '--save-path', str(run_dir), *overrides]


# ---- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize('override, words', [
    ('crop_sise=98', ["command line: crop_sise=98: unknown config key 'crop_sise'", "did you mean 'crop_size'?"]),
    ('crop_size=abc', ["command line: crop_size=abc: config key 'crop_size': expected int, got str 'abc'"]),
    ('crop_size=100', ["command line: crop_size=100: config key 'crop_size' must be a multiple of 14",
                       'backbone=dinov2_tiny', 'nearest: 98 or 112']),
    ('criterion.nmae=OHEM', ["command line: criterion.nmae=OHEM: unknown config key 'criterion.nmae'",
                             "did you mean 'criterion.name'?"]),
    ('lr.warmup=3', ["command line: lr.warmup=3: config key 'lr' holds 0.0002, not a mapping"]),
], ids=['misspelled', 'wrong-type', 'crop-not-patch-multiple', 'misspelled-nested', 'not-a-mapping'])
def test_command_line_error(toy, tmp_path, override, words):
    run_dir = tmp_path / 'run'
    code, _, err, _ = launch(train(ROOT / 'configs/toy.yaml', run_dir, *toy, override))
    assert_one_line_error(code, err, *words)
    assert not run_dir.exists()


def test_config_file_error_names_the_file(toy, tmp_path):
    """A value from the file is blamed on the file, not on the command line."""
    config = tmp_path / 'toy.yaml'
    config.write_text((ROOT / 'configs/toy.yaml').read_text().replace('crop_size: 112', 'crop_size: 100'))
    run_dir = tmp_path / 'run'
    code, _, err, _ = launch(train(config, run_dir, *[o for o in toy if not o.startswith('crop_size=')]))
    line = assert_one_line_error(code, err, f"{config}: config key 'crop_size' must be a multiple of 14")
    assert 'command line' not in line
    assert not run_dir.exists()


def test_train_sh_misspelled_key(tmp_path):
    exp = tmp_path / 'exp'
    code, _, err, _ = launch(['sh', 'scripts/train.sh', 'toy', '1_16', 'epochs=1', 'lr_multy=5'],
                             env={'EXP_DIR': str(exp)})
    assert_one_line_error(code, err, "command line: lr_multy=5: unknown config key 'lr_multy'",
                          "did you mean 'lr_multi'?")
    assert not exp.exists()


def test_key_value_before_a_flag(toy, tmp_path):
    """`key=value` may come before a flag (argparse's intermixed parsing)."""
    run_dir = tmp_path / 'run'
    args = [sys.executable, str(ROOT / 'unimatch_v2.py'), '--config', str(ROOT / 'configs/toy.yaml'), 'epochs=1',
            '--split', '1_16', *toy, '--save-path', str(run_dir), 'seed=1', '--check-data']
    code, out, err, _ = launch(args)
    assert code == 0, err
    assert 'no errors' in out


# ---- data errors found before training -------------------------------------------------------------

def write_custom(root: Path, n: int = 6, size: tuple[int, int] = (64, 48)) -> list[str]:
    """n image/mask pairs (classes 0..2, 255 ignored) in the custom layout; their split lines."""
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    lines = []
    for i in range(n):
        mask = np.zeros(size[::-1], np.uint8)
        mask[:, size[0] // 2:] = 1 + i % 2
        mask[:2] = 255
        Image.fromarray(np.full((*size[::-1], 3), 40 * i, np.uint8)).save(root / f'images/{i}.png')
        Image.fromarray(mask).save(root / f'masks/{i}.png')
        lines.append(f'images/{i}.png masks/{i}.png')
    return lines


@pytest.fixture
def custom(tmp_path):
    data, splits = tmp_path / 'data', tmp_path / 'splits'
    lines = write_custom(data)
    (splits / 'mine/all').mkdir(parents=True)
    (splits / 'mine/all/labeled.txt').write_text('\n'.join(lines[:4]) + '\n')
    (splits / 'mine/val.txt').write_text('\n'.join(lines[4:]) + '\n')
    config = tmp_path / 'mine.yaml'
    config.write_text(f'dataset: custom\nname: mine\ndata_root: {data}\nnclass: 3\nsplits_root: {splits}\n'
                      f'backbone: dinov2_tiny\n')
    overrides = [o for o in FAST_TRAIN if not o.startswith('toy_')]
    return {'data': data, 'config': config, 'overrides': overrides, 'run_dir': tmp_path / 'run'}


def test_label_above_nclass(custom):
    mask = np.asarray(Image.open(custom['data'] / 'masks/2.png')).copy()
    mask[10, 10] = 7
    Image.fromarray(mask).save(custom['data'] / 'masks/2.png')
    code, _, err, _ = launch(train(custom['config'], custom['run_dir'], *custom['overrides'], split='all'))
    assert_one_line_error(code, err, 'labeled.txt:3: mask masks/2.png has values [7] outside [0, 3)', 'nclass is 3')
    assert not custom['run_dir'].exists()


def test_mask_of_another_size(custom):
    Image.new('L', (30, 30)).save(custom['data'] / 'masks/5.png')
    code, _, err, _ = launch(train(custom['config'], custom['run_dir'], *custom['overrides'], split='all'))
    assert_one_line_error(code, err, 'val.txt:2: mask masks/5.png is 30x30 but image images/5.png is 64x48')
    assert not custom['run_dir'].exists()


# ---- tools -------------------------------------------------------------------------------------------

def test_make_custom_split_on_existing_splits(tmp_path):
    write_custom(tmp_path / 'data')
    cmd = [sys.executable, str(ROOT / 'tools/make_custom_split.py'), '--root', 'data', '--name', 'mine',
           '--count', '2']
    assert launch(cmd, cwd=tmp_path)[0] == 0
    before = {p: p.read_text() for p in (tmp_path / 'splits').rglob('*.txt')}
    code, _, err, _ = launch(cmd + ['--seed', '1'], cwd=tmp_path)
    assert_one_line_error(code, err, 'split files exist: splits/mine/2/labeled.txt', '--force')
    assert {p: p.read_text() for p in (tmp_path / 'splits').rglob('*.txt')} == before
    code, _, err, _ = launch(cmd + ['--seed', '1', '--force'], cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / 'splits/mine/2/labeled.txt').read_text() != before[tmp_path / 'splits/mine/2/labeled.txt']


def test_plot_run_without_results(tmp_path):
    (tmp_path / 'run').mkdir()
    code, _, err, _ = launch([sys.executable, str(ROOT / 'tools/plot_run.py'), str(tmp_path / 'run')])
    assert_one_line_error(code, err, f'{tmp_path / "run" / "results.json"} does not exist')
    assert list((tmp_path / 'run').iterdir()) == []
