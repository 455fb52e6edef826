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


# OpenBLAS's setter of its threads callback, under the names its builds export (numpy's and
# scipy's wheels prefix and suffix their symbols)
_CALLBACK_SETTERS = [f"{prefix}openblas_set_threads_callback_function{suffix}"
                     for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")]


def _openblas_libraries():
    """[(path, ctypes library)] for every OpenBLAS loaded in this process."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:  # not Linux: nothing found
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6}  # (anonymous mappings have none)
    found = []
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()
                       and ".so" in os.path.basename(p)):
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
        except OSError:
            continue
        found.append((path, lib))
    return found


def _loaded_openblas():
    """[(path, setter)] for every OpenBLAS loaded in this process that takes a threads
    callback (0.3.27 and later)."""
    import ctypes
    found = []
    for path, lib in _openblas_libraries():
        for name in _CALLBACK_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_void_p], None
                found.append((path, setter))
                break
    return found


def share_blas_threads(enable=True):
    """Run the parallel parts of OpenBLAS (numpy's and scipy's matmuls) on fastopt's threads,
    or (enable=False) hand them back to OpenBLAS's own.  Returns the paths of the OpenBLAS
    libraries it set (those loaded now: import numpy, and scipy if it is used, first).

    Why: in a loop of matmuls and optimizer steps, OpenBLAS's worker threads spin for up to
    ~100 ms after each matmul on the cores that the step's second thread needs.  Without this,
    fastopt runs a step's helpers on those very workers (a pthread OpenBLAS with at least the
    step's thread count: README, "in a training loop").  Shared, there is one pool instead:
    fastopt's workers run the matmuls too, are awake when the step comes, and sleep 1 ms after
    the last job of either rather than spin ~100 ms.  OpenBLAS still splits a matmul into as
    many jobs as its own thread count (OPENBLAS_NUM_THREADS); each runs on its own thread of
    the pool, which grows to that count.  A matmul that starts while another thread's step or
    matmul runs on the pool waits for it.  Set it while no other thread is in a BLAS call or a
    fastopt step (OpenBLAS reads the callback without a lock).  A forked child keeps it, and
    its pool starts afresh.  Needs OpenBLAS 0.3.27 or later (numpy 2.1+ wheels).

    Not for processes in which several threads run LAPACK at once: with any threads callback
    installed (fastopt's, or one that starts a thread per job), two threads' concurrent
    np.linalg.solve calls hang in OpenBLAS 0.3.31's parallel LU factorization (dgetrf), which
    its own threads do not.  That is why this is opt-in."""
    if type(enable) is not bool:
        raise TypeError(f"enable must be True or False, got {enable!r}")
    global _shared_blas
    address = _kernels.blas_threads_address() if enable else None
    done = []
    for path, setter in _loaded_openblas():
        setter(address)
        done.append(path)
    _shared_blas = done if enable else []
    return done


_shared_blas = []  # the OpenBLAS libraries whose parallel parts run on fastopt's threads


def isa():
    """The instruction set the kernels use: 'avx512', 'avx2' or 'baseline' (chosen at first use,
    capped by the environment variable FASTOPT_ISA)."""
    return _kernels.isa()


def bf16_path():
    """How bfloat16 values are rounded to nearest: 'avx512bf16' (the VCVTNEPS2BF16 instruction,
    where the CPU has it and FASTOPT_ISA allows it) or 'integer' (shifts and adds); the same
    bits either way."""
    return _kernels.bf16_path()


def random_path():
    """How stochastic rounding's random bits (ARS-7, seven AES rounds per four elements) are
    computed: 'vaes512' or 'vaes256' (VAES on 512- or 256-bit vectors), 'aesni' (AES-NI) or
    'portable' (C); the same bits either way.  FASTOPT_ISA caps it: baseline runs 'portable',
    avx2 at most 'vaes256'."""
    return _kernels.random_path()


def show_config(file=None):
    """Print the version, instruction set, threads and build flags."""
    import fastopt
    lines = [
        f"fastopt {fastopt.__version__}",
        f"  kernels:      {isa()} (FASTOPT_ISA={os.environ.get('FASTOPT_ISA', '')!r})",
        f"  threads:      {get_num_threads()} "
        f"(FASTOPT_NUM_THREADS={os.environ.get('FASTOPT_NUM_THREADS', '')!r}; "
        "calls under 131072 elements use one)",
        f"  bfloat16:     rounding to nearest: {bf16_path()}; stochastic: ARS-7 bits by "
        f"{random_path()} (ml_dtypes " + ("installed" if _has_ml_dtypes() else "not installed") + ")",
        f"  build flags:  {_kernels.BUILD_FLAGS}",
        "  numerics:     no FMA contraction (-ffp-contract=off): every ISA and thread count "
        "gives the same bits",
        f"  C API:        version {_kernels.API_VERSION}, headers in {fastopt.get_include()}",
        "  BLAS:         " + (f"OpenBLAS's parallel parts on fastopt's threads "
                              f"({', '.join(map(os.path.basename, _shared_blas))}: share_blas_threads())"
                              if _shared_blas else "OpenBLAS (if any) on its own threads"),
    ]
    print("\n".join(lines), file=file or sys.stdout)
