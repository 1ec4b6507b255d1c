"""What the tests that launch a script or a process share (PATH: conftest.py's interpreter_first_on_path)."""

# A guard against a launch that hangs, not a speed check: on a loaded 2-core machine a dry run of
# scripts/reproduce.sh took over 60 s, and a run stopped by a signal minutes to save and exit.
HANG_TIMEOUT_S = 900
