"""Semi-supervised training: UniMatch V2 (default), FixMatch or UniMatch V1 on DINOv2 + DPT.

    python unimatch_v2.py --config configs/toy.yaml --split 1_16
    torchrun --nproc_per_node 4 unimatch_v2.py --config configs/pascal.yaml --split 92 method=fixmatch
    sh scripts/train.sh pascal 92            # the same, with the paper's launch

Writes latest.pth / best.pth / results.json / train.log / tb/ to --save-path
(default exp/<dataset>/<method>/<backbone>/<split>) and resumes from latest.pth when it exists.
"""
from __future__ import annotations

from util import dist, trainer
from util.ema import EMATeacher
from util.logger import TensorBoard
from util.losses import build_criterion
from util.precision import Precision
from util.steps import METHOD_OPTIONS, SemiOptions, unimatch_v1_step, weak_to_strong_step
from dataset.semi import SemiDataset


def semi_options(cfg) -> SemiOptions:
    base = METHOD_OPTIONS[cfg.method]
    return SemiOptions(conf_thresh=cfg.conf_thresh, lossu_weight=cfg.lossu_weight, views=base.views,
                       comp_drop=base.comp_drop, fused=True)


def train_epoch(run, epoch, student, ddp, teacher, optimizer, precision, criterion, loader_l, loader_u,
                opt, tb) -> dict:
    loader_l.sampler.set_epoch(epoch)
    loader_u.sampler.set_epoch(epoch)
    iters = trainer.iteration_budget(len(loader_u), run.cfg)
    step_log = trainer.StepLog(run, tb, epoch, iters)
    ddp.train()
    for i, batch_l, batch_u in zip(range(iters), loader_l, loader_u):
        it = epoch * iters + i
        batch_l, batch_u = trainer.to_device(batch_l, run.device), trainer.to_device(batch_u, run.device)
        with precision.autocast():
            if run.cfg.method == 'unimatch_v1':
                out = unimatch_v1_step(ddp, batch_l, batch_u, criterion, opt)
            else:
                out = weak_to_strong_step(ddp, teacher, batch_l, batch_u, criterion, opt)
        lr = trainer.optimizer_step(out['loss'], optimizer, precision, run.cfg, it, step_log.total)
        teacher.update(student, it)
        step_log(i, out, lr)
    return step_log.summary()


def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    run = trainer.setup_run(args)
    cfg = run.cfg
    if cfg.method == 'supervised':
        raise SystemExit('method=supervised: run supervised.py')

    labeled, unlabeled, val = trainer.data_paths(cfg, args)
    opt = semi_options(cfg)
    trainset_u = SemiDataset(cfg.data_root, unlabeled, 'train_u', cfg.crop_size, num_strong=opt.views,
                             nclass=cfg.nclass)
    trainset_l = SemiDataset(cfg.data_root, labeled, 'train_l', cfg.crop_size, nsample=len(trainset_u),
                             nclass=cfg.nclass)
    loader_u = trainer.make_loader(trainset_u, cfg, cfg.batch_size)
    loader_l = trainer.make_loader(trainset_l, cfg, cfg.batch_size, seed_offset=1)
    valset = trainer.val_dataset(cfg, val)

    student = trainer.build_student(cfg, run.device, run.log)
    teacher = EMATeacher(student, cfg.ema_decay)
    optimizer = trainer.build_optimizer(student, cfg)
    state = trainer.resume(run.run_dir, student, teacher, optimizer, cfg, run.log)
    ddp = trainer.wrap_ddp(student, run.device)
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.kwargs)
    precision = Precision(cfg.precision, run.device)
    tb = TensorBoard(run.run_dir)

    run.log.info(f'{cfg.method}: {len(trainset_l.samples)} labeled / {len(trainset_u)} unlabeled images, '
                 f'{trainer.iteration_budget(len(loader_u), cfg)} iterations per epoch')
    for epoch in range(state.epoch + 1, cfg.epochs):
        stats = train_epoch(run, epoch, student, ddp, teacher, optimizer, precision, criterion, loader_l,
                            loader_u, opt, tb)
        trainer.end_of_epoch(run, epoch, student, teacher, optimizer, state, valset, stats)
        tb.scalars({'miou': state.history[-1]['miou'], 'miou_ema': state.history[-1]['miou_ema']}, epoch, 'val/')
    tb.close()
    dist.cleanup()


if __name__ == '__main__':
    main()
