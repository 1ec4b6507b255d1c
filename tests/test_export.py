"""tools/export.py: a checkpoint saved as training saves it, exported to ONNX by the script, run by
onnxruntime on the CPU against PyTorch (`segmenter.Segmenter`, the evaluation's inference) on the
same images -- segmentation on DINOv2 (one size, any batch) and change detection on DINOv3 (any
batch and size).

Tolerance: both sides compute in float32; onnxruntime's kernels (its GEMMs, fused LayerNorm and
attention, the normalisation folded into the graph) add in other orders than PyTorch's, which moves
logits by rounding: measured up to 2e-7 on these tiny models (Intel Xeon). LOGIT_ATOL = 1e-4 leaves
room for other CPUs' kernels and is far below what a wrong export does (the student exported for
the EMA: 0.38; the normalisation skipped: 0.04 and more).

    python -m pytest tests/test_export.py -q        # ~2 min on 2 shared cores: two exports
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import tasks
from segmenter import Segmenter
from util.checkpoint import save_atomic
from util.config import to_dict
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LOGIT_ATOL = 1e-4          # see the module docstring
MIN_ARGMAX_AGREEMENT = 0.999


def training_checkpoint(path: Path, config: str, overrides: list[str]) -> Path:
    """A checkpoint laid out as engine/state.py's checkpoint_dict, student and EMA two different
    random inits (so that exporting the wrong one shows)."""
    cfg = load_config(ROOT / config, overrides)
    task = tasks.for_config(cfg)
    torch.manual_seed(0)
    student = task.build_model(cfg)
    torch.manual_seed(1)
    ema = task.build_model(cfg)
    save_atomic({'model': student.state_dict(), 'model_ema': ema.state_dict(), 'optimizer': {}, 'epoch': 0,
                 'iteration': 0, 'previous_best': 0.0, 'previous_best_ema': 0.0, 'best_epoch': 0,
                 'best_epoch_ema': 0, 'history': [], 'config': to_dict(cfg)}, path)
    return path


def run_export(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / 'tools/export.py'), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def smooth_images(n: int, h: int, w: int, seed: int) -> list[Image.Image]:
    """RGB images with structure at several scales (coarse random colours, upsampled, plus noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
        arr = arr + rng.integers(-20, 21, arr.shape)
        out.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return out


def pixels(images: list[Image.Image]) -> np.ndarray:
    """float32 [B, 3, H, W], 0..255: what the exported graph takes."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) for im in images])


def torch_logits(seg: Segmenter, *images: Image.Image) -> np.ndarray:
    with torch.inference_mode():
        return seg.model(seg.task.model_input(list(images))[None]).numpy()[0]


def compare(onnx_logits: np.ndarray, seg: Segmenter, samples: list[tuple[Image.Image, ...]]) -> tuple[float, float]:
    """(max abs logit difference, fraction of pixels with the same class) of the ONNX logits
    [B, C, H, W] against PyTorch's for each sample: its logits, and the class map of
    Segmenter.predict (the evaluation's inference)."""
    diff, same, total = 0.0, 0, 0
    for logits, sample in zip(onnx_logits, samples):
        ref = torch_logits(seg, *sample)
        assert logits.shape == ref.shape
        diff = max(diff, float(np.abs(logits - ref).max()))
        ids = seg.predict(*sample)
        same += int((logits.argmax(0) == ids).sum())
        total += ids.size
    return diff, same / total


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """{'seg' | 'cd': (checkpoint, onnx file, the script's output)}, exported once per module."""
    base = tmp_path_factory.mktemp('export')
    seg = training_checkpoint(base / 'seg/best.pth', 'configs/toy.yaml',
                              ['backbone=dinov2_tiny', 'pretrained=null', 'crop_size=56'])
    cd = training_checkpoint(base / 'cd/latest.pth', 'configs/toy_cd.yaml',
                             ['backbone=dinov3_tiny', 'pretrained=null', 'crop_size=64'])
    return {'seg': (seg, base / 'seg.onnx', run_export('--checkpoint', str(seg), '--weights', 'ema', '--size', '42',
                                                       '70', '--output', str(base / 'seg.onnx'))),
            'cd': (cd, base / 'cd.onnx', run_export('--checkpoint', str(cd), '--output', str(base / 'cd.onnx')))}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def metadata(path: Path) -> dict:
    model = onnx.load(str(path))
    return json.loads({p.key: p.value for p in model.metadata_props}['semiseg']) | {
        'opset': next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))}


def test_segmentation_onnx_matches_pytorch(exported):
    ckpt, path, out = exported['seg']
    assert 'ema weights' in out and 'opset 18' in out
    meta = metadata(path)
    assert (meta['weights'], meta['task'], meta['opset'], meta['size']) == ('ema', 'segmentation', 18, [42, 70])
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ['image'] and sess.get_inputs()[0].shape[1:] == [3, 42, 70]
    seg = Segmenter.from_checkpoint(ckpt, weights='ema', device='cpu')
    images = smooth_images(3, 42, 70, seed=0)
    for batch in (images, images[:1]):           # any batch size
        logits = sess.run(None, {'image': pixels(batch)})[0]
        diff, agree = compare(logits, seg, [(im,) for im in batch])
        print(f'segmentation, batch {len(batch)}: max |logit diff| {diff:.2e}, argmax agreement {agree:.4%}')
        assert diff <= LOGIT_ATOL and agree >= MIN_ARGMAX_AGREEMENT
    with pytest.raises(Exception, match='dimensions'):   # DINOv2: exported at one size, others refused
        sess.run(None, {'image': pixels(smooth_images(1, 56, 56, seed=1))})


def test_change_detection_onnx_matches_pytorch_at_two_sizes(exported):
    ckpt, path, out = exported['cd']
    meta = metadata(path)
    assert (meta['weights'], meta['task'], meta['inputs']) == ('student', 'change_detection', ['image_a', 'image_b'])
    assert meta['size'].startswith('dynamic')
    sess = session(path)
    seg = Segmenter.from_checkpoint(ckpt, device='cpu')
    assert seg.weights == 'student'
    for k, (h, w) in enumerate([(64, 80), (48, 96)]):    # DINOv3: any size (multiples of 16)
        a, b = smooth_images(2, h, w, seed=2 * k), smooth_images(2, h, w, seed=2 * k + 1)
        logits = sess.run(None, {'image_a': pixels(a), 'image_b': pixels(b)})[0]
        diff, agree = compare(logits, seg, list(zip(a, b)))
        print(f'change detection {h}x{w}: max |logit diff| {diff:.2e}, argmax agreement {agree:.4%}')
        assert diff <= LOGIT_ATOL and agree >= MIN_ARGMAX_AGREEMENT
