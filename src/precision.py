"""Mixed precision: which cells of a CoAtNet compute in float16 (or bfloat16), in one function.

``amp_level`` (config key; ``""`` resolves at config load to ``O0`` on CPU and ``original`` on GPU/Ascend):

- ``O0``: float32 throughout.
- ``original``: the original MindSpore CoAtNet's scheme (its train.py: ``net.to_float(float16)``, then
  ``nn.BatchNorm2d``, ``nn.LayerNorm``, ``nn.Softmax``, ``nn.GELU``, ``nn.Tanh`` and ``nn.Sigmoid`` kept
  in float32, the loss in float32). Here those are our cells of the same function: ``BatchNormAct2d``
  (BatchNorm with its activation, GELU in that network), ``LayerNorm2d``, ``Softmax``, ``GELU``,
  ``nn.Tanh`` and ``nn.Sigmoid`` (the SE gate); its Swish was ``x * nn.Sigmoid()(x)``, so ``nn.SiLU``
  stays float32 too.
- ``O2``: MindSpore's O2: float16 but for MindSpore's black list (BatchNorm, ``nn.LayerNorm``).
- ``O3``: MindSpore's O3: every cell float16.
- ``O1`` (MindSpore's white list by network rewrite) is refused at config load: MindSpore 2.10's rewrite
  cannot rebuild this network (see below).

At every float16 level two cells the model computes in float32 by design stay float32 (both workarounds
below): ``LayerNorm2d`` (statistics in float32) and ``BatchBroadcastAdd`` (the relative-position bias
added to float32 attention scores). The network's output and the loss are float32, the parameters (so
the checkpoints) float32 under their own names; cells kept in float32 hand float16 on to the next.

MindSpore 2.10 workarounds, listed here once:

- A cell with its own ``bprop`` under ``to_float`` returns its inputs' gradients in the dtype it computes
  in, not in the dtype the inputs arrived in, while the compiler believes the latter, so a later ``Cast``
  to float32 is dropped as a no-op. ``BatchBroadcastAdd`` in float16 (given the float32 attention scores)
  so hands the relative-position tables float16 gradients: "For Stack, all types should be same" at the
  train step's gradient norm, which no cast there can fix. Where such a mismatch meets an explicit cast
  (the float32 ``Softmax`` of ``original`` after the bias add's float16 output) the dtype is restored; at
  every level all gradients are float32 (the train-step tests would stop at that Stack otherwise). Test
  that fails once MindSpore fixes it:
  ``tests/test_precision.py::test_mindspore_custom_bprop_gradient_dtype_bug_is_still_there``.
- In PyNative mode ``to_float(float16)`` casts the inputs of every operator inside the cell, so a cell's
  own ``astype(float32)`` does not hold (in graph mode it does): ``LayerNorm2d`` at O3 then normalises in
  float16 and every gradient is NaN at any loss scale. Test that fails once that changes:
  ``tests/test_precision.py::test_mindspore_pynative_to_float_still_overrides_casts_inside_a_cell``.
- ``O1``: the rewrite mishandles subclasses of ``nn.Conv2d`` (``DepthwiseConv2d``, ``Conv3x3``,
  ``StridedConv1x1``, ``Conv1x1``): it emits classes built on a ``Conv2dOpt`` (or a ``ConvMlpOpt`` holding
  them) that it declares with the wrong signature or not at all ("TypeError: ConvMlpOpt.__init__() takes 1
  positional argument but 2 were given", before these cells "NameError: name 'Conv2dOpt' is not defined"),
  after writing a ``rewritten_network/`` folder into the working directory. Test that fails once
  MindSpore fixes it: ``tests/test_precision.py::test_mindspore_o1_rewrite_still_fails_on_this_network``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

from src import set_cpu_isa_cap
from src.coatnet import GELU, BatchBroadcastAdd, BatchNormAct2d, LayerNorm2d, Softmax

__all__ = ["AMP_LEVELS", "FLOAT32_CELLS", "apply_precision"]

# Float32 at every float16 level, as the model computes them (the module docstring says why).
_ALWAYS_FLOAT32 = (LayerNorm2d, BatchBroadcastAdd)

#: Cells computing in float32 per level (a kept cell's sub-cells are float32 with it).
FLOAT32_CELLS: dict[str, tuple[type[nn.Cell], ...]] = {
    "original": (*ms.amp.get_black_list(), BatchNormAct2d, Softmax, nn.Softmax, GELU, nn.GELU, nn.Tanh,
                 nn.Sigmoid, nn.SiLU, *_ALWAYS_FLOAT32),
    "O2": (*ms.amp.get_black_list(), *_ALWAYS_FLOAT32),
    "O3": _ALWAYS_FLOAT32,
}

#: The levels ``apply_precision`` implements.
AMP_LEVELS = ("O0", *FLOAT32_CELLS)

_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16}


def apply_precision(net: nn.Cell, amp_level: str, amp_dtype: str = "float16") -> nn.Cell:
    """``net`` set up to compute at ``amp_level`` in ``amp_dtype`` (``"float16"`` | ``"bfloat16"``); see
    the module docstring. Returns ``net`` itself for O0, else a wrapper whose output is float32; ``net``
    is changed in place (its float32 cells are swapped for wrappers that cast their output back), its
    parameters stay the same objects with the same names. Call once, before the first graph compile."""
    if amp_level == "O0":
        return net
    if amp_level not in FLOAT32_CELLS:
        raise ValueError(f"amp_level {amp_level!r} is not one of {', '.join(AMP_LEVELS)}")
    if amp_dtype not in _DTYPES:
        raise ValueError(f"amp_dtype {amp_dtype!r} is not one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[amp_dtype]
    net.to_float(dtype)
    _keep_float32(net, FLOAT32_CELLS[amp_level], dtype)
    set_cpu_isa_cap(True)  # the fused CPU kernels take float32 only: float16 convolutions are MindSpore's
    return _CastOutput(net, ms.float32)


class _CastOutput(nn.Cell):
    """``cell`` with its output cast to ``dtype``; parameter names unchanged (``auto_prefix=False``)."""

    def __init__(self, cell: nn.Cell, dtype):
        super().__init__(auto_prefix=False)
        self.cell = cell
        self.dtype = dtype

    def construct(self, *args):
        return self.cell(*args).astype(self.dtype)


def _keep_float32(parent: nn.Cell, kinds: tuple, dtype) -> None:
    """Swap every cell of ``kinds`` below ``parent`` for itself in float32 with a ``dtype`` output.

    MindSpore's ``custom_mixed_precision(black_list=...)`` does the same but warns on every O3 run that
    its norms left its internal black list; this is its mechanism (to_float per cell, output cast back)."""
    for name, child in parent.name_cells().items():
        if isinstance(child, kinds):
            parent.insert_child_to_cell(name, _CastOutput(child.to_float(ms.float32), dtype))
        else:
            _keep_float32(child, kinds, dtype)
    if isinstance(parent, nn.SequentialCell):  # it runs its own list of cells
        parent.cell_list = list(parent.cells())
