"""coatnet_0/1/2 are the original MindSpore CoAtNet (hw666666666666/CoAtNet): its parameter counts, and its
checkpoints (model or training layout, EMA included) load here and give its logits; a 224 checkpoint
fine-tunes at 384 with the original's table resize. Golden logits: see tests/seed_ref.py."""
import mindspore as ms
import numpy as np
import pytest
from seed_ref import formula_input, formula_state, formula_value, golden_cases, golden_logits

from src.checkpoint import CheckpointError, load_checkpoint, load_into
from src.coatnet import create_model
from src.utils import weights_for

CASES = golden_cases()
TOL = 1e-4


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _original_state(case: str) -> dict[str, np.ndarray]:
    return formula_state(CASES[case]["params"])


def _save(params: dict, path) -> str:
    """Write a checkpoint as the original did: mindspore.save_checkpoint of its parameter list."""
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    return str(path)


def _logits(net, size: int) -> np.ndarray:
    net.set_train(False)
    return net(ms.Tensor(formula_input(size))).asnumpy()


@pytest.mark.parametrize("name, count", [("coatnet_0", 24_833_012), ("coatnet_1", 42_021_968),
                                         ("coatnet_2", 74_399_144)])
def test_trainable_parameter_counts_equal_the_originals(name, count):
    assert sum(p.size for p in create_model(name).trainable_params()) == count
    assert CASES[f"{name}_224"]["trainable_params"] == count  # as counted from the original's code


@pytest.mark.parametrize("case", ["coatnet_0_224", "coatnet_1_224", "coatnet_2_224", "coatnet_1_384"])
def test_an_original_checkpoint_gives_the_originals_logits(case, tmp_path):
    info = CASES[case]
    path = _save(_original_state(case), tmp_path / "original.ckpt")
    net = create_model(info["model"], image_size=info["image_size"])
    load_into(net, weights_for(net, path, use_ema=False), path)
    diff = np.abs(_logits(net, info["image_size"]) - golden_logits(case)).max()
    assert diff <= TOL, f"{case}: max |diff| {diff}"


def test_the_ema_weights_of_an_original_training_checkpoint(tmp_path):
    """The original's ModelCheckpoint layout: raw weights, ema.<name>, adam_m/adam_v.<name> and scalars."""
    case = "coatnet_0_224"
    golden = _original_state(case)
    params = {}
    for name, value in golden.items():
        params[name] = formula_value("raw." + name, value.shape)  # raw weights differ from the EMA ones
        params["ema." + name] = value
    for name, value in golden.items():
        if not name.endswith(("moving_mean", "moving_variance")):
            params["adam_m." + name] = np.zeros_like(value)
            params["adam_v." + name] = np.zeros_like(value)
    params.update(global_step=np.array([1234], np.int32), scale_sense=np.array(65536.0, np.float32),
                  learning_rate=np.full((10,), 1e-3, np.float32))
    path = _save(params, tmp_path / "coatnet-300_2502.ckpt")

    loaded = load_checkpoint(path)
    assert loaded["state.global_step"].reshape(-1)[0] == 1234
    assert loaded["adam_m.stages.2.blocks.0.attn.qkv.weight"].shape == (3 * 384, 192, 1, 1)
    net = create_model("coatnet_0")
    load_into(net, weights_for(net, path, use_ema=True), path)
    ema_logits = _logits(net, 224)
    assert np.abs(ema_logits - golden_logits(case)).max() <= TOL
    load_into(net, weights_for(net, path, use_ema=False), path)
    assert np.abs(_logits(net, 224) - ema_logits).max() > 100 * TOL  # the raw weights are another model


def test_fine_tuning_a_224_original_checkpoint_at_384_resizes_tables_as_the_original(tmp_path):
    from src.utils import get_logger, load_pretrained

    path = _save(_original_state("coatnet_1_224"), tmp_path / "coatnet_1_224.ckpt")
    net = create_model("coatnet_1", image_size=384)
    load_pretrained(net, path, use_ema=False, logger=get_logger())
    table = net.stages[2].blocks[0].attn.rel_pos.relative_position_bias_table
    assert tuple(table.shape) == (47 * 47, 12)
    diff = np.abs(_logits(net, 384) - golden_logits("coatnet_1_finetune_384")).max()
    assert diff <= TOL, f"max |diff| {diff}"


def test_timms_bicubic_resize_would_not_give_the_originals_fine_tune_logits(tmp_path):
    """The control of the test above: the original's bilinear resize is what makes the logits match."""
    from src.coatnet import resize_rel_pos_bias_table

    path = _save(_original_state("coatnet_1_224"), tmp_path / "coatnet_1_224.ckpt")
    net = create_model("coatnet_1", image_size=384)
    state = weights_for(create_model("coatnet_1"), path, use_ema=False)  # tables still at 224
    for key, value in list(state.items()):
        if key.endswith("relative_position_bias_table"):
            window = (24, 24) if key.startswith("stages.2.") else (12, 12)
            state[key] = resize_rel_pos_bias_table(value, window, mode="bicubic")
    load_into(net, state, path)
    assert np.abs(_logits(net, 384) - golden_logits("coatnet_1_finetune_384")).max() > 10 * TOL


def test_the_bilinear_resize_is_align_corners():
    table = np.random.RandomState(0).randn(3 * 3, 2).astype(np.float32)
    from src.coatnet import resize_rel_pos_bias_table

    out = resize_rel_pos_bias_table(table, (3, 3), mode="bilinear").reshape(5, 5, 2)
    grid = table.reshape(3, 3, 2)
    np.testing.assert_allclose(out[::2, ::2], grid, atol=1e-6)  # corners and source points kept
    np.testing.assert_allclose(out[1, 0], (grid[0, 0] + grid[1, 0]) / 2, atol=1e-6)


def test_a_foreign_tensor_in_an_original_checkpoint_is_one_line(tmp_path):
    params = _original_state("coatnet_0_224")
    params["s3.0.attn.gate.weight"] = np.zeros((4, 4), np.float32)
    path = _save(params, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "s3.0.attn.gate.weight" in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_an_original_checkpoint_of_another_size_names_the_tensor(tmp_path):
    path = _save(_original_state("coatnet_0_224"), tmp_path / "c0.ckpt")
    net = create_model("coatnet_2")
    with pytest.raises(CheckpointError, match="stem.conv1.weight"):
        load_into(net, weights_for(net, path, use_ema=False), path)
