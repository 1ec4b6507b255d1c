"""Stop requests as the world sends them, and a resumed run that is the same run (engine/,
scripts/train.sh).

    python -m pytest tests/test_preemption.py -q

- SIGTERM to the trainer's whole process group with data-loader workers running (what SLURM sends
  to a job step), to the torchrun launcher alone (what `timeout` or a container stop reaches), and
  to `scripts/train.sh`'s process group: each leaves latest.pth at the current iteration, and the
  trainer (or train.sh) exits 0;
- a first Ctrl-C asks for a stop, a second one a second later stops at once;
- a toy run stopped twice (by real SIGTERMs, at different iterations, with 0, 2 and 1 data-loader
  workers) and resumed ends with the same results.json (timings aside) and the same weights,
  optimizer and EMA as the uninterrupted run, bit for bit on the CPU, for every method that carries
  state between steps, and with gradient accumulation (a resume skips grad_accum batches per iteration).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unimatch_v2
from tests.distributed import free_port
import engine.loop
import engine.preemption
import engine.state
from tests.launch import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs/toy.yaml')
TIMING = ('sec_per_iter', 'peak_mem_mib')       # per-epoch entries that depend on the machine


def argv(toy: list[str], run_dir: Path, extra: list[str]) -> list[str]:
    return ['--config', CONFIG, '--split', '1_16', '--save-path', str(run_dir)] + toy + extra


def start(cmd: list[str], out: Path, **env: str) -> subprocess.Popen:
    """`cmd` in a process group of its own (as a job step or a terminal job), output to `out`."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', 'CUDA_VISIBLE_DEVICES': '', **env}
    with open(out, 'w') as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(proc: subprocess.Popen, log: Path, text: str, out: Path, timeout: float = HANG_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f'exited with {proc.returncode} before logging {text!r}:\n{out.read_text()[-3000:]}')
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f'no {text!r} in {log} after {timeout} s')


def stopped_at(run_dir: Path) -> str:
    """Where the stop checkpoint is ('epoch E iteration K (step S)'), mid-epoch; checks that the
    checkpoint, the log and the marker agree and that the run stopped before its end."""
    log = (run_dir / 'train.log').read_text()
    assert 'stopped on request: checkpoint saved, exiting' in log
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    where = f'epoch {ckpt["epoch"] + 1} iteration {ckpt["iteration"]} (step {ckpt["global_step"]})'
    assert ckpt['iteration'] >= 1 and ckpt['global_step'] < 15 * 20
    assert f'checkpoint at {where}' in log
    assert where in (run_dir / engine.state.STOP_MARKER).read_text()
    return where


LONG = ['epochs=20', 'checkpoint_minutes=0']     # 15 steps an epoch on conftest's toy


def test_sigterm_to_the_process_group_with_workers_running(toy, tmp_path):
    run_dir, out = tmp_path / 'run', tmp_path / 'out.txt'
    proc = start([sys.executable, 'unimatch_v2.py'] + argv(toy, run_dir, LONG + ['num_workers=2']), out)
    wait_for(proc, run_dir / 'train.log', 'epoch 0 iter 2/', out)
    os.killpg(proc.pid, signal.SIGTERM)            # the trainer and its two workers
    assert proc.wait(timeout=HANG_TIMEOUT_S) == 0, out.read_text()[-3000:]
    stopped_at(run_dir)
    assert 'SIGTERM' in (run_dir / engine.state.STOP_MARKER).read_text()
    assert 'DataLoader worker' not in out.read_text()


def test_sigterm_to_the_torchrun_launcher_alone(toy, tmp_path):
    """torchrun passes the signal to its two trainers; both stop after the same step (one
    all-reduce per step), rank 0 writes the checkpoint. torchrun itself exits non-zero, as it does
    for any signal; scripts/train.sh turns that into 0 (next test)."""
    run_dir, out = tmp_path / 'run', tmp_path / 'out.txt'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', 'unimatch_v2.py'] + argv(toy, run_dir, LONG + ['num_workers=1'])
    proc = start(cmd, out)
    wait_for(proc, run_dir / 'train.log', 'epoch 0 iter 2/', out)
    proc.send_signal(signal.SIGTERM)               # the launcher only
    proc.wait(timeout=HANG_TIMEOUT_S)
    stopped_at(run_dir)
    assert (run_dir / 'train.log').read_text().count('checkpoint at epoch') == 1
    assert 'DataLoader worker' not in out.read_text()


def test_train_sh_exits_0_when_its_process_group_is_stopped(toy, tmp_path):
    exp, out = tmp_path / 'exp', tmp_path / 'out.txt'
    run_dir = exp / 'toy/unimatch_v2/dinov2_tiny/1_16'
    proc = start(['sh', 'scripts/train.sh', 'toy', '1_16', 'unimatch_v2', '1', str(free_port())] + toy
                 + LONG + ['num_workers=1'], out, EXP_DIR=str(exp))
    wait_for(proc, run_dir / 'train.log', 'epoch 0 iter 2/', out)
    os.killpg(proc.pid, signal.SIGTERM)            # the shell, tee, torchrun, the trainer, its worker
    assert proc.wait(timeout=HANG_TIMEOUT_S) == 0, out.read_text()[-3000:]
    where = stopped_at(run_dir)
    assert f'stopped on request (SIGTERM at {where})' in out.read_text()
    assert 'checkpoint saved, exiting' in (run_dir / 'out.log').read_text()     # the log writer survived


def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    p = engine.preemption.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)        # first: a stop request
        assert p.requested == 'SIGINT'
        os.kill(os.getpid(), signal.SIGINT)        # the same request passed on by a launcher
        monkeypatch.setattr(engine.preemption, 'SECOND_INTERRUPT_S', 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)    # a second Ctrl-C
            time.sleep(0.1)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- a stopped and resumed run is the same run ---------------------------------------------------------

def stop_after(monkeypatch, stops: set[tuple[int, int]]) -> None:
    """Send this process a real SIGTERM right after step (epoch, iteration) of `stops` is logged."""
    real = engine.loop.StepLog.__call__

    def call(self, i, out, lr):
        real(self, i, out, lr)
        if (self.epoch, i + 1) in stops:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine.loop.StepLog, '__call__', call)


def final_state(run_dir: Path) -> tuple[dict, dict]:
    res = json.loads((run_dir / 'results.json').read_text())
    for h in res['history']:
        for key in TIMING:
            h.pop(key)
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    return res, ckpt


METHOD_RUNS = {
    'unimatch_v2': [],
    'prevmatch': ['method=prevmatch', 'prev_snapshots=2'],
    'u2pl': ['method=u2pl', 'u2pl_warmup_epochs=1', 'u2pl_anchors=16', 'u2pl_negatives=8', 'u2pl_anchor_thresh=0'],
    'allspark': ['method=allspark', 'allspark_warmup_epochs=1'],
}


@pytest.mark.usefixtures('on_the_cpu')
@pytest.mark.parametrize('method', list(METHOD_RUNS))
def test_a_run_stopped_twice_and_resumed_is_the_uninterrupted_run(toy, tmp_path, monkeypatch, method):
    base = toy + ['epochs=2', 'max_iters_per_epoch=4', 'checkpoint_minutes=0', 'conf_thresh=0'] + METHOD_RUNS[method]
    unimatch_v2.main(argv(base, tmp_path / 'whole', []))
    workers = ['num_workers=2', 'num_workers=1'] if method == 'unimatch_v2' else ['num_workers=0', 'num_workers=0']

    stop_after(monkeypatch, {(0, 3), (1, 2)})
    for launch, extra in enumerate(['num_workers=0'] + workers):
        with pytest.raises(SystemExit) as info:
            unimatch_v2.main(argv(base, tmp_path / 'stopped', [extra]))
            raise SystemExit('finished')
        assert info.value.code == (0 if launch < 2 else 'finished'), launch
    log = (tmp_path / 'stopped/train.log').read_text()
    assert log.count('stopped on request') == 2 and log.count('resumed from') == 2

    (res_a, ckpt_a), (res_b, ckpt_b) = final_state(tmp_path / 'whole'), final_state(tmp_path / 'stopped')
    assert res_b == res_a
    assert ckpt_b['global_step'] == ckpt_a['global_step'] == 8
    for part in ('model', 'model_ema'):
        for k, v in ckpt_a[part].items():
            assert torch.equal(ckpt_b[part][k], v), (part, k)
    for a, b in zip(ckpt_a['optimizer']['state'].values(), ckpt_b['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures('on_the_cpu')
def test_a_run_with_gradient_accumulation_stopped_mid_epoch_is_the_uninterrupted_run(toy, tmp_path, monkeypatch):
    """grad_accum=2: an iteration is two batches of each loader, so a resume after 2 iterations
    skips 4 batches of each (not 2), and ends with the uninterrupted run's weights, bit for bit."""
    base = toy + ['epochs=1', 'max_iters_per_epoch=5', 'grad_accum=2', 'checkpoint_minutes=0', 'conf_thresh=0']
    unimatch_v2.main(argv(base, tmp_path / 'whole', []))
    stop_after(monkeypatch, {(0, 2)})
    with pytest.raises(SystemExit) as info:
        unimatch_v2.main(argv(base, tmp_path / 'stopped', []))
    assert info.value.code == 0
    assert torch.load(tmp_path / 'stopped/latest.pth', weights_only=True)['iteration'] == 2
    unimatch_v2.main(argv(base, tmp_path / 'stopped', []))
    (res_a, ckpt_a), (res_b, ckpt_b) = final_state(tmp_path / 'whole'), final_state(tmp_path / 'stopped')
    assert res_b == res_a and ckpt_b['global_step'] == ckpt_a['global_step'] == 5
    for part in ('model', 'model_ema'):
        for k, v in ckpt_a[part].items():
            assert torch.equal(ckpt_b[part][k], v), (part, k)


def test_a_run_directory_resumes_only_its_own_seed(toy, tmp_path, capsys):
    """Rerunning with another seed= into the same directory is another run, not a resume: refused,
    naming the key, before anything is written."""
    unimatch_v2.main(argv(toy, tmp_path / 'run', ['epochs=1', 'max_iters_per_epoch=1']))
    before = (tmp_path / 'run/latest.pth').read_bytes()
    with pytest.raises(SystemExit) as info:
        unimatch_v2.main(argv(toy, tmp_path / 'run', ['epochs=2', 'max_iters_per_epoch=1', 'seed=1']))
    assert info.value.code == 1
    assert "was trained with seed=0 but the config has seed=1" in capsys.readouterr().err
    assert (tmp_path / 'run/latest.pth').read_bytes() == before
