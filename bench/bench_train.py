"""Training-step benchmark: our full compiled train step (loss scale check, clip-norm, AdamW, EMA)
against timm's equivalent PyTorch step (soft-target cross-entropy, clip 1.0, AdamW, ``ModelEmaV3``),
eager and under ``torch.compile``, on the same network (``--model``, a timm-named variant, default
coatnet_0_224), with the original MindSpore network of that size (``--seed_model``, default coatnet_0)
reported beside it.

    .venv/bin/python bench/bench_train.py [--model coatnet_0_224] [--seed_model coatnet_0] [--batch_size 8]
                                          [--iters 5] [--threads 2] [--no_compile] [--compile_timeout 1200]

1. Each side alone in its own child process (img/s = batch / median step time after 2 warm-up
   steps, and peak RSS): ours as a user runs it (variable unset: the suite caps oneDNN at AVX2 on
   import and ``use_fused_kernels`` lifts the cap, every k x k convolution being a fused kernel, so
   1x1 convolutions take the AVX-512 path where the CPU has one) and with the cap kept
   (``ONEDNN_MAX_CPU_ISA=AVX2`` set: the suite's speed before the cap was lifted); timm eager with
   ``AVX2`` and with the variable unset (PyTorch's default), timm eager channels-last and timm
   ``torch.compile`` channels-last (variable unset; the first step, which compiles forward and
   backward, is reported as compile time; inductor needs a C++ compiler and takes minutes on 2
   cores; ``--no_compile`` skips it).
2. Ours and the fastest timm variant of step 1 alternating step by step in this process, so both see
   the same machine state. Note: in one process MindSpore's idle worker threads share the cores with
   PyTorch; the variable is unset for both (ours lifts the cap before either creates a primitive).
3. ``--seed_model`` alone in its own child process (variable unset, as ours): img/s, share of peak (its own GFLOP
   count), peak RSS. It has no timm counterpart to race: its ratio is against the same timm step.

Ratios are against the fastest timm variant. The share of peak counts 3 x 2 x MACs per image against
the machine's nominal fp32 peak (``common.cpu_peak``: cores used x clock x FMA lanes, printed with the
CPU model, flags, clock source and the assumption behind the FMA count). Every figure is written with
the load average, the peak and the library versions to bench/results/bench_train_<UTC time>.json.
``--only ours|timm|timm_cl|timm_compiled`` runs one side (step 1's child) and prints its figures as JSON.
"""
import json
import os
import resource
import statistics
import sys
import time

from common import (
    base_parser,
    child_env,
    count_macs,
    cpu_peak,
    describe_peak,
    drop_isa_if_asked,
    run_child,
    write_results,
)

TIMM_VARIANTS = {"timm": "timm eager", "timm_cl": "timm eager, channels-last",
                 "timm_compiled": "timm torch.compile, channels-last"}


def ours_config(name, size):
    """The suite's config for the race: timm's side runs AdamW (lr 1e-4, wd 0.05, eps 1e-6), clip 1.0 and EMA
    0.9999 without stochastic depth; the rest is default_config.yaml."""
    from src.model_utils.config import load_config

    return load_config([f"--model_name={name}", f"--image_height={size}", f"--image_width={size}",
                        "--num_classes=1000", "--drop_path_rate=0.0", "--lr_max=0.0001", "--lr_min=0.0001",
                        "--lr_warmup_epochs=0", "--num_epochs=1", "--weight_decay=0.05", "--epsilon=0.000001",
                        "--enable_clip_norm=True", "--gradient_norm=1.0", "--enable_ema=True",
                        "--ema_decay=0.9999", "--device_target=CPU", "--amp_level=O0"])


def build_ours(name, batch, size):
    """Our train step, built by the trainer's own ``build_train_step`` (so it cannot drift from what trains)."""
    import mindspore as ms
    import numpy as np

    from src.cell_wrapper import drop_path_noise
    from src.trainer import build_model, build_train_step
    from src.utils import canonical_names

    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": "O1"})
    ms.set_seed(0)
    config = ours_config(name, size)
    net = build_model(config)
    # 10,000 entries of the constant lr: more than any run of this bench takes steps
    step = build_train_step(config, net, canonical_names(net), steps_per_epoch=10_000).step_cell
    net.set_train(True)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(batch, 3, size, size).astype(np.float32))
    y = ms.Tensor(np.full((batch, 1000), 1.0 / 1000, np.float32))
    noise = drop_path_noise(config.seed, 0, 0, net.num_drop_paths, batch)  # None without stochastic depth
    step.compile_for(x, y, noise)  # as src/trainer.py does before the first step
    return lambda: step(x, y, noise)[0].asnumpy(), net


def build_timm(name, batch, size, variant: str = "timm"):
    """timm's step for ``variant`` (a key of TIMM_VARIANTS); for ``timm_compiled`` forward and backward go
    through ``torch.compile`` (inductor), the optimizer, clipping and EMA stay eager as timm's train.py runs
    them."""
    import timm
    import torch
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size).train()
    x = torch.randn(batch, 3, size, size)
    if variant in ("timm_cl", "timm_compiled"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, eps=1e-6)
    ema = ModelEmaV3(model, decay=0.9999)
    forward = torch.compile(model) if variant == "timm_compiled" else model
    y = torch.full((batch, 1000), 1.0 / 1000)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.sum(-y * torch.log_softmax(forward(x), dim=-1), dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        return loss.item()

    return step


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alone(side: str, args, isa: str | None, iters: int, model: str | None = None,
           timeout: float | None = None) -> dict:
    """Run ``--only side`` (of ``model``, default ``--model``) in a child process with
    ONEDNN_MAX_CPU_ISA=isa (None: unset); past ``timeout`` seconds it is stopped and reported as such."""
    cmd = [sys.executable, __file__, "--only", side, "--model", model or args.model,
           "--batch_size", str(args.batch_size),
           "--image_size", str(args.image_size), "--iters", str(iters), "--threads", str(args.threads)]
    return run_child(cmd, timeout, child_env(isa))


def _run_only(args) -> None:
    """Step 1's child: one side alone; prints img/s, peak RSS, the ISA setting and the load average as JSON."""
    start = time.perf_counter()
    if args.only == "ours":
        fn, net = build_ours(args.model, args.batch_size, args.image_size)
    else:
        fn, net = build_timm(args.model, args.batch_size, args.image_size, args.only), None
    build_s = time.perf_counter() - start
    first_s = _time(fn)  # for timm_compiled: inductor compiles forward and backward here
    fn()
    times = [_time(fn) for _ in range(args.iters)]
    result = {"img_s": args.batch_size / statistics.median(times), "step_s": times,
              "build_s": round(build_s, 1), "first_step_s": round(first_s, 1),
              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
              "isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "load_1min": os.getloadavg()[0]}
    if net is not None:
        result["gflop_per_img"] = 3 * 2 * count_macs(net, args.image_size) / 1e9
    print(json.dumps(result))


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--only", choices=["ours", *TIMM_VARIANTS], help="run one side alone (for peak RSS)")
    ap.add_argument("--seed_model", default="coatnet_0", help="original-network variant reported beside ('' : none)")
    ap.add_argument("--no_compile", action="store_true", help="skip timm under torch.compile (minutes on 2 cores)")
    ap.add_argument("--compile_timeout", type=float, default=1200.0,
                    help="seconds before the torch.compile child is stopped")
    args = ap.parse_args()
    from src.coatnet import TIMM_MODELS

    if args.model not in TIMM_MODELS and args.only != "ours":
        ap.error(f"--model must be a timm-named variant ({', '.join(TIMM_MODELS)}) to race timm's model")
    drop_isa_if_asked()

    if args.only != "ours":  # PyTorch stays out of ours' process (and out of its peak RSS)
        import torch

        torch.set_num_threads(args.threads)
    if args.only:
        _run_only(args)
        return

    machine = cpu_peak(args.threads)
    load_start = os.getloadavg()
    # Alone first, each in a child process: with both models (and MindSpore's compiled graph) alive
    # in this process a child could push the machine out of memory.
    alone = {"ours": _alone("ours", args, None, args.iters),
             "timm eager AVX2": _alone("timm", args, "AVX2", args.iters),
             "timm eager unset": _alone("timm", args, None, args.iters),
             "timm eager channels-last unset": _alone("timm_cl", args, None, args.iters)}
    if not args.no_compile:
        alone["timm torch.compile channels-last unset"] = _alone("timm_compiled", args, None, args.iters,
                                                                  timeout=args.compile_timeout)
    alone["ours AVX2 cap"] = _alone("ours", args, "AVX2", args.iters)
    seed = _alone("ours", args, None, args.iters, args.seed_model) if args.seed_model else None
    timm_keys = [k for k in alone if k.startswith("timm") and "error" not in alone[k]]
    best_key = max(timm_keys, key=lambda k: alone[k]["img_s"]) if timm_keys else None
    best_variant = "timm_compiled" if best_key and "compile" in best_key else \
        "timm_cl" if best_key and "channels-last" in best_key else "timm"

    ours, net = build_ours(args.model, args.batch_size, args.image_size)
    theirs = build_timm(args.model, args.batch_size, args.image_size, best_variant)
    for _ in range(2):  # warm-up (graph compile, inductor compile (cached by the child's run), allocator)
        ours()
        theirs()
    t_ours, t_timm = [], []
    for _ in range(args.iters):  # alternate so both see the same machine state
        t_ours.append(_time(ours))
        t_timm.append(_time(theirs))
    ips_ours = args.batch_size / statistics.median(t_ours)
    ips_timm = args.batch_size / statistics.median(t_timm)
    gflop_per_img = 3 * 2 * count_macs(net, args.image_size) / 1e9
    load_end = os.getloadavg()

    def share(ips: float, gflop: float = gflop_per_img) -> float:
        return 100 * ips * gflop / machine["gflops"]

    def show(key) -> str:
        r = alone[key]
        if "error" in r:
            return r["error"]
        extra = f", first step {r['first_step_s']:.0f} s" if "compile" in key else ""
        return (f"{r['img_s']:.2f} img/s ({share(r['img_s']):.1f}% of peak), peak RSS {r['rss_mb']} MB, "
                f"load {r['load_1min']:.2f}{extra}")

    ratios = {}
    print(describe_peak(machine))
    print(f"train step {args.model} {args.image_size} fp32 batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters}; {gflop_per_img:.1f} GFLOP/img (3 x 2 x MACs); "
          f"load average (1, 5, 15 min) {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start, "
          f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end")
    print("each side alone (own process; ONEDNN_MAX_CPU_ISA as named, unset where not named):")
    for key in alone:
        print(f"  {key + ':':<42} {show(key)}")
    ours_alone = alone["ours"]
    if "error" not in ours_alone and best_key:
        best = alone[best_key]
        ratios["alone_ours_vs_best_timm"] = ours_alone["img_s"] / best["img_s"]
        print(f"  ratio ours / fastest timm ({best_key}): {ratios['alone_ours_vs_best_timm']:.2f}x")
        for key in timm_keys:
            ratios[f"rss_ours_vs_{key}"] = ours_alone["rss_mb"] / alone[key]["rss_mb"]
        print("  peak RSS ours / timm: " + ", ".join(f"{ratios[f'rss_ours_vs_{k}']:.2f}x ({k})" for k in timm_keys))
        if "error" not in alone["ours AVX2 cap"]:
            ratios["ours_vs_avx2_cap"] = ours_alone["img_s"] / alone["ours AVX2 cap"]["img_s"]
            print(f"  ours / ours with the AVX2 cap kept: {ratios['ours_vs_avx2_cap']:.2f}x")
    ratios["alternating_ours_vs_timm"] = ips_ours / ips_timm
    print(f"alternating in one process with the fastest timm variant alone, {TIMM_VARIANTS[best_variant]} "
          f"(ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}):")
    for label, ips in (("ours (MindSpore graph, loss scale + clip + AdamW + EMA):", ips_ours),
                       (TIMM_VARIANTS[best_variant] + " (clip + AdamW + EMA):", ips_timm)):
        print(f"  {label:<56} {ips:.2f} img/s ({share(ips):.1f}% of peak)")
    print(f"  ratio ours/timm: {ratios['alternating_ours_vs_timm']:.2f}x")
    if seed is not None:
        print(f"the original MindSpore network {args.seed_model} (alone, own process, as ours):")
        if "error" in seed:
            print(f"  {seed['error']}")
        else:
            if best_key:
                ratios["seed_vs_best_timm"] = seed["img_s"] / alone[best_key]["img_s"]
            vs = f"; vs fastest timm {args.model} alone {ratios['seed_vs_best_timm']:.2f}x" if best_key else ""
            print(f"  {seed['img_s']:.2f} img/s ({share(seed['img_s'], seed['gflop_per_img']):.1f}% of peak, "
                  f"{seed['gflop_per_img']:.1f} GFLOP/img), peak RSS {seed['rss_mb']} MB, "
                  f"load {seed['load_1min']:.2f}{vs}")
    path = write_results("bench_train", {
        "args": vars(args), "machine": machine, "load_average_start": load_start, "load_average_end": load_end,
        "gflop_per_img": gflop_per_img, "alone": alone, "fastest_timm": best_key,
        "alternating": {"timm_variant": best_variant, "ours_img_s": ips_ours, "timm_img_s": ips_timm,
                        "ours_step_s": t_ours, "timm_step_s": t_timm},
        "seed": {"model": args.seed_model, **seed} if seed is not None else None, "ratios": ratios})
    print(f"written {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
