"""Fault injection for the crash-safety tests, and nothing else: with ``COATNET_FAULT_SAVE_PAUSE=<seconds>`` a
checkpoint write stops between "written" and "renamed" (the window a kill must not turn into a half-written
checkpoint under its final name), saying so on stderr, so tests/test_resume.py can kill the process there.
Unset in normal runs, where it costs one environment lookup per checkpoint."""
import os
import sys
import time

__all__ = ["pause_before_rename"]


def pause_before_rename(path: str) -> None:
    pause = os.environ.get("COATNET_FAULT_SAVE_PAUSE")
    if pause and path.endswith(".ckpt"):
        print(f"fault-injection: pausing before renaming {path}", file=sys.stderr, flush=True)
        time.sleep(float(pause))
