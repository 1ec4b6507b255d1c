"""Labeled-only training: the baseline every semi-supervised result is compared with.

    python supervised.py --config configs/toy.yaml --split 1_16
    sh scripts/train.sh pascal 92 supervised

As the original: batch size 2x the semi-supervised one, the labeled list repeated to
`labeled_upsample` samples per epoch when it is shorter (3000 for Pascal/Cityscapes), the same
optimizer, schedule and evaluation. Writes latest.pth / best.pth / results.json to the run directory.
"""
from __future__ import annotations

from dataset.semi import SemiDataset
from util import dist, trainer
from util.logger import TensorBoard
from util.losses import build_criterion
from util.precision import Precision
from util.steps import supervised_step


def train_epoch(run, epoch, ddp, optimizer, precision, criterion, loader, tb) -> dict:
    loader.sampler.set_epoch(epoch)
    iters = trainer.iteration_budget(len(loader), run.cfg)
    step_log = trainer.StepLog(run, tb, epoch, iters)
    ddp.train()
    for i, batch in zip(range(iters), loader):
        with precision.autocast():
            out = supervised_step(ddp, trainer.to_device(batch, run.device), criterion)
        lr = trainer.optimizer_step(out['loss'], optimizer, precision, run.cfg, epoch * iters + i,
                                    step_log.total)
        step_log(i, out, lr)
    return step_log.summary()


def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    run = trainer.setup_run(args, method='supervised')
    cfg = run.cfg

    labeled, _, val = trainer.data_paths(cfg, args)
    n_labeled = len(SemiDataset(cfg.data_root, labeled, 'train_l', cfg.crop_size).samples)
    nsample = max(n_labeled, cfg.labeled_upsample)
    trainset = SemiDataset(cfg.data_root, labeled, 'train_l', cfg.crop_size, nsample=nsample,
                           nclass=cfg.nclass)
    loader = trainer.make_loader(trainset, cfg, cfg.batch_size * 2)
    valset = trainer.val_dataset(cfg, val)

    model = trainer.build_student(cfg, run.device, run.log)
    optimizer = trainer.build_optimizer(model, cfg)
    state = trainer.resume(run.run_dir, model, None, optimizer, cfg, run.log)
    ddp = trainer.wrap_ddp(model, run.device)
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.kwargs)
    precision = Precision(cfg.precision, run.device)
    tb = TensorBoard(run.run_dir)

    run.log.info(f'supervised: {n_labeled} labeled images ({nsample} per epoch), '
                 f'{trainer.iteration_budget(len(loader), cfg)} iterations per epoch')
    for epoch in range(state.epoch + 1, cfg.epochs):
        stats = train_epoch(run, epoch, ddp, optimizer, precision, criterion, loader, tb)
        trainer.end_of_epoch(run, epoch, model, None, optimizer, state, valset, stats)
        tb.scalars({'miou': state.history[-1]['miou']}, epoch, 'val/')
    tb.close()
    dist.cleanup()


if __name__ == '__main__':
    main()
