"""The training run shared by train.py and finetune.py: parts are built from the config, then
epochs of compiled train steps with evaluation, checkpoints, metrics and OBS sync around them."""
from __future__ import annotations

import os
import time
import types
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import nn

from src.callbacks import CheckpointManager, MetricsWriter, StepLogger
from src.cell_wrapper import TrainStep
from src.checkpoint import EMA_PREFIX, CheckpointError, load_checkpoint, read_metadata, weights_fingerprint
from src.coatnet import CoAtNet, create_model
from src.metrics import evaluate
from src.precision import apply_precision
from src.utils import RunContext, canonical_names, get_logger, lr_schedule, param_groups, set_seed

__all__ = ["build_model", "train"]


def build_model(config) -> CoAtNet:
    """The configured variant; ``drop_path_rate`` -1 takes the variant's own rate."""
    return create_model(config.model_name, num_classes=config.num_classes,
                        image_size=(config.image_height, config.image_width),
                        drop_path_rate=None if config.drop_path_rate < 0 else config.drop_path_rate,
                        drop_rate=config.head_drop_rate)


def checkpoint_folder(config) -> str:
    """Where a run's checkpoints go: ``save_checkpoint_path`` (the original's key), else output_path/checkpoints."""
    return config.save_checkpoint_path or os.path.join(config.output_path, "checkpoints")


def _profiler(config):
    """MindSpore's Profiler around the run (``enable_profiling``), writing into output_path/profiler."""
    if not config.enable_profiling:
        return None
    from mindspore import Profiler

    return Profiler(output_path=os.path.join(config.output_path, "profiler"))


def _epoch_config(config, epoch: int):
    # Each epoch's sample order and augmentation depend only on (seed, epoch): a resumed run
    # replays exactly the epochs an uninterrupted run would have seen.
    return types.SimpleNamespace(**{**config.to_dict(), "seed": config.seed + epoch})


class _State:
    """Everything a checkpoint holds besides the model weights, and its (de)serialisation."""

    def __init__(self, net, names, optimizer, step_cell, ema):
        self.net, self.names, self.optimizer, self.step_cell, self.ema = net, names, optimizer, step_cell, ema

    def _moments(self):
        """(checkpoint name, moment parameter) of both AdamWeightDecay moments of every weight."""
        for prefix, moments in (("adam_m.", self.optimizer.moments1), ("adam_v.", self.optimizer.moments2)):
            for p, m in zip(self.optimizer.parameters, moments, strict=True):
                yield prefix + self.names[id(p)], m

    def to_params(self, epoch: int) -> dict:
        params = {self.names[id(p)]: p for p in self.net.get_parameters()}
        params.update(self._moments())
        if self.ema is not None:
            for p in self.ema:
                params[p.name] = p
        params["state.global_step"] = self.optimizer.global_step
        params["state.loss_scale"] = self.step_cell.loss_scale
        params["state.good_steps"] = self.step_cell.good_steps
        params["state.epoch"] = ms.Tensor(np.array(epoch, np.int32))
        return params

    def load(self, params: dict, source: str) -> int:
        from src.checkpoint import load_into, model_weights

        load_into(self.net, model_weights(params), source, names=self.names)
        for key, m in self._moments():
            if key not in params:
                raise CheckpointError(f"{source} has no optimizer state '{key}': not a training checkpoint")
            m.set_data(ms.Tensor(params[key]))
        if self.ema is not None:
            for p in self.ema:
                # A checkpoint trained without EMA starts the average from its weights.
                p.set_data(ms.Tensor(params.get(p.name, params[p.name[len(EMA_PREFIX):]])))
        for key in ("state.global_step", "state.loss_scale", "state.good_steps", "state.epoch"):
            if key not in params:
                raise CheckpointError(f"{source} has no '{key}': not a training checkpoint")
        self.optimizer.global_step.set_data(ms.Tensor(params["state.global_step"]).reshape(
            self.optimizer.global_step.shape).astype(self.optimizer.global_step.dtype))
        self.step_cell.loss_scale.set_data(ms.Tensor(params["state.loss_scale"], ms.float32))
        self.step_cell.good_steps.set_data(ms.Tensor(params["state.good_steps"], ms.int32))
        return int(params["state.epoch"])


def _global_step(optimizer) -> int:
    """Steps taken so far (the optimizer's counter, which also indexes the lr schedule)."""
    return int(optimizer.global_step.asnumpy().reshape(-1)[0])


def resolve_resume(config, ckpt: CheckpointManager) -> str | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        return ckpt.latest()
    if not os.path.isfile(config.resume):
        raise CheckpointError(f"resume checkpoint not found: {config.resume}")
    return config.resume


def train(config, run: RunContext, init_weights: Callable[[CoAtNet, object], None] | None = None,
          upload: Callable[[], object] | None = None) -> dict:
    """Train as configured. ``init_weights(net, logger)`` loads pretrained weights (finetune);
    ``upload()`` syncs outputs to OBS (ModelArts). Returns the last epoch's metrics."""
    from src.dataset import class_names, dataset_from_config, skipped_files

    logger = get_logger(config.output_path, run.rank_id)
    set_seed(config.seed)
    net = build_model(config)
    names = canonical_names(net)
    if init_weights is not None:
        init_weights(net, logger)
    net = apply_precision(net, config.amp_level, config.amp_dtype)

    val_ds = dataset_from_config(config, "val", run.rank_size, run.rank_id) if config.eval_interval else None
    first_ds = dataset_from_config(_epoch_config(config, 0), "train", run.rank_size, run.rank_id)
    steps_per_epoch = first_ds.get_dataset_size()
    if steps_per_epoch == 0:
        raise ValueError(f"{config.data_path}/train has fewer images per rank than batch_size "
                         f"{config.batch_size}: no full batch to train on")
    total_steps = steps_per_epoch * config.num_epochs
    lr = lr_schedule(config.lr_max, config.lr_min, config.lr_warmup_epochs, config.num_epochs, steps_per_epoch)
    trainable = net.trainable_params()
    optimizer = nn.AdamWeightDecay(param_groups(trainable, config.weight_decay, names),
                                   learning_rate=ms.Tensor(lr), beta1=config.beta1, beta2=config.beta2,
                                   eps=config.epsilon)
    all_params = list(net.get_parameters())
    ema = None
    if config.enable_ema:
        # EMA over every model tensor, BatchNorm statistics included, stored under 'ema.<name>'.
        ema = tuple(ms.Parameter(p.value().copy(), name=EMA_PREFIX + names[id(p)], requires_grad=False)
                    for p in all_params)
    reducer = None
    if run.rank_size > 1:
        reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=run.rank_size)
    step_cell = TrainStep(net, optimizer, loss_scale=config.loss_scale, scale_factor=config.loss_scale_factor,
                          scale_window=config.loss_scale_window,
                          clip_norm=config.gradient_norm if config.enable_clip_norm else None,
                          ema_params=ema, model_params=tuple(all_params) if ema else None,
                          ema_decay=config.ema_decay, reducer=reducer)
    state = _State(net, names, optimizer, step_cell, ema)

    ckpt = CheckpointManager(checkpoint_folder(config), config.keep_checkpoint_max, config.keep_best_checkpoint,
                             enabled=run.is_main and config.save_checkpoint)
    metrics = MetricsWriter(config.output_path, enabled=run.is_main)
    start_epoch = 0
    resume_path = resolve_resume(config, ckpt)
    if resume_path:
        start_epoch = state.load(load_checkpoint(resume_path), resume_path)
        ckpt.best_top1 = read_metadata(resume_path).get("best_top1", -1.0)
        metrics.truncate_after(start_epoch)
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, step "
                    f"{_global_step(optimizer)}")
    elif config.resume == "auto":
        logger.info("resume=auto: no checkpoint yet, starting from scratch")

    ema_net = build_model(config) if val_ds is not None and ema is not None else None
    global_batch = config.batch_size * run.rank_size
    logger.info(f"rank {run.rank_id}/{run.rank_size}: {steps_per_epoch * config.batch_size} train samples "
                f"per epoch (shard {run.rank_id} of {run.rank_size})")
    logger.info(f"model {config.model_name}: {sum(p.size for p in trainable):,} trainable params; "
                f"{steps_per_epoch} steps/epoch x {config.num_epochs} epochs, global batch {global_batch}")
    step_log = StepLogger(logger, config.log_interval, steps_per_epoch, total_steps, global_batch)
    # best.ckpt by the raw weights' top-1 (the original's Monitor), or by the EMA weights' when asked.
    best_key = "ema_top1" if config.keep_best_by == "ema_top1" and ema is not None else "top1"
    profiler = _profiler(config)
    train_classes = class_names(config.data_path)  # recorded with every checkpoint (infer.py's labels)
    record: dict = {}
    for epoch in range(start_epoch, config.num_epochs):
        ds = first_ds if epoch == 0 else dataset_from_config(_epoch_config(config, epoch), "train",
                                                             run.rank_size, run.rank_id)
        first_ds = None
        net.set_train(True)
        step_log.start_window()
        t_epoch, losses, overflows, n_steps = time.time(), [], 0, 0
        skipped_before = len(skipped_files())
        for images, target in ds.create_tuple_iterator(num_epochs=1):
            if epoch == start_epoch and n_steps == 0:
                step_cell.compile_for(images, target)
            global_step = _global_step(optimizer)
            loss, finite, scale, _ = step_cell(images, target)
            loss_v, finite_v = float(loss.asnumpy()), bool(finite.asnumpy())
            n_steps += 1
            if finite_v:
                losses.append(loss_v)
            else:
                overflows += 1
            metrics.write(step_log.step(epoch + 1, n_steps, global_step + 1, loss_v, float(lr[global_step]),
                                        float(scale.asnumpy()), finite_v))
        skipped = len(skipped_files()) - skipped_before
        done = _global_step(optimizer)
        record = {"type": "epoch", "epoch": epoch + 1, "step": done,
                  "loss": float(np.mean(losses)) if losses else float("nan"), "lr": float(lr[max(done - 1, 0)]),
                  "loss_scale": float(step_cell.loss_scale.asnumpy()), "overflow_steps": overflows,
                  "skipped_files": skipped, "epoch_time_s": time.time() - t_epoch}
        is_last = epoch + 1 == config.num_epochs
        if val_ds is not None and ((epoch + 1) % config.eval_interval == 0 or is_last):
            # The raw weights, as the original scored them, and with EMA on the EMA weights too.
            record.update(evaluate(net, val_ds, run.rank_size))
            if ema_net is not None:
                for p, e in zip(ema_net.get_parameters(), ema, strict=True):
                    p.set_data(e.value())
                record.update({f"ema_{k}": v for k, v in evaluate(ema_net, val_ds, run.rank_size).items()
                               if k in ("top1", "top5")})
        scores = "".join(f"{k} {record[k]:.4f} " for k in ("top1", "top5", "ema_top1", "ema_top5") if k in record)
        logger.info(f"epoch {epoch + 1}/{config.num_epochs} loss {record['loss']:.4f} {scores}"
                    f"skipped files {skipped} time {record['epoch_time_s']:.1f}s")
        metrics.write(record)
        if (epoch + 1) % config.save_checkpoint_epochs == 0 or is_last:
            meta = {"model_name": config.model_name, "num_classes": config.num_classes,
                    "image_height": config.image_height, "image_width": config.image_width,
                    "epoch": epoch + 1, "global_step": record["step"], "top1": record.get("top1"),
                    "best_by": best_key, "best_top1": max(ckpt.best_top1, record.get(best_key) or -1.0),
                    "has_ema": ema is not None, "image_mean": config.image_mean, "image_std": config.image_std,
                    "crop_pct": config.crop_pct, "interpolation": config.interpolation,
                    "center_crop": config.center_crop, "eval_resize": config.eval_resize,
                    "class_names": train_classes}
            path = ckpt.save(epoch + 1, state.to_params(epoch + 1), meta, record.get(best_key))
            if path:
                logger.info(f"saved {path}")
        if upload is not None and run.is_main and (epoch + 1) % max(config.obs_sync_interval_epochs, 1) == 0:
            try:
                upload()
            except Exception as exc:  # a failed periodic upload must not end the run
                logger.warning(f"periodic OBS upload failed ({exc}); the final upload will retry")
    # Trainable weights only: gradients are all-reduced, so these must agree on every rank, while
    # BatchNorm running statistics are per rank in data parallel (each normalises its own shard).
    if profiler is not None:
        profiler.analyse()
        logger.info(f"profile written to {os.path.join(config.output_path, 'profiler')}")
    fingerprint = weights_fingerprint({names[id(p)]: p for p in net.trainable_params()})
    logger.info(f"final weights fingerprint {fingerprint}")
    record["weights_fingerprint"] = fingerprint
    return record
