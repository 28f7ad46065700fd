"""Fused CPU kernels, compiled from the C++ sources next to this file when first asked for.

A model is built with MindSpore's own ops (``src.coatnet.create_model`` compiles nothing);
``use_fused_kernels(net)`` swaps these kernels into the cells that have one (GELU, LayerNorm2d,
BatchNormAct2d, DepthwiseConv2d, Conv3x3, StridedConv1x1, AvgPool2x2, ChannelGate, Softmax, Attention2d), and
``use_stock_ops(net)`` swaps them out again.

Every getter has one shape: it returns one MindSpore ``Custom`` op (func_type "aot"), or None when the
kernel cannot or should not be used: the device target is not CPU, ``COATNET_CPU_KERNELS=0`` is set, or
no C++ compiler builds it (then a warning says why and the model keeps MindSpore's ops). A forward op
carries its gradient (``bprop``), so it differentiates as the stock op it replaces; ``channel_gate_grad``
and ``softmax_grad`` are gradients alone, for the two cells whose stock path needs a hand-written
``bprop`` too (a cell's ``bprop`` replaces everything inside it). The ops take float32 tensors; the
cells call them only on float32 inputs. Results equal the stock ops' within float32 rounding
(tests/test_kernels.py).

GELU comes in the two forms of ``ops.gelu``: exact (``gelu("none")``, ``batchnorm_*("gelu")``) and the
tanh approximation that MindSpore's ``nn.GELU()`` computes (``gelu("tanh")``, ``batchnorm_*("gelu_tanh")``).
Its derivative is written once, in ``gelu.h``.

The shared library is cached under ``$COATNET_KERNEL_CACHE`` (default ``~/.cache/coatnet_mindspore``),
keyed by the source, the compiler and the CPU's flags (it is built with ``-march=native``), and is
written under a temporary name then renamed, so concurrent ranks never load a half-written file.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mindspore import nn, ops

__all__ = ["avg_pool2x2", "batchnorm_depthwise", "batchnorm_inference", "batchnorm_train", "bias_softmax",
           "channel_gate", "channel_gate_grad", "channel_sum", "depthwise_conv3x3", "gelu", "im2col3x3",
           "kernels_enabled", "layernorm2d", "softmax_grad", "sum_of_squares", "use_fused_kernels", "use_stock_ops"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ["-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-pthread"]
_log = logging.getLogger(__name__)


def use_fused_kernels(net: nn.Cell) -> nn.Cell:
    """Make every cell of ``net`` that has a fused CPU kernel (a ``set_fused`` method) run it where it
    applies: CPU device target, ``COATNET_CPU_KERNELS`` not 0, a compiler that builds it, float32 inputs
    (checked at each call). Builds the libraries or takes them from the cache. When every k x k
    convolution of ``net`` got its kernel, oneDNN's AVX2 cap is lifted (``src.set_cpu_isa_cap``): its
    1x1 convolutions then take the AVX-512 path where the CPU has one. Call after the device target is
    set and before the network's first graph-mode call; returns ``net``."""
    from src import set_cpu_isa_cap

    for _, cell in net.cells_and_names():
        if hasattr(cell, "set_fused"):
            cell.set_fused(True)
    set_cpu_isa_cap(not _all_kxk_convolutions_fused(net))
    return net


def use_stock_ops(net: nn.Cell) -> nn.Cell:
    """Make every cell of ``net`` use MindSpore's own ops again (as built), so a graph exported from it runs
    anywhere (a Custom op would tie it to this machine's compiled library); oneDNN's AVX2 cap is set
    again. Call before the network's first graph-mode call or export; returns ``net``."""
    from src import set_cpu_isa_cap

    for _, cell in net.cells_and_names():
        if hasattr(cell, "set_fused"):
            cell.set_fused(False)
    set_cpu_isa_cap(True)
    return net


def _all_kxk_convolutions_fused(net: nn.Cell) -> bool:
    """True when no convolution of ``net`` larger than 1x1 or strided would run on MindSpore's own CPU op
    (which takes oneDNN's reference path on AVX-512)."""
    from mindspore import nn

    for _, cell in net.cells_and_names():
        if not isinstance(cell, nn.Conv2d) or getattr(cell, "fused", None) is not None:
            continue
        if tuple(cell.kernel_size) != (1, 1) or max(cell.stride) > 1:
            return False
    return True


def kernels_enabled() -> bool:
    """True when the fused kernels may be used: CPU device target and not disabled by the user."""
    import mindspore as ms

    if os.environ.get("COATNET_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return ms.get_context("device_target") == "CPU"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _toolchain() -> tuple[str, bytes] | None:
    """(compiler, what besides the source goes into a library's cache key), or None without a compiler."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        _log.warning("no C++ compiler found (g++/c++, or $CXX): using MindSpore's stock ops on CPU (slower)")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler, b"\0".join([version.encode(), " ".join(_FLAGS).encode(), platform.machine().encode(),
                                 _cpu_flags().encode()])


@functools.cache
def _build(source: str) -> str | None:
    """Path of the compiled shared library for ``source`` (a file name in this folder), or None."""
    toolchain = _toolchain()
    if toolchain is None:
        return None
    compiler, toolchain_key = toolchain
    src_path = os.path.join(_HERE, source)
    code = b""
    for name in [source, *sorted(n for n in os.listdir(_HERE) if n.endswith(".h"))]:
        with open(os.path.join(_HERE, name), "rb") as f:
            code += f.read()
    key = hashlib.sha256(code + b"\0" + toolchain_key).hexdigest()[:16]
    cache = os.path.expanduser(os.environ.get("COATNET_KERNEL_CACHE", "~/.cache/coatnet_mindspore"))
    lib = os.path.join(cache, f"{os.path.splitext(source)[0]}-{key}.so")
    if os.path.exists(lib):
        return lib
    try:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache)
    except OSError as e:
        _log.warning("kernel cache %s is not writable (%s; set COATNET_KERNEL_CACHE): using MindSpore's stock ops "
                     "on CPU (slower)", cache, e.strerror or e)
        return None
    os.close(fd)
    try:
        out = subprocess.run([compiler, *_FLAGS, "-o", tmp, src_path], capture_output=True, text=True)
        if out.returncode != 0:
            first = (out.stderr.strip().splitlines() or ["(no output)"])[0]
            _log.warning("compiling %s failed (%s): using MindSpore's stock ops on CPU (slower)", src_path, first)
            return None
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


def _op(sources: tuple[str, ...], make, *args) -> ops.Custom | None:
    """``make(*libraries, *args)`` for the libraries built from ``sources``, or None (see the module
    docstring). Every getter ends here."""
    if not kernels_enabled():
        return None
    libs = [_build(source) for source in sources]
    return make(*libs, *args) if all(libs) else None


def _custom(lib: str, name: str, out_shape, out_dtype, bprop=None):
    from mindspore import ops

    return ops.Custom(f"{lib}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


# --------------------------------------------------------------------------------------------------
# GELU
# --------------------------------------------------------------------------------------------------
_GELU_KERNELS = {"none": "Gelu", "tanh": "GeluTanh"}  # ops.gelu's approximate -> kernel name in gelu.cc


@functools.cache
def _gelu_backward(lib: str, approximate: str):
    """``op(dy, x) = dy * GELU'(x)``: the one GELU derivative (gelu.h), also behind the gradient of a fused
    BatchNorm + GELU in eval mode."""
    return _custom(lib, f"{_GELU_KERNELS[approximate]}Backward", lambda dy, x: x, lambda dy, x: x)


@functools.cache
def _gelu_op(lib: str, approximate: str):
    backward = _gelu_backward(lib, approximate)

    def bprop(x, out, dout):
        return (backward(dout, x),)

    return _custom(lib, f"{_GELU_KERNELS[approximate]}Forward", lambda x: x, lambda x: x, bprop)


def gelu(approximate: str = "none") -> ops.Custom | None:
    """``op(x) = ops.gelu(x, approximate)``: exact (``"none"``) or MindSpore's tanh approximation
    (``"tanh"``, as ``nn.GELU()``); or None (see the module docstring)."""
    if approximate not in _GELU_KERNELS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _op(("gelu.cc",), _gelu_op, approximate)


# --------------------------------------------------------------------------------------------------
# Depthwise 3x3 convolution
# --------------------------------------------------------------------------------------------------
@functools.cache
def _depthwise_op(lib: str, stride: int):
    backward_input = _custom(lib, "DwConv3x3BackwardInput", lambda dy, w, x: x, lambda dy, w, x: x)
    backward_filter = _custom(lib, "DwConv3x3BackwardFilter", lambda dy, x: [x[1], 1, 3, 3], lambda dy, x: x)

    def bprop(x, weight, out, dout):
        return backward_input(dout, weight, x), backward_filter(dout, x)

    def out_shape(x, w):
        return [x[0], x[1], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1]

    # One function name per stride: MindSpore keys a Custom op's shape inference by its name.
    return _custom(lib, f"DwConv3x3Stride{stride}Forward", out_shape, lambda x, w: x, bprop)


def depthwise_conv3x3(stride: int = 1) -> ops.Custom | None:
    """``op(x, weight)``: depthwise 3x3 convolution, padding 1, no bias, ``stride`` 1 or 2, weight
    (C, 1, 3, 3); or None (see the module docstring)."""
    if stride not in (1, 2):
        raise ValueError(f"depthwise_conv3x3: stride must be 1 or 2, got {stride}")
    return _op(("dwconv.cc",), _depthwise_op, stride)


# --------------------------------------------------------------------------------------------------
# Sum of squares of many tensors (the train step's global gradient norm)
# --------------------------------------------------------------------------------------------------
@functools.cache
def _sum_of_squares_op(lib: str):
    import mindspore as ms

    return _custom(lib, "SumOfSquares", lambda *shapes: [1], lambda *dtypes: ms.float32)


def sum_of_squares() -> ops.Custom | None:
    """``op(*tensors)``: the sum of the squares of every element of the float32 ``tensors``, shape (1,), no
    gradient; or None (see the module docstring)."""
    return _op(("reduce.cc",), _sum_of_squares_op)


@functools.cache
def _channel_sum_op(lib: str):
    return _custom(lib, "ChannelSum", lambda x: [x[1]], lambda x: x)


def channel_sum() -> ops.Custom | None:
    """``op(x)``: the sum of an NCHW float32 tensor over N, H and W, shape (C,) (a per-channel bias's
    gradient), no gradient of its own; or None."""
    return _op(("reduce.cc",), _channel_sum_op)


# --------------------------------------------------------------------------------------------------
# 2x2 average pooling
# --------------------------------------------------------------------------------------------------
@functools.cache
def _avg_pool2x2_op(lib: str):
    backward = _custom(lib, "AvgPool2x2Backward", lambda dy, x: x, lambda dy, x: x)

    def bprop(x, out, dout):
        return (backward(dout, x),)

    return _custom(lib, "AvgPool2x2Forward", lambda x: [x[0], x[1], x[2] // 2, x[3] // 2], lambda x: x, bprop)


def avg_pool2x2() -> ops.Custom | None:
    """``op(x)``: 2x2 average pooling, stride 2, no padding (``nn.AvgPool2d(2, 2)``), with its gradient; or
    None."""
    return _op(("pool.cc",), _avg_pool2x2_op)


# --------------------------------------------------------------------------------------------------
# 3x3 patch extraction (im2col), for dense 3x3 convolutions as 1x1 convolutions
# --------------------------------------------------------------------------------------------------
_IM2COL_PADDINGS = {1: ((1, 1),), 2: ((1, 1), (0, 0), (0, 1), (1, 0))}  # stride -> (top, left) built


@functools.cache
def _im2col_op(lib: str, stride: int, top: int, left: int):
    name = f"3x3S{stride}T{top}L{left}"
    backward = _custom(lib, f"Col2Im{name}", lambda dcol, x: x, lambda dcol, x: x)

    def bprop(x, out, dout):
        return (backward(dout, x),)

    def out_shape(x):
        # (H - 1) // stride + 1 rows for every padding built: stride 1 pads one each side; stride 2 pads
        # one each side, or (MindSpore's "same") one after only when the size is even.
        return [x[0], 9 * x[1], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1]

    return _custom(lib, f"Im2Col{name}", out_shape, lambda x: x, bprop)


def im2col3x3(stride: int, top: int, left: int) -> ops.Custom | None:
    """``op(x) -> col``: the nine 3x3 taps of each output pixel of x (B, C, H, W) as channels,
    col[b, 9c + 3kh + kw, i, j] = x[b, c, stride i - top + kh, stride j - left + kw] (zero outside), so that
    a 3x3 convolution is ``conv1x1(col, weight.reshape(O, 9C, 1, 1))``. ``stride`` 1 pads one each side;
    ``stride`` 2 pads ``top`` / ``left`` (0 or 1) before and what makes (H - 1) // 2 + 1 rows after; or None."""
    if (top, left) not in _IM2COL_PADDINGS.get(stride, ()):
        raise ValueError(f"im2col3x3: stride {stride} with padding before ({top}, {left}) is not built")
    return _op(("im2col.cc",), _im2col_op, stride, top, left)


# --------------------------------------------------------------------------------------------------
# Row-wise ops: the SE channel gate and the attention softmax's gradient
# --------------------------------------------------------------------------------------------------
@functools.cache
def _channel_gate_grad_op(lib: str):
    return _custom(lib, "ChannelGateBackward", lambda dy, x, g: (x, g), lambda dy, x, g: (x, g))


@functools.cache
def _channel_gate_op(lib: str):
    backward = _channel_gate_grad_op(lib)

    def bprop(x, gate, out, dout):
        return backward(dout, x, gate)

    return _custom(lib, "ChannelGateForward", lambda x, g: x, lambda x, g: x, bprop)


def channel_gate() -> ops.Custom | None:
    """``op(x, gate) = x * gate`` for x (B, C, H, W) and gate (B, C, 1, 1); or None."""
    return _op(("rows.cc",), _channel_gate_op)


def channel_gate_grad() -> ops.Custom | None:
    """``op(dy, x, gate) = (dy * gate, sum over H, W of dy * x)``: the gradient of ``channel_gate``; or None."""
    return _op(("rows.cc",), _channel_gate_grad_op)


@functools.cache
def _softmax_grad_op(lib: str):
    return _custom(lib, "SoftmaxBackward", lambda y, dy: y, lambda y, dy: y)


@functools.cache
def _bias_softmax_op(lib: str):
    from mindspore import ops

    backward = _softmax_grad_op(lib)

    def bprop(x, bias, out, dout):
        dx = backward(out, dout)
        # the bias gradient sums dx over the batch: a matrix-vector product (ReduceSum is slow on CPU)
        ones = ops.ones((1, dx.shape[0]), dx.dtype)
        return dx, ops.matmul(ones, dx.reshape(dx.shape[0], -1)).reshape(bias.shape)

    return _custom(lib, "BiasSoftmaxForward", lambda x, b: x, lambda x, b: x, bprop)


def bias_softmax() -> ops.Custom | None:
    """``op(x, bias) = softmax(x + bias)`` over the last axis, ``bias`` (1, ...) broadcast over the batch
    (attention scores plus the relative-position bias), with its gradient; or None."""
    return _op(("rows.cc",), _bias_softmax_op)


def softmax_grad() -> ops.Custom | None:
    """``op(y, dy)``: the gradient of a softmax over the last axis from its output ``y``; or None."""
    return _op(("rows.cc",), _softmax_grad_op)


# --------------------------------------------------------------------------------------------------
# BatchNorm (+ GELU) and LayerNorm over channels
# --------------------------------------------------------------------------------------------------
# batchnorm_*()'s act -> kernel name in batchnorm.cc, and the GELU form it applies
_BATCHNORM_KERNELS = {None: "BatchNorm", "gelu": "BatchNormGelu", "gelu_tanh": "BatchNormGeluTanh"}
_BATCHNORM_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


def _check_act(act: str | None) -> None:
    if act not in _BATCHNORM_KERNELS:
        raise ValueError(f"batchnorm: act must be None, 'gelu' or 'gelu_tanh', got {act!r}")


@functools.cache
def _batchnorm_train_op(lib: str, act: str | None):
    from mindspore import ops

    kind = _BATCHNORM_KERNELS[act]
    backward = _custom(lib, f"{kind}TrainBackward", lambda dy, x, g, b, m, v, e: (x, g, g),
                       lambda dy, x, g, b, m, v, e: (x, g, g))

    def bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, gamma, beta, out[1], out[2], eps)
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return _custom(lib, f"{kind}TrainForward", lambda x, g, b, e: (x, g, g), lambda x, g, b, e: (x, g, g), bprop)


def batchnorm_train(act: str | None = None) -> ops.Custom | None:
    """``op(x, gamma, beta, eps) -> (y, batch_mean, batch_var)``: BatchNorm of an NCHW tensor with its batch
    statistics (``eps`` a (1,) tensor, ``batch_var`` biased), then ``act`` (None, "gelu": exact GELU, or
    "gelu_tanh": its tanh form); or None."""
    _check_act(act)
    return _op(("batchnorm.cc",), _batchnorm_train_op, act)


@functools.cache
def _batchnorm_depthwise_op(lib: str, act: str, stride: int):
    from mindspore import ops

    kind = f"{_BATCHNORM_KERNELS[act]}DwConv3x3"
    backward = _custom(lib, f"{kind}TrainBackward", lambda dy, x, g, b, m, v, e, w: (x, g, g, w),
                       lambda dy, x, g, b, m, v, e, w: (x, g, g, w))

    def bprop(x, gamma, beta, eps, weight, out, dout):
        dx, dgamma, dbeta, dweight = backward(dout[0], x, gamma, beta, out[1], out[2], eps, weight)
        return dx, dgamma, dbeta, ops.zeros_like(eps), dweight

    def out_shape(x, g, b, e, w):
        return [x[0], x[1], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1], g, g

    return _custom(lib, f"{kind}Stride{stride}TrainForward", out_shape, lambda x, g, b, e, w: (x, g, g), bprop)


def batchnorm_depthwise(act: str, stride: int) -> ops.Custom | None:
    """``op(x, gamma, beta, eps, weight) -> (y, batch_mean, batch_var)``: ``batchnorm_train(act)`` followed by
    ``depthwise_conv3x3(stride)`` in one kernel that never writes the activation between them (``act``
    "gelu" or "gelu_tanh"); or None."""
    if act not in _BATCHNORM_GELU:
        raise ValueError(f"batchnorm_depthwise: act must be 'gelu' or 'gelu_tanh', got {act!r}")
    if stride not in (1, 2):
        raise ValueError(f"batchnorm_depthwise: stride must be 1 or 2, got {stride}")
    return _op(("dwconv.cc",), _batchnorm_depthwise_op, act, stride)


@functools.cache
def _batchnorm_inference_op(lib: str, gelu_lib: str | None, act: str | None):
    gelu_backward = _gelu_backward(gelu_lib, _BATCHNORM_GELU[act]) if act is not None else None

    def bprop(x, scale, shift, out, dout):
        # Only for gradients through a BatchNorm in eval mode (frozen statistics): no fused pass needed.
        scale, shift = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
        dz = dout if gelu_backward is None else gelu_backward(dout, x * scale + shift)
        return dz * scale, (dz * x).sum(axis=(0, 2, 3)), dz.sum(axis=(0, 2, 3))

    return _custom(lib, f"{_BATCHNORM_KERNELS[act]}InferenceForward", lambda x, s, t: x, lambda x, s, t: x, bprop)


def batchnorm_inference(act: str | None = None) -> ops.Custom | None:
    """``op(x, scale, shift) = act(x * scale + shift)`` with per-channel ``scale`` and ``shift`` (BatchNorm's
    running statistics folded in), ``act`` as for ``batchnorm_train``; or None."""
    _check_act(act)
    if act is None:
        return _op(("batchnorm.cc",), lambda lib: _batchnorm_inference_op(lib, None, None))
    return _op(("batchnorm.cc", "gelu.cc"), _batchnorm_inference_op, act)


@functools.cache
def _layernorm2d_op(lib: str):
    from mindspore import ops

    def stats_shape(x):
        return [x[0], 1, x[2], x[3]]

    backward = _custom(lib, "LayerNorm2dBackward", lambda dy, x, g, m, r: (x, g, g),
                       lambda dy, x, g, m, r: (x, g, g))

    def bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, gamma, out[1], out[2])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return _custom(lib, "LayerNorm2dForward", lambda x, g, b, e: (x, stats_shape(x), stats_shape(x)),
                   lambda x, g, b, e: (x, x, x), bprop)


def layernorm2d() -> ops.Custom | None:
    """``op(x, gamma, beta, eps) -> (y, mean, rstd)``: LayerNorm over the channel axis of an NCHW tensor
    (``eps`` a (1,) tensor; ``mean`` and ``rstd`` (B, 1, H, W), kept for the gradient); or None."""
    return _op(("layernorm.cc",), _layernorm2d_op)
