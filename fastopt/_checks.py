"""Argument checks shared by the functional API and the optimizers.

Every check raises before anything is written: TypeError for a wrong kind of object or dtype,
ValueError for a wrong value, shape or memory layout.  Messages name the argument.
"""
import math
import numbers

import numpy as np

from fastopt import _kernels, storage

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_param(a, what, bfloat16=False):
    """A parameter: float32 or float64 (and bfloat16 where the caller takes it)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES and not (bfloat16 and storage.is_bf16(a.dtype)):
        kinds = "float32, float64 or bfloat16" if bfloat16 else "float32 or float64"
        raise TypeError(f"{what} must be {kinds} (native byte order), got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (it is updated in place)")
    if not a.flags.writeable:
        raise ValueError(f"{what} is read-only; parameters are updated in place")


def check_like(buf, param, what, *, writeable, dtype_ok=None, shape=None):
    """buf must be an array of param's shape (or `shape`) and dtype (or one that
    dtype_ok(dtype) accepts: (ok, "what is expected")), C-contiguous (and writeable if asked)."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(buf).__name__}")
    if dtype_ok is not None:
        ok, expected = dtype_ok(buf.dtype)
        if not ok:
            raise TypeError(f"{what} has dtype {buf.dtype}, the parameter has {param.dtype} "
                            f"({expected})")
    elif buf.dtype != param.dtype:
        raise TypeError(f"{what} has dtype {buf.dtype}, the parameter has {param.dtype}")
    expected = param.shape if shape is None else shape
    if buf.shape != expected:
        raise ValueError(f"{what} has shape {buf.shape}, the parameter has {param.shape}"
                         if expected == param.shape else
                         f"{what} has shape {buf.shape}; for a parameter of shape "
                         f"{param.shape} it must be {expected}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if writeable and not buf.flags.writeable:
        raise ValueError(f"{what} is read-only")


def grad_dtype_ok(param):
    """A gradient's dtype: the parameter's, or bfloat16 for a float32 parameter."""
    def ok(dtype):
        if dtype == param.dtype or (param.dtype == storage.F32 and storage.is_bf16(dtype)):
            return True, ""
        also = " or bfloat16" if param.dtype == storage.F32 else ""
        return False, f"its gradient must be {param.dtype}{also}"
    return ok


def state_dtype_ok(param, bfloat16=True):
    """A state buffer's dtype: the compute type (float32, float64 for float64 parameters) or,
    unless the rule refuses it, bfloat16."""
    def ok(dtype):
        if storage.state_dtype_ok(dtype, param.dtype) and (bfloat16 or not storage.is_bf16(dtype)):
            return True, ""
        return False, (f"its state must be {storage.compute_dtype(param.dtype)}"
                       + (" or bfloat16" if bfloat16 else ""))
    return ok


def check_grads(grads, params):
    """grads checked against params: a list of the arrays it held when read, read once (a
    sequence that answers otherwise on a later read is held to the answer checked)."""
    if isinstance(grads, np.ndarray) or not hasattr(grads, "__len__"):
        raise TypeError("grads must be a sequence of arrays, one per parameter")
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} grads for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params)):
        if isinstance(g, _kernels.SparseGrad):
            check_sparse_grad(g, p, f"grads[{i}]")
        else:
            check_like(g, p, f"grads[{i}]", writeable=False, dtype_ok=grad_dtype_ok(p))
    return grads


INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_sparse_grad(g, param, what):
    """A SparseGrad of `param`: 1-D int32/int64 indices in [0, param.shape[0]), values shaped
    (len(indices),) + param.shape[1:] in a gradient's dtype (param's, or bfloat16 for a float32
    param), both C-contiguous."""
    if param.ndim < 1:
        raise ValueError(f"{what} is a SparseGrad, but the parameter is a scalar (rows need "
                         "ndim >= 1)")
    indices, values = g.indices, g.values
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{what}.indices must be int32 or int64 (native byte order), got "
                        f"{indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"{what}.indices must be 1-D, got shape {indices.shape}")
    if not indices.flags.c_contiguous:
        raise ValueError(f"{what}.indices must be C-contiguous")
    ok, need = grad_dtype_ok(param)(values.dtype)
    if not ok:
        raise TypeError(f"{what}.values has dtype {values.dtype}: {need}")
    expected = (len(indices),) + param.shape[1:]
    if values.shape != expected:
        raise ValueError(f"{what}.values has shape {values.shape}, expected {expected} "
                         f"(len(indices),) + parameter shape[1:]")
    if not values.flags.c_contiguous:
        raise ValueError(f"{what}.values must be C-contiguous")
    if len(indices):
        low, high = int(indices.min()), int(indices.max())
        if low < 0:
            raise ValueError(f"{what}.indices holds a negative row index ({low})")
        if high >= param.shape[0]:
            raise ValueError(f"{what}.indices holds row {high}, out of range for a parameter of "
                             f"{param.shape[0]} rows")


def check_no_overlap(written, written_names, read=(), read_names=()):
    """No written buffer may share memory with any other buffer (read ones may share)."""
    pair = _kernels.first_overlap(list(written), list(read))
    if pair is not None:
        names = list(written_names) + list(read_names)
        raise ValueError(f"{names[pair[0]]} overlaps {names[pair[1]]} in memory; the update "
                         "needs separate buffers")


# ---- hyperparameters -------------------------------------------------------------------

def real(name, x):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    x = as_float(name, x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def real_in(name, x, dtype):
    """real(name, x), and finite once rounded to `dtype` too (1e300 is inf in float32)."""
    x = real(name, x)
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):  # the overflow is the ValueError below
        rounded = dtype.type(x)
    if not np.isfinite(rounded):
        raise ValueError(f"{name} must be finite in {dtype}, got {x} (beyond its largest, "
                         f"{np.finfo(dtype).max:.8g})")
    return x


def as_float(name, x):
    """float(x) for a real number x; one too large for a double (10**400) is a ValueError
    naming it, not float()'s OverflowError."""
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {_kernels.short_repr(x)} (too large for a "
                         "double)") from None


def nonnegative(name, x):
    x = real(name, x)
    if x < 0.0:
        raise ValueError(f"Invalid {name}: {x} (must be >= 0)")
    return x


def betas(x):
    if not isinstance(x, (tuple, list, np.ndarray)) or len(x) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {x!r}")
    # the range, [0, 1), is the C rule's to check (it names beta1 or beta2)
    return (real("beta1 (betas[0])", x[0]), real("beta2 (betas[1])", x[1]))


SPARSE_MODES = ("lazy", "exact")


def sparse_mode(name, x):
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a string, got {x!r}")
    if x not in SPARSE_MODES:
        raise ValueError(f"{name} must be one of {SPARSE_MODES}, got {x!r}")
    return x


def pair(name, x):
    if not isinstance(x, (tuple, list, np.ndarray)) or len(x) != 2:
        raise TypeError(f"{name} must be a pair of numbers, got {x!r}")
    # the ranges are the C rule's to check
    return (real(f"{name}[0]", x[0]), real(f"{name}[1]", x[1]))


def optional_pair(name, x):
    """A pair whose first number may be None (an eps pair whose None means the dtype's epsilon)."""
    if not isinstance(x, (tuple, list, np.ndarray)) or len(x) != 2:
        raise TypeError(f"{name} must be a pair (number or None, number), got {x!r}")
    first = None if x[0] is None else real(f"{name}[0]", x[0])
    if first is not None and first < 0.0:  # (None is the C rule's -1, which a user never gives)
        raise ValueError(f"Invalid {name}1 ({name}[0]): {first} (must be >= 0, or None)")
    return (first, real(f"{name}[1]", x[1]))


def flag(name, x):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {x!r}")
    return bool(x)


# the largest step count a state may hold (loaded, given to fastopt.functional, or checked
# before a step): the engine's, where its reason is
MAX_STEP = _kernels.MAX_STEP


def step_count(name, x):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    if not 0 <= x <= MAX_STEP:
        raise ValueError(f"{name} must be in [0, 2**53], got {x}")
    return int(x)
