"""Threads and instruction set: what the kernels run on, and how to change it."""
import os
import sys

from fastopt import _kernels


def _has_ml_dtypes():
    import importlib.util
    return importlib.util.find_spec("ml_dtypes") is not None


def set_num_threads(n):
    """Threads a large step may use (1..256; default: FASTOPT_NUM_THREADS, else the CPUs this
    process may use).  Calls under 131072 elements always run on the calling thread.
    Results are bitwise identical for any thread count."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"num_threads must be an int, got {n!r}")
    _kernels.set_num_threads(n)


def get_num_threads():
    return _kernels.get_num_threads()


def isa():
    """The instruction set the kernels use: 'avx512', 'avx2' or 'baseline' (chosen at first use,
    capped by the environment variable FASTOPT_ISA)."""
    return _kernels.isa()


def bf16_path():
    """How bfloat16 values are rounded to nearest: 'avx512bf16' (the VCVTNEPS2BF16 instruction,
    where the CPU has it and FASTOPT_ISA allows it) or 'integer' (shifts and adds); the same
    bits either way.  Stochastic rounding is integer arithmetic everywhere."""
    return _kernels.bf16_path()


def show_config(file=None):
    """Print the version, instruction set, threads and build flags."""
    import fastopt
    lines = [
        f"fastopt {fastopt.__version__}",
        f"  kernels:      {isa()} (FASTOPT_ISA={os.environ.get('FASTOPT_ISA', '')!r})",
        f"  threads:      {get_num_threads()} "
        f"(FASTOPT_NUM_THREADS={os.environ.get('FASTOPT_NUM_THREADS', '')!r}; "
        "calls under 131072 elements use one)",
        f"  bfloat16:     rounding to nearest: {bf16_path()}; stochastic: integer, keyed "
        "generator (ml_dtypes " + ("installed" if _has_ml_dtypes() else "not installed") + ")",
        f"  build flags:  {_kernels.BUILD_FLAGS}",
        "  numerics:     no FMA contraction (-ffp-contract=off): every ISA and thread count "
        "gives the same bits",
        f"  C API:        version {_kernels.API_VERSION}, headers in {fastopt.get_include()}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
