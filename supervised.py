"""Labeled-only training: the baseline every semi-supervised result is compared with
(`methods/supervised.py`; the same as `unimatch_v2.py ... method=supervised`).

    python supervised.py --config configs/toy.yaml --split 1_16
    sh scripts/train.sh pascal 92 supervised

As the original: batch size 2x the semi-supervised one, the labeled list repeated to
`labeled_upsample` samples per epoch when it is shorter (3000 for Pascal/Cityscapes), the same
optimizer, schedule and evaluation. Writes latest.pth / best.pth / results.json to the run directory
and resumes from latest.pth, mid-epoch included.
"""
from __future__ import annotations

from tools import plan
from util import trainer


@trainer.guarded
def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    plan.print_plan(args, method='supervised') if args.plan is not None else trainer.train(args, method='supervised')


if __name__ == '__main__':
    main()
