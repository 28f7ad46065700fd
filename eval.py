"""Evaluate a checkpoint or an exported model: python eval.py --checkpoint_path=CKPT|X.mindir|X.onnx
[--use_ema=True] [--key=value ...]

Prints `top1: <x> top5: <y>` and writes eval_result.json into result_path (default output_path; on
ModelArts / OpenI the folder goes to result_url). The model, input size and eval
preprocessing recorded beside the file (``<file>.json``: a training run's, the timm converter's or
export.py's) are used unless the keys are given explicitly, so an export is checked on the same
images the checkpoint was (`.onnx` needs onnxruntime). An exported model is evaluated in one process.
"""
import json
import os

import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.fs_errors import write_text_atomic, writing
from src.model_utils.config import ConfigError, load_config
from src.model_utils.moxing_adapter import fetch_checkpoint, moxing_wrapper
from src.utils import cli_main, setup_context


def evaluate_checkpoint(config, run) -> dict:
    from src.dataset import dataset_from_config, eval_preprocess
    from src.metrics import evaluate
    from src.predict import evaluate_model, is_export, open_model

    results = config.result_path or config.output_path
    if run.is_main:  # a folder that cannot take the result fails now, not after the evaluation
        with writing("write to output folder", results):
            os.makedirs(results, exist_ok=True)
    if is_export(config.checkpoint_path) and run.rank_size > 1:
        raise ConfigError(f"an exported model ({config.checkpoint_path}) is evaluated in one process; "
                          "start eval.py without msrun")
    model = open_model(config)  # sets the model, size and preprocessing keys recorded beside the file
    if model.net is not None:
        result = evaluate(model.net, dataset_from_config(config, "val", run.rank_size, run.rank_id), run.rank_size)
    else:
        result = evaluate_model(model, dataset_from_config(config, "val"))
    result.update(checkpoint=config.checkpoint_path, format=model.kind, use_ema=config.use_ema,
                  model_name=config.model_name, **eval_preprocess(config))
    print(f"top1: {result['top1']:.4f} top5: {result['top5']:.4f}")
    if run.is_main:
        write_text_atomic(os.path.join(results, "eval_result.json"), "write eval result",
                          lambda f: json.dump(result, f, indent=1))
    return result


def main(argv=None) -> None:
    config = load_config(argv)
    run = setup_context(config)
    pre = (lambda: fetch_checkpoint(config, "checkpoint_path")) if config.checkpoint_url else None
    moxing_wrapper(config, pre_process=pre)(lambda: evaluate_checkpoint(config, run))()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
