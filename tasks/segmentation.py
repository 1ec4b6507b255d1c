"""Semantic segmentation: images and class-id masks, a DPT segmentor, per-class IoU and mIoU.

The reported figure is the best EMA mIoU of a semi-supervised run (the paper's statistic, FACTS §9)
and the best mIoU of a labeled-only one; best.pth follows it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from PIL import UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset.checks import check_inputs
from dataset.images import list_inputs, load_rgb, output_stem, overlay, save_prediction
from dataset.registry import default_eval_mode, get_palette, get_spec
from dataset.semi import CUTMIX_P, RESIZE_RATIO, UNLABELED_PAD, SemiDataset, split_paths, split_sizes
from dataset.splits import read_split
from dataset.toy import ensure_toy
from dataset.transforms import normalize
from model.dpt import build_model as plain_segmentor
from tasks.base import Task, register
from tasks.evaluation import evaluate, format_iou_table
from util.labels import IGNORE_INDEX


@register
class Segmentation(Task):
    name = 'segmentation'
    summary = 'per-pixel classes: DINOv2 + DPT, per-class IoU and mIoU'
    metric = 'miou'
    metric_label = 'mIoU'
    result_title = 'per-class IoU'

    # ---- data ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        if get_spec(cfg.dataset).generated:
            ensure_toy(cfg.data_root, Path(cfg.splits_root) / cfg.data_name, seed=cfg.toy_seed,
                       n_train=cfg.toy_train, n_val=cfg.toy_val)

    def split_paths(self, split: str) -> tuple[Path, Path, Path]:
        paths = split_paths(self.cfg.dataset, split, self.cfg.splits_root, self.cfg.data_root,
                            self.cfg.data_name)
        return paths.labeled, paths.unlabeled, self.eval_split_path()

    def eval_split_path(self) -> Path:
        name = self.cfg.eval_split or get_spec(self.cfg.dataset).eval_split
        return Path(self.cfg.splits_root) / self.cfg.data_name / f'{name}.txt'

    def check_inputs(self, splits: dict[str, Path], full: bool = False,
                     roots: dict[str, str] | None = None) -> list:
        return check_inputs(self.cfg.data_root, splits, self.cfg.nclass, full=full, roots=roots)

    def split_sizes(self, split: str) -> dict[str, int | str]:
        cfg, val = self.cfg, self.eval_split_path()
        sizes = split_sizes(cfg.dataset, split, cfg.splits_root, cfg.data_root, cfg.data_name)
        sizes['val'] = len(read_split(val)) if val.exists() else f'{val} is missing'
        return sizes

    def augmentations(self, num_strong: int) -> dict[str, str]:
        crop = self.cfg.crop_size
        return {'labeled': f'long side rescaled x U{RESIZE_RATIO}, padded to and randomly cropped to {crop} '
                           f'(mask padding {IGNORE_INDEX}), horizontal flip p 0.5, ImageNet normalisation',
                'weak': f"the labeled view's geometry (padding marked {UNLABELED_PAD}: left out of the loss)",
                'strong': f'{num_strong} view(s) of the weak crop, each: ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8, '
                          f'grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5, its own CutMix box p {CUTMIX_P} '
                          '(dataset/transforms.py strong_color, cutmix_box)'}

    def dataset(self, split_file: Path, mode: str, nsample: int | None = None, num_strong: int = 2,
                root: str | None = None) -> Dataset:
        return SemiDataset(root or self.cfg.data_root, split_file, mode, self.cfg.crop_size, nsample=nsample,
                           num_strong=num_strong, nclass=self.cfg.nclass)

    def demo_dataset(self, root: Path) -> Dataset:
        ensure_toy(root / 'data', root / 'splits', n_train=32, n_val=1, workers=1)
        return SemiDataset(root / 'data', root / 'splits/all/labeled.txt', 'train_u', self.cfg.crop_size)

    # ---- model -----------------------------------------------------------------------------------

    def build_model(self, cfg=None) -> nn.Module:
        """The plain DINOv2 + DPT segmentor (a method with a model of its own builds that instead:
        `engine.build.build_model`)."""
        cfg = cfg or self.cfg
        return plain_segmentor(cfg.backbone, cfg.nclass, drop_path=cfg.drop_path)

    # ---- evaluation ------------------------------------------------------------------------------

    def eval_mode(self, mode: str | None = None) -> str:
        return mode or self.cfg.eval_mode or default_eval_mode(self.cfg.dataset)

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device, *, mode: str | None = None,
                 flip: bool = False, scales: Sequence[float] = (1.0,), save_dir: Path | None = None,
                 progress: bool = False, num_workers: int = 0, conf_thresh: float | None = None) -> dict:
        """{'miou', 'iou' (per class), 'pixel_acc', 'n_images', 'confusion'} (and 'confident_confusion'
        with `conf_thresh`): tasks.evaluation.evaluate."""
        cfg = self.cfg
        palette = get_palette(cfg.dataset, cfg.nclass) if save_dir is not None else None
        return evaluate(model, dataset, cfg.nclass, self.eval_mode(mode), cfg.crop_size, flip, scales, device,
                        save_dir=save_dir, palette=palette, progress=progress, num_workers=num_workers,
                        conf_thresh=conf_thresh)

    def scores(self, result: dict) -> dict:
        return {'miou': result['miou'], 'iou': result['iou']}

    def format_result(self, result: dict) -> str:
        return format_iou_table(result['iou'], self.class_names())

    def report(self, result: dict) -> dict:
        return {'miou': result['miou'], 'pixel_acc': result['pixel_acc'], 'n_images': result['n_images'],
                'iou': dict(zip(self.class_names(), result['iou'])), 'confusion': result['confusion']}

    # ---- prediction ------------------------------------------------------------------------------

    def model_input(self, images: Sequence) -> torch.Tensor:
        return normalize(images[0])

    def predict(self, model: nn.Module, inputs: list[Path], out_dir: Path, device: torch.device, *,
                labels: Path | None = None, mode: str | None = None, flip: bool = False,
                scales: Sequence[float] = (1.0,)) -> int:
        """For each image `<stem>` of one file or folder: `<stem>.png` (palette PNG of class ids, 255
        where nothing was predicted) and `<stem>_overlay.jpg` (the colours over the image)."""

        if len(inputs) != 1:
            raise SystemExit(f'error: segmentation takes one --input (a file or a folder), got {len(inputs)}')
        cfg = self.cfg
        palette = get_palette(cfg.dataset, cfg.nclass)
        taken, written = set(), 0
        for path in tqdm(list_inputs(inputs[0]), desc='predict', dynamic_ncols=True):
            try:
                img = load_rgb(path)
            except (UnidentifiedImageError, OSError) as err:
                tqdm.write(f'warning: skipping {path}: not a readable image ({err})', file=sys.stderr)
                continue
            probs, valid = self.infer(model, [img], device, mode=mode, flip=flip, scales=scales)
            ids = probs.argmax(dim=1)[0].masked_fill(~valid[0], IGNORE_INDEX).cpu()
            stem = output_stem(path, taken)
            save_prediction(ids, palette, out_dir / f'{stem}.png')
            overlay(img, ids, palette).save(out_dir / f'{stem}_overlay.jpg', quality=90)
            written += 1
        return written
