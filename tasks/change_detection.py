"""Change detection: pairs of co-registered images of two dates, a bi-temporal DPT, changed-class
metrics.

Data: the original's layout (`dataset/change.py`; LEVIR-CD, WHU-CD, the built-in `toy_cd`), a pair
fed as one 6-channel image `[A; B]` so that the one training step, CutMix, EMA and losses serve it
unchanged. Model: `model/change_dpt.py` (one encoder pass over both dates, |f_A - f_B| at the four
taps, the DPT head with 2 classes). Evaluation, per epoch for student and EMA: changed-class IoU and
overall accuracy (the paper's two figures), unchanged IoU, precision, recall and F1 of the changed
class, Cohen's kappa and mIoU, from one confusion matrix.

Which figure is reported, and which checkpoint is best.pth: the paper reports the best changed IoU
of the online model (not the EMA) with the OA of that epoch (FACTS §9), and its pseudo-labels come
from the online model (`teacher: online`). The original saves best.pth on the EMA's changed IoU,
which then is not the checkpoint of the reported figure; here best.pth follows the reported figure
(the student's changed IoU), and evaluate.py / predict.py use the student weights by default
(`--weights ema` for the EMA's).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset.change import RESIZE_RATIO, ChangeDataset, check_change_inputs, load_label, pair_tensor
from dataset.images import denormalize, load_rgb, save_panels
from dataset.registry import get_spec
from dataset.semi import CUTMIX_P
from dataset.toy_cd import ensure_toy_cd
from model.change_dpt import build_change_model
from tasks.base import Task, register
from tasks.evaluation import evaluate
from util.capabilities import STEP_HOOKS
from util.metrics import ConfusionMatrix

CLASS_NAMES = ('unchanged', 'changed')
CHANGED = 1
MASK_VALUE = 255          # a changed pixel in written masks (the datasets' convention)


@register
class ChangeDetection(Task):
    name = 'change_detection'
    summary = 'bi-temporal pairs: one DINOv2 pass over both dates, |f_A - f_B|, DPT; changed IoU, OA, F1, kappa'
    metric = 'changed_iou'
    metric_label = 'changed IoU'
    result_title = 'change metrics'
    reports_ema = False                  # the paper's figure is the online model's (module docstring)
    default_weights = 'student'
    in_channels = 6
    provides = frozenset({STEP_HOOKS})   # its model is the bi-temporal DPT: a method's own segmentor does not fit

    @classmethod
    def check(cls, cfg, need, semi: bool) -> None:
        super().check(cfg, need, semi)
        need(cfg.nclass == 2, 'nclass', f'must be 2 for change detection (unchanged, changed), got {cfg.nclass}')
        need(cfg.backbone.startswith(('dinov2_', 'dinov3_')), 'backbone',
             f'change detection runs on a DINOv2 or DINOv3 encoder (dinov2_<size>, dinov3_<size>), got {cfg.backbone!r}')
        need(cfg.comp_drop_at == 'features', 'comp_drop_at',
             'change detection drops channels of the difference features only (features)')

    # ---- data ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        if get_spec(cfg.dataset).generated:
            ensure_toy_cd(cfg.data_root, Path(cfg.splits_root) / cfg.data_name, seed=cfg.toy_seed,
                          n_train=cfg.toy_train, n_val=max(1, cfg.toy_val // 2), n_test=cfg.toy_val)

    def split_paths(self, split: str) -> tuple[Path, Path, Path]:
        """`<split>/labeled.txt` and `<split>/unlabeled.txt` (`all`: train.txt for both), and the
        evaluation list."""
        base = Path(self.cfg.splits_root) / self.cfg.data_name
        if split == 'all':
            labeled = unlabeled = base / 'train.txt'
        else:
            labeled, unlabeled = base / split / 'labeled.txt', base / split / 'unlabeled.txt'
        for path in (labeled, unlabeled):
            if not path.exists():
                raise FileNotFoundError(f'no split list {path} for {self.cfg.dataset}/{split}')
        return labeled, unlabeled, self.eval_split_path()

    def eval_split_path(self) -> Path:
        name = self.cfg.eval_split or get_spec(self.cfg.dataset).eval_split
        return Path(self.cfg.splits_root) / self.cfg.data_name / f'{name}.txt'

    def check_inputs(self, splits: dict[str, Path], full: bool = False,
                     roots: dict[str, str] | None = None) -> list:
        return check_change_inputs(self.cfg.data_root, splits, full=full, roots=roots)

    def augmentations(self, num_strong: int) -> dict[str, str]:
        crop = self.cfg.crop_size
        return {'labeled': f'both dates and the label rescaled x U{RESIZE_RATIO} together, padded to and randomly '
                           f'cropped to {crop}, horizontal flip p 0.5 (dataset/change.py aligned_geometry)',
                'weak': "the labeled view's geometry",
                'strong': f'{num_strong} view(s) of the weak pair, each: dates A and B jittered independently '
                          '(ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8, Gaussian blur sigma U(0.1, 2) p 0.5, no grayscale), '
                          f'one CutMix box p {CUTMIX_P} shared by A and B'}

    def dataset(self, split_file: Path, mode: str, nsample: int | None = None, num_strong: int = 2,
                root: str | None = None) -> Dataset:
        return ChangeDataset(root or self.cfg.data_root, split_file, mode, self.cfg.crop_size, nsample=nsample,
                             num_strong=num_strong)

    # ---- model -----------------------------------------------------------------------------------

    def build_model(self, cfg=None) -> nn.Module:
        cfg = cfg or self.cfg
        return build_change_model(cfg.backbone, cfg.nclass, cfg.drop_path)

    def demo_dataset(self, root: Path) -> Dataset:
        ensure_toy_cd(root / 'data', root / 'splits', n_train=20, n_val=1, n_test=1)
        return ChangeDataset(root / 'data', root / 'splits/train.txt', 'train_u', self.cfg.crop_size)

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device, *, mode: str | None = None,
                 flip: bool = False, scales: Sequence[float] = (1.0,), save_dir: Path | None = None,
                 progress: bool = False, num_workers: int = 0, conf_thresh: float | None = None) -> dict:
        """The change metrics (`change_scores`) of `model` on `dataset`, with 'n_images' and the
        2 x 2 'confusion' (and 'confident_confusion' with `conf_thresh`); `save_dir` gets
        `<name>.png` (0/255) and `side_by_side/<name>.jpg` (A | B | label | prediction)."""
        res = evaluate(model, dataset, self.cfg.nclass, self.eval_mode(mode), self.cfg.crop_size, flip, scales, device,
                       save_dir=save_dir, progress=progress, num_workers=num_workers, writer=write_change_pictures,
                       conf_thresh=conf_thresh)
        return {**change_scores(res['confusion']), 'n_images': res['n_images'], 'confusion': res['confusion'],
                **{k: res[k] for k in ('confident_confusion',) if k in res}}

    def scores(self, result: dict) -> dict:
        return {k: result[k] for k in SCORES}

    def format_result(self, result: dict) -> str:
        width = max(len(label) for label in SCORES.values())
        return '\n'.join(f'{label:<{width}}  {result[key]:6.2f}' for key, label in SCORES.items())

    def report(self, result: dict) -> dict:
        return {**self.scores(result), 'n_images': result['n_images'], 'classes': list(CLASS_NAMES),
                'confusion': result['confusion']}

    def results_extra(self, history: list[dict], best_epoch: int) -> dict:
        """The paper's figure (FACTS §9): the best non-EMA changed IoU with the OA of its epoch."""
        best = next((h for h in history if h['epoch'] == best_epoch), None)
        return {'reported': {'changed_iou': best['changed_iou'], 'oa': best['oa'], 'epoch': best_epoch}
                if best else None}

    # ---- prediction ------------------------------------------------------------------------------

    images_per_input = 2                 # the two dates, A and B

    def model_input(self, images: Sequence) -> torch.Tensor:
        return pair_tensor(*images)

    def predict(self, model: nn.Module, inputs: list[Path], out_dir: Path, device: torch.device, *,
                labels: Path | None = None, mode: str | None = None, flip: bool = False,
                scales: Sequence[float] = (1.0,)) -> int:
        """Two folders of co-registered images with the same file names (date A, date B): for each
        pair `<stem>.png` (0 unchanged, 255 changed) and `<stem>_pair.jpg` (A | B | label from
        `labels` or blank | prediction). Every pair is checked before anything is written."""

        if len(inputs) != 2 or not all(p.is_dir() for p in inputs):
            raise SystemExit(f'error: change detection takes --input A_DIR B_DIR (two folders), got {inputs}')
        pairs = matched_pairs(*inputs)
        for path in tqdm(pairs, desc='predict', dynamic_ncols=True):
            a, b = load_rgb(path), load_rgb(inputs[1] / path.name)
            probs, _ = self.infer(model, [a, b], device, mode=mode, flip=flip, scales=scales)
            change = change_mask(probs.argmax(dim=1)[0])
            change.save(out_dir / f'{path.stem}.png')
            label_path = labels / path.name if labels is not None else None
            if label_path is not None and label_path.is_file():
                reference = change_mask(torch.from_numpy(load_label(label_path)))
            else:
                reference = Image.new('L', a.size, 0)
            save_panels([a, b, reference, change], out_dir / f'{path.stem}_pair.jpg')
        return len(pairs)


# Scores of one evaluation, in the log's order: key -> label.
SCORES = {'changed_iou': 'changed IoU', 'oa': 'OA', 'unchanged_iou': 'unchanged IoU',
          'precision': 'precision (changed)', 'recall': 'recall (changed)', 'f1': 'F1 (changed)',
          'kappa': 'kappa', 'miou': 'mIoU'}


def change_scores(confusion) -> dict[str, float]:
    """The change metrics (percent) of a 2 x 2 confusion matrix (rows: truth, columns: prediction)."""
    cm = ConfusionMatrix.from_counts(confusion)
    iou = cm.iou()
    return {'changed_iou': float(iou[CHANGED]), 'oa': cm.pixel_acc(), 'unchanged_iou': float(iou[1 - CHANGED]),
            'precision': float(cm.precision()[CHANGED]), 'recall': float(cm.recall()[CHANGED]),
            'f1': float(cm.f1()[CHANGED]), 'kappa': cm.kappa(), 'miou': cm.miou()}


def write_change_pictures(item: dict, pred: torch.Tensor, save_dir: Path) -> None:
    """evaluate's pictures of a pair: `<name>.png` (0/255) and `side_by_side/<name>.jpg`
    (A | B | label | prediction)."""
    a, b = item['image'][:3], item['image'][3:]
    change = change_mask(pred)
    change.save(save_dir / f'{item["name"]}.png')
    save_panels([denormalize(a), denormalize(b), change_mask(item['mask']), change],
                save_dir / 'side_by_side' / f'{item["name"]}.jpg')


def change_mask(ids: torch.Tensor) -> Image.Image:
    """Class ids [H, W] -> an 'L' picture: MASK_VALUE where changed, 0 elsewhere (unchanged,
    ignored)."""
    return Image.fromarray(((ids == CHANGED).cpu().numpy() * MASK_VALUE).astype(np.uint8))


def matched_pairs(dir_a: Path, dir_b: Path) -> list[Path]:
    """The files of `dir_a` that are readable images with a partner of the same name and size in
    `dir_b`; a missing partner, an unreadable image or a size mismatch stops with every problem
    named (before anything is written)."""
    files = sorted(p for p in dir_a.iterdir() if p.is_file())
    problems = []
    for p in files:
        q = dir_b / p.name
        if not q.is_file():
            problems.append(f'{p}: no file of that name in {dir_b}')
            continue
        try:
            with Image.open(p) as a, Image.open(q) as b:
                if a.size != b.size:
                    problems.append(f'{p.name}: {p} is {a.size[0]}x{a.size[1]} but {q} is {b.size[0]}x{b.size[1]}')
        except (UnidentifiedImageError, OSError) as err:
            problems.append(f'{p.name}: not a readable image ({err})')
    extra = sorted({q.name for q in dir_b.iterdir() if q.is_file()} - {p.name for p in files})
    problems += [f'{dir_b / name}: no file of that name in {dir_a}' for name in extra]
    if problems:
        print('\n'.join(f'error: {m}' for m in problems), file=sys.stderr)
        raise SystemExit(f'error: {len(problems)} problem(s) with the pairs of {dir_a} and {dir_b}; nothing was written')
    if not files:
        raise SystemExit(f'error: no images in {dir_a}')
    return files
