"""The compiled train step: EMA, loss-scale overflow handling, clip-norm; and the lr schedule."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.cell_wrapper import AdamWeightDecay, TrainStep, adam_weight_decay
from src.coatnet import create_model
from src.train_state import create_ema
from src.utils import canonical_names, lr_schedule, param_groups


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def _batch(seed=0, n=4):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 3, 32, 32).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.randint(0, 10, n)] * 0.9 + 0.01
    return ms.Tensor(x), ms.Tensor(y)


def _setup(ema_decay=None, clip=1.0, optimizer="adamw", lr=1e-3, loss_scale=2.0 ** 24):
    ms.set_seed(0)
    net = create_model("coatnet_tiny", num_classes=10, image_size=32, drop_path_rate=0.0)
    net.set_train(True)
    names = canonical_names(net)
    params = net.trainable_params()
    if optimizer == "sgd":
        opt = nn.SGD(params, learning_rate=lr)
    else:
        opt = nn.AdamWeightDecay(param_groups(params, 0.05, names), learning_rate=lr, eps=1e-6)
    all_params = list(net.get_parameters())
    ema = None
    if ema_decay is not None:
        ema = create_ema(all_params, names)
    step = TrainStep(net, opt, loss_scale=loss_scale, clip_norm=clip, ema_params=ema,
                     model_params=tuple(all_params) if ema else None, ema_decay=ema_decay or 0.0)
    return net, step, ema, all_params


def _values(params):
    return [p.asnumpy().copy() for p in params]


def test_ema_follows_the_formula_over_two_steps():
    d = 0.7
    net, step, ema, params = _setup(ema_decay=d)
    w0 = _values(params)
    step(*_batch(0))
    w1 = _values(params)
    step(*_batch(1))
    w2 = _values(params)
    got = _values(ema)
    for name_p, a, b, c, e in zip(params, w0, w1, w2, got, strict=True):
        expected = d * (d * a + (1 - d) * b) + (1 - d) * c
        np.testing.assert_allclose(e, expected, rtol=1e-5, atol=1e-6, err_msg=name_p.name)
    moved = [not np.allclose(e, c) for e, c in zip(got, w2, strict=True)]
    assert sum(moved) > len(moved) // 2  # the EMA weights differ from the raw weights
    # BatchNorm statistics are averaged too
    bn = [i for i, p in enumerate(params) if p.name.endswith("moving_mean")]
    assert bn and not np.allclose(got[bn[0]], w0[bn[0]])


def test_non_finite_gradient_skips_the_update_and_halves_the_scale():
    net, step, ema, params = _setup(ema_decay=0.9, loss_scale=1024.0)
    step(*_batch(0))
    assert float(step.loss_scale.asnumpy()) == 1024.0
    trainable = [p for p in params if p.requires_grad]
    before, ema_before = _values(trainable), _values(ema)
    moments_before = _values(step.optimizer.moments1)
    x, y = _batch(1)
    bad = x.asnumpy()
    bad[0, 0, 0, 0] = np.inf
    loss, finite, _, _ = step(ms.Tensor(bad), y)
    assert not bool(finite.asnumpy())
    assert float(step.loss_scale.asnumpy()) == 512.0
    for a, p in zip(before, trainable, strict=True):
        assert np.isfinite(p.asnumpy()).all()
        np.testing.assert_array_equal(p.asnumpy(), a, err_msg=p.name)
    for a, e in zip(ema_before, ema, strict=True):
        np.testing.assert_array_equal(e.asnumpy(), a)
    for a, m in zip(moments_before, step.optimizer.moments1, strict=True):
        np.testing.assert_array_equal(m.asnumpy(), a)
    # training goes on normally after the skipped step
    _, finite, _, _ = step(*_batch(2))
    assert bool(finite.asnumpy())


def test_loss_scale_grows_after_the_window():
    net, step, _, _ = _setup(loss_scale=8.0)
    step.scale_window = 2
    step2 = TrainStep(net, step.optimizer, loss_scale=8.0, scale_window=2)
    for i in range(2):
        step2(*_batch(i))
    assert float(step2.loss_scale.asnumpy()) == 16.0
    assert int(step2.good_steps.asnumpy()) == 0


_NORMS = ["kernel", "matmul", "square_sum"]  # the CPU's fused kernel, its fallback, the other devices' formulation


def _use_norm(step, how):
    assert step.sum_of_squares is not None  # CPU with a compiler: the kernel is the default
    if how != "kernel":
        step.sum_of_squares = None
        step.norm_as_matmul = how == "matmul"


def test_the_three_gradient_norm_formulations_agree():
    norms = []
    for how in _NORMS:
        _, step, _, _ = _setup(optimizer="sgd")
        _use_norm(step, how)
        norms.append(float(step(*_batch(0))[3].asnumpy()))
    assert norms[0] > 0
    np.testing.assert_allclose(norms, norms[0], rtol=2e-6)


@pytest.mark.parametrize("how", _NORMS)
def test_clip_norm_bounds_the_applied_gradient(how):
    clip = 0.01
    net, step, _, params = _setup(clip=clip, optimizer="sgd", lr=1.0)
    _use_norm(step, how)
    trainable = [p for p in params if p.requires_grad]
    before = _values(trainable)
    _, finite, _, grad_norm = step(*_batch(0))
    delta = np.sqrt(sum(((p.asnumpy() - b) ** 2).sum() for p, b in zip(trainable, before, strict=True)))
    assert float(grad_norm.asnumpy()) > 10 * clip  # the raw gradient was much larger
    assert delta <= clip * 1.001
    assert delta >= clip * 0.99  # and the update is the clipped gradient, not zero


def test_lr_schedule_warmup_peak_and_final():
    lr = lr_schedule(1e-3, 1e-5, warmup_epochs=2, num_epochs=10, steps_per_epoch=5)
    assert lr.shape == (50,)
    # Warm-up from lr_min as the original's get_lr: lr_min + (lr_max - lr_min) * i / warmup_steps.
    for i in (0, 1, 9):
        assert lr[i] == pytest.approx(1e-5 + (1e-3 - 1e-5) * i / 10)
    assert lr[10] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr.max() == pytest.approx(1e-3)
    assert lr[-1] == pytest.approx(1e-5)  # and ends exactly at lr_min
    assert np.all(np.diff(lr[10:]) <= 0)
    const = lr_schedule(5e-5, 5e-5, 0, 3, 4)
    np.testing.assert_allclose(const, 5e-5)


def test_weight_decay_only_on_kernels():
    net = create_model("coatnet_tiny", num_classes=10, image_size=32)
    names = canonical_names(net)
    groups = param_groups(net.trainable_params(), 0.05, names)
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "stages.0.blocks.0.conv1_1x1.weight" in decayed and "head.fc.weight" in decayed
    assert "stem.norm1.bn.gamma" in plain and "head.fc.bias" in plain
    assert "stages.2.blocks.0.attn.rel_pos.relative_position_bias_table" in plain
    assert "stages.2.blocks.0.norm1.norm.gamma" in plain


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_cpu_adamw_equals_mindspores_adam_weight_decay(mode):
    """The CPU optimizer (decay kernel + Adam kernel without bias correction) makes MindSpore's
    AdamWeightDecay update: over three steps of a decay and a no-decay group with a per-step lr, both
    moments bit-identical and the weights within float32 rounding; and the weights did move, decayed
    ones further than the plain AdamW step would take them without decay."""
    ms.set_context(mode=mode)
    assert isinstance(adam_weight_decay([ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")],
                                        1e-3, 0.9, 0.999, 1e-8), AdamWeightDecay)
    rng = np.random.RandomState(0)
    shapes = [(8, 4, 3, 3), (16,), (5, 7)]
    start = [rng.randn(*s).astype(np.float32) for s in shapes]
    grads = [[ms.Tensor(rng.randn(*s).astype(np.float32)) for s in shapes] for _ in range(3)]
    lr = ms.Tensor(np.array([1e-2, 5e-3, 2e-3], np.float32))
    results = []
    for cls, wd in ((nn.AdamWeightDecay, 0.5), (AdamWeightDecay, 0.5), (AdamWeightDecay, 0.0)):
        params = [ms.Parameter(ms.Tensor(a.copy()), name=f"p{i}.weight") for i, a in enumerate(start)]
        groups = [{"params": params[::2], "weight_decay": wd}, {"params": params[1:2], "weight_decay": 0.0},
                  {"order_params": params}]
        opt = cls(groups, learning_rate=lr, beta1=0.9, beta2=0.999, eps=1e-6)
        for g in grads:
            opt(tuple(g))
        results.append([_values(params), _values(opt.moments1), _values(opt.moments2)])
    (stock_p, stock_m, stock_v), (ours_p, ours_m, ours_v), (plain_p, _, _) = results
    for a, b in zip(stock_m + stock_v, ours_m + ours_v, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b, s in zip(stock_p, ours_p, start, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        assert not np.allclose(b, s)
    decayed = [np.abs(ours_p[i] - plain_p[i]).max() for i in (0, 2)]
    assert min(decayed) > 1e-4 and np.array_equal(ours_p[1], plain_p[1])


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_compile_for_then_step_equals_a_plain_step(mode):
    """compile_for (graph mode: compile, then free the compiler's memory; PyNative: nothing) leaves
    the step's results unchanged."""
    ms.set_context(mode=mode)
    results = []
    for compile_first in (True, False):
        _, step, _, params = _setup()
        if compile_first:
            step.compile_for(*_batch(0))
        loss, finite, _, grad_norm = step(*_batch(0))
        results.append([loss.asnumpy(), grad_norm.asnumpy(), *_values(params)])
        assert bool(finite.asnumpy())
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_benchmark_builds_its_step_with_the_trainers_function(monkeypatch):
    """bench/bench_train.py measures the step train.py runs: both come from src.trainer.build_train_step."""
    import os
    import sys

    import src.trainer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_train

    built = []

    def recording(*args, **kwargs):
        parts = real(*args, **kwargs)
        built.append(parts.step_cell)
        return parts

    real = src.trainer.build_train_step
    monkeypatch.setattr(src.trainer, "build_train_step", recording)
    mode, jit = ms.get_context("mode"), ms.get_context("jit_config")
    try:
        step, net = bench_train.build_ours("coatnet_tiny", 2, 32)  # sets graph mode and jit_level O1
        assert len(built) == 1 and isinstance(built[0], TrainStep)
        assert np.isfinite(step())  # and it is the step the bench times
    finally:
        ms.set_context(mode=mode, jit_config=jit)
    assert built[0].clip and built[0].use_ema and built[0].ema_decay == 0.9999


@pytest.mark.parametrize("fused", [True, False])
def test_one_forward_per_step_moves_batchnorm_statistics_once(fused):
    """The step computes the loss and the gradients in one forward pass: BatchNorm's running statistics
    take one momentum update per step (a separate loss pass beside the gradient pass ran the forward,
    and so the update, twice)."""
    from src.coatnet import BatchNormAct2d
    from src.kernels import use_fused_kernels, use_stock_ops

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm = BatchNormAct2d(4, None, momentum=0.5)
            self.head = nn.Dense(4, 10)

        def construct(self, x):
            return self.head(self.norm(x).mean(axis=(2, 3)))

    net = Net()
    (use_fused_kernels if fused else use_stock_ops)(net)
    assert (net.norm.fused is not None) == fused
    net.set_train(True)
    step = TrainStep(net, nn.AdamWeightDecay(net.trainable_params(), 1e-3), clip_norm=None)
    x = np.random.RandomState(0).randn(8, 4, 5, 5).astype(np.float32) + 3.0
    loss, finite, _, _ = step(ms.Tensor(x), ms.Tensor(np.full((8, 10), 0.1, np.float32)))
    assert bool(finite) and np.isfinite(loss.asnumpy())
    batch_mean = x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(net.norm.bn.moving_mean.asnumpy(), 0.5 * batch_mean, rtol=1e-5)  # twice: 0.75
