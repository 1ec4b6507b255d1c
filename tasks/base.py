"""What a task is: one class in one module, registered by name (`tasks/__init__.py`).

A task is the part of a run that depends on what is predicted -- segmentation maps, change maps,
image classes -- around the one training step, loop, EMA teacher, losses and checkpoints. The
dataset picks it: each spec in `dataset/registry.py` names its task. A task says, in one place:

  * its data: the split files of a split (`split_paths`), the checks of those files before anything
    is written (`check_inputs`), and its datasets (`dataset`: labeled, unlabeled and evaluation
    samples, in the dict layout `methods/step.py` documents, whatever `image` holds);
  * its model (`build_model`);
  * its evaluation (`evaluate` -> a result dict; `scores` -> the per-epoch figures kept in
    `results.json`; `metric`, the figure whose best picks best.pth; `reports_ema`, whether the
    figure reported is the EMA model's; `format_result` and `headline` for the log and console);
  * its prediction on arbitrary inputs (`predict`, for predict.py);
  * what it gives the methods (`provides`): a method runs on the task when the task gives all the
    method needs (`methods.base.Method.needs`; `supports` answers it, `methods.check_run` checks it).

The trainer, evaluate.py, predict.py and benchmark.py call these and never name a task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dataset.pseudo_label_set import ROLE, spread_subset
from dataset.registry import class_names as registry_class_names
from dataset.splits import read_split
from model.inference import predict
from model.presets import nearest_multiples, patch_size
from util.capabilities import OWN_MODEL, STEP_HOOKS
from util.pseudo_labels import pseudo_label_stats

Need = Callable[[bool, str, str], None]     # need(ok, key, message): raise a ConfigError naming the key


def check_crop(cfg, need: Need) -> None:
    """A dense task's training crop is a multiple of the encoder's patch: the model's logits cover
    the input cropped to its patch grid, and the losses and CutMix compare them with the crop."""
    try:
        patch = patch_size(cfg.backbone)
    except ValueError as err:
        choices = str(err).removeprefix(f'unknown backbone {cfg.backbone!r}; choose one of ')
        need(False, 'backbone', f'must be one of {choices}, got {cfg.backbone!r}')
        return
    need(cfg.crop_size % patch == 0, 'crop_size',
         f'must be a multiple of {patch}, the patch of backbone={cfg.backbone}, got {cfg.crop_size}; '
         f'nearest: {" or ".join(map(str, nearest_multiples(cfg.crop_size, patch)))}')


class Task:
    name: ClassVar[str]
    summary: ClassVar[str] = ''
    metric: ClassVar[str]                   # key of `scores`: its best picks best.pth and the reported figure
    metric_label: ClassVar[str]             # how the log prints it ('mIoU', 'changed IoU', 'top-1')
    result_title: ClassVar[str] = 'scores'  # the log's name of `format_result`'s table
    reports_ema: ClassVar[bool] = True      # the reported figure is the EMA model's (else the student's)
    in_channels: ClassVar[int] = 3          # channels of one model input (benchmark batches)
    benchmarked: ClassVar[bool] = True      # benchmark.py times its step against the original's
    provides: ClassVar[frozenset[str]] = frozenset({OWN_MODEL, STEP_HOOKS})   # what its methods may need
    pseudo_label_unit: ClassVar[str] = 'pixels'   # what one pseudo-label labels (the diagnostics' table)

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg, need: Need, semi: bool) -> None:
        """Validate the keys of a config whose dataset has this task (a dense one: the crop);
        `semi`: whether the run's method trains on unlabeled data too."""
        check_crop(cfg, need)

    # ---- data ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Make a generated dataset on first use (called on the main process only)."""

    def split_paths(self, split: str) -> tuple[Path, Path, Path]:
        """(labeled, unlabeled, evaluation) split files of `split`. A task whose splits are not files
        (classification: label counts) returns its own names of the three parts; the trainer only
        prints them and passes them back to `check_inputs` and `dataset`."""
        raise NotImplementedError

    def eval_split_path(self) -> Path:
        """The evaluation split file when the split files are given by path."""
        raise NotImplementedError

    def check_inputs(self, splits: dict[str, Path], full: bool = False,
                     roots: dict[str, str] | None = None) -> list:
        """`dataset.checks.Problem`s of the split files (role -> file: 'labeled', 'unlabeled',
        'val'); `full` opens every file. A role's files live under `roots[role]` when given."""
        raise NotImplementedError

    def dataset(self, split_file: Path, mode: str, nsample: int | None = None, num_strong: int = 2,
                root: str | None = None) -> Dataset:
        """Samples of `split_file` in mode 'train_l', 'train_u' or 'val' (`dataset/semi.py` has the
        dict layout), the list repeated to `nsample`; under `root` (default: the data root)."""
        raise NotImplementedError

    def split_sizes(self, split: str) -> dict[str, int | str]:
        """Samples in each part of `split` ('labeled', 'unlabeled', 'val'), counted from its split
        lists without opening an image or writing a file (`--plan`); a string in place of a count
        says why it is not known."""
        roles = ('labeled', 'unlabeled', 'val')
        try:
            paths = self.split_paths(split)
        except FileNotFoundError as err:
            return {role: str(err) for role in roles}
        return {role: len(read_split(path)) if Path(path).exists() else f'{path} is missing'
                for role, path in zip(roles, paths)}

    def epoch_unlabeled(self, n_unlabeled: int | str, processes: int) -> int | str:
        """Unlabeled samples `dataset(..., 'train_u')` holds for one epoch of `processes`
        processes, given the set's size: the set once."""
        return n_unlabeled

    def augmentations(self, num_strong: int) -> dict[str, str]:
        """What the training samples go through, by kind of view ('labeled', 'weak', 'strong'), in
        words (`--plan`); `num_strong`: strong views per unlabeled sample."""
        return {}

    def demo_dataset(self, root: Path) -> Dataset:
        """A few generated unlabeled training samples under `root` (benchmark.py times the data
        pipeline on them)."""
        raise NotImplementedError

    # ---- model -----------------------------------------------------------------------------------

    def build_model(self, cfg=None) -> nn.Module:
        """The model of `cfg` (default: the task's), random init."""
        raise NotImplementedError

    # ---- evaluation ------------------------------------------------------------------------------

    default_weights: ClassVar[str | None] = None    # evaluate.py's weights of a checkpoint holding both

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device, *, mode: str | None = None,
                 flip: bool = False, scales: Sequence[float] = (1.0,), save_dir: Path | None = None,
                 progress: bool = False, num_workers: int = 0, conf_thresh: float | None = None) -> dict:
        """Evaluate `model` on `dataset` over every process; a dict holding at least `metric` and
        'n_images'; with `conf_thresh`, also the nclass x nclass counts 'confusion' (rows: true
        class, columns: prediction) and 'confident_confusion' (the predictions whose top probability
        is at least `conf_thresh` only): the pseudo-label diagnostics."""
        raise NotImplementedError

    def class_names(self) -> list[str]:
        """The dataset's class names (the registry's, or the config's `class_names`)."""
        return registry_class_names(self.cfg.dataset, self.cfg.nclass, self.cfg.class_names)

    def eval_mode(self, mode: str | None = None) -> str:
        """The inference mode of an evaluation ('original', 'sliding_window', ...)."""
        return mode or self.cfg.eval_mode or 'original'

    def scores(self, result: dict) -> dict:
        """The figures of one evaluation kept per epoch in results.json (JSON values)."""
        return {self.metric: result[self.metric]}

    def format_result(self, result: dict) -> str:
        """The table the log shows after each evaluation."""
        return f'{self.metric_label}: {result[self.metric]:.2f}'

    def headline(self, result: dict) -> str:
        """evaluate.py's last line, `<label>: NN.NN`."""
        return f'{self.metric_label}: {result[self.metric]:.2f}'

    def report(self, result: dict) -> dict:
        """evaluate.py's JSON report of a result (besides the run's description)."""
        return {k: v for k, v in result.items()}

    def results_extra(self, history: list[dict], best_epoch: int) -> dict:
        """Entries the task adds to results.json (history: one entry per epoch)."""
        return {}

    # ---- pseudo-label diagnostics (`pseudo_label_stats: true`, docs/diagnostics.md) ---------------

    def check_pseudo_label_masks(self, unlabeled: Path, root: str | None = None) -> list:
        """`dataset.checks.Problem`s of the unlabeled list read as a labeled one: a line without a
        mask, a mask file that is missing (images under `root`, default the data root)."""
        return self.check_inputs({ROLE: unlabeled}, roots={ROLE: root} if root else None)

    def pseudo_label_set(self, unlabeled: Path, root: str | None = None) -> Dataset:
        """`pseudo_label_stats_images` samples of the unlabeled list, spread evenly over it, with
        their masks, as the evaluation reads its samples ('val' mode: no random augmentation)."""
        return spread_subset(self.dataset(unlabeled, 'val', root=root), self.cfg.pseudo_label_stats_images)

    def pseudo_label_stats(self, model: nn.Module, dataset: Dataset, device: torch.device) -> dict:
        """`util.pseudo_labels.pseudo_label_stats` of `model`'s pseudo-labels (confident at
        `conf_thresh`) on `pseudo_label_set`'s samples, predicted as the evaluation predicts."""
        res = self.evaluate(model, dataset, device, conf_thresh=self.cfg.conf_thresh)
        return pseudo_label_stats(res['confusion'], res['confident_confusion'])

    # ---- prediction ------------------------------------------------------------------------------

    images_per_input: ClassVar[int] = 1     # images that make one model input (change detection: 2 dates)

    def model_input(self, images: Sequence) -> torch.Tensor:
        """The model input float [in_channels, H, W] of one sample's images (8-bit RGB PIL images
        of one size, `images_per_input` of them), normalised as in training and evaluation."""
        raise NotImplementedError(f'{self.name} predicts no maps (predict.py writes its predictions)')

    def infer(self, model: nn.Module, images: Sequence, device: torch.device | None = None, *,
              mode: str | None = None, flip: bool = False, scales: Sequence[float] = (1.0,)):
        """`model.inference.Prediction` (probs float [1, nclass, H, W], valid bool [1, H, W]) of one
        sample's images, as the task's evaluation predicts: its inference mode (`eval_mode`), crop
        size and class count; flips and scales as asked."""
        if len(images) != self.images_per_input:
            raise ValueError(f'{self.name} predicts from {self.images_per_input} image(s) at a time, got {len(images)}')
        x = self.model_input(images)[None]
        if device is None:
            device = next(model.parameters(), x).device
        with torch.inference_mode():
            return predict(model, x.to(device), self.eval_mode(mode), self.cfg.crop_size, self.cfg.nclass,
                           flip, scales)

    def predict(self, model: nn.Module, inputs: list[Path], out_dir: Path, device: torch.device, *,
                labels: Path | None = None, mode: str | None = None, flip: bool = False,
                scales: Sequence[float] = (1.0,)) -> int:
        """Predict every input under `inputs` (a file or a folder, or as many folders as the
        task's inputs have parts) into `out_dir`; returns how many were written."""
        raise NotImplementedError


REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task of datasets whose spec names `cls.name`."""
    if cls.name in REGISTRY:
        raise ValueError(f'task {cls.name!r} is registered twice')
    REGISTRY[cls.name] = cls
    return cls
