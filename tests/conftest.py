"""Shared test setup: repository root on sys.path, and oneDNN's ISA for the test process.

The test process builds stock-op and fused models in any order, so it runs oneDNN capped at AVX2 (the
suite's default, which ``src.kernels.use_fused_kernels`` would otherwise lift for the first fused model):
the cap is read by oneDNN at its first primitive, made here. The variable is then removed, so that the
scripts the tests start (train.py, eval.py, msrun ...) see the suite's own default, as a user's run does."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import src  # noqa: E402  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)


def _fix_onednn_isa_for_this_process() -> None:
    import mindspore as ms
    import numpy as np

    user_value = None if src._ISA_CAP_IS_OURS else os.environ["ONEDNN_MAX_CPU_ISA"]
    src._ISA_CAP_IS_OURS = False  # nothing in this process changes the variable any more
    one = ms.Tensor(np.ones((1, 1, 1, 1), np.float32))
    ms.ops.conv2d(one, one).asnumpy()  # oneDNN's first primitive: its ISA is fixed from here on
    if user_value is None:
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)


_fix_onednn_isa_for_this_process()
