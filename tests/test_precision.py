"""Float16 mixed precision that trains (src/precision.py through the train step of src/cell_wrapper.py),
on CPU with coatnet_tiny at 32x32 and real JPEG files; and the MindSpore 2.10 bugs it works around."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops
from PIL import Image
from runs import ROOT, TINY, make_color_tree, run

from src.cell_wrapper import TrainStep
from src.checkpoint import load_checkpoint, load_into, model_weights
from src.coatnet import create_model
from src.model_utils.config import ConfigError, load_config
from src.precision import apply_precision
from src.train_state import create_ema
from src.utils import canonical_names, param_groups

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="module")
def jpeg_batches(tmp_path_factory):
    """Three batches of 8 real 32x32 JPEGs (3 colour classes), normalised as the pipeline does."""
    root = make_color_tree(str(tmp_path_factory.mktemp("fp16") / "data"), NUM_CLASSES, train_per_class=8,
                           val_per_class=0)
    files = sorted((c, os.path.join(root, "train", d, f)) for c, d in enumerate(sorted(os.listdir(f"{root}/train")))
                   for f in os.listdir(os.path.join(root, "train", d)))
    order = np.random.RandomState(0).permutation(len(files))
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    images = np.stack([(np.asarray(Image.open(files[i][1]).convert("RGB")) - mean) / std for i in order])
    images = images.transpose(0, 3, 1, 2).astype(np.float32)
    targets = np.eye(NUM_CLASSES, dtype=np.float32)[[files[i][0] for i in order]] * 0.9 + 0.1 / NUM_CLASSES
    return [(Tensor(images[i:i + 8]), Tensor(targets[i:i + 8])) for i in range(0, len(files), 8)]


def _train_step(amp_level, *, loss_scale=2.0 ** 24, clip=1.0, ema_decay=0.9, sgd_lr=None):
    ms.set_seed(0)
    net = create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32, drop_path_rate=0.0)
    names = canonical_names(net)
    net = apply_precision(net, amp_level, "float16")
    net.set_train(True)
    params = net.trainable_params()
    if sgd_lr is not None:
        opt = nn.SGD(params, learning_rate=sgd_lr)
    else:
        opt = nn.AdamWeightDecay(param_groups(params, 0.05, names), learning_rate=5e-4, eps=1e-6)
    all_params = list(net.get_parameters())
    ema = create_ema(all_params, names)
    step = TrainStep(net, opt, loss_scale=loss_scale, clip_norm=clip, ema_params=ema,
                     model_params=tuple(all_params), ema_decay=ema_decay)
    return step, params, all_params, ema


def _values(params):
    return [p.asnumpy().copy() for p in params]


@pytest.mark.parametrize("amp_level", ["O2", "O3"])
def test_float16_steps_skip_overflows_halving_the_scale_then_train(amp_level, jpeg_batches):
    step, trainable, _, ema = _train_step(amp_level)
    losses, scales, leading_overflows = [], [], 0
    for i in range(33):
        before = _values(trainable) + _values(ema) + _values(step.optimizer.moments1)
        loss, finite, scale, _ = step(*jpeg_batches[i % len(jpeg_batches)])
        after = _values(trainable) + _values(ema) + _values(step.optimizer.moments1)
        scales.append(float(scale.asnumpy()))
        if bool(finite.asnumpy()):
            assert float(step.loss_scale.asnumpy()) == scales[-1]
            assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
            losses.append(float(loss.asnumpy()))
        else:
            assert float(step.loss_scale.asnumpy()) == scales[-1] / 2
            for a, b in zip(before, after, strict=True):
                np.testing.assert_array_equal(a, b)  # weights, EMA and AdamW moments untouched
            leading_overflows += not losses
    # At 2^24 the float16 backward overflows: the scale halves step by step until it does not.
    assert leading_overflows >= 3
    assert scales[:leading_overflows + 1] == [2.0 ** (24 - i) for i in range(leading_overflows + 1)]
    assert len(losses) >= 24
    for p in trainable + list(ema):
        assert np.isfinite(p.asnumpy()).all(), p.name
    # Three consecutive steps see the three batches: the first applied ones against the last.
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_pynative_o3_float16_step_is_finite_once_the_scale_fits(jpeg_batches):
    """PyNative's to_float casts every operator's inputs inside a cell: LayerNorm2d must stay a float32 cell
    there, or its float16 statistics make every gradient NaN at any scale."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    step, trainable, _, _ = _train_step("O3", loss_scale=2.0 ** 18)
    before = _values(trainable)
    for i in range(4):
        _, finite, _, grad_norm = step(*jpeg_batches[i % len(jpeg_batches)])
        if bool(finite.asnumpy()):
            break
    assert bool(finite.asnumpy()) and np.isfinite(float(grad_norm.asnumpy()))
    assert any(not np.array_equal(a, p.asnumpy()) for a, p in zip(before, trainable, strict=True))


@pytest.fixture(scope="module")
def original_scheme_step(jpeg_batches):
    """One applied float16 step of the original's scheme with SGD (lr 1), clip 0.01 and EMA decay 0.7."""
    ms.set_context(mode=ms.GRAPH_MODE)
    step, trainable, all_params, ema = _train_step("original", loss_scale=2.0 ** 10, clip=0.01, ema_decay=0.7,
                                                   sgd_lr=1.0)
    w0 = _values(all_params)
    _, finite, _, grad_norm = step(*jpeg_batches[0])
    assert bool(finite.asnumpy())
    return w0, _values(all_params), _values(ema), float(grad_norm.asnumpy()), [p.requires_grad for p in all_params]


def test_float16_clip_bounds_the_applied_gradient(original_scheme_step):
    w0, w1, _, grad_norm, trainable = original_scheme_step
    delta = np.sqrt(sum(((b - a) ** 2).sum() for a, b, t in zip(w0, w1, trainable, strict=True) if t))
    assert grad_norm > 10 * 0.01  # the raw gradient was much larger than the bound
    assert 0.99 * 0.01 <= delta <= 1.001 * 0.01


def test_float16_ema_follows_the_formula(original_scheme_step):
    w0, w1, ema, _, _ = original_scheme_step
    for a, b, e in zip(w0, w1, ema, strict=True):
        assert e.dtype == np.float32
        np.testing.assert_allclose(e, 0.7 * a + 0.3 * b, rtol=1e-5, atol=1e-7)
    assert sum(not np.allclose(e, b) for e, b in zip(ema, w1, strict=True)) > len(ema) // 2


@pytest.mark.parametrize("amp_level", ["original", "O2", "O3"])
def test_parameters_keep_their_names_order_and_float32(amp_level):
    plain = create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32)
    net = create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32)
    names = canonical_names(net)
    wrapped = apply_precision(net, amp_level, "float16")
    got = list(wrapped.get_parameters())
    # The trainer pairs EMA / eval weights with a fresh float32 model by position and saves by these names.
    assert [names[id(p)] for p in got] == [p.name for p in plain.get_parameters()]
    assert [p.name for p in got] == [p.name for p in plain.get_parameters()]
    assert {p.dtype for p in got} == {ms.float32}


def test_amp_level_default_follows_the_device_and_o1_is_refused():
    assert load_config([]).amp_level == "O0"  # CPU: float32, its fastest
    assert load_config(["--device_target=GPU"]).amp_level == "original"
    assert load_config(["--device_target=Ascend"]).amp_level == "original"
    assert load_config(["--device_target=GPU", "--amp_level=O3"]).amp_level == "O3"
    with pytest.raises(ConfigError, match="O1 cannot run on MindSpore 2.10") as err:
        load_config(["--amp_level=O1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'O1' is not one of O0, original, O2, O3"):
        apply_precision(create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32), "O1")


class _Table(nn.Cell):
    def __init__(self):
        super().__init__()
        self.table = Parameter(Tensor(np.ones((9, 2), np.float32)), name="table")
        self.index = Tensor(np.arange(16) % 9, ms.int32)

    def construct(self):
        return ops.gather(self.table.transpose(1, 0), self.index, 1).reshape(1, 2, 4, 4)


class _AddWithBprop(nn.Cell):
    def construct(self, x, bias):
        return x + bias

    def bprop(self, x, bias, out, dout):
        return dout, dout.sum(axis=0, keepdims=True)


class _Scores(nn.Cell):
    def __init__(self):
        super().__init__()
        self.bias = _Table()
        self.add = _AddWithBprop()

    def construct(self, x):
        return self.add(x.astype(ms.float32), self.bias()).sum()


def test_mindspore_custom_bprop_gradient_dtype_bug_is_still_there():
    """MindSpore 2.10: a float16 cell with its own bprop, given a float32 input, hands a float32 parameter a
    float16 gradient that a Cast to float32 does not change. When this fails, MindSpore has fixed it:
    BatchBroadcastAdd need no longer stay float32 at every level in src/precision.py (if O2/O3 still train)."""
    net = _Scores().to_float(ms.float16)
    weights = ms.ParameterTuple(net.trainable_params())

    class Grads(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net
            self.grad = ops.GradOperation(get_by_list=True)

        def construct(self, x):
            return [ops.cast(g, ms.float32) for g in self.grad(self.net, weights)(x)]

    (grad,) = Grads()(Tensor(np.ones((3, 2, 4, 4), np.float32)))
    assert grad.dtype == ms.float16


class _CastInside(nn.Cell):
    def construct(self, x):
        return x.astype(ms.float32) * 1.0


def test_mindspore_pynative_to_float_still_overrides_casts_inside_a_cell():
    """MindSpore 2.10, PyNative: inside a to_float(float16) cell an operator gets float16 even after an explicit
    astype(float32) (graph mode keeps the float32). When this fails, LayerNorm2d may go back to float16 at O3 in
    src/precision.py (if the O3 tests still pass)."""
    cell = _CastInside().to_float(ms.float16)
    x = Tensor(np.ones((2, 3), np.float32))
    assert cell(x).dtype == ms.float32
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert cell(x).dtype == ms.float16


def test_mindspore_o1_rewrite_still_fails_on_this_network(tmp_path):
    """MindSpore 2.10's O1 rewrite cannot rebuild CoAtNet (DepthwiseConv2d, Conv3x3, StridedConv1x1 and Conv1x1
    subclass nn.Conv2d; the rewritten class it calls, Conv2dOpt or the ConvMlpOpt holding Conv1x1s, is wrongly
    declared or not at all), leaving a rewritten_network/ folder in the working directory. When this fails,
    MindSpore has fixed it: allow O1 in src/model_utils/config.py and src/precision.py."""
    code = ("import mindspore as ms; from src.coatnet import create_model; "
            "ms.amp.auto_mixed_precision(create_model('coatnet_tiny', num_classes=3, image_size=32), 'O1')")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(("TypeError", "NameError")) and ("Conv2dOpt" in last or "ConvMlpOpt" in last), last
    assert os.path.isdir(tmp_path / "rewritten_network")


@pytest.mark.slow
def test_train_py_o1_is_refused_in_one_line_without_a_rewrite_folder(tmp_path):
    had_folder = os.path.exists(os.path.join(ROOT, "rewritten_network"))
    res = run("train.py", f"--data_path={tmp_path}", f"--output_path={tmp_path}/out", *TINY, "--amp_level=O1",
              check=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "O1 cannot run on MindSpore 2.10" in err[0]
    assert had_folder or not os.path.exists(os.path.join(ROOT, "rewritten_network"))


@pytest.mark.slow
def test_train_py_float16_o2_run_recovers_from_overflow_trains_and_saves_plain_float32_weights(tmp_path):
    data = make_color_tree(str(tmp_path / "data"), NUM_CLASSES, train_per_class=16)
    out = str(tmp_path / "out")
    run("train.py", f"--data_path={data}", f"--output_path={out}", *TINY, f"--num_classes={NUM_CLASSES}",
        "--amp_level=O2", "--num_epochs=12", "--batch_size=8", "--lr_max=0.001", "--lr_min=0.0001",
        "--rand_augment_num_layers=0", "--eval_interval=12", "--save_checkpoint_epochs=12")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(steps) == 72 and len(epochs) == 12
    # The first steps overflow at 2^24: each is skipped (and logged so), the next one runs at half the scale.
    scales = [s["loss_scale"] for s in steps]
    leading = next(i for i in range(len(scales)) if scales[i + 1] != scales[i] / 2)
    assert leading >= 3 and scales[:leading + 1] == [2.0 ** (24 - i) for i in range(leading + 1)]
    overflows = sum(e["overflow_steps"] for e in epochs)
    assert leading <= overflows <= len(steps) // 4
    log = open(os.path.join(out, "log", "rank_0.log")).read()
    assert log.count("(overflow: step skipped)") == overflows
    # Below the untrained network's loss (chance: ln 3) by a margin over the last three epochs.
    assert np.mean([e["loss"] for e in epochs[-3:]]) < 0.8 * np.log(NUM_CLASSES)
    assert 0.0 <= epochs[-1]["top1"] <= 1.0  # the float16 network evaluates too
    # The checkpoint: plain names, float32, finite; it loads strictly into a float32 model.
    params = load_checkpoint(os.path.join(out, "checkpoints", "epoch_0012.ckpt"))
    weights = model_weights(params)
    net = create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32)
    assert set(weights) == {p.name for p in net.get_parameters()}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in weights.values())
    load_into(net, weights, "fp16 run")
    net.set_train(False)
    logits = net(Tensor(np.zeros((2, 3, 32, 32), np.float32))).asnumpy()
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
