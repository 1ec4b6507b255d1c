"""The resolved plan of a training run, printed without training: what `--plan [PROCESSES]` on
unimatch_v2.py and supervised.py shows (docs/plan.md).

    python unimatch_v2.py --config configs/pascal.yaml --split 92 --plan        # the paper's 4 processes
    python supervised.py --config configs/cityscapes.yaml --split 1_16 --plan 8
    python unimatch_v2.py --config configs/stl10.yaml --split 25_labels_per_class --plan

Every number comes from the function the training run uses, with the planned process count in
place of the launch's: the loaders' samples and batch sizes (`engine.data.epoch_samples`, the task's
`epoch_unlabeled`), the sampler's share of each process (`engine.data.ResumableSampler`), iterations
per epoch (`engine.data.steps_per_epoch`), the optimizer's parameter groups and their learning rates
(`engine.build.build_optimizer` on a model built on the meta device: no memory, no weights read), the
schedule (`engine.schedule.lr_factor`), the evaluated epochs (`engine.schedule.evaluation_due`), the evaluation
mode (`Task.eval_mode`) and which checkpoint best.pth is. Sample counts come from the split lists
(`Task.split_sizes`: no image is opened and nothing is written); a count that cannot be known
without the data says so, and so do the numbers that follow from it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

import methods
import tasks
from util.config import ConfigError
from engine.config import Config, load_config
from engine.build import build_optimizer, build_student
from engine.data import ResumableSampler, epoch_samples, steps_per_epoch
from engine.schedule import evaluation_due, lr_factor, torchssl_evaluations

SCHEDULE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)     # fractions of the run at which the plan shows the lr


@dataclass
class Loader:
    role: str                    # 'unlabeled' or 'labeled'
    samples: int | str           # per epoch, all processes (str: why unknown)
    batch: int                   # per process and micro-batch
    per_process: int | str       # samples of one process's sampler per epoch


@dataclass
class Group:
    name: str                    # 'encoder' / 'head', '(no weight decay)' for SGD's exempt groups
    tensors: int
    elements: int
    lr: float
    weight_decay: float


@dataclass
class Plan:
    config: str
    cfg: Config
    task: tasks.Task
    split: str
    processes: int
    methods: list[str]
    sizes: dict[str, int | str]
    loaders: list[Loader]
    iterations: int | None       # per epoch (None: unknown, a count is missing)
    groups: list[Group]
    optimizer: str
    evaluated_epochs: list[int] | None
    semi: bool

    @property
    def total(self) -> int | None:
        return None if self.iterations is None else self.iterations * self.cfg.epochs


def make_plan(args: argparse.Namespace, method: str | None = None) -> Plan:
    """The plan of `args` (the entry script's arguments) for `args.plan` processes (0: the config's
    reference_gpus), `method` as the entry script passes it to its `train`."""
    if not args.split:
        raise ConfigError('--plan takes --split (split lists given by path are counted when the run starts)')
    overrides = list(args.overrides) + ([f'method={method}'] if method else [])
    cfg = load_config(args.config, overrides)
    task = tasks.for_config(cfg)
    processes = args.plan or cfg.reference_gpus
    options = methods.get(cfg.method).options
    sizes = task.split_sizes(args.split)
    if cfg.unlabeled_dirs:
        sizes['unlabeled'] = f'the images under {", ".join(cfg.unlabeled_dirs)} (listed when the run starts)'
    loaders = plan_loaders(cfg, task, options, sizes, processes)
    known = all(isinstance(x.per_process, int) for x in loaders)
    iterations = steps_per_epoch(loaders[0].per_process, loaders[0].batch, cfg) if known else None
    evaluated = [e for e in range(cfg.epochs) if evaluation_due(cfg, e, iterations)] if known else None
    groups, optimizer = plan_groups(cfg, task, processes)
    names = [m.name for m in methods.REGISTRY.values() if m.enabled(cfg)]
    return Plan(args.config, cfg, task, args.split, processes, names, sizes, loaders, iterations, groups,
                optimizer, evaluated, options is not None)


def plan_loaders(cfg: Config, task: tasks.Task, options, sizes: dict, processes: int) -> list[Loader]:
    """The training loaders as `engine.data.train_loaders` builds them for `processes` processes."""
    if options is None:
        roles, n = ('labeled',), sizes['labeled']
        entries = epoch_samples(cfg, None, n) if isinstance(n, int) else [(n, cfg.batch_size * 2)]
    else:
        roles, n = ('unlabeled', 'labeled'), task.epoch_unlabeled(sizes['unlabeled'], processes)
        entries = (epoch_samples(cfg, options, None, n) if isinstance(n, int)
                   else [(n, cfg.batch_size * cfg.unlabeled_ratio), (n, cfg.batch_size)])
    return [Loader(role, samples, batch, ResumableSampler(range(samples), num_replicas=processes, rank=0).num_samples
                   if isinstance(samples, int) else samples)
            for role, (samples, batch) in zip(roles, entries)]


def plan_groups(cfg: Config, task: tasks.Task, processes: int) -> tuple[list[Group], str]:
    """The optimizer's parameter groups for `processes` processes, from the run's own model
    (built on the meta device, no pretrained weights) and `build_optimizer`."""
    meta = torch.device('meta')
    with meta:
        model = build_student(replace(cfg, pretrained=None), meta, task=task)
    optimizer = build_optimizer(model, cfg, fused=False, processes=processes)
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith('backbone.')}
    groups = []
    for i, g in enumerate(optimizer.param_groups):     # [encoder, head(, their exempt ones)]: set_lr's order
        part = 'encoder' if (all(id(p) in encoder for p in g['params']) if g['params'] else i % 2 == 0) else 'head'
        name = part + (' (no weight decay)' if i >= 2 else '')
        groups.append(Group(name, len(g['params']), sum(p.numel() for p in g['params']), g['lr'], g['weight_decay']))
    return groups, type(optimizer).__name__


# ---- the printed plan ---------------------------------------------------------------------------------

def _n(x: int | str | None) -> str:
    return 'unknown' if x is None else (f'{x:,}' if isinstance(x, int) else f'unknown ({x})')


def format_plan(plan: Plan) -> str:
    cfg, task = plan.cfg, plan.task
    p, accum = plan.processes, cfg.grad_accum
    lines = [f'plan of {plan.config} --split {plan.split}: {" + ".join(plan.methods)} on {cfg.dataset} '
             f'({task.name}), {cfg.backbone}, {p} process(es) (the paper\'s: {cfg.reference_gpus})',
             'data (samples per split list):']
    lines += [f'  {role}: {_n(plan.sizes[role])}' for role in ('labeled', 'unlabeled', 'val')]
    if 'note' in plan.sizes:
        lines.append(f'  ({plan.sizes["note"]})')
    lines.append('batches (per process x processes x grad_accum = global):')
    for x in plan.loaders:
        lines.append(f'  {x.role}: {x.batch} x {p} x {accum} = {x.batch * p * accum}; '
                     f'{_n(x.samples)} samples per epoch, {_n(x.per_process)} per process')
    total = plan.total
    lines.append(f'iterations: {_n(plan.iterations)} per epoch x {cfg.epochs} epochs = {_n(total)}'
                 + (f' (at most max_iters_per_epoch {cfg.max_iters_per_epoch})' if cfg.max_iters_per_epoch else ''))
    lines.append(f'optimizer: {plan.optimizer}, lr {cfg.lr:g} x lr_scale {plan.groups[0].lr / cfg.lr:g} '
                 f'({"scale_lr: x processes x grad_accum / reference_gpus" if cfg.scale_lr else "scale_lr off"})')
    for g in plan.groups:
        lines.append(f'  {g.name}: lr {g.lr:.6g}, weight decay {g.weight_decay:g}, '
                     f'{g.tensors} tensors, {g.elements:,} parameters')
    if total:
        points = ', '.join(f'{lr_factor(cfg.lr_schedule, min(int(f * total), total - 1), total):.3f} at '
                           f'{min(int(f * total), total - 1):,}' for f in SCHEDULE_POINTS)
        lines.append(f'schedule: {cfg.lr_schedule} per iteration, no warm-up; lr factor {points}')
    else:
        lines.append(f'schedule: {cfg.lr_schedule} per iteration, no warm-up')
    lines += format_evaluation(plan)
    if plan.semi:
        teacher = (f'the EMA (decay {cfg.ema_decay:g})' if cfg.teacher == 'ema'
                   else 'the online student (the EMA is kept and evaluated)')
        w = f'{cfg.lossu_weight:g}'
        loss = f'(L_x + {w} L_u) / (1 + {w})' if cfg.total_loss == 'mean' else f'L_x + {w} L_u'
        lines.append(f'pseudo-labels: {teacher}, confidence threshold {cfg.conf_thresh:g}; loss {loss}')
    lines.append('augmentations:')
    views = methods.get(cfg.method).options.views if plan.semi else 0
    for kind, text in task.augmentations(views).items():
        if plan.semi or kind == 'labeled':
            lines.append(f'  {kind}: {text}')
    return '\n'.join(lines)


def format_evaluation(plan: Plan) -> list[str]:
    cfg, task, ev = plan.cfg, plan.task, plan.evaluated_epochs
    mode = task.eval_mode()
    where = f'{mode} (window {cfg.crop_size})' if mode == 'sliding_window' else mode
    who = 'student and EMA' if plan.semi else 'the model'
    if cfg.eval_interval == 0:
        when = 'after every epoch'
    else:
        when = (f'after the epochs holding an evaluation point of TorchSSL\'s loop (every {cfg.eval_interval} '
                f'iterations, every {cfg.eval_interval_final or cfg.eval_interval} past 80% of the run')
        if plan.total:
            final = cfg.eval_interval_final or cfg.eval_interval
            when += f': {torchssl_evaluations(plan.total, cfg.eval_interval, final, plan.total)} points)'
        else:
            when += ')'
    count = f'{len(ev)} evaluations' if ev is not None else 'evaluations: unknown'
    n = plan.sizes['val']
    lines = [f'evaluation: {who} on {task.eval_split_path()}{f" ({n:,} samples)" if isinstance(n, int) else ""}, {where}, '
             f'{when}; {count}']
    reported = plan.semi and task.reports_ema
    lines.append(f'best.pth: the {"EMA teacher" if reported else "student"}\'s best {task.metric_label} '
                 '(the reported figure)')
    return lines


def print_plan(args: argparse.Namespace, method: str | None = None) -> None:
    print(format_plan(make_plan(args, method)), flush=True)
