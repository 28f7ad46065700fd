"""Convert a timm CoAtNet checkpoint (``timm/models/maxxvit.py``) to a MindSpore checkpoint.

    python -m src.convert_timm --model coatnet_0_rw_224 --src FILE(.safetensors|.pth|.bin) --dst OUT.ckpt

Every timm tensor is mapped to one of our parameters (BatchNorm running statistics included); shapes
are checked and nothing may stay unmapped in either direction, else one error names the first
offending tensor and nothing is written. ``.safetensors`` is read without torch; ``.pth``/``.bin``
need torch and load with ``weights_only=True``. The preprocessing timm trained the weights with is
recorded beside the checkpoint (``OUT.ckpt.json``) so eval uses it unless told otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # registers bfloat16 with numpy, so safetensors.numpy reads BF16 tensors
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

import src  # noqa: F401  (CPU ISA default before mindspore loads)
from src.checkpoint import CheckpointError, save_checkpoint
from src.coatnet import MODEL_CFGS, PRETRAINED_CFGS, TIMM_MODELS, create_model

_NORM_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
               "running_var": "moving_variance"}


def our_name(timm_model: str) -> str:
    """Our variant for a timm model name: the same name without a pretrained tag
    ('coatnet_0_rw_224.sw_in1k' -> 'coatnet_0_rw_224')."""
    name = timm_model.split(".")[0]
    if name in MODEL_CFGS and name not in TIMM_MODELS:
        raise ValueError(f"'{name}' is the original MindSpore CoAtNet, not a timm structure; timm's "
                         f"'{name}' is '{name}_224'")
    if name not in TIMM_MODELS:
        raise ValueError(f"unknown timm CoAtNet '{timm_model}'; known: {', '.join(TIMM_MODELS)}")
    return name


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 widened to float32), without torch."""
    try:
        tensors = load_file(path)
    except SafetensorError as exc:  # a damaged or truncated file: the library names what is wrong with it
        raise ValueError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:  # a dtype numpy cannot represent (e.g. a float8 kind ml_dtypes lacks)
        raise ValueError(f"{path}: unsupported tensor dtype ({exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in tensors.items()}


def read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path} needs torch; convert it to .safetensors or install torch") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ValueError(f"source checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".pth", ".pt", ".bin", ".pth.tar")):
        return read_torch(path)
    raise ValueError(f"unsupported source format '{path}': expected .safetensors, .pth or .bin")


def map_state_dict(state: dict[str, np.ndarray], target: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Map timm names to ours. ``target`` is our name -> shape, in model order. Raises naming the
    first mismatch in model order (stem first), so the message points at where variants diverge."""
    source: dict[str, str] = {}  # our name -> timm name
    for key in state:
        if key.endswith("num_batches_tracked") or key.endswith("relative_position_index"):
            continue
        prefix, _, leaf = key.rpartition(".")
        candidates = [key]
        if leaf in _NORM_NAMES:
            candidates += [f"{prefix}.bn.{_NORM_NAMES[leaf]}", f"{prefix}.{_NORM_NAMES[leaf]}"]
        name = next((c for c in candidates if c in target), None)
        if name is None:
            raise CheckpointError(f"timm tensor '{key}' {tuple(state[key].shape)} has no counterpart in the "
                                  "model (checkpoint of another variant?)")
        source[name] = key
    out: dict[str, np.ndarray] = {}
    for name, shape in target.items():
        if name not in source:
            raise CheckpointError(f"model tensor '{name}' has no source in the timm checkpoint "
                                  "(checkpoint of another variant?)")
        key = source[name]
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"timm tensor '{key}' has shape {tuple(state[key].shape)} but the model's "
                                  f"'{name}' has {shape} (checkpoint of another variant?)")
        out[name] = np.asarray(state[key], np.float32)
    return out


def convert(model: str, src_path: str, dst_path: str) -> dict[str, np.ndarray]:
    """Convert and write; returns the converted arrays. Nothing is written on error."""
    name = our_name(model)
    state = read_state_dict(src_path)
    head = state.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else 1000
    net = create_model(name, num_classes=num_classes)
    target = {p.name: tuple(p.shape) for p in net.get_parameters()}
    params = map_state_dict(state, target)
    meta = {"model_name": name, "num_classes": num_classes, "source": os.path.basename(src_path),
            "converted_from": "timm", **{k: list(v) if isinstance(v, tuple) else v
                                         for k, v in PRETRAINED_CFGS[name].items()}}
    save_checkpoint(params, dst_path, metadata=meta)
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="timm name, e.g. coatnet_0_rw_224 (our variant of that name)")
    parser.add_argument("--src", required=True, help="timm weights: .safetensors, .pth or .bin")
    parser.add_argument("--dst", required=True, help="MindSpore checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        params = convert(args.model, args.src, args.dst)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {len(params)} tensors, "
          f"{sum(int(np.prod(v.shape)) for v in params.values()):,} values (+ {args.dst}.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
