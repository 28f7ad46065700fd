"""Fused CPU kernels, compiled from the C++ sources next to this file on first use.

``gelu()``, ``depthwise_conv3x3()``, ``batchnorm()``, ``layernorm2d()``, ``softmax_grad()`` and
``channel_gate()`` return MindSpore ``Custom`` ops (func_type "aot"; the first four with their gradients
attached), or ``None`` when they cannot or should not be used: the device target is not CPU,
``COATNET_CPU_KERNELS=0`` is set, or no C++ compiler builds them (then a warning says why and the
model keeps MindSpore's own ops). Results equal the stock ops' within float32 rounding
(tests/test_kernels.py).

GELU comes in the two forms of ``ops.gelu``: exact (``gelu("none")``, ``batchnorm("gelu")``) and the tanh
approximation that MindSpore's ``nn.GELU()`` computes (``gelu("tanh")``, ``batchnorm("gelu_tanh")``).

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

__all__ = ["batchnorm", "channel_gate", "depthwise_conv3x3", "gelu", "kernels_enabled", "layernorm2d",
           "softmax_grad"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ["-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-pthread"]
_log = logging.getLogger(__name__)


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


def _ops(source: str, make, *args):
    """``make(library, *args)`` for the library built from ``source``, or None (see the module docstring)."""
    if not kernels_enabled():
        return None
    lib = _build(source)
    return make(lib, *args) if lib else None


_GELU_KERNELS = {"none": "Gelu", "tanh": "GeluTanh"}  # ops.gelu's approximate -> kernel name in gelu.cc


@functools.cache
def _gelu_ops(lib: str, approximate: str):
    from mindspore import ops

    kind = _GELU_KERNELS[approximate]
    backward = ops.Custom(f"{lib}:{kind}Backward", out_shape=lambda dy, x: x, out_dtype=lambda dy, x: x,
                          func_type="aot")

    def bprop(x, out, dout):
        return (backward(dout, x),)

    return ops.Custom(f"{lib}:{kind}Forward", out_shape=lambda x: x, out_dtype=lambda x: x, func_type="aot",
                      bprop=bprop)


def gelu(approximate: str = "none"):
    """The fused GELU op for float32 CPU tensors, ``ops.gelu(x, approximate)``: exact (``"none"``) or
    MindSpore's tanh approximation (``"tanh"``, as ``nn.GELU()``); or None (see the module docstring)."""
    if approximate not in _GELU_KERNELS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _ops("gelu.cc", _gelu_ops, approximate)


@functools.cache
def _depthwise_ops(lib: str, stride: int):
    from mindspore import ops

    backward_input = ops.Custom(f"{lib}:DwConv3x3BackwardInput", out_shape=lambda dy, w, x: x,
                                out_dtype=lambda dy, w, x: x, func_type="aot")
    backward_filter = ops.Custom(f"{lib}:DwConv3x3BackwardFilter", out_shape=lambda dy, x: [x[1], 1, 3, 3],
                                 out_dtype=lambda dy, x: x, func_type="aot")

    def bprop(x, weight, out, dout):
        return backward_input(dout, weight, x), backward_filter(dout, x)

    def out_shape(x, w):
        return [x[0], x[1], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1]

    # One function name per stride: MindSpore keys a Custom op's shape inference by its name.
    return ops.Custom(f"{lib}:DwConv3x3Stride{stride}Forward", out_shape=out_shape, out_dtype=lambda x, w: x,
                      func_type="aot", bprop=bprop)


def depthwise_conv3x3(stride: int = 1):
    """The fused depthwise 3x3 convolution (padding 1, no bias, ``stride`` 1 or 2) for float32 CPU
    tensors, called as ``op(x, weight)`` with weight (C, 1, 3, 3), or None (see the module docstring)."""
    if stride not in (1, 2):
        raise ValueError(f"depthwise_conv3x3: stride must be 1 or 2, got {stride}")
    return _ops("dwconv.cc", _depthwise_ops, stride)


@functools.cache
def _rows_ops(lib: str):
    from mindspore import ops

    softmax_grad = ops.Custom(f"{lib}:SoftmaxBackward", out_shape=lambda y, dy: y, out_dtype=lambda y, dy: y,
                              func_type="aot")
    gate_forward = ops.Custom(f"{lib}:ChannelGateForward", out_shape=lambda x, g: x, out_dtype=lambda x, g: x,
                              func_type="aot")
    gate_backward = ops.Custom(f"{lib}:ChannelGateBackward", out_shape=lambda dy, x, g: (x, g),
                               out_dtype=lambda dy, x, g: (x, g), func_type="aot")
    return softmax_grad, (gate_forward, gate_backward)


def softmax_grad():
    """``op(y, dy)``: the gradient of a softmax over the last axis from its output ``y``, for float32
    CPU tensors, or None (see the module docstring)."""
    ops = _ops("rows.cc", _rows_ops)
    return ops[0] if ops else None


def channel_gate():
    """``(forward, backward)``: ``forward(x, gate) = x * gate`` for x (B, C, H, W) and gate (B, C, 1, 1),
    ``backward(dy, x, gate) = (dy * gate, sum_hw(dy * x))``, for float32 CPU tensors; or None."""
    ops = _ops("rows.cc", _rows_ops)
    return ops[1] if ops else None


# batchnorm()'s act -> kernel name in batchnorm.cc
_BATCHNORM_KERNELS = {None: "BatchNorm", "gelu": "BatchNormGelu", "gelu_tanh": "BatchNormGeluTanh"}


@functools.cache
def _batchnorm_ops(lib: str, act: str | None):
    from mindspore import ops

    kind = _BATCHNORM_KERNELS[act]
    backward = ops.Custom(f"{lib}:{kind}TrainBackward", out_shape=lambda dy, x, g, b, m, v, e: (x, g, g),
                          out_dtype=lambda dy, x, g, b, m, v, e: (x, g, g), func_type="aot")

    def train_bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, gamma, beta, out[1], out[2], eps)
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    train = ops.Custom(f"{lib}:{kind}TrainForward", out_shape=lambda x, g, b, e: (x, g, g),
                       out_dtype=lambda x, g, b, e: (x, g, g), func_type="aot", bprop=train_bprop)

    def gelu_derivative(z):
        if act == "gelu":
            return 0.5 * (1.0 + ops.erf(z * 0.7071067811865476)) + z * ops.exp(-0.5 * z * z) * 0.3989422804014327
        # 0.5 (1 + tanh u) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3); d/dz = s + z 2 u'(z) s (1 - s).
        # Not through ops.tanh: MindSpore 2.10's CPU tanh is a rational approximation, 1e-4 off near |u| = 5
        # and exactly +-1 beyond, which 1 + tanh u and 1 - tanh^2 u turn into gradients ~5e-3 off
        # (test_fused_batchnorm_gelu_tanh_equals_stock_in_training_and_eval). 1 - s as sigmoid(-2u): no
        # cancellation either.
        two_u = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        s = ops.sigmoid(two_u)
        return s + z * 1.5957691216057308 * (1.0 + 0.134145 * z * z) * s * ops.sigmoid(-two_u)

    def inference_bprop(x, scale, shift, out, dout):
        # Only for gradients through a BatchNorm in eval mode (frozen statistics): stock ops suffice.
        scale, shift = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
        dz = dout
        if act is not None:
            dz = dout * gelu_derivative(x * scale + shift)
        return dz * scale, (dz * x).sum(axis=(0, 2, 3)), dz.sum(axis=(0, 2, 3))

    inference = ops.Custom(f"{lib}:{kind}InferenceForward", out_shape=lambda x, s, t: x,
                           out_dtype=lambda x, s, t: x, func_type="aot", bprop=inference_bprop)
    return train, inference


def batchnorm(act: str | None = None):
    """``(train, inference)`` for BatchNorm of an NCHW float32 CPU tensor followed by ``act`` (None, "gelu":
    exact GELU, or "gelu_tanh": its tanh form); or None. ``train(x, gamma, beta, eps) -> (y, batch_mean,
    batch_var)`` normalises with the batch statistics (``eps`` a (1,) tensor, ``batch_var`` biased);
    ``inference(x, scale, shift) -> y`` is ``act(x * scale + shift)`` with per-channel ``scale`` and
    ``shift``."""
    if act not in _BATCHNORM_KERNELS:
        raise ValueError(f"batchnorm: act must be None, 'gelu' or 'gelu_tanh', got {act!r}")
    return _ops("batchnorm.cc", _batchnorm_ops, act)


@functools.cache
def _layernorm2d_ops(lib: str):
    from mindspore import ops

    def stats_shape(x):
        return [x[0], 1, x[2], x[3]]

    backward = ops.Custom(f"{lib}:LayerNorm2dBackward", out_shape=lambda dy, x, g, m, r: (x, g, g),
                          out_dtype=lambda dy, x, g, m, r: (x, g, g), func_type="aot")

    def bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, gamma, out[1], out[2])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(f"{lib}:LayerNorm2dForward", out_shape=lambda x, g, b, e: (x, stats_shape(x), stats_shape(x)),
                      out_dtype=lambda x, g, b, e: (x, x, x), func_type="aot", bprop=bprop)


def layernorm2d():
    """``op(x, gamma, beta, eps) -> (y, mean, rstd)``: LayerNorm over the channel axis of an NCHW float32
    CPU tensor (``eps`` a (1,) tensor; ``mean`` and ``rstd`` (B, 1, H, W), kept for the gradient); or None."""
    return _ops("layernorm.cc", _layernorm2d_ops)
