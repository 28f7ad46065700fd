"""Turn metrics.jsonl into a PNG of loss / lr / top-1 curves (drawn with Pillow, no plotting deps).

    python scripts/plot_metrics.py OUTPUT/metrics.jsonl OUTPUT/curves.png
"""
from __future__ import annotations

import json
import sys

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, PAD = 420, 300, 48


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    steps, epochs = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            (epochs if rec.get("type") == "epoch" else steps).append(rec)
    return steps, epochs


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, xs: list[float], ys: list[float]) -> None:
    left, top, right, bottom = x0 + PAD, PAD, x0 + PANEL_W - 12, PANEL_H - PAD
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 12), title, fill="black")
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y == y]  # drop NaN
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill="gray")
        return
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-12)
    scaled = [(left + (x - xmin) / (xmax - xmin) * (right - left),
               bottom - (y - ymin) / (ymax - ymin) * (bottom - top)) for x, y in pts]
    if len(scaled) > 1:
        draw.line(scaled, fill="#1f77b4", width=2)
    for p in scaled if len(scaled) < 60 else []:
        draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill="#1f77b4")
    draw.text((x0 + 2, top - 4), f"{ymax:.3g}", fill="black")
    draw.text((x0 + 2, bottom - 8), f"{ymin:.3g}", fill="black")
    draw.text((left, bottom + 6), f"{xmin:g}", fill="black")
    draw.text((right - 30, bottom + 6), f"{xmax:g}", fill="black")


def plot(metrics_path: str, png_path: str) -> None:
    steps, epochs = read_metrics(metrics_path)
    img = Image.new("RGB", (PANEL_W * 3, PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    src = steps or epochs
    _panel(draw, 0, "train loss (by step)", [r["step"] for r in src], [r["loss"] for r in src])
    _panel(draw, PANEL_W, "learning rate (by step)", [r["step"] for r in src], [r["lr"] for r in src])
    ev = [r for r in epochs if "top1" in r]
    _panel(draw, 2 * PANEL_W, "val top-1 (by epoch)", [r["epoch"] for r in ev], [r["top1"] for r in ev])
    img.save(png_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/plot_metrics.py METRICS_JSONL OUT_PNG")
    plot(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}")
