"""Each method's step on fixed inputs, as recorded in tests/fixtures: the harness, the tolerances,
and the recorder of the float64 fixture (tests/test_methods.py checks both fixtures).

    python -m tests.step_record --spread     # how far other CPU kernels move the float64 outputs
    python -m tests.step_record --record     # check the fp32 record, then rewrite the float64 one

Two records of the same three steps (fixed batches and seeds, a tiny model):

- `step_outputs_before_issue17.pt`: fp32, recorded at commit 8c05e45 (before the methods moved
  into the registry) on an Intel CPU with AMX. Another CPU kind rounds differently: on an AMD EPYC
  (no AMX) the losses and gradient sums differ from it by up to 2 fp32 ulps (2.2e-7 relative), and
  this machine's own other kernel sets (below) by up to 3 ulps (3.5e-7). FP32_TOL = 1e-6 (about
  8 ulps) covers that, so this record can only say "the same to fp32 rounding": scaling a loss term
  by 1.0000001 (about one ulp) is below it.
- `step_outputs_float64.pt`: the same cases run in float64, recorded from the code that matched
  the fp32 record within FP32_TOL on this machine (`--record` refuses otherwise). Rounding is then
  ~1e-16 relative: other kernel sets move the outputs by at most 1.1e-15 relative (`--spread`:
  ATen's generic, AVX2 and AVX-512 kernels, MKL and oneDNN limited to AVX2 / SSE4, 1 or 2 threads;
  measured on an AMD EPYC), so FP64_RTOL = 1e-12 leaves a margin of ~1000 over that spread while
  a change of 1e-7 in any term (5e-8 in the total) stays 50,000 times above it.
  loss_ipix (4e-7 to 2e-6) is a sum of O(1) log-probability differences that nearly cancel: its
  rounding is absolute, a fraction of an ulp of 1 (measured up to 2.7e-17), hence FP64_ATOL =
  1e-15 (about 5 ulps of 1, 37 times the spread); 1e-7 of the smallest loss_ipix (4.4e-14) is
  still 44 times above it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FP32_FIXTURE = ROOT / 'tests/fixtures/step_outputs_before_issue17.pt'
FP64_FIXTURE = ROOT / 'tests/fixtures/step_outputs_float64.pt'
# The methods whose step the registry left as it was (U2PL's and AllSpark's changed on purpose).
UNCHANGED = ('unimatch_v2', 'fixmatch', 'unimatch_v1', 'prevmatch', 'ipixmatch', 'fixmatch+ipix',
             'unimatch_v1+prev+ipix')
# In float64 too: AllSpark as it is now. U2PL cannot run in float64 (its key queues are fp32 by design).
FLOAT64_CASES = UNCHANGED + ('allspark',)
FP32_TOL = 1e-6         # relative, and absolute below 1: fp32 rounding between CPU kinds (docstring)
FP64_RTOL = 1e-12       # float64 rounding between CPU kinds, with a margin of ~1000 (docstring)
FP64_ATOL = 1e-15       # ... for loss_ipix, a near-cancelling sum of O(1) terms
# Kernel sets of other CPUs, emulated here: ATen's generic vector code, MKL and oneDNN held to SSE4.
OTHER_KERNELS = {'ATEN_CPU_CAPABILITY': 'default', 'MKL_ENABLE_INSTRUCTIONS': 'SSE4_2',
                 'ONEDNN_MAX_CPU_ISA': 'SSE41'}
SPREAD_SETTINGS = {
    'ATen default': {'ATEN_CPU_CAPABILITY': 'default'},
    'ATen AVX2': {'ATEN_CPU_CAPABILITY': 'avx2'},
    'MKL AVX2': {'MKL_ENABLE_INSTRUCTIONS': 'AVX2'},
    'oneDNN AVX2': {'ONEDNN_MAX_CPU_ISA': 'AVX2'},
    'all at SSE4': OTHER_KERNELS,
    '2 threads': {'STEP_RECORD_THREADS': '2'},
}


def run_case(overrides: list[str], base: list[str]) -> list[dict]:
    """Three steps of a tiny model as the fixture's recorder ran them: fixed batches and seeds, two
    snapshots in PrevMatch's bank, AllSpark's memory from the third step on, an AdamW step and an
    EMA update after each; each step's outputs plus the sum of |gradient|."""
    import methods
    from tests.test_steps import make_batch
    import engine.build
    import engine.state
    from engine.config import load_config
    from util.ema import EMATeacher
    cfg = load_config(ROOT / 'configs/toy.yaml', base + overrides)
    torch.manual_seed(0)
    student = engine.build.build_model(cfg).train()
    teacher = EMATeacher(student, cfg.ema_decay)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    run = types.SimpleNamespace(cfg=cfg, device=torch.device('cpu'))
    run_methods = methods.create(cfg, student, run.device)
    for m in run_methods:
        if m.state_key == 'prev_bank':
            m.bank.add(student)
            m.bank.add(teacher.model)
    tr = types.SimpleNamespace(run=run, ddp=student, teacher=teacher, state=engine.state.TrainState(),
                               methods=run_methods)
    step = engine.build.make_step(tr, methods.get(cfg.method).options, 10)
    outs = []
    for i in range(3):
        tr.state.epoch, tr.state.iteration = (-1, i) if i < 2 else (0, 0)
        batch_l, batch_u = make_batch(seed=i)
        torch.manual_seed(100 + i)
        out = step(batch_u, batch_l)
        out['loss'].backward()
        out = {k: v.detach().clone() for k, v in out.items()}
        out['grad_abs_sum'] = sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None)
        outs.append(out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(student, i)
    return outs


@contextlib.contextmanager
def float64():
    """Everything in float64: tensors made without a dtype (the model's parameters, the batches) and
    what the code casts with `.float()` (there to lift bf16/fp16 logits to fp32, and counts and masks
    to a float) become float64. Explicit dtypes stay (PrevMatch's bf16 snapshots of weights that
    are equal on every CPU at that point)."""
    had_own = 'float' in vars(torch.Tensor)
    real = torch.Tensor.float
    previous = torch.get_default_dtype()
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        if had_own:
            torch.Tensor.float = real
        else:
            del torch.Tensor.float


def run_float64_case(overrides: list[str], base: list[str]) -> list[dict]:
    with float64():
        return run_case(overrides, base)


def case_overrides(record: dict, case: str) -> list[str]:
    return record['cases'][case] or [f'method={case}']


def mismatches(old: list[dict], new: list[dict], rtol: float, atol: float) -> list[tuple]:
    """(step, key, new, old) of every output outside |new - old| <= atol + rtol |old|; a key
    present on one side only is a mismatch too."""
    bad = []
    for i, (o, n) in enumerate(zip(old, new, strict=True)):
        for key in sorted(set(o) | set(n)):
            if key not in o or key not in n:
                bad.append((i, key, n.get(key), o.get(key)))
            elif not torch.allclose(n[key].double(), o[key].double(), rtol=rtol, atol=atol):
                bad.append((i, key, n[key].double().tolist(), o[key].double().tolist()))
    return bad


def fp32_mismatches(record: dict, case: str) -> list[tuple]:
    return mismatches(record['outputs'][case], run_case(case_overrides(record, case), record['base']),
                      FP32_TOL, FP32_TOL)


# ---- the command line: the measured spread, and recording ---------------------------------------

def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dump(path: str) -> None:
    """Child of --spread: the float64 outputs of every case under this process's kernel settings."""
    torch.set_num_threads(int(os.environ.get('STEP_RECORD_THREADS', '1')))
    record = torch.load(FP32_FIXTURE, weights_only=True)     # the cases' overrides
    torch.save({c: run_float64_case(case_overrides(record, c), record['base']) for c in FLOAT64_CASES}, path)


def outputs_under(env: dict[str, str], path: Path) -> dict:
    subprocess.run([sys.executable, '-m', 'tests.step_record', '--dump', str(path)], cwd=ROOT, check=True,
                   env={**os.environ, 'OMP_NUM_THREADS': '1', **env})
    return torch.load(path, weights_only=True)


def largest_differences(a: dict, b: dict) -> tuple[float, float]:
    """(largest relative difference of every output but loss_ipix, largest absolute one of loss_ipix)."""
    rel = ab = 0.0
    for case in a:
        for x, y in zip(a[case], b[case]):
            for key in x:
                d = (x[key].double() - y[key].double()).abs().max().item()
                if key == 'loss_ipix':
                    ab = max(ab, d)
                else:
                    rel = max(rel, d / max(x[key].double().abs().max().item(), 1e-300))
    return rel, ab


def spread(tmp: Path) -> None:
    here = outputs_under({}, tmp / 'here.pt')
    print(f'{cpu_model()}, torch {torch.__version__}: float64 outputs under other kernel settings, '
          f'largest difference from this machine\'s defaults')
    for name, env in SPREAD_SETTINGS.items():
        rel, ab = largest_differences(here, outputs_under(env, tmp / 'other.pt'))
        print(f'  {name:<14} relative {rel:.3g}   loss_ipix absolute {ab:.3g}')
    print(f'tolerances: FP64_RTOL {FP64_RTOL:g}, FP64_ATOL {FP64_ATOL:g}')


def record_float64() -> None:
    """Refuse unless this code matches the fp32 record within FP32_TOL; then write the float64 one."""
    torch.set_num_threads(1)
    fp32 = torch.load(FP32_FIXTURE, weights_only=True)
    for case in UNCHANGED:
        bad = fp32_mismatches(fp32, case)
        if bad:
            raise SystemExit(f'error: {case} does not match {FP32_FIXTURE.name} within {FP32_TOL:g}: {bad[:3]}')
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cases = {c: fp32['cases'][c] for c in FLOAT64_CASES}
    outputs = {c: run_float64_case(case_overrides(fp32, c), fp32['base']) for c in FLOAT64_CASES}
    torch.save({'commit': commit, 'cpu': cpu_model(), 'torch': str(torch.__version__), 'dtype': 'float64',
                'base': fp32['base'], 'cases': cases, 'outputs': outputs}, FP64_FIXTURE)
    print(f'{FP64_FIXTURE}: {len(outputs)} cases recorded in float64 at {commit} on {cpu_model()}')


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--record', action='store_true', help='check the fp32 record, then rewrite the float64 one')
    g.add_argument('--spread', action='store_true', help='float64 outputs under other kernel settings')
    g.add_argument('--dump', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dump:
        _dump(args.dump)
    elif args.spread:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            spread(Path(tmp))
    else:
        record_float64()


if __name__ == '__main__':
    main()
