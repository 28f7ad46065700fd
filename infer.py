"""Classify images: python infer.py --checkpoint_path=MODEL --input=PATHS [--topk=5] [--output=FILE.json|FILE.csv]
                                  [--class_names=FILE] [--use_ema=True] [--strict=True]

MODEL: a checkpoint (.ckpt: ours, the original MindSpore CoAtNet's, or one converted from timm), or a .mindir or
.onnx file written by export.py (.onnx needs onnxruntime). PATHS: image files, folders (searched recursively for
.jpg/.jpeg/.png/... files) and globs, comma-separated. The model's eval preprocessing, input size and class names
come from the metadata beside it (MODEL.json); --class_names (one name per line, line i naming class i) overrides
the names, and a 1000-class model without recorded names prints ImageNet's.

Prints the top-k classes of each image (index, probability, name) as a table; --output also writes them as JSON
or CSV. An unreadable, non-image or missing input is named on stderr and skipped, and the run ends with exit code
0 and the count (1 if nothing could be classified); with --strict=True the first one ends it with exit code 1. A
model that does not match its metadata or the flags is one line and exit code 2.
"""
import os
import sys

import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.model_utils.config import ConfigError, load_config
from src.utils import cli_main, setup_context

OUTPUT_FORMATS = (".json", ".csv")


def input_specs(value: str) -> list[str]:
    """--input: one path (commas allowed in it) or several separated by commas."""
    if os.path.exists(value):
        return [value]
    return [spec.strip() for spec in value.split(",") if spec.strip()]


def check_request(config) -> None:
    if not config.input:
        raise ConfigError("config key 'input': nothing to classify; set --input=IMAGE,FOLDER,GLOB")
    if config.topk < 1:
        raise ConfigError(f"config key 'topk': value {config.topk} must be > 0")
    if config.output and not config.output.lower().endswith(OUTPUT_FORMATS):
        raise ConfigError(f"config key 'output': {config.output} must end in .json or .csv")


def report_unreadable(path: str, reason: str, strict: bool) -> None:
    if strict:
        print(f"error: {path}: {reason} (--strict=True stops at an unreadable input)", file=sys.stderr)
        raise SystemExit(1)
    print(f"skipped {path}: {reason}", file=sys.stderr)


def main(argv=None) -> None:
    from src import predict

    config = load_config(argv)
    check_request(config)
    files, skipped = predict.expand_inputs(input_specs(config.input))
    for path, reason in skipped:
        report_unreadable(path, reason, config.strict)
    if not files:
        print(f"classified 0 images, skipped {len(skipped)} inputs", file=sys.stderr)
        raise SystemExit(1)
    setup_context(config)
    model = predict.open_model(config, batch_size=min(config.eval_batch_size or config.batch_size, len(files)))
    names = predict.display_class_names(model.class_names, model.num_classes)

    predictions = []
    progress = predict.Progress(len(files)) if len(files) > model.batch_size else None
    workers = min(config.num_parallel_workers, os.cpu_count() or 1)
    for result in predict.predict_files(model, files, predict.image_transform(config), config.topk, workers,
                                        progress):
        if isinstance(result, predict.Prediction):
            predictions.append(result)
        else:
            report_unreadable(*result, config.strict)
            skipped.append(result)

    if config.output:
        predict.write_predictions(config.output, predictions, names, skipped, {
            "model": config.checkpoint_path, "format": model.kind, "topk": min(config.topk, model.num_classes)})
    try:
        if predictions:
            print(predict.format_table(predictions, names), flush=True)
    except BrokenPipeError:  # `infer.py ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"classified {len(predictions)} images, skipped {len(skipped)} inputs"
          + (f"; wrote {config.output}" if config.output else ""), file=sys.stderr)
    if not predictions:
        raise SystemExit(1)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
