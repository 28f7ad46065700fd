"""What keeps one training run whole: one run per output folder (a lock), a run identity recorded in every
checkpoint (so ``--resume=auto`` never continues another run's files), moving an old run aside
(``--overwrite``), and a graceful stop on SIGTERM / SIGINT (finish the step, checkpoint, exit 143 / 130)."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import threading
import time

__all__ = ["RunLock", "RunLockError", "run_identity", "identity_differences", "move_aside", "GracefulStop",
           "IDENTITY_KEYS"]

#: The config keys that change what a run trains: a checkpoint continues only a run equal in all of them.
IDENTITY_KEYS = (
    "model_name", "num_classes", "image_height", "image_width", "data_path", "seed", "batch_size",
    "num_epochs", "lr_max", "lr_min", "lr_warmup_epochs", "weight_decay", "beta1", "beta2", "epsilon",
    "drop_path_rate", "head_drop_rate", "mixup_alpha", "label_smoothing", "rand_augment_num_layers",
    "rand_augment_magnitude", "rand_augment_magnitude_std", "center_crop", "crop_pct", "interpolation",
    "image_mean", "image_std", "enable_ema", "ema_decay", "enable_clip_norm", "gradient_norm", "amp_level",
    "amp_dtype", "loss_scale", "loss_scale_factor", "loss_scale_window", "pretrained",
)


class RunLockError(ValueError):
    """Another live run holds the output folder."""


def run_identity(config, rank_size: int) -> dict:
    """The values of ``IDENTITY_KEYS`` (and the number of ranks, which changes the global batch)."""
    identity = {key: getattr(config, key) for key in IDENTITY_KEYS if hasattr(config, key)}
    identity["rank_size"] = rank_size
    return {k: list(v) if isinstance(v, tuple) else v for k, v in identity.items()}


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """``key (recorded -> current)`` for every identity key whose value differs."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k} ({recorded.get(k)!r} -> {current.get(k)!r})" for k in keys if recorded.get(k) != current.get(k)]


class RunLock:
    """An exclusive lock on ``folder`` for the life of a run: ``folder/.run.lock`` holds the holder's pid
    and host. A second run is refused naming that pid; a lock left by a dead process (the kernel drops
    flock locks with their process) is taken over with a warning naming the dead pid."""

    NAME = ".run.lock"

    def __init__(self, folder: str, logger: logging.Logger):
        self.path = os.path.join(folder, self.NAME)
        self.logger = logger
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"output folder {os.path.dirname(self.path)} is in use by another run "
                                   f"({holder or 'pid unknown'}; lock {self.path}): wait for it to end or "
                                   "use another output_path") from None
            raise
        stale = _read_holder(fd)
        if stale:
            self.logger.warning(f"taking over the lock {self.path} left by {stale}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: the next run takes it over without a stale-lock warning
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def move_aside(output_path: str, paths: list[str], logger: logging.Logger) -> str:
    """Move ``paths`` (files or folders under output_path) into ``output_path/previous_<time>/``, keeping
    their relative layout; nothing is deleted. Returns that folder."""
    target = os.path.join(output_path, time.strftime("previous_%Y%m%d_%H%M%S"))
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(output_path, time.strftime("previous_%Y%m%d_%H%M%S") + f"_{n}")
    for path in paths:
        if not os.path.exists(path):
            continue
        rel = os.path.relpath(path, output_path)
        if rel.startswith(".."):  # a checkpoint folder outside output_path: keep it beside itself
            dest = path.rstrip("/") + "_" + os.path.basename(target)
        else:
            dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(path, dest)
    logger.warning(f"overwrite=True: the previous run's files were moved to {target}")
    return target


class GracefulStop:
    """SIGTERM / SIGINT handlers for the life of a run: the first signal only sets ``signum`` (the trainer
    finishes its step, checkpoints and exits 128 + signum); a watchdog ends the process with that code
    after ``seconds`` if the checkpoint is not done by then (schedulers send SIGKILL soon after SIGTERM);
    a second signal ends it at once. Once a graph has run, MindSpore 2.10's runtime holds SIGINT itself
    and raises SIGTERM for it (signal_util.cc, set again at every graph run): Ctrl-C then arrives as
    SIGTERM and the run exits 143."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, seconds: float, logger: logging.Logger):
        self.seconds = seconds
        self.logger = logger
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum:
            os._exit(128 + self.signum)  # a second signal: the user insists
        self.signum = signum
        timer = threading.Timer(self.seconds, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        self.logger.error(f"{signal.Signals(self.signum).name}: no checkpoint within graceful_exit_seconds "
                          f"({self.seconds:g} s); exiting without one")
        for handler in self.logger.handlers:
            handler.flush()
        os._exit(128 + self.signum)
