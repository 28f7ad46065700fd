"""Training-step benchmark: our full compiled train step (loss scale check, clip-norm, AdamW, EMA)
against timm's equivalent PyTorch step, on the same network (``--model``, a timm-named variant, default
coatnet_0_224), with the original MindSpore network of that size (``--seed_model``, default coatnet_0)
reported beside it.

    .venv/bin/python bench/bench_train.py [--model coatnet_0_224] [--seed_model coatnet_0] [--batch_size 8]
                                          [--iters 5] [--threads 2]

1. Each side alone in its own child process (img/s = batch / median step time after 2 warm-up
   steps, and peak RSS), under both oneDNN ISA settings: ours with this suite's default
   ``ONEDNN_MAX_CPU_ISA=AVX2`` and with ``ALL`` (oneDNN's own default, which on AVX-512 CPUs picks
   a reference-speed convolution path in MindSpore 2.10; fewer steps, it is slow), timm with
   ``AVX2`` and with the variable unset (PyTorch's default).
2. Both sides alternating step by step in this process (``AVX2``), so both see the same machine
   state. Note: in one process MindSpore's idle worker threads share the cores with PyTorch.
3. ``--seed_model`` alone in its own child process (``AVX2``): img/s, share of peak (its own GFLOP
   count), peak RSS. It has no timm counterpart to race: its ratio is against the same timm step.

Prints img/s, ratios and the share of the machine's nominal fp32 peak (2 cores x 64 FLOP/cycle x
2.3 GHz = 294 GFLOP/s) reached, counting 3 x 2 x MACs per image. ``--only ours|timm`` runs one side
(step 1's child) and prints its figures as JSON.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import base_parser, count_macs

PEAK_GFLOPS = 2 * 64 * 2.3


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


def build_timm(name, batch, size):
    import timm
    import torch
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, eps=1e-6)
    ema = ModelEmaV3(model, decay=0.9999)
    x = torch.randn(batch, 3, size, size)
    y = torch.full((batch, 1000), 1.0 / 1000)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.sum(-y * torch.log_softmax(model(x), dim=-1), dim=-1).mean()
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


def _alone(side: str, args, isa: str | None, iters: int, model: str | None = None) -> dict:
    """Run ``--only side`` (of ``model``, default ``--model``) in a child process with
    ONEDNN_MAX_CPU_ISA=isa (None: unset)."""
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    else:
        env["BENCH_ISA_UNSET"] = "1"  # src sets AVX2 on import; the child drops it again
    cmd = [sys.executable, __file__, "--only", side, "--model", model or args.model,
           "--batch_size", str(args.batch_size),
           "--image_size", str(args.image_size), "--iters", str(iters), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--only", choices=["ours", "timm"], help="run one side alone (for peak RSS)")
    ap.add_argument("--slow_isa_iters", type=int, default=2, help="timed steps of ours under ONEDNN_MAX_CPU_ISA=ALL")
    ap.add_argument("--seed_model", default="coatnet_0", help="original-network variant reported beside ('' : none)")
    args = ap.parse_args()
    from src.coatnet import TIMM_MODELS

    if args.model not in TIMM_MODELS and args.only != "ours":
        ap.error(f"--model must be a timm-named variant ({', '.join(TIMM_MODELS)}) to race timm's model")
    if os.environ.pop("BENCH_ISA_UNSET", None):
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)  # before any oneDNN (MindSpore's or PyTorch's) runs

    if args.only != "ours":  # PyTorch stays out of ours' process (and out of its peak RSS)
        import torch

        torch.set_num_threads(args.threads)
    if args.only:
        fn, net = build_ours(args.model, args.batch_size, args.image_size) if args.only == "ours" else \
            (build_timm(args.model, args.batch_size, args.image_size), None)
        for _ in range(2):
            fn()
        times = [_time(fn) for _ in range(args.iters)]
        result = {"img_s": args.batch_size / statistics.median(times),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
        if net is not None:
            result["gflop_per_img"] = 3 * 2 * count_macs(net, args.image_size) / 1e9
        print(json.dumps(result))
        return

    # Alone first, each in a child process: with both models (and MindSpore's compiled graph) alive
    # in this process a child could push the machine out of memory.
    alone = {("ours", "AVX2"): _alone("ours", args, "AVX2", args.iters),
             ("timm", "AVX2"): _alone("timm", args, "AVX2", args.iters),
             ("timm", None): _alone("timm", args, None, args.iters),
             ("ours", "ALL"): _alone("ours", args, "ALL", args.slow_isa_iters)}
    seed = _alone("ours", args, "AVX2", args.iters, args.seed_model) if args.seed_model else None
    ours, net = build_ours(args.model, args.batch_size, args.image_size)
    theirs = build_timm(args.model, args.batch_size, args.image_size)
    for _ in range(2):  # warm-up (graph compile, allocator)
        ours()
        theirs()
    t_ours, t_timm = [], []
    for _ in range(args.iters):  # alternate so both see the same machine state
        t_ours.append(_time(ours))
        t_timm.append(_time(theirs))
    ips_ours = args.batch_size / statistics.median(t_ours)
    ips_timm = args.batch_size / statistics.median(t_timm)
    gflop_per_img = 3 * 2 * count_macs(net, args.image_size) / 1e9

    def peak(ips: float, gflop: float = gflop_per_img) -> str:
        return f"{100 * ips * gflop / PEAK_GFLOPS:.1f}% of peak"

    def show(key) -> str:
        r = alone[key]
        return r["error"] if "error" in r else f"{r['img_s']:.2f} img/s ({peak(r['img_s'])}), peak RSS {r['rss_mb']} MB"

    print(f"train step {args.model} {args.image_size} fp32 batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters}; {gflop_per_img:.1f} GFLOP/img, peak {PEAK_GFLOPS:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("each side alone (own process):")
    print(f"  ours, ONEDNN_MAX_CPU_ISA=AVX2 (default): {show(('ours', 'AVX2'))}")
    print(f"  ours, ONEDNN_MAX_CPU_ISA=ALL:            {show(('ours', 'ALL'))} [median of {args.slow_isa_iters}]")
    print(f"  timm, ONEDNN_MAX_CPU_ISA unset:          {show(('timm', None))}")
    print(f"  timm, ONEDNN_MAX_CPU_ISA=AVX2:           {show(('timm', 'AVX2'))}")
    good = [alone[k] for k in (("ours", "AVX2"), ("ours", "ALL"), ("timm", None), ("timm", "AVX2"))]
    if all("error" not in r for r in good):
        best_timm = max(good[2]["img_s"], good[3]["img_s"])
        print(f"  ratio ours(AVX2)/best timm: {good[0]['img_s'] / best_timm:.2f}x; "
              f"ours AVX2/ALL: {good[0]['img_s'] / good[1]['img_s']:.1f}x; "
              f"RSS ours/timm: {good[0]['rss_mb'] / good[2]['rss_mb']:.2f}x")
    print(f"alternating in one process (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}):")
    print(f"  ours (MindSpore graph, loss scale + clip + AdamW + EMA): {ips_ours:.2f} img/s ({peak(ips_ours)})")
    print(f"  timm (PyTorch eager, clip + AdamW + EMA):              {ips_timm:.2f} img/s ({peak(ips_timm)})")
    print(f"  ratio ours/timm: {ips_ours / ips_timm:.2f}x")
    if seed is not None:
        print(f"the original MindSpore network {args.seed_model} (alone, own process, ONEDNN_MAX_CPU_ISA=AVX2):")
        if "error" in seed:
            print(f"  {seed['error']}")
        else:
            vs = alone[("timm", None)]
            ratio = f"; vs timm {args.model} alone (ISA unset) {seed['img_s'] / vs['img_s']:.2f}x" \
                if "error" not in vs else ""
            print(f"  {seed['img_s']:.2f} img/s ({peak(seed['img_s'], seed['gflop_per_img'])}, "
                  f"{seed['gflop_per_img']:.1f} GFLOP/img), peak RSS {seed['rss_mb']} MB{ratio}")


if __name__ == "__main__":
    main()
