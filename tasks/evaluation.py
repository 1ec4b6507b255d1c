"""Evaluate a segmentation model on a labeled dataset: the tasks' shared evaluation loop.

`evaluate` serves the training loop (every epoch, model and EMA) and `evaluate.py`. Each process
takes the images `rank, rank + world_size, ...` at batch size 1 (no padding sampler, so no image is
counted twice), accumulates a confusion matrix on the device and all-reduces it once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dataset.images import save_prediction, save_side_by_side
from dataset.registry import generated_palette
from model.inference import predict
from util.dist import is_main, rank, world_size
from util.labels import IGNORE_INDEX
from util.metrics import ConfusionMatrix
from util.pseudo_labels import confident_targets


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
