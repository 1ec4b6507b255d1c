"""What the tests that launch a script or a process share (PATH: conftest.py's interpreter_first_on_path)."""

# A guard against a launch that hangs, not a speed check: on a loaded 2-core machine a dry run of
# scripts/reproduce.sh took over 60 s, and a run stopped by a signal minutes to save and exit.
HANG_TIMEOUT_S = 900


def run_as_documented(command: str, cwd, doc, timeout_s: float):
    """A command a docs page shows (`doc`: it must still show it), run from `cwd` as from a
    checkout: `python <script> ...` with the script from the repository; it must exit 0."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    assert command in Path(doc).read_text(), f'the page no longer shows: {command}'
    python, script, *rest = shlex.split(command)
    assert python == 'python'
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / script), *rest], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, f'{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}'
    return out
