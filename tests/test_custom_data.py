"""docs/custom_data.md runs as written: on a generated folder in its layout (masked images and an
image-only unlabeled folder), its commands -- taken verbatim from the page -- make the splits and
the config, check the files and train a tiny epoch, in a fresh working directory."""
import json
import subprocess
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests import launch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs/custom_data.md'
TIMEOUT_S = 600       # a guard against a hang, not a speed check

SPLIT = 'python tools/make_custom_split.py --root data/mine --name mine --fraction 0.25 --unlabeled unlabeled --nclass 3 --config configs/mine.yaml'
CHECK = 'python unimatch_v2.py --config configs/mine.yaml --split 1_4 --check-data'
SMOKE = ('python unimatch_v2.py --config configs/mine.yaml --split 1_4 backbone=dinov2_tiny pretrained=null '
         'crop_size=56 batch_size=2 epochs=1 max_iters_per_epoch=2')


def make_folder(root: Path, n_masked: int = 10, n_unlabeled: int = 4) -> None:
    """Step 1's layout: images/ with masks/ (classes 0..2, a 255 border), unlabeled/ without."""
    rng = np.random.default_rng(0)
    for sub in ('images', 'masks', 'unlabeled/batch1'):
        (root / sub).mkdir(parents=True)
    for i in range(n_masked):
        mask = np.zeros((60, 70), np.uint8)
        mask[:, 35:], mask[30:, :20], mask[0] = 1, 2, 255
        image = (rng.random((60, 70, 3)) * 60 + (mask % 255)[..., None] * 80).astype(np.uint8)
        Image.fromarray(image).save(root / f'images/{i:02d}.png')
        Image.fromarray(mask).save(root / f'masks/{i:02d}.png')
    for i in range(n_unlabeled):
        Image.fromarray((rng.random((60, 70, 3)) * 255).astype(np.uint8)).save(root / f'unlabeled/batch1/u{i}.jpg')


def run_as_documented(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command of the page, run from `cwd` as from a checkout: its script from the repository."""
    return launch.run_as_documented(command, cwd, DOC, TIMEOUT_S)


def lines(path: Path) -> list[str]:
    return path.read_text().split('\n')[:-1]


def test_the_custom_data_recipe_runs_as_written(tmp_path):
    make_folder(tmp_path / 'data/mine')

    run_as_documented(SPLIT, tmp_path)
    splits = tmp_path / 'splits/mine'
    val, labeled, unlabeled = lines(splits / 'val.txt'), lines(splits / '1_4/labeled.txt'), lines(splits / '1_4/unlabeled.txt')
    assert len(val) == 2                                         # 20% of 10 by default
    assert len(labeled) == 2                                     # a quarter of the other 8
    assert sorted(u for u in unlabeled if u.startswith('unlabeled/')) == [
        f'unlabeled/batch1/u{i}.jpg' for i in range(4)]          # image-only lines
    assert len(unlabeled) == 6 + 4 and not set(labeled) & set(unlabeled) and not set(val) & set(unlabeled + labeled)
    config = yaml.safe_load((tmp_path / 'configs/mine.yaml').read_text())
    assert {k: config[k] for k in ('dataset', 'name', 'data_root', 'nclass')} == {
        'dataset': 'custom', 'name': 'mine', 'data_root': 'data/mine', 'nclass': 3}

    assert 'no errors' in run_as_documented(CHECK, tmp_path).stdout

    run_as_documented(SMOKE, tmp_path)
    assert sorted(p.name for p in (tmp_path / 'exp').iterdir()) == ['mine']
    run_dir = tmp_path / 'exp/mine/unimatch_v2/dinov2_tiny/1_4'
    assert {'train.log', 'results.json', 'config.yaml', 'latest.pth', 'best.pth'} <= {p.name for p in run_dir.iterdir()}
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['epochs'] == 1 and len(results['history'][0]['iou']) == 3
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['name'] == 'mine'
    assert not (tmp_path / 'splits/custom').exists()
