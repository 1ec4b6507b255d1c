"""Robustness of training runs on a small generated toy set: kill -9 and SIGTERM mid-epoch then
resume, refused unsafe pickles, bad inputs refused before anything is written, injected NaN losses,
repeatable runs, atomic checkpoint writes.

The interrupted runs are real `python unimatch_v2.py` processes; resumes and everything else call
the entry scripts' `main(argv)` in-process with the same arguments (one interpreter start-up costs
~10 s on a loaded 2-core machine).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_script
import unimatch_v2
import methods.step
from dataset.toy import ensure_toy
from util.checkpoint import safe_load, save_atomic, write_text_atomic
from tests.launch import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs/toy.yaml')
FAST = ['crop_size=42', 'batch_size=2', 'log_interval=1', 'num_workers=0', 'toy_train=32', 'toy_val=3',
        'pretrained=null']
# One logged training step (log_interval=1), without its timing: 'epoch 0 iter 3/6: loss_x: ..., lr ...'
STEP_LINE = re.compile(r'(epoch (\d+) iter (\d+)/\d+: .*?, lr \S+),')
RUN_START = re.compile(r'^\[[^\]]+\] config ', re.M)     # first line of each launch in train.log


# ---- helpers ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('toy')
    data, splits = base / 'data', base / 'splits'
    ensure_toy(data, splits / 'toy', n_train=32, n_val=3)
    return {'data': data, 'splits': splits / 'toy',
            'overrides': FAST + [f'data_root={data}', f'splits_root={splits}']}


def train_argv(toy: dict, run_dir: Path, extra: list[str]) -> list[str]:
    return ['--config', CONFIG, '--split', '1_16', '--save-path', str(run_dir)] + toy['overrides'] + extra


def launch(argv: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    with open(out, 'w') as f:
        return subprocess.Popen([sys.executable, 'unimatch_v2.py'] + argv, cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def runs_in_log(log: Path) -> list[str]:
    """train.log split into one text per launch."""
    text = log.read_text()
    starts = [m.start() for m in RUN_START.finditer(text)] + [len(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:])]


def iterations(text: str) -> list[tuple[int, int]]:
    """(epoch, 1-based iteration) of every logged step."""
    return [(int(m[2]), int(m[3])) for m in STEP_LINE.finditer(text)]


def step_lines(log: Path) -> list[str]:
    return [m[1] for m in STEP_LINE.finditer(log.read_text())]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / 'results.json').read_text())      # also: valid JSON


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob('*')) if p.is_file()}


def exit_code(fn, *args) -> int:
    with pytest.raises(SystemExit) as info:
        fn(*args)
    return info.value.code


# ---- 1, 2: interrupted runs resume where their checkpoint says ---------------------------------------

INTERRUPTED = ['epochs=2', 'max_iters_per_epoch=6']
# name -> (extra overrides, log line to wait for, signal then sent)
INTERRUPTIONS = {
    'kill': (['checkpoint_minutes=0.0001'], r'checkpoint at epoch 0 iteration 3 ', signal.SIGKILL),
    'term': (['checkpoint_minutes=0'], r'epoch 0 iter 2/6', signal.SIGTERM),
}


@pytest.fixture(scope='module')
def interrupted(toy, tmp_path_factory) -> dict[str, dict]:
    """Two `python unimatch_v2.py` runs started together (their ~10 s start-ups overlap), each
    signalled once its log shows the line of INTERRUPTIONS; name -> run_dir, argv, exit code, output."""
    runs = {}
    for name, (extra, pattern, sig) in INTERRUPTIONS.items():
        base = tmp_path_factory.mktemp(name)
        argv = train_argv(toy, base / 'run', INTERRUPTED + extra)
        runs[name] = {'run_dir': base / 'run', 'argv': argv, 'out': base / 'stdout.txt',
                      'pattern': pattern, 'signal': sig}
        runs[name]['proc'] = launch(argv, runs[name]['out'])
    try:
        waiting, deadline = set(runs), time.monotonic() + HANG_TIMEOUT_S
        while waiting and time.monotonic() < deadline:
            for name in sorted(waiting):
                r, log = runs[name], runs[name]['run_dir'] / 'train.log'
                if log.exists() and re.search(r['pattern'], log.read_text()):
                    r['proc'].send_signal(r['signal'])
                    waiting.discard(name)
                elif r['proc'].poll() is not None:
                    pytest.fail(f'{name}: training exited with {r["proc"].returncode} before logging '
                                f'{r["pattern"]!r}:\n' + r['out'].read_text()[-3000:])
            time.sleep(0.02)
        assert not waiting, f'{waiting}: no such log line after {HANG_TIMEOUT_S} s'
        for r in runs.values():
            r['code'] = r['proc'].wait(timeout=HANG_TIMEOUT_S)
            r['output'] = r['out'].read_text()
    finally:
        for r in runs.values():
            if r['proc'].poll() is None:
                r['proc'].kill()
                r['proc'].wait()
    return runs


def test_kill9_mid_epoch_then_resume(interrupted):
    """SIGKILL gives no warning: the last timed checkpoint (written after every step here) is
    where the rerun starts; steps done after it are lost and redone, so the final weights'
    lineage has exactly epochs * iterations optimizer steps."""
    r = interrupted['kill']
    run_dir = r['run_dir']
    assert r['code'] == -signal.SIGKILL, r['output'][-3000:]
    ckpt = safe_load(run_dir / 'latest.pth')
    k = ckpt['iteration']
    assert ckpt['epoch'] == -1 and 3 <= k <= 6 and ckpt['global_step'] == k, (ckpt['epoch'], k)
    first = iterations(runs_in_log(run_dir / 'train.log')[0])
    assert first[:k] == [(0, i) for i in range(1, k + 1)]

    unimatch_v2.main(r['argv'])     # the same command, to completion
    res = results(run_dir)
    assert res['epochs'] == 2 and res['global_step'] == 2 * 6 and res['skipped_steps'] == 0
    second = runs_in_log(run_dir / 'train.log')[1]
    assert f'resumed from {run_dir / "latest.pth"} at epoch 0 iteration {k} (step {k})' in second
    assert iterations(second) == [(0, i) for i in range(k + 1, 7)] + [(1, i) for i in range(1, 7)]
    final = safe_load(run_dir / 'latest.pth')
    assert (final['epoch'], final['iteration'], final['global_step']) == (1, 0, 12)


def test_sigterm_checkpoints_and_resumes_mid_epoch(interrupted):
    """SIGTERM: the step in flight finishes, latest.pth is written at that iteration, exit 0; the
    rerun starts at the next iteration, none repeated or skipped."""
    r = interrupted['term']
    run_dir = r['run_dir']
    assert r['code'] == 0, r['output'][-3000:]
    log = (run_dir / 'train.log').read_text()
    saved = re.findall(r'checkpoint at epoch 0 iteration (\d+) \(step (\d+)\)', log)
    assert len(saved) == 1 and saved[0][0] == saved[0][1], saved    # only the preemption checkpoint
    k = int(saved[0][0])
    assert 'stopped on request: checkpoint saved, exiting' in log
    assert iterations(log) == [(0, i) for i in range(1, k + 1)]        # nothing after the checkpoint
    ckpt = safe_load(run_dir / 'latest.pth')
    assert (ckpt['epoch'], ckpt['iteration'], ckpt['global_step']) == (-1, k, k)
    assert k < 6, 'the signal arrived after epoch 0: no mid-epoch resume to test'

    unimatch_v2.main(r['argv'])
    second = runs_in_log(run_dir / 'train.log')[1]
    assert f'resumed from {run_dir / "latest.pth"} at epoch 0 iteration {k} (step {k})' in second
    assert iterations(second) == [(0, i) for i in range(k + 1, 7)] + [(1, i) for i in range(1, 7)]
    res = results(run_dir)
    assert res['epochs'] == 2 and res['global_step'] == 12 and [h['epoch'] for h in res['history']] == [0, 1]


# ---- 3: pickles that carry code are refused before any of it runs -----------------------------------

class _TouchOnUnpickle:
    """Unpickling this calls Path(target).touch(): harmless, and visible."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


@pytest.fixture
def booby_trap(tmp_path) -> tuple[Path, Path]:
    """(checkpoint, target): a checkpoint-shaped dict whose unpickling would create `target`."""
    target = tmp_path / 'pwned'
    path = tmp_path / 'trap' / 'latest.pth'
    path.parent.mkdir()
    torch.save({'model': {'head.weight': torch.zeros(1)}, 'epoch': 0, 'payload': _TouchOnUnpickle(target)}, path)
    yield path, target
    # The control: an unrestricted load does run the payload, so the refusals above meant something.
    assert not target.exists()
    torch.load(path, weights_only=False)
    assert target.exists()


def test_unsafe_checkpoint_refused_on_resume(toy, tmp_path, booby_trap, capsys):
    trap, target = booby_trap
    assert exit_code(unimatch_v2.main, train_argv(toy, trap.parent, ['epochs=1', 'max_iters_per_epoch=1'])) == 1
    err = capsys.readouterr().err
    assert f'error: refused to load {trap}' in err and not target.exists()
    assert 'getattr' in err          # the reason names the refused global (Path.touch is reached via getattr)


def test_unsafe_pretrained_refused(toy, tmp_path, booby_trap, capsys):
    trap, target = booby_trap
    argv = train_argv(toy, tmp_path / 'run', ['epochs=1', 'max_iters_per_epoch=1', f'pretrained={trap}'])
    assert exit_code(unimatch_v2.main, argv) == 1
    assert f'error: refused to load {trap}' in capsys.readouterr().err and not target.exists()


def test_unsafe_checkpoint_refused_by_evaluate(toy, booby_trap, capsys):
    trap, target = booby_trap
    argv = ['--config', CONFIG, '--checkpoint', str(trap), '--split', str(toy['splits'] / 'val.txt')] \
        + toy['overrides']
    with pytest.raises(SystemExit) as info:
        evaluate_script.main(argv)
    assert info.value.code == 1
    assert f'error: refused to load {trap}' in capsys.readouterr().err
    assert not target.exists()


# ---- 4: bad inputs are refused, naming split file, line and path, before the run dir is touched -------

@pytest.fixture(scope='module')
def baseline(toy, tmp_path_factory) -> dict:
    """A finished 1-epoch run whose files every bad-input launch must leave byte for byte. Its
    lists overlap (the first labeled image is also unlabeled): a warning, and the run proceeds."""
    base = tmp_path_factory.mktemp('baseline')
    labeled = (toy['splits'] / '1_16/labeled.txt').read_text().splitlines()
    unlabeled = (toy['splits'] / '1_16/unlabeled.txt').read_text().splitlines()
    (base / 'labeled.txt').write_text('\n'.join(labeled) + '\n')
    (base / 'unlabeled.txt').write_text('\n'.join(unlabeled + labeled[:1]) + '\n')
    run_dir = base / 'run'
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        unimatch_v2.main(['--config', CONFIG, '--labeled-id-path', str(base / 'labeled.txt'),
                          '--unlabeled-id-path', str(base / 'unlabeled.txt'), '--save-path', str(run_dir)]
                         + toy['overrides'] + ['epochs=1', 'max_iters_per_epoch=2'])
    return {'run_dir': run_dir, 'labeled': labeled, 'unlabeled': base / 'unlabeled.txt',
            'stdout': out.getvalue(), 'files': snapshot(run_dir)}


@pytest.fixture(scope='module')
def bad_files(toy) -> dict[str, str]:
    """Broken and odd files added to the toy data root, by name -> path relative to it."""
    data = toy['data']
    image = Image.open(data / 'images/train_00000.jpg')
    mask = np.array(Image.open(data / 'masks/train_00000.png'))
    jpeg = (data / 'images/train_00000.jpg').read_bytes()
    (data / 'images/truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    bad = mask.copy()
    bad[0, 0] = 7                                              # toy nclass = 6
    Image.fromarray(bad).save(data / 'masks/value7.png')
    Image.fromarray(mask).resize((mask.shape[1] + 3, mask.shape[0])).save(data / 'masks/wider.png')
    Image.fromarray(mask.astype(np.uint16)).save(data / 'masks/mask16.png')           # mode I;16
    Image.fromarray(np.asarray(image.convert('L')).astype(np.uint16) * 257).save(data / 'images/image16.png')
    image.convert('L').save(data / 'images/gray.jpg')
    image.convert('RGBA').save(data / 'images/rgba.png')
    assert Image.open(data / 'masks/mask16.png').mode.startswith('I')
    return {'truncated': 'images/truncated.jpg', 'value7': 'masks/value7.png', 'wider': 'masks/wider.png',
            'mask16': 'masks/mask16.png', 'image16': 'images/image16.png', 'gray': 'images/gray.jpg',
            'rgba': 'images/rgba.png'}


def launch_on(baseline, toy, tmp_path, capsys, labeled_lines: list[str], extra: list[str] = (),
              check_data: bool = False) -> tuple[int, str, Path]:
    """Run into the baseline's run dir with this labeled list; (exit code, stdout + stderr, list).
    Whatever happens, the baseline's files must be as they were."""
    labeled = tmp_path / 'labeled.txt'
    labeled.write_text(''.join(line + '\n' for line in labeled_lines))
    argv = (['--config', CONFIG, '--labeled-id-path', str(labeled), '--unlabeled-id-path', str(baseline['unlabeled']),
             '--save-path', str(baseline['run_dir'])] + (['--check-data'] if check_data else [])
            + toy['overrides'] + ['epochs=1', 'max_iters_per_epoch=2'] + list(extra))
    capsys.readouterr()
    code = exit_code(unimatch_v2.main, argv)
    captured = capsys.readouterr()
    assert snapshot(baseline['run_dir']) == baseline['files'], 'the run dir was touched'
    return code, captured.out + captured.err, labeled


def test_overlap_warns_but_run_proceeds(baseline):
    assert re.search(r'warning: \S+labeled.txt / \S+unlabeled.txt: 1 images are both labeled and unlabeled '
                     r'\(e.g. images/train_\d+\.jpg\)', baseline['stdout'])
    assert results(baseline['run_dir'])['epochs'] == 1


@pytest.mark.parametrize('check_data', [False, True], ids=['plain', 'check-data'])
def test_missing_image_refused(baseline, toy, tmp_path, capsys, check_data):
    lines = baseline['labeled'] + ['images/nowhere.jpg masks/train_00000.png']
    code, text, labeled = launch_on(baseline, toy, tmp_path, capsys, lines, check_data=check_data)
    assert code == 1
    assert f'error: {labeled}:3: missing file {toy["data"] / "images/nowhere.jpg"}' in text
    assert 'nothing was written' in text


def test_empty_split_refused(baseline, toy, tmp_path, capsys):
    code, text, labeled = launch_on(baseline, toy, tmp_path, capsys, [])
    assert code == 1 and f'{labeled}: split file is empty' in text


def test_duplicate_line_refused(baseline, toy, tmp_path, capsys):
    first = baseline['labeled'][0]
    code, text, labeled = launch_on(baseline, toy, tmp_path, capsys, baseline['labeled'] + [first])
    assert code == 1
    assert f'error: {labeled}:3: {first.split()[0]} is listed twice (first on line 1)' in text


def _pair(bad_files: dict, image: str | None = None, mask: str | None = None) -> str:
    return f'{bad_files[image] if image else "images/train_00000.jpg"} ' \
           f'{bad_files[mask] if mask else "masks/train_00000.png"}'


@pytest.mark.parametrize('image, mask, expected', [
    ('truncated', None, r'image \S+/images/truncated.jpg cannot be read: image file is truncated'),
    (None, 'value7', r'mask masks/value7.png has values \[7\] outside \[0, 6\) and 255'),
    (None, 'wider', r'mask masks/wider.png is (\d+)x(\d+) but image images/train_00000.jpg is (?!\1x)\d+x\2'),
    (None, 'mask16', r'mask masks/mask16.png has mode I;16; masks must be single-channel 8-bit PNGs'),
    ('image16', None, r'image images/image16.png has mode I;16 \(e.g. 16-bit\); only 8-bit RGB'),
], ids=['truncated-jpeg', 'mask-value', 'size-mismatch', '16-bit-mask', '16-bit-image'])
def test_bad_file_refused_by_check_data(baseline, toy, bad_files, tmp_path, capsys, image, mask, expected):
    lines = baseline['labeled'] + [_pair(bad_files, image, mask)]
    code, text, labeled = launch_on(baseline, toy, tmp_path, capsys, lines, check_data=True)
    assert code == 1
    assert re.search(f'error: {re.escape(str(labeled))}:3: {expected}', text), text


@pytest.mark.parametrize('image, mode', [('gray', 'gray (L)'), ('rgba', 'RGBA (RGBA)')])
def test_gray_and_rgba_accepted_with_warning(baseline, toy, bad_files, tmp_path, capsys, image, mode):
    lines = baseline['labeled'] + [_pair(bad_files, image)]
    code, text, labeled = launch_on(baseline, toy, tmp_path, capsys, lines, check_data=True)
    assert code == 0
    assert f'warning: {labeled}:3: image {bad_files[image]} is {mode}; it is converted to RGB' in text
    assert 'no errors' in text


@pytest.mark.parametrize('override, expected', [
    ('no_such_key=1', "command line: no_such_key=1: unknown config key 'no_such_key'"),
    ('epochs=two', "config key 'epochs': expected int, got str 'two'"),
])
def test_bad_config_refused(baseline, toy, tmp_path, capsys, override, expected):
    code, text, _ = launch_on(baseline, toy, tmp_path, capsys, baseline['labeled'], [override])
    assert code == 1 and 'error: ' in text and expected in text


def test_check_data_on_clean_dataset(toy, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    assert exit_code(unimatch_v2.main, ['--check-data'] + train_argv(toy, run_dir, [])) == 0
    out = capsys.readouterr().out
    assert 'no errors' in out and 'warning' not in out and 'error:' not in out
    assert not run_dir.exists()


# ---- 5: a non-finite loss stops the run (checkpoint untouched) or skips the step ---------------------

def nan_on_call(monkeypatch, n: int) -> None:
    """The n-th masked unlabeled loss (UniMatch V2: two per step, one per strong view) is NaN."""
    real, calls = methods.step.masked_unlabeled_loss, itertools.count(1)

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float('nan') if next(calls) == n else loss
    monkeypatch.setattr(methods.step, 'masked_unlabeled_loss', poisoned)


def test_nonfinite_loss_stops_and_keeps_checkpoint(toy, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / 'run'
    unimatch_v2.main(train_argv(toy, run_dir, ['epochs=1', 'max_iters_per_epoch=3']))
    kept = {name: (run_dir / name).read_bytes() for name in ('latest.pth', 'best.pth', 'results.json')}

    nan_on_call(monkeypatch, 3)            # epoch 1, its second step, first strong view
    capsys.readouterr()
    argv = train_argv(toy, run_dir, ['epochs=2', 'max_iters_per_epoch=3', 'on_nonfinite=stop'])
    assert exit_code(unimatch_v2.main, argv) == 1
    assert 'error: non-finite loss at epoch 1 iteration 1 (step 4)' in capsys.readouterr().err
    line = next(l for l in (run_dir / 'train.log').read_text().splitlines() if 'non-finite' in l)
    assert 'epoch 1 iteration 1 (step 4)' in line and 'stopping' in line
    for term in ('loss', 'loss_x', 'loss_s1', 'loss_s2', 'loss_u', 'mask_ratio'):
        assert re.search(rf'\b{term}=', line), (term, line)
    assert 'loss_s1=nan' in line and 'loss=nan' in line
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_nonfinite_loss_skipped(toy, tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    nan_on_call(monkeypatch, 4)            # epoch 0, second step, second strong view
    unimatch_v2.main(train_argv(toy, run_dir, ['epochs=1', 'max_iters_per_epoch=3', 'on_nonfinite=skip']))
    res = results(run_dir)
    assert res['skipped_steps'] == 1 and res['global_step'] == 3 - 1 and res['epochs'] == 1
    log = (run_dir / 'train.log').read_text()
    assert re.search(r'non-finite loss at epoch 0 iteration 1 \(step 1\): .*loss_s2=nan.* -- step skipped', log)
    assert iterations(log) == [(0, 1), (0, 3)]
    ckpt = safe_load(run_dir / 'latest.pth')
    assert ckpt['skipped_steps'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


# ---- 6: the same seed gives the same run --------------------------------------------------------------

def short_run(toy, run_dir: Path, *extra: str) -> tuple[list[str], dict]:
    unimatch_v2.main(train_argv(toy, run_dir, ['epochs=1', 'max_iters_per_epoch=3', *extra]))
    return step_lines(run_dir / 'train.log'), safe_load(run_dir / 'latest.pth')


# Bit for bit on the CPU, where these run even beside a GPU. On CUDA the bilinear resizes' backward
# adds with atomics, in no fixed order: tests/test_cuda.py checks that two such runs agree to rounding.
cpu_only = pytest.mark.usefixtures('on_the_cpu')


@cpu_only
def test_same_seed_same_run(toy, tmp_path):
    losses_a, ckpt_a = short_run(toy, tmp_path / 'a', 'seed=3')
    losses_b, ckpt_b = short_run(toy, tmp_path / 'b', 'seed=3')
    assert len(losses_a) == 3 and losses_a == losses_b
    for part in ('model', 'model_ema'):
        assert ckpt_a[part].keys() == ckpt_b[part].keys()
        assert all(torch.equal(ckpt_a[part][k], ckpt_b[part][k]) for k in ckpt_a[part]), part
    losses_c, _ = short_run(toy, tmp_path / 'c', 'seed=4')
    assert len(losses_c) == 3 and losses_c != losses_a


@cpu_only
def test_same_seed_same_run_with_workers(toy, tmp_path):
    """DataLoader workers draw their augmentations from per-worker seeds derived from the run's."""
    losses_a, ckpt_a = short_run(toy, tmp_path / 'a', 'num_workers=2')
    losses_b, ckpt_b = short_run(toy, tmp_path / 'b', 'num_workers=2')
    assert len(losses_a) == 3 and losses_a == losses_b
    assert all(torch.equal(ckpt_a['model'][k], ckpt_b['model'][k]) for k in ckpt_a['model'])


# ---- 7: a failed write leaves the previous file and no temporary file --------------------------------

class _BreaksAfter:
    """A file object that passes `limit` bytes through, then raises (a full disk, a kill)."""

    def __init__(self, f, limit: int, exc: BaseException):
        self.f, self.left, self.exc = f, limit, exc

    def write(self, data) -> int:
        if len(data) > self.left:
            self.f.write(bytes(data[:self.left]))
            self.left = 0
            raise self.exc
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize('exc', [OSError(28, 'No space left on device'), KeyboardInterrupt()],
                         ids=['disk-full', 'interrupt'])
def test_save_atomic_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / 'latest.pth'
    save_atomic({'w': torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save
    broken = []

    def breaking_save(obj, f, *args, **kwargs):
        broken.append(_BreaksAfter(f, 4096, exc))
        real_save(obj, broken[-1], *args, **kwargs)
    monkeypatch.setattr(torch, 'save', breaking_save)
    with pytest.raises(BaseException):      # torch re-raises a writer's error as RuntimeError
        save_atomic({'w': torch.zeros(100_000)}, path)      # 400 kB: breaks part-way
    assert broken and broken[0].left == 0       # 4096 bytes went to the (temporary) file first
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['latest.pth']
    monkeypatch.undo()
    assert torch.equal(safe_load(path)['w'], torch.arange(4.0))


def test_write_text_atomic_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'results.json'
    write_text_atomic('{"epochs": 1}\n', path)

    def failing_fsync(fd):
        raise OSError(5, 'Input/output error')
    monkeypatch.setattr(os, 'fsync', failing_fsync)
    with pytest.raises(OSError):
        write_text_atomic('{"epochs": 2}\n', path)
    assert path.read_text() == '{"epochs": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ['results.json']
