"""Shared benchmark helpers: timing, thread setup, MAC counting on our MindSpore model."""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import src  # noqa: F401,E402  (CPU ISA default before mindspore loads)


def median_time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_macs(net, image_size: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass: convolutions, dense layers and the two attention
    matmuls, counted from the shapes seen by forward hooks (PyNative)."""
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from src.coatnet import Attention2d

    macs = [0]

    def conv_hook(cell, inputs, output):
        k = cell.kernel_size
        macs[0] += int(np.prod(output.shape)) * (cell.in_channels // cell.group) * k[0] * k[1]

    def dense_hook(cell, inputs, output):
        macs[0] += int(np.prod(output.shape)) * cell.in_channels

    def attn_hook(cell, inputs, output):
        b, _, h, w = inputs[0].shape
        n = h * w
        macs[0] += 2 * b * cell.num_heads * n * n * cell.dim_head

    handles = []
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            handles.append(cell.register_forward_hook(conv_hook))
        elif isinstance(cell, nn.Dense):
            handles.append(cell.register_forward_hook(dense_hook))
        elif isinstance(cell, Attention2d):
            handles.append(cell.register_forward_hook(attn_hook))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net.set_train(False)
    net(ms.Tensor(np.zeros((batch, 3, image_size, image_size), np.float32)))
    ms.set_context(mode=mode)
    for h in handles:
        h.remove()
    return macs[0] // batch


def base_parser(doc: str):
    """The options every model benchmark shares (model, batch, size, timed iterations, threads)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--model", default="coatnet_0_224")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    return ap
