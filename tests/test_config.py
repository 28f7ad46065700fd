"""Config: YAML defaults + --key=value, typed; every error names the key and the value."""
import pytest

from src.model_utils.config import ConfigError, load_config


def test_defaults_are_the_seed_contract():
    c = load_config([])
    seed = dict(num_classes=1000, image_height=224, image_width=224, center_crop=True, num_parallel_workers=16,
                batch_size=64, rand_augment_num_layers=2, rand_augment_magnitude=15, mixup_alpha=0.8,
                num_epochs=300, lr_max=0.001, lr_min=0.00001, lr_warmup_epochs=20, epsilon=0.000001,
                weight_decay=0.05, enable_ema=False, ema_decay=0.9999, enable_clip_norm=True, gradient_norm=1.0,
                label_smoothing=0.1)
    for key, value in seed.items():
        assert getattr(c, key) == value and type(getattr(c, key)) is type(value), key
    assert c.model_name == "coatnet_1" and c.device_target == "CPU" and c.amp_level == "O0"


def test_drop_path_rate_defaults_to_the_variants_own():
    from src.trainer import build_model

    assert load_config([]).drop_path_rate == -1.0
    assert build_model(load_config(["--model_name=coatnet_0"])).drop_path_rate == 0.2
    assert build_model(load_config(["--model_name=coatnet_2", "--drop_path_rate=0.1"])).drop_path_rate == 0.1


def test_overrides_are_coerced_to_the_default_type(tmp_path):
    c = load_config(["--batch_size=8", "--enable_ema=true", "--lr_max", "2e-3", "--image_mean=0.5,0.5,0.5"])
    assert c.batch_size == 8 and c.enable_ema is True and c.lr_max == 2e-3 and c.image_mean == [0.5, 0.5, 0.5]
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 4\nnum_epochs: 2\nlr_warmup_epochs: 0\n")
    c = load_config([f"--config_path={f}", "--num_epochs=3"], overrides={"batch_size": 16, "num_epochs": 30})
    assert c.batch_size == 16 and c.num_epochs == 3  # file < script overrides < command line
    assert "num_epochs" in c.explicit_keys and "lr_max" not in c.explicit_keys


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown config key 'batch_sise'; did you mean 'batch_size'?"),
    (["--batch_size=eight"], "config key 'batch_size': value 'eight' is not a valid int"),
    (["--enable_ema=maybe"], "config key 'enable_ema': value 'maybe' is not a valid bool"),
    (["--lr_max=fast"], "config key 'lr_max': value 'fast' is not a valid float"),
    (["--image_mean=0.5,0.5"], "config key 'image_mean': expected 3 values, got 2"),
    (["--device_target=TPU"], "config key 'device_target': value 'TPU' is not one of CPU, GPU, Ascend"),
    (["--image_height=100"], "'image_height'/'image_width': 100x224 must be divisible by 32"),
    (["--batch_size=0"], "config key 'batch_size': value 0 must be > 0"),
    (["--ema_decay=1.5"], "config key 'ema_decay': value 1.5 must be within [0, 1]"),
    (["--drop_path_rate=1.5"], "config key 'drop_path_rate': value 1.5 must be within [0, 1] (or -1 for the "
                               "variant's own rate)"),
    (["--lr_min=0.1"], "config key 'lr_min': value 0.1 is larger than lr_max 0.001"),
    (["--amp_level=O2", "--amp_dtype=bfloat16"], "config key 'amp_dtype': bfloat16 with amp_level O2 cannot run"),
    (["--config_path=/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["batch_size=8"], "unexpected argument 'batch_size=8': use --key=value"),
])
def test_errors_name_the_key_and_value(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
