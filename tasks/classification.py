"""Image classification with few labels (the paper's Tables 15-18): CIFAR-10, STL-10, SVHN,
ImageNet-1K, the generated `toy_cls` (dataset/classification.py) and one's own images in folders
by class (`custom_cls`, dataset/image_folder.py), wide ResNets or DINOv2 + a
linear head (model/classifiers.py), top-1 and top-5 accuracy.

It runs through the segmentation step unchanged (methods/step.py): an image is a one-pixel map --
logits (B, K, 1, 1), labels (B, 1, 1), CutMix boxes all False (Cutout is in the strong view), every
"pixel" valid -- so the labeled cross-entropy is the mean over images and the masked unlabeled loss,
normalised by the valid pixels, is the mean over unlabeled images of the confidence-masked
cross-entropy. The recipe of the original's logs (TorchSSL's, docs/classification.md) is in the
configs: `total_loss: sum` (L_x + L_u), SGD without weight decay on biases and BatchNorm
(engine/build.py build_optimizer), TorchSSL's evaluation points (`eval_interval`). Every registered method that runs the core step as it is (two strong views with
complementary dropout on the pooled features, one view, labeled-only, ...) runs here; methods with a
model or hooks of their own work on pixels and are refused.

Splits of the built-in datasets are label counts, not files: `split_paths` names the three parts of
a split (`Part`), which the trainer passes back. `custom_cls` splits are list files,
`splits/<name>/<split>/{labeled,unlabeled}.txt` and `splits/<name>/val.txt`
(tools/make_classification_split.py): its parts carry their file. An epoch is
`max_iters_per_epoch` iterations (the unlabeled set repeated to that length), after which both models are evaluated on the test set (with `eval_interval`, only
after the epochs during which TorchSSL's loop evaluates). The reported figure is the best EMA top-1
(FACTS §9).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from tqdm import tqdm

from dataset.checks import DataError, Problem
from dataset.classification import (CROP_RATIO, CUTOUT_MAX, PAD_PIXELS, ClassificationDataset, eval_view,
                                    load_classification, parse_split, read_list)
from dataset.classification import get_spec as image_spec      # the dataset's image sizes and flips
from dataset.image_folder import check_classes, check_list
from dataset.images import list_inputs, load_rgb
from dataset.randaugment import NUM_OPS
from dataset.registry import class_names, get_spec
from dataset.toy_cls import ensure_toy_cls
from model.classifiers import build_classifier, classifier_names
from tasks.base import Task, register
from util import dist
from util.checkpoint import write_text_atomic
from util.dist import is_main, rank, world_size
from util.labels import IGNORE_INDEX
from util.metrics import ConfusionMatrix, TopKAccuracy
from util.pseudo_labels import confident_targets

TOP_K = (1, 5)
CUSTOM = 'custom_cls'       # one's own images (dataset/image_folder.py): its splits are list files


@dataclass(frozen=True)
class Part:
    """One part of a classification split -- 'labeled', 'unlabeled' or 'val' images of `split` --
    where a segmentation split names a file."""
    role: str
    split: str
    dataset: str
    root: str
    path: Path | None = None    # custom_cls: the list file

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f'{self.dataset} {self.split} ({self.role} images under {self.root})'


@register
class Classification(Task):
    name = 'classification'
    summary = 'image classes: wide ResNets or DINOv2 + linear head, top-1 / top-5 accuracy'
    metric = 'top1'
    metric_label = 'top-1'
    result_title = 'accuracy'
    reports_ema = True
    benchmarked = False     # benchmark.py's original recipes are the DPT ones; not timed yet
    pseudo_label_unit = 'images'
    provides = frozenset()  # a one-pixel map: no segmentor for a method's own model, no pixel maps for hooks

    def __init__(self, cfg):
        super().__init__(cfg)
        self._data = {}         # split -> (dataset.classification.ClassificationData, with unlabeled), read once
        self._lists = {}        # custom_cls: list file -> dataset.classification.Images, read once
        self.custom = cfg.dataset == CUSTOM

    @classmethod
    def check(cls, cfg, need, semi: bool) -> None:
        need(cfg.backbone in classifier_names(), 'backbone',
             f'must be one of {classifier_names()} for {cfg.dataset}, got {cfg.backbone!r}')
        need(cfg.input_size % 14 == 0 and cfg.input_size > 0, 'input_size',
             f'must be a positive multiple of the 14-pixel patch, got {cfg.input_size}')
        need(cfg.max_iters_per_epoch > 0, 'max_iters_per_epoch',
             f'must be > 0 for {cfg.dataset}: a classification epoch is that many iterations')
        need(semi or cfg.labeled_upsample >= cfg.max_iters_per_epoch * 2 * cfg.batch_size, 'labeled_upsample',
             f'must be >= max_iters_per_epoch x 2 x batch_size = {cfg.max_iters_per_epoch * 2 * cfg.batch_size} '
             f'for labeled-only training on {cfg.dataset} (an epoch of max_iters_per_epoch iterations)')
        need(not cfg.unlabeled_dirs and cfg.unlabeled_root is None, 'unlabeled_dirs',
             f'does not apply to {cfg.dataset}: its unlabeled set is its training set')
        need(cfg.comp_drop_at == 'features', 'comp_drop_at',
             f"must be 'features' for {cfg.dataset}: a classifier's features are its classifier's input")

    # ---- data ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        if get_spec(self.cfg.dataset).generated:
            ensure_toy_cls(self.cfg.data_root)

    def split_paths(self, split: str) -> tuple[Part, Part, Part]:
        cfg = self.cfg
        if self.custom:
            base = Path(cfg.splits_root) / cfg.data_name / split
            return (Part('labeled', split, cfg.dataset, cfg.data_root, base / 'labeled.txt'),
                    Part('unlabeled', split, cfg.dataset, cfg.data_root, base / 'unlabeled.txt'),
                    self.eval_split_path())
        parse_split(split)          # a malformed split is an error naming it, here
        return tuple(Part(role, split, cfg.dataset, cfg.data_root) for role in ('labeled', 'unlabeled', 'val'))

    def eval_split_path(self) -> Part:
        cfg = self.cfg
        if self.custom:
            name = cfg.eval_split or 'val'
            return Part('val', name, cfg.dataset, cfg.data_root, Path(cfg.splits_root) / cfg.data_name / f'{name}.txt')
        return Part('val', 'all', cfg.dataset, cfg.data_root)

    def _part(self, part) -> Part:
        """A custom_cls list given as a path (evaluate.py --split <file>) as the val part it is."""
        if self.custom and not isinstance(part, Part):
            return Part('val', Path(part).stem, self.cfg.dataset, self.cfg.data_root, Path(part))
        return part

    def classes(self) -> list[str]:
        """custom_cls: the class folder names, checked against the config's nclass and class_names."""
        return check_classes(self.cfg.data_root, self.cfg.nclass, self.cfg.class_names)

    def read_list(self, part: Part):
        """custom_cls: the images of one list, read and checked once (DataError otherwise)."""
        if part.path not in self._lists:
            self._lists[part.path] = read_list(self.cfg.data_root, part.path, part.role, self.classes())
        return self._lists[part.path]

    def data(self, split: str, unlabeled: bool = False):
        """Every image and label of `split`, read and checked once (DataError otherwise);
        `unlabeled`: with the unlabeled set's extra images too (STL-10's), which a labeled-only
        run does not read."""
        cached = self._data.get(split)
        if cached is None or (unlabeled and not cached[1]):
            cfg = self.cfg
            self._data[split] = (load_classification(cfg.dataset, cfg.data_root, split, cfg.seed, cfg.download,
                                                     unlabeled), unlabeled)
        return self._data[split][0]

    def check_inputs(self, splits: dict, full: bool = False, roots: dict | None = None) -> list:
        """The files of each part, read in full (they are read once either way), the labeled subset
        drawn: a missing root, a wrong format or too few images of a class is an error naming it."""
        if self.custom:
            return self._check_lists([self._part(p) for p in splits.values()], full)
        for part in splits.values():
            if not isinstance(part, Part):
                return [Problem('error', str(part), f'{self.cfg.dataset} has no split files: give --split '
                                                    '<N>_labels_per_class, <P>% or all')]
            try:
                self.data(part.split, unlabeled='unlabeled' in splits)
            except DataError as err:
                return [Problem('error', str(part), str(err))]
        return []

    def _check_lists(self, parts: list[Part], full: bool) -> list:
        """custom_cls: the class folders against the config, then each list (dataset/image_folder.py)."""
        try:
            classes = self.classes()
        except DataError as err:
            return [Problem('error', str(self.cfg.data_root), str(err))]
        return [problem for part in parts for problem in check_list(self.cfg.data_root, part.path, part.role, classes, full)]

    def split_sizes(self, split: str) -> dict[str, int | str]:
        """The labeled count of `<N>_labels_per_class` (N x nclass); the other counts are the
        dataset files' (not read here)."""
        if self.custom:
            return {part.role: sum(1 for line in open(part.path) if line.strip()) if part.path.is_file()
                    else f'{part.path} does not exist' for part in self.split_paths(split)}
        kind, k = parse_split(split)
        unread = f'in the {self.cfg.dataset} files under {self.cfg.data_root}, not read by --plan'
        return {'labeled': int(k) * self.cfg.nclass if kind == 'per_class' else unread,
                'unlabeled': unread, 'val': unread}

    def epoch_unlabeled(self, n_unlabeled: int | str, processes: int) -> int:
        """The unlabeled set repeated to one epoch of `max_iters_per_epoch` iterations of
        `batch_size x unlabeled_ratio` images on every process, whatever its size."""
        cfg = self.cfg
        return cfg.max_iters_per_epoch * cfg.batch_size * cfg.unlabeled_ratio * processes

    def augmentations(self, num_strong: int) -> dict[str, str]:
        spec, size = image_spec(self.cfg.dataset), self.cfg.crop_size
        weak = (f'random {size} crop of the image, short side resized to {size} / {CROP_RATIO}' if self.cfg.dataset == 'imagenet'
                else f'random {size} crop of the image padded by {PAD_PIXELS} pixels (reflect)')
        weak += ', horizontal flip p 0.5' if spec.hflip else ''
        return {'labeled': weak, 'weak': weak,
                'strong': f'{num_strong} view(s), each: RandAugment({NUM_OPS} operations, magnitudes uniform over '
                          f'their ranges; dataset/randaugment.py), Cutout (a square of up to {CUTOUT_MAX} of the '
                          'side), then the weak geometry'}

    def dataset(self, split_file: Part, mode: str, nsample: int | None = None, num_strong: int = 2,
                root: str | None = None) -> Dataset:
        """The part's samples; the unlabeled set is repeated to one epoch of `max_iters_per_epoch`
        iterations of `batch_size x unlabeled_ratio` images on every process."""
        cfg, split_file = self.cfg, self._part(split_file)
        if self.custom:
            images = self.read_list(split_file)
            indices = np.arange(len(images))
        else:
            data = self.data(split_file.split, unlabeled=split_file.role == 'unlabeled')
            images, indices = {'labeled': (data.train, data.labeled),
                               'unlabeled': (data.unlabeled, np.arange(len(data.unlabeled))),
                               'val': (data.test, np.arange(len(data.test)))}[split_file.role]
        if mode == 'train_u' and nsample is None:
            nsample = self.epoch_unlabeled(len(indices), dist.world_size())
        spec = replace(image_spec(cfg.dataset), size=cfg.crop_size)
        return ClassificationDataset(spec, images, indices, mode, nsample, num_strong)

    # ---- model -----------------------------------------------------------------------------------

    def build_model(self, cfg=None) -> nn.Module:
        cfg = cfg or self.cfg
        return build_classifier(cfg.backbone, cfg.nclass, cfg.drop_path, cfg.input_size)

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device, *, mode: str | None = None,
                 flip: bool = False, scales: Sequence[float] = (1.0,), save_dir: Path | None = None,
                 progress: bool = False, num_workers: int = 0, conf_thresh: float | None = None) -> dict:
        """{'top1', 'top5' (percent), 'n_images'} over every process: each takes the images rank,
        rank + world_size, ... and the counts are reduced once. flip: the mean of the image's and
        its mirror's probabilities. conf_thresh: also 'confusion' and 'confident_confusion' (images
        without a label, STL-10's unlabeled ones, are not counted)."""
        if tuple(scales) != (1.0,) or save_dir is not None:
            raise ValueError('classification evaluates the whole image at one scale and writes no pictures')
        was_training = model.training
        model.eval()
        shard = Subset(dataset, range(rank(), len(dataset), world_size()))
        loader = DataLoader(shard, batch_size=self.cfg.eval_batch_size, num_workers=num_workers)
        acc = TopKAccuracy(TOP_K, device)
        counts = (ConfusionMatrix(self.cfg.nclass, device), ConfusionMatrix(self.cfg.nclass, device)) \
            if conf_thresh is not None else None
        with torch.inference_mode():
            for batch in tqdm(loader, desc='eval', disable=not (progress and is_main()), dynamic_ncols=True):
                image = batch['image'].to(device, non_blocking=True)
                scores = model(image).flatten(1).float().softmax(1)
                if flip:
                    scores = (scores + model(image.flip(-1)).flatten(1).float().softmax(1)) / 2
                label = batch['label'].to(device)
                acc.update(scores, label)
                if counts is not None:
                    counts[0].update(scores.argmax(1), label)
                    counts[1].update(*confident_targets(scores, label, conf_thresh, IGNORE_INDEX))
        acc.reduce()
        model.train(was_training)
        extra = {'confusion': counts[0].reduce().mat.tolist(),
                 'confident_confusion': counts[1].reduce().mat.tolist()} if counts is not None else {}
        return {**acc.accuracy(), 'n_images': acc.n_images, **extra}

    def eval_mode(self, mode: str | None = None) -> str:
        return 'whole image'

    def scores(self, result: dict) -> dict:
        return {'top1': result['top1'], 'top5': result['top5']}

    def format_result(self, result: dict) -> str:
        return f'top-1 {result["top1"]:.2f}, top-5 {result["top5"]:.2f} ({result["n_images"]} images)'

    def report(self, result: dict) -> dict:
        return {'top1': result['top1'], 'top5': result['top5'], 'n_images': result['n_images']}

    def results_extra(self, history: list[dict], best_epoch: int) -> dict:
        """top-5 beside top-1: per epoch, best and final, student and EMA."""
        out = {}
        for key in ('top5', 'top5_ema'):
            values = [h[key] for h in history if h.get(key) is not None]
            out[key] = values or None
            out[f'best_{key}'] = max(values) if values else None
            out[f'final_{key}'] = values[-1] if values else None
        return out

    # ---- prediction ------------------------------------------------------------------------------

    def predict(self, model: nn.Module, inputs: list[Path], out_dir: Path, device: torch.device, *,
                labels: Path | None = None, mode: str | None = None, flip: bool = False,
                scales: Sequence[float] = (1.0,)) -> int:
        """`predictions.csv` in `out_dir`: for each image of one file or folder, its file name, the
        predicted class, its probability and the top-5 classes."""

        if len(inputs) != 1:
            raise SystemExit(f'error: classification takes one --input (a file or a folder), got {len(inputs)}')
        cfg = self.cfg
        spec = replace(image_spec(cfg.dataset), size=cfg.crop_size)
        names = class_names(cfg.dataset, cfg.nclass, cfg.class_names)
        normalize = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
        rows = ['file,class,probability,top5']
        for path in list_inputs(inputs[0]):
            try:
                img = load_rgb(path)
            except (UnidentifiedImageError, OSError) as err:
                print(f'warning: skipping {path}: not a readable image ({err})', file=sys.stderr)
                continue
            with torch.inference_mode():
                prob = model(normalize(eval_view(img, spec))[None].to(device)).flatten(1).float().softmax(1)[0]
            top = prob.topk(min(5, len(prob))).indices.tolist()
            rows.append(f'{path.name},{names[top[0]]},{prob[top[0]].item():.4f},{" ".join(names[k] for k in top)}')
        write_text_atomic('\n'.join(rows) + '\n', out_dir / 'predictions.csv')
        return len(rows) - 1
