"""The timm converter: CLI, .pth input, recorded preprocessing, and clean failure."""
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm_ref import save_safetensors, timm_model

from src.checkpoint import load_checkpoint, read_metadata
from src.coatnet import PRETRAINED_CFGS, TIMM_MODELS
from src.convert_timm import convert, read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "src.convert_timm", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_writes_a_checkpoint_with_bn_stats_and_preprocessing(tmp_path):
    ref = timm_model("coatnet_nano_rw_224")
    src = save_safetensors(ref, str(tmp_path / "nano.safetensors"))
    dst = str(tmp_path / "nano.ckpt")
    res = _cli("--model", "coatnet_nano_rw_224", "--src", src, "--dst", dst)
    assert res.returncode == 0, res.stderr
    params = load_checkpoint(dst)
    np.testing.assert_array_equal(params["stem.norm1.bn.moving_variance"],
                                  ref.state_dict()["stem.norm1.running_var"].numpy())
    meta = read_metadata(dst)
    assert meta["image_mean"] == [0.5, 0.5, 0.5] and meta["crop_pct"] == 0.9


def test_safetensors_reader_needs_no_torch_and_matches(tmp_path):
    ref = timm_model("coatnet_nano_rw_224")
    src = save_safetensors(ref, str(tmp_path / "n.safetensors"))
    code = ("import sys; sys.modules['torch'] = None; from src.convert_timm import read_safetensors; "
            f"print(len(read_safetensors({src!r})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == len(ref.state_dict())
    got = read_safetensors(src)
    np.testing.assert_array_equal(got["head.fc.weight"], ref.state_dict()["head.fc.weight"].numpy())


def test_bf16_safetensors_are_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    ref = timm_model("coatnet_nano_rw_224")
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    src = str(tmp_path / "bf16.safetensors")
    save_file(half, src)
    params = convert("coatnet_nano_rw_224", src, str(tmp_path / "bf16.ckpt"))
    assert params["head.fc.weight"].dtype == np.float32
    np.testing.assert_array_equal(params["head.fc.weight"], half["head.fc.weight"].float().numpy())


@pytest.mark.parametrize("damage", ["truncated data", "cut inside the header", "not safetensors at all"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(tmp_path, damage):
    from safetensors.numpy import save_file

    good = str(tmp_path / "good.safetensors")
    save_file({"head.fc.weight": np.ones((3, 8), np.float32), "head.fc.bias": np.zeros(3, np.float32)}, good)
    data = open(good, "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated data": data[:-16], "cut inside the header": data[:20],
                     "not safetensors at all": b"PK\x03\x04" + bytes(64)}[damage])
    dst = tmp_path / "out.ckpt"
    res = _cli("--model", "coatnet_nano_rw_224", "--src", str(bad), "--dst", str(dst))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad} is not a readable safetensors file: "), lines
    assert not dst.exists()


def test_pth_input_is_loaded_weights_only(tmp_path):
    ref = timm_model("coatnet_nano_rw_224")
    pth = str(tmp_path / "nano.pth")
    torch.save({"state_dict": ref.state_dict()}, pth)
    params = convert("coatnet_nano_rw_224", pth, str(tmp_path / "nano.ckpt"))
    np.testing.assert_array_equal(params["head.fc.bias"], ref.state_dict()["head.fc.bias"].numpy())


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_recorded_preprocessing_is_timms(name):
    cfg = timm.models.get_pretrained_cfg(name) or timm.create_model(name).pretrained_cfg
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    ours = PRETRAINED_CFGS[name]
    assert tuple(ours["image_mean"]) == tuple(cfg["mean"]) and tuple(ours["image_std"]) == tuple(cfg["std"])
    assert ours["crop_pct"] == cfg["crop_pct"] and ours["interpolation"] == cfg["interpolation"]


def test_an_original_network_name_is_refused_with_timms_name(tmp_path):
    src = save_safetensors(timm_model("coatnet_nano_rw_224"), str(tmp_path / "nano.safetensors"))
    res = _cli("--model", "coatnet_0", "--src", src, "--dst", str(tmp_path / "x.ckpt"))
    assert res.returncode == 2 and "'coatnet_0' is the original MindSpore CoAtNet" in res.stderr
    assert "'coatnet_0_224'" in res.stderr and not (tmp_path / "x.ckpt").exists()


def test_wrong_variant_names_the_first_mismatch_and_writes_nothing(tmp_path):
    src = save_safetensors(timm_model("coatnet_nano_rw_224"), str(tmp_path / "nano.safetensors"))
    dst = tmp_path / "out.ckpt"
    res = _cli("--model", "coatnet_0_rw_224", "--src", src, "--dst", str(dst))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: timm tensor 'stages.0.blocks.0.conv3_1x1.bias' (64,) has no counterpart")
    assert "another variant" in lines[0]
    assert os.listdir(tmp_path) == ["nano.safetensors"]


def test_missing_source_and_unknown_model_are_clear(tmp_path):
    res = _cli("--model", "coatnet_0_rw_224", "--src", str(tmp_path / "nope.safetensors"),
               "--dst", str(tmp_path / "o.ckpt"))
    assert res.returncode == 2 and "source checkpoint not found" in res.stderr
    res = _cli("--model", "resnet50", "--src", "x", "--dst", str(tmp_path / "o.ckpt"))
    assert res.returncode == 2 and "unknown timm CoAtNet 'resnet50'" in res.stderr
    assert not (tmp_path / "o.ckpt").exists()
