"""A trained model as a Python object: a checkpoint in, class maps out.

    from segmenter import Segmenter
    seg = Segmenter.from_checkpoint('exp/pascal/unimatch_v2/dinov2_small/92/best.pth')
    ids = seg.predict('photo.jpg')                     # int64 [H, W] class ids
    ids, probs = seg.predict(image, probabilities=True)   # and float32 [nclass, H, W]
    cd = Segmenter.from_checkpoint('released:levir_cd_unimatch_v2_5%labels_dinov2_base')
    change = cd.predict('A/test_1.png', 'B/test_1.png')   # 0 unchanged, 1 changed

An image is a path, a PIL image (any mode) or a uint8 array (H x W gray, H x W x 3 RGB or
H x W x 4 RGBA). The prediction is the evaluation's: the checkpoint's task prepares the input as in
training (ImageNet normalisation; change detection: the two dates side by side) and predicts in its
evaluation mode (`Task.infer`: the config's `eval_mode` or the dataset's -- sliding windows for
Cityscapes, the whole image elsewhere -- at its crop size), with the weights the task reports (EMA
for segmentation, the student for change detection) unless `weights=` says otherwise. Pixels
outside a centre crop (`mode='center_crop'`) get IGNORE_INDEX (255).

The config comes from the checkpoint (this project's checkpoints carry theirs), from the released
name (`configs/<dataset>.yaml` with the name's encoder), or from `config=`. predict.py and hubconf.py
are built on this class. docs/export.md shows it at work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

import tasks
from model.hub import RELEASED, RELEASED_PREFIX
from dataset.images import load_rgb, to_rgb
from engine.config import load_config
from engine.eval_model import load_eval_model
from util.labels import IGNORE_INDEX

CONFIGS = Path(__file__).resolve().parent / 'configs'

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def as_rgb(image: ImageLike) -> Image.Image:
    """A path, PIL image or uint8 array as an 8-bit RGB PIL image."""
    if isinstance(image, (str, Path)):
        return load_rgb(Path(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (3, 4)):
            raise ValueError(f'an image array must be uint8 H x W, H x W x 3 or H x W x 4, got {image.dtype} '
                             f'{image.shape}')
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f'an image is a path, a PIL image or a uint8 array, got {type(image).__name__}')
    return to_rgb(image)


def released_config(spec: str, overrides: Sequence[str] = ()):
    """The config of `released:<name>`: configs/<its dataset>.yaml with its encoder."""
    name = spec[len(RELEASED_PREFIX):]
    released = RELEASED.get(name)
    if released is None:          # the hub's error lists the names
        from model.hub import released_remote
        released_remote(name)
    return load_config(CONFIGS / f'{released.dataset}.yaml', [f'backbone={released.backbone}', *overrides])


class Segmenter:
    """A model in eval mode with its task, config and inference settings; `predict` maps images to
    class ids (and probabilities)."""

    def __init__(self, model: nn.Module, cfg, weights: str = 'plain', device: torch.device | str | None = None,
                 mode: str | None = None, flip: bool = False, scales: Sequence[float] = (1.0,)):
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.model = model.to(self.device).eval()
        self.cfg, self.weights = cfg, weights
        self.task = tasks.for_config(cfg)
        self.mode, self.flip, self.scales = self.task.eval_mode(mode), flip, tuple(scales)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: str | Path | None = None, *,
                        weights: str | None = None, device: torch.device | str | None = None,
                        mode: str | None = None, flip: bool = False, scales: Sequence[float] = (1.0,),
                        overrides: Sequence[str] = ()) -> 'Segmenter':
        """Load `checkpoint` (a file, or `released:<name>`, fetched once into the cache).

        config: a YAML config (default: the checkpoint's own, or the released name's); overrides:
        `key=value` words over it. weights: 'ema' or 'student' (default: those the task reports).
        mode, flip, scales: the inference (default: the task's evaluation mode, no flip, scale 1)."""
        overrides = list(overrides)
        if config is not None:
            cfg = load_config(config, overrides)
        elif str(checkpoint).startswith(RELEASED_PREFIX):
            cfg = released_config(str(checkpoint), overrides)
        else:
            cfg = None           # the checkpoint's own
        loaded = load_eval_model(checkpoint, weights, cfg, config or 'the config', overrides)
        return cls(loaded.model, loaded.cfg, loaded.weights, device, mode, flip, scales)

    @property
    def nclass(self) -> int:
        return self.cfg.nclass

    def predict(self, *images: ImageLike, probabilities: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Class ids int64 [H, W] of one sample (one image; change detection: the images of date A
        and date B, of one size); with `probabilities`, also float32 [nclass, H, W]."""
        rgb = [as_rgb(image) for image in images]
        if len({im.size for im in rgb}) > 1:
            raise ValueError(f'the images of one sample must have one size, got {[im.size for im in rgb]}')
        probs, valid = self.task.infer(self.model, rgb, self.device, mode=self.mode, flip=self.flip,
                                       scales=self.scales)
        ids = probs.argmax(dim=1)[0].masked_fill(~valid[0], IGNORE_INDEX).cpu().numpy()
        return (ids, probs[0].float().cpu().numpy()) if probabilities else ids

    def write_predictions(self, inputs: Sequence[Path], out_dir: Path, labels: Path | None = None) -> int:
        """The task's pictures of every input (predict.py's outputs) in `out_dir`; returns how many
        were written."""
        return self.task.predict(self.model, list(inputs), Path(out_dir), self.device, labels=labels,
                                 mode=self.mode, flip=self.flip, scales=self.scales)
