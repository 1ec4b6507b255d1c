"""`precision: auto`, the default: bf16 where the device multiplies bf16 matrices in hardware, fp32
where it would emulate them (on an AVX2-only AMD EPYC the toy's bf16 step took 6x the fp32 one:
docs/speed.md). Checked against the CPU's own flags on whatever machine runs the suite, and for
each kind of device with the hardware queries replaced."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unimatch_v2
from engine.config import Config, fused_attention
from tests.test_robustness import toy, train_argv  # noqa: F401 (toy is a fixture)
from util.checkpoint import safe_load
from util.precision import Precision, resolve_precision

CPUINFO = Path('/proc/cpuinfo')


def cpu_flags() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        if line.startswith('flags'):
            return set(line.split(':', 1)[1].split())
    return set()


@pytest.mark.skipif(not CPUINFO.exists(), reason='needs /proc/cpuinfo (Linux) to read the CPU flags')
def test_auto_on_this_cpu_follows_its_bf16_instructions():
    flags = cpu_flags()
    native = bool(flags & {'amx_bf16', 'avx512_bf16'})
    assert resolve_precision('auto', torch.device('cpu')) == ('bf16' if native else 'fp32'), sorted(flags)


@pytest.mark.parametrize('amx, avx512_bf16, expected', [
    (True, False, 'bf16'), (False, True, 'bf16'), (True, True, 'bf16'), (False, False, 'fp32')])
def test_auto_on_a_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    assert resolve_precision('auto', 'cpu') == expected
    assert Precision('auto', torch.device('cpu')).name == expected
    # the CPU's attention path follows the precision taken: math attention only for bf16
    assert fused_attention(Config(precision='auto'), 'cpu') is (expected == 'fp32')


@pytest.mark.parametrize('supported, expected', [(True, 'bf16'), (False, 'fp32')])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: supported)
    assert resolve_precision('auto', torch.device('cuda', 0)) == expected


@pytest.mark.parametrize('name', ['bf16', 'fp16', 'fp32'])
def test_a_named_precision_is_kept_on_any_device(monkeypatch, name):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    assert resolve_precision(name, 'cpu') == name and Precision(name, torch.device('cpu')).name == name


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        Precision('fp8', torch.device('cpu'))


def test_a_run_logs_and_saves_the_precision_it_took(toy, tmp_path):  # noqa: F811 (the toy fixture)
    """The default config says auto; the run names what auto became on this machine, in its first
    log line and in its checkpoint's config (what a resume elsewhere is checked against)."""
    taken = resolve_precision('auto', 'cpu')
    unimatch_v2.main(train_argv(toy, tmp_path, ['epochs=1', 'max_iters_per_epoch=1']))
    first = (tmp_path / 'train.log').read_text().splitlines()[0]
    assert first.endswith(f'1 process(es) on cpu, precision {taken}'), first
    assert safe_load(tmp_path / 'latest.pth')['config']['precision'] == taken


def test_a_resume_on_hardware_that_takes_the_other_precision_is_refused(  # noqa: F811 (the toy fixture)
        toy, tmp_path, monkeypatch, capsys):
    """A bf16 run resumed where auto means fp32 would change what it computes: refused, naming the
    key; `precision=bf16` resumes it as it was trained."""
    argv = train_argv(toy, tmp_path, ['epochs=1', 'max_iters_per_epoch=1'])
    unimatch_v2.main(argv + ['precision=bf16'])
    saved = (tmp_path / 'latest.pth').read_bytes()
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    with pytest.raises(SystemExit) as stop:
        unimatch_v2.main(argv[:-2] + ['epochs=2', 'max_iters_per_epoch=1'])
    assert stop.value.code == 1
    assert "precision: 'bf16' -> 'fp32'" in capsys.readouterr().err
    assert (tmp_path / 'latest.pth').read_bytes() == saved        # nothing on disk touched
    unimatch_v2.main(argv[:-2] + ['epochs=2', 'max_iters_per_epoch=1', 'precision=bf16'])
    assert safe_load(tmp_path / 'latest.pth')['epoch'] == 1
