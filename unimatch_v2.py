"""Semi-supervised training on DINOv2 + DPT: UniMatch V2, FixMatch, UniMatch V1, PrevMatch, IPixMatch,
U2PL, AllSpark.

    python unimatch_v2.py --config configs/toy.yaml --split 1_16
    torchrun --nproc_per_node 4 unimatch_v2.py --config configs/pascal.yaml --split 92 method=fixmatch
    sh scripts/train.sh pascal 92            # the same, with the paper's launch
    sh scripts/train.sh pascal 92 prevmatch  # or ipixmatch, u2pl, allspark; the first two losses also go on any method:
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
from util.steps import METHOD_OPTIONS, AllSparkStep, SemiOptions, unimatch_v1_step, weak_to_strong_step
from util.u2pl import U2PLMemory, U2PLOptions, u2pl_step, unreliable_share

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

def method_states(cfg, student) -> dict:
    """The state U2PL (queues, prototypes) or AllSpark (semantic memory) carries between steps;
    it goes into the checkpoint under these names."""
    if cfg.method == 'u2pl':
        return {'u2pl_memory': U2PLMemory(cfg.nclass, cfg.u2pl_rep_dim, cfg.u2pl_queue_size,
                                          cfg.u2pl_queue_size_bg, cfg.u2pl_proto_momentum)}
    if cfg.method == 'allspark':
        return {'allspark_memory': student.allspark.memory}
    return {}

def method_extras(tr: trainer.Training) -> Callable[[], dict]:
    """U2PL's / AllSpark's options for the coming step (epoch-dependent warm-ups and alpha_t)."""
    cfg = tr.run.cfg

    def extras() -> dict:
        epoch = tr.state.epoch + 1
        if cfg.method == 'u2pl':
            return {'u2pl': U2PLOptions(
                tr.method_states['u2pl_memory'], cfg.u2pl_weight if epoch >= cfg.u2pl_warmup_epochs else 0.0,
                unreliable_share(epoch, cfg.epochs, cfg.u2pl_alpha0), cfg.u2pl_low_rank, cfg.u2pl_high_rank,
                cfg.u2pl_anchors, cfg.u2pl_negatives, cfg.u2pl_temperature, cfg.u2pl_anchor_thresh,
                cfg.u2pl_unsup, (cfg.u2pl_sce_ce, cfg.u2pl_sce_rce))}
        if cfg.method == 'allspark':
            return {'allspark': AllSparkStep(use_memory=epoch >= cfg.allspark_warmup_epochs)}
        return {}
    return extras

def make_step(tr: trainer.Training, opt: SemiOptions, extras: Callable[[], dict] = dict):
    criterion = build_criterion(tr.run.cfg.criterion.name, tr.run.cfg.criterion.kwargs)
    method = method_extras(tr)
    if tr.run.cfg.method == 'u2pl':
        return lambda batch_u, batch_l: u2pl_step(tr.ddp, tr.teacher, batch_l, batch_u, criterion, opt,
                                                  **method())
    if tr.run.cfg.method == 'unimatch_v1':
        return lambda batch_u, batch_l: unimatch_v1_step(tr.ddp, batch_l, batch_u, criterion, opt, **extras())
    return lambda batch_u, batch_l: weak_to_strong_step(tr.ddp, tr.teacher, batch_l, batch_u, criterion, opt,
                                                        **extras(), **method())

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
                          prev_bank=build_snapshot_bank(cfg, student, run.device),
                          method_states=method_states(cfg, student))
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
