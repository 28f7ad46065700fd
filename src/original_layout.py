"""Checkpoints of the original MindSpore CoAtNet (``hw666666666666/CoAtNet``), read as ours.

The original's parameter names are a contract its users hold files for: a model checkpoint
(``s0.conv.0.weight``, ``s1.0.norm.gamma``, ``s3.0.attn.q.weight``, ...,
``s3.0.attn.relative_position_bias.relative_position_bias_table``, ``final_layer_norm.gamma``,
``cls_head.2.bias``) and a training checkpoint as its ModelCheckpoint wrote it (the same names plus
``ema.<name>``, ``adam_m.<name>``, ``adam_v.<name>``, ``global_step``, ``scale_sense``,
``learning_rate``). :func:`from_original` maps such a file onto the names and layouts of our seed
variants (``coatnet_0`` ... ``coatnet_4``, ``coatnet_tiny``), which compute the same function:

- the original's transformer stages are NHWC with ``nn.Dense`` layers; ours are NCHW with 1x1 convs,
  so a (out, in) kernel becomes (out, in, 1, 1);
- its separate q, k, v projections become our one qkv projection, head-major ((head, [q|k|v], 32));
- its (heads, 2H-1, 2W-1) relative-position table becomes our ((2H-1)(2W-1), heads) table.

This is the only module that knows the original's names; ``src.checkpoint.load_checkpoint`` calls it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from src.checkpoint import CheckpointError
from src.train_state import EMA_PREFIX, MOMENT_PREFIXES, state_name

__all__ = ["is_original_layout", "from_original"]

_DIM_HEAD = 32  # every attention head of the original is 32 wide
_SLOT_PREFIXES = (EMA_PREFIX, *MOMENT_PREFIXES)  # per-weight copies, each in the model's layout
# Training scalars of the original's checkpoints: kept (not model weights) under our state names.
_STATE = {"global_step": state_name("global_step"), "scale_sense": state_name("loss_scale")}
_MODEL_NAME = re.compile(r"^(s[0-4]\.|final_layer_norm\.|cls_head\.)")

_STEM = {"0": "stem.conv1.", "1": "stem.norm1.bn.", "3": "stem.conv2."}
_MBCONV = {"proj.": "shortcut.expand.", "norm.": "pre_norm.bn.", "conv.0.": "conv1_1x1.", "conv.1.": "norm1.bn.",
           "conv.3.": "conv2_kxk.", "conv.4.": "norm2.bn.", "conv.6.se.1.": "se.fc1.", "conv.6.se.3.": "se.fc2.",
           "conv.7.": "conv3_1x1."}
_TRANSFORMER = {"proj.": "shortcut.expand.", "attn.proj.": "attn.proj.", "ffn_norm.": "norm2.",
                "ffn.ffn.0.": "mlp.fc1.", "ffn.ffn.3.": "mlp.fc2.",
                "attn.relative_position_bias.": "attn.rel_pos."}
_HEAD = {"final_layer_norm.": "head.norm.", "cls_head.0.": "head.pre_logits.fc.", "cls_head.2.": "head.fc."}


def is_original_layout(params: Mapping[str, object]) -> bool:
    """True for a checkpoint written by the original project (its stem's first kernel is there)."""
    return "s0.conv.0.weight" in params or "ema.s0.conv.0.weight" in params


def _rename(name: str) -> tuple[str, str]:
    """(our name, kind) of one original model tensor; kind tells the layout change: 'same', 'dense'
    (NHWC Dense kernel -> 1x1 conv), 'table', or 'q'/'k'/'v' (parts of our qkv projection)."""
    m = re.fullmatch(r"s0\.conv\.(\d+)\.(\w+)", name)
    if m and m.group(1) in _STEM:
        return _STEM[m.group(1)] + m.group(2), "same"
    m = re.fullmatch(r"s([1-4])\.(\d+)\.(.+)", name)
    if m:
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        ours = f"stages.{stage - 1}.blocks.{block}."
        if stage <= 2:
            for old, new in _MBCONV.items():
                if rest.startswith(old):
                    return ours + new + rest[len(old):], "same"
        else:
            q = re.fullmatch(r"attn\.([qkv])\.(weight|bias)", rest)
            if q:
                return f"{ours}attn.qkv.{q.group(2)}", q.group(1)
            if rest.startswith("attn_norm."):  # a downsampling block pools after its pre-norm
                return ours + ("norm1.norm." if block == 0 else "norm1.") + rest[len("attn_norm."):], "same"
            for old, new in _TRANSFORMER.items():
                if rest.startswith(old):
                    leaf = rest[len(old):]
                    # LayerNorm tensors are gamma/beta: every 'weight' here is an nn.Dense kernel.
                    kind = "table" if leaf == "relative_position_bias_table" else \
                        "dense" if leaf == "weight" else "same"
                    return ours + new + leaf, kind
    for old, new in _HEAD.items():
        if name.startswith(old):
            return new + name[len(old):], "same"
    raise CheckpointError(f"tensor '{name}' of an original-layout checkpoint has no counterpart in "
                          "the seed CoAtNet (a checkpoint of another network?)")


def _convert_model(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        ours, kind = _rename(name)
        value = np.asarray(value)
        if kind in ("q", "k", "v"):
            qkv.setdefault(ours, {})[kind] = value
        elif kind == "dense":
            out[ours] = value.reshape(*value.shape, 1, 1)
        elif kind == "table":
            heads = value.shape[0]
            out[ours] = np.ascontiguousarray(value.reshape(heads, -1).T)
        else:
            out[ours] = value
    for ours, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"original-layout checkpoint: '{ours}' lacks attn.{missing[0]} "
                                  "(a truncated checkpoint?)")
        dim = parts["q"].shape[0]
        heads = dim // _DIM_HEAD
        rest = parts["q"].shape[1:]
        # Ours is head-major: channel h * 96 + [0:32] is q of head h, then k, then v.
        stacked = np.stack([parts[x].reshape(heads, _DIM_HEAD, *rest) for x in "qkv"], axis=1)
        merged = stacked.reshape(3 * dim, *rest)
        out[ours] = merged.reshape(*merged.shape, 1, 1) if ours.endswith(".weight") else merged
    return out


def from_original(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A checkpoint of the original project in our layout: model tensors (and their ``ema.``,
    ``adam_m.``, ``adam_v.`` copies) renamed and re-laid, ``global_step``/``scale_sense`` as our state,
    any other training scalar (``learning_rate``, ...) kept under ``state.original.``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for key, value in params.items():
        prefix = next((p for p in _SLOT_PREFIXES if key.startswith(p)), "")
        name = key[len(prefix):]
        if _MODEL_NAME.match(name):
            groups.setdefault(prefix, {})[name] = value
        elif key in _STATE:
            out[_STATE[key]] = value
        else:
            out[state_name("original." + key)] = value
    for prefix, tensors in groups.items():
        out.update({prefix + name: value for name, value in _convert_model(tensors).items()})
    return out
