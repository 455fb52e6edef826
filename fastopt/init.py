"""Parameter initializers: in-place fills of float32/float64 arrays, reproducible with a seed.

    rng = np.random.default_rng(0)
    fastopt.init.kaiming_normal(w, rng, nonlinearity="relu")     # w: (fan_in, fan_out) dense

Shapes: dense weights are (fan_in, fan_out) (y = x @ w); convolution kernels are
(out_channels, in_channels, kh, kw), with fan_in = in_channels * kh * kw and
fan_out = out_channels * kh * kw.  Gains: linear 1, tanh 5/3, relu sqrt(2).

| function | distribution |
|---|---|
| xavier_uniform | U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) |
| xavier_normal | N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)) |
| kaiming_uniform | U(-a, a), a = gain * sqrt(3 / fan), fan = fan_in (mode="fan_in") or fan_out |
| kaiming_normal | N(0, std^2), std = gain / sqrt(fan) |
| lecun_normal | N(0, 1 / fan_in) |
| zeros, constant | every element 0, or the value |
"""
import math

import numpy as np

from fastopt import _checks

GAINS = {"linear": 1.0, "tanh": 5.0 / 3.0, "relu": math.sqrt(2.0)}


def _check_array(a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(a).__name__}")
    if a.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"expected float32 or float64, got {a.dtype}")
    if not a.flags.writeable:
        raise ValueError("the array is read-only")


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


def fans(shape):
    """(fan_in, fan_out) of a dense (fan_in, fan_out) or conv (out, in, kh, kw) shape."""
    shape = tuple(shape)
    if len(shape) == 2:
        fan_in, fan_out = shape
    elif len(shape) == 4:
        receptive = shape[2] * shape[3]
        fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    else:
        raise ValueError(f"shape {shape} is neither dense (fan_in, fan_out) nor a convolution "
                         "(out, in, kh, kw)")
    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"shape {shape} has no fan-in or fan-out")
    return fan_in, fan_out


def gain(nonlinearity):
    if nonlinearity not in GAINS:
        raise ValueError(f"nonlinearity must be one of {sorted(GAINS)}, got {nonlinearity!r}")
    return GAINS[nonlinearity]


def _fan(shape, mode):
    fan_in, fan_out = fans(shape)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    return fan_in if mode == "fan_in" else fan_out


def _uniform(a, rng, bound):
    a[...] = rng.uniform(-bound, bound, a.shape)
    return a


def _normal(a, rng, std):
    a[...] = rng.normal(0.0, std, a.shape)
    return a


def xavier_uniform(a, rng, nonlinearity="linear"):
    """Glorot & Bengio (2010): U(-a, a), a = gain sqrt(6 / (fan_in + fan_out))."""
    _check_array(a)
    _check_rng(rng)
    fan_in, fan_out = fans(a.shape)
    return _uniform(a, rng, gain(nonlinearity) * math.sqrt(6.0 / (fan_in + fan_out)))


def xavier_normal(a, rng, nonlinearity="linear"):
    """Glorot & Bengio (2010): N(0, std^2), std = gain sqrt(2 / (fan_in + fan_out))."""
    _check_array(a)
    _check_rng(rng)
    fan_in, fan_out = fans(a.shape)
    return _normal(a, rng, gain(nonlinearity) * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform(a, rng, nonlinearity="relu", mode="fan_in"):
    """He et al. (2015): U(-a, a), a = gain sqrt(3 / fan)."""
    _check_array(a)
    _check_rng(rng)
    return _uniform(a, rng, gain(nonlinearity) * math.sqrt(3.0 / _fan(a.shape, mode)))


def kaiming_normal(a, rng, nonlinearity="relu", mode="fan_in"):
    """He et al. (2015): N(0, std^2), std = gain / sqrt(fan)."""
    _check_array(a)
    _check_rng(rng)
    return _normal(a, rng, gain(nonlinearity) / math.sqrt(_fan(a.shape, mode)))


def lecun_normal(a, rng):
    """LeCun et al. (1998): N(0, 1 / fan_in)."""
    _check_array(a)
    _check_rng(rng)
    return _normal(a, rng, 1.0 / math.sqrt(fans(a.shape)[0]))


def constant(a, value):
    _check_array(a)
    a[...] = _checks.real_in("value", value, a.dtype)
    return a


def zeros(a):
    return constant(a, 0.0)
