"""Export a checkpoint's model weights (EMA by default) as a plain state dict, safetensors or .pth.

    python tools/export_weights.py exp/pascal/unimatch_v2/dinov2_small/92/best.pth model.safetensors
    python tools/export_weights.py released_checkpoint.pth model.pth --weights student

The output loads with `evaluate.py --checkpoint` and `model.load_weights`; safetensors files hold
only tensors, so they can be shared without any pickle at all.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from model.loading import model_state_from                       # noqa: E402
from util.checkpoint import atomic_path, safe_load, save_atomic  # noqa: E402


def export(src: str | Path, dst: str | Path, weights: str | None = None) -> str:
    """Write the model state dict of `src` to `dst` (format by suffix); returns which weights."""
    state, which = model_state_from(safe_load(src), weights)
    state = {k: v.contiguous() for k, v in state.items()}
    dst = Path(dst)
    if dst.suffix == '.safetensors':
        from safetensors.torch import save_file
        with atomic_path(dst) as tmp:
            save_file(state, str(tmp))
    else:
        save_atomic(state, dst)
    return which


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint')
    p.add_argument('out', help='*.safetensors or *.pth')
    p.add_argument('--weights', choices=('ema', 'student'), default=None)
    args = p.parse_args()
    which = export(args.checkpoint, args.out, args.weights)
    print(f'wrote the {which} weights of {args.checkpoint} to {args.out}')


if __name__ == '__main__':
    main()
