"""Shared test setup: repository root on sys.path and the CPU ISA default before MindSpore loads."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import src  # noqa: F401,E402  (sets ONEDNN_MAX_CPU_ISA before any test imports mindspore)
