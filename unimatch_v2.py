"""Semi-supervised training on DINOv2 + DPT: UniMatch V2, FixMatch, UniMatch V1, PrevMatch, IPixMatch.

    python unimatch_v2.py --config configs/toy.yaml --split 1_16
    torchrun --nproc_per_node 4 unimatch_v2.py --config configs/pascal.yaml --split 92 method=fixmatch
    sh scripts/train.sh pascal 92            # the same, with the paper's launch
    sh scripts/train.sh pascal 92 prevmatch  # or ipixmatch; the losses also go on any method:
    python unimatch_v2.py --config configs/toy.yaml --split 1_16 method=fixmatch ipix_weight=0.5

Writes latest.pth / best.pth / results.json / train.log / tb/ to --save-path
(default exp/<dataset>/<method>/<backbone>/<split>) and resumes from latest.pth when it exists,
mid-epoch included. SIGTERM saves a checkpoint at the current iteration and exits.
"""
from __future__ import annotations

from typing import Callable

from dataset.semi import SemiDataset
from util import dist, trainer
from util.config import loss_weight
from util.ema import EMATeacher
from util.ipix import IPixOptions, warmup_ramp
from util.logger import TensorBoard
from util.losses import build_criterion
from util.precision import Precision
from util.prevmatch import Guidance, SnapshotBank, guidance_weight
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

def build_snapshot_bank(cfg, student, device) -> SnapshotBank | None:
    """PrevMatch's snapshot bank when previous guidance is on (method prevmatch or prev_weight > 0)."""
    if loss_weight(cfg, 'prev_weight') == 0:
        return None
    every = cfg.prev_every or max(1, cfg.epochs // cfg.prev_snapshots)
    return SnapshotBank(student, cfg.prev_snapshots, cfg.prev_ensemble, cfg.prev_storage, device,
                        seed=cfg.seed + dist.rank(), trigger=cfg.prev_trigger, every=every,
                        start_epoch=cfg.prev_start_epoch)

def step_extras(tr: trainer.Training, iters_per_epoch: int) -> Callable[[], dict]:
    """The optional terms for the coming step, as keyword arguments of the step: IPix with alpha
    times its warm-up ramp at this iteration, previous guidance with lambda(epoch) once the bank
    holds snapshots. {} when both are off."""
    cfg = tr.run.cfg
    alpha, peak = loss_weight(cfg, 'ipix_weight'), loss_weight(cfg, 'prev_weight')
    warmup = round(cfg.ipix_warmup_epochs * iters_per_epoch)

    def extras() -> dict:
        epoch, out = tr.state.epoch + 1, {}        # state.epoch is the last completed epoch
        if alpha > 0:
            ramp = warmup_ramp(epoch * iters_per_epoch + tr.state.iteration, warmup)
            out['ipix'] = IPixOptions(alpha * ramp, cfg.ipix_thresh, cfg.ipix_temperature, cfg.ipix_loss,
                                      cfg.ipix_resolution)
        lam = guidance_weight(epoch, cfg.epochs, peak)
        if tr.prev_bank is not None and len(tr.prev_bank) > 0 and lam > 0:
            out['prev'] = Guidance(tr.prev_bank.sample_ensemble, lam, cfg.prev_thresh, cfg.prev_loss)
        return out
    return extras

def make_step(tr: trainer.Training, opt: SemiOptions, extras: Callable[[], dict] = dict):
    criterion = build_criterion(tr.run.cfg.criterion.name, tr.run.cfg.criterion.kwargs)
    if tr.run.cfg.method == 'unimatch_v1':
        return lambda batch_u, batch_l: unimatch_v1_step(tr.ddp, batch_l, batch_u, criterion, opt, **extras())
    return lambda batch_u, batch_l: weak_to_strong_step(tr.ddp, tr.teacher, batch_l, batch_u, criterion, opt,
                                                        **extras())

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
                          trainer.TrainState(), TensorBoard(run.run_dir),
                          prev_bank=build_snapshot_bank(cfg, student, run.device))
    trainer.resume(tr)
    iters = trainer.epoch_iterations(loaders[0], cfg)
    step = make_step(tr, opt, step_extras(tr, iters))
    preemption = trainer.Preemption()

    run.log.info(f'{cfg.method}: {len(loaders[1].dataset.samples)} labeled / {len(loaders[0].dataset)} '
                 f'unlabeled samples, {iters} iterations per epoch')
    for epoch in range(tr.state.epoch + 1, cfg.epochs):
        stats = trainer.train_epoch(tr, epoch, loaders, step, preemption)
        trainer.end_of_epoch(tr, epoch, valset, stats)
    tr.tb.close()
    dist.cleanup()

if __name__ == '__main__':
    main()
