"""What the split tools (`make_custom_split.py`, `make_classification_split.py`) share: the config
they write, checked by the config loader first, and the order that leaves nothing half-written --
an existing config refused before any split file is written, the split files, then the config --
with one `error:` line for what goes wrong and a line per file written."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from engine.config import from_dict
from util.checkpoint import write_text_atomic


def checked_config(text: str) -> str:
    """`text` (a config file's YAML), after the config loader has accepted it."""
    from_dict(yaml.safe_load(text), source='command line')
    return text


def write_splits(make_splits: Callable[[], dict[str, Path]], make_config: Callable[[], str] | None,
                 config_path: Path | None, force: bool, errors: tuple[type[Exception], ...]) -> None:
    """Run `make_splits` (role -> the list file it wrote) and write `make_config()`'s text to
    `config_path`; `errors` end with their one line (`error: ...`, exit 1)."""
    try:
        config = make_config() if make_config else None
        if config and config_path.exists() and not force:      # before any split file is written
            raise FileExistsError(f'{config_path} exists')
        paths = make_splits()
        if config:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(config, config_path)
    except FileExistsError as err:
        raise SystemExit(f'error: {err}; nothing was written (--force overwrites)') from None
    except errors as err:
        raise SystemExit(f'error: {err}') from None
    for role, path in paths.items():
        n = sum(1 for line in open(path) if line.strip())
        print(f'{role:9s} {n:6d}  {path}')
    if config:
        print(f'config              {config_path}')
