"""The suite runs on any machine: scripts it launches run the interpreter that runs the tests
(conftest.py's `interpreter_first_on_path`), whether or not a virtual environment is activated.

    PATH=/usr/bin:/bin /path/to/venv/bin/python -m pytest -q tests
"""
from __future__ import annotations

import os
import subprocess
import sys


def test_a_launched_scripts_bare_python_is_the_running_interpreter():
    """What scripts/*.sh do: call `python` (and `torchrun`) by name."""
    out = subprocess.run(['sh', '-c', 'python -c "import sys; print(sys.prefix)"; command -v torchrun'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == sys.prefix
    assert os.path.dirname(out[1]) == os.path.dirname(sys.executable)
