"""The training run shared by train.py and finetune.py: parts are built from the config, then
epochs of compiled train steps with evaluation, checkpoints, metrics and OBS sync around them.

A run can be cut anywhere and continued exactly: every random draw of a step is a pure function of
(seed, epoch or step, rank) (the data pipeline is rebuilt per epoch from seed + epoch; the stochastic-depth
noise comes from ``drop_path_noise``), and a checkpoint holds the weights, EMA, both Adam moments, the loss
scale and the step. A resume from a mid-epoch checkpoint replays the epoch's pipeline up to its step, so
crops, RandAugment and MixUp draw what they drew before."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.callbacks import CheckpointManager, MetricsWriter, StepLogger
from src.cell_wrapper import TrainStep, adam_weight_decay, drop_path_noise
from src.checkpoint import CheckpointError, load_checkpoint, read_metadata, weights_fingerprint
from src.coatnet import CoAtNet, create_model
from src.dataset import eval_preprocess
from src.kernels import use_fused_kernels
from src.metrics import evaluate
from src.precision import apply_precision
from src.run_control import GracefulStop, RunLock, identity_differences, move_aside, run_identity
from src.train_state import TrainState, create_ema
from src.utils import RunContext, canonical_names, get_logger, lr_schedule, param_groups, set_seed

__all__ = ["build_model", "build_train_step", "StepParts", "train"]


def build_model(config) -> CoAtNet:
    """The configured variant with the fused CPU kernels where they apply; ``drop_path_rate`` -1 takes the
    variant's own rate."""
    net = create_model(config.model_name, num_classes=config.num_classes,
                       image_size=(config.image_height, config.image_width),
                       drop_path_rate=None if config.drop_path_rate < 0 else config.drop_path_rate,
                       drop_rate=config.head_drop_rate)
    return use_fused_kernels(net)


def checkpoint_folder(config) -> str:
    """Where a run's checkpoints go: ``save_checkpoint_path`` (the original's key), else output_path/checkpoints."""
    return config.save_checkpoint_path or os.path.join(config.output_path, "checkpoints")


def _profiler(config):
    """MindSpore's Profiler around the run (``enable_profiling``), writing into output_path/profiler."""
    if not config.enable_profiling:
        return None
    from mindspore import Profiler

    return Profiler(output_path=os.path.join(config.output_path, "profiler"))


@dataclasses.dataclass
class StepParts:
    """What one compiled training step is made of (``build_train_step``)."""

    optimizer: nn.AdamWeightDecay
    ema: tuple | None  # 'ema.<name>' shadows of every model tensor, or None
    step_cell: TrainStep
    lr: np.ndarray  # per-step learning rate the optimizer indexes


def build_train_step(config, net: nn.Cell, names: dict[int, str], steps_per_epoch: int,
                     rank_size: int = 1) -> StepParts:
    """The train step of ``config`` around ``net`` (already set up for its precision): AdamWeightDecay over
    the lr schedule, EMA, loss scale, clipping and (``rank_size`` > 1) the gradient all-reduce. train.py,
    finetune.py and bench/bench_train.py build their steps here, so the benchmark measures what trains."""
    lr = lr_schedule(config.lr_max, config.lr_min, config.lr_warmup_epochs, config.num_epochs, steps_per_epoch)
    trainable = net.trainable_params()
    optimizer = adam_weight_decay(param_groups(trainable, config.weight_decay, names), ms.Tensor(lr),
                                  config.beta1, config.beta2, config.epsilon)
    all_params = list(net.get_parameters())
    ema = create_ema(all_params, names) if config.enable_ema else None
    reducer = None
    if rank_size > 1:
        reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=rank_size)
    step_cell = TrainStep(net, optimizer, loss_scale=config.loss_scale, scale_factor=config.loss_scale_factor,
                          scale_window=config.loss_scale_window,
                          clip_norm=config.gradient_norm if config.enable_clip_norm else None,
                          ema_params=ema, model_params=tuple(all_params) if ema else None,
                          ema_decay=config.ema_decay, reducer=reducer)
    return StepParts(optimizer, ema, step_cell, lr)


class _StopAgreement(nn.Cell):
    """Data parallel: every rank stops after the same step (as soon as any rank got a signal), so none
    waits forever in the next step's all-reduce. A float32 sum: MindSpore 2.10's CPU AllReduce takes
    float16/float32 only."""

    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, flag):
        return self.all_reduce(flag)


def _resume_source(config, ckpt: CheckpointManager, identity: dict, logger) -> str | None:
    """The checkpoint this run continues, or None for a fresh start. ``--resume=auto`` and a plain rerun
    (no ``--resume``) continue the latest checkpoint in the folder only if it is of this same run (equal
    run identity); a checkpoint of another run is refused naming the keys that differ."""
    if config.resume not in ("", "auto"):
        if not os.path.isfile(config.resume):
            raise CheckpointError(f"resume checkpoint not found: {config.resume}")
        differences = identity_differences(read_metadata(config.resume).get("run_identity") or identity, identity)
        if differences:
            logger.warning(f"resuming {config.resume} with a different config: {', '.join(differences)}")
        return config.resume
    latest = ckpt.latest()
    if latest is None:
        if config.resume == "auto":
            logger.info("resume=auto: no checkpoint yet, starting from scratch")
        return None
    recorded = read_metadata(latest).get("run_identity")
    differences = identity_differences(recorded, identity) if recorded is not None else []
    if recorded is None:
        logger.warning(f"{latest} records no run identity (an older checkpoint): continuing from it")
    elif differences:
        raise CheckpointError(
            f"{latest} is a checkpoint of another run (it differs in {', '.join(differences)}): "
            "use another output_path, "
            f"--overwrite=True to move that run's files aside, or --resume={latest} to continue it with this config")
    if config.resume == "":
        logger.info(f"{ckpt.folder} holds checkpoints of this same run: continuing from the latest "
                    "(--overwrite=True starts over)")
    return latest


def train(config, run: RunContext, init_weights: Callable[[CoAtNet, object], None] | None = None,
          upload: Callable[[], object] | None = None) -> dict:
    """Train as configured. ``init_weights(net, logger)`` loads pretrained weights (finetune);
    ``upload()`` syncs outputs to OBS (ModelArts). Returns the last epoch's metrics. SIGTERM/SIGINT end
    the run after the current step with a resumable checkpoint, as SystemExit(128 + signal)."""
    logger = get_logger(config.output_path, run.rank_id)
    lock = RunLock(config.output_path, logger) if run.is_main else contextlib.nullcontext()
    with lock, GracefulStop(config.graceful_exit_seconds, logger) as stop:
        return _Training(config, run, logger, stop, init_weights, upload).run()


class _Training:
    def __init__(self, config, run: RunContext, logger, stop: GracefulStop, init_weights, upload):
        from src.dataset import class_names, dataset_from_config

        self.config, self.run_ctx, self.logger, self.stop, self.upload = config, run, logger, stop, upload
        set_seed(config.seed)
        net = build_model(config)
        self.names = canonical_names(net)
        if init_weights is not None:
            init_weights(net, logger)
        self.drop_path_rows = net.num_drop_paths
        self.net = net = apply_precision(net, config.amp_level, config.amp_dtype)

        self.val_ds = dataset_from_config(config, "val", run.rank_size, run.rank_id) if config.eval_interval else None
        self.first_ds = dataset_from_config(config, "train", run.rank_size, run.rank_id, epoch=0)
        self.steps_per_epoch = self.first_ds.get_dataset_size()
        if self.steps_per_epoch == 0:
            raise ValueError(f"{config.data_path}/train has fewer images per rank than batch_size "
                             f"{config.batch_size}: no full batch to train on")
        self.trainable = net.trainable_params()
        parts = build_train_step(config, net, self.names, self.steps_per_epoch, run.rank_size)
        self.optimizer, self.ema, self.step_cell, self.lr = parts.optimizer, parts.ema, parts.step_cell, parts.lr
        self.agreement = _StopAgreement() if run.rank_size > 1 else None
        self.state = TrainState(net, self.names, self.optimizer, self.step_cell, self.ema)
        self.identity = run_identity(config, run.rank_size)
        self.ckpt = CheckpointManager(checkpoint_folder(config), config.keep_checkpoint_max,
                                      config.keep_best_checkpoint, enabled=run.is_main and config.save_checkpoint)
        self.metrics = MetricsWriter(config.output_path, enabled=run.is_main)
        # best.ckpt by the raw weights' top-1 (the original's Monitor), or by the EMA weights' when asked.
        self.best_key = "ema_top1" if config.keep_best_by == "ema_top1" and self.ema is not None else "top1"
        self.class_names = class_names(config.data_path)  # recorded with every checkpoint (infer.py's labels)
        self.epoch, self.step = 0, 0  # epochs completed, train steps taken

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        config, logger = self.config, self.logger
        self._start()
        global_batch = config.batch_size * self.run_ctx.rank_size
        logger.info(f"rank {self.run_ctx.rank_id}/{self.run_ctx.rank_size}: "
                    f"{self.steps_per_epoch * config.batch_size} train samples per epoch "
                    f"(shard {self.run_ctx.rank_id} of {self.run_ctx.rank_size})")
        logger.info(f"model {config.model_name}: {sum(p.size for p in self.trainable):,} trainable params; "
                    f"{self.steps_per_epoch} steps/epoch x {config.num_epochs} epochs, global batch {global_batch}")
        if self.epoch >= config.num_epochs:
            logger.info(f"nothing to train: the run finished its {config.num_epochs} epochs")
            return {}
        # a second model instance the EMA weights are scored in (built only when a run has epochs left)
        ema_net = build_model(config) if self.val_ds is not None and self.ema is not None else None
        self.step_log = StepLogger(logger, config.log_interval, self.steps_per_epoch,
                                   self.steps_per_epoch * config.num_epochs, global_batch)
        profiler = _profiler(config)
        record: dict = {}
        compiled = False
        for epoch in range(self.epoch, config.num_epochs):
            record, compiled = self._train_epoch(epoch, compiled), True
            self._end_epoch(epoch, record, ema_net)
        if profiler is not None:
            profiler.analyse()
            logger.info(f"profile written to {os.path.join(config.output_path, 'profiler')}")
        # Trainable weights only: gradients are all-reduced, so these must agree on every rank, while
        # BatchNorm running statistics are per rank in data parallel (each normalises its own shard).
        fingerprint = weights_fingerprint({self.names[id(p)]: p for p in self.net.trainable_params()})
        logger.info(f"final weights fingerprint {fingerprint}")
        record["weights_fingerprint"] = fingerprint
        return record

    def _start(self) -> None:
        """Move an old run aside (overwrite), or continue this run's latest checkpoint."""
        config, logger = self.config, self.logger
        if config.overwrite:
            if self.run_ctx.is_main:
                old = [p for p in (self.ckpt.folder, self.metrics.path) if os.path.exists(p)]
                if old:
                    move_aside(config.output_path, old, logger)
            source = config.resume if config.resume not in ("", "auto") else None
        else:
            source = _resume_source(config, self.ckpt, self.identity, logger)
        if source is None:
            self.metrics.truncate_after(0)  # records of a run cut short before its first checkpoint
            return
        params = load_checkpoint(source)
        self.epoch, self.step = self.state.load(params, source, self.steps_per_epoch)
        meta = read_metadata(source)
        recorded_spe = meta.get("steps_per_epoch", self.steps_per_epoch)
        into_epoch = self.step - self.epoch * self.steps_per_epoch
        if recorded_spe != self.steps_per_epoch or not 0 <= into_epoch < self.steps_per_epoch:
            raise CheckpointError(f"{source} was written with {recorded_spe} steps per epoch, this run has "
                                  f"{self.steps_per_epoch} (another dataset, batch size or number of ranks?)")
        self.ckpt.repair_best(meta.get("best_epoch", 0), meta.get("best_top1", -1.0), logger)
        self.metrics.truncate_after(self.step)
        where = f"epoch {self.epoch + 1} step {into_epoch}" if into_epoch else f"the end of epoch {self.epoch}"
        logger.info(f"resumed from {source}: {where} (train step {self.step})")

    def _epoch_dataset(self, epoch: int):
        from src.dataset import dataset_from_config

        ds = self.first_ds if epoch == 0 and self.first_ds is not None else dataset_from_config(
            self.config, "train", self.run_ctx.rank_size, self.run_ctx.rank_id, epoch=epoch)
        self.first_ds = None
        done = self.step - epoch * self.steps_per_epoch
        if done > 0:
            # The skipped batches still run through the pipeline (decode, crop, RandAugment, MixUp), so the
            # generators stand where the cut-short run's stood: the rest of the epoch is what it would have seen.
            self.logger.info(f"replaying the data pipeline through the {done} batches of epoch {epoch + 1} "
                             "trained before the resume")
            ds = ds.skip(done)
        return ds

    def _train_epoch(self, epoch: int, compiled: bool) -> dict:
        from src.image_decode import skipped_files

        config, run = self.config, self.run_ctx
        ds = self._epoch_dataset(epoch)
        self.net.set_train(True)
        self.step_log.start_window()
        t_epoch, losses, overflows = time.time(), [], 0
        skipped_before = len(skipped_files())
        in_epoch = self.step - epoch * self.steps_per_epoch
        for images, target in ds.create_tuple_iterator(num_epochs=1):
            noise = drop_path_noise(config.seed, run.rank_id, self.step, self.drop_path_rows, images.shape[0])
            if not compiled:
                self.step_cell.compile_for(images, target, noise)
            lr_step = self._lr_step()
            loss, finite, scale, _ = self.step_cell(images, target, noise)
            compiled = True
            loss_v, finite_v = float(loss.asnumpy()), bool(finite.asnumpy())
            self.step += 1
            in_epoch += 1
            if finite_v:
                losses.append(loss_v)
            else:
                overflows += 1
            self.metrics.write(self.step_log.step(epoch + 1, in_epoch, self.step, loss_v,
                                                  float(self.lr[min(lr_step, len(self.lr) - 1)]),
                                                  float(scale.asnumpy()), finite_v))
            signum = self._agreed_stop()
            periodic = config.save_checkpoint_steps and self.step % config.save_checkpoint_steps == 0
            if (signum or periodic) and in_epoch < self.steps_per_epoch:  # the epoch's end saves anyway
                path = self._save(CheckpointManager.name(epoch + 1, in_epoch), epoch, {})
                if signum:
                    self._exit(signum, path)
                if self.upload is not None and run.is_main:
                    self._upload()
        skipped = len(skipped_files()) - skipped_before
        return {"type": "epoch", "epoch": epoch + 1, "step": self.step,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": float(self.lr[max(min(self._lr_step(), len(self.lr)) - 1, 0)]),
                "loss_scale": float(self.step_cell.loss_scale.asnumpy()), "overflow_steps": overflows,
                "skipped_files": skipped, "epoch_time_s": time.time() - t_epoch}

    def _end_epoch(self, epoch: int, record: dict, ema_net) -> None:
        config, run = self.config, self.run_ctx
        is_last = epoch + 1 == config.num_epochs
        signum = self._agreed_stop()
        if self.val_ds is not None and not signum and ((epoch + 1) % config.eval_interval == 0 or is_last):
            # The raw weights, as the original scored them, and with EMA on the EMA weights too.
            record.update(evaluate(self.net, self.val_ds, run.rank_size))
            if ema_net is not None:
                self.state.copy_ema_into(ema_net)
                record.update({f"ema_{k}": v for k, v in evaluate(ema_net, self.val_ds, run.rank_size).items()
                               if k in ("top1", "top5")})
        scores = "".join(f"{k} {record[k]:.4f} " for k in ("top1", "top5", "ema_top1", "ema_top5") if k in record)
        self.logger.info(f"epoch {epoch + 1}/{config.num_epochs} loss {record['loss']:.4f} {scores}"
                         f"skipped files {record['skipped_files']} time {record['epoch_time_s']:.1f}s")
        self.metrics.write(record)
        path = None
        if (epoch + 1) % config.save_checkpoint_epochs == 0 or is_last or signum:
            path = self._save(CheckpointManager.name(epoch + 1), epoch + 1, record)
        if signum:
            self._exit(signum, path)
        if self.upload is not None and run.is_main and (epoch + 1) % max(config.obs_sync_interval_epochs, 1) == 0:
            self._upload()

    def _save(self, name: str, epochs_done: int, record: dict) -> str | None:
        config = self.config
        meta = {"model_name": config.model_name, "num_classes": config.num_classes,
                "image_height": config.image_height, "image_width": config.image_width,
                "epoch": epochs_done, "global_step": self.step, "steps_per_epoch": self.steps_per_epoch,
                "top1": record.get("top1"), "best_by": self.best_key, "has_ema": self.ema is not None,
                **eval_preprocess(config), "class_names": self.class_names,
                "run_identity": self.identity}
        path = self.ckpt.save(name, self.state.to_params(epochs_done, self.step), meta, record.get(self.best_key))
        if path:
            self.logger.info(f"saved {path}")
        return path

    def _lr_step(self) -> int:
        """The optimizer's step counter, which indexes the lr schedule."""
        return int(self.optimizer.global_step.asnumpy().reshape(-1)[0])

    def _agreed_stop(self) -> int:
        signum = self.stop.signum
        if self.agreement is not None:
            stopping = self.agreement(ms.Tensor(np.array([float(signum > 0)], np.float32))).asnumpy()[0] > 0
            signum = (signum or int(signal.SIGTERM)) if stopping else 0
        return signum

    def _upload(self) -> None:
        try:
            self.upload()
        except Exception as exc:  # a failed periodic upload must not end the run
            self.logger.warning(f"periodic OBS upload failed ({exc}); the final upload will retry")

    def _exit(self, signum: int, path: str | None) -> None:
        name = signal.Signals(signum).name
        where = f"saved {path}" if path else "checkpoints are written by rank 0"
        self.logger.warning(f"{name} received: stopped after train step {self.step}; {where}; "
                            f"continue with --resume=auto; exiting with code {128 + signum}")
        for handler in self.logger.handlers:
            handler.flush()
        raise SystemExit(128 + signum)
