"""How parameters, gradients and optimizer state are stored: float32, float64 or bfloat16.

Compute is float32 (float64 for float64 parameters); only the loads and stores change
(csrc/fastopt.h, fo_dtype).  numpy's bfloat16 is ml_dtypes.bfloat16 (optional: pip install
fastopt[bf16]); fastopt imports without it and recognises the dtype by name.

Every optimizer takes the options in DEFAULTS (keyword-only):
    state_dtype     None (float32 for bfloat16 parameters, else the parameter's dtype),
                    "float32" or "bfloat16": how new state buffers are stored
    rounding        "stochastic" (E[round(x)] = x) or "nearest" (ties to even): every
                    bfloat16 write except a master-weights parameter's, which is nearest
    seed            keys stochastic rounding's random bits with the parameter's index, the
                    step, the element and the buffer (results independent of threads, ISA, order)
    master_weights  bfloat16 parameters only: a float32 copy in state.master is updated, and
                    the parameter written from it (to nearest) in the same pass
"""
import numbers

import numpy as np

from fastopt import _kernels

DEFAULTS = {"state_dtype": None, "rounding": "stochastic", "seed": 0, "master_weights": False}
ROUNDINGS = ("stochastic", "nearest")  # their index is fo_rounding's value
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

_bf16 = None


def bfloat16():
    """ml_dtypes.bfloat16 as a numpy dtype (imports ml_dtypes; ImportError if missing)."""
    global _bf16
    if _bf16 is None:
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes, "
                              "or fastopt[bf16])") from None
        _bf16 = np.dtype(ml_dtypes.bfloat16)
    return _bf16


def is_bf16(dtype):
    """Whether a numpy dtype is ml_dtypes' bfloat16 (without importing ml_dtypes)."""
    return dtype.itemsize == 2 and dtype.name == "bfloat16"


def copy_as(array, dtype):
    """A C-contiguous copy of `array` stored as `dtype`; into bfloat16 rounded as a step's
    stores round to nearest (subnormals flushed; a float64 to float32 first), not as numpy's
    cast does."""
    dtype = np.dtype(dtype)
    if not is_bf16(dtype) or is_bf16(array.dtype):
        return array.astype(dtype, order="C")
    out = np.empty(array.shape, dtype)
    _kernels.round_to_bfloat16(np.ascontiguousarray(array, dtype=F32), out)
    return out


def is_float(dtype):
    """A dtype parameters may have: float32, float64 or bfloat16 (native byte order)."""
    return dtype == F32 or dtype == F64 or is_bf16(dtype)


def compute_dtype(param_dtype):
    return F64 if param_dtype == F64 else F32


def grad_dtypes(param_dtype):
    """The gradient dtypes a parameter of this dtype takes (the first is the usual one)."""
    return (param_dtype, bfloat16()) if param_dtype == F32 else (param_dtype,)


def state_dtype_ok(dtype, param_dtype):
    """A state buffer may be stored in the compute type or in bfloat16."""
    return dtype == compute_dtype(param_dtype) or is_bf16(dtype)


def check_options(state_dtype=None, rounding="stochastic", seed=0, master_weights=False):
    """The storage options, normalized: state_dtype None, "float32" or "bfloat16" (numpy dtypes
    and torch's, by name, are accepted too)."""
    if state_dtype is not None:
        name = getattr(state_dtype, "name", None) or str(state_dtype)
        name = name.replace("torch.", "")
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"unknown state_dtype {state_dtype!r}: use None, 'float32' or "
                             "'bfloat16'")
        state_dtype = name
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}: use 'stochastic' or 'nearest'")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not isinstance(master_weights, (bool, np.bool_)):
        raise TypeError(f"master_weights must be True or False, got {master_weights!r}")
    return {"state_dtype": state_dtype, "rounding": rounding, "seed": int(seed),
            "master_weights": bool(master_weights)}


def state_dtype_for(param_dtype, options):
    """The dtype of a new state buffer of a parameter of `param_dtype`."""
    if options["state_dtype"] == "bfloat16":
        return bfloat16()
    return compute_dtype(param_dtype)


def check_param_dtype(param_dtype, options, what):
    """Refuse a parameter the options do not fit (TypeError/ValueError naming it)."""
    if options["master_weights"] and not is_bf16(param_dtype):
        raise ValueError(f"master_weights=True is for bfloat16 parameters; {what} is "
                         f"{param_dtype}")
    if options["state_dtype"] == "float32" and param_dtype == F64:
        raise ValueError(f"state_dtype='float32' is for float32 and bfloat16 parameters; {what} "
                         "is float64 (its state is float64 or bfloat16)")
