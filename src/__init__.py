"""CoAtNet training suite for MindSpore."""
import os

# MindSpore 2.10's bundled oneDNN takes a reference-speed convolution path on CPUs that allow
# any AVX-512 ISA (0.5 GFLOP/s vs ~100+ with AVX2). It reads this variable once when MindSpore
# loads, so it must be set before `import mindspore`; a value the user already set wins.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
