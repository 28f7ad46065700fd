"""Training-step benchmark: our full compiled train step (loss scale check, clip-norm, AdamW, EMA)
against timm's equivalent PyTorch step, alternating in one run; then peak RSS of each alone.

    .venv/bin/python bench/bench_train.py [--model coatnet_0] [--batch_size 8] [--iters 5] [--threads 2]

Prints img/s of both, the ratio, and the share of the machine's nominal fp32 peak
(2 cores x 64 FLOP/cycle x 2.3 GHz = 294 GFLOP/s) reached, counting 3 x 2 x MACs per image.
"""
import os
import resource
import subprocess
import sys
import time

from common import base_parser, count_macs

PEAK_GFLOPS = 2 * 64 * 2.3


def build_ours(name, batch, size):
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from src.cell_wrapper import TrainStep
    from src.coatnet import create_model
    from src.utils import canonical_names, param_groups

    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": "O1"})
    ms.set_seed(0)
    net = create_model(name, image_size=size)
    names = canonical_names(net)
    params = net.trainable_params()
    opt = nn.AdamWeightDecay(param_groups(params, 0.05, names), learning_rate=1e-4, eps=1e-6)
    allp = list(net.get_parameters())
    ema = tuple(ms.Parameter(p.value().copy(), name="ema." + names[id(p)], requires_grad=False) for p in allp)
    step = TrainStep(net, opt, clip_norm=1.0, ema_params=ema, model_params=tuple(allp), ema_decay=0.9999)
    net.set_train(True)
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(batch, 3, size, size).astype(np.float32))
    y = ms.Tensor(np.full((batch, 1000), 1.0 / 1000, np.float32))
    return lambda: step(x, y)[0].asnumpy(), net


def build_timm(name, batch, size):
    import timm
    import torch
    from timm.utils import ModelEmaV3

    from src.coatnet import TIMM_NAMES

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[name], img_size=size).train()
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


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--only", choices=["ours", "timm"], help="run one side alone (for peak RSS)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.only:
        fn = build_ours(args.model, args.batch_size, args.image_size)[0] if args.only == "ours" else \
            build_timm(args.model, args.batch_size, args.image_size)
        for _ in range(args.iters + 2):
            fn()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        return

    # Peak RSS first, each side alone in a child process: with both models (and MindSpore's
    # compiled graph) alive in this process a child could push the 24 GB machine out of memory.
    rss = {}
    for side in ("ours", "timm"):
        out = subprocess.run([sys.executable, __file__, "--only", side, "--model", args.model, "--batch_size",
                              str(args.batch_size), "--image_size", str(args.image_size), "--iters", "2",
                              "--threads", str(args.threads)], capture_output=True, text=True)
        rss[side] = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1
    ours, net = build_ours(args.model, args.batch_size, args.image_size)
    theirs = build_timm(args.model, args.batch_size, args.image_size)
    for _ in range(2):  # warm-up (graph compile, allocator)
        ours()
        theirs()
    t_ours, t_timm = [], []
    for _ in range(args.iters):  # alternate so both see the same machine state
        t_ours.append(_time(ours))
        t_timm.append(_time(theirs))
    import statistics

    ips_ours = args.batch_size / statistics.median(t_ours)
    ips_timm = args.batch_size / statistics.median(t_timm)
    gflop_per_img = 3 * 2 * count_macs(net, args.image_size) / 1e9
    print(f"train step {args.model} {args.image_size} fp32 batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}")
    print(f"  ours (MindSpore graph, loss scale + clip + AdamW + EMA): {ips_ours:.2f} img/s")
    print(f"  timm (PyTorch eager, clip + AdamW + EMA):              {ips_timm:.2f} img/s")
    print(f"  ratio ours/timm: {ips_ours / ips_timm:.2f}x; {gflop_per_img:.1f} GFLOP/img; "
          f"ours {100 * ips_ours * gflop_per_img / PEAK_GFLOPS:.1f}% / timm "
          f"{100 * ips_timm * gflop_per_img / PEAK_GFLOPS:.1f}% of {PEAK_GFLOPS:.0f} GFLOP/s peak")
    print(f"  peak RSS: ours {rss['ours']} MB, timm {rss['timm']} MB")


if __name__ == "__main__":
    main()
