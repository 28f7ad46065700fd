"""Where our train step's time goes: MindSpore's Profiler around a few steps of the step bench_train.py races
(built by the trainer's own ``build_train_step``), summed per op type and, for the fused kernels (``Custom``
ops), per cell class, in ms per step.

    .venv/bin/python bench/profile_train.py [--model coatnet_0_224] [--batch_size 8] [--iters 5]

The profiler's own overhead is in the figures (a profiled step is a little slower than a timed one); the
raw files stay in a temporary folder unless ``--output`` names one.
"""
import collections
import csv
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from bench_train import build_ours
from common import base_parser


def _per_step(output: str, steps: int) -> tuple[dict, dict]:
    """(ms per step by op type, ms per step of Custom ops by the cell class they run in) from the profile."""
    files = glob.glob(os.path.join(output, "*", "FRAMEWORK", "cpu_op_detail_info_*.csv"))
    if not files:
        sys.exit(f"error: the profiler wrote no cpu_op_detail_info file under {output}")
    by_type, by_cell = collections.Counter(), collections.Counter()
    with open(max(files, key=os.path.getmtime), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ms = float(row["op_total_time(ms)"]) / steps
            by_type[row["op_type"]] += ms
            if row["op_type"] == "Custom":
                cells = re.findall(r"-([A-Za-z0-9]+)/", row["full_op_name"])
                backward = "Grad_" in row["full_op_name"] or row["full_op_name"].startswith("Gradients")
                by_cell[f"{cells[-1] if cells else '?'} {'backward' if backward else 'forward'}"] += ms
    return dict(by_type), dict(by_cell)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--output", help="keep the profiler's files here (default: a temporary folder)")
    args = ap.parse_args()
    import mindspore as ms

    run, _ = build_ours(args.model, args.batch_size, args.image_size)
    for _ in range(2):  # compile and warm up outside the profile
        run()
    output = args.output or tempfile.mkdtemp(prefix="profile_train_")
    profiler = ms.Profiler(output_path=output)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    profiler.stop()
    profiler.analyse()
    by_type, by_cell = _per_step(output, args.iters)
    print(f"{args.model} train step, batch {args.batch_size}, {args.image_size} px, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}: {statistics.median(times) * 1e3:.0f} ms "
          f"per profiled step (median of {args.iters}); op time {sum(by_type.values()):.0f} ms per step")
    print("ms per step by op type:")
    for name, ms_ in sorted(by_type.items(), key=lambda kv: -kv[1]):
        if ms_ >= 1.0:
            print(f"  {ms_:8.1f}  {name}")
    print("fused kernels (Custom ops) by cell:")
    for name, ms_ in sorted(by_cell.items(), key=lambda kv: -kv[1]):
        print(f"  {ms_:8.1f}  {name}")
    print(f"profiler files: {output}")


if __name__ == "__main__":
    main()
