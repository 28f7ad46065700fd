"""Shared benchmark helpers: timing, thread setup, MAC counting on our MindSpore model."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
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


# FP32 FLOP per cycle per core of the widest FMA instructions, by vendor and CPU family (/proc/cpuinfo).
# Each row: (vendor, family, model range or None, vector lanes, FMA units, why). The first row that
# matches wins; an unknown CPU falls back to the flags with two FMA units of the widest vector width.
_FMA_TABLE = (
    ("AuthenticAMD", 0x1A, range(0x20, 0x30), 8, 2,
     "AMD Zen 5 mobile (Strix Point): AVX-512 on a 256-bit datapath, 2 x 256-bit FMA"),
    ("AuthenticAMD", 0x1A, range(0x60, 0x70), 8, 2,
     "AMD Zen 5 mobile (Krackan Point): AVX-512 on a 256-bit datapath, 2 x 256-bit FMA"),
    ("AuthenticAMD", 0x1A, None, 16, 2, "AMD Zen 5 (EPYC Turin, Ryzen 9000): 2 x 512-bit FMA"),
    ("AuthenticAMD", 0x19, None, 8, 2,
     "AMD Zen 3/4: 2 x 256-bit FMA; Zen 4 runs 512-bit ops as two 256-bit halves"),
    ("AuthenticAMD", 0x17, range(0x00, 0x30), 4, 2, "AMD Zen/Zen+: AVX2 on 2 x 128-bit FMA"),
    ("AuthenticAMD", 0x17, None, 8, 2, "AMD Zen 2: 2 x 256-bit FMA"),
)


def _cpuinfo() -> list[dict]:
    cpus, cur = [], {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                if cur:
                    cpus.append(cur)
                cur = {}
                continue
            key, _, value = line.partition(":")
            cur[key.strip()] = value.strip()
    if cur:
        cpus.append(cur)
    return cpus


def cpu_peak(threads: int) -> dict:
    """The machine's nominal fp32 peak for ``threads`` threads: cores x clock x vector lanes x 2 (FMA)
    x FMA units per core. Lanes and FMA units come from the CPU flags and ``_FMA_TABLE`` (vendor and
    family); otherwise avx512f gives 16 lanes, avx2+fma 8, with 2 FMA units (current Intel server cores
    from Skylake-SP on, and Haswell on for AVX2; some Xeon Silver/Bronze have one 512-bit unit).
    Cores: the threads used, at most the physical cores this process may run on (SMT siblings share
    their FMA units). Clock: cpufreq's cpuinfo_max_freq when the kernel exposes it, else the highest
    ``cpu MHz`` of /proc/cpuinfo (under a hypervisor: the nominal clock the host reports, not turbo)."""
    cpus = _cpuinfo()
    first = cpus[0]
    flags = set(first.get("flags", "").split())
    vendor = first.get("vendor_id", "")
    family, model = int(first.get("cpu family", "0")), int(first.get("model", "0"))
    isa = "avx512f" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else \
        "avx" if "avx" in flags else "sse"
    lanes, fma_units = {"avx512f": 16, "avx2+fma": 8, "avx": 8, "sse": 4}[isa], 2
    assumption = f"{isa}: {lanes} fp32 lanes, {fma_units} FMA units per core (generic rule, CPU not in the table)"
    if isa in ("avx", "sse"):
        fma_units = 1  # no FMA: one add and one multiply port count as one FMA
        assumption = f"{isa}: {lanes} fp32 lanes, no FMA (an add and a multiply per cycle)"
    for t_vendor, t_family, t_models, t_lanes, t_units, why in _FMA_TABLE:
        if vendor == t_vendor and family == t_family and (t_models is None or model in t_models):
            lanes, fma_units, assumption = min(lanes, t_lanes), t_units, why
            break
    siblings, cores_per_socket = int(first.get("siblings", "1")), int(first.get("cpu cores", "1"))
    smt = max(1, siblings // max(1, cores_per_socket))
    cores = max(1, min(threads, len(os.sched_getaffinity(0)) // smt))
    freq_file = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
    if os.path.exists(freq_file):
        with open(freq_file) as f:
            ghz, clock_source = int(f.read()) / 1e6, freq_file
    else:
        ghz = max(float(c.get("cpu MHz", "0")) for c in cpus) / 1e3
        clock_source = "highest 'cpu MHz' in /proc/cpuinfo (no cpufreq in this kernel)"
    flop_per_cycle = lanes * 2 * fma_units
    return {"cpu_model": first.get("model name", "unknown"), "vendor": vendor, "family": family, "model": model,
            "isa": isa, "vector_flags": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
            "lanes": lanes, "fma_units": fma_units, "assumption": assumption, "smt": smt, "cores": cores,
            "clock_ghz": round(ghz, 3), "clock_source": clock_source, "flop_per_cycle_core": flop_per_cycle,
            "gflops": cores * ghz * flop_per_cycle}


def describe_peak(peak: dict) -> str:
    return (f"CPU {peak['cpu_model']} (vendor {peak['vendor']}, family {peak['family']}, model {peak['model']}; "
            f"flags {' '.join(peak['vector_flags'])}); peak fp32 {peak['gflops']:.0f} GFLOP/s = {peak['cores']} cores "
            f"x {peak['clock_ghz']:.2f} GHz ({peak['clock_source']}) x {peak['flop_per_cycle_core']} FLOP/cycle "
            f"[{peak['assumption']}]")


def write_results(script: str, payload: dict) -> str:
    """``payload`` plus the versions of MindSpore, torch, timm and onnxruntime and the git commit of this
    tree (with any uncommitted files under src/, which the figures then include), as
    bench/results/<script>_<UTC timestamp>.json; returns the path."""
    import datetime
    import importlib.metadata
    import json
    import subprocess

    versions = {}
    for dist in ("mindspore", "torch", "timm", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    source = {"commit": git.stdout.strip() or None,
              "src_uncommitted": dirty.stdout.split("\n")[:-1] if git.returncode == 0 else None}
    now = datetime.datetime.now(datetime.UTC)
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{script}_{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    with open(path, "w") as f:
        json.dump({"script": script, "utc": now.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                   "versions": versions, "source": source, **payload}, f, indent=1)
        f.write("\n")
    return path


def child_env(isa: str | None) -> dict:
    """The environment for a benchmark child with ONEDNN_MAX_CPU_ISA=isa, or (None) with it unset, as on a
    user's machine: importing this module (through ``src``) sets AVX2 in this process, which a child would
    otherwise inherit as if the user had set it; the child drops it again in ``drop_isa_if_asked``."""
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    else:
        env["BENCH_ISA_UNSET"] = "1"
    return env


def drop_isa_if_asked() -> None:
    """In a child started with ``child_env(None)``: unset ONEDNN_MAX_CPU_ISA before any oneDNN (MindSpore's or
    PyTorch's) runs. ``src`` still counts the setting as its own, so ``use_fused_kernels`` and
    ``use_stock_ops`` decide as they do for a user."""
    if os.environ.pop("BENCH_ISA_UNSET", None):
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)


def run_child(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run a benchmark child that prints its figures as JSON on its last stdout line. In its own session, so
    that a timeout also stops torch inductor's compile workers. Returns {"error": ...} when it fails or runs
    past ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"not done after {timeout:.0f} s, stopped"}
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(out.strip().splitlines()[-1])
