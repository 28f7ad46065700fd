"""What happens around the training steps: step logging, metrics.jsonl, checkpoints, OBS sync."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time

from src.checkpoint import remove_stale_temporaries, save_checkpoint

__all__ = ["StepLogger", "MetricsWriter", "CheckpointManager"]


class StepLogger:
    """Logs every ``interval`` steps: epoch/step, loss, lr, loss scale, img/s and ETA."""

    def __init__(self, logger: logging.Logger, interval: int, steps_per_epoch: int, total_steps: int,
                 global_batch: int):
        self.logger = logger
        self.interval = interval
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._t0 = time.time()
        self._n = 0

    def start_window(self) -> None:
        self._t0, self._n = time.time(), 0

    def step(self, epoch: int, step_in_epoch: int, global_step: int, loss: float, lr: float,
             loss_scale: float, finite: bool) -> dict | None:
        self._n += 1
        if step_in_epoch % self.interval and step_in_epoch != self.steps_per_epoch:
            return None
        dt = max(time.time() - self._t0, 1e-9)
        img_s = self._n * self.global_batch / dt
        eta = (self.total_steps - global_step) * dt / self._n
        self.logger.info(
            f"epoch {epoch} step {step_in_epoch}/{self.steps_per_epoch} loss {loss:.4f} lr {lr:.3e} "
            f"loss_scale {loss_scale:.0f}{'' if finite else ' (overflow: step skipped)'} "
            f"{img_s:.1f} img/s ETA {_hms(eta)}")
        self.start_window()
        return {"type": "step", "epoch": epoch, "step": global_step, "loss": loss, "lr": lr,
                "loss_scale": loss_scale, "img_per_s": img_s}


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsWriter:
    """Appends one JSON object per line to ``output_path/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_path: str, enabled: bool = True):
        self.path = os.path.join(output_path, "metrics.jsonl")
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled or record is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint, so curves do not repeat."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = []
        for ln in lines:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("epoch", 0) <= epoch:
                kept.append(ln if ln.endswith("\n") else ln + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)


_EPOCH_RE = re.compile(r"epoch_(\d+)\.ckpt$")


class CheckpointManager:
    """Epoch checkpoints ``<folder>/epoch_NNNN.ckpt`` (last ``keep_last`` kept) and ``<folder>/best.ckpt``
    (highest score, see ``save``). Writes are atomic, so every listed file is complete."""

    def __init__(self, folder: str, keep_last: int, keep_best: bool, enabled: bool = True):
        self.folder = folder
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.enabled = enabled
        self.best_top1 = -1.0
        if enabled:
            remove_stale_temporaries(self.folder)  # left by a run killed while saving

    def save(self, epoch: int, params: dict, metadata: dict, top1: float | None) -> str | None:
        """Write epoch ``epoch``; ``top1`` is the score best.ckpt is chosen by (None: not evaluated)."""
        if not self.enabled:
            return None
        path = os.path.join(self.folder, f"epoch_{epoch:04d}.ckpt")
        save_checkpoint(params, path, metadata)
        for old in self.epoch_checkpoints()[:-self.keep_last]:
            for f in (old, old + ".json"):
                if os.path.exists(f):
                    os.remove(f)
        if self.keep_best and top1 is not None and top1 > self.best_top1:
            self.best_top1 = top1
            save_checkpoint(params, os.path.join(self.folder, "best.ckpt"), metadata)
        return path

    def epoch_checkpoints(self) -> list[str]:
        files = [f for f in glob.glob(os.path.join(self.folder, "epoch_*.ckpt")) if _EPOCH_RE.search(f)]
        return sorted(files, key=lambda f: int(_EPOCH_RE.search(f).group(1)))

    def latest(self) -> str | None:
        files = self.epoch_checkpoints()
        return files[-1] if files else None
