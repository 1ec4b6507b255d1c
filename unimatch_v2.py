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

import argparse

import methods
from engine.build import build_optimizer, build_student, make_step, wrap_ddp
from engine.data import epoch_iterations, train_loaders
from engine.failures import guarded
from engine.loop import fit, val_dataset
from engine.run import parse_args, setup_run
from engine.state import Training, TrainState
from tools import plan
from util.ema import EMATeacher
from util.logger import TensorBoard
from util.precision import Precision


@guarded
def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    plan.print_plan(args) if args.plan is not None else train(args)


def train(args: argparse.Namespace, method: str | None = None) -> Training:
    """Train `args.config`'s method (or `method`), evaluating after each epoch; resumes from the
    run directory's latest.pth. Returns what was trained (for tests and notebooks)."""
    # Build: the config and the data checked, the loaders, the student and its EMA teacher, the step.
    run = setup_run(args, method)
    cfg = run.cfg
    options = methods.get(cfg.method).options          # the core step's options; None: labeled only
    loaders = train_loaders(run, options)               # [unlabeled, labeled], or [labeled]
    valset = val_dataset(run)
    student = build_student(cfg, run.device, run.log, run.task)
    teacher = EMATeacher(student, cfg.ema_decay) if options else None    # from the unwrapped student, before DDP
    tr = Training(run, student, wrap_ddp(student, run.device, cfg.compile), teacher, build_optimizer(student, cfg),
                  Precision(cfg.precision, run.device), TrainState(), TensorBoard(run.run_dir),
                  methods.create(cfg, student, run.device))
    iters = epoch_iterations(loaders[0], cfg)
    step = make_step(tr, options, iters)     # the criterion: the last thing built before the run directory

    # Loop: this run owns the run directory (resuming from its latest.pth); each epoch trains,
    # evaluates and saves.
    fit(tr, loaders, step, valset, iters)
    return tr


if __name__ == '__main__':
    main()
