"""ONNX export of a CoAtNet (kept out of the model file, as timm keeps its in timm/utils/onnx.py): the cells
MindSpore 2.10 cannot convert swapped for equivalents it can (``prepare_for_export``), and the op renaming
that makes the written file compute exact GELU (``rename_onnx_ops``). MINDIR and AIR keep the model's own ops."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from src.coatnet import GELU, LayerNorm2d

__all__ = ["ERF_STANDIN_OP", "ExportGELU", "ExportLayerNorm2d", "prepare_for_export", "onnx_package", "rename_onnx_ops"]

# MindSpore 2.10 has no ONNX converter for Erf. For ONNX, ExportGELU writes this op in Erf's place and
# export.py renames it in the written file. onnxruntime fuses Div(x, sqrt 2) -> Erf -> +1 -> *x -> *0.5
# (that form: with Mul by 1/sqrt 2 it does not) into one Gelu kernel; an erf-free formulation (Abramowitz &
# Stegun 7.1.26) was ~20 element-wise nodes per activation, 55 % of the exported CoAtNet-0's onnxruntime time.
# Log never occurs in the model otherwise, and export.py checks the count.
ERF_STANDIN_OP = "Log"


class ExportGELU(nn.Cell):
    """GELU written with ops MindSpore 2.10's ONNX exporter converts.

    ``approximate="tanh"`` (MindSpore's ``nn.GELU()``, the original network): 0.5 x (1 + tanh(u)), u =
    sqrt(2/pi) (x + 0.044715 x^3), written as x sigmoid(2u), which converts as is (MindSpore 2.10's CPU
    Tanh is ~1e-4 off near |u| = 5; its Sigmoid is not). The exact form (``"none"``):

    0.5 x (1 + erf(x / sqrt 2)) with ``ERF_STANDIN_OP`` in place of erf: the graph computes GELU
    once the stand-in is renamed to Erf in the ONNX file (``rename_onnx_ops``), not before.
    """

    def __init__(self, approximate: str = "none"):
        super().__init__(auto_prefix=False)
        self.tanh_form = approximate == "tanh"

    def construct(self, x):
        if self.tanh_form:
            return x * ops.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        # ops.div, not `x / ...`-style scalar forms: they can become Reciprocal, which has no converter either.
        return x * (1.0 + ops.log(ops.div(x, 1.4142135623730951))) * 0.5


class ExportLayerNorm2d(nn.Cell):
    """LayerNorm2d with 1 / sqrt instead of Rsqrt (no ONNX converter); shares the original's
    gamma / beta, whose names are kept (``auto_prefix=False``)."""

    def __init__(self, norm: LayerNorm2d):
        super().__init__(auto_prefix=False)
        self.eps = norm.eps
        self.gamma = norm.gamma
        self.beta = norm.beta

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        mean = x.mean(axis=1, keep_dims=True)
        xc = x - mean
        var = (xc * xc).mean(axis=1, keep_dims=True)
        y = xc / ops.sqrt(var + self.eps)
        y = y * self.gamma.reshape(1, -1, 1, 1) + self.beta.reshape(1, -1, 1, 1)
        return y.astype(dtype)


def prepare_for_export(net: nn.Cell) -> int:
    """Swap, in place, the cells MindSpore 2.10 cannot export to ONNX for equivalents it can: GELU
    (no converter for Erf: see ``ExportGELU``) and LayerNorm2d (none for Rsqrt). Every other op of the
    model (Conv, BatchNorm, 2x2 AvgPool, ReduceMean, Gather by a constant index, MatMul, Softmax, Split,
    Transpose, Cast, Sigmoid, Tanh) converts as is.
    Only for ONNX: MINDIR keeps the exact ops.

    Parameters stay the same objects under the same names, so weights load before or after. Swap
    before the network's first graph-mode call: a graph compiled earlier keeps the old cells
    (``mindspore.export`` compiles its own graph and sees the new ones). Returns the number of exact
    GELUs, each written with one ``ERF_STANDIN_OP``; tanh GELUs need no stand-in."""
    swaps = []
    for _, parent in net.cells_and_names():
        for child_name, child in parent.name_cells().items():
            if isinstance(child, GELU):
                swaps.append((parent, child_name, ExportGELU(child.approximate)))
            elif isinstance(child, LayerNorm2d):
                swaps.append((parent, child_name, ExportLayerNorm2d(child)))
    for parent, child_name, cell in swaps:
        # insert_child_to_cell, unlike attribute assignment, does not re-prefix parameter names.
        parent.insert_child_to_cell(child_name, cell)
    return sum(isinstance(cell, ExportGELU) and not cell.tanh_form for _, _, cell in swaps)


def onnx_package():
    """The onnx package: only ONNX export needs it (requirements.txt), so it is imported here."""
    try:
        import onnx
    except ImportError:
        raise ValueError("--file_format=ONNX needs the onnx package: pip install onnx==1.19.1 (as in "
                         "requirements.txt); MINDIR export does not") from None
    return onnx


def rename_onnx_ops(path: str, old: str, new: str) -> int:
    """Rename every ``old`` node of the default ONNX domain in the file at ``path`` to ``new``, in place;
    returns how many. The stand-in and ``Erf`` are both ops of the default domain, so only ``op_type``
    changes; a node of another domain of the same name is another op and stays."""
    onnx = onnx_package()
    model = onnx.load(path)
    count = 0
    for node in model.graph.node:
        if node.op_type == old and node.domain in ("", "ai.onnx"):
            node.op_type = new
            count += 1
    onnx.save(model, path)
    return count
