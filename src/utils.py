"""What the entry points share: the learning-rate schedule and parameter groups, the run context (device,
mode, ranks), seeding and the logger, the bare model's parameter names, the one-line error wrapper of every
script (``cli_main``), and loading weights for eval / export / fine-tuning (``weights_for``, ``load_pretrained``)."""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn

from src.model_utils import device_adapter

__all__ = ["lr_schedule", "param_groups", "RunContext", "setup_context", "set_seed", "get_logger", "canonical_names",
           "cli_main", "HEAD_KEYS", "weights_for", "load_pretrained"]


def lr_schedule(lr_max: float, lr_min: float, warmup_epochs: int, num_epochs: int,
                steps_per_epoch: int) -> np.ndarray:
    """Per-step learning rate: linear warmup from ``lr_min`` (first step) towards ``lr_max`` over
    ``warmup_epochs``, as the original's ``get_lr`` (lr_min + (lr_max - lr_min) * i / warmup_steps), then
    half-cosine from ``lr_max`` (first step after warmup) down to exactly ``lr_min`` on the last step (the
    original stops one step short of it). ``lr_max == lr_min`` gives a constant rate (the fine-tune recipe)."""
    total = num_epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    lr = np.empty(total, np.float64)
    steps = np.arange(total)
    if warmup:
        lr[:warmup] = lr_min + (lr_max - lr_min) * steps[:warmup] / warmup
    decay = total - warmup
    if decay == 1:
        lr[warmup:] = lr_min
    elif decay > 1:
        progress = (steps[warmup:] - warmup) / (decay - 1)
        lr[warmup:] = lr_min + 0.5 * (lr_max - lr_min) * (1.0 + np.cos(math.pi * progress))
    return lr.astype(np.float32)


def param_groups(params: list[ms.Parameter], weight_decay: float, names: dict[int, str]) -> list[dict]:
    """Weight decay on conv/dense kernels only (names ending in '.weight'); none on norm scales
    and shifts, biases, relative-position tables or LayerScale (as the original project and timm's
    ``no_weight_decay``). ``names`` maps id(param) -> canonical name."""
    decay = [p for p in params if names[id(p)].endswith(".weight")]
    no_decay = [p for p in params if not names[id(p)].endswith(".weight")]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    groups.append({"order_params": params})
    return groups


@dataclass
class RunContext:
    rank_id: int
    rank_size: int
    device_id: int

    @property
    def is_main(self) -> bool:
        return self.rank_id == 0


def setup_context(config) -> RunContext:
    """Device, execution mode and, when started by msrun with several workers, the collective
    backend (HCCL on Ascend, NCCL on GPU, MindSpore's own MCCL on CPU). ``init()`` fails outside
    msrun, so it is called only when RANK_SIZE > 1."""
    mode = ms.GRAPH_MODE if config.mode == "GRAPH" else ms.PYNATIVE_MODE
    rank_size = device_adapter.get_device_num()
    # The original's rule: device_id 0 (its default) means "from the environment".
    device_id = config.device_id or device_adapter.get_device_id()
    ms.set_device(config.device_target, device_id if config.device_target != "CPU" else None)
    ms.set_context(mode=mode)
    if config.mode == "GRAPH":
        ms.set_context(jit_config={"jit_level": config.jit_level})
    rank_id = 0
    if rank_size > 1:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        rank_id, rank_size = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=rank_size)
    return RunContext(rank_id=rank_id, rank_size=rank_size, device_id=device_id)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


class _LogFile(logging.FileHandler):
    """The run's log file. A write that fails (full disk) ends the run with one line naming the file, where
    logging's default would print a traceback per message and carry on without a log."""

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        from src.fs_errors import OutputError, cause

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write log file {self.baseFilename}: {cause(exc)}", exc.errno) from None
        super().handleError(record)


def get_logger(output_path: str | None = None, rank_id: int = 0) -> logging.Logger:
    """Console + per-rank log file (``output_path/log/rank_<id>.log``). An output folder that cannot be
    created or written is one OutputError naming it, before any work is done."""
    from src.fs_errors import writing

    logger = logging.getLogger("coatnet")
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank_id}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_path:
        with writing("write to output folder", output_path):
            os.makedirs(os.path.join(output_path, "log"), exist_ok=True)
        path = os.path.join(output_path, "log", f"rank_{rank_id}.log")
        with writing("write log file", path):
            fh = _LogFile(path)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def canonical_names(net: nn.Cell) -> dict[int, str]:
    """id(param) -> the name of the parameter in the bare model. Wrappers (loss cell, AMP O2's
    ``_backbone``) rename parameters; checkpoints always use these names and load strictly."""
    return {id(p): p.name for p in net.get_parameters()}


def cli_main(run, argv=None) -> int:
    """Run an entry point; a bad config, checkpoint or dataset, a file or folder that cannot be written or read
    (``src.fs_errors``) and a data error inside a MindSpore pipeline (``src.image_decode.pipeline_error``) end it
    with one line on stderr and exit code 2 instead of a traceback."""
    import sys

    from src.checkpoint import CheckpointError
    from src.fs_errors import OutputError, describe
    from src.model_utils.config import ConfigError

    try:
        run(argv)
    except (ConfigError, CheckpointError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except OSError as exc:
        if not (isinstance(exc, (OutputError, FileNotFoundError)) or exc.errno is not None):
            raise  # not a file system call (e.g. a library that fails to load): its traceback is the report
        message = describe(exc)
    except RuntimeError as exc:
        image_decode = sys.modules.get("src.image_decode")  # loaded if a pipeline ran
        cause = image_decode.pipeline_error(exc) if image_decode is not None else None
        if cause is None:
            raise
        message = str(cause)
    else:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return 2


HEAD_KEYS = ("head.fc.weight", "head.fc.bias")


def weights_for(net: nn.Cell, path: str, use_ema: bool) -> dict:
    """The model tensors of checkpoint ``path`` (its EMA weights with ``use_ema``), with every
    relative-position table resized to ``net``'s resolution: what eval, export and fine-tune load."""
    from src.checkpoint import load_checkpoint, model_weights
    from src.coatnet import resize_rel_pos_tables

    return resize_rel_pos_tables(model_weights(load_checkpoint(path), use_ema, path), net)


def load_pretrained(net: nn.Cell, path: str, use_ema: bool, logger: logging.Logger) -> None:
    """Start fine-tuning from a checkpoint (ours or converted from timm): relative-position tables
    are resized to the model's resolution, the classifier is re-initialised when the number of
    classes differs, and anything else that does not fit is one clear error (another variant)."""
    from src.checkpoint import CheckpointError, load_into

    weights = weights_for(net, path, use_ema)
    shapes = {p.name: tuple(p.shape) for p in net.get_parameters()}
    head_shape = tuple(np.shape(weights.get(HEAD_KEYS[0], ())))
    if HEAD_KEYS[0] in weights and head_shape[1:] == shapes[HEAD_KEYS[0]][1:] \
            and head_shape[0] != shapes[HEAD_KEYS[0]][0]:
        logger.info(f"re-initialising the classifier head: {path} has {head_shape[0]} classes, "
                    f"the model has {shapes[HEAD_KEYS[0]][0]}")
        for key in HEAD_KEYS:
            weights[key] = next(p for p in net.get_parameters() if p.name == key).asnumpy()
    try:
        load_into(net, weights, path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} -- refusing to fine-tune from it") from None
    logger.info(f"loaded pretrained weights from {path}{' (EMA)' if use_ema else ''}")
