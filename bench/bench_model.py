"""Model benchmark: params and GMACs at 224 of the original MindSpore variants (coatnet_0 ... coatnet_4) and
timm's structures (coatnet_0_224 ...), and CPU inference img/s of ``--model`` (a timm-named variant,
default coatnet_0_224) in MindSpore graph mode against timm's model of that name in the same run (same
threads, batch, input).

    .venv/bin/python bench/bench_model.py [--model coatnet_0_224] [--batch_size 8] [--iters 5] [--threads 2]
"""

from common import base_parser, count_macs, median_time


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--skip_table", action="store_true")
    args = ap.parse_args()

    import mindspore as ms
    import numpy as np
    import timm
    import torch

    from src.coatnet import TIMM_MODELS, create_model
    from src.kernels import use_fused_kernels

    if args.model not in TIMM_MODELS:
        ap.error(f"--model must be a timm-named variant ({', '.join(TIMM_MODELS)})")
    torch.set_num_threads(args.threads)
    if not args.skip_table:
        print(f"{'model':<14} {'params':>12} {'GMACs@224':>10}")
        for size in range(5):
            for name in (f"coatnet_{size}", f"coatnet_{size}_224"):
                net = create_model(name)
                params = sum(p.size for p in net.trainable_params())
                print(f"{name:<14} {params:>12,} {count_macs(net, 224) / 1e9:>10.2f}")

    x = np.random.RandomState(0).randn(args.batch_size, 3, args.image_size, args.image_size).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": "O1"})
    net = use_fused_kernels(create_model(args.model, image_size=args.image_size))
    net.set_train(False)
    xt = ms.Tensor(x)
    t_ms = median_time(lambda: net(xt).asnumpy(), args.iters)
    ref = timm.create_model(args.model, img_size=args.image_size).eval()
    xp = torch.from_numpy(x)
    with torch.no_grad():
        t_timm = median_time(lambda: ref(xp), args.iters)
    ours, theirs = args.batch_size / t_ms, args.batch_size / t_timm
    print(f"inference {args.model} {args.image_size} fp32 batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.iters}: MindSpore graph {ours:.2f} img/s, timm eager {theirs:.2f} img/s, "
          f"ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
