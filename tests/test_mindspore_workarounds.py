"""Canaries for MindSpore 2.10 behaviour the suite works around (docs/mindspore_workarounds.md lists every
workaround and its canary; the canaries not kept beside their feature's tests are here). Each asserts that
MindSpore still behaves as it did: when one fails after an upgrade, its workaround can be retired."""
import os
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
from mindspore import mint, nn, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


class _GeneratorRand(nn.Cell):
    def construct(self, x):
        return x * mint.rand((x.shape[0], 1), dtype=x.dtype)


def test_generator_driven_random_ops_still_have_no_cpu_kernel(graph_mode):
    """Why DropPath takes its noise from the host (src/coatnet.py DropPath, src/cell_wrapper.drop_path_noise):
    the random ops whose state a Generator holds (and a checkpoint could) cannot run on CPU."""
    with pytest.raises(RuntimeError, match="Unsupported op \\[RandExt\\] on CPU"):
        _GeneratorRand()(ms.Tensor(np.ones((4, 1), np.float32)))


def test_loss_scale_train_cell_still_fails_on_cpu(graph_mode):
    """Why src/cell_wrapper.TrainStep checks overflow itself: MindSpore's loss-scale cell needs an NPU op."""
    net = nn.WithLossCell(nn.Dense(3, 2), nn.MSELoss())
    scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 10, scale_factor=2, scale_window=10)
    step = nn.TrainOneStepWithLossScaleCell(net, nn.Momentum(net.trainable_params(), 0.1, 0.9), scale)
    with pytest.raises((RuntimeError, TypeError), match="NPUGetFloatStatusV2"):
        step(ms.Tensor(np.ones((2, 3), np.float32)), ms.Tensor(np.zeros((2, 2), np.float32)))


class _Unfold(nn.Cell):
    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(ksizes=[1, 2, 2, 1], strides=[1, 2, 2, 1], rates=[1, 1, 1, 1], padding="same")

    def construct(self, x):
        return self.unfold(x)


def test_extract_image_patches_still_has_no_cpu_kernel(graph_mode):
    """Why the original's 2x2 'same' max pool (nn.Unfold + ReduceMax) is nn.MaxPool2d here (src/coatnet.py
    _pool2x2): equal on the even sizes a CoAtNet sees, and it runs on CPU."""
    with pytest.raises(RuntimeError, match="ExtractImagePatches"):
        _Unfold()(ms.Tensor(np.ones((1, 2, 4, 4), np.float32)))


def test_cpu_tanh_is_still_an_approximation():
    """Why the fused tanh-GELU kernel and its ONNX form avoid ops.tanh (src/kernels, src/coatnet.py
    src/onnx_export.ExportGELU): MindSpore's CPU Tanh is a rational approximation, off by more than float32 rounding."""
    u = np.linspace(-6.0, 6.0, 2001, dtype=np.float32)
    ours = ops.tanh(ms.Tensor(u)).asnumpy()
    assert np.abs(ours - np.tanh(u.astype(np.float64))).max() > 1e-5


def test_sigint_still_arrives_as_sigterm_after_a_graph_run():
    """Why src/run_control.GracefulStop treats Ctrl-C as SIGTERM (exit 143): after its first graph run
    MindSpore's runtime holds SIGINT and raises SIGTERM for it, again at every run."""
    script = textwrap.dedent("""
        import os, signal, time
        import mindspore as ms
        import numpy as np
        from mindspore import nn
        ms.set_context(mode=ms.GRAPH_MODE)
        got = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
        nn.Dense(2, 2)(ms.Tensor(np.ones((1, 2), np.float32))).asnumpy()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print(got)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['SIGTERM']"


_CONVOLUTIONS = textwrap.dedent("""
    import mindspore as ms, numpy as np
    from mindspore import nn
    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.ones((2, 8, 12, 12), np.float32))
    for conv in (nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 3, group=8), nn.Conv2d(8, 8, 1)):
        conv(x).asnumpy()
    """)


def test_onednn_still_takes_its_reference_path_for_kxk_and_strided_convolutions_on_avx512():
    """Why the suite caps oneDNN at AVX2 unless every k x k and strided convolution is a fused kernel or a
    1x1 convolution (src/__init__.py, src.kernels.use_fused_kernels, Conv3x3, StridedConv1x1): with every
    ISA allowed, MindSpore's bundled oneDNN runs dense 3x3, grouped 3x3 and strided 1x1 convolutions on its
    reference implementation on an AVX-512 CPU (seconds per stem convolution), its plain 1x1 convolution
    on AVX-512 brgemm. On a CPU without AVX-512 the variable changes nothing: no reference path either way."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", _CONVOLUTIONS], env={**env, "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    impls = [line.split(",")[6] for line in out.stdout.splitlines()
             if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line]
    assert len(impls) == 4, out.stdout[-2000:]
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        avx512 = " avx512f" in f.read()
    if avx512:
        assert ["ref" in impl for impl in impls] == [True, True, True, False], impls
        assert "avx512" in impls[3], impls
    else:
        assert not any("ref" in impl for impl in impls), impls
