"""Labeled-only training: the baseline every semi-supervised result is compared with.

    python supervised.py --config configs/toy.yaml --split 1_16
    sh scripts/train.sh pascal 92 supervised

As the original: batch size 2x the semi-supervised one, the labeled list repeated to
`labeled_upsample` samples per epoch when it is shorter (3000 for Pascal/Cityscapes), the same
optimizer, schedule and evaluation. Writes latest.pth / best.pth / results.json to the run directory
and resumes from latest.pth, mid-epoch included.
"""
from __future__ import annotations

from dataset.semi import SemiDataset
from util import dist, trainer
from util.logger import TensorBoard
from util.losses import build_criterion
from util.precision import Precision
from util.steps import supervised_step


def build_loader(run: trainer.Run):
    cfg = run.cfg
    n_labeled = len(SemiDataset(cfg.data_root, run.labeled, 'train_l', cfg.crop_size).samples)
    trainset = SemiDataset(cfg.data_root, run.labeled, 'train_l', cfg.crop_size,
                           nsample=max(n_labeled, cfg.labeled_upsample), nclass=cfg.nclass)
    return trainer.make_loader(trainset, cfg, cfg.batch_size * 2), n_labeled


@trainer.guarded
def main(argv: list[str] | None = None) -> None:
    args = trainer.parse_args(__doc__.splitlines()[0], argv)
    run = trainer.setup_run(args, method='supervised')
    cfg = run.cfg
    loader, n_labeled = build_loader(run)
    valset = trainer.val_dataset(run)

    model = trainer.build_student(cfg, run.device, run.log)
    tr = trainer.Training(run, model, trainer.wrap_ddp(model, run.device, cfg.compile), None,
                          trainer.build_optimizer(model, cfg), Precision(cfg.precision, run.device),
                          trainer.TrainState(), TensorBoard(run.run_dir))
    trainer.resume(tr)
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.kwargs)
    preemption = trainer.Preemption()

    run.log.info(f'supervised: {n_labeled} labeled images ({len(loader.dataset)} per epoch), '
                 f'{trainer.epoch_iterations(loader, cfg)} iterations per epoch')
    for epoch in range(tr.state.epoch + 1, cfg.epochs):
        stats = trainer.train_epoch(tr, epoch, [loader], lambda b: supervised_step(tr.ddp, b, criterion),
                                    preemption)
        trainer.end_of_epoch(tr, epoch, valset, stats)
    tr.tb.close()
    dist.cleanup()


if __name__ == '__main__':
    main()
