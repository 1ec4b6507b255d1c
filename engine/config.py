"""The run configuration: typed, validated, composed of the project's keys and every registered
method's.

One flat YAML per dataset (`configs/<dataset>.yaml`) loads into `Config`. The keys of the original
UniMatch V2 configs keep their names and meaning, so an original config loads unchanged; every other
field is an addition with a default. Unknown keys and wrong types are errors that name the key.
`key=value` overrides from the command line are parsed as YAML scalars (`lr=1e-5`, `lock_backbone=true`,
`criterion.name=OHEM`). An error names where the value came from: the config file, or the command
line's `key=value`; a misspelled key gets the closest known one ("did you mean").

Loading itself (YAML, overrides, type checks, error sources) is util/config.py's.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import methods
import tasks
from dataset.registry import DATASETS
from methods.step import SemiOptions
from model.dpt import COMP_DROP_SITES
from model.inference import EVAL_MODES
from util.config import ConfigError, Sources, apply_overrides_traced, coerce, read_yaml, unknown_keys
from util.labels import IGNORE_INDEX
from util.losses import CRITERIA
from util.precision import resolve_precision

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
ATTENTIONS = ('auto', 'sdpa', 'math')
RESUME_CHANGES = ('refuse', 'allow')
TEACHERS = ('ema', 'online')
OPTIMIZERS = ('adamw', 'sgd')
LR_SCHEDULES = ('poly', 'cosine')
TOTAL_LOSSES = ('mean', 'sum')
KEYS_LISTED = "the keys are RunConfig's in engine/config.py and each method's Keys"


@dataclass
class Criterion:
    name: str = 'CELoss'
    kwargs: dict = field(default_factory=lambda: {'ignore_index': IGNORE_INDEX})


@dataclass
class RunConfig:
    # ---- keys of the original release --------------------------------------------------------
    dataset: str = 'pascal'
    data_root: str = 'data/pascal'
    nclass: int = 21
    crop_size: int = 518
    epochs: int = 60
    batch_size: int = 4                  # per process; labeled and unlabeled batches have this size
    lr: float = 5e-6                     # encoder learning rate at the reference global batch
    lr_multi: float = 40.0               # decoder lr = lr * lr_multi
    criterion: Criterion = field(default_factory=Criterion)
    conf_thresh: float = SemiOptions.conf_thresh     # one default: the step's (methods/step.py)
    model: str = 'dpt'
    backbone: str = 'dinov2_small'
    lock_backbone: bool = False
    # ---- additions -----------------------------------------------------------------------------
    method: str = methods.DEFAULT        # any name `python -m methods` lists
    pretrained: str | None = 'auto'      # 'auto' = pretrained/<backbone>.pth; null = random init
    class_names: list | None = None      # for custom datasets
    lossu_weight: float = SemiOptions.lossu_weight   # loss = (loss_x + w * loss_u) / (1 + w)
    total_loss: str = 'mean'             # 'mean': that weighted mean (segmentation, the paper's); 'sum':
                                         # loss_x + w * loss_u (TorchSSL's and USB's classification)
    teacher: str = 'ema'                 # who labels the weak view: 'ema' (the paper) or 'online' (the
                                         # student, under no_grad; the EMA is still kept and evaluated)
    comp_drop_at: str = 'features'       # complementary dropout on the encoder 'features' (the paper) or
                                         # on the decoder's 'classifier' input (Table 12)
    unlabeled_root: str | None = None    # data root of the unlabeled images (null: data_root), e.g.
                                         # COCO's for ADE20K labels + COCO images (Table 13)
    unlabeled_dirs: list | None = None   # image folders under it that make the unlabeled set, listed on
                                         # first use and cached (null: the split's unlabeled list)
    ema_decay: float = 0.996
    weight_decay: float = 0.01
    optimizer: str = 'adamw'             # 'adamw' (the paper's segmentation) or 'sgd' (its classification,
                                         # FixMatch's and USB's: momentum, nesterov below)
    momentum: float = 0.9                # SGD only
    nesterov: bool = True                # SGD only
    lr_schedule: str = 'poly'            # 'poly' (lr (1 - t/T)^0.9, segmentation) or 'cosine'
                                         # (lr cos(7 pi t / 16 T), FixMatch / USB classification)
    unlabeled_ratio: int = 1             # unlabeled batch = batch_size x this (FixMatch's mu = 7)
    download: bool = False               # classification: torchvision downloads missing dataset files
    input_size: int = 224                # classification with a DINOv2 encoder: images resized to this
                                         # side (a multiple of 14) before the encoder
    eval_mode: str | None = None         # None = the dataset's default (see dataset.registry)
    eval_split: str | None = None        # list evaluated, splits/<dataset>/<eval_split>.txt (None = the
                                         # dataset's: val, test for change detection)
    eval_batch_size: int = 1
    labeled_upsample: int = 0            # supervised.py: repeat the labeled list to this length
    reference_gpus: int = 4              # the paper's process count; lr follows the global batch
    scale_lr: bool = True                # lr *= world_size * accum / reference_gpus
    seed: int = 0
    num_workers: int = -1                # -1 = sized to the machine
    precision: str = 'auto'             # autocast dtype of forward passes (fp32: none); auto: bf16 where
                                        # the device has it in hardware, else fp32 (util/precision.py)
    channels_last: bool = True           # channels-last conv weights and maps (bf16 convs ~3x faster on CPU)
    attention: str = 'auto'              # sdpa | math | auto: sdpa on CUDA and in fp32, math for bf16/fp16
                                         # on the CPU (its fused backward is slower there: docs/speed.md)
    compile: bool = False
    grad_checkpointing: bool = False
    grad_accum: int = 1
    drop_path: float = 0.0
    log_interval: int = 20
    max_iters_per_epoch: int = 0         # 0 = a full pass over the unlabeled set (tests use a few)
    eval_interval: int = 0               # 0: evaluate after every epoch; N: after each epoch during which
                                         # TorchSSL's loop evaluates (every N iterations, and every
                                         # eval_interval_final in the last fifth of the run)
    eval_interval_final: int = 0         # 0 = eval_interval
    checkpoint_minutes: float = 10.0     # also write latest.pth mid-epoch this often (0 = per epoch only)
    on_nonfinite: str = 'stop'           # a NaN/inf loss: 'stop' the run or 'skip' the step
    splits_root: str = 'splits'          # split lists live in <splits_root>/<data_name>/
    name: str | None = None              # the data's own name (null: `dataset`): splits/<name>/ and the
                                         # default run directory exp/<name>/...; one per custom dataset
                                         # (tools/make_custom_split.py --name, docs/custom_data.md)
    toy_seed: int = 0                    # toy dataset: generator seed and size (train, val images)
    toy_train: int = 400
    toy_val: int = 100
    pseudo_label_stats: bool = False     # after each evaluation, the pseudo-labels of student and EMA on
                                         # unlabeled images measured against their masks (docs/diagnostics.md)
    pseudo_label_stats_images: int = 200  # unlabeled images in that pass, spread evenly over the list
    resume_changes: str = 'refuse'       # resuming latest.pth with settings that change the run (lr, crop,
                                         # data, schedule, ...): 'refuse' (naming them) or 'allow'
                                         # (docs/robustness.md#resuming)

    @property
    def data_name(self) -> str:
        """The folder name of this data under splits/ and exp/: `name`, else `dataset`."""
        return self.name or self.dataset


# Every method's keys (methods/<name>.py, `Keys`) join the config, flat: `Config` is `RunConfig`
# plus those fields, so `<method key>=<value>` overrides them like any other key.
def _method_fields() -> list[tuple]:
    out = []
    for keys in methods.config_sections():
        hints = typing.get_type_hints(keys)
        out += [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(keys)]
    return out


Config = dataclasses.make_dataclass('Config', _method_fields(), bases=(RunConfig,))
Config.__module__ = __name__
Config.__doc__ = 'A validated run configuration: `RunConfig` and every registered method\'s keys.'


def from_dict(raw: dict, source: str = '<dict>', overrides: dict[str, str] | None = None) -> Config:
    """Build a validated `Config` from a plain dict (a parsed YAML file or a saved checkpoint).
    `overrides` (dotted key -> 'key=value' text) says which values came from the command line."""
    sources = Sources(source, overrides)
    if not isinstance(raw, dict):
        raise ConfigError(f'{source}: expected a mapping of keys to values, got {type(raw).__name__}')
    hints = typing.get_type_hints(Config)
    known = sorted(f.name for f in dataclasses.fields(Config))
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f'{sources.of(unknown[0])}: {unknown_keys(unknown, known, where=KEYS_LISTED)}')
    values = {}
    for key, value in raw.items():
        if key == 'criterion':
            value = _criterion(value, sources)
        else:
            value = coerce(key, value, hints[key], sources.of(key))
        values[key] = value
    cfg = Config(**values)
    _check(cfg, sources)
    return cfg


def _criterion(value: Any, sources: Sources) -> Criterion:
    if isinstance(value, Criterion):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f'{sources.of("criterion")}: config key \'criterion\' must be a mapping with '
                          f'"name" and "kwargs", got {type(value).__name__} {value!r}')
    unknown = sorted(set(value) - {'name', 'kwargs'})
    if unknown:
        raise ConfigError(f'{sources.of("criterion." + unknown[0])}: '
                          f'{unknown_keys(unknown, ["name", "kwargs"], prefix="criterion.")}')
    kwargs = value.get('kwargs') or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f'{sources.of("criterion.kwargs")}: config key \'criterion.kwargs\' must be a '
                          f'mapping of keyword arguments, got {type(kwargs).__name__} {kwargs!r}')
    name = value.get('name', 'CELoss')
    if not isinstance(name, str):
        raise ConfigError(f'{sources.of("criterion.name")}: config key \'criterion.name\': expected str, '
                          f'got {type(name).__name__} {name!r}')
    return Criterion(name=name, kwargs=dict(kwargs))


def _check(cfg: Config, sources: Sources) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f'{sources.of(key)}: config key {key!r} {msg}')

    need(cfg.method in methods.names(), 'method', f'must be one of {methods.names()}, got {cfg.method!r}')
    need(cfg.dataset in DATASETS, 'dataset', f'must be one of {sorted(DATASETS)}, got {cfg.dataset!r}')
    need(cfg.on_nonfinite in ('stop', 'skip'), 'on_nonfinite',
         f"must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    need(cfg.precision in PRECISIONS, 'precision', f'must be one of {PRECISIONS}, got {cfg.precision!r}')
    need(cfg.attention in ATTENTIONS, 'attention', f'must be one of {ATTENTIONS}, got {cfg.attention!r}')
    need(cfg.eval_mode is None or cfg.eval_mode in EVAL_MODES, 'eval_mode',
         f'must be one of {EVAL_MODES}, got {cfg.eval_mode!r}')
    need(cfg.criterion.name in CRITERIA, 'criterion.name',
         f'must be one of {tuple(CRITERIA)}, got {cfg.criterion.name!r}')
    check_criterion_kwargs(cfg.criterion, need)
    need(cfg.resume_changes in RESUME_CHANGES, 'resume_changes',
         f'must be one of {RESUME_CHANGES}, got {cfg.resume_changes!r}')
    need(cfg.optimizer in OPTIMIZERS, 'optimizer', f'must be one of {OPTIMIZERS}, got {cfg.optimizer!r}')
    need(cfg.lr_schedule in LR_SCHEDULES, 'lr_schedule', f'must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}')
    need(cfg.total_loss in TOTAL_LOSSES, 'total_loss', f'must be one of {TOTAL_LOSSES}, got {cfg.total_loss!r}')
    need(cfg.eval_interval >= 0, 'eval_interval', f'must be >= 0, got {cfg.eval_interval}')
    need(cfg.eval_interval_final >= 0, 'eval_interval_final', f'must be >= 0, got {cfg.eval_interval_final}')
    need(cfg.unlabeled_ratio >= 1, 'unlabeled_ratio', f'must be >= 1, got {cfg.unlabeled_ratio}')
    need(cfg.teacher in TEACHERS, 'teacher', f'must be one of {TEACHERS}, got {cfg.teacher!r}')
    need(cfg.comp_drop_at in COMP_DROP_SITES, 'comp_drop_at',
         f'must be one of {COMP_DROP_SITES}, got {cfg.comp_drop_at!r}')
    need(cfg.unlabeled_dirs is None or (len(cfg.unlabeled_dirs) > 0 and all(
        isinstance(d, str) and d and not Path(d).is_absolute() and '..' not in Path(d).parts
        for d in cfg.unlabeled_dirs)), 'unlabeled_dirs',
         f'must be a non-empty list of folders relative to the unlabeled root, got {cfg.unlabeled_dirs!r}')
    need(cfg.nclass >= 2, 'nclass', f'must be >= 2, got {cfg.nclass}')
    need(cfg.crop_size >= 14, 'crop_size', f'must be >= 14, got {cfg.crop_size}')
    need(cfg.name is None or (bool(cfg.name) and '/' not in cfg.name and cfg.name not in ('.', '..')), 'name',
         f'must be a folder name (splits/<name>/), got {cfg.name!r}')
    need(cfg.epochs >= 1, 'epochs', f'must be >= 1, got {cfg.epochs}')
    need(cfg.batch_size >= 1, 'batch_size', f'must be >= 1, got {cfg.batch_size}')
    need(cfg.grad_accum >= 1, 'grad_accum', f'must be >= 1, got {cfg.grad_accum}')
    need(0.0 <= cfg.conf_thresh <= 1.0, 'conf_thresh', f'must be in [0, 1], got {cfg.conf_thresh}')
    need(cfg.pseudo_label_stats_images >= 1, 'pseudo_label_stats_images',
         f'must be >= 1, got {cfg.pseudo_label_stats_images}')
    need(cfg.class_names is None or len(cfg.class_names) == cfg.nclass, 'class_names',
         f'has {len(cfg.class_names or [])} names but nclass is {cfg.nclass}')
    for method in methods.REGISTRY.values():   # every method's keys are the config's: each value checked
        method.check(cfg, need)
    task = tasks.of_dataset(cfg.dataset)
    task.check(cfg, need, semi=methods.get(cfg.method).options is not None)
    methods.check_run(cfg, task, need)


def check_criterion_kwargs(criterion: Criterion, need) -> None:
    """`criterion.kwargs` against the arguments its class takes (the signature of its __init__)."""
    cls = CRITERIA[criterion.name]
    params = inspect.signature(cls.__init__).parameters
    takes = [n for n, p in params.items() if n != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in criterion.kwargs:
        close = difflib.get_close_matches(key, takes, n=1)
        need(key in takes, f'criterion.kwargs.{key}',
             f'is not an argument of criterion {criterion.name} ({cls.__name__}), which takes {takes}'
             + (f'; did you mean criterion.kwargs.{close[0]}?' if close else ''))


def fused_attention(cfg: Config, device_type: str) -> bool:
    """Whether attention runs through F.scaled_dot_product_attention. 'auto' picks the math path
    only for bf16/fp16 training on the CPU, where the fused kernel's backward is the slower one."""
    if cfg.attention != 'auto':
        return cfg.attention == 'sdpa'
    return device_type != 'cpu' or resolve_precision(cfg.precision, device_type) == 'fp32'


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate."""
    raw, origins = apply_overrides_traced(read_yaml(path), overrides or [])
    return from_dict(raw, source=str(path), overrides=origins)
