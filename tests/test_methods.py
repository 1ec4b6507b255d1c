"""The method registry (methods/) and the wiring of the training loop around it (engine/).

    python -m pytest tests/test_methods.py -q

- every method's step gives the losses and gradients it gave before methods moved into the registry
  (`tests/fixtures/step_outputs_before_issue17.pt`, fp32, recorded at commit 8c05e45 on an Intel CPU
  with AMX) to fp32 rounding between CPU kinds, except where a fidelity fix changed them on purpose
  (U2PL's positive keys and the meaning of lambda_c; AllSpark's initialisation and norms); and, run
  in float64, the outputs recorded from the code that passed that check
  (`tests/fixtures/step_outputs_float64.pt`) to float64 rounding, which a change of 1e-7 in one loss
  term exceeds 50,000 times (tolerances and their measurements: tests/step_record.py);
- the import graph has no circle and `model/` imports no method; entry scripts name no method and
  a method is named, outside its own module, docs, configs and tests, only by the registry line;
- the loop hands the step the EMA teacher, updates the EMA once after every optimizer step with the
  original's schedule (and saves it), runs every step at the original's learning rate (set after
  step `iters` for the next one, also across a resume), gives each method the paper's options,
  accumulates gradients like one larger batch, and ends a two-process run with equal weights from
  disjoint shards.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch

import methods
import unimatch_v2
from methods.step import SemiOptions, supervised_step
from tests.distributed import run_processes
from tests.step_record import (FLOAT64_CASES, FP32_FIXTURE, FP32_TOL, FP64_ATOL, FP64_FIXTURE, FP64_RTOL,
                               OTHER_KERNELS, UNCHANGED, case_overrides, fp32_mismatches, mismatches, outputs_under,
                               run_case, run_float64_case)
from util import dist
import engine.build
import engine.loop
import engine.run
import engine.schedule
from engine.config import load_config
from util.ema import EMATeacher, ema_ratio
from util.losses import build_criterion
from util.precision import Precision

ROOT = Path(__file__).resolve().parents[1]


# ---- each method's step, before and after the registry ------------------------------------------

@pytest.fixture(scope='module')
def before() -> dict:
    return torch.load(FP32_FIXTURE, weights_only=True)


@pytest.fixture(scope='module')
def float64_record() -> dict:
    return torch.load(FP64_FIXTURE, weights_only=True)


@pytest.mark.parametrize('case', UNCHANGED)
def test_each_methods_step_matches_the_fp32_record_to_rounding(before, case):
    """The fp32 record of commit 8c05e45 came from an Intel CPU with AMX: FP32_TOL is the spread of
    fp32 rounding between CPU kinds (tests/step_record.py)."""
    assert fp32_mismatches(before, case) == []


@pytest.mark.parametrize('case', FLOAT64_CASES)
def test_each_methods_step_is_unchanged_in_float64(float64_record, case):
    """In float64 another CPU moves the outputs by ~1e-15 (tests/step_record.py): a change of 1e-7
    in any loss term is far outside FP64_RTOL / FP64_ATOL, a change of rounding well inside."""
    new = run_float64_case(case_overrides(float64_record, case), float64_record['base'])
    assert all(v.dtype == torch.float64 for out in new for v in out.values() if v.is_floating_point())
    assert mismatches(float64_record['outputs'][case], new, FP64_RTOL, FP64_ATOL) == []


def test_the_float64_tolerance_covers_other_cpu_kernels(float64_record, tmp_path):
    """The float64 step under another CPU's kernels, emulated on this one (ATen's generic vector
    code, MKL and oneDNN held to SSE4: OTHER_KERNELS), stays within the tolerance of the record."""
    other = outputs_under(OTHER_KERNELS, tmp_path / 'outputs.pt')
    assert set(other) == set(FLOAT64_CASES)
    for case, new in other.items():
        assert mismatches(float64_record['outputs'][case], new, FP64_RTOL, FP64_ATOL) == [], case


@pytest.mark.parametrize('case', ['u2pl', 'u2pl+sce'])
def test_u2pl_step_changed_only_in_its_contrastive_term(before, case):
    """The first step (nothing learned yet, same queues) agrees in every term but L_c, whose positive
    keys now average every labeled and reliable unlabeled pixel, and the total, where lambda_c now
    weighs L_c as the paper (and defaults to 0.25). To fp32 rounding: the record is from another CPU."""
    old, new = before['outputs'][case][0], run_case(case_overrides(before, case), before['base'])[0]
    changed = {'loss', 'loss_c', 'u2pl_weight', 'grad_abs_sum'}
    same = sorted(set(old) - changed)
    assert mismatches([{k: old[k] for k in same}], [{k: new[k] for k in same}], FP32_TOL, FP32_TOL) == []
    assert not torch.allclose(new['loss_c'], old['loss_c'], rtol=100 * FP32_TOL)
    w = 1.0       # lossu_weight
    expected = (new['loss_x'] + w * new['loss_u'] + 0.25 * new['loss_c']) / (1 + w)
    assert float(new['u2pl_weight']) == 0.25
    assert torch.allclose(new['loss'], expected, rtol=1e-6)


# ---- the import graph and where methods are named -------------------------------------------------

PACKAGES = ('model', 'methods', 'tasks', 'util', 'dataset')
ENTRY_SCRIPTS = ('unimatch_v2.py', 'supervised.py', 'benchmark.py', 'evaluate.py', 'predict.py')


def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob('*.py')}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob('*.py'):
            mods[pkg if p.stem == '__init__' else f'{pkg}.{p.stem}'] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code (function-level imports too)."""
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    graph['methods'] |= {f'methods.{m}' for m in methods.MODULES}     # imported by name (importlib)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n: str) -> list[str] | None:
        state[n] = 'open'
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 'open':
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 'done'
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert 'methods.u2pl' in graph and graph['methods.u2pl'] >= {'model.dpt', 'methods.step'}
    assert find_cycle(graph) is None, find_cycle(graph)
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']   # the check can fail


def test_model_knows_no_method():
    graph = import_graph()
    for name, deps in graph.items():
        if name.split('.')[0] == 'model':
            assert not {d for d in deps if d.split('.')[0] == 'methods'}, name
    names = '|'.join(methods.names())
    for path in (ROOT / 'model').glob('*.py'):
        assert not re.search(rf'\b({names})\b', path.read_text(), re.I), path


def method_mentions(name: str) -> dict[str, list[int]]:
    """{file: line numbers} of `name` (any case, as a word, not as part of a file name like
    `name.py`) in the project's tracked code (Python and shell), outside the method's own module,
    its docs, the configs and the tests."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '*.py', '*.sh'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(rf'(?<![\w-]){re.escape(name)}(?![\w]|\.py|\.md)', re.I)
    hits = {}
    for f in files:
        if f.startswith('tests/') or f == f'methods/{name}.py' or not (ROOT / f).is_file():
            continue
        lines = [i for i, line in enumerate((ROOT / f).read_text().splitlines(), 1) if pattern.search(line)]
        if lines:
            hits[f] = lines
    return hits


def registry_line() -> dict[str, list[int]]:
    lines = (ROOT / 'methods/__init__.py').read_text().splitlines()
    return {'methods/__init__.py': [i for i, line in enumerate(lines, 1) if line.startswith('MODULES = (')]}


@pytest.mark.parametrize('name', ['prevmatch', 'ipixmatch', 'u2pl', 'allspark'])
def test_a_method_is_named_only_by_its_module_and_the_registry_line(name):
    assert method_mentions(name) == registry_line()


def test_entry_scripts_name_no_method():
    """supervised.py exists for the original's command line, `python supervised.py ...`: it names
    the one method it runs and no other."""
    for name in methods.names():
        hits = {f for f in method_mentions(name) if f in ENTRY_SCRIPTS}
        assert hits <= ({'supervised.py'} if name == 'supervised' else set()), (name, hits)


# ---- the training loop's wiring --------------------------------------------------------------------

def test_each_method_runs_the_papers_step_options():
    """UNIMATCH_V2_FACTS.md section 5: UniMatch V2 two strong views with complementary dropout,
    FixMatch one view without, UniMatch V1 two views plus a feature-perturbation stream of weight
    0.5; the methods built on UniMatch V2 keep its step."""
    opts = {name: cls.options for name, cls in methods.REGISTRY.items()}
    assert opts['unimatch_v2'] == SemiOptions(views=2, comp_drop=True, fp_weight=0.0)
    assert opts['fixmatch'] == SemiOptions(views=1, comp_drop=False, fp_weight=0.0)
    assert opts['unimatch_v1'] == SemiOptions(views=2, comp_drop=False, fp_weight=0.5)
    assert opts['supervised'] is None
    for name in ('prevmatch', 'ipixmatch', 'u2pl', 'allspark'):
        assert opts[name] == opts['unimatch_v2'], name


class Recorder:
    """What the loop did, in order: the step's arguments, optimizer steps (and the learning rate of
    each parameter group they ran at), EMA updates."""

    def __init__(self, monkeypatch):
        self.events, self.steps, self.ema, self.lrs = [], [], [], []
        real_step, real_opt, real_ema = engine.build.semi_step, Precision.step, EMATeacher.update

        def step(student, teacher, *args, **kwargs):
            self.steps.append((student, teacher))
            return real_step(student, teacher, *args, **kwargs)

        def opt_step(precision, optimizer):
            self.events.append('optimizer')
            self.lrs.append(tuple(group['lr'] for group in optimizer.param_groups))
            return real_opt(precision, optimizer)

        def ema_update(ema, student, it):
            name = 'head.scratch.output_conv.2.weight'
            before = ema.model.state_dict()[name].clone()
            real_ema(ema, student, it)
            self.events.append('ema')
            self.ema.append((it, before, student.state_dict()[name].clone(), ema.model.state_dict()[name].clone()))

        monkeypatch.setattr(engine.build, 'semi_step', step)
        monkeypatch.setattr(Precision, 'step', opt_step)
        monkeypatch.setattr(EMATeacher, 'update', ema_update)


@pytest.fixture
def recorded_run(toy, tmp_path, monkeypatch):
    """Two epochs of three steps of UniMatch V2 on the toy, recorded."""
    rec = Recorder(monkeypatch)
    run_dir = tmp_path / 'run'
    tr = unimatch_v2.train(engine.run.parse_args('', ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16',
                                                '--save-path', str(run_dir)] + toy +
                                          ['epochs=2', 'max_iters_per_epoch=3', 'ema_decay=0.6']))
    return rec, tr, run_dir


def test_the_step_gets_the_ema_teacher(recorded_run):
    rec, tr, _ = recorded_run
    assert len(rec.steps) == 6
    for student, teacher in rec.steps:
        assert student is tr.ddp
        assert teacher is tr.teacher and isinstance(teacher, EMATeacher)
        assert teacher.model is not tr.student


def test_the_ema_follows_every_optimizer_step_with_the_originals_schedule(recorded_run):
    rec, tr, run_dir = recorded_run
    assert rec.events == ['optimizer', 'ema'] * 6
    assert [it for it, *_ in rec.ema] == list(range(6))          # epoch * iterations + i, over epochs
    for it, ema_before, student, ema_after in rec.ema:
        r = ema_ratio(it, 0.6)
        assert r == min(1 - 1 / (it + 1), 0.6)
        assert torch.allclose(ema_after, r * ema_before + (1 - r) * student, atol=1e-6), it
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert torch.equal(ckpt['model_ema']['head.scratch.output_conv.2.weight'], rec.ema[-1][3])
    for k, v in tr.teacher.model.state_dict().items():
        assert torch.equal(ckpt['model_ema'][k], v), k


def originals_learning_rates(base: float, lr_multi: float, epochs: int, iters: int) -> list[float]:
    """(encoder, head) lr of every step, flattened, as the original's loop sets them: the optimizer
    starts at the base lr; after step `iters` (epoch * len(loader) + i) it sets
    lr = base * (1 - iters / total_iters) ** 0.9, head lr * lr_multi."""
    lr, rates = base, []
    for epoch in range(epochs):
        for i in range(iters):
            rates += [lr, lr * lr_multi]
            lr = base * (1 - (epoch * iters + i) / (epochs * iters)) ** 0.9
    return rates


def test_every_step_runs_at_the_originals_learning_rate(recorded_run):
    """Over an epoch boundary, both parameter groups: the first two steps at the base lr."""
    rec, tr, _ = recorded_run
    cfg = tr.run.cfg
    expected = originals_learning_rates(cfg.lr * engine.schedule.lr_scale(cfg), cfg.lr_multi, 2, 3)
    assert expected[0] == expected[2] != expected[4]
    assert [lr for step in rec.lrs for lr in step] == pytest.approx(expected, rel=1e-12)


def test_a_resumed_run_keeps_the_learning_rate_of_every_step(toy, tmp_path, monkeypatch):
    """Stopped (a real SIGTERM) after the first step of the second epoch and resumed: the resumed
    steps run at the lr the uninterrupted run would have used."""
    from tests.test_preemption import stop_after
    rec = Recorder(monkeypatch)
    argv = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(tmp_path / 'run')] \
        + toy + ['epochs=2', 'max_iters_per_epoch=3', 'checkpoint_minutes=0']
    stop_after(monkeypatch, {(1, 1)})
    with pytest.raises(SystemExit) as info:
        unimatch_v2.main(argv)
    assert info.value.code == 0 and len(rec.lrs) == 4
    unimatch_v2.main(argv)
    assert 'resumed from' in (tmp_path / 'run/train.log').read_text()
    cfg = load_config(ROOT / 'configs/toy.yaml', toy)
    expected = originals_learning_rates(cfg.lr * engine.schedule.lr_scale(cfg), cfg.lr_multi, 2, 3)
    assert [lr for step in rec.lrs for lr in step] == pytest.approx(expected, rel=1e-12)


def test_gradient_accumulation_equals_one_step_on_the_larger_batch():
    """grad_accum=2 over two batches of 2 gives the gradients of one batch of 4 (no ignored pixels,
    so the per-batch means weigh alike)."""
    torch.manual_seed(0)
    model = engine.build.build_model(load_config(ROOT / 'configs/toy.yaml', ['pretrained=null', 'nclass=3']))
    criterion = build_criterion('CELoss', {'ignore_index': 255})
    g = torch.Generator().manual_seed(1)
    batches = [{'image': torch.randn(2, 3, 28, 28, generator=g), 'mask': torch.randint(0, 3, (2, 28, 28), generator=g)}
               for _ in range(2)]
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    def grads(chunks: list[dict], accum: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        tr = types.SimpleNamespace(ddp=model, run=types.SimpleNamespace(device=torch.device('cpu')),
                                   precision=Precision('fp32', torch.device('cpu')),
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        out = engine.loop.accumulate(tr, lambda b: supervised_step(model, b, criterion), iter([(c,) for c in chunks]),
                                 accum)
        assert out is not None
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    accumulated, one = grads(batches, 2), grads([whole], 1)
    assert accumulated.keys() == one.keys() and len(one) > 10
    for name in one:
        assert torch.allclose(accumulated[name], one[name], rtol=1e-4, atol=1e-7), name


def _two_process_worker(rank: int, out_dir: str) -> None:
    """unimatch_v2.train in each of two gloo processes; what each saw and ended with goes to out_dir."""
    from dataset.semi import SemiDataset
    seen, real = [], SemiDataset.__getitem__

    def getitem(self, idx):
        seen.append((self.mode, getattr(idx, 'index', idx)))
        return real(self, idx)

    SemiDataset.__getitem__ = getitem
    dist.cleanup = lambda: None                  # the harness tears the group down
    args = json.loads(Path(out_dir, 'args.json').read_text())
    tr = unimatch_v2.train(engine.run.parse_args('', args))
    torch.save({'model': tr.student.state_dict(), 'ema': tr.teacher.model.state_dict(), 'seen': seen},
               Path(out_dir, f'rank{rank}.pt'))


def test_two_processes_end_with_equal_weights_from_disjoint_shards(toy, tmp_path):
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(tmp_path / 'run')]
    (tmp_path / 'args.json').write_text(json.dumps(args + toy + ['epochs=1', 'max_iters_per_epoch=3']))
    run_processes(_two_process_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    for key in ('model', 'ema'):
        assert r0[key].keys() == r1[key].keys()
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    unlabeled = [{i for mode, i in r['seen'] if mode == 'train_u'} for r in (r0, r1)]
    assert len(unlabeled[0]) == len(unlabeled[1]) == 6          # 3 steps x batch 2 on each process
    assert not unlabeled[0] & unlabeled[1]
