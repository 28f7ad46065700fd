"""export.py on real files: a seeded coatnet_tiny checkpoint (the original network's design: tanh GELU,
max-pool shortcuts) and one of a timm structure (exact GELU) exported to MINDIR and ONNX give the Python
model's logits, --use_ema exports the EMA weights, a checkpoint of another resolution gets its
relative-position tables resized, and a bad request fails with one line and writes nothing."""
import math
import os
import stat
import subprocess
import sys

import mindspore as ms
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mindspore.train.mind_ir_pb2 import ModelProto
from runs import ROOT, run

from src.checkpoint import load_checkpoint, load_into, model_weights, save_checkpoint
from src.coatnet import GELU, LayerNorm2d, create_model, resize_rel_pos_tables
from src.onnx_export import ERF_STANDIN_OP, prepare_for_export

TINY = ["--model_name=coatnet_tiny", "--num_classes=10", "--image_height=32", "--image_width=32", "--batch_size=2"]


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def _training_checkpoint(model_name: str, path) -> str:
    """A training-style checkpoint: model weights, a different EMA copy and optimizer state."""
    ms.set_seed(0)
    net = create_model(model_name, num_classes=10, image_size=32)
    rng = np.random.RandomState(0)
    weights = {}
    for p in net.get_parameters():
        w = p.asnumpy()
        # Initial tables (std 0.02), BatchNorm statistics (0 / 1) and the original's N(0, 0.01) kernels barely
        # move the logits; trained-like values make a wrong bias gather or a dropped statistic fail the
        # comparisons below.
        if p.name.endswith(".weight") and w.ndim >= 2:
            w = (rng.randn(*w.shape) * np.sqrt(2.0 / np.prod(w.shape[1:]))).astype(np.float32)
        elif p.name.endswith("relative_position_bias_table"):
            w = rng.randn(*w.shape).astype(np.float32)
        elif p.name.endswith("moving_mean"):
            w = (rng.randn(*w.shape) * 0.1).astype(np.float32)
        elif p.name.endswith("moving_variance"):
            w = rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
        weights[p.name] = w
    params = dict(weights)
    params.update({f"ema.{k}": (v * rng.uniform(0.8, 1.2, v.shape)).astype(np.float32) for k, v in weights.items()})
    params.update({f"adam_m.{k}": np.ones_like(v) for k, v in weights.items()})
    params["state.epoch"] = np.array([3], np.int32)
    save_checkpoint(params, str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return _training_checkpoint("coatnet_tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def _input(size: int = 32) -> np.ndarray:
    return np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)


def _python_logits(ckpt: str, x: np.ndarray, use_ema: bool = False, drop_rel_pos: bool = False,
                   model_name: str = "coatnet_tiny") -> np.ndarray:
    net = create_model(model_name, num_classes=10, image_size=x.shape[2:])
    weights = resize_rel_pos_tables(model_weights(load_checkpoint(ckpt), use_ema), net)
    if drop_rel_pos:
        weights = {k: np.zeros_like(v) if k.endswith("bias_table") else v for k, v in weights.items()}
    load_into(net, weights)
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


def _export(ckpt: str, out, name: str, *args: str) -> str:
    res = run("export.py", *TINY, f"--checkpoint_path={ckpt}", f"--file_name={out / name}", *args)
    return res.stdout.strip().splitlines()[-1]


def _mindir_logits(path: str, x: np.ndarray) -> np.ndarray:
    return ms.nn.GraphCell(ms.load(path))(ms.Tensor(x)).asnumpy()


def _onnx_logits(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _mindir_ops(path: str) -> set[str]:
    model = ModelProto()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    return {node.op_type.split("::")[-1].split(":")[0] for node in model.graph.node}


def test_mindir_gives_the_python_models_logits_with_the_exact_ops(ckpt, tmp_path):
    path = _export(ckpt, tmp_path, "tiny", "--file_format=MINDIR")
    assert path == str(tmp_path / "tiny.mindir")
    assert sorted(os.listdir(tmp_path)) == ["tiny.mindir", "tiny.mindir.json"]  # its metadata, no temporary
    x = _input()
    diff = np.abs(_mindir_logits(path, x) - _python_logits(ckpt, x)).max()
    assert diff <= 1e-5, f"max |diff| {diff}"
    # MindSpore's own ops, not the ONNX formulations: the tanh GELU, Rsqrt of LayerNorm2d, the max pool.
    assert {"GeLU", "Rsqrt", "Gather", "Softmax", "MaxPool"} <= _mindir_ops(path)


def test_onnx_gives_the_python_models_logits_including_relative_attention(ckpt, tmp_path):
    mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
    path = _export(ckpt, tmp_path, "tiny", "--file_format=ONNX")
    assert path == str(tmp_path / "tiny.onnx") and sorted(os.listdir(tmp_path)) == ["tiny.onnx", "tiny.onnx.json"]
    # MindSpore's ONNX writer chmods its folder to 0700; export.py keeps that away from the user's.
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == mode
    model = onnx.load(path)
    onnx.checker.check_model(model)
    op_types = [n.op_type for n in model.graph.node]
    assert {"Gather", "Softmax", "MaxPool"} <= set(op_types)
    # The original's tanh GELU needs no Erf (x sigmoid(2u)); no stand-in is left behind.
    assert "Erf" not in op_types and ERF_STANDIN_OP not in op_types and "Sigmoid" in op_types
    x = _input()
    ref = _python_logits(ckpt, x)
    diff = np.abs(_onnx_logits(path, x) - ref).max()
    assert diff <= 1e-4, f"max |diff| {diff}"
    # The comparison can see the relative-position bias: without it the logits move far more.
    assert np.abs(_python_logits(ckpt, x, drop_rel_pos=True) - ref).max() > 1e-2


def test_use_ema_exports_the_ema_weights(ckpt, tmp_path):
    path = _export(ckpt, tmp_path, "ema", "--file_format=MINDIR", "--use_ema=True")
    x = _input()
    got = _mindir_logits(path, x)
    np.testing.assert_allclose(got, _python_logits(ckpt, x, use_ema=True), rtol=0, atol=1e-5)
    assert np.abs(got - _python_logits(ckpt, x)).max() > 1e-3


def test_batch_size_export_sets_the_exported_batch(ckpt, tmp_path):
    """The original's key: the batch of the exported graph (0: batch_size)."""
    path = _export(ckpt, tmp_path, "b3", "--file_format=ONNX", "--batch_size_export=3")
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 32, 32]


def test_onnx_of_a_timm_structure_writes_exact_gelu_as_erf(tmp_path):
    name = "coatnet_nano_rw_224"
    ckpt = _training_checkpoint(name, tmp_path / "nano.ckpt")
    args = [f"--model_name={name}", "--num_classes=10", "--image_height=32", "--image_width=32", "--batch_size=2"]
    res = run("export.py", *args, f"--checkpoint_path={ckpt}", f"--file_name={tmp_path / 'nano'}",
              "--file_format=ONNX")
    path = res.stdout.strip().splitlines()[-1]
    op_types = [n.op_type for n in onnx.load(path).graph.node]
    gelus = sum(isinstance(c, GELU) and c.approximate == "none"
                for _, c in create_model(name, num_classes=10, image_size=32).cells_and_names())
    # Exact GELU as ONNX's Erf (which onnxruntime fuses): every Log stand-in renamed, none left.
    assert gelus > 0 and op_types.count("Erf") == gelus and ERF_STANDIN_OP not in op_types
    x = _input()
    diff = np.abs(_onnx_logits(path, x) - _python_logits(ckpt, x, model_name=name)).max()
    assert diff <= 1e-4, f"max |diff| {diff}"


def test_export_at_64_from_a_checkpoint_of_32_resizes_the_tables(ckpt, tmp_path):
    path = _export(ckpt, tmp_path, "tiny64", "--file_format=ONNX", "--image_height=64", "--image_width=64")
    table = "stages.2.blocks.0.attn.rel_pos.relative_position_bias_table"
    net64 = create_model("coatnet_tiny", num_classes=10, image_size=64)
    old, new = load_checkpoint(ckpt)[table].shape, next(p.shape for p in net64.get_parameters() if p.name == table)
    assert old == (3 * 3, 2) and tuple(new) == (7 * 7, 2)  # S3 runs on 2x2 at 32, on 4x4 at 64
    x = _input(64)
    diff = np.abs(_onnx_logits(path, x) - _python_logits(ckpt, x)).max()
    assert diff <= 1e-4, f"max |diff| {diff}"


@pytest.mark.parametrize("args, message", [
    (["--model_name=coatnet_0"], "{ckpt} as coatnet_0 with num_classes=10: tensor 'stem.conv1.weight' has shape "
                                 "(16, 3, 3, 3) in the checkpoint but (64, 3, 3, 3) in the model"),
    (["--num_classes=5"], "{ckpt} as coatnet_tiny with num_classes=5: tensor 'head.fc.weight' has shape (10, 128) "
                          "in the checkpoint but (5, 128) in the model"),
    (["--checkpoint_path={missing}"], "checkpoint file not found: {missing}"),
    (["--file_format=TFLITE"], "config key 'file_format': value 'TFLITE' is not one of MINDIR, ONNX, AIR"),
    (["--file_format=AIR"], "config key 'file_format': AIR can only be built with device_target Ascend, got CPU; "
                            "use MINDIR or ONNX"),
], ids=["other-variant", "other-num-classes", "missing-checkpoint", "unsupported-format", "air-on-cpu"])
def test_a_bad_request_fails_with_one_line_and_writes_nothing(ckpt, tmp_path, args, message):
    missing = str(tmp_path / "nope.ckpt")
    out = tmp_path / "out"
    out.mkdir()
    res = run("export.py", *TINY, f"--checkpoint_path={ckpt}", "--file_format=ONNX",
              *[a.format(missing=missing) for a in args], f"--file_name={out / 'model'}", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("[WARNING]")]
    assert len(errors) == 1 and errors[0].startswith("error: " + message.format(ckpt=ckpt, missing=missing)), errors
    assert os.listdir(out) == [] and res.stdout.strip() == ""


def test_onnx_export_without_the_onnx_package_is_one_line_and_writes_nothing(ckpt, tmp_path):
    # onnx is a requirement of ONNX export only: an install without it still exports MINDIR
    out = tmp_path / "out"
    out.mkdir()
    code = ("import runpy, sys; sys.modules['onnx'] = None; sys.argv = {argv!r}; "
            "runpy.run_path('export.py', run_name='__main__')")
    for file_format in ("ONNX", "MINDIR"):
        argv = ["export.py", *TINY, f"--checkpoint_path={ckpt}", f"--file_format={file_format}",
                f"--file_name={out / 'model'}"]
        res = subprocess.run([sys.executable, "-c", code.format(argv=argv)], cwd=ROOT, capture_output=True, text=True)
        errors = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("[WARNING]")]
        if file_format == "ONNX":
            assert res.returncode == 2 and errors == [
                "error: --file_format=ONNX needs the onnx package: pip install onnx==1.19.1 (as in requirements.txt); "
                "MINDIR export does not"], res.stderr
            assert os.listdir(out) == []
        else:
            assert res.returncode == 0, res.stderr
            assert sorted(os.listdir(out)) == ["model.mindir", "model.mindir.json"]


def test_a_failed_export_leaves_no_temporary_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from export import export_network

    monkeypatch.chdir(tmp_path)  # MindSpore writes rank_0/om/analyze_fail.ir into the working folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.mindir").write_bytes(b"previous export")
    net = create_model("coatnet_tiny", num_classes=10, image_size=32)
    net.set_train(False)
    wrong = ms.Tensor(np.zeros((1, 4, 32, 32), np.float32))  # 4 channels: the graph fails to compile
    with pytest.raises(RuntimeError, match="Conv2D"):
        export_network(net, (wrong,), str(out / "model"), "MINDIR")
    assert os.listdir(out) == ["model.mindir"] and (out / "model.mindir").read_bytes() == b"previous export"


@pytest.mark.parametrize("name", ["coatnet_tiny", "coatnet_nano_rw_224"])  # tanh GELU / exact GELU
def test_prepare_for_export_keeps_names_and_swaps_what_onnx_cannot_take(name):
    ms.set_seed(0)
    exact = create_model(name, num_classes=10, image_size=32)
    exact.set_train(False)
    onnx_safe = create_model(name, num_classes=10, image_size=32)
    load_into(onnx_safe, {p.name: p.asnumpy() for p in exact.get_parameters()})
    onnx_safe.set_train(False)
    names = [p.name for p in onnx_safe.get_parameters()]
    exact_gelus = sum(isinstance(c, GELU) and c.approximate == "none" for _, c in exact.cells_and_names())
    assert prepare_for_export(onnx_safe) == exact_gelus  # one Erf stand-in each
    assert [p.name for p in onnx_safe.get_parameters()] == names
    assert not [c for _, c in onnx_safe.cells_and_names() if isinstance(c, (GELU, LayerNorm2d))]
    if exact_gelus == 0:  # tanh GELU and LayerNorm2d computed as in the model (exact GELU: see the ONNX tests)
        x = ms.Tensor(_input() * 3)  # wide range: the ONNX-safe GELUs are exercised on large |x| too
        diff = np.abs(onnx_safe(x).asnumpy() - exact(x).asnumpy()).max()
        assert 0 < diff <= 1e-5, f"max |diff| {diff}"  # > 0: the formulations really were swapped


def test_rename_onnx_ops_changes_only_the_op_types(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from src.onnx_export import rename_onnx_ops

    w = np.array([0.5, -1.5, 2.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["h"], name="scale"),
         helper.make_node("Log", ["h"], ["y"], name="standin")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [numpy_helper.from_array(w, "w")])
    def model():  # IR version 7, as MindSpore writes it (onnx's default is newer than onnxruntime reads)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="test",
                                 ir_version=7)

    original = model()
    path = str(tmp_path / "m.onnx")
    onnx.save(original, path)
    assert rename_onnx_ops(path, "Log", "Erf") == 1
    renamed = onnx.load(path)
    onnx.checker.check_model(renamed)
    assert [(n.name, n.op_type) for n in renamed.graph.node] == [("scale", "Mul"), ("standin", "Erf")]
    expected = model()
    expected.graph.node[1].op_type = "Erf"
    assert renamed == expected  # every other field (initializer, opset, producer, value infos) unchanged
    x = np.array([1.0, 0.5, -0.25], np.float32)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, [math.erf(v) for v in x * w], rtol=0, atol=1e-6)
