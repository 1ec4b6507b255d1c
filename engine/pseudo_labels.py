"""Pseudo-label diagnostics (docs/diagnostics.md): with `pseudo_label_stats`, after each evaluation,
the pseudo-labels of the student and of the EMA on a fixed subset of the unlabeled list, measured
against its masks -- in train.log, TensorBoard and results.json. The masks go nowhere else: the pass
runs in eval mode, without gradients, with the global generators left as they were."""
from __future__ import annotations

import time

from engine.data import unlabeled_root
from engine.state import Training
from util.pseudo_labels import format_pseudo_label_table, preserved_rng, stats_scalars


def pseudo_label_diagnostics(tr: Training, epoch: int) -> dict:
    """With `pseudo_label_stats`: the pseudo-labels of the student and of the EMA on the fixed
    subset of the unlabeled list (`Task.pseudo_label_set`), measured against its masks; logged as
    a table and to TensorBoard, returned as {'pseudo_labels': {model: stats}} for the epoch's
    history (results.json). Eval mode, no gradient, the global generators left as they were: the
    training after it is the same with the flag on or off. The masks go nowhere else."""
    run, cfg, task = tr.run, tr.run.cfg, tr.run.task
    if not cfg.pseudo_label_stats:
        return {}
    t0 = time.time()
    models = {'student': tr.student, **({'ema': tr.teacher.model} if tr.teacher else {})}
    with preserved_rng():
        dataset = task.pseudo_label_set(run.unlabeled, unlabeled_root(cfg))
        stats = {name: task.pseudo_label_stats(model, dataset, run.device) for name, model in models.items()}
    names = task.class_names()
    labeller = ({'ema': 'the EMA', 'online': 'the student'}[cfg.teacher] + ' labels the weak view in training'
                if tr.teacher else 'labeled-only: no pseudo-labels in training')
    run.log.info(f'epoch {epoch} pseudo-labels on {len(dataset)} unlabeled images ({labeller}; '
                 f'{time.time() - t0:.1f}s), percent:\n'
                 + format_pseudo_label_table(stats, names, cfg.conf_thresh, task.pseudo_label_unit))
    tr.tb.scalars(stats_scalars(stats, names), epoch, 'pseudo_labels/')
    return {'pseudo_labels': stats}
