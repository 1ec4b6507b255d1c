"""The generated toy dataset: determinism, layout, split sizes, idempotence, texture design."""
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import toy
from dataset.splits import read_split

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 32, 8


def generate(tmp_path: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    data, splits = tmp_path / name / 'data', tmp_path / name / 'splits' / 'toy'
    assert toy.ensure_toy(data, splits, seed=seed, n_train=N_TRAIN, n_val=N_VAL, workers=1)
    return data, splits


@pytest.fixture(scope='module')
def toy_tree(tmp_path_factory):
    return generate(tmp_path_factory.mktemp('toy'), 'a')


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


def test_deterministic_from_seed(toy_tree, tmp_path):
    data, splits = toy_tree
    same_data, same_splits = generate(tmp_path, 'b', seed=0)
    assert tree_bytes(same_data) == tree_bytes(data)
    assert tree_bytes(same_splits) == tree_bytes(splits)
    other_data, other_splits = generate(tmp_path, 'c', seed=1)
    other = tree_bytes(other_data)
    assert all(other[k] != v for k, v in tree_bytes(data).items() if k.endswith('.png'))
    assert tree_bytes(other_splits) != tree_bytes(splits)


def test_parallel_generation_matches_serial(toy_tree, tmp_path):
    data, _ = toy_tree
    toy.ensure_toy(tmp_path / 'p', tmp_path / 'ps', seed=0, n_train=N_TRAIN, n_val=N_VAL,
                   workers=2)
    assert tree_bytes(tmp_path / 'p') == tree_bytes(data)


def test_layout_and_masks(toy_tree):
    data, _ = toy_tree
    images = sorted((data / 'images').glob('*.jpg'))
    masks = sorted((data / 'masks').glob('*.png'))
    assert len(images) == len(masks) == N_TRAIN + N_VAL
    present = set()
    for image_path, mask_path in zip(images, masks):
        assert image_path.stem == mask_path.stem
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert image.format == 'JPEG' and image.mode == 'RGB' and mask.mode == 'L'
            assert image.size == mask.size
            assert all(toy.IMAGE_SIDE[0] <= s <= toy.IMAGE_SIDE[1] for s in image.size)
            values = np.unique(np.array(mask))
        assert values.max() < toy.NCLASS
        if image_path.stem.startswith('train'):
            present.update(values.tolist())
    assert present == set(range(toy.NCLASS))


def test_split_sizes(toy_tree):
    data, splits = toy_tree
    train = {f'images/train_{i:05d}.jpg' for i in range(N_TRAIN)}
    previous = set()
    for name, k in toy.SPLITS.items():
        labeled = [s.image for s in read_split(splits / name / 'labeled.txt')]
        unlabeled = [s.image for s in read_split(splits / name / 'unlabeled.txt')]
        assert len(labeled) == N_TRAIN // k
        assert not set(labeled) & set(unlabeled) and set(labeled) | set(unlabeled) == train
        assert previous <= set(labeled)  # nested: 1_16 inside 1_8 inside 1_4
        previous = set(labeled)
    assert [s.image for s in read_split(splits / 'all/labeled.txt')] == sorted(train)
    assert read_split(splits / 'all/unlabeled.txt') == read_split(splits / 'all/labeled.txt')
    val = read_split(splits / 'val.txt')
    assert len(val) == N_VAL and all((data / s.image).exists() and (data / s.mask).exists()
                                     for s in val)
    assert val[0].mask == 'masks/val_00000.png'


def test_second_call_draws_and_rewrites_nothing(toy_tree, monkeypatch):
    """Not a timing threshold (that would depend on the machine and its load): no sample is drawn."""
    data, splits = toy_tree
    files = [p for root in toy_tree for p in root.rglob('*') if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}

    def draw(*args, **kwargs):
        raise AssertionError('a complete toy tree was generated again')
    monkeypatch.setattr(toy, 'make_sample', draw)
    assert not toy.ensure_toy(data, splits, seed=0, n_train=N_TRAIN, n_val=N_VAL, workers=1)
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_incomplete_or_changed_tree_is_regenerated(tmp_path):
    data, splits = generate(tmp_path, 'd')
    (data / toy.MARKER).unlink()  # as if generation had been interrupted
    (data / 'images/train_00003.jpg').write_bytes(b'truncated')
    assert toy.ensure_toy(data, splits, seed=0, n_train=N_TRAIN, n_val=N_VAL, workers=1)
    with Image.open(data / 'images/train_00003.jpg') as img:
        img.load()
    (splits / '1_8/labeled.txt').unlink()
    assert not toy.ensure_toy(data, splits, seed=0, n_train=N_TRAIN, n_val=N_VAL)
    assert len(read_split(splits / '1_8/labeled.txt')) == N_TRAIN // 8
    assert toy.ensure_toy(data, splits, seed=0, n_train=N_TRAIN + 16, n_val=N_VAL, workers=1)
    assert len(read_split(splits / 'all/labeled.txt')) == N_TRAIN + 16


def gradient_energy(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Mean |horizontal| and |vertical| central difference of grey values inside each class
    (pixels whose 3x3 neighbourhood is one class), over n generated samples: two [NCLASS]."""
    gx, gy, count = (np.zeros(toy.NCLASS) for _ in range(3))
    for k in range(n):
        img, mask = toy.make_sample(np.random.default_rng([7, 0, k]))
        grey = img.astype(np.float64).mean(-1)
        dx = np.abs(grey[1:-1, 2:] - grey[1:-1, :-2])
        dy = np.abs(grey[2:, 1:-1] - grey[:-2, 1:-1])
        centre = mask[1:-1, 1:-1]
        interior = np.ones_like(centre, dtype=bool)
        for oy in (0, 1, 2):
            for ox in (0, 1, 2):
                interior &= mask[oy:oy + centre.shape[0], ox:ox + centre.shape[1]] == centre
        for cls in range(toy.NCLASS):
            sel = interior & (centre == cls)
            gx[cls] += dx[sel].sum()
            gy[cls] += dy[sel].sum()
            count[cls] += sel.sum()
    return gx / count, gy / count


def test_classes_differ_by_texture():
    gx, gy = gradient_energy()
    assert gy[1] > 3 * gx[1]  # horizontal stripes vary along y
    assert gx[2] > 3 * gy[2]  # vertical stripes vary along x
    for cls in (3, 4, 5):  # diagonal, checker, dots: no preferred axis
        assert 0.7 < gy[cls] / gx[cls] < 1.4
    # The background is smooth: far less local contrast than any texture.
    assert (gx[0] + gy[0]) < 0.4 * (gx[1:] + gy[1:]).min()


def test_toy_loads_through_semi_dataset(toy_tree):
    from dataset.semi import SemiDataset, split_paths

    data, splits = toy_tree
    paths = split_paths('toy', '1_8', splits.parent, data)
    random.seed(0)
    labeled = SemiDataset(data, paths.labeled, 'train_l', 98, nsample=N_TRAIN, nclass=toy.NCLASS)
    assert len(labeled) == N_TRAIN and labeled[0]['mask'].shape == (98, 98)
    unlabeled = SemiDataset(data, paths.unlabeled, 'train_u', 98)
    assert unlabeled[0]['strong'].shape == (2, 3, 98, 98)
    val = SemiDataset(data, paths.val, 'val', 98, nclass=toy.NCLASS)
    with Image.open(data / val.samples[0].image) as img:
        assert val[0]['image'].shape[1:] == img.size[::-1]


def test_cli(tmp_path):
    cmd = [sys.executable, '-m', 'dataset.toy', '--root', str(tmp_path / 'data'), '--splits-root',
           str(tmp_path / 'splits'), '--n-train', '16', '--n-val', '2', '--workers', '1']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert 'generated' in out.stdout
    assert len(read_split(tmp_path / 'splits/1_16/labeled.txt')) == 1
