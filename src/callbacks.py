"""What happens around the training steps: step logging, metrics.jsonl and the checkpoint files of a run
(which to keep, best.ckpt). OBS sync is src/model_utils/moxing_adapter.py."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time

from src.checkpoint import copy_checkpoint, read_metadata, remove_stale_temporaries, save_checkpoint
from src.fs_errors import writing

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
        with writing("write metrics", self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """On resume from global step ``step``: drop the records written after it (by the run that was cut
        short, or by the run whose files were there before), so curves do not repeat."""
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
            if rec.get("step", 0) <= step:
                kept.append(ln if ln.endswith("\n") else ln + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)


# epoch_0003.ckpt: the end of epoch 3; epoch_0003_step_000120.ckpt: 120 steps into epoch 3 (save_checkpoint_steps,
# or a graceful stop). Sorted by (epoch, step), an epoch's end after its mid-epoch files.
_CKPT_RE = re.compile(r"epoch_(\d+)(?:_step_(\d+))?\.ckpt$")
BEST = "best.ckpt"


def _order(path: str) -> tuple[int, float]:
    m = _CKPT_RE.search(path)
    return int(m.group(1)), float(m.group(2)) if m.group(2) else float("inf")


class CheckpointManager:
    """Resumable checkpoints ``<folder>/epoch_NNNN.ckpt`` (epoch ends) and ``epoch_NNNN_step_SSSSSS.ckpt``
    (mid-epoch), the last ``keep_last`` of both kinds kept, and ``<folder>/best.ckpt`` (highest score, see
    ``save``). Writes are atomic, so every listed file is complete."""

    def __init__(self, folder: str, keep_last: int, keep_best: bool, enabled: bool = True):
        self.folder = folder
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.enabled = enabled
        self.best_top1 = -1.0
        self.best_epoch = 0
        if enabled:
            remove_stale_temporaries(self.folder)  # left by a run killed while saving

    @staticmethod
    def name(epoch: int, step_in_epoch: int | None = None) -> str:
        """File name of the end of ``epoch`` (1-based), or of ``step_in_epoch`` steps into it."""
        if step_in_epoch is None:
            return f"epoch_{epoch:04d}.ckpt"
        return f"epoch_{epoch:04d}_step_{step_in_epoch:06d}.ckpt"

    def save(self, name: str, params: dict, metadata: dict, top1: float | None = None) -> str | None:
        """Write checkpoint ``name``; ``top1`` is the score best.ckpt is chosen by (None: not evaluated)."""
        if not self.enabled:
            return None
        path = os.path.join(self.folder, name)
        if self.keep_best and top1 is not None and top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, int(metadata["epoch"])
        metadata = {**metadata, "best_top1": self.best_top1, "best_epoch": self.best_epoch}
        save_checkpoint(params, path, metadata)
        for old in self.checkpoints()[:-self.keep_last]:
            for f in (old, old + ".json"):
                if os.path.exists(f):
                    os.remove(f)
        if self.keep_best and self.best_epoch == metadata["epoch"] and top1 is not None:
            self._copy_to_best(path)
        return path

    def _copy_to_best(self, path: str) -> None:
        # The epoch file is complete already, so this is a copy, not a re-save.
        copy_checkpoint(path, os.path.join(self.folder, BEST))

    def repair_best(self, best_epoch: int, best_top1: float, logger) -> None:
        """After a resume: make best.ckpt the recorded best epoch's again if a kill or a full disk cut its
        write short (best.ckpt missing, or its sidecar of another epoch). From that epoch's checkpoint when
        it is still kept; otherwise the best score is forgotten, so the next evaluated epoch writes one."""
        self.best_top1, self.best_epoch = best_top1, best_epoch
        if not (self.enabled and self.keep_best and best_epoch > 0):
            return
        best = os.path.join(self.folder, BEST)
        if os.path.isfile(best) and read_metadata(best).get("epoch") == best_epoch:
            return
        source = os.path.join(self.folder, self.name(best_epoch))
        if os.path.isfile(source):
            self._copy_to_best(source)
            logger.warning(f"{best} was not the best epoch's ({best_epoch}): restored from {source}")
        else:
            self.best_top1, self.best_epoch = -1.0, 0
            logger.warning(f"{best} was not the best epoch's ({best_epoch}) and {source} is no longer kept: "
                           "the next evaluated epoch writes a new best.ckpt")

    def checkpoints(self) -> list[str]:
        """Resumable checkpoints, oldest first."""
        files = [f for f in glob.glob(os.path.join(self.folder, "epoch_*.ckpt")) if _CKPT_RE.search(f)]
        return sorted(files, key=_order)

    def latest(self) -> str | None:
        files = self.checkpoints()
        return files[-1] if files else None
