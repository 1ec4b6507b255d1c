"""Pretrain the `dinov2_tiny` encoder that the toy dataset starts from, on a related generated task.

    python tools/pretrain_toy_encoder.py --out assets/toy_dinov2_tiny.pth --steps 3000

Why: semi-supervised learning pays where a labeled-only model is decent but well short of the
all-labels ceiling, which is what a pretrained DINOv2 encoder gives on the real benchmarks. A tiny
ViT trained from scratch on 100 toy images is not there: its teacher is confidently wrong. So the
toy encoder is pretrained first, on a task that is related but not the toy task itself:

- pretext images come from their own generator (other sizes, colours and backgrounds);
- pretext classes are texture *kinds* at any orientation: background, stripes, checkerboard, dots;
- the toy task asks for stripe *orientation* (horizontal, vertical, diagonal are three classes),
  which the pretext never labels, so the toy's labeled images must still teach it.

The output is a plain encoder state dict in the public DINOv2 file format (`pos_embed`,
`blocks.N...`, `mask_token`), loaded by the same code as `dinov2_vits14_pretrain.pth`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from dataset.toy import _shape, _smooth_field, _two_colors
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import build_model
from util.checkpoint import save_atomic

PRETEXT_CLASSES = ('background', 'stripes', 'checker', 'dots')
CROP = 112
PERIOD = (4.0, 11.0)          # wider than the toy's 5-9 px
OBJECTS = (1, 5)
EXTENT = (20, 90)


def pretext_texture(rng: np.random.Generator, kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bool pattern of texture `kind` (1 stripes, 2 checker, 3 dots) at a uniformly random angle."""
    period = rng.uniform(*PERIOD)
    angle = rng.uniform(0, math.pi)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period + rng.random()
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period + rng.random()
    if kind == 1:
        return (u % 1.0) < rng.uniform(0.3, 0.7)
    if kind == 2:
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    return (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < rng.uniform(0.2, 0.4) ** 2


def pretext_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CROP x CROP image (uint8 HWC) and its pretext mask."""
    h = w = CROP
    img = _smooth_field(rng, h, w, int(rng.integers(2, 10)), channels=3) * 255
    mask = np.zeros((h, w), np.int64)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
        kind = int(rng.integers(1, len(PRETEXT_CLASSES)))
        region = _shape(rng, h, w)
        pattern = pretext_texture(rng, kind, x, y)
        c1, c2 = _two_colors(rng)
        img[region] = np.where(pattern[region, None], c1, c2)
        mask[region] = kind
    img = img * rng.uniform(0.7, 1.3) + rng.standard_normal(img.shape) * rng.uniform(0, 10)
    return np.clip(img, 0, 255).astype(np.uint8), mask


class PretextStream(IterableDataset):
    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        mean = np.array(IMAGENET_MEAN, np.float32) * 255
        std = np.array(IMAGENET_STD, np.float32) * 255
        while True:
            img, mask = pretext_sample(rng)
            img = (img.astype(np.float32) - mean) / std
            yield torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='assets/toy_dinov2_tiny.pth')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = build_model('dinov2_tiny', len(PRETEXT_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = DataLoader(PretextStream(args.seed), batch_size=args.batch_size, num_workers=args.workers)
    t0, correct, seen = time.time(), 0, 0
    model.train()
    for step, (img, mask) in zip(range(args.steps), loader):
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group['lr'] = lr
        logits = model(img)
        loss = F.cross_entropy(logits, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += int((logits.argmax(1) == mask).sum())
        seen += mask.numel()
        if (step + 1) % 100 == 0:
            print(f'step {step + 1}/{args.steps}: loss {loss.item():.4f}, pixel acc {100 * correct / seen:.1f}%, '
                  f'{(time.time() - t0) / (step + 1):.2f} s/step', flush=True)
            correct = seen = 0
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    save_atomic(state, args.out)
    print(f'saved the encoder ({sum(v.numel() for v in state.values()) / 1e6:.2f}M values) to {args.out}')


if __name__ == '__main__':
    main()
