"""COCO masks as pycocotools makes them: `tools/prepare_data.py coco` on a synthetic
instances_*.json against pycocotools' own COCO API used directly (`COCO.annToMask`, instances
painted largest first, the order dataset/prepare/converters.py documents): 0 differing pixels.

The file holds what makes rasterisers disagree: overlapping concave polygons, instances of several
parts, polygons on the image border and past it, slivers thinner than a pixel, 4 x 4 squares on
integer corners, and crowd regions as uncompressed and as compressed RLE.

    python -m pytest tests/test_coco_masks.py -q
"""
from __future__ import annotations

import io
import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from dataset.registry import COCO_CLASSES
from tools import prepare_data

COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
            *range(72, 83), *range(84, 91)]   # the 80 category ids of instances_*2017.json
SIZES = [(48, 64), (61, 77), (90, 50), (33, 33)]     # (height, width): odd sizes too


def star(rng: random.Random, cx: float, cy: float, radius: float, points: int) -> list[float]:
    """A concave polygon: `points` vertices around (cx, cy) at random radii (flattened x, y)."""
    out = []
    for k in range(points):
        angle = 2 * math.pi * (k + rng.uniform(0, 0.8)) / points
        r = radius * rng.uniform(0.3, 1.0)
        out += [round(cx + r * math.cos(angle), 2), round(cy + r * math.sin(angle), 2)]
    return out


def polygons(rng: random.Random, h: int, w: int) -> list[list[list[float]]]:
    """The polygon instances of one image (each a list of parts)."""
    x, y = rng.randint(2, w - 8), rng.randint(2, h - 8)
    return [
        [star(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, h / 2), rng.randint(5, 12))],   # concave
        [star(rng, w / 2, h / 2, h / 3, 9)],                                                              # overlaps
        [star(rng, w * 0.3, h * 0.3, 6, 6), star(rng, w * 0.7, h * 0.7, 5, 7)],                         # two parts
        [[x, y, x + 4, y, x + 4, y + 4, x, y + 4]],                                                       # 4 x 4 square
        [[0, 0, w, 0, w, 3, 0, 3]],                                                                       # on the border
        [[-6.5, h * 0.6, w * 0.4, h + 5.2, -3, h + 9]],                                                   # past it
        [[w + 4, -4, w - 5.5, h / 2, w + 7, h + 1]],
        [[1.2, h / 3, w - 2, h / 3 + 0.3, w - 2, h / 3 + 0.6, 1.2, h / 3 + 0.4]],                          # sliver
        [[x + 0.5, 1, x + 0.7, h - 2, x + 0.6, h - 2]],                                                   # vertical sliver
    ]


def crowd(rng: np.random.Generator, h: int, w: int, compressed: bool) -> dict:
    """A crowd region as COCO stores it: RLE, uncompressed (counts a list) or compressed (a string)."""
    region = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    region[y0:y0 + h // 3, x0:x0 + w // 3] = 1
    region[rng.random((h, w)) < 0.05] = 1
    rle = coco_mask.encode(np.asfortranarray(region))
    if compressed:
        return {'size': [h, w], 'counts': rle['counts'].decode()}
    flat = region.T.reshape(-1)            # column-major runs, starting with zeros
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {'size': [h, w], 'counts': ([0] if flat[0] else []) + counts}


def instances_json(split: str, n_images: int, seed: int) -> dict:
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        h, w = SIZES[i % len(SIZES)]
        image_id = 1000 * seed + i + 1
        images.append({'id': image_id, 'file_name': f'{image_id:012d}.jpg', 'height': h, 'width': w})
        segmentations = [(s, 0) for s in polygons(rng, h, w)]
        segmentations += [(crowd(nprng, h, w, compressed=False), 1), (crowd(nprng, h, w, compressed=True), 1)]
        for segm, iscrowd in segmentations:
            rle = coco_mask.merge(coco_mask.frPyObjects(segm, h, w)) if isinstance(segm, list) else \
                coco_mask.frPyObjects(segm, h, w) if isinstance(segm['counts'], list) else segm
            anns.append({'id': len(anns) + 1, 'image_id': image_id, 'category_id': rng.choice(COCO_IDS),
                         'iscrowd': iscrowd, 'segmentation': segm, 'area': float(coco_mask.area(rle)),
                         'bbox': [0, 0, 1, 1]})
    categories = [{'id': i, 'name': n, 'supercategory': ''} for i, n in zip(COCO_IDS, COCO_CLASSES[1:])]
    return {'images': images, 'annotations': anns, 'categories': categories}


def jpg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (w, h), (90, 120, 30)).save(buf, format='JPEG')
    return buf.getvalue()


def reference_mask(coco: COCO, image_id: int) -> np.ndarray:
    """pycocotools' COCO API: annToMask for each instance, painted largest first with its class."""
    classes = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    info = coco.loadImgs(image_id)[0]
    out = np.zeros((info['height'], info['width']), np.uint8)
    for ann in sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)), key=lambda a: -a['area']):
        out[coco.annToMask(ann) == 1] = classes[ann['category_id']]
    return out


def write_coco(tmp_path: Path, n_images: int = 8) -> tuple[list[Path], Path, dict]:
    """The three archives of a synthetic COCO, split lists naming every image, the two json files."""
    jsons = {split: instances_json(split, n_images, seed) for seed, split in enumerate(('train2017', 'val2017'), 1)}
    srcs = []
    for split, js in jsons.items():
        with zipfile.ZipFile(tmp_path / f'{split}.zip', 'w') as zf:
            for img in js['images']:
                zf.writestr(f'{split}/{img["file_name"]}', jpg(img['height'], img['width']))
        srcs.append(tmp_path / f'{split}.zip')
    with zipfile.ZipFile(tmp_path / 'annotations_trainval2017.zip', 'w') as zf:
        for split, js in jsons.items():
            zf.writestr(f'annotations/instances_{split}.json', json.dumps(js))
    srcs.append(tmp_path / 'annotations_trainval2017.zip')
    splits = tmp_path / 'splits'
    (splits / '1_512').mkdir(parents=True)
    lines = {split: [f'{split}/{i["file_name"]} masks/{Path(i["file_name"]).stem}.png' for i in js['images']]
             for split, js in jsons.items()}
    (splits / '1_512/labeled.txt').write_text(''.join(f'{line}\n' for line in lines['train2017']))
    (splits / 'val.txt').write_text(''.join(f'{line}\n' for line in lines['val2017']))
    return srcs, splits, jsons


def test_masks_equal_pycocotools_pixel_for_pixel(tmp_path, capsys):
    srcs, splits, jsons = write_coco(tmp_path)
    dst = tmp_path / 'data/coco'
    assert prepare_data.main(['coco', '--src', *map(str, srcs), '--dst', str(dst), '--splits', str(splits)]) == 0, \
        capsys.readouterr().err
    differing = total = 0
    for split, js in jsons.items():
        path = tmp_path / f'instances_{split}.json'
        path.write_text(json.dumps(js))
        coco = COCO(str(path))
        for img in js['images']:
            ours = np.array(Image.open(dst / 'masks' / f'{Path(img["file_name"]).stem}.png'))
            ref = reference_mask(coco, img['id'])
            assert ours.shape == ref.shape
            differing += int((ours != ref).sum())
            total += ref.size
            assert len(np.unique(ref)) > 5            # many instances visible: the comparison means something
    print(f'{differing} of {total} pixels differ from pycocotools')
    assert differing == 0


@pytest.mark.parametrize('segmentation, message', [
    ({'size': [4, 5], 'counts': [1, 2]}, 'RLE run lengths sum to 3, not 4 x 5'),
    ({'size': [4, 5], 'counts': '12'}, 'does not cover 4 x 5 pixels'),        # decodes into uninitialised memory
    ({'size': [5, 4], 'counts': [20]}, 'RLE size [5, 4] differs from the image 4 x 5'),
])
def test_malformed_rle_is_refused(segmentation, message):
    from dataset.prepare.converters import PrepareError, instance_region
    with pytest.raises(PrepareError, match=message.replace('[', r'\[').replace(']', r'\]')):
        instance_region(segmentation, 4, 5)
