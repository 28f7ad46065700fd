"""The one place that reads YAML and argv: ``default_config.yaml`` merged with ``--key=value`` flags.

    config = load_config()                      # sys.argv[1:]
    config = load_config(["--batch_size=8"])    # explicit
    config = load_config([...], overrides={"num_epochs": 30})  # a script's own defaults (finetune)

Precedence: YAML file (``--config_path``, default ``default_config.yaml``) < ``overrides`` <
command-line flags. A value is coerced to the type of the default in ``default_config.yaml``; an
unknown key suggests the closest known one.

The original MindSpore CoAtNet's configuration runs unchanged: its YAML (three documents: values,
descriptions, choices; the first is read) and its command-line keys. Its names for our keys are aliases
(``ALIASES``; both spellings with different values in one layer is an error), ``run_eval`` maps to
``eval_interval``, and its keys that do nothing here are accepted with one warning line naming them
(``NO_EFFECT``).
"""
from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "default_config.yaml")

__all__ = ["Config", "ConfigError", "load_config", "DEFAULT_CONFIG"]


class ConfigError(ValueError):
    """A bad key or value in the configuration."""


class Config(argparse.Namespace):
    """Attribute access to config keys; ``to_dict()`` for logging and checkpoint metadata."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "explicit_keys"}


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


#: The original project's key -> ours (same meaning).
ALIASES = {
    "architecture": "model_name",
    "dataset_path": "data_path",
    "pretrain_ckpt": "pretrained",
    "load_path": "pretrained",
    "ckpt_url": "checkpoint_url",
    "ckpt_file": "checkpoint_path",
}
#: The original project's keys that change nothing here, and why (one warning line names those given).
NO_EFFECT = {
    "enable_graph_kernel": "graph kernel fusion follows jit_level",
    "run_distribute": "data parallel follows msrun's RANK_SIZE",
    "run_distribute_eval": "data parallel follows msrun's RANK_SIZE",
    "run_distribute_export": "export runs on one device",
    "rank_id": "set by msrun",
    "rank_size": "set by msrun",
    "device_id_export": "export uses device_id",
    "activation": "eval reports top-1/top-5 of the logits",
    "freeze_layer": "unused by the original's training too",
    "filter_head": "a head of another num_classes is re-initialised by finetune.py",
    "enable_cache": "no dataset cache server",
    "cache_session_id": "no dataset cache server",
    "is_training": "train.py/eval.py decide",
    "is_training_eval": "train.py/eval.py decide",
    "is_training_export": "export.py exports the inference network",
    "batch_size_postprocess": "no postprocess.py (Ascend 310 inference) here",
    "label_path": "no postprocess.py (Ascend 310 inference) here",
}


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            # The original's files hold three documents (values, descriptions, choices): values first.
            data = next(iter(yaml.safe_load_all(f)), None) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value")
    return data


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(v), type(v).__name__)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default``; one clear error otherwise."""
    def bad() -> ConfigError:
        return ConfigError(f"config key '{key}': value {value!r} is not a valid {_type_name(default)}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            try:
                f = float(str(value))
            except ValueError:
                raise bad() from None
            if f.is_integer():
                return int(f)
            raise bad() from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if isinstance(default, list):
        items = value
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [t for t in (s.strip() for s in text.split(",")) if t]
        if not isinstance(items, (list, tuple)):
            raise bad()
        if len(default) and len(items) != len(default):
            raise ConfigError(f"config key '{key}': expected {len(default)} values, got {len(items)} ({value!r})")
        proto = default[0] if default else ""
        return [_coerce(key, v, proto) for v in items]
    if default is None or isinstance(default, str):
        return "" if value is None else str(value)
    return value


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _parse_argv(argv: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            key = body
            value = next(it, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"flag '--{key}' needs a value: use --{key}=VALUE")
        out[key.replace("-", "_")] = value
    return out


def _resolve_aliases(source: str, layer: Mapping[str, Any]) -> dict[str, Any]:
    """One layer (a file, overrides or the command line) with the original's key names replaced by ours
    and ``run_eval`` by ``eval_interval``. An empty alias value (the original's YAML leaves unused keys
    "") sets nothing; both spellings with different values in one layer is an error."""
    out: dict[str, Any] = {k: v for k, v in layer.items() if k not in ALIASES and k != "run_eval"}
    given: dict[str, str] = {}
    for key, value in layer.items():
        if key not in ALIASES or value in (None, ""):
            continue
        ours = ALIASES[key]
        if ours in out and str(out[ours]) != str(value):
            spelled = given.get(ours, ours)
            raise ConfigError(f"{source}: '{key}' ({value!r}) and '{spelled}' ({out[ours]!r}) set the same "
                              f"key '{ours}' to different values; give one")
        out[ours] = value
        given[ours] = key
    if "run_eval" in layer:
        run_eval = _coerce("run_eval", layer["run_eval"], True)
        if "eval_interval" in out and bool(int(out["eval_interval"])) != run_eval:
            raise ConfigError(f"{source}: 'run_eval' ({layer['run_eval']!r}) contradicts 'eval_interval' "
                              f"({out['eval_interval']!r}); give one")
        out.setdefault("eval_interval", 1 if run_eval else 0)
    return out


def load_config(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the run configuration. Raises ConfigError with one sentence on any bad key/value."""
    import sys

    flags = _parse_argv(sys.argv[1:] if argv is None else argv)
    defaults = _read_yaml(DEFAULT_CONFIG)
    path = flags.pop("config_path", None)
    values = dict(defaults)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path:
        layers.append((path, _read_yaml(path)))
    if overrides:
        layers.append(("overrides", overrides))
    layers.append(("command line", flags))
    layers = [(source, _resolve_aliases(source, layer)) for source, layer in layers]
    for _, layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                raise _unknown(key, list(defaults) + list(ALIASES) + ["run_eval"])
            values[key] = _coerce(key, value, defaults[key])
    values["config_path"] = path or DEFAULT_CONFIG
    config = Config(**values)
    # Keys the user chose (file, script overrides or flags): e.g. eval keeps a converted
    # checkpoint's own preprocessing unless the user set it explicitly.
    config.explicit_keys = sorted({k for _, layer in layers for k in layer})
    _validate(config)
    ignored = [k for k in config.explicit_keys if k in NO_EFFECT]
    if ignored:
        reasons = "; ".join(f"{k}: {NO_EFFECT[k]}" for k in ignored)
        print(f"warning: config keys with no effect here: {reasons}", file=sys.stderr)
    return config


_CHOICES = {
    "device_target": ("CPU", "GPU", "Ascend"),
    "mode": ("GRAPH", "PYNATIVE"),
    "amp_level": ("O0", "O1", "O2", "O3", "original"),  # src/precision.py; "" is resolved first (_validate)
    "jit_level": ("O0", "O1", "O2"),
    "interpolation": ("bicubic", "bilinear", "nearest"),
    "file_format": ("MINDIR", "ONNX", "AIR"),
    "amp_dtype": ("float16", "bfloat16"),
    "keep_best_by": ("top1", "ema_top1"),
    "eval_resize": ("auto", "squash", "aspect"),
}
_POSITIVE = ("num_classes", "image_height", "image_width", "batch_size", "num_epochs", "num_parallel_workers",
             "loss_scale", "loss_scale_window", "log_interval", "save_checkpoint_epochs", "keep_checkpoint_max")
_UNIT = ("ema_decay", "label_smoothing", "head_drop_rate", "crop_pct", "beta1", "beta2")


def _validate(c: Config) -> None:
    if c.amp_level == "":  # the original's float16 scheme where it trained; float32 on CPU, fastest there
        c.amp_level = "O0" if c.device_target == "CPU" else "original"
    for key, allowed in _CHOICES.items():
        value = getattr(c, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': value {value!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if getattr(c, key) <= 0:
            raise ConfigError(f"config key '{key}': value {getattr(c, key)!r} must be > 0")
    for key in _UNIT:
        v = getattr(c, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"config key '{key}': value {v!r} must be within [0, 1]")
    if c.drop_path_rate != -1.0 and not 0.0 <= c.drop_path_rate <= 1.0:
        raise ConfigError(f"config key 'drop_path_rate': value {c.drop_path_rate!r} must be within [0, 1] "
                          "(or -1 for the variant's own rate)")
    if c.image_height % 32 or c.image_width % 32:
        raise ConfigError(f"config keys 'image_height'/'image_width': {c.image_height}x{c.image_width} "
                          "must be divisible by 32")
    if c.lr_min > c.lr_max:
        raise ConfigError(f"config key 'lr_min': value {c.lr_min} is larger than lr_max {c.lr_max}")
    if c.lr_warmup_epochs < 0 or c.lr_warmup_epochs > c.num_epochs:
        raise ConfigError(f"config key 'lr_warmup_epochs': value {c.lr_warmup_epochs} must be within "
                          f"[0, num_epochs={c.num_epochs}]")
    for key in ("save_checkpoint_steps", "graceful_exit_seconds"):
        if getattr(c, key) < 0:
            raise ConfigError(f"config key '{key}': value {getattr(c, key)!r} must be >= 0")
    if c.mixup_alpha < 0:
        raise ConfigError(f"config key 'mixup_alpha': value {c.mixup_alpha} must be >= 0")
    if c.rand_augment_magnitude_std < 0:
        raise ConfigError(f"config key 'rand_augment_magnitude_std': value {c.rand_augment_magnitude_std} must be "
                          ">= 0 (0: a fixed magnitude)")
    if c.amp_level == "O1":
        raise ConfigError("config key 'amp_level': O1 cannot run on MindSpore 2.10, whose network rewrite fails on "
                          "this model's nn.Conv2d subclasses (Conv2dOpt); use original, O2 or O3")
    if c.device_target == "CPU" and c.amp_level != "O0" and c.amp_dtype == "bfloat16":
        raise ConfigError(f"config key 'amp_dtype': bfloat16 with amp_level {c.amp_level} cannot run on "
                          "device_target CPU (MindSpore 2.10 has no CPU bfloat16 kernels for this model); "
                          "use amp_level=O0 (fastest on CPU) or amp_dtype=float16")
