"""Config loading, for any config dataclass: YAML read with floats as floats (`read_yaml`),
`key=value` overrides parsed as YAML scalars and applied to nested keys (`apply_overrides`), values
type-checked against the dataclass's hints (`coerce`), errors that name where a value came from
(`Sources`: the file or the command line's `key=value`) and the closest known key (`unknown_keys`),
the resolved config saved as YAML, and the run directory's formula. The run's own config (its keys,
the methods' keys, its checks) is composed above the library, in engine/config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from util.checkpoint import write_text_atomic


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load`, but `1e-5` is a float: YAML 1.1 (PyYAML) wants a dot in exponent floats and
    would read `lr=1e-5` or `lr: 5e-6` as a string."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float', re.compile(r'^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$'),
    list('-+0123456789.'))


class ConfigError(ValueError):
    """A config file or override that does not fit `Config`; the message names the key."""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


class Sources:
    """Where each value of a config came from, for error messages: the config file, or the
    command line's `key=value` text (`overrides`: dotted key -> that text)."""

    def __init__(self, source: str, overrides: dict[str, str] | None = None):
        self.source, self.overrides = source, overrides or {}

    def of(self, key: str) -> str:
        """'command line: crop_size=abc' when `key` (or a key inside it, or the mapping holding it)
        was set on the command line, else the config file."""
        for dotted, text in reversed(list(self.overrides.items())):
            if dotted == key or dotted.startswith(key + '.') or key.startswith(dotted + '.'):
                return f'command line: {text}'
        return self.source


def unknown_keys(keys: list[str], known: list[str], prefix: str = '', where: str = '') -> str:
    """"unknown config key 'crop_sise' (did you mean 'crop_size'?)", for each key; without a close
    match, `where` says where the keys are listed."""
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ''
        parts.append(f"'{prefix}{key}'{hint}")
    tail = '' if any('did you mean' in p for p in parts) or not where else f'; {where}'
    return f'unknown config key{"s" if len(keys) > 1 else ""} {", ".join(parts)}{tail}'


def coerce(key: str, value: Any, hint: Any, where: str = '<dict>') -> Any:
    if not _type_ok(value, hint):
        raise ConfigError(f'{where}: config key {key!r}: expected {getattr(hint, "__name__", hint)}, '
                          f'got {type(value).__name__} {value!r}')
    return float(value) if hint is float else value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'criterion.kwargs.thresh=0.7' -> (['criterion', 'kwargs', 'thresh'], 0.7)."""
    if '=' not in text:
        raise ConfigError(f'command line: {text!r} is neither a flag nor an override of the form key=value')
    key, value = text.split('=', 1)
    path = key.strip().split('.')
    if not all(path):
        raise ConfigError(f'command line: {text}: {key!r} is not a config key')
    try:
        return path, yaml.load(value, Loader=_Loader) if value != '' else None
    except yaml.YAMLError as err:
        raise ConfigError(f'command line: {text}: the value is not valid YAML '
                          f'({" ".join(str(err).split())})') from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw, _ = apply_overrides_traced(raw, overrides)
    return raw


def apply_overrides_traced(raw: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """(raw with the overrides applied, dotted key -> the override's text)."""
    raw, origins = dict(raw), {}
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f'command line: {text}: config key {".".join(path[:depth + 1])!r} holds '
                                  f'{child!r}, not a mapping of keys')
            child = dict(child or {})
            node[part] = child
            node = child
        node[path[-1]] = value
        origins['.'.join(path)] = text
    return raw, origins


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping (`_Loader`: `1e-5` is a float); ConfigError naming the file."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f'config file {path} does not exist') from None
    except IsADirectoryError:
        raise ConfigError(f'config file {path} is a directory') from None
    except yaml.YAMLError as err:
        raise ConfigError(f'{path}: not valid YAML: {" ".join(str(err).split())}') from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: expected a mapping of keys to values, got {type(raw).__name__}')
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """A config dataclass as YAML, written atomically."""
    write_text_atomic(yaml.safe_dump(to_dict(cfg), sort_keys=False), Path(path))


def run_directory(exp_root: str | Path, dataset: str, method: str, backbone: str, split: str) -> Path:
    """A run's directory under an experiment root: `<exp>/<dataset>/<method>/<backbone>/<split>`."""
    return Path(exp_root) / dataset / method / backbone / split

