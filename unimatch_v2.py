"""Semi-supervised training: UniMatch V2 (default), FixMatch or UniMatch V1 on DINOv2 + DPT.

    python unimatch_v2.py --config configs/toy.yaml --split 1_16
    torchrun --nproc_per_node 4 unimatch_v2.py --config configs/pascal.yaml --split 92 method=fixmatch
    sh scripts/train.sh pascal 92            # the same, with the paper's launch

Writes latest.pth / best.pth / results.json / train.log / tb/ to --save-path
(default exp/<dataset>/<method>/<backbone>/<split>) and resumes from latest.pth when it exists,
mid-epoch included. SIGTERM saves a checkpoint at the current iteration and exits.
"""
from __future__ import annotations

from dataset.semi import SemiDataset
from util import dist, trainer
from util.ema import EMATeacher
from util.logger import TensorBoard
from util.losses import build_criterion
from util.precision import Precision
from util.steps import METHOD_OPTIONS, SemiOptions, unimatch_v1_step, weak_to_strong_step

def semi_options(cfg) -> SemiOptions:
    base = METHOD_OPTIONS[cfg.method]
    return SemiOptions(conf_thresh=cfg.conf_thresh, lossu_weight=cfg.lossu_weight, views=base.views,
                       comp_drop=base.comp_drop, fused=True)

def build_loaders(run: trainer.Run, views: int) -> list:
    """[unlabeled, labeled] loaders: an epoch is one pass over the unlabeled set, with the labeled
    list repeated to its length."""
    cfg = run.cfg
    trainset_u = SemiDataset(cfg.data_root, run.unlabeled, 'train_u', cfg.crop_size, num_strong=views,
                             nclass=cfg.nclass)
    trainset_l = SemiDataset(cfg.data_root, run.labeled, 'train_l', cfg.crop_size, nsample=len(trainset_u),
                             nclass=cfg.nclass)
    return [trainer.make_loader(trainset_u, cfg, cfg.batch_size),
            trainer.make_loader(trainset_l, cfg, cfg.batch_size, seed_offset=1)]

def make_step(tr: trainer.Training, opt: SemiOptions):
    criterion = build_criterion(tr.run.cfg.criterion.name, tr.run.cfg.criterion.kwargs)
    if tr.run.cfg.method == 'unimatch_v1':
        return lambda batch_u, batch_l: unimatch_v1_step(tr.ddp, batch_l, batch_u, criterion, opt)
    return lambda batch_u, batch_l: weak_to_strong_step(tr.ddp, tr.teacher, batch_l, batch_u, criterion, opt)

@trainer.guarded
def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    run = trainer.setup_run(args)
    cfg = run.cfg
    if cfg.method == 'supervised':
        raise SystemExit('method=supervised: run supervised.py')
    opt = semi_options(cfg)
    loaders = build_loaders(run, opt.views)
    valset = trainer.val_dataset(run)

    student = trainer.build_student(cfg, run.device, run.log)
    teacher = EMATeacher(student, cfg.ema_decay)         # from the unwrapped student, before DDP
    tr = trainer.Training(run, student, trainer.wrap_ddp(student, run.device, cfg.compile), teacher,
                          trainer.build_optimizer(student, cfg), Precision(cfg.precision, run.device),
                          trainer.TrainState(), TensorBoard(run.run_dir))
    trainer.resume(tr)
    step = make_step(tr, opt)
    preemption = trainer.Preemption()

    run.log.info(f'{cfg.method}: {len(loaders[1].dataset.samples)} labeled / {len(loaders[0].dataset)} '
                 f'unlabeled samples, {trainer.epoch_iterations(loaders[0], cfg)} iterations per epoch')
    for epoch in range(tr.state.epoch + 1, cfg.epochs):
        stats = trainer.train_epoch(tr, epoch, loaders, step, preemption)
        trainer.end_of_epoch(tr, epoch, valset, stats)
    tr.tb.close()
    dist.cleanup()

if __name__ == '__main__':
    main()
