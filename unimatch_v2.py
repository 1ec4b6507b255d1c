"""Semi-supervised training on DINOv2 + DPT: UniMatch V2 by default, any registered method by name
(`python -m methods` lists them).

    python unimatch_v2.py --config configs/toy.yaml --split 1_16
    torchrun --nproc_per_node 4 unimatch_v2.py --config configs/pascal.yaml --split 92 method=<name>
    sh scripts/train.sh pascal 92            # the same, with the paper's launch
    sh scripts/train.sh pascal 92 <name>     # any registered method (some also add their loss to
                                             # another one when their own key is set)

Writes latest.pth / best.pth / results.json / train.log / tb/ to --save-path
(default exp/<dataset>/<method>/<backbone>/<split>) and resumes from latest.pth when it exists,
mid-epoch included. SIGTERM saves a checkpoint at the current iteration and exits.
"""
from __future__ import annotations

from tools import plan
from util import trainer


@trainer.guarded
def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    plan.print_plan(args) if args.plan is not None else trainer.train(args)


if __name__ == '__main__':
    main()
