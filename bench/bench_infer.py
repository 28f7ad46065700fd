"""Inference throughput after export, on CPU: the MindSpore Python model (graph mode), the exported
MINDIR (GraphCell) and the exported ONNX in onnxruntime, against timm eager and torch.compile (NCHW and
channels-last model and input), in one run with the same input, batch, float32 and thread count. Random
weights; nothing is downloaded. Ratios are against timm eager and against the faster torch.compile.

    .venv/bin/python bench/bench_infer.py [--model coatnet_0_224] [--batch_size 8] [--image_size 224]
                                          [--iters 5] [--threads 2] [--compile_timeout 900]

Each runtime is timed in its own child process, one after the other, so that no runtime's thread pool
or allocator state touches another's, and each with ONEDNN_MAX_CPU_ISA unset (as on a user's machine: the
MINDIR child loads the file with MindSpore alone, none of our code in the graph), except "MINDIR
(GraphCell), ISA AVX2": the same file with ONEDNN_MAX_CPU_ISA=AVX2, as our infer.py / eval.py run it
(``src`` sets it on import) and as README tells anyone running the file on a CPU with AVX-512 (MindSpore
2.10's oneDNN takes its reference path for k x k convolutions there); torch.compile past --compile_timeout
is stopped and reported as such. The load average is printed with the figures (and each runtime's at its
end): on a shared machine other processes move them. Everything printed, with the CPU model, the machine's
nominal fp32 peak (``common.cpu_peak``) and the library versions, is written to
bench/results/bench_infer_<UTC time>.json.

A timm-named ``--model`` is compared with timm's model of that name (the same network). For the original
MindSpore variants (``coatnet_0`` ...) the reference is timm's structure of the same size
(``coatnet_0_224``), or for ``coatnet_tiny`` (a quick check) timm's coatnet_0 configuration with
coatnet_tiny's widths and depths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from common import (
    base_parser,
    child_env,
    cpu_peak,
    describe_peak,
    drop_isa_if_asked,
    median_time,
    run_child,
    write_results,
)

RUNTIMES = ("mindspore", "mindir", "mindir_avx2", "onnx", "timm_eager", "torch_compile", "torch_compile_cl")
COMPILED = ("torch_compile", "torch_compile_cl")
MINDIRS = ("mindir", "mindir_avx2")  # the same exported file, two ISA settings
ISA = {"mindir_avx2": "AVX2"}  # ONEDNN_MAX_CPU_ISA of a child; unset for the others
LABELS = {"mindspore": "MindSpore graph (Python model)", "mindir": "MINDIR (GraphCell)",
          "mindir_avx2": "MINDIR (GraphCell), ISA AVX2",
          "onnx": "ONNX (onnxruntime)", "timm_eager": "timm eager", "torch_compile": "timm torch.compile",
          "torch_compile_cl": "timm torch.compile channels-last"}


def timm_reference(name: str, image_size: int):
    import dataclasses

    import timm
    from timm.models import maxxvit

    from src.coatnet import MODEL_CFGS, TIMM_MODELS

    if name in TIMM_MODELS or f"{name}_224" in TIMM_MODELS:
        model = timm.create_model(name if name in TIMM_MODELS else f"{name}_224", img_size=image_size)
    else:
        ours = MODEL_CFGS[name]
        cfg = dataclasses.replace(maxxvit.model_cfgs["coatnet_0"], embed_dim=ours.embed_dim, depths=ours.depths,
                                  stem_width=ours.stem_width, head_hidden_size=ours.head_hidden_size)
        model = maxxvit.MaxxVit(cfg, img_size=image_size)
    return model.eval()


def _worker(args) -> dict:
    """One runtime in this (child) process; returns img/s and notes. The mindspore worker runs first and
    leaves the exported files and its logits in --work_dir for the others."""
    import numpy as np

    x = np.random.RandomState(0).randn(args.batch_size, 3, args.image_size, args.image_size).astype(np.float32)
    ref_path = os.path.join(args.work_dir, "logits.npy")
    kind = args.worker
    if kind in ("timm_eager", *COMPILED):
        import torch

        torch.set_num_threads(args.threads)
        model = timm_reference(args.model, args.image_size)
        xp = torch.from_numpy(x)
        if kind == "torch_compile_cl":
            model = model.to(memory_format=torch.channels_last)
            xp = xp.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if kind == "timm_eager":
                return {"img_s": args.batch_size / median_time(lambda: model(xp), args.iters)}
            start = time.perf_counter()
            compiled = torch.compile(model)
            compiled(xp)
            compile_s = time.perf_counter() - start
            return {"img_s": args.batch_size / median_time(lambda: compiled(xp), args.iters),
                    "compile_s": compile_s, "note": f"compile + first call {compile_s:.0f} s"}

    if kind == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(os.path.join(args.work_dir, "model.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        diff = np.abs(session.run(None, feed)[0] - np.load(ref_path)).max()
        return {"img_s": args.batch_size / median_time(lambda: session.run(None, feed), args.iters),
                "note": f"max|diff| vs Python model {diff:.1e}"}

    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": "O1"})
    ms.device_context.cpu.op_tuning.threads_num(args.threads)  # MindSpore's default is 25
    xt = ms.Tensor(x)
    if kind in MINDIRS:
        graph = ms.nn.GraphCell(ms.load(os.path.join(args.work_dir, "model.mindir")))
        diff = np.abs(graph(xt).asnumpy() - np.load(ref_path)).max()
        return {"img_s": args.batch_size / median_time(lambda: graph(xt).asnumpy(), args.iters),
                "note": f"max|diff| vs Python model {diff:.1e}"}

    from export import export_network
    from src.coatnet import create_model
    from src.kernels import use_fused_kernels

    ms.set_seed(0)
    net = use_fused_kernels(create_model(args.model, image_size=args.image_size))
    net.set_train(False)
    np.save(ref_path, net(xt).asnumpy())
    img_s = args.batch_size / median_time(lambda: net(xt).asnumpy(), args.iters)
    zeros = (ms.Tensor(np.zeros(x.shape, np.float32)),)
    for file_format in ("MINDIR", "ONNX"):  # ONNX last: it swaps cells for their ONNX formulations
        export_network(net, zeros, os.path.join(args.work_dir, "model"), file_format)
    return {"img_s": img_s}


def _run_worker(kind: str, args, work_dir: str, timeout: float | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--work_dir={work_dir}",
           f"--model={args.model}", f"--batch_size={args.batch_size}", f"--image_size={args.image_size}",
           f"--iters={args.iters}", f"--threads={args.threads}"]
    result = run_child(cmd, timeout, child_env(ISA.get(kind)))
    return {"note": result["error"]} if "error" in result else result


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--compile_timeout", type=float, default=900.0)
    ap.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    ap.add_argument("--work_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.iters < 5:
        ap.error("--iters must be >= 5 (the figure is a median)")
    if args.worker:
        drop_isa_if_asked()
        result = _worker(args)
        print(json.dumps({**result, "load_1min": os.getloadavg()[0]}))
        return

    machine = cpu_peak(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work_dir:
        results = {kind: _run_worker(kind, args, work_dir, args.compile_timeout if kind in COMPILED else None)
                   for kind in RUNTIMES}
    load_after = os.getloadavg()
    base = results["timm_eager"].get("img_s")
    compiled = [k for k in COMPILED if results[k].get("img_s")]
    best = max(compiled, key=lambda k: results[k]["img_s"]) if compiled else None
    best_img_s = results[best]["img_s"] if best else None
    print(describe_peak(machine))
    print(f"inference {args.model} {args.image_size}x{args.image_size} fp32, batch {args.batch_size}, "
          f"{args.threads} threads, median of {args.iters} after 2 warm-up runs, one process per runtime; "
          f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs")
    print(f"{'runtime':<34} {'img/s':>8} {'vs timm eager':>14} {'vs best compile':>16} {'load':>5}")
    ratios = {}
    for kind in RUNTIMES:
        r = results[kind]
        value = r.get("img_s")
        vs_eager = f"{value / base:>13.2f}x" if value and base else f"{'-':>14}"
        vs_compile = f"{value / best_img_s:>15.2f}x" if value and best_img_s else f"{'-':>16}"
        if value and base:
            ratios[f"{kind}_vs_timm_eager"] = value / base
        if value and best_img_s:
            ratios[f"{kind}_vs_best_compile"] = value / best_img_s
        load = f"{r['load_1min']:>5.2f}" if "load_1min" in r else f"{'-':>5}"
        figures = f"{value:>8.2f} {vs_eager} {vs_compile} {load}" if value else f"{'-':>8} {'-':>14} {'-':>16} {load}"
        print(f"{LABELS[kind]:<34} {figures}  {r.get('note', '')}".rstrip())
    graph = results["mindspore"].get("img_s")
    for kind in MINDIRS:
        mindir = results[kind].get("img_s")
        if graph and mindir:
            ratios[f"graph_vs_{kind}"] = graph / mindir
            print(f"{LABELS[kind]} is {graph / mindir:.2f}x slower than the MindSpore graph (Python model)")
    if best:
        print(f"best torch.compile: {LABELS[best]}")
    path = write_results("bench_infer", {
        "args": vars(args), "machine": machine, "load_average_before": load_before, "load_average_after": load_after,
        "results": results, "best_compile": best, "ratios": ratios})
    print(f"written {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
