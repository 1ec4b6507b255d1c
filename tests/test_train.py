"""End to end: each entry script trains a few iterations on a small generated toy set, writes
latest.pth / best.pth / results.json, and resumes from them; scripts/train.sh under torchrun with two
CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import supervised
import unimatch_v2
from tests.launch import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
# `toy` (fast training overrides on a tiny generated toy set) comes from conftest.py.


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / 'results.json').read_text())


@pytest.mark.parametrize('method', ['unimatch_v2', 'fixmatch', 'unimatch_v1'])
def test_semi_methods_train_and_resume(toy, tmp_path, method):
    run_dir = tmp_path / method
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    unimatch_v2.main(args + toy + ['epochs=1', f'method={method}'])
    res = results(run_dir)
    assert res['epochs'] == 1 and res['method'] == method
    assert res['miou_ema'] is not None and len(res['miou_ema']) == 1
    assert 0.0 <= res['best_miou_ema'] <= 100.0
    assert 50 < res['history'][0]['peak_mem_mib'] < 24 * 1024   # the process's peak RSS, MiB
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['model_ema'] is not None and ckpt['config']['method'] == method
    assert (run_dir / 'best.pth').exists()

    # A second launch with more epochs resumes after epoch 0 instead of starting over.
    unimatch_v2.main(args + toy + ['epochs=2', f'method={method}'])
    res = results(run_dir)
    assert res['epochs'] == 2 and [h['epoch'] for h in res['history']] == [0, 1]
    assert 'resumed from' in (run_dir / 'train.log').read_text()


def test_supervised_trains_and_resumes(toy, tmp_path):
    run_dir = tmp_path / 'sup'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    supervised.main(args + toy + ['epochs=1'])
    res = results(run_dir)
    assert res['epochs'] == 1 and res['method'] == 'supervised'
    assert res['miou_ema'] is None and res['best_miou_ema'] is None and res['final_miou'] is not None
    supervised.main(args + toy + ['epochs=2'])
    assert results(run_dir)['epochs'] == 2


def test_original_flags(toy, tmp_path):
    splits = Path(next(a for a in toy if a.startswith('splits_root=')).split('=', 1)[1]) / 'toy'
    run_dir = tmp_path / 'flags'
    unimatch_v2.main(['--config', str(ROOT / 'configs/toy.yaml'), '--labeled-id-path', str(splits / '1_8/labeled.txt'),
                      '--unlabeled-id-path', str(splits / '1_8/unlabeled.txt'), '--save-path', str(run_dir)]
                     + toy + ['epochs=1'])
    assert results(run_dir)['epochs'] == 1


def test_resume_refuses_other_class_count(toy, tmp_path, capsys):
    run_dir = tmp_path / 'mismatch'
    args = ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
    supervised.main(args + toy + ['epochs=1'])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix in ('.pth', '.json', '.yaml')}
    with pytest.raises(SystemExit) as exit_info:
        supervised.main(args + toy + ['epochs=2', 'nclass=7'])
    assert exit_info.value.code == 1
    assert 'trained with nclass=6 but the config has nclass=7' in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix in ('.pth', '.json', '.yaml')}
    assert after == before


def test_train_sh_two_processes(toy, tmp_path):
    """scripts/train.sh launches torchrun with 2 CPU processes (gloo) and both take part."""
    env = {**os.environ, 'EXP_DIR': str(tmp_path / 'exp'), 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    proc = subprocess.run(['sh', 'scripts/train.sh', 'toy', '1_16', 'unimatch_v2', '2'] + toy + ['epochs=1'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / 'exp/toy/unimatch_v2/dinov2_tiny/1_16'
    assert '2 process(es) on cpu' in proc.stdout
    res = results(run_dir)
    assert res['epochs'] == 1 and (run_dir / 'out.log').exists()


def test_train_sh_fails_loudly(tmp_path):
    env = {**os.environ, 'EXP_DIR': str(tmp_path / 'exp')}
    proc = subprocess.run(['sh', 'scripts/train.sh', 'toy', '1_16', 'unimatch_v2', '1', 'no_such_key=1'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode != 0
    assert 'no_such_key' in proc.stdout + proc.stderr


def test_train_sh_passes_on_the_exit_status_of_a_failed_run(tmp_path):
    """The run itself fails (no data under data_root): train.sh exits with torchrun's status."""
    env = {**os.environ, 'EXP_DIR': str(tmp_path / 'exp'), 'CUDA_VISIBLE_DEVICES': ''}
    proc = subprocess.run(['sh', 'scripts/train.sh', 'pascal', '92', 'unimatch_v2', '1',
                           f'data_root={tmp_path / "missing"}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'missing' in proc.stdout and 'Illegal number' not in proc.stderr
    run_dir = tmp_path / 'exp/pascal/unimatch_v2/dinov2_small/92'
    assert not run_dir.exists() or not any(run_dir.iterdir())   # refused before it wrote anything


@pytest.mark.parametrize('omp, workers, cpus, threads', [(None, 1, 2, 1), (None, 0, 2, 2), (None, 3, 2, 1),
                                                        ('2', 1, 2, None)])
def test_cpu_threads_leave_cores_to_data_workers(monkeypatch, omp, workers, cpus, threads):
    import engine.data
    from engine.config import Config
    if omp is None:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    else:
        monkeypatch.setenv('OMP_NUM_THREADS', omp)
    monkeypatch.setattr(engine.data, 'cpus_per_process', lambda: cpus)
    before = torch.get_num_threads()
    try:
        engine.data.size_cpu_threads(Config(num_workers=workers))
        assert torch.get_num_threads() == (before if threads is None else threads)   # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_more_processes_than_gpus_is_an_error(monkeypatch):
    """A second process on a one-GPU node fails at once, saying why (not CUDA's 'invalid device ordinal')."""
    from util import dist
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(RuntimeError, match='process 1 of this node has no GPU: 1 visible'):
        dist.setup()
