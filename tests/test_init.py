"""fastopt.init: sample statistics against the formulas, fans, reproducibility, bad input."""
import math

import numpy as np
import pytest

import fastopt
from fastopt import init

DENSE, CONV = (400, 300), (64, 32, 3, 3)   # fans: (400, 300) and (288, 576)


def check_moments(a, var, fourth_moment_ratio):
    """Mean and variance of the N samples within 5 standard errors of the formulas
    (s.e. of the mean sqrt(var/N); of the variance var sqrt((kurtosis - 1)/N))."""
    n = a.size
    x = a.astype(np.float64).ravel()
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * var * math.sqrt((fourth_moment_ratio - 1) / n)


NORMAL_KURTOSIS, UNIFORM_KURTOSIS = 3.0, 9.0 / 5.0


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nonlinearity", ["linear", "tanh", "relu"])
def test_xavier(shape, dtype, nonlinearity):
    fan_in, fan_out = init.fans(shape)
    g = init.GAINS[nonlinearity]
    a = np.empty(shape, dtype)
    init.xavier_uniform(a, np.random.default_rng(1), nonlinearity)
    bound = g * math.sqrt(6 / (fan_in + fan_out))
    assert a.dtype == dtype and np.abs(a).max() <= bound
    check_moments(a, bound ** 2 / 3, UNIFORM_KURTOSIS)
    init.xavier_normal(a, np.random.default_rng(2), nonlinearity)
    check_moments(a, g ** 2 * 2 / (fan_in + fan_out), NORMAL_KURTOSIS)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity", ["relu", "linear"])
def test_kaiming(shape, mode, nonlinearity):
    fan = init.fans(shape)[0 if mode == "fan_in" else 1]
    g = init.GAINS[nonlinearity]
    a = np.empty(shape, np.float32)
    init.kaiming_uniform(a, np.random.default_rng(3), nonlinearity, mode)
    bound = g * math.sqrt(3 / fan)
    assert np.abs(a).max() <= bound
    check_moments(a, bound ** 2 / 3, UNIFORM_KURTOSIS)
    init.kaiming_normal(a, np.random.default_rng(4), nonlinearity, mode)
    check_moments(a, g ** 2 / fan, NORMAL_KURTOSIS)


def test_lecun_zeros_constant():
    a = np.empty(CONV)
    init.lecun_normal(a, np.random.default_rng(5))
    check_moments(a, 1 / 288, NORMAL_KURTOSIS)
    assert not init.zeros(a).any()
    assert (init.constant(a, 0.25) == 0.25).all()


def test_fans():
    assert init.fans((5, 7)) == (5, 7)
    assert init.fans((16, 3, 5, 5)) == (75, 400)
    assert init.GAINS == {"linear": 1.0, "tanh": 5 / 3, "relu": math.sqrt(2)}


def test_reproducible_and_in_place():
    a, b = np.empty(DENSE, np.float32), np.empty(DENSE, np.float32)
    out = init.xavier_uniform(a, np.random.default_rng(7))
    init.xavier_uniform(b, np.random.default_rng(7))
    assert out is a and np.array_equal(a, b)
    init.xavier_uniform(b, np.random.default_rng(8))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("call, error", [
    (lambda: init.xavier_uniform(np.empty(10), np.random.default_rng()), ValueError),
    (lambda: init.kaiming_normal(np.empty((2, 3, 4)), np.random.default_rng()), ValueError),
    (lambda: init.kaiming_normal(np.empty((0, 3)), np.random.default_rng()), ValueError),
    (lambda: init.xavier_normal(np.empty((3, 3), np.int32), np.random.default_rng()), TypeError),
    (lambda: init.xavier_normal([[1.0]], np.random.default_rng()), TypeError),
    (lambda: init.xavier_normal(np.empty((3, 3)), 42), TypeError),
    (lambda: init.kaiming_uniform(np.empty((3, 3)), np.random.default_rng(), "gelu"), ValueError),
    (lambda: init.kaiming_uniform(np.empty((3, 3)), np.random.default_rng(), mode="both"), ValueError),
    (lambda: init.constant(np.empty(3), float("nan")), ValueError),
])
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_read_only_rejected():
    a = np.zeros((3, 3))
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        init.lecun_normal(a, np.random.default_rng())
    assert fastopt.init is init


@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_constant_refuses_a_value_not_finite_in_the_arrays_dtype(value):
    """The finiteness check is in the array's dtype: 1e300 filled a float32 array with inf."""
    a = np.full(3, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"value must be finite in float32.*3\.4028235e\+38"):
        init.constant(a, value)
    np.testing.assert_array_equal(a, np.full(3, 0.5, np.float32), strict=True)
    assert (init.constant(np.empty(3), value) == value).all()  # finite in float64
    largest = float(np.finfo(np.float32).max)
    assert (init.constant(a, -largest) == -largest).all()
