"""scripts/plot_metrics.py: the curves PNG of a real training run (loss, log-scale lr, raw and EMA top-1),
and clear behaviour on partial or missing metrics."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from runs import TINY, make_color_tree, run

# matplotlib's default colours of the curves drawn by scripts/plot_metrics.py
LOSS, LR, RAW, EMA = (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189)


def _panels(png: str) -> list[np.ndarray]:
    """The PNG decoded as RGB, cut into its three panels (loss, lr, top-1) side by side."""
    rgb = np.asarray(Image.open(png).convert("RGB"))
    third = rgb.shape[1] // 3
    return [rgb[:, i * third:(i + 1) * third] for i in range(3)]


def _pixels(panel: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.abs(panel.astype(int) - colour) <= 8, axis=-1).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    data = make_color_tree(str(root / "data"))
    out = str(root / "run")
    run("train.py", f"--data_path={data}", f"--output_path={out}", *TINY, "--num_classes=3", "--num_epochs=3",
        "--batch_size=4", "--lr_max=0.002", "--lr_min=0.0002", "--lr_warmup_epochs=1", "--enable_ema=True",
        "--ema_decay=0.9", "--eval_interval=1", "--rand_augment_num_layers=0")
    return out


@pytest.mark.slow
def test_the_curves_of_a_training_run_are_drawn(trained, tmp_path):
    metrics = os.path.join(trained, "metrics.jsonl")
    records = [json.loads(line) for line in open(metrics)]
    assert any("ema_top1" in r for r in records)  # the run really evaluated the EMA weights
    png = str(tmp_path / "curves.png")
    res = run("scripts/plot_metrics.py", metrics, png)
    assert res.stdout.strip() == f"wrote {png}"
    img = Image.open(png)
    assert img.format == "PNG" and img.size == (1500, 520)
    loss, lr, top1 = _panels(png)
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # not blank
    # each curve in its own panel (hundreds of pixels of its colour), and in no other
    assert _pixels(loss, LOSS) > 300 and _pixels(lr, LR) > 300
    assert _pixels(top1, RAW) > 100 and _pixels(top1, EMA) > 100
    assert _pixels(loss, LR) == _pixels(lr, LOSS) == _pixels(top1, LOSS) == 0


def test_a_run_cut_short_without_evaluation_still_gets_its_loss_and_lr(tmp_path):
    # as a killed run leaves it: step records only, the last line cut off mid-write
    lines = [json.dumps({"type": "step", "epoch": 1, "step": s, "loss": 2.0 - 0.05 * s, "lr": 1e-3 * s,
                         "loss_scale": 65536.0, "img_per_s": 100.0}) for s in range(1, 21)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + '\n{"type": "step", "epoch": 1, "st')
    png = str(tmp_path / "curves.png")
    run("scripts/plot_metrics.py", str(metrics), png)
    loss, lr, top1 = _panels(png)
    assert _pixels(loss, LOSS) > 300 and _pixels(lr, LR) > 300
    assert _pixels(top1, RAW) == _pixels(top1, EMA) == 0  # "no validation top-1", not an empty axis that lies


def test_a_missing_metrics_file_is_one_line_and_no_png(tmp_path):
    png = tmp_path / "curves.png"
    res = run("scripts/plot_metrics.py", str(tmp_path / "nope.jsonl"), str(png), check=False)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: No such file or directory"
    assert not png.exists()
