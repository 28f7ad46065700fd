"""Evaluate a checkpoint: python eval.py --checkpoint_path=CKPT [--use_ema=True] [--key=value ...]

Prints `top1: <x> top5: <y>` and writes output_path/eval_result.json. A checkpoint converted from
timm is evaluated with the preprocessing it was trained with (recorded beside it) unless the
preprocessing keys are given explicitly.
"""
import json
import os

import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.checkpoint import load_into, read_metadata
from src.model_utils.config import load_config
from src.model_utils.moxing_adapter import fetch_checkpoint, moxing_wrapper
from src.utils import cli_main, setup_context, weights_for

PREPROCESS_KEYS = ("image_mean", "image_std", "crop_pct", "interpolation")


def evaluate_checkpoint(config, run) -> dict:
    from src.dataset import dataset_from_config
    from src.metrics import evaluate
    from src.trainer import build_model

    meta = read_metadata(config.checkpoint_path)
    for key in PREPROCESS_KEYS:
        if key in meta and key not in config.explicit_keys:
            setattr(config, key, meta[key])
    net = build_model(config)
    load_into(net, weights_for(net, config.checkpoint_path, config.use_ema), config.checkpoint_path)
    result = evaluate(net, dataset_from_config(config, "val", run.rank_size, run.rank_id), run.rank_size)
    result.update(checkpoint=config.checkpoint_path, use_ema=config.use_ema, model_name=config.model_name,
                  **{k: getattr(config, k) for k in PREPROCESS_KEYS})
    print(f"top1: {result['top1']:.4f} top5: {result['top5']:.4f}")
    if run.is_main:
        os.makedirs(config.output_path, exist_ok=True)
        with open(os.path.join(config.output_path, "eval_result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    config = load_config(argv)
    run = setup_context(config)
    pre = (lambda: fetch_checkpoint(config, "checkpoint_path")) if config.checkpoint_url else None
    moxing_wrapper(config, pre_process=pre)(lambda: evaluate_checkpoint(config, run))()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
