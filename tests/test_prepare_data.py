"""tools/prepare_data.py on tiny synthetic archives in each publisher's layout: a few images and
masks written here, one bad file reported by name, then the bad file fixed and the run resumed."""
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from dataset.registry import COCO_CLASSES, voc_palette
from tools import prepare_data

# ---- writing archives ------------------------------------------------------------------------------


def png(arr: np.ndarray, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(arr.astype(np.uint8))
    if palette is not None:
        img = img.convert('P')
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def jpg(h: int, w: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='JPEG')
    return buf.getvalue()


def sbd_mat(seg: np.ndarray) -> bytes:
    buf = io.BytesIO()
    savemat(buf, {'GTcls': {'Segmentation': seg.astype(np.uint8), 'Boundaries': np.zeros((1, 1)),
                            'CategoriesPresent': np.unique(seg).astype(np.uint8)}})
    return buf.getvalue()


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    """A .zip, .tar or .tgz/.tar.gz holding `files` (member name -> bytes)."""
    if path.suffix == '.zip':
        with zipfile.ZipFile(path, 'w') as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, 'w:gz' if path.name.endswith(('.tgz', '.tar.gz')) else 'w') as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def write_splits(root: Path, lists: dict[str, list[str]]) -> Path:
    for rel, lines in lists.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(''.join(line + '\n' for line in lines))
    return root


def listing(dst: Path) -> list[str]:
    return sorted(p.relative_to(dst).as_posix() for p in dst.rglob('*') if p.is_file())


def run(name: str, srcs: list[Path], dst: Path, splits: Path) -> int:
    return prepare_data.main([name, '--src', *map(str, srcs), '--dst', str(dst), '--splits', str(splits)])


def mask_of(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode in ('L', 'P')
        return np.array(img)


def fails_naming(capsys, name: str, srcs: list[Path], dst: Path, splits: Path, bad: str) -> str:
    assert run(name, srcs, dst, splits) == 1
    err = capsys.readouterr().err
    print(err)
    assert bad in err, err
    assert not [p for p in dst.rglob('.*.tmp*')], 'a temporary file was left behind'
    return err


def succeeds(capsys, name: str, srcs: list[Path], dst: Path, splits: Path) -> str:
    assert run(name, srcs, dst, splits) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    print(out)
    print('\n'.join(listing(dst)))
    assert 'no errors' in out and not (dst / '.sources').exists()
    return out


# ---- pascal -------------------------------------------------------------------------------------------

def test_pascal_from_voc_and_sbd(tmp_path, capsys):
    voc_mask = np.zeros((12, 16), np.uint8)
    voc_mask[3:9, 4:12] = 15
    voc_mask[2, 3:13] = 255                      # VOC's object border
    sbd_mask = np.full((12, 16), 7, np.uint8)    # differs where VOC has its own mask: VOC must win
    sbd_only = np.zeros((10, 14), np.uint8)
    sbd_only[:, 7:] = 20
    voc = {f'VOCdevkit/VOC2012/JPEGImages/{i}.jpg': jpg(12, 16) for i in ('2007_000032', '2008_000002')}
    voc['VOCdevkit/VOC2012/JPEGImages/2008_000003.jpg'] = jpg(10, 14)
    voc['VOCdevkit/VOC2012/SegmentationClass/2007_000032.png'] = png(voc_mask, voc_palette())
    voc['VOCdevkit/VOC2012/SegmentationClass/2008_000002.png'] = png(voc_mask, voc_palette())
    sbd = {'benchmark_RELEASE/dataset/cls/2008_000002.mat': sbd_mat(sbd_mask),
           'benchmark_RELEASE/dataset/cls/2008_000003.mat': sbd_mat(sbd_only),
           'benchmark_RELEASE/dataset/cls/2008_000004.mat': b'MATLAB 5.0 MAT-file, truncated',
           'benchmark_RELEASE/dataset/img/2008_000004.jpg': jpg(10, 14)}
    for stem in ('2008_000002', '2008_000003'):
        sbd[f'benchmark_RELEASE/dataset/img/{stem}.jpg'] = jpg(12, 16)
    line = 'JPEGImages/{0}.jpg SegmentationClass/{0}.png'.format
    splits = write_splits(tmp_path / 'splits', {
        '92/labeled.txt': [line('2008_000002')],
        '92/unlabeled.txt': [line('2008_000003'), line('2008_000004')],
        'val.txt': [line('2007_000032')]})
    srcs = [write_archive(tmp_path / 'VOCtrainval_11-May-2012.tar', voc),
            write_archive(tmp_path / 'benchmark.tgz', sbd)]
    dst = tmp_path / 'data/pascal'

    fails_naming(capsys, 'pascal', srcs, dst, splits, bad='2008_000004.mat')
    assert (dst / 'SegmentationClass/2008_000003.png').is_file()       # the others were written
    sbd['benchmark_RELEASE/dataset/cls/2008_000004.mat'] = sbd_mat(sbd_only)
    write_archive(srcs[1], sbd)
    succeeds(capsys, 'pascal', srcs, dst, splits)

    assert listing(dst) == [f'JPEGImages/{i}.jpg' for i in ('2007_000032', '2008_000002', '2008_000003', '2008_000004')] \
        + [f'SegmentationClass/{i}.png' for i in ('2007_000032', '2008_000002', '2008_000003', '2008_000004')]
    np.testing.assert_array_equal(mask_of(dst / 'SegmentationClass/2008_000002.png'), voc_mask)
    np.testing.assert_array_equal(mask_of(dst / 'SegmentationClass/2008_000003.png'), sbd_only)
    with Image.open(dst / 'SegmentationClass/2007_000032.png') as img:
        assert img.mode == 'P' and img.getpalette()[15 * 3:16 * 3] == voc_palette()[15 * 3:16 * 3]


# ---- cityscapes ---------------------------------------------------------------------------------------

def test_cityscapes_label_ids_to_train_ids(tmp_path, capsys):
    label_ids = np.array([[0, 1, 7, 8], [11, 26, 33, 4], [24, 25, 31, 32]], np.uint8)
    train_ids = np.array([[255, 255, 0, 1], [2, 13, 18, 255], [11, 12, 16, 17]], np.uint8)
    frames = {'train': 'aachen/aachen_000000_000019', 'val': 'frankfurt/frankfurt_000000_000294'}
    images, labels = {}, {}
    for split, frame in frames.items():
        images[f'leftImg8bit/{split}/{frame}_leftImg8bit.png'] = png(np.zeros((3, 4, 3)))
        labels[f'gtFine/{split}/{frame}_gtFine_labelIds.png'] = png(label_ids)
        labels[f'gtFine/{split}/{frame}_gtFine_color.png'] = png(np.zeros((3, 4, 3)))   # not used
        labels[f'gtFine/{split}/{frame}_gtFine_polygons.json'] = b'{}'
    bad = 'gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png'
    labels[bad] = png(np.full((3, 4), 40))     # not a Cityscapes label id
    splits = write_splits(tmp_path / 'splits', {
        f'{name}.txt' if name == 'val' else f'1_16/labeled.txt':
            [f'leftImg8bit/{split}/{f}_leftImg8bit.png gtFine/{split}/{f}_gtFine_labelTrainIds.png']
        for name, (split, f) in (('train', ('train', frames['train'])), ('val', ('val', frames['val'])))})
    srcs = [write_archive(tmp_path / 'leftImg8bit_trainvaltest.zip', images),
            write_archive(tmp_path / 'gtFine_trainvaltest.zip', labels)]
    dst = tmp_path / 'data/cityscapes'

    err = fails_naming(capsys, 'cityscapes', srcs, dst, splits, bad=Path(bad).name)
    assert 'unexpected values [40]' in err
    labels[bad] = png(label_ids)
    write_archive(srcs[1], labels)
    succeeds(capsys, 'cityscapes', srcs, dst, splits)

    assert listing(dst) == sorted(
        [f'leftImg8bit/{s}/{f}_leftImg8bit.png' for s, f in frames.items()]
        + [f'gtFine/{s}/{f}_gtFine_labelTrainIds.png' for s, f in frames.items()])
    for split, frame in frames.items():
        np.testing.assert_array_equal(mask_of(dst / f'gtFine/{split}/{frame}_gtFine_labelTrainIds.png'), train_ids)


# ---- ade20k -------------------------------------------------------------------------------------------

def test_ade20k_other_becomes_ignore(tmp_path, capsys):
    raw = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
    root = 'ADEChallengeData2016'
    files = {}
    for split, name in (('training', 'ADE_train_00000001'), ('validation', 'ADE_val_00000001')):
        files[f'{root}/images/{split}/{name}.jpg'] = jpg(2, 3)
        files[f'{root}/annotations/{split}/{name}.png'] = png(raw)
    bad = f'{root}/annotations/training/ADE_train_00000002.png'
    files[f'{root}/images/training/ADE_train_00000002.jpg'] = jpg(2, 3)
    files[bad] = png(raw)[:40]                 # truncated
    splits = write_splits(tmp_path / 'splits', {
        '1_64/labeled.txt': [f'images/training/ADE_train_0000000{i}.jpg annotations/training/ADE_train_0000000{i}.png'
                             for i in (1, 2)],
        'val.txt': ['images/validation/ADE_val_00000001.jpg annotations/validation/ADE_val_00000001.png']})
    src = write_archive(tmp_path / 'ADEChallengeData2016.zip', files)
    dst = tmp_path / 'data/ade20k'

    fails_naming(capsys, 'ade20k', [src], dst, splits, bad='ADE_train_00000002.png')
    files[bad] = png(raw)
    write_archive(src, files)
    succeeds(capsys, 'ade20k', [src], dst, splits)

    assert len(listing(dst)) == 6
    np.testing.assert_array_equal(mask_of(dst / 'annotations/validation/ADE_val_00000001.png'),
                                  [[255, 0, 1], [149, 74, 255]])


# ---- coco ---------------------------------------------------------------------------------------------

COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
            *range(72, 83), *range(84, 91)]   # the 80 category ids of instances_*2017.json


def rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string of `counts` (the inverse of what the converter decodes)."""
    out = []
    for i, x in enumerate(counts):
        x -= counts[i - 2] if i > 2 else 0
        more = True
        while more:
            c, x = x & 0x1f, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | (0x20 if more else 0)) + 48))
    return ''.join(out)


def rle_counts(region: np.ndarray) -> list[int]:
    flat = region.T.reshape(-1).astype(int)          # column-major
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], changes])).tolist()


def test_rle_string_is_pycocotools_encoding():
    """The helpers above write COCO's compressed RLE as pycocotools encodes it."""
    from pycocotools import mask as coco_mask
    region = np.zeros((6, 5), bool)
    region[1:4, 2:4] = True
    region[5, 0] = True
    assert rle_string(rle_counts(region)) == coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))['counts'].decode()


def coco_json(images: list[dict], annotations: list[dict]) -> bytes:
    categories = [{'id': i, 'name': n, 'supercategory': ''} for i, n in zip(COCO_IDS, COCO_CLASSES[1:])]
    return json.dumps({'images': images, 'annotations': annotations, 'categories': categories}).encode()


def test_coco_81_class_masks_from_instances(tmp_path, capsys):
    h, w = 12, 16
    person = np.zeros((h, w), bool)
    person[1:11, 1:15] = True                  # large: painted first
    small = np.zeros((h, w), bool)
    small[5:8, 6:9] = True                     # on top of the person: stays visible
    train_images = [{'id': 9, 'file_name': '000000000009.jpg', 'height': h, 'width': w},
                    {'id': 25, 'file_name': '000000000025.jpg', 'height': h, 'width': w}]
    train_anns = [
        {'id': 1, 'image_id': 9, 'category_id': 1, 'iscrowd': 1, 'area': int(person.sum()),
         'segmentation': {'size': [h, w], 'counts': rle_counts(person)}},                 # uncompressed RLE
        {'id': 2, 'image_id': 9, 'category_id': 90, 'iscrowd': 0, 'area': int(small.sum()),
         'segmentation': {'size': [h, w], 'counts': rle_string(rle_counts(small))}},      # compressed RLE
        {'id': 3, 'image_id': 25, 'category_id': 18, 'iscrowd': 0, 'area': 48.0,
         'segmentation': [[2, 2, 9, 2, 9, 7, 2, 7]]}]                                       # polygon
    val_images = [{'id': 139, 'file_name': '000000000139.jpg', 'height': h, 'width': w}]   # no instances
    bad_ann = {'id': 4, 'image_id': 139, 'category_id': 5, 'iscrowd': 1, 'area': 3,
               'segmentation': {'size': [h, w], 'counts': [1, 2]}}                          # runs do not cover it
    annotations = {'annotations/instances_train2017.json': coco_json(train_images, train_anns),
                   'annotations/instances_val2017.json': coco_json(val_images, [bad_ann])}
    srcs = [write_archive(tmp_path / 'train2017.zip', {f'train2017/{i["file_name"]}': jpg(h, w) for i in train_images}),
            write_archive(tmp_path / 'val2017.zip', {f'val2017/{i["file_name"]}': jpg(h, w) for i in val_images}),
            write_archive(tmp_path / 'annotations_trainval2017.zip', annotations)]
    splits = write_splits(tmp_path / 'splits', {
        '1_512/labeled.txt': ['train2017/000000000009.jpg masks/000000000009.png'],
        'val.txt': ['val2017/000000000139.jpg masks/000000000139.png']})
    dst = tmp_path / 'data/coco'

    err = fails_naming(capsys, 'coco', srcs, dst, splits, bad='instances_val2017.json')
    assert 'image 000000000139.jpg (id 139)' in err
    annotations['annotations/instances_val2017.json'] = coco_json(val_images, [])
    write_archive(srcs[2], annotations)
    succeeds(capsys, 'coco', srcs, dst, splits)

    assert listing(dst) == ['masks/000000000009.png', 'masks/000000000025.png', 'masks/000000000139.png',
                            'train2017/000000000009.jpg', 'train2017/000000000025.jpg', 'val2017/000000000139.jpg']
    mask = mask_of(dst / 'masks/000000000009.png')
    assert COCO_CLASSES[1] == 'person' and COCO_CLASSES[80] == 'toothbrush'
    expected = np.where(small, 80, np.where(person, 1, 0))   # category 90 = toothbrush = class 80
    np.testing.assert_array_equal(mask, expected)
    dog = mask_of(dst / 'masks/000000000025.png')
    assert COCO_CLASSES[17] == 'dog' and dog[4, 5] == 17 and dog[0, 0] == 0 and dog[10, 12] == 0
    assert set(np.unique(dog).tolist()) == {0, 17}
    assert not mask_of(dst / 'masks/000000000139.png').any()


def test_coco_category_list_is_checked_against_the_class_list(tmp_path, capsys):
    wrong = json.loads(coco_json([], []))
    wrong['categories'][16]['name'] = 'wolf'
    files = {'annotations/instances_train2017.json': json.dumps(wrong).encode(),
             'annotations/instances_val2017.json': coco_json([], [])}
    (tmp_path / 'train2017').mkdir()
    (tmp_path / 'val2017').mkdir()
    srcs = [write_archive(tmp_path / 'annotations_trainval2017.zip', files), tmp_path / 'train2017', tmp_path / 'val2017']
    assert run('coco', srcs, tmp_path / 'data', write_splits(tmp_path / 'splits', {'val.txt': ['a b']})) == 1
    assert "position 17: 'wolf' vs 'dog'" in capsys.readouterr().err


# ---- levir / whu --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,zip_name,tiles', [('levir', 'LEVIR-CD', ['train_1_1.png', 'train_1_2.png', 'test_7_16.png']),
                                                 ('whu', 'WHU-CD', ['whucd_00001.png', 'whucd_06645.png', 'whucd_01210.png'])])
def test_change_detection_tiles(tmp_path, capsys, name, zip_name, tiles):
    label = np.zeros((8, 8), np.uint8)
    label[2:5, 2:6] = 255
    files = {}
    for i, tile in enumerate(tiles):
        files[f'{zip_name}/A/{tile}'] = png(np.full((8, 8, 3), i))
        files[f'{zip_name}/B/{tile}'] = png(np.full((8, 8, 3), 2 * i))
        files[f'{zip_name}/label/{tile}'] = png(label)
    bad = f'{zip_name}/B/{tiles[2]}'
    files[bad] = b'\x89PNG not really'
    splits = write_splits(tmp_path / 'splits', {'5%/labeled.txt': tiles[:1], '5%/unlabeled.txt': tiles[1:2],
                                                'test.txt': tiles[2:]})
    src = write_archive(tmp_path / f'{zip_name}.zip', files)
    dst = tmp_path / f'data/{name}'

    fails_naming(capsys, name, [src], dst, splits, bad=f'B/{tiles[2]}')
    files[bad] = png(np.zeros((8, 8, 3)))
    write_archive(src, files)
    out = succeeds(capsys, name, [src], dst, splits)
    assert 'checked every file of 3 split lists' in out      # the tiles' lists, checked as tiles
    assert listing(dst) == sorted(f'{folder}/{tile}' for folder in ('A', 'B', 'label') for tile in tiles)
    np.testing.assert_array_equal(mask_of(dst / 'label' / tiles[0]), label)


# ---- the skeleton ---------------------------------------------------------------------------------------

def test_archive_escaping_its_folder_is_refused(tmp_path, capsys):
    src = write_archive(tmp_path / 'ADEChallengeData2016.zip', {'../evil.txt': b'x'})
    assert run('ade20k', [src], tmp_path / 'data', write_splits(tmp_path / 'splits', {'val.txt': ['a b']})) == 1
    assert 'would be written outside the extraction folder' in capsys.readouterr().err
    assert not (tmp_path / 'data' / 'evil.txt').exists() and not (tmp_path / 'evil.txt').exists()


def test_rerun_after_success_writes_nothing(tmp_path, capsys):
    files = {'ADEChallengeData2016/images/validation/ADE_val_00000001.jpg': jpg(2, 3),
             'ADEChallengeData2016/annotations/validation/ADE_val_00000001.png': png(np.ones((2, 3)))}
    src = write_archive(tmp_path / 'ADEChallengeData2016.zip', files)
    splits = write_splits(tmp_path / 'splits', {
        'val.txt': ['images/validation/ADE_val_00000001.jpg annotations/validation/ADE_val_00000001.png']})
    succeeds(capsys, 'ade20k', [src], tmp_path / 'data', splits)
    succeeds(capsys, 'ade20k', [src], tmp_path / 'data', splits)
    assert run('ade20k', [src], tmp_path / 'data', splits) == 0
    assert 'wrote 0 files' in capsys.readouterr().out


def test_missing_split_files_are_an_error(tmp_path, capsys):
    files = {'ADEChallengeData2016/images/validation/ADE_val_00000001.jpg': jpg(2, 3),
             'ADEChallengeData2016/annotations/validation/ADE_val_00000001.png': png(np.ones((2, 3)))}
    src = write_archive(tmp_path / 'ADEChallengeData2016.zip', files)
    splits = write_splits(tmp_path / 'splits', {'val.txt': [
        'images/validation/ADE_val_00000001.jpg annotations/validation/ADE_val_00000001.png',
        'images/validation/ADE_val_00000002.jpg annotations/validation/ADE_val_00000002.png']})
    assert run('ade20k', [src], tmp_path / 'data', splits) == 1
    assert 'only 1 of 2 listed samples were prepared' in capsys.readouterr().err
