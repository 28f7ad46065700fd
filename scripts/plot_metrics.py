"""Turn a run's metrics.jsonl into a PNG of its curves (matplotlib): train loss per logged step and per-epoch
mean, learning rate on a log scale, validation top-1 of the raw weights and of the EMA weights.

    python scripts/plot_metrics.py OUTPUT/metrics.jsonl OUTPUT/curves.png

The title names the model when a checkpoint sidecar (OUTPUT/checkpoints/*.ckpt.json) records it.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    LogFormatterSciNotation,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    PercentFormatter,
)

FIGSIZE, DPI = (15.0, 5.2), 100  # 1500 x 520 pixels: three panels side by side, legends below them


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of ``metrics.jsonl``; a line cut short by a killed run is skipped."""
    steps, epochs = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                (epochs if rec.get("type") == "epoch" else steps).append(rec)
    return steps, epochs


def model_name(metrics_path: str) -> str | None:
    """The model_name recorded beside the run's checkpoints, if any."""
    folder = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "checkpoints")
    for sidecar in sorted(glob.glob(os.path.join(folder, "*.ckpt.json")), reverse=True):
        try:
            with open(sidecar) as f:
                name = json.load(f).get("model_name")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return str(name)
    return None


def _finite(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
           and math.isfinite(r[y])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in metrics.jsonl", transform=ax.transAxes, ha="center", va="center",
            color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _epoch_axis(ax: Axes, steps_per_epoch: float | None) -> None:
    """An epoch scale along the top of a by-step panel."""
    if steps_per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        top.set_xlabel("epoch")


def _loss_panel(ax: Axes, steps: list[dict], epochs: list[dict], steps_per_epoch: float | None) -> None:
    sx, sy = _finite(steps, "step", "loss")
    ex, ey = _finite(epochs, "step", "loss")
    if not sx and not ex:
        _no_data(ax, "loss")
    if sx:
        # faint under the epoch means, which carry the trend; the only loss curve of a run without them
        ax.plot(sx, sy, color="tab:blue", alpha=0.45 if ex else 1.0, linewidth=1,
                marker="." if len(sx) < 60 else None, label="logged step")
    if ex:
        ax.plot(ex, ey, color="tab:blue", marker="o", markersize=4, linewidth=2,
                label=f"epoch mean (first {ey[0]:.3g}, last {ey[-1]:.3g})")
    ax.set_title("train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _epoch_axis(ax, steps_per_epoch)


def _lr_panel(ax: Axes, steps: list[dict], epochs: list[dict], steps_per_epoch: float | None) -> None:
    x, y = _finite(steps or epochs, "step", "lr")
    x, y = [a for a, b in zip(x, y, strict=True) if b > 0], [b for b in y if b > 0]  # a log axis has no 0
    if x:
        ax.plot(x, y, color="tab:orange", linewidth=1.5, marker="." if len(x) < 60 else None,
                label=f"{'logged step' if steps else 'epoch end'} (max {max(y):.2e}, last {y[-1]:.2e})")
        ax.set_yscale("log")
        if max(y) / min(y) < 1e3:
            # A cosine schedule to lr_min spans a few decades, which matplotlib marks with two or three
            # labels at most: label 1, 2 and 5 of each decade instead.
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False,
                                                                 minor_thresholds=(math.inf, math.inf)))
            ax.yaxis.set_minor_formatter(NullFormatter())  # within one decade matplotlib labels these too
    else:
        _no_data(ax, "positive lr")
    ax.set_title("learning rate (log scale)")
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    _epoch_axis(ax, steps_per_epoch)


def _top1_panel(ax: Axes, epochs: list[dict]) -> None:
    drawn: list[float] = []
    # EMA dashed over raw solid: where the two scores are equal both lines stay visible.
    for key, label, style in (("top1", "raw weights", dict(color="tab:green", marker="o", linestyle="-")),
                              ("ema_top1", "EMA weights", dict(color="tab:purple", marker="s", linestyle="--"))):
        x, y = _finite(epochs, "epoch", key)
        if not x:
            continue
        best = max(range(len(y)), key=y.__getitem__)
        ax.plot(x, y, markersize=4, linewidth=1.5, **style,
                label=f"{label} (last {y[-1]:.1%}, best {y[best]:.1%} @ epoch {x[best]:g})")
        drawn += y
    if drawn:
        # At least 10 points of top-1 in view: a flat or nearly flat curve is not blown up into noise.
        lo, hi = min(drawn), max(drawn)
        pad = max(0.1 - (hi - lo), 0.0) / 2 + 0.02
        lo, hi = max(lo - pad, 0.0), min(hi + pad, 1.0)
        margin = 0.02 * (hi - lo)  # a score of 0 % or 100 % is drawn inside the frame, not on it
        ax.set_ylim(lo - margin, hi + margin)
    else:
        _no_data(ax, "validation top-1")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))  # the view spans >= 10 points
    ax.set_title("validation top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1")


def plot(metrics_path: str, png_path: str) -> None:
    """Draw the curves of ``metrics_path`` into ``png_path``."""
    steps, epochs = read_metrics(metrics_path)
    ends = [(r["epoch"], r["step"]) for r in epochs if r.get("epoch") and r.get("step")]
    steps_per_epoch = ends[-1][1] / ends[-1][0] if ends else None
    fig, (loss_ax, lr_ax, top1_ax) = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    _loss_panel(loss_ax, steps, epochs, steps_per_epoch)
    _lr_panel(lr_ax, steps, epochs, steps_per_epoch)
    _top1_panel(top1_ax, epochs)
    for ax in (loss_ax, lr_ax, top1_ax):
        if ax.lines:  # an empty panel keeps no ticks
            ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True))  # steps and epochs are whole numbers
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # below the panel: never over a curve
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small", frameon=False)
    name = model_name(metrics_path)
    run = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    fig.suptitle(f"{name} — {run}" if name else run)
    fig.savefig(png_path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/plot_metrics.py METRICS_JSONL OUT_PNG", file=sys.stderr)
        return 2
    try:
        plot(argv[0], argv[1])
    except OSError as exc:
        print(f"error: {exc.filename or argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
