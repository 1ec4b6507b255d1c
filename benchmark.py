"""Time UniMatch V2 training steps: the original's recipe against this project's default, in one run.

    python benchmark.py --config configs/pascal.yaml backbone=dinov2_small crop_size=238 batch_size=2
    python benchmark.py --config configs/toy.yaml --steps 20
    python benchmark.py --config configs/levir.yaml --steps 5     # change detection (pairs)

Recipes, on the same generated batches:
  original  fp32, attention as explicit matmul-softmax-matmul (no fused kernel), LayerScale as its
            own multiply, labeled and strong images in two student forwards, torch's default AdamW
            (a Python loop over tensors on the CPU), EMA in a Python loop over tensors, DDP with
            find_unused_parameters=True (the original release's step; for change detection its
            remote-sensing step: pseudo-labels from the online model, as the config's `teacher`)
  default   the config's precision (auto: bf16 where the device has it in hardware, else fp32),
            one fused student forward, LayerScale folded into the projections, fused AdamW, foreach
            EMA, DDP without find_unused_parameters and with gradients as bucket views, plus the
            config's attention (auto: fused SDPA, except math attention for bf16/fp16 on the CPU) /
            channels_last / compile / grad_checkpointing
  <method>  default + what each method that declares a benchmark recipe adds (`python -m methods`
            marks them), in its steady state (`Method.for_benchmark`: warm-ups over, banks and
            memories in use), with the config's keys of that method
`--recipes original,default` times a subset; `--profile` prints only where the default step's
time goes (teacher, encoder, decoder, losses, optimizer, EMA); `--op-ratios` prints only the
original and default steps' time per class of operation (matrix products, convolutions, casts, ...)
side by side: the speedup is the mean of these ratios weighted by the default step's times. The
config's dataset names the task: its model, its input channels (pairs: 6) and its data. Steps
of the recipes alternate after warm-up, so machine noise hits all alike. Peak memory is measured in
a fresh child process per recipe (max RSS on CPU, max allocated on CUDA). The data pipeline
(unlabeled samples with their strong views, from generated images) is timed alone.
The last line is `speedup: N.NNx` (original time / default time).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.distributed as tdist
from torch.profiler import ProfilerActivity, profile

import methods
import tasks
from methods.base import MethodSet
from methods.step import mix_strong_views, pseudo_label, strong_losses, total_loss
from engine.config import Config, load_config
from util.dist import ddp
from util.ema import EMATeacher
from util.losses import build_criterion
from util.memory import peak_memory_mib
from util.precision import Precision, resolve_precision
from engine.build import build_optimizer, build_student, make_step
from engine.run import Run
from engine.state import TrainState, Training

METHOD_RECIPES = tuple(name for name, cls in methods.REGISTRY.items() if cls.benchmark_recipe)
RECIPES = ('original', 'default') + METHOD_RECIPES


def task_recipes(cfg: Config) -> tuple[str, ...]:
    """The recipes that run on the config's task (methods with a segmentation head of their own do
    not run on pairs)."""
    task = tasks.of_dataset(cfg.dataset)
    return tuple(r for r in RECIPES if r not in METHOD_RECIPES or methods.runs_on(r, task))

# `--op-ratios`: aten operations by class (every other aten operation counts as 'other').
OP_CLASSES = {
    'matrix products (mm, addmm, bmm)': ('mm', 'addmm', 'bmm'),
    'convolutions, forward and backward': ('mkldnn_convolution', 'convolution_backward', 'cudnn_convolution',
                                           'cudnn_convolution_transpose'),
    'casts and copies': ('copy_', 'clone'),
    'bilinear and bicubic resizes': ('upsample_bilinear2d', 'upsample_bilinear2d_backward',
                                     'upsample_bicubic2d', 'upsample_bicubic2d_backward'),
    'softmax and log-softmax': ('_softmax', '_softmax_backward_data', '_log_softmax',
                                '_log_softmax_backward_data'),
    'layer norm': ('native_layer_norm', 'native_layer_norm_backward'),
    'GELU': ('gelu', 'gelu_backward'),
    'optimizer, EMA and other in-place updates': ('_fused_adamw_', 'lerp_', '_foreach_lerp_', 'addcdiv_',
                                                  'addcmul_', 'sqrt', '_foreach_mul_', '_foreach_add_',
                                                  'mul_', 'add_'),
}


@dataclass
class Recipe:
    name: str
    cfg: Config        # the config the trainer's builders get (the original's: none of the speed options)
    original: bool     # the original release's step (module docstring), else this project's options

    @property
    def precision(self) -> str:
        return self.cfg.precision


def recipe(name: str, cfg: Config) -> Recipe:
    """`name`'s config: its method's (the core step's for 'original' and 'default'); for 'original'
    fp32, math attention and no gradient checkpointing, channels-last or compile."""
    cfg = replace(cfg, method=name if name in METHOD_RECIPES else methods.DEFAULT)
    if name == 'original':
        cfg = replace(cfg, precision='fp32', attention='math', grad_checkpointing=False, channels_last=False,
                      compile=False)
    return Recipe(name, cfg, name == 'original')


def make_batch(cfg: Config, device: torch.device, seed: int) -> tuple[dict, dict]:
    """Random normalised images (the task's channels), labels, CutMix boxes and valid masks of the
    training shapes."""
    g = torch.Generator().manual_seed(seed)
    b, s, c = cfg.batch_size, cfg.crop_size, tasks.of_dataset(cfg.dataset).in_channels
    boxes = torch.zeros(b, 2, s, s, dtype=torch.bool)
    boxes[:, :, s // 4: s // 2, s // 4: s // 2] = torch.rand(b, 2, 1, 1, generator=g) < 0.5
    batch_l = {'image': torch.randn(b, c, s, s, generator=g),
               'mask': torch.randint(0, cfg.nclass, (b, s, s), generator=g)}
    batch_u = {'image': torch.randn(b, c, s, s, generator=g),
               'strong': torch.randn(b, 2, c, s, s, generator=g),
               'boxes': boxes, 'valid': torch.ones(b, s, s, dtype=torch.bool)}
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(batch_l), move(batch_u)


class SteadyMethods(MethodSet):
    """The benchmarked method as `Method.for_benchmark` left it, at every step: the loop's
    per-step schedules (`begin_step`) would start its warm-ups again."""

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        pass


class Trainer:
    """One recipe's model, teacher, optimizer and step, from the trainer's own builders (its
    `build_student`, `build_optimizer` and `make_step`, the step the training loop calls)."""

    def __init__(self, r: Recipe, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.seed)
        self.r, self.cfg, self.device = r, cfg, device
        task = tasks.for_config(r.cfg)
        self.student = build_student(r.cfg, device, task=task)
        self.student.set_layer_scale_folding(not r.original)
        self.teacher = EMATeacher(self.student, cfg.ema_decay)
        self.optimizer = build_optimizer(self.student, cfg, fused=not r.original)
        self.ddp = ddp(self.student, device, find_unused_parameters=r.original,
                       gradient_as_bucket_view=not r.original)
        self.forward = torch.compile(self.ddp) if r.cfg.compile else self.ddp
        self.precision = Precision(r.precision, device)
        method = methods.get(r.cfg.method)
        self.opt = replace(method.options, fused=not r.original)
        self.methods = SteadyMethods([method.for_benchmark(r.cfg, self.student, device)]
                                     if r.name in METHOD_RECIPES else [])
        # No data and no run directory: the benchmark writes nothing.
        run = Run(r.cfg, run_dir=None, device=device, log=None, split='', labeled=None, unlabeled=None, val=None,
                  task=task)
        training = Training(run, self.student, self.forward, self.teacher, self.optimizer, self.precision,
                            TrainState(), tb=None, methods=self.methods)
        self.semi_step = make_step(training, self.opt, iters_per_epoch=1)    # (batch_u, batch_l) -> losses
        self.it = 0

    def step(self, batch_l: dict, batch_u: dict) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with self.precision.autocast():
            out = self.semi_step(batch_u, batch_l)
        self.precision.backward_step(out['loss'], self.optimizer)
        (self.teacher.update_loop if self.r.original else self.teacher.update)(self.student, self.it)
        self.it += 1
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def init_single_process_group() -> None:
    if not tdist.is_initialized():
        with tempfile.NamedTemporaryFile(delete=False) as f:
            store = f.name
        backend = 'cpu:gloo,cuda:nccl' if torch.cuda.is_available() else 'gloo'   # CPU tensors too
        tdist.init_process_group(backend, init_method=f'file://{store}', rank=0, world_size=1)


def device_for_run() -> torch.device:
    return torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')


def peak_memory_child(name: str, cfg: Config, steps: int, queue) -> None:
    device = device_for_run()
    init_single_process_group()
    trainer = Trainer(recipe(name, cfg), cfg, device)
    batch = make_batch(cfg, device, 0)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        trainer.step(*batch)
    queue.put((name, peak_memory_mib(device)))
    tdist.destroy_process_group()


def peak_memory(cfg: Config, steps: int, recipes: tuple[str, ...] = RECIPES) -> dict[str, float]:
    ctx = mp.get_context('spawn')
    queue, peaks = ctx.Queue(), {}
    for name in recipes:
        p = ctx.Process(target=peak_memory_child, args=(name, cfg, steps, queue))
        p.start()
        got, mib = queue.get()
        p.join()
        peaks[got] = mib
    return peaks


def data_pipeline_rate(cfg: Config, n: int = 64) -> float:
    """Unlabeled samples per second (decode, rescale, crop, flip, two strong views, boxes) on
    the task's generated samples, in this process."""
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        ds = tasks.for_config(cfg).demo_dataset(Path(tmp))
        ds[0]
        t0 = time.perf_counter()
        for i in range(n):
            ds[i % len(ds)]
        return n / (time.perf_counter() - t0)


def profile_default(cfg: Config, device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds of each part of the default UniMatch V2 step over `steps` steps (after one
    warm-up step), on the student itself (no DDP wrapper). The decoder's backward is timed on its
    own, from detached encoder features; the encoder's backward is the rest of the backward."""
    t = Trainer(recipe('default', cfg), cfg, device)
    student, (batch_l, batch_u) = t.student, make_batch(cfg, device, 0)
    n, views = len(batch_l['image']), t.opt.views
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.kwargs)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def now() -> float:
        sync()
        return time.perf_counter()

    def losses(logits, targets):        # semi_step's loss, from its own functions
        pred_x, *pred_s = logits.split([n] * (1 + views))
        loss_u = sum(strong_losses(pred_s, targets, cfg.conf_thresh).values()) / views
        return total_loss(criterion(pred_x, batch_l['mask']), loss_u, cfg.lossu_weight, (),
                          cfg.total_loss == 'mean')

    parts = {}
    for i in range(steps + 1):
        with t.precision.autocast():
            t0 = now()
            conf, pseudo = pseudo_label(t.teacher, batch_u['image'])
            t1 = now()
            strong, targets = mix_strong_views(batch_u, pseudo, conf, views)
            x = torch.cat([batch_l['image'], *strong])
            t2 = now()
            features = student.perturb(student.decoder_inputs(x), True, n, False)
            t3 = now()
            grid, out_size = student.patch_grid(x)
            logits = student.decode(features, grid, out_size)
            t4 = now()
            loss = losses(logits, targets)
            t5 = now()
        loss.backward()
        t6 = now()
        t.precision.step(t.optimizer)
        t7 = now()
        t.teacher.update(student, i)
        t8 = now()
        with t.precision.autocast():        # the decoder alone, on detached features
            detached = [f.detach().requires_grad_() for f in features]
            loss = losses(student.decode(detached, grid, out_size), targets)
        d0 = now()
        loss.backward()
        d1 = now()
        student.zero_grad(set_to_none=True)
        if i == 0:
            continue
        for name, sec in {'teacher forward (no grad)': t1 - t0, 'CutMix of strong views and targets': t2 - t1,
                          'student encoder forward': t3 - t2, 'student decoder forward and resize': t4 - t3,
                          'losses forward': t5 - t4, 'student decoder and losses backward': d1 - d0,
                          'student encoder backward': t6 - t5 - (d1 - d0), 'optimizer': t7 - t6,
                          'EMA update': t8 - t7}.items():
            parts.setdefault(name, []).append(sec)
    return {name: statistics.median(v) for name, v in parts.items()}


def op_class_times(cfg: Config, device: torch.device, steps: int) -> dict[str, dict[str, float]]:
    """{recipe: {op class: self time in s per step}} for the original and default recipes, from
    torch.profiler over `steps` interleaved steps after one warm-up step each; 'all operations' is
    the sum and 'step' the steps' own timing. Self times (children excluded) add up without double
    counting; on CUDA they are the kernels' device times."""
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainers = {name: Trainer(recipe(name, cfg), cfg, device) for name in ('original', 'default')}
    batch = make_batch(cfg, device, 0)
    op_class = {f'aten::{op}': name for name, ops in OP_CLASSES.items() for op in ops}
    times = {name: Counter() for name in trainers}
    for t in trainers.values():
        t.step(*batch)
    for _ in range(steps):
        for name, t in trainers.items():
            with profile(activities=activities) as prof:
                times[name]['step'] += t.step(*batch) / steps
            for event in prof.key_averages():
                if event.key.startswith('aten::'):
                    sec = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6 / steps
                    times[name][op_class.get(event.key, 'other')] += sec
                    times[name]['all operations'] += sec
    return {name: dict(c) for name, c in times.items()}


def print_op_ratios(times: dict[str, dict[str, float]]) -> None:
    original, default = times['original'], times['default']
    print(f'{"class of operation (self time per step)":42s}{"original ms":>13s}{"default ms":>12s}{"ratio":>8s}')
    for name in (*OP_CLASSES, 'other', 'all operations', 'step'):
        a, b = original.get(name, 0.0), default.get(name, 0.0)
        ratio = f'{a / b:8.2f}' if b > 0 else f'{"-":>8s}'
        print(f'{name:42s}{a * 1e3:13.0f}{b * 1e3:12.0f}{ratio}')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True)
    p.add_argument('--steps', type=int, default=10, help='timed steps per recipe')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--memory-steps', type=int, default=3)
    p.add_argument('--recipes', default=None, help=f'comma-separated subset of {RECIPES} (default: all that run '
                   "on the config's task)")
    p.add_argument('--profile', action='store_true',
                   help="only print where the default step's time goes (its parts, median of --steps steps)")
    p.add_argument('--op-ratios', action='store_true',
                   help="only print the original and default steps' time per class of operation "
                        "(torch.profiler over --steps steps)")
    p.add_argument('overrides', nargs='*')
    args = p.parse_args()
    cfg = load_config(args.config, ['pretrained=null'] + args.overrides)
    task = tasks.for_config(cfg)
    if not task.benchmarked:
        p.error(f'{args.config}: benchmark.py does not time the {task.name} task (dataset {cfg.dataset}) yet')
    available = task_recipes(cfg)
    recipes = tuple(r.strip() for r in (args.recipes or ','.join(available)).split(',') if r.strip())
    if not recipes or set(recipes) - set(available):
        p.error(f'--recipes: choose from {available}, got {args.recipes!r}')
    device = device_for_run()
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))    # 'auto' made concrete
    init_single_process_group()
    print(f'{cfg.backbone}, crop {cfg.crop_size}, batch {cfg.batch_size}+{cfg.batch_size} per step, '
          f'{cfg.nclass} classes, {device.type} ({torch.get_num_threads()} threads), default precision '
          f'{cfg.precision}', flush=True)

    if args.profile:
        parts = profile_default(cfg, device, args.steps)
        total = sum(parts.values())
        print(f'{"part of the default step":40s}{"ms":>9s}{"share":>8s}')
        for name, sec in parts.items():
            print(f'{name:40s}{sec * 1e3:9.1f}{sec / total:8.1%}')
        print(f'{"sum":40s}{total * 1e3:9.1f}')
        tdist.destroy_process_group()
        return
    if args.op_ratios:
        print_op_ratios(op_class_times(cfg, device, args.steps))
        tdist.destroy_process_group()
        return
    trainers = {name: Trainer(recipe(name, cfg), cfg, device) for name in recipes}
    batches = [make_batch(cfg, device, seed) for seed in range(2)]
    for i in range(args.warmup):
        for t in trainers.values():
            t.step(*batches[i % 2])
    times = {name: [] for name in recipes}
    for i in range(args.steps):
        for name, t in trainers.items():
            times[name].append(t.step(*batches[i % 2]))
    del trainers, batches
    if device.type == 'cuda':
        torch.cuda.empty_cache()   # the memory children share the GPU with this process

    peaks = peak_memory(cfg, args.memory_steps, recipes)
    mem_unit = 'max allocated' if device.type == 'cuda' else 'max RSS'
    images = 2 * cfg.batch_size
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f'{"recipe":<10}{"s/step":>10}{"img/s":>10}{"peak MiB (" + mem_unit + ")":>26}{"x default":>11}')
    for name in recipes:
        rel = f'{median[name] / median["default"]:>11.2f}' if 'default' in median else ''
        print(f'{name:<10}{median[name]:>10.3f}{images / median[name]:>10.2f}{peaks[name]:>26.0f}{rel}')
    print(f'data pipeline: {data_pipeline_rate(cfg):.1f} unlabeled samples/s per worker '
          f'(crop {cfg.crop_size}, {os.cpu_count()} CPUs)')
    if {'original', 'default'} <= set(median):
        print(f'speedup: {median["original"] / median["default"]:.2f}x')
    tdist.destroy_process_group()


if __name__ == '__main__':
    main()
