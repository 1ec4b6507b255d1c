"""Data layer tests: split files, transforms, SemiDataset on each dataset's on-disk layout."""
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import registry
from dataset import semi as semi_module
from dataset.semi import SampleKey, SemiDataset, build_semi_datasets, load_mask, split_paths
from dataset.splits import (SplitError, derive_unlabeled, make_custom_split, read_split)
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD, cutmix_box
from util.labels import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
CROP = 64
# Normalised value of a zero (padding) pixel, per channel: [3, 1].
PAD_PIXEL = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None]
SIZES = [(40, 30), (30, 44), (52, 36), (36, 36)]  # (W, H): the short side < CROP / 2 -> padding


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """Random RGB in [30, 225]: no pixel can be mistaken for (zero) padding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(30, 226, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def write_mask(path: Path, size: tuple[int, int], nclass: int, seed: int,
               palette: list[int] | None = None, ignore: bool = False) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, nclass, (size[1], size[0]), dtype=np.uint8)
    if ignore:
        arr[:2] = IGNORE_INDEX
    img = Image.fromarray(arr)
    if palette is not None:
        img = img.convert('P')
        img.putpalette(palette)
    img.save(path)
    return arr


def write_split(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(line + '\n' for line in lines))
    return path


def pascal_layout(tmp_path):
    root, lines = tmp_path / 'VOC', []
    for i, size in enumerate(SIZES):
        stem = f'2007_{i:06d}'
        write_image(root / 'JPEGImages' / f'{stem}.jpg', size, i)
        write_mask(root / 'SegmentationClass' / f'{stem}.png', size, 21, i,
                   palette=registry.get_palette('pascal'))
        lines.append(f'JPEGImages/{stem}.jpg SegmentationClass/{stem}.png')
    split = write_split(tmp_path / 'split.txt', lines)
    return root, split, split, 21


def cityscapes_layout(tmp_path):
    root, lines = tmp_path / 'cityscapes', []
    for i, size in enumerate(SIZES):
        stem = f'aachen_{i:06d}_000019'
        write_image(root / 'leftImg8bit/train/aachen' / f'{stem}_leftImg8bit.png', size, i)
        write_mask(root / 'gtFine/train/aachen' / f'{stem}_gtFine_labelTrainIds.png', size, 19, i)
        lines.append(f'leftImg8bit/train/aachen/{stem}_leftImg8bit.png '
                     f'gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png')
    write_image(root / 'leftImg8bit/train_extra/bonn/bonn_000000_000000_leftImg8bit.png',
                (48, 24), 99)
    extra = 'leftImg8bit/train_extra/bonn/bonn_000000_000000_leftImg8bit.png None'
    labeled = write_split(tmp_path / 'labeled.txt', lines)
    return root, labeled, write_split(tmp_path / 'unlabeled.txt', lines[:2] + [extra]), 19


def ade20k_layout(tmp_path):
    root, lines = tmp_path / 'ADEChallengeData2016', []
    for i, size in enumerate(SIZES):
        stem = f'ADE_train_{i:08d}'
        write_image(root / 'images/training' / f'{stem}.jpg', size, i)
        write_mask(root / 'annotations/training' / f'{stem}.png', size, 150, i)
        lines.append(f'images/training/{stem}.jpg annotations/training/{stem}.png')
    split = write_split(tmp_path / 'split.txt', lines)
    return root, split, split, 150


def coco_layout(tmp_path):
    root = tmp_path / 'coco'
    for i, size in enumerate(SIZES):
        write_image(root / 'train2017' / f'{i:012d}.jpg', size, i)
        write_mask(root / 'masks' / f'{i:012d}.png', size, 81, i)
    labeled = write_split(tmp_path / 'labeled.txt',
                          [f'train2017/{i:012d}.jpg masks/{i:012d}.png' for i in (0, 2)])
    derive_unlabeled(root, labeled, tmp_path / 'unlabeled.txt')
    return root, labeled, tmp_path / 'unlabeled.txt', 81


def custom_layout(tmp_path):
    root = tmp_path / 'mine'
    for i, size in enumerate(SIZES):
        write_image(root / 'images' / f'img{i}.png', size, i)
        write_mask(root / 'masks' / f'img{i}.png', size, 3, i)
    paths = make_custom_split(root, 'mine', count=2, splits_root=tmp_path / 'splits')
    return root, paths['labeled'], paths['unlabeled'], 3


LAYOUTS = {'pascal': pascal_layout, 'cityscapes': cityscapes_layout, 'ade20k': ade20k_layout,
           'coco': coco_layout, 'custom': custom_layout}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request, tmp_path):
    return LAYOUTS[request.param](tmp_path)


def is_pad(image: torch.Tensor) -> torch.Tensor:
    """Bool [H, W]: pixels whose every channel is the normalised zero."""
    return torch.isclose(image, PAD_PIXEL[:, :, None], atol=1e-5).all(0)


def test_train_l_sample(layout):
    root, labeled, _, nclass = layout
    ds = SemiDataset(root, labeled, 'train_l', CROP, nclass=nclass)
    random.seed(0)
    for i in range(len(ds)):
        item = ds[i]
        assert item['image'].shape == (3, CROP, CROP) and item['image'].dtype == torch.float32
        assert item['mask'].shape == (CROP, CROP) and item['mask'].dtype == torch.int64
        pad = is_pad(item['image'])
        assert pad.any(), 'the short side never reaches the crop size, so there must be padding'
        # Test masks hold no 255, so 255 appears exactly on the padding.
        assert torch.equal(item['mask'] == IGNORE_INDEX, pad)
        assert item['mask'][~pad].max() < nclass


def test_train_u_sample(layout, monkeypatch):
    root, _, unlabeled, _ = layout
    ds = SemiDataset(root, unlabeled, 'train_u', CROP, num_strong=3)
    random.seed(1)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {'image', 'strong', 'boxes', 'valid'}
        assert item['image'].shape == (3, CROP, CROP)
        assert item['strong'].shape == (3, 3, CROP, CROP) and item['strong'].dtype == torch.float32
        assert item['boxes'].shape == (3, CROP, CROP) and item['boxes'].dtype == torch.bool
        assert item['valid'].dtype == torch.bool
        assert torch.equal(item['valid'], ~is_pad(item['image']))
        assert not item['valid'].all()
    # With the photometric augmentation switched off, every strong view is the weak crop.
    monkeypatch.setattr(semi_module, 'strong_color', lambda img, rng=None: img)
    item = ds[0]
    for view in item['strong']:
        assert torch.equal(view, item['image'])


def test_a_sample_key_fixes_the_augmentations(layout):
    """SampleKey(index, seed): the same crop, flip, colours and boxes whatever the global generators
    hold (a worker's, a resumed run's); another seed gives another sample."""
    root, _, unlabeled, _ = layout
    ds = SemiDataset(root, unlabeled, 'train_u', CROP, num_strong=2)
    random.seed(1)
    first = ds[SampleKey(0, 123)]
    random.seed(2)
    torch.manual_seed(2)
    again, other = ds[SampleKey(0, 123)], ds[SampleKey(0, 124)]
    for k in first:
        assert torch.equal(first[k], again[k]), k
    assert any(not torch.equal(first[k], other[k]) for k in first)


def two_class_layout(tmp_path) -> tuple[Path, Path]:
    """A custom-layout image whose mask is vertical stripes of classes 0 and 5 with an ignored top:
    any interpolation between them would make ids that are not in the mask."""
    root = tmp_path / 'stripes'
    write_image(root / 'images/a.png', (90, 70), 0)
    mask = np.where((np.arange(90) // 9) % 2 == 0, 0, 5).astype(np.uint8)[None].repeat(70, 0)
    mask[:6] = IGNORE_INDEX
    (root / 'masks').mkdir(parents=True)
    Image.fromarray(mask).save(root / 'masks/a.png')
    return root, write_split(tmp_path / 'labeled.txt', ['images/a.png masks/a.png'])


def test_rescaled_masks_keep_their_class_ids(tmp_path):
    """Masks are resized nearest-neighbour: over many random rescales (long side x 0.5 .. 2) and
    crops, a training mask holds only the ids of its file (and 255 on the padding)."""
    root, labeled = two_class_layout(tmp_path)
    ds = SemiDataset(root, labeled, 'train_l', CROP, nclass=6)
    seen = set()
    for seed in range(20):
        ids = set(ds[SampleKey(0, seed)]['mask'].unique().tolist())
        assert ids <= {0, 5, IGNORE_INDEX}, (seed, sorted(ids))
        seen |= ids
    assert seen == {0, 5, IGNORE_INDEX}


def test_each_strong_view_draws_its_own_cutmix_box(tmp_path):
    """Per sample, one box per strong view drawn independently (each present with p = 0.5): two
    views share a box only when both have none, about one sample in four; never all of them."""
    root, _, unlabeled, _ = pascal_layout(tmp_path)
    ds = SemiDataset(root, unlabeled, 'train_u', CROP, num_strong=2)
    boxes = [ds[SampleKey(i % len(ds), seed)]['boxes'] for i, seed in enumerate(range(30))]
    shared = [b for b in boxes if torch.equal(b[0], b[1])]
    assert all(not b.any() for b in shared)                         # equal only when both are empty
    assert len(shared) <= 15
    assert any(b[0].any() and b[1].any() for b in boxes)


def test_val_sample_full_resolution(layout):
    root, labeled, _, nclass = layout
    ds = SemiDataset(root, labeled, 'val', CROP, nclass=nclass)
    for i, sample in enumerate(ds.samples):
        item = ds[i]
        with Image.open(root / sample.image) as img:
            w, h = img.size
        assert item['image'].shape == (3, h, w)
        assert torch.equal(item['mask'], torch.from_numpy(load_mask(root / sample.mask)).long())
        assert item['name'] == Path(sample.image).stem
        assert ds.image_path(i) == root / sample.image


def test_palette_mask_reads_indices_and_ignore(tmp_path):
    path = tmp_path / 'm.png'
    arr = write_mask(path, (20, 10), 21, 0, palette=registry.get_palette('pascal'), ignore=True)
    with Image.open(path) as img:
        assert img.mode == 'P'
    np.testing.assert_array_equal(load_mask(path, nclass=21), arr)


def test_cityscapes_none_mask_line(tmp_path):
    root, _, unlabeled, _ = cityscapes_layout(tmp_path)
    samples = read_split(unlabeled)
    assert samples[-1].mask is None and samples[0].mask is not None
    item = SemiDataset(root, unlabeled, 'train_u', CROP)[len(samples) - 1]
    assert item['valid'].any() and not item['valid'].all()
    with pytest.raises(ValueError, match='has no mask'):
        SemiDataset(root, unlabeled, 'val', CROP)[len(samples) - 1]


def test_nsample_repeats_and_truncates(tmp_path):
    root, labeled, _, _ = pascal_layout(tmp_path)
    base = read_split(labeled)
    ds = SemiDataset(root, labeled, 'train_l', CROP, nsample=10)
    assert len(ds) == 10
    assert ds.samples == (base * 3)[:10]
    assert SemiDataset(root, labeled, 'train_l', CROP, nsample=2).samples == base[:2]


def test_seeded_sampling_is_repeatable(tmp_path):
    root, _, unlabeled, _ = pascal_layout(tmp_path)
    ds = SemiDataset(root, unlabeled, 'train_u', CROP)
    draws = []
    for seed in (5, 5, 6):
        random.seed(seed)
        draws.append(ds[0])
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in draws[0])
    assert not torch.equal(draws[0]['strong'], draws[2]['strong'])


def test_dataloader_workers_repeatable_and_distinct(tmp_path):
    root, labeled, _, _ = pascal_layout(tmp_path)
    ds = SemiDataset(root, labeled, 'train_l', CROP, nsample=4)
    ds.samples = [ds.samples[0]] * 4  # same image everywhere: only the augmentation differs

    def run():
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
        return [batch['image'] for batch in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Items 0 and 1 come from different workers: different augmentations.
    assert not torch.equal(first[0], first[1])


def test_bad_mask_value_names_file(tmp_path):
    root, labeled, _, _ = pascal_layout(tmp_path)
    bad = root / read_split(labeled)[1].mask
    arr = np.array(Image.open(bad))
    arr[0, 0] = 30
    Image.fromarray(arr).save(bad)
    ds = SemiDataset(root, labeled, 'train_l', CROP, nclass=21)
    with pytest.raises(ValueError, match=rf'{bad.name}.*\[30\]'):
        ds[1]
    rgb = tmp_path / 'rgb.png'
    Image.new('RGB', (4, 4)).save(rgb)
    with pytest.raises(ValueError, match='single-channel'):
        load_mask(rgb)


def test_mask_image_size_mismatch(tmp_path):
    root, labeled, _, _ = pascal_layout(tmp_path)
    write_mask(root / read_split(labeled)[0].mask, (7, 7), 21, 0)
    with pytest.raises(ValueError, match='split.txt:1'):
        SemiDataset(root, labeled, 'val', CROP)[0]


def test_read_split_errors(tmp_path):
    path = write_split(tmp_path / 'bad.txt', ['a.jpg a.png', '', 'b.jpg', 'c.jpg c.png extra'])
    with pytest.raises(SplitError, match=r'bad\.txt:4: .*3 fields'):
        read_split(path)
    with pytest.raises(SplitError, match=r'empty\.txt: split file is empty'):
        read_split(write_split(tmp_path / 'empty.txt', ['', '  ']))
    ok = write_split(tmp_path / 'ok.txt', ['a.jpg a.png', '', 'b.jpg', 'c.jpg None'])
    samples = read_split(ok)
    assert [(s.image, s.mask, s.line) for s in samples] == [
        ('a.jpg', 'a.png', 1), ('b.jpg', None, 3), ('c.jpg', None, 4)]


def test_coco_derived_unlabeled_and_cache(tmp_path):
    root, labeled, cache, _ = coco_layout(tmp_path)
    samples = read_split(cache)
    assert [(s.image, s.mask) for s in samples] == [
        (f'train2017/{i:012d}.jpg', f'masks/{i:012d}.png') for i in (1, 3)]
    # Re-used: a new image in train2017 does not change the cached list.
    write_image(root / 'train2017' / f'{9:012d}.jpg', (8, 8), 9)
    assert derive_unlabeled(root, labeled, cache) == samples
    # A labeled list that overlaps the cache invalidates it.
    write_split(labeled, [f'train2017/{i:012d}.jpg masks/{i:012d}.png' for i in (0, 1)])
    assert [s.image for s in derive_unlabeled(root, labeled, cache)] == [
        f'train2017/{i:012d}.jpg' for i in (2, 3, 9)]
    assert [s.image for s in read_split(cache)][-1] == f'train2017/{9:012d}.jpg'
    assert not list(tmp_path.glob('.*.tmp'))


def test_split_paths_and_build(tmp_path):
    root, labeled, _, _ = coco_layout(tmp_path)
    splits = tmp_path / 'splits'
    write_split(splits / 'coco/1_2/labeled.txt', labeled.read_text().split('\n')[:2])
    write_split(splits / 'coco/val.txt', labeled.read_text().split('\n')[:2])
    paths = split_paths('coco', '1_2', splits, data_root=root)
    assert paths.unlabeled == splits / 'coco/1_2/unlabeled.txt' and paths.unlabeled.exists()
    trainset_u, trainset_l, valset = build_semi_datasets('coco', root, '1_2', CROP, 81, splits)
    assert (len(trainset_u), len(trainset_l), len(valset)) == (2, 2, 2)
    write_split(splits / 'coco/1_4/labeled.txt', ['train2017/x.jpg masks/x.png'])
    with pytest.raises(ValueError, match='data_root'):
        split_paths('coco', '1_4', splits)
    write_split(splits / 'pascal/all/labeled.txt', ['a.jpg a.png'])
    assert split_paths('pascal', 'all', splits).unlabeled == splits / 'pascal/all/labeled.txt'
    write_split(splits / 'cityscapes/all/train.txt', ['a.png b.png'])
    write_split(splits / 'cityscapes/all/unlabeled.txt', ['c.png None'])
    paths = split_paths('cityscapes', 'all', splits)
    assert paths.labeled.name == 'train.txt' and paths.unlabeled.name == 'unlabeled.txt'
    with pytest.raises(FileNotFoundError, match='no labeled list'):
        split_paths('ade20k', '1_64', splits)


# Split sizes from the facts sheet (§2): (labeled, unlabeled) per split, and val.
REAL_SPLITS = {
    ('pascal', '92'): (92, 10490), ('pascal', '1464'): (1464, 9118),
    ('cityscapes', '1_16'): (186, 2789), ('cityscapes', 'all'): (2975, 19998),
    ('ade20k', '1_64'): (316, 19894), ('ade20k', '1_2'): (10105, 10105),
}
REAL_VAL = {'pascal': 1449, 'cityscapes': 500, 'ade20k': 2000, 'coco': 5000}


@pytest.mark.parametrize('dataset,split', sorted(REAL_SPLITS))
def test_shipped_splits(dataset, split):
    paths = split_paths(dataset, split, REPO / 'splits')
    labeled, unlabeled = read_split(paths.labeled), read_split(paths.unlabeled)
    assert (len(labeled), len(unlabeled)) == REAL_SPLITS[dataset, split]
    assert len(read_split(paths.val)) == REAL_VAL[dataset]
    assert all(s.mask for s in labeled)
    assert not {s.image for s in labeled} & {s.image for s in unlabeled}
    if (dataset, split) == ('cityscapes', 'all'):
        assert all(s.mask is None for s in unlabeled)


def test_shipped_coco_labeled_lists():
    assert len(read_split(REPO / 'splits/coco/1_512/labeled.txt')) == 232
    assert len(read_split(REPO / 'splits/coco/val.txt')) == REAL_VAL['coco']


def cutmix_draws(size, n=2000):
    rng = random.Random(0)
    return [cutmix_box(size, rng=rng) for _ in range(n)]


@pytest.mark.parametrize('size', [64, (48, 80)])
def test_cutmix_box_statistics(size):
    h, w = (size, size) if isinstance(size, int) else size
    boxes = cutmix_draws(size)
    empty = sum(not b.any() for b in boxes) / len(boxes)
    assert abs(empty - 0.5) < 0.05
    areas = []
    for box in boxes:
        assert box.shape == (h, w) and box.dtype == torch.bool
        if not box.any():
            continue
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        bh, bw = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw  # contiguous
        assert box.sum() == bh * bw  # a filled rectangle
        # Area U(0.02, 0.4) * HW, less what int() truncation of the sides drops.
        assert 0.02 * h * w - (bh + bw) <= bh * bw <= 0.4 * h * w
        areas.append(bh * bw / (h * w))
    # The box is never clipped by the border: the mean area stays near (0.02 + 0.4) / 2.
    assert abs(np.mean(areas) - 0.21) < 0.02


def test_registry():
    assert len(registry.class_names('pascal')) == 21
    assert len(registry.class_names('cityscapes')) == 19
    assert len(registry.class_names('ade20k')) == 150
    assert len(registry.class_names('coco')) == 81
    assert registry.class_names('coco')[0] == 'background'
    assert registry.class_names('toy') == ['background', 'h-stripes', 'v-stripes', 'diagonal',
                                          'checker', 'dots']
    assert registry.class_names('custom', 2, ['a', 'b']) == ['a', 'b']
    assert registry.class_names('custom', 2) == ['class_0', 'class_1']
    with pytest.raises(ValueError, match='2 class names'):
        registry.class_names('custom', 3, ['a', 'b'])
    with pytest.raises(ValueError, match='21 classes'):
        registry.get_nclass('pascal', 19)
    with pytest.raises(ValueError, match='nclass'):
        registry.get_nclass('custom')
    with pytest.raises(KeyError, match='known'):
        registry.get_spec('cifar100')
    voc = registry.get_palette('pascal')
    assert len(voc) == 768 and voc[3:9] == [128, 0, 0, 0, 128, 0] and voc[-3:] == [224, 224, 192]
    assert registry.get_palette('cityscapes')[:3] == [128, 64, 128]
    generated = registry.get_palette('custom', 4)
    assert len(generated) == 768 and generated == registry.get_palette('ade20k')
    assert registry.default_eval_mode('cityscapes') == 'sliding_window'
    assert registry.default_eval_mode('pascal') == 'original'


def make_custom_folder(root: Path, n: int) -> None:
    for i in range(n):
        (root / 'images').mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (4, 4)).save(root / 'images' / f'{i:03d}.jpg')
        write_mask(root / 'masks' / f'{i:03d}.png', (4, 4), 2, i)


def test_make_custom_split(tmp_path):
    root, splits = tmp_path / 'data', tmp_path / 'splits'
    make_custom_folder(root, 40)
    paths = make_custom_split(root, 'mine', fraction=0.1, val_fraction=0.25, splits_root=splits)
    assert paths['labeled'] == splits / 'mine/1_10/labeled.txt'
    val = {s.image for s in read_split(paths['val'])}
    labeled = [s.image for s in read_split(paths['labeled'])]
    unlabeled = [s.image for s in read_split(paths['unlabeled'])]
    assert (len(val), len(labeled), len(unlabeled)) == (10, 3, 27)
    assert not (val & set(labeled)) and not (val & set(unlabeled))
    assert read_split(paths['labeled'])[0].mask == f'masks/{Path(labeled[0]).stem}.png'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(paths['labeled'].stat().st_mode) == 0o666 & ~umask  # not a 0600 temp
    with pytest.raises(FileExistsError, match='labeled.txt'):
        make_custom_split(root, 'mine', fraction=0.1, splits_root=splits)
    # A second split keeps the existing val list out of training and nests the labeled set.
    more = make_custom_split(root, 'mine', count=6, splits_root=splits)
    assert 'val' not in more
    labeled6 = [s.image for s in read_split(more['labeled'])]
    assert labeled6[:3] == labeled and not val & set(labeled6)
    assert len(read_split(more['unlabeled'])) == 24
    # Another seed gives another split; --force overwrites.
    other = make_custom_split(root, 'mine', count=6, seed=1, splits_root=splits, force=True)
    assert [s.image for s in read_split(other['labeled'])] != labeled6
    (root / 'masks' / '000.png').unlink()
    with pytest.raises(FileNotFoundError, match='000.jpg'):
        make_custom_split(root, 'other', count=2, splits_root=splits)


def test_make_custom_split_cli(tmp_path):
    root, splits = tmp_path / 'data', tmp_path / 'splits'
    make_custom_folder(root, 8)
    cmd = [sys.executable, str(REPO / 'tools/make_custom_split.py'), '--root', str(root),
           '--name', 'mine', '--count', '2', '--splits-root', str(splits)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(read_split(splits / 'mine/2/labeled.txt')) == 2
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.startswith('error: split files exist') and '--force' in again.stderr
