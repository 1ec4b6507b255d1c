"""Evaluate a segmentation model on a labeled dataset, and the helpers that show its predictions.

`evaluate` is shared by the training scripts (every epoch, model and EMA) and `evaluate.py`. Each
process takes the images `rank, rank + world_size, ...` at batch size 1 (no padding sampler, so
no image is counted twice), accumulates a confusion matrix on the device and all-reduces it once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dataset.registry import generated_palette
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from model.hub import released_file
from model.loading import WeightsMismatchError, load_checked, model_state_from
from util.checkpoint import safe_load
from util.dist import is_main, rank, world_size
from util.inference import predict
from util.metrics import IGNORE_INDEX, ConfusionMatrix
from util.pseudo_labels import confident_targets

OVERLAY_ALPHA = 0.5  # weight of the class colours over the image in overlays
MAX_PALETTE_CLASSES = 255  # class ids must fit a palette PNG next to IGNORE_INDEX
HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')  # gray > 8 bit


# ---- loading a model for evaluation --------------------------------------------------------

def check_checkpoint_config(ckpt: dict, path: str | Path, backbone: str, nclass: int,
                            config_path: str | Path = 'the config') -> None:
    """Refuse (WeightsMismatchError) a checkpoint whose saved config names another class count
    or encoder, before any shape mismatch gets reported key by key."""
    saved = ckpt.get('config') if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        return
    for key, ours in (('nclass', nclass), ('backbone', backbone)):
        if key in saved and saved[key] != ours:
            raise WeightsMismatchError(
                f'checkpoint {path} was trained with {key}={saved[key]!r} but {config_path} has '
                f'{key}={ours!r}; use the matching config or override it ({key}={saved[key]})')


class LoadedModel(NamedTuple):
    model: nn.Module      # eval mode, on the CPU
    weights: str          # which weights: 'ema', 'student' or 'plain'
    cfg: object           # the config the model was built from: the checkpoint's saved keys over the given one


def checkpoint_config(ckpt: object, path: str | Path, overrides: Sequence[str] = ()):
    """The config saved inside one of this project's checkpoints (keys this version does not know
    are dropped), with `key=value` overrides; ConfigError when the file holds none."""
    import dataclasses

    from util.config import ConfigError, Config, apply_overrides, from_dict
    saved = ckpt.get('config') if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f'checkpoint {path} holds no config (not one this project trained): '
                          f'pass the config it was trained with (--config)')
    known = {f.name for f in dataclasses.fields(Config)}
    return from_dict(apply_overrides({k: v for k, v in saved.items() if k in known}, list(overrides)),
                     source=f'the config saved in {path}')


def load_eval_model(path: str | Path, weights: str | None = None, cfg=None,
                    config_path: str | Path = 'the config', overrides: Sequence[str] = ()) -> LoadedModel:
    """The model of a checkpoint's task and method (its extra head or bottleneck, with that method's
    keys as the checkpoint's saved config has them, else as `cfg`) with its weights, in eval mode.
    weights: 'ema' or 'student' for a checkpoint holding both (default: the task's
    `default_weights`, else EMA where there is one). Takes ours, released UniMatch V2 checkpoints
    (`module.` keys) and plain state dicts, or `released:<name>` for one of the original's published
    checkpoints; refuses one whose saved config names another class count or encoder.
    cfg None: the config saved in the checkpoint (with `overrides`). Reads the file once."""
    import dataclasses

    import tasks
    path = released_file(path)   # `released:<name>`: fetched into the cache once
    ckpt = safe_load(path)
    if cfg is None:
        cfg = checkpoint_config(ckpt, path, overrides)
    check_checkpoint_config(ckpt, path, cfg.backbone, cfg.nclass, config_path)
    saved = ckpt.get('config') if isinstance(ckpt, dict) else None
    if isinstance(saved, dict):
        fields = {f.name for f in dataclasses.fields(cfg)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in fields and k != 'criterion'})
    task = tasks.for_config(cfg)
    model = task.build_model(cfg)
    state, which = model_state_from(ckpt, weights or task.default_weights)
    load_checked(model, state, str(path))
    return LoadedModel(model.eval(), which, cfg)


def build_eval_model(path: str | Path, weights: str | None, cfg, config_path: str | Path = 'the config'
                     ) -> tuple[nn.Module, str]:
    """(model, which weights) of `load_eval_model`."""
    loaded = load_eval_model(path, weights, cfg, config_path)
    return loaded.model, loaded.weights


# ---- evaluation ------------------------------------------------------------------------------

def _single(batch: list) -> dict:
    return batch[0]


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, nclass: int, mode: str, crop_size: int,
             flip: bool = False, scales: Sequence[float] = (1.0,), device: torch.device | None = None,
             save_dir: str | Path | None = None, palette: list[int] | None = None,
             progress: bool = True, num_workers: int = 0, writer: Callable | None = None,
             conf_thresh: float | None = None) -> dict:
    """mIoU of `model` on `dataset` (items {'image' [3, H, W] normalised, 'mask' int [H, W],
    'name' str}), over all processes.

    Returns {'miou', 'iou' (per class, percent), 'pixel_acc' (percent), 'n_images' (all
    processes), 'confusion' (nclass x nclass counts, rows = ground truth)}.
    save_dir: also write `<name>.png` (palette PNG of class ids; 255 where nothing was predicted)
    and `side_by_side/<name>.jpg` (image | ground truth | prediction), or what
    `writer(item, prediction [H, W], save_dir)` writes.
    conf_thresh: also 'confident_confusion', the counts of the pixels whose top probability is at
    least `conf_thresh` (the pseudo-label diagnostics, util/pseudo_labels.py).
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    shard = Subset(dataset, range(rank(), len(dataset), world_size()))
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=_single)
    if save_dir is not None:
        save_dir = Path(save_dir)
        (save_dir / 'side_by_side').mkdir(parents=True, exist_ok=True)
        palette = palette or generated_palette()

    cm = ConfusionMatrix(nclass, device)
    confident = ConfusionMatrix(nclass, device) if conf_thresh is not None else None
    for item in tqdm(loader, desc=f'eval {mode}', disable=not (progress and is_main()),
                     dynamic_ncols=True):
        image = item['image'].to(device, non_blocking=True)[None]  # [1, 3, H, W]
        mask = item['mask'].to(device, non_blocking=True)[None]    # [1, H, W]
        probs, valid = predict(model, image, mode, crop_size, nclass, flip, scales)
        pred = probs.argmax(dim=1)
        target = mask.masked_fill(~valid, IGNORE_INDEX)
        cm.update(pred, target)
        if confident is not None:
            confident.update(*confident_targets(probs, target, conf_thresh, IGNORE_INDEX))
        if save_dir is not None:
            pred_ids = pred[0].masked_fill(~valid[0], IGNORE_INDEX)
            if writer is not None:
                writer(item, pred_ids, save_dir)
                continue
            save_prediction(pred_ids, palette, save_dir / f'{item["name"]}.png')
            save_side_by_side(item['image'], item['mask'], pred_ids, palette,
                              save_dir / 'side_by_side' / f'{item["name"]}.jpg')

    cm.reduce()
    model.train(was_training)
    extra = {'confident_confusion': confident.reduce().mat.tolist()} if confident is not None else {}
    return {'miou': cm.miou(), 'iou': cm.iou().tolist(), 'pixel_acc': cm.pixel_acc(),
            'n_images': cm.n_images, 'confusion': cm.mat.tolist(), **extra}


def format_iou_table(iou: Sequence[float], class_names: Sequence[str]) -> str:
    """Aligned 'class  IoU' lines followed by the mean."""
    if len(iou) != len(class_names):
        raise ValueError(f'{len(iou)} IoU values for {len(class_names)} class names')
    width = max([len(n) for n in class_names] + [len('class')])
    lines = [f'{"id":>3}  {"class":<{width}}  {"IoU":>6}']
    lines += [f'{k:>3}  {name:<{width}}  {v:6.2f}' for k, (name, v) in enumerate(zip(class_names, iou))]
    lines.append(f'{"":>3}  {"mean":<{width}}  {sum(iou) / len(iou):6.2f}')
    return '\n'.join(lines)


def parse_scales(text: str) -> tuple[float, ...]:
    """'0.75,1.0,1.25' -> (0.75, 1.0, 1.25); every scale must be positive."""
    try:
        scales = tuple(float(s) for s in text.split(',') if s.strip())
    except ValueError:
        raise ValueError(f'scales must be comma-separated numbers, got {text!r}') from None
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f'scales must be positive numbers, got {text!r}')
    return scales


# ---- pictures of predictions -----------------------------------------------------------------

def _numpy(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    return ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)


def palette_image(ids: torch.Tensor | np.ndarray, palette: list[int]) -> Image.Image:
    """Class ids [H, W] (values <= 255) as a PIL 'P' image whose pixel values are the ids."""
    ids = _numpy(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_PALETTE_CLASSES):
        raise ValueError(f'class ids must lie in [0, {MAX_PALETTE_CLASSES}] for a palette PNG')
    img = Image.fromarray(ids.astype(np.uint8))  # 'L'; putpalette makes it 'P', same values
    img.putpalette(palette)
    return img


def save_prediction(ids: torch.Tensor, palette: list[int], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette_image(ids, palette).save(path)


def denormalize(image: torch.Tensor) -> Image.Image:
    """Normalised float [3, H, W] (ImageNet mean/std) -> PIL RGB."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    rgb = ((image * std + mean).clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb)


def save_side_by_side(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor,
                      palette: list[int], path: str | Path) -> None:
    """image [3, H, W] normalised | ground truth [H, W] | prediction [H, W], as one JPEG."""
    save_panels([denormalize(image), palette_image(mask.clamp(0, 255), palette).convert('RGB'),
                 palette_image(pred, palette).convert('RGB')], path)


def save_panels(panels: Sequence[Image.Image], path: str | Path) -> None:
    """Images of one size side by side, left to right, as one JPEG."""
    w, h = panels[0].size
    canvas = Image.new('RGB', (len(panels) * w, h))
    for k, panel in enumerate(panels):
        canvas.paste(panel.convert('RGB'), (k * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90)


def overlay(image: Image.Image, ids: torch.Tensor | np.ndarray, palette: list[int],
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """Class colours blended over an RGB image; pixels marked IGNORE_INDEX show the image only."""
    image = image.convert('RGB')
    blended = Image.blend(image, palette_image(ids, palette).convert('RGB'), alpha)
    unpredicted = _numpy(ids) == IGNORE_INDEX
    if unpredicted.any():
        blended.paste(image, mask=Image.fromarray(unpredicted.astype(np.uint8) * 255))
    return blended


# ---- reading arbitrary images (predict.py) ---------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation) and as 8-bit RGB; raises
    UnidentifiedImageError or OSError for files that are not readable images."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB: gray of more than 8 bits stretched to 0..255, palette and
    alpha images flattened."""
    if img.mode in HIGH_BIT_DEPTH_MODES:  # stretch to 8 bit; convert('RGB') would clip at 255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    if img.mode in ('P', 'LA', 'PA') or 'transparency' in img.info:
        img = img.convert('RGBA')  # resolve palette transparency before dropping alpha
    return img.convert('RGB')


def list_inputs(path: Path) -> list[Path]:
    """One file, or the files of a folder (not searched recursively), sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    raise SystemExit(f'error: input {path} does not exist')


def output_stem(path: Path, taken: set[str]) -> str:
    """The file stem, or stem_<ext> when another input (a.jpg next to a.png) already has it."""
    stem = path.stem if path.stem not in taken else f'{path.stem}_{path.suffix.lstrip(".")}'
    taken.add(stem)
    return stem
