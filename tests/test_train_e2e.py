"""End-to-end on real files: train 2 epochs -> checkpoints -> eval.py -> export -> reload."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from runs import TINY, make_color_tree, run

from src.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_color_tree(str(root / "data"), train_per_class=16)
    out = str(root / "out")
    # The colour is the class here: RandAugment's colour ops (invert, solarize, ...) would relabel it, and
    # coatnet_tiny (the original's N(0, 0.01) init) needs a few dozen clean steps to leave its plateau.
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *TINY, "--num_classes=3",
              "--num_epochs=3", "--batch_size=4", "--lr_max=0.002", "--lr_min=0.0002", "--enable_ema=True",
              "--ema_decay=0.9", "--rand_augment_num_layers=0")
    return data, out, res


def test_training_writes_checkpoints_and_metrics_and_loss_falls(trained):
    data, out, res = trained
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert {"epoch_0001.ckpt", "epoch_0002.ckpt", "epoch_0003.ckpt", "best.ckpt"} <= set(ckpts)
    assert not [f for f in ckpts if f.endswith(".tmp")]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 3 and len(steps) == 36  # 48 images / batch 4, 3 epochs
    assert {"loss", "lr", "loss_scale", "img_per_s"} <= set(steps[0])
    assert epochs[2]["loss"] < epochs[0]["loss"]
    assert np.mean([s["loss"] for s in steps[-12:]]) < np.mean([s["loss"] for s in steps[:12]])
    # Scored as the original did (raw weights), and the EMA weights beside them.
    assert 0.0 <= epochs[2]["top1"] <= 1.0 and 0.0 <= epochs[2]["ema_top1"] <= 1.0
    params = load_checkpoint(os.path.join(out, "checkpoints", "epoch_0003.ckpt"))
    assert "ema.head.fc.weight" in params and "adam_m.head.fc.weight" in params
    assert not np.allclose(params["ema.head.fc.weight"], params["head.fc.weight"])
    log = open(os.path.join(out, "log", "rank_0.log")).read()
    assert " top1 " in log and " ema_top1 " in log
    assert "loss_scale" in log and "img/s" in log and "ETA" in log and "skipped files 0" in log


def test_eval_prints_top1_and_writes_json(trained):
    data, out, _ = trained
    ckpt = os.path.join(out, "checkpoints", "epoch_0003.ckpt")
    res = run("eval.py", f"--data_path={data}", f"--output_path={out}", *TINY, "--num_classes=3",
              f"--checkpoint_path={ckpt}", "--use_ema=True")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("top1:")][0]
    top1, top5 = float(line.split()[1]), float(line.split()[3])
    result = json.load(open(os.path.join(out, "eval_result.json")))
    assert result["top1"] == pytest.approx(top1, abs=1e-4) and result["num_samples"] == 12
    assert top5 == 1.0  # 3 classes: top-5 covers all
    # the per-epoch EMA eval during training saw the same weights and data
    epochs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if '"epoch"' in ln]
    assert epochs[-1]["ema_top1"] == pytest.approx(top1, abs=1e-4)
    run("eval.py", f"--data_path={data}", f"--output_path={out}", *TINY, "--num_classes=3",
        f"--checkpoint_path={ckpt}")  # and the raw weights' score is the raw top-1 of the epoch
    assert json.load(open(os.path.join(out, "eval_result.json")))["top1"] == pytest.approx(epochs[-1]["top1"],
                                                                                         abs=1e-4)


def test_eval_refuses_a_checkpoint_of_another_shape(trained):
    data, out, _ = trained
    ckpt = os.path.join(out, "checkpoints", "epoch_0003.ckpt")
    res = run("eval.py", f"--data_path={data}", *TINY, "--num_classes=5", f"--checkpoint_path={ckpt}",
              check=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "tensor 'head.fc.weight' has shape (3, 128) in the checkpoint but (5, 128)" in err[0]
    res = run("eval.py", f"--data_path={data}", *TINY, "--num_classes=3",
              f"--checkpoint_path={out}/nope.ckpt", check=False)
    assert res.returncode == 2 and "checkpoint file not found" in res.stderr


def test_export_and_reload_give_the_python_models_logits(trained, tmp_path):
    data, out, _ = trained
    ckpt = os.path.join(out, "checkpoints", "best.ckpt")
    name = str(tmp_path / "tiny")
    run("export.py", *TINY, "--num_classes=3", f"--checkpoint_path={ckpt}", "--file_format=MINDIR",
        f"--file_name={name}", "--batch_size=2")
    from src.checkpoint import load_into, model_weights
    from src.coatnet import create_model

    net = create_model("coatnet_tiny", num_classes=3, image_size=32)
    load_into(net, model_weights(load_checkpoint(ckpt)))
    net.set_train(False)
    x = ms.Tensor(np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32))
    graph = ms.nn.GraphCell(ms.load(name + ".mindir"))
    np.testing.assert_allclose(graph(x).asnumpy(), net(x).asnumpy(), atol=1e-5)


def test_plot_metrics_draws_the_curves(trained, tmp_path):
    _, out, _ = trained
    png = str(tmp_path / "curves.png")
    run("scripts/plot_metrics.py", os.path.join(out, "metrics.jsonl"), png)
    from PIL import Image

    img = Image.open(png)
    assert img.size == (1500, 520)
    assert len(set(img.convert("RGB").getdata())) > 3  # more than background and frame


def test_eval_uses_the_preprocessing_recorded_beside_a_checkpoint(trained, tmp_path):
    # A checkpoint converted from timm carries timm's mean/std/crop_pct in its sidecar (see
    # src/convert_timm.py); eval.py uses them unless the user sets them explicitly.
    import shutil

    data, out, _ = trained
    ckpt = str(tmp_path / "converted.ckpt")
    shutil.copy(os.path.join(out, "checkpoints", "epoch_0003.ckpt"), ckpt)
    meta = json.load(open(os.path.join(out, "checkpoints", "epoch_0003.ckpt.json")))
    meta.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], crop_pct=0.95)
    json.dump(meta, open(ckpt + ".json", "w"))
    args = [f"--data_path={data}", f"--output_path={tmp_path}", *TINY, "--num_classes=3", f"--checkpoint_path={ckpt}"]
    args = [a for a in args if not a.startswith("--crop_pct")]
    run("eval.py", *args)
    result = json.load(open(tmp_path / "eval_result.json"))
    assert result["image_mean"] == [0.5, 0.5, 0.5] and result["crop_pct"] == 0.95
    run("eval.py", *args, "--image_mean=0.4,0.4,0.4")
    result = json.load(open(tmp_path / "eval_result.json"))
    assert result["image_mean"] == [0.4, 0.4, 0.4] and result["image_std"] == [0.5, 0.5, 0.5]
