"""A run directory has one owner, and nothing a failed or refused command does touches a finished
run: a second run on a live run's directory, a criterion argument the loss does not take, a resume
with other settings, a truncated latest.pth and a full disk each end with exit status 1 and one line
naming the key or file -- with every file of the run directory byte for byte as it was.

    python -m pytest tests/test_run_dir.py -q
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_failures import ROOT, launch, live_processes
from util.run_lock import RunDirLock

pytestmark = pytest.mark.skipif(sys.platform != 'linux', reason='POSIX locks, /proc, rlimits')

def train_cmd(run_dir: Path, toy: list[str], *overrides: str) -> list[str]:
    return [sys.executable, 'unimatch_v2.py', '--config', 'configs/toy.yaml', '--split', '1_16',
            '--save-path', str(run_dir), *toy, *overrides]


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the run directory: its bytes and modification time (but the lock file's
    time: a refused command takes the lock before it reads latest.pth, and empties it again)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), 0 if p.name == '.lock' else p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob('*')) if p.is_file()}


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def finished(toy, tmp_path_factory) -> Path:
    """A finished one-epoch run (latest.pth, best.pth, config.yaml, train.log, results.json)."""
    run_dir = tmp_path_factory.mktemp('finished') / 'run'
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=1'))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run_dir / 'latest.pth').is_file() and (run_dir / 'results.json').is_file()
    return run_dir


@pytest.mark.parametrize('overrides, words', [
    (['criterion.kwargs.thresh=0.7'], "'criterion.kwargs.thresh' is not an argument of criterion CELoss"),
    (['criterion.name=OHEM', 'criterion.kwargs.tresh=0.7'], 'did you mean criterion.kwargs.thresh?'),
    (['lr=0.01'], 'lr: 0.0002 -> 0.01'),                          # resume with other settings: refused
    (['crop_size=56'], 'crop_size: 42 -> 56'),
    (['seed=1'], 'trained with seed=0'),
])
def test_a_refused_command_leaves_the_finished_run_byte_identical(finished, toy, overrides, words):
    before = snapshot(finished)
    res, _ = launch(train_cmd(finished, toy, 'epochs=2', *overrides))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith('error:') and words in lines[0], lines
    assert snapshot(finished) == before                   # not a byte, not a timestamp: no train.log append


def test_a_refused_launch_through_train_sh_leaves_out_log_as_it_was(finished, toy, tmp_path):
    """train.sh keeps the console in a file of its own and adds it to <run>/out.log only once the
    run has begun there: its refused resume leaves every file of the finished run as it was."""
    exp = tmp_path / 'exp'
    run_dir = exp / 'toy/unimatch_v2/dinov2_tiny/1_16'
    run_dir.parent.mkdir(parents=True)
    subprocess.run(['cp', '-a', str(finished), str(run_dir)], check=True)
    (run_dir / 'out.log').write_text('the console of the finished run\n')
    before = snapshot(run_dir)
    res, _ = launch(['sh', 'scripts/train.sh', 'toy', '1_16', 'unimatch_v2', '1', *toy, 'epochs=2', 'lr=0.01'],
                    EXP_DIR=str(exp), CUDA_VISIBLE_DEVICES='')
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert 'lr: 0.0002 -> 0.01' in res.stdout                 # the one line, on the console
    assert snapshot(run_dir) == before


def test_resume_changes_allow_resumes_with_the_changes_logged(finished, toy, tmp_path):
    run_dir = tmp_path / 'run'
    subprocess.run(['cp', '-a', str(finished), str(run_dir)], check=True)
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=2', 'lr=0.0004', 'resume_changes=allow'))
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run_dir / 'train.log').read_text()
    assert 'resuming' in log and 'lr: 0.0002 -> 0.0004' in log and 'resumed from' in log
    assert 'lr: 0.0004' in (run_dir / 'config.yaml').read_text()


def test_more_epochs_resume_without_a_flag(finished, toy, tmp_path):
    run_dir = tmp_path / 'run'
    subprocess.run(['cp', '-a', str(finished), str(run_dir)], check=True)
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=2'))
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'resumed from' in (run_dir / 'train.log').read_text()
    # the checkpoint it replaced is kept: a way back from a damaged latest.pth
    assert (run_dir / 'latest.prev.pth').read_bytes() == (finished / 'latest.pth').read_bytes()


def test_a_truncated_latest_pth_names_the_way_back(finished, toy, tmp_path):
    run_dir = tmp_path / 'run'
    subprocess.run(['cp', '-a', str(finished), str(run_dir)], check=True)
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=2'))     # epoch 1: latest.prev.pth is epoch 0's
    assert res.returncode == 0, res.stderr[-2000:]
    latest = run_dir / 'latest.pth'
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])     # a copy cut short
    before = snapshot(run_dir)
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=3'))
    lines = error_lines(res)
    assert res.returncode == 1 and len(lines) == 1, lines
    assert f'{latest} is not a readable checkpoint' in lines[0]
    assert f'mv {run_dir / "latest.prev.pth"} {latest}' in lines[0], lines[0]
    assert snapshot(run_dir) == before
    os.replace(run_dir / 'latest.prev.pth', latest)           # the way out the line gives
    res, _ = launch(train_cmd(run_dir, toy, 'epochs=3'))
    assert res.returncode == 0, res.stderr[-2000:]
    resumes = [line for line in (run_dir / 'train.log').read_text().splitlines() if 'resumed from' in line]
    assert 'at the end of epoch 0' in resumes[-1], resumes     # from the checkpoint before the damaged one


def test_a_full_disk_keeps_the_last_checkpoint(finished, toy, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as ENOSPC on a full disk)
    smaller than a checkpoint: the run ends with one line naming the file, and the latest.pth it
    would have replaced still loads."""
    run_dir = tmp_path / 'run'
    subprocess.run(['cp', '-a', str(finished), str(run_dir)], check=True)
    old = (run_dir / 'latest.pth').read_bytes()
    limit = len(old) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    res = subprocess.run(train_cmd(run_dir, toy, 'epochs=2'), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, preexec_fn=small_files)
    lines = error_lines(res)
    assert res.returncode == 1 and len(lines) == 1, (res.returncode, lines)
    assert 'could not write' in lines[0] and 'File too large' in lines[0], lines[0]
    assert 'left as it was' in lines[0]
    assert (run_dir / 'latest.pth').read_bytes() == old
    assert not [p for p in run_dir.iterdir() if p.name.endswith('.tmp')]      # no half-written file left


def test_a_second_run_on_a_live_run_directory_is_refused(toy, tmp_path):
    """Two users, one directory: the first trains; the second stops before writing anything there,
    naming the owner; the first goes on and ends as it would have alone."""
    run_dir = tmp_path / 'run'
    first = subprocess.Popen(train_cmd(run_dir, toy, 'epochs=50', 'max_iters_per_epoch=50'), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while 'iterations per epoch' not in _read(run_dir / 'train.log'):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.5)
        before = {name: data for name, (data, _) in snapshot(run_dir).items()
                  if name in ('config.yaml', '.lock')}
        res, _ = launch(train_cmd(run_dir, toy, 'seed=1', 'lr=0.002', 'epochs=50'))
        lines = error_lines(res)
        assert res.returncode == 1 and len(lines) == 1, lines
        assert f'{run_dir} is in use by a live run' in lines[0] and f'pid {first.pid}' in lines[0], lines[0]
        after = snapshot(run_dir)
        assert {name: after[name][0] for name in before} == before
        assert 'seed=1' not in _read(run_dir / 'train.log')
    finally:
        first.send_signal(signal.SIGTERM)            # a stop request: it saves and exits 0
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert not live_processes(str(run_dir))
    RunDirLock(run_dir).release()                      # the lock went with its process


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ''
