"""The fused CPU kernels (src/kernels) equal MindSpore's own ops, forward and backward, alone and in
the model; a model is built with the stock ops and compiles nothing until use_fused_kernels, which
falls back to the stock ops when the kernels cannot be built or are switched off."""
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src import kernels
from src.coatnet import (
    GELU,
    Attention2d,
    AvgPool2x2,
    BatchNormAct2d,
    ChannelGate,
    Conv1x1,
    Conv3x3,
    DepthwiseConv2d,
    LayerNorm2d,
    MBConvBlock,
    Softmax,
    StridedConv1x1,
    create_model,
)
from src.kernels import use_fused_kernels, use_stock_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FUSED_CELLS = (GELU, DepthwiseConv2d, Conv3x3, StridedConv1x1, ChannelGate, Softmax, BatchNormAct2d, LayerNorm2d,
               Attention2d, AvgPool2x2, Conv1x1)
# the fused cells of the original network (coatnet_tiny): it pools with max; AvgPool2x2 is in timm's structures
# (tests/test_model.py's parity tests run those with the fused kernels)
ORIGINAL_FUSED = set(FUSED_CELLS) - {AvgPool2x2}


class _Fused(nn.Cell):
    def __init__(self, approximate: str):
        super().__init__()
        self.op = kernels.gelu(approximate)

    def construct(self, x):
        return self.op(x)


class _Stock(nn.Cell):
    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def construct(self, x):
        return ops.gelu(x, approximate=self.approximate)


class _SumOf(nn.Cell):
    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net(x).sum()


def _output_and_input_grads(cell, inputs, dy) -> list[np.ndarray]:
    """[y, d inputs...] of ``cell`` at ``inputs`` for the output gradient ``dy``, as NumPy."""
    y, vjp_fn = ms.vjp(cell, *inputs)
    grads = vjp_fn(dy)
    return [y.asnumpy(), *(g.asnumpy() for g in (grads if isinstance(grads, tuple) else (grads,)))]


def _output_and_norm_grads(cell, x, dy) -> list[np.ndarray]:
    """[y, dx, dgamma, dbeta] of a normalisation ``cell`` (BatchNormAct2d or LayerNorm2d), as NumPy."""
    norm = getattr(cell, "bn", cell)
    y, vjp_fn = ms.vjp(cell, x, weights=[norm.gamma, norm.beta])
    dx, (dgamma, dbeta) = vjp_fn(dy)
    dx = dx[0] if isinstance(dx, tuple) else dx
    return [y.asnumpy(), dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy()]


def _assert_all_close(fused: list[np.ndarray], stock: list[np.ndarray]) -> None:
    for a, b in zip(fused, stock, strict=True):
        assert a.shape == b.shape and np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def _kernel_or_stock(cell, fused: bool):
    """``cell`` with its fused kernel (which must have built here), or switched back to the stock ops."""
    assert use_fused_kernels(cell).fused is not None, "the fused kernel must build on the CPU test machine"
    return cell if fused else use_stock_ops(cell)


def _inputs() -> np.ndarray:
    # 210,000 elements: enough work for parallel_for (src/kernels/parallel.h) to split it over every core
    x = np.random.RandomState(0).randn(3, 70000).astype(np.float32) * 4
    x[0, :8] = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4]
    x[1, :4] = [10.0, -10.0, 9.999, -9.999]  # where the tanh form's e drops to 0 (gelu.h)
    return x


def _gelu_and_derivative(x: np.ndarray, approximate: str) -> tuple[np.ndarray, np.ndarray]:
    """GELU(x) and GELU'(x) in float64, exact (``approximate="none"``) or in the tanh form."""
    if approximate == "none":
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
        return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    # 0.5 (1 + tanh u) = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). Even float64 loses all digits of
    # 1 + tanh u once u < -19; the sigmoid evaluated through e = exp(-2|u|) loses none.
    k = math.sqrt(2.0 / math.pi)
    u = k * (x + 0.044715 * x**3)
    e = np.exp(-2.0 * np.abs(u))
    gate = np.where(u >= 0.0, 1.0, e) / (1.0 + e)
    return x * gate, gate + x * 2.0 * k * (1.0 + 3 * 0.044715 * x * x) * e / (1.0 + e) ** 2


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_fused_gelu_matches_float64_gelu_forward_and_gradient(mode, approximate):
    ms.set_context(mode=mode)
    assert kernels.gelu(approximate) is not None, "the fused kernel must build on the CPU test machine"
    x = _inputs()
    dy = np.random.RandomState(1).randn(*x.shape).astype(np.float32)
    truth_y, truth_derivative = _gelu_and_derivative(x.astype(np.float64), approximate)
    truth_dx = dy * truth_derivative
    errors = {}
    for name, cell in (("fused", _Fused(approximate)), ("stock", _Stock(approximate))):
        y, dx = _output_and_input_grads(cell, (ms.Tensor(x),), ms.Tensor(dy))
        assert np.isfinite(y).all() and np.isfinite(dx).all()
        errors[name] = (np.abs(y - truth_y).max(),
                        (np.abs(dx - truth_dx) / np.maximum(np.abs(dy), 1.0)).max())
    # Both within float32 rounding of the float64 values (measured, exact: fused 4e-7 / 4e-7, stock
    # 5e-7 / 9e-7; tanh: fused 5e-7 / 2e-7, stock 4e-7 / 6e-7).
    assert errors["fused"][0] <= 1e-6 and errors["fused"][1] <= 1e-6, errors
    assert errors["stock"][0] <= 1e-6 and errors["stock"][1] <= 2e-6, errors


def test_unknown_gelu_form_or_batchnorm_activation_is_refused():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'bogus'"):
        kernels.gelu("bogus")
    with pytest.raises(ValueError, match="act must be None, 'gelu' or 'gelu_tanh', got 'tanh'"):
        kernels.batchnorm_train("tanh")
    with pytest.raises(ValueError, match="act must be None, 'gelu' or 'gelu_tanh', got 'tanh'"):
        kernels.batchnorm_inference("tanh")


def test_model_uses_fused_kernels_and_stock_ops_give_the_same_gradients():
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    # No stochastic depth: the two nets would drop different paths.
    fused_net = use_fused_kernels(create_model("coatnet_tiny", num_classes=5, image_size=32, drop_path_rate=0.0))
    fusable = [c for _, c in fused_net.cells_and_names() if isinstance(c, FUSED_CELLS)]
    assert {type(c) for c in fusable} == ORIGINAL_FUSED
    assert all(c.fused is not None for c in fusable)
    stock_net = use_fused_kernels(create_model("coatnet_tiny", num_classes=5, image_size=32, drop_path_rate=0.0))
    ms.load_param_into_net(stock_net, {p.name: p for p in fused_net.get_parameters()}, strict_load=True)
    assert use_stock_ops(stock_net) is stock_net
    assert all(c.fused is None for _, c in stock_net.cells_and_names() if isinstance(c, FUSED_CELLS))
    blocks = [[c for _, c in net.cells_and_names() if isinstance(c, MBConvBlock)] for net in (fused_net, stock_net)]
    assert blocks[0] and all(b.norm1_dw is not None for b in blocks[0]) and all(b.norm1_dw is None for b in blocks[1])
    for block in blocks[0]:
        block.norm_dw_min_area = 1  # BatchNorm + GELU + depthwise as one kernel at these small sizes too

    x = ms.Tensor(np.random.RandomState(0).randn(4, 3, 32, 32).astype(np.float32))
    outs = []
    for net in (fused_net, stock_net):
        net.set_train(True)
        weights = net.trainable_params()
        loss, grads = ms.value_and_grad(_SumOf(net), None, weights)(x)
        assert len(weights) == len(grads)
        outs.append((loss.asnumpy(), [g.asnumpy() for g in grads]))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
    for g_fused, g_stock in zip(outs[0][1], outs[1][1], strict=False):
        np.testing.assert_allclose(g_fused, g_stock, rtol=1e-4, atol=1e-5)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("COATNET_CPU_KERNELS", "0")
    assert kernels.gelu() is None
    assert use_fused_kernels(create_model("coatnet_tiny", num_classes=5, image_size=32)).stem.norm1.act.fused is None


@pytest.fixture
def fresh_build():
    """Forget the compiler and the built libraries this process has seen (before and after)."""
    kernels._toolchain.cache_clear()
    kernels._build.cache_clear()
    yield
    kernels._toolchain.cache_clear()
    kernels._build.cache_clear()


def _recording_compiler(tmp_path) -> tuple[str, str]:
    """A $CXX that appends each command line it is given to a log, then runs g++: (its path, the log's)."""
    real = shutil.which("g++") or shutil.which("c++")
    assert real, "the CPU test machine has a C++ compiler"
    log, script = tmp_path / "compiler.log", tmp_path / "cxx"
    script.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexec {shlex.quote(real)} "$@"\n')
    script.chmod(0o755)
    return str(script), str(log)


def test_building_a_model_compiles_nothing_until_use_fused_kernels(monkeypatch, tmp_path, fresh_build):
    cxx, log = _recording_compiler(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("COATNET_KERNEL_CACHE", str(cache))
    ms.set_context(device_target="CPU")
    net = create_model("coatnet_tiny", num_classes=5, image_size=32)
    fusable = [c for _, c in net.cells_and_names() if isinstance(c, FUSED_CELLS)]
    assert {type(c) for c in fusable} == ORIGINAL_FUSED
    assert all(c.fused is None for c in fusable)
    assert not os.path.exists(log) and not cache.exists()  # no compiler ran, no library was looked for

    assert use_fused_kernels(net) is net
    assert all(c.fused is not None for c in fusable)
    assert sorted(name.split("-")[0] for name in os.listdir(cache)) == ["batchnorm", "dwconv", "gelu", "im2col",
                                                                          "layernorm", "reduce", "rows"]
    with open(log, encoding="utf-8") as f:
        assert sum("-shared" in line for line in f) == 7  # each library compiled once, here


def test_the_trainers_model_has_the_fused_kernels():
    """Training, evaluation and the train-step benchmark build their model with ``build_model``."""
    from src.model_utils.config import load_config
    from src.trainer import build_model

    net = build_model(load_config(["--model_name=coatnet_tiny", "--num_classes=5", "--image_height=32",
                                   "--image_width=32"]))
    fusable = [c for _, c in net.cells_and_names() if isinstance(c, FUSED_CELLS)]
    assert {type(c) for c in fusable} == ORIGINAL_FUSED and all(c.fused is not None for c in fusable)


def test_the_converter_builds_no_kernels(tmp_path):
    from timm_ref import save_safetensors, timm_model

    cxx, log = _recording_compiler(tmp_path)
    cache = tmp_path / "cache"
    src = save_safetensors(timm_model("coatnet_nano_rw_224"), str(tmp_path / "nano.safetensors"))
    dst = tmp_path / "nano.ckpt"
    res = subprocess.run([sys.executable, "-m", "src.convert_timm", "--model", "coatnet_nano_rw_224", "--src", src,
                          "--dst", str(dst)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CXX": cxx, "COATNET_KERNEL_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert dst.exists()
    assert not os.path.exists(log) and not cache.exists()


def test_without_a_working_compiler_warns_and_falls_back(monkeypatch, tmp_path, caplog, fresh_build):
    monkeypatch.setenv("COATNET_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="src.kernels"):
        assert kernels.gelu() is None
    assert "compiling" in caplog.text and "gelu.cc" in caplog.text and "stock ops" in caplog.text
    assert os.listdir(tmp_path) == []  # no half-built library left behind


def test_unwritable_cache_warns_and_falls_back(monkeypatch, tmp_path, caplog, fresh_build):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("COATNET_KERNEL_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="src.kernels"):
        assert kernels.gelu() is None
    assert "not writable" in caplog.text and "COATNET_KERNEL_CACHE" in caplog.text


def test_library_is_built_once_per_source_compiler_and_cpu(monkeypatch, tmp_path, fresh_build):
    monkeypatch.setenv("COATNET_KERNEL_CACHE", str(tmp_path))
    lib = kernels._build("gelu.cc")
    assert lib and os.path.dirname(lib) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(lib)]
    stamp = os.stat(lib).st_mtime_ns
    kernels._build.cache_clear()
    assert kernels._build("gelu.cc") == lib and os.stat(lib).st_mtime_ns == stamp


class _DwFused(nn.Cell):
    def __init__(self, stride):
        super().__init__()
        self.op = kernels.depthwise_conv3x3(stride)

    def construct(self, x, w):
        return self.op(x, w)


class _DwStock(nn.Cell):
    def __init__(self, channels, stride):
        super().__init__()
        self.conv = ops.Conv2D(channels, 3, stride=stride, pad_mode="pad", pad=1, group=channels)

    def construct(self, x, w):
        return self.conv(x, w)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (3, 2, 1, 1), (1, 4, 1, 6), (2, 2, 2, 2), (2, 40, 30, 33)])
def test_fused_depthwise_conv_equals_stock_forward_and_gradients(shape, stride):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(*shape).astype(np.float32))
    w = ms.Tensor(rng.randn(shape[1], 1, 3, 3).astype(np.float32))
    out_shape = (*shape[:2], (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1)
    dy = ms.Tensor(rng.randn(*out_shape).astype(np.float32))
    results = []
    for cell in (_DwFused(stride), _DwStock(shape[1], stride)):
        results.append(_output_and_input_grads(cell, (x, w), dy))
    assert results[1][0].shape == out_shape
    for fused, stock in zip(results[0], results[1], strict=True):
        assert fused.shape == stock.shape
        np.testing.assert_allclose(fused, stock, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(stock).max()))


def _conv_output_and_grads(conv, x, dy) -> list[np.ndarray]:
    """[y, dx, dweight(, dbias)] of a convolution cell, as NumPy."""
    y, vjp_fn = ms.vjp(conv, x, weights=conv.trainable_params())
    dx, dparams = vjp_fn(dy)
    dx = dx[0] if isinstance(dx, tuple) else dx
    return [y.asnumpy(), dx.asnumpy(), *(g.asnumpy() for g in dparams)]


def _fused_and_stock(make, shape):
    """(fused, stock) results of two equal cells from ``make()`` at a random input and output gradient."""
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(*shape).astype(np.float32))
    fused, stock = make(), make()
    for a, b in zip(fused.trainable_params(), stock.trainable_params(), strict=True):
        b.set_data(a.data.copy())
    _kernel_or_stock(fused, True)
    dy = ms.Tensor(rng.randn(*fused(x).shape).astype(np.float32))
    return _conv_output_and_grads(fused, x, dy), _conv_output_and_grads(use_stock_ops(stock), x, dy)


@pytest.mark.parametrize(("stride", "same"), [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 5, 9, 7), (1, 4, 1, 1), (2, 2, 2, 3), (2, 16, 30, 33)])
def test_dense_3x3_conv_as_im2col_equals_stock_forward_and_gradients(shape, stride, same):
    """The stem's 3x3 convolutions (stride 1 or 2; padding one each side, or MindSpore's "same", which pads
    (0, 1) on an even size and (1, 1) on an odd one) as the im2col kernel and a 1x1 convolution."""
    ms.set_context(mode=ms.GRAPH_MODE)
    fused, stock = _fused_and_stock(lambda: Conv3x3(shape[1], 6, stride=stride, same=same), shape)
    assert fused[0].shape == (shape[0], 6, (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1)
    for a, b in zip(fused, stock, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 10, 10), (2, 3, 9, 7), (1, 4, 1, 1)])
def test_strided_1x1_conv_as_pool_and_1x1_conv_equals_stock(shape, bias):
    ms.set_context(mode=ms.GRAPH_MODE)
    fused, stock = _fused_and_stock(lambda: StridedConv1x1(shape[1], 6, 2, bias), shape)
    assert fused[0].shape == (shape[0], 6, (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
    assert len(fused) == (4 if bias else 3)
    for a, b in zip(fused, stock, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("make", [lambda: Conv3x3(5, 6, stride=2, same=True), lambda: StridedConv1x1(5, 6, 2, True)])
def test_stem_and_strided_convolutions_run_fused_in_pynative_mode(make):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        fused, stock = _fused_and_stock(make, (2, 5, 9, 10))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for a, b in zip(fused, stock, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_im2col_paddings_not_built_are_refused():
    with pytest.raises(ValueError, match="stride 1 with padding before"):
        kernels.im2col3x3(1, 0, 0)
    with pytest.raises(ValueError, match="stride 3"):
        kernels.im2col3x3(3, 1, 1)


class _SumOfSquares(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = kernels.sum_of_squares()

    def construct(self, a, b, c):
        return self.op(a, b, c)


def test_sum_of_squares_of_many_tensors_equals_numpy():
    """Tensors of one element, of a few and of more than one 65,536-element chunk."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    arrays = [rng.randn(1).astype(np.float32), rng.randn(3, 5).astype(np.float32),
              rng.randn(7, 11, 1000).astype(np.float32)]
    got = _SumOfSquares()(*(ms.Tensor(a) for a in arrays)).asnumpy()
    expected = sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays)
    assert got.shape == (1,)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


class _NormGeluDw(nn.Cell):
    """BatchNorm (batch statistics) + GELU + depthwise 3x3: one fused kernel, or the two kernels apart."""

    def __init__(self, act, stride, fused):
        super().__init__()
        self.one = kernels.batchnorm_depthwise(act, stride) if fused else None
        self.norm, self.dw = kernels.batchnorm_train(act), kernels.depthwise_conv3x3(stride)
        self.eps = ms.Tensor(np.array([1e-5], np.float32))

    def construct(self, x, gamma, beta, w):
        if self.one is not None:
            return self.one(x, gamma, beta, self.eps, w)
        y, mean, var = self.norm(x, gamma, beta, self.eps)
        return self.dw(y, w), mean, var


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (3, 2, 1, 1), (2, 24, 18, 19)])
def test_fused_batchnorm_gelu_depthwise_equals_the_two_kernels(shape, stride, act):
    """Output, batch statistics and the gradients of x, gamma, beta and the depthwise weight."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(1)
    c = shape[1]
    inputs = (ms.Tensor(rng.randn(*shape).astype(np.float32) * 2 + 0.5),
              ms.Tensor((rng.rand(c) + 0.5).astype(np.float32)), ms.Tensor(rng.randn(c).astype(np.float32)),
              ms.Tensor(rng.randn(c, 1, 3, 3).astype(np.float32)))
    out_shape = (*shape[:2], (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1)
    dy = (ms.Tensor(rng.randn(*out_shape).astype(np.float32)), ms.Tensor(np.zeros(c, np.float32)),
          ms.Tensor(np.zeros(c, np.float32)))
    results = []
    for fused in (True, False):
        outs, vjp_fn = ms.vjp(_NormGeluDw(act, stride, fused), *inputs)
        results.append([o.asnumpy() for o in outs] + [g.asnumpy() for g in vjp_fn(dy)])
    assert results[0][0].shape == out_shape
    _assert_all_close(results[0], results[1])


def test_fused_batchnorm_gelu_depthwise_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="act must be 'gelu' or 'gelu_tanh', got None"):
        kernels.batchnorm_depthwise(None, 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        kernels.batchnorm_depthwise("gelu", 3)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 4, 1, 1)])
def test_conv1x1_bias_gradient_kernel_equals_stock(mode, shape):
    """Output and the gradients of the input, the weight and the bias, fused against MindSpore's ops."""
    ms.set_context(mode=mode)
    try:
        rng = np.random.RandomState(0)
        x = ms.Tensor(rng.randn(*shape).astype(np.float32))
        dy = ms.Tensor(rng.randn(shape[0], 6, *shape[2:]).astype(np.float32))
        weight, bias = rng.randn(6, shape[1], 1, 1).astype(np.float32), rng.randn(6).astype(np.float32)
        results = []
        for on in (True, False):
            conv = Conv1x1(shape[1], 6)
            conv.weight.set_data(ms.Tensor(weight))
            conv.bias.set_data(ms.Tensor(bias))
            conv.set_fused(on)
            assert (conv.fused is not None) == on
            y, vjp_fn = ms.vjp(conv, x, weights=[conv.weight, conv.bias])
            dx, (dw, db) = vjp_fn(dy)
            dx = dx[0] if isinstance(dx, tuple) else dx
            results.append([y.asnumpy(), dx.asnumpy(), dw.asnumpy(), db.asnumpy()])
        _assert_all_close(results[0], results[1])
        np.testing.assert_allclose(results[0][3], dy.asnumpy().sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_depthwise_stride_other_than_1_or_2_is_refused():
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        kernels.depthwise_conv3x3(3)


class _SoftmaxStock(nn.Cell):
    def construct(self, x):
        return ops.softmax(x, axis=-1)


@pytest.mark.parametrize("fused", [True, False])
def test_softmax_gradient_equals_stock(fused):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(2, 3, 49, 49).astype(np.float32) * 3)
    dy = ms.Tensor(rng.randn(2, 3, 49, 49).astype(np.float32))
    results = [_output_and_input_grads(cell, (x,), dy)
               for cell in (_kernel_or_stock(Softmax(), fused), _SoftmaxStock())]
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _BiasSoftmax(nn.Cell):
    def __init__(self, fused: bool):
        super().__init__()
        self.op = kernels.bias_softmax() if fused else None
        assert self.op is not None or not fused, "the fused kernel must build on the CPU test machine"

    def construct(self, x, bias):
        return self.op(x, bias) if self.op is not None else ops.softmax(x + bias, axis=-1)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_bias_softmax_equals_stock_forward_and_gradients(mode):
    """softmax(scores + relative-position bias) fused: output and the gradients of the scores and of the
    bias (summed over the batch), against MindSpore's add and softmax; large scores, a row of -1e30 masks."""
    ms.set_context(mode=mode)
    rng = np.random.RandomState(0)
    x = rng.randn(3, 4, 49, 49).astype(np.float32) * 8
    x[0, 0, 0, :] = -1e30  # every entry equal: the maximum subtracted leaves exp(0) = 1 each
    x[1, 2, 5, :] = 80.0 + rng.randn(49)  # exp would overflow without the maximum subtracted
    bias = rng.randn(1, 4, 49, 49).astype(np.float32)
    dy = ms.Tensor(rng.randn(3, 4, 49, 49).astype(np.float32))
    try:
        results = [_output_and_input_grads(_BiasSoftmax(fused), (ms.Tensor(x), ms.Tensor(bias)), dy)
                   for fused in (True, False)]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert results[0][2].shape == (1, 4, 49, 49)
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("size", [(8, 6), (7, 9)])
def test_avg_pool2x2_equals_stock_forward_and_gradient(mode, size):
    """The fused 2x2 average pool against MindSpore's nn.AvgPool2d(2, 2): output and input gradient, even
    sizes and odd ones (the last row / column left out, its gradient zero)."""
    ms.set_context(mode=mode)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(3, 70, *size).astype(np.float32))
    dy = ms.Tensor(rng.randn(3, 70, size[0] // 2, size[1] // 2).astype(np.float32))
    try:
        results = [_output_and_input_grads(cell, (x,), dy)
                   for cell in (_kernel_or_stock(AvgPool2x2(), True), nn.AvgPool2d(2, 2), use_stock_ops(AvgPool2x2()))]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for fused, stock in ((results[0], results[1]), (results[2], results[1])):
        for a, b in zip(fused, stock, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if size[0] % 2:
        assert not results[0][1][:, :, -1, :].any() and not results[0][1][:, :, :, -1].any()


class _GateStock(nn.Cell):
    def construct(self, x, g):
        return x * g


@pytest.mark.parametrize("fused", [True, False])
def test_channel_gate_equals_stock_forward_and_gradients(fused):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(3, 5, 9, 7).astype(np.float32))
    g = ms.Tensor(rng.rand(3, 5, 1, 1).astype(np.float32))
    dy = ms.Tensor(rng.randn(3, 5, 9, 7).astype(np.float32))
    results = [_output_and_input_grads(cell, (x, g), dy)
               for cell in (_kernel_or_stock(ChannelGate(), fused), _GateStock())]
    for a, b in zip(results[0], results[1], strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 16, 28, 28), (3, 2, 1, 1)])
def test_fused_batchnorm_act_equals_stock_in_training_and_eval(shape, act):
    """Output and gradients of x / gamma / beta for two training steps, the running statistics they
    leave, then output and gradients in eval mode (the running statistics applied)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    gamma, beta = rng.rand(shape[1]).astype(np.float32) + 0.5, rng.randn(shape[1]).astype(np.float32)
    results = []
    for fused in (True, False):
        # The original network's BatchNorm (momentum 0.99) with its tanh GELU; timm's (0.9) otherwise.
        momentum = 0.99 if act == "gelu_tanh" else 0.9
        cell = _kernel_or_stock(BatchNormAct2d(shape[1], act, eps=1e-3, momentum=momentum), fused)
        cell.bn.gamma.set_data(ms.Tensor(gamma))
        cell.bn.beta.set_data(ms.Tensor(beta))
        data = np.random.RandomState(1)
        out = []
        for training in (True, True, False):
            cell.set_train(training)
            x = ms.Tensor(data.randn(*shape).astype(np.float32) * 2 + 1)
            dy = ms.Tensor(data.randn(*shape).astype(np.float32))
            out += _output_and_norm_grads(cell, x, dy)
            if training:
                out += [cell.bn.moving_mean.asnumpy(), cell.bn.moving_variance.asnumpy()]
        results.append(out)
    _assert_all_close(*results)


class _BatchNormGeluTanh(nn.Cell):
    """``nn.BatchNorm2d`` then ``ops.gelu(approximate="tanh")`` or, when ``fused``, the kernels of
    ``kernels.batchnorm_train("gelu_tanh")`` and ``batchnorm_inference`` on the same parameters: the batch
    statistics in training (leaving the running ones alone), the running ones in eval."""

    def __init__(self, channels: int, eps: float, fused: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps)
        self.fused = kernels.batchnorm_train("gelu_tanh") if fused else None
        self.fused_inference = kernels.batchnorm_inference("gelu_tanh") if fused else None
        self.eps = ms.Tensor(np.array([eps], np.float32))

    def construct(self, x):
        if self.fused is None:
            return ops.gelu(self.bn(x), approximate="tanh")
        if self.training:
            return self.fused(x, self.bn.gamma, self.bn.beta, self.eps)[0]
        scale = self.bn.gamma / ops.sqrt(self.bn.moving_variance + self.eps)
        return self.fused_inference(x, scale, self.bn.beta - self.bn.moving_mean * scale)


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 16, 28, 28), (3, 2, 1, 1)])
def test_fused_batchnorm_gelu_tanh_equals_stock_in_training_and_eval(shape):
    """Output and gradients of x / gamma / beta for a training step and in eval mode (given running
    statistics), and the batch statistics the training kernel returns."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    channels = shape[1]
    # Normalised values spread over about [-30, 30]: both saturated tails of the tanh form and the bend.
    gamma, beta = rng.rand(channels).astype(np.float32) * 6 + 0.5, rng.randn(channels).astype(np.float32) * 4
    moving_mean, moving_var = rng.randn(channels).astype(np.float32), rng.rand(channels).astype(np.float32) + 0.5
    data = np.random.RandomState(1)
    steps = [(training, data.randn(*shape).astype(np.float32) * 2 + 1, data.randn(*shape).astype(np.float32))
             for training in (True, False)]
    results = []
    for fused in (True, False):
        cell = _BatchNormGeluTanh(channels, eps=1e-3, fused=fused)
        assert not fused or None not in (cell.fused, cell.fused_inference), \
            "the fused kernel must build on the CPU test machine"
        cell.bn.gamma.set_data(ms.Tensor(gamma))
        cell.bn.beta.set_data(ms.Tensor(beta))
        out = []
        for training, x, dy in steps:
            cell.set_train(training)
            # set before each step: the stock cell's training step updates them, the fused one's does not
            cell.bn.moving_mean.set_data(ms.Tensor(moving_mean))
            cell.bn.moving_variance.set_data(ms.Tensor(moving_var))
            out += _output_and_norm_grads(cell, ms.Tensor(x), ms.Tensor(dy))
        results.append(out)
    _assert_all_close(*results)

    x = steps[0][1]
    _, mean, var = kernels.batchnorm_train("gelu_tanh")(ms.Tensor(x), ms.Tensor(gamma), ms.Tensor(beta),
                                                     ms.Tensor(np.array([1e-3], np.float32)))
    np.testing.assert_allclose(mean.asnumpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.asnumpy(), x.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 96, 14, 14), (1, 1, 1, 1), (2, 7, 9, 15)])
def test_fused_layernorm2d_equals_stock_forward_and_gradients(shape):
    """(3, 96, 14, 14): 196 positions, more than one block of 64 and not a multiple of it."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    gamma, beta = rng.rand(shape[1]).astype(np.float32) + 0.5, rng.randn(shape[1]).astype(np.float32)
    x = ms.Tensor(rng.randn(*shape).astype(np.float32) * 3 + 2)  # mean far from 0: no cancellation
    dy = ms.Tensor(rng.randn(*shape).astype(np.float32))
    results = []
    for fused in (True, False):
        cell = _kernel_or_stock(LayerNorm2d(shape[1], eps=1e-6), fused)
        cell.gamma.set_data(ms.Tensor(gamma))
        cell.beta.set_data(ms.Tensor(beta))
        results.append(_output_and_norm_grads(cell, x, dy))
    _assert_all_close(*results)


_ISA_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import src
import mindspore as ms
import numpy as np
from mindspore import nn
from src.cell_wrapper import TrainStep
from src.coatnet import create_model
from src.kernels import use_fused_kernels

ms.set_context(mode=ms.GRAPH_MODE)
net = use_fused_kernels(create_model(sys.argv[2], num_classes=10, image_size=32, drop_path_rate=0.0))
print("ONEDNN_MAX_CPU_ISA", os.environ.get("ONEDNN_MAX_CPU_ISA"), flush=True)
net.set_train(True)
step = TrainStep(net, nn.AdamWeightDecay(net.trainable_params(), 1e-3))
rng = np.random.RandomState(0)
step(ms.Tensor(rng.randn(2, 3, 32, 32).astype(np.float32)), ms.Tensor(np.full((2, 10), 0.1, np.float32)))
"""


def _convolutions_run(tmp_path, model: str, **env) -> tuple[str, set[str]]:
    """(ONEDNN_MAX_CPU_ISA after the model was built, oneDNN's convolution implementations) of one train
    step of ``model`` in a fresh process that starts with the variable unset, as a user's run does."""
    script = tmp_path / "isa_child.py"
    script.write_text(_ISA_CHILD)
    child_env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    child_env.update(ONEDNN_VERBOSE="1", **env)
    out = subprocess.run([sys.executable, str(script), ROOT, model], env=child_env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    isa = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("ONEDNN_MAX_CPU_ISA"))
    impls = {line.split(",")[6] for line in out.stdout.splitlines()
             if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line}
    return isa, impls


def _cpu_has_avx512() -> bool:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return " avx512f" in f.read()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["coatnet_tiny", "coatnet_nano_rw_224"])
def test_fused_model_lifts_the_isa_cap_and_runs_no_reference_convolution(tmp_path, model):
    """Every k x k or strided convolution of the fused model is a kernel or a 1x1 convolution, so the AVX2
    cap is lifted: 1x1 convolutions take oneDNN's AVX-512 path where the CPU has it, none its reference path."""
    isa, impls = _convolutions_run(tmp_path, model)
    assert isa == "None" and impls
    assert not [i for i in impls if "ref" in i], impls
    if _cpu_has_avx512():
        assert [i for i in impls if "avx512" in i], impls


@pytest.mark.slow
def test_stock_ops_keep_the_avx2_cap(tmp_path):
    isa, impls = _convolutions_run(tmp_path, "coatnet_tiny", COATNET_CPU_KERNELS="0")
    assert isa == "AVX2" and impls
    assert not [i for i in impls if "ref" in i or "avx512" in i], impls


def test_a_users_isa_setting_is_never_changed(monkeypatch):
    import src

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.setattr(src, "_ISA_CAP_IS_OURS", False)
    src.set_cpu_isa_cap(False)
    src.set_cpu_isa_cap(True)
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    monkeypatch.setattr(src, "_ISA_CAP_IS_OURS", True)
    src.set_cpu_isa_cap(False)
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ
    src.set_cpu_isa_cap(True)
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
