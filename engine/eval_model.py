"""A trained model for evaluation or prediction: a checkpoint (ours, the original's released ones,
a plain state dict, or `released:<name>`) built as its task's model with its method's extras and
its saved config, the chosen weights (EMA or student) loaded strictly, in eval mode."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple, Sequence

from torch import nn

import tasks
from engine.build import build_model
from engine.config import Config, from_dict
from model.hub import released_file
from model.loading import WeightsMismatchError, load_checked, model_state_from
from util.checkpoint import safe_load
from util.config import ConfigError, apply_overrides


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
    model = build_model(cfg, task)
    state, which = model_state_from(ckpt, weights or task.default_weights)
    load_checked(model, state, str(path))
    return LoadedModel(model.eval(), which, cfg)


def build_eval_model(path: str | Path, weights: str | None, cfg, config_path: str | Path = 'the config'
                     ) -> tuple[nn.Module, str]:
    """(model, which weights) of `load_eval_model`."""
    loaded = load_eval_model(path, weights, cfg, config_path)
    return loaded.model, loaded.weights


def parse_scales(text: str) -> tuple[float, ...]:
    """'0.75,1.0,1.25' -> (0.75, 1.0, 1.25); every scale must be positive."""
    try:
        scales = tuple(float(s) for s in text.split(',') if s.strip())
    except ValueError:
        raise ValueError(f'scales must be comma-separated numbers, got {text!r}') from None
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f'scales must be positive numbers, got {text!r}')
    return scales
