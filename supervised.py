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

import argparse

import methods
from engine.build import build_optimizer, build_student, make_step, wrap_ddp
from engine.data import epoch_iterations, train_loaders
from engine.failures import guarded
from engine.loop import fit, val_dataset
from engine.run import parse_args, setup_run
from engine.state import Training, TrainState
from tools import plan
from util.logger import TensorBoard
from util.precision import Precision


@guarded
def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    plan.print_plan(args, method='supervised') if args.plan is not None else train(args)


def train(args: argparse.Namespace) -> Training:
    """unimatch_v2.py's recipe without the unlabeled data and the teacher: one labeled loader, the
    labeled step. Returns what was trained (for tests and notebooks)."""
    run = setup_run(args, 'supervised')
    cfg = run.cfg
    loaders = train_loaders(run, None)       # [labeled]: the list repeated to labeled_upsample, batch x2
    valset = val_dataset(run)
    student = build_student(cfg, run.device, run.log, run.task)
    tr = Training(run, student, wrap_ddp(student, run.device, cfg.compile), None, build_optimizer(student, cfg),
                  Precision(cfg.precision, run.device), TrainState(), TensorBoard(run.run_dir),
                  methods.create(cfg, student, run.device))
    iters = epoch_iterations(loaders[0], cfg)
    step = make_step(tr, None, iters)

    fit(tr, loaders, step, valset, iters)
    return tr


if __name__ == '__main__':
    main()
