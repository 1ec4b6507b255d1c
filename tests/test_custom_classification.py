"""Classification on one's own images (`custom_cls`, dataset/image_folder.py): the folder layout's
conventions, the split tool, every check's one-line error, and docs/custom_classification.md run as
written on scikit-learn's real handwritten digits.

    python -m pytest tests/test_custom_classification.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import launch
import yaml
from PIL import Image

from dataset.checks import DataError
from dataset.image_folder import check_classes, check_list, list_labels, make_classification_split, scan
from tasks.classification import Classification
from engine.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs/custom_classification.md'
TIMEOUT_S = 600       # a guard against a hang, not a speed check

WRITE = 'python tools/write_digits.py --dst data/digits'
SPLIT = ('python tools/make_classification_split.py --root data/digits --name digits --labels-per-class 4 '
         '--config configs/digits.yaml')
CHECK = 'python unimatch_v2.py --config configs/digits.yaml --split 4_labels_per_class --check-data'
SMOKE = ('python unimatch_v2.py --config configs/digits.yaml --split 4_labels_per_class backbone=wrn_16_1 '
         'pretrained=null crop_size=32 batch_size=2 epochs=1 max_iters_per_epoch=2 labeled_upsample=8')


def image(path: Path, value: int = 100, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def make_folders(root: Path, train: dict[str, int], val: dict[str, int], unlabeled: int = 0) -> Path:
    """train/<class>/ and val/<class>/ with that many images each, unlabeled/ with `unlabeled`."""
    for folder, counts in (('train', train), ('val', val)):
        for name, n in counts.items():
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image(root / folder / name / f'{i}.png', 20 * i)
    for i in range(unlabeled):
        image(root / 'unlabeled' / 'sub' / f'u{i}.jpg')
    return root


def run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'tools/make_classification_split.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ---- the layout's conventions ------------------------------------------------------------------------

def test_classes_are_the_sorted_folder_names_and_images_torchvisions_extensions(tmp_path):
    root = make_folders(tmp_path, {'zebra': 2, 'ant': 2, 'moth': 2}, {'ant': 1, 'zebra': 1})
    image(root / 'train/moth/nested/UPPER.PNG')           # any case, sub-folders: torchvision's walk
    (root / 'train/moth/notes.txt').write_text('not an image')
    layout = scan(root)
    assert layout.classes == ['ant', 'moth', 'zebra']
    assert layout.train[1] == ['train/moth/0.png', 'train/moth/1.png', 'train/moth/nested/UPPER.PNG']
    assert layout.val == [['val/ant/0.png'], [], ['val/zebra/0.png']]   # val may hold a subset of the classes
    labels, images = list_labels(_written(root, 'val.txt', ['val/zebra/0.png', 'val/ant/0.png']), 'val', layout.classes)
    assert labels.tolist() == [2, 0] and images == ['val/zebra/0.png', 'val/ant/0.png']


def _written(root: Path, name: str, lines: list[str]) -> Path:
    path = root / name
    path.write_text(''.join(f'{line}\n' for line in lines))
    return path


def test_split_draws_n_per_class_seeded_nested_and_keeps_the_shared_val_list(tmp_path):
    root = make_folders(tmp_path / 'data', {'a': 6, 'b': 5, 'c': 7}, {'a': 2, 'b': 2, 'c': 1}, unlabeled=3)
    splits = tmp_path / 'splits'
    paths = make_classification_split(root, 'mine', 2, seed=0, splits_root=splits)
    assert paths['labeled'] == splits / 'mine/2_labels_per_class/labeled.txt'
    two = paths['labeled'].read_text().split()
    assert [p.split('/')[1] for p in two] == ['a', 'a', 'b', 'b', 'c', 'c']
    unlabeled = paths['unlabeled'].read_text().split()
    assert len(unlabeled) == 6 + 5 + 7 + 3 and set(two) <= set(unlabeled)      # labeled ones included, as USB
    assert sorted(u for u in unlabeled if u.startswith('unlabeled/')) == [f'unlabeled/sub/u{i}.jpg' for i in range(3)]
    assert len(paths['val'].read_text().split()) == 5
    three = make_classification_split(root, 'mine', 3, seed=0, splits_root=splits)['labeled'].read_text().split()
    assert set(two) < set(three)                                       # the same seed: nested sets
    other = make_classification_split(root, 'mine', 2, seed=1, split='2_seed1', splits_root=splits)
    assert other['labeled'].read_text().split() != two                 # another seed, another set
    assert make_classification_split(root, 'again', 2, seed=0, splits_root=splits)['labeled'].read_text().split() == two
    with pytest.raises(FileExistsError, match='2_labels_per_class/labeled.txt'):
        make_classification_split(root, 'mine', 2, seed=0, splits_root=splits)


@pytest.mark.parametrize('case, train, val, words', [
    ('empty class folder', {'a': 3, 'b': 0}, {'a': 1}, ('train/b', 'empty class folder')),
    ('empty val class folder', {'a': 3, 'b': 3}, {'a': 1, 'b': 0}, ('val/b', 'empty class folder')),
    ('val class not in train', {'a': 3, 'b': 3}, {'a': 1, 'c': 1}, ('val/c', "class 'c' is not a class of")),
    ('fewer images than labels', {'a': 3, 'b': 1}, {'a': 1}, ('train/b', "class 'b' has 1 images, fewer than the 2")),
    ('one class', {'a': 3}, {'a': 1}, ('train', 'at least 2')),
])
def test_the_split_tool_refuses_with_one_line(tmp_path, case, train, val, words):
    make_folders(tmp_path / 'data', train, val)
    out = run_tool(['--root', 'data', '--name', 'mine', '--labels-per-class', '2', '--config', 'configs/mine.yaml'],
                   tmp_path)
    one_line_error(out, *words)
    assert not (tmp_path / 'splits').exists() and not (tmp_path / 'configs').exists()     # nothing written


def test_the_split_tool_refuses_a_missing_val_folder_and_an_empty_unlabeled_one(tmp_path):
    make_folders(tmp_path / 'data', {'a': 3, 'b': 3}, {})
    one_line_error(run_tool(['--root', 'data', '--name', 'm', '--labels-per-class', '1'], tmp_path), 'data/val', 'no such folder')
    make_folders(tmp_path / 'data', {}, {'a': 1})
    (tmp_path / 'data/unlabeled').mkdir()
    one_line_error(run_tool(['--root', 'data', '--name', 'm', '--labels-per-class', '1'], tmp_path), 'data/unlabeled', 'no images')


# ---- the lists and the config, before a run --------------------------------------------------------

def _config(root: Path, splits: Path, nclass: int, names=None, **keys):
    return from_dict({'dataset': 'custom_cls', 'name': 'mine', 'data_root': str(root), 'splits_root': str(splits),
                      'nclass': nclass, 'class_names': names, 'backbone': 'wrn_16_1', 'crop_size': 16,
                      'input_size': 14, 'max_iters_per_epoch': 2, 'num_workers': 0, **keys}, source='test')


def _problems(cfg, split: str, full: bool = False) -> list[str]:
    task = Classification(cfg)
    labeled, unlabeled, val = task.split_paths(split)
    return [str(p) for p in task.check_inputs({'labeled': labeled, 'unlabeled': unlabeled, 'val': val}, full=full)
            if p.level == 'error']


def test_a_run_reads_the_lists_with_folder_ranks_as_labels(tmp_path):
    root = make_folders(tmp_path / 'data', {'dog': 3, 'cat': 3}, {'cat': 2, 'dog': 1}, unlabeled=2)
    make_classification_split(root, 'mine', 1, splits_root=tmp_path / 'splits')
    cfg = _config(root, tmp_path / 'splits', 2, ['cat', 'dog'])
    assert _problems(cfg, '1_labels_per_class', full=True) == []
    task = Classification(cfg)
    labeled, unlabeled, val = task.split_paths('1_labels_per_class')
    assert [s['mask'].item() for s in task.dataset(labeled, 'train_l')] == [0, 1]            # cat < dog
    assert [s['label'] for s in task.dataset(val, 'val')] == [0, 0, 1]
    assert task.read_list(unlabeled).labels.tolist() == [0, 0, 0, 1, 1, 1, -1, -1]
    assert task.split_sizes('1_labels_per_class') == {'labeled': 2, 'unlabeled': 8, 'val': 3}
    sample = task.dataset(unlabeled, 'train_u', num_strong=2)[0]
    assert sample['image'].shape == (3, 16, 16) and sample['strong'].shape == (2, 3, 16, 16)


def test_the_config_must_match_the_class_folders(tmp_path):
    root = make_folders(tmp_path / 'data', {'a': 2, 'b': 2, 'c': 2}, {'a': 1})
    with pytest.raises(DataError, match=r'3 class folders \(a, b, c\), but the config says nclass: 2'):
        check_classes(root, 2, None)
    with pytest.raises(DataError, match=r"class_names: \['a', 'c', 'b'\]"):
        check_classes(root, 3, ['a', 'c', 'b'])
    assert check_classes(root, 3, None) == ['a', 'b', 'c']


def test_an_unreadable_image_and_a_foreign_line_are_named_with_file_and_line(tmp_path):
    root = make_folders(tmp_path / 'data', {'a': 3, 'b': 3}, {'a': 1, 'b': 1})
    paths = make_classification_split(root, 'mine', 1, splits_root=tmp_path / 'splits')
    cfg = _config(root, tmp_path / 'splits', 2)
    val_image = paths['val'].read_text().split()[1]
    (root / val_image).write_bytes(b'not a png')                             # unreadable: the header check sees it
    assert _problems(cfg, '1_labels_per_class') == [
        f'error: {paths["val"]}:2: image {root / val_image} cannot be read: cannot identify image file '
        f"'{root / val_image}'"]
    image(root / val_image)
    train_image = root / paths['unlabeled'].read_text().split()[0]
    noisy = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(train_image)
    train_image.write_bytes(train_image.read_bytes()[:2000])                # truncated: only decoding sees it
    assert _problems(cfg, '1_labels_per_class') == []
    found = _problems(cfg, '1_labels_per_class', full=True)
    assert f'error: {paths["unlabeled"]}:1: image {train_image} cannot be read: image file is truncated' in found
    assert all(f'image {train_image} cannot be read' in p for p in found)    # in the labeled list too, if drawn
    image(train_image)
    lines = paths['labeled'].read_text().split()
    paths['labeled'].write_text(f'{lines[0]}\n{val_image}\n')              # a val image among the labeled ones
    assert _problems(cfg, '1_labels_per_class') == [
        f'error: {paths["labeled"]}:2: {val_image}: a labeled line must name train/<class>/<image>']
    paths['labeled'].write_text(f'{lines[0]}\ntrain/zebra/0.png\n')
    image(root / 'train/zebra/0.png')                                      # a folder made after the config
    assert 'nclass: 2' in _problems(cfg, '1_labels_per_class')[0]
    assert check_list(root, paths['labeled'], 'labeled', ['a', 'b'])[0].message.startswith(
        "train/zebra/0.png: class 'zebra' is not a class of train/")


# ---- the recipe, on real images ------------------------------------------------------------------------

def run_as_documented(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command of the page, run from `cwd` as from a checkout: its script from the repository."""
    return launch.run_as_documented(command, cwd, DOC, TIMEOUT_S)


def test_the_custom_classification_recipe_runs_as_written_on_real_digits(tmp_path):
    run_as_documented(WRITE, tmp_path)
    data = tmp_path / 'data/digits'
    assert sorted(p.name for p in (data / 'train').iterdir()) == [str(d) for d in range(10)]
    counts = {f: sum(1 for p in (data / f).rglob('*.png')) for f in ('train', 'val', 'unlabeled')}
    assert counts == {'train': 1079, 'val': 359, 'unlabeled': 359}        # load_digits' 1,797 scans
    with Image.open(next((data / 'train/3').iterdir())) as img:
        assert img.size == (32, 32) and img.mode == 'RGB'

    run_as_documented(SPLIT, tmp_path)
    splits = tmp_path / 'splits/digits'
    labeled = (splits / '4_labels_per_class/labeled.txt').read_text().split()
    assert len(labeled) == 40 and {p.split('/')[1] for p in labeled} == {str(d) for d in range(10)}
    assert len((splits / '4_labels_per_class/unlabeled.txt').read_text().split()) == 1079 + 359
    config = yaml.safe_load((tmp_path / 'configs/digits.yaml').read_text())
    assert {k: config[k] for k in ('dataset', 'name', 'data_root', 'nclass', 'class_names')} == {
        'dataset': 'custom_cls', 'name': 'digits', 'data_root': 'data/digits', 'nclass': 10,
        'class_names': [str(d) for d in range(10)]}

    assert 'no errors' in run_as_documented(CHECK, tmp_path).stdout

    run_as_documented(SMOKE, tmp_path)
    run_dir = tmp_path / 'exp/digits/unimatch_v2/wrn_16_1/4_labels_per_class'
    assert {'train.log', 'results.json', 'config.yaml', 'latest.pth', 'best.pth'} <= {p.name for p in run_dir.iterdir()}
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['epochs'] == 1 and results['dataset'] == 'custom_cls' and results['history'][0]['top1'] is not None
    assert '(359 images)' in (run_dir / 'train.log').read_text()          # val.txt, evaluated in full
