"""What a launcher script needs to know before it starts torchrun, in one Python start: the run
directory (`util.config.run_directory`, the formula the trainer and the catalogue use), the process
count and a free port. Prints shell assignments for `eval`; a config error ends with its one line
and exit 1 before anything is written.

    python -m tools.launch CONFIG SPLIT [--exp EXP] [--gpus N] [--port P] [key=value ...]
    # save_path=exp/toy/unimatch_v2/dinov2_tiny/1_16
    # gpus=1
    # port=41873
"""
from __future__ import annotations

import argparse
import shlex
import socket
import sys

import torch

from util.config import ConfigError, run_directory
from engine.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('split')
    p.add_argument('--exp', default='exp', help='experiment root (the launchers\' EXP_DIR)')
    p.add_argument('--gpus', type=int, help='processes on this node (default: every visible GPU, or 1)')
    p.add_argument('--port', type=int, help='rendezvous port (default: a free one)')
    p.add_argument('overrides', nargs='*')
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(1) from None
    values = {'save_path': run_directory(args.exp, cfg.data_name, cfg.method, cfg.backbone, args.split),
              'gpus': args.gpus or max(1, torch.cuda.device_count()),
              'port': args.port or free_port()}
    for key, value in values.items():
        print(f'{key}={shlex.quote(str(value))}')


if __name__ == '__main__':
    main()
