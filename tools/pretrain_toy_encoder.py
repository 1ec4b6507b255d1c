"""Pretrain the `dinov2_tiny` encoder that the toy dataset starts from, on a related generated task.

    python tools/pretrain_toy_encoder.py --out assets/toy_dinov2_tiny.pth

Why: semi-supervised learning pays where a labeled-only model is decent but well short of the
all-labels ceiling, which is what a pretrained DINOv2 encoder gives on the real benchmarks. A tiny
ViT trained from scratch on the toy is not there: within a CPU budget it is limited by optimisation,
not by labels, so unlabeled images cannot help. The encoder is therefore pretrained first, on a task
that is related to the toy but is not the toy task, as COCO-Stuff is related to Pascal:

- images come from the toy generator with a separate seed stream (never the toy dataset's own
  train or val images), with smaller objects and finer patterns than the toy's, and with *other
  classes*: three pattern families whose orientation is
  uniformly random (stripes at any angle, checkerboards and dot lattices at any rotation) plus
  background. The toy's classes split the stripes by orientation (horizontal, vertical, diagonal);
  that distinction is never taught here, only the texture families are;
- the labels are per-patch class shares (the pretext's 4 classes, pooled over each 14x14 patch),
  learned by a linear layer on the last block's patch tokens, thrown away afterwards.

The output is a plain encoder state dict in the public DINOv2 file format (`pos_embed`,
`blocks.N...`, `mask_token`), loaded by the same code as `dinov2_vits14_pretrain.pth`
(`pretrained: assets/toy_dinov2_tiny.pth` in configs/toy.yaml).
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
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from dataset.toy import Scene, make_sample                       # noqa: E402
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD       # noqa: E402
from model import PRESETS                                        # noqa: E402
from model.dinov2 import DinoV2Encoder                           # noqa: E402
from util.checkpoint import save_atomic                          # noqa: E402

CROP = 112
PATCH = 14
SEED_STREAM = 1_000_003      # far from the toy dataset's (seed, split, index) keys
PRETEXT_CLASSES = ('background', 'stripes', 'checker', 'dots')
# Fewer, smaller objects with finer patterns than the toy's own scenes (another domain, as
# pretraining data is); the shipped assets/toy_dinov2_tiny.pth was made with these.
PRETEXT_SCENE = Scene(objects=(1, 4), extent=(30, 80), period=(8.0, 13.0))


def pretext_texture(rng: np.random.Generator, cls: int) -> tuple[str, float]:
    """Pretext class 1..3 -> a pattern family at a uniformly random orientation."""
    return PRETEXT_CLASSES[cls], rng.uniform(0.0, 180.0)


class PretextStream(IterableDataset):
    """Endless (image, patch class shares) pairs: a random CROP x CROP crop of a generated image
    (flipped at random) and a [4, CROP/14, CROP/14] map of each class's share of each patch."""

    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([SEED_STREAM, self.seed, info.id if info else 0])
        mean = np.array(IMAGENET_MEAN, np.float32) * 255
        std = np.array(IMAGENET_STD, np.float32) * 255
        nclass = len(PRETEXT_CLASSES)
        while True:
            img, mask = make_sample(rng, nclass, pretext_texture, PRETEXT_SCENE)
            h, w = mask.shape
            top, left = rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1)
            img, mask = img[top:top + CROP, left:left + CROP], mask[top:top + CROP, left:left + CROP]
            img = torch.from_numpy((img.astype(np.float32) - mean) / std).permute(2, 0, 1)
            onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), nclass).permute(2, 0, 1)
            shares = F.avg_pool2d(onehot.float()[None], PATCH)[0]
            yield img, shares


class PatchClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = DinoV2Encoder.from_preset(PRESETS['tiny'])
        self.head = nn.Linear(self.encoder.embed_dim, len(PRETEXT_CLASSES))
        self.last_block = len(self.encoder.blocks) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> per-patch logits [B, C, H/14, W/14]."""
        tokens = self.encoder.get_intermediate_layers(x, (self.last_block,))[0]
        b, n, _ = tokens.shape
        side = x.shape[-1] // PATCH
        return self.head(tokens).transpose(1, 2).reshape(b, -1, n // side, side)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='assets/toy_dinov2_tiny.pth')
    p.add_argument('--steps', type=int, default=1500)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = PatchClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = DataLoader(PretextStream(args.seed), batch_size=args.batch_size, num_workers=args.workers)
    t0, correct, seen = time.time(), 0, 0
    model.train()
    for step, (img, shares) in zip(range(args.steps), loader):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group['lr'] = lr
        with torch.autocast('cpu', torch.bfloat16):
            logits = model(img)
        loss = -(shares * F.log_softmax(logits.float(), 1)).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += int((logits.argmax(1) == shares.argmax(1)).sum())
        seen += shares[:, 0].numel()
        if (step + 1) % 100 == 0:
            print(f'step {step + 1}/{args.steps}: loss {loss.item():.4f}, patch accuracy '
                  f'{100 * correct / seen:.1f}%, {(time.time() - t0) / (step + 1):.2f} s/step', flush=True)
            correct = seen = 0
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    save_atomic(state, args.out)
    print(f'saved the encoder ({sum(v.numel() for v in state.values()) / 1e6:.2f}M values) to {args.out}')


if __name__ == '__main__':
    main()
