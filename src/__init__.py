"""CoAtNet training suite for MindSpore."""
import os

# MindSpore 2.10's bundled oneDNN runs a dense or grouped k x k convolution on its reference path
# (~1 GFLOP/s) on CPUs that allow any AVX-512 ISA, while its 1x1 convolutions and matmuls take the
# AVX-512 brgemm path there (faster than AVX2). The suite caps oneDNN at AVX2 by default; a model
# whose every k x k convolution runs a fused kernel of src.kernels lifts the cap
# (src.kernels.use_fused_kernels). oneDNN reads the variable once, when it creates its first
# primitive: what is set before then counts. A value the user set wins and is never changed.
CPU_ISA_CAP = "AVX2"
_ISA_CAP_IS_OURS = "ONEDNN_MAX_CPU_ISA" not in os.environ
if _ISA_CAP_IS_OURS:
    os.environ["ONEDNN_MAX_CPU_ISA"] = CPU_ISA_CAP


def set_cpu_isa_cap(capped: bool) -> None:
    """Cap oneDNN at AVX2 (``capped``) or lift the cap (oneDNN's default: every ISA of the CPU), unless
    the user set ``ONEDNN_MAX_CPU_ISA``. Takes effect only before oneDNN's first primitive."""
    if not _ISA_CAP_IS_OURS:
        return
    if capped:
        os.environ["ONEDNN_MAX_CPU_ISA"] = CPU_ISA_CAP
    else:
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
