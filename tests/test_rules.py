"""Every rule x dtype x option against the float64 numpy reference (tests/reference.py)."""
import numpy as np
import pytest

import fastopt
import reference
from conftest import CASES, case_id

SHAPES = [(7, 5), (33,), (2, 3, 4)]  # odd sizes: no size is a multiple of a SIMD width
STEPS = 60


def reference_name(cls):
    return {"Momentum": "SGD", "NAG": "SGD"}.get(cls.__name__, cls.__name__)


def reference_kwargs(hp):
    return {("decoupled" if k == "decoupled_weight_decay" else k): v for k, v in hp.items()}


def run_both(cls, hp, dtype, rng, steps=STEPS):
    """Train with fastopt in `dtype` and with the reference in float64 on the same numbers.

    Two param groups (the second with half the lr), and the lr of every group is scaled at
    mid-run, as a schedule does.  Returns (fastopt params, reference params, initial params).
    """
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [p.copy() for p in init]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": hp.get("lr", 1.0) / 2}]
    opt = cls(groups, **hp)
    ref_fn = reference.RULES[reference_name(cls)]
    ref_params = [p.astype(np.float64) for p in init]
    ref_states = [{} for _ in init]
    for step in range(steps):
        if step == steps // 2:
            for g in opt.param_groups:
                g["lr"] *= 0.3
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        opt.step(grads)
        k = 0
        for group in opt.param_groups:
            group_hp = reference_kwargs({key: v for key, v in group.items() if key != "params"})
            for _ in group["params"]:
                ref_params[k] = ref_fn(ref_params[k], grads[k].astype(np.float64), ref_states[k],
                                       **group_hp)
                k += 1
    return params, ref_params, init, ref_states


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_matches_reference(case, rng):
    cls, hp = case
    params, ref_params, _, _ = run_both(cls, hp, np.float64, rng)
    for p, r in zip(params, ref_params):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_matches_reference_within_rounding(case, rng):
    cls, hp = case
    params, ref_params, init, states = run_both(cls, hp, np.float32, rng)
    for p, r, p0, state in zip(params, ref_params, init, states):
        keep = reference.comparable(state, p.shape)
        p, r, p0 = p[keep], r[keep], p0[keep]
        assert p.dtype == np.float32
        # float32 keeps ~7 digits per step: compare the distance travelled, which is what a
        # formula error would change, to a tolerance far below one step's size.
        moved, ref_moved = p.astype(np.float64) - p0, r - p0
        scale = np.abs(ref_moved).max()
        assert scale > 0
        np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=2e-4 * scale + 2e-6)


def test_every_case_moves_the_parameters_differently(rng):
    """Guards the test above: distinct options must give distinct trajectories."""
    finals = {}
    for case in CASES:
        params, _, _, _ = run_both(*case, np.float64, np.random.default_rng(0), steps=5)
        finals[case_id(case)] = np.concatenate([p.ravel() for p in params])
    ids = list(finals)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-9), (a, b)


def test_shorthands_are_sgd_forms(rng):
    for shorthand, hp in [(fastopt.Momentum, dict(momentum=0.8)),
                          (fastopt.NAG, dict(momentum=0.8, nesterov=True))]:
        p1 = rng.standard_normal(10)
        p2 = p1.copy()
        a = shorthand([p1], lr=0.1, momentum=0.8)
        b = fastopt.SGD([p2], lr=0.1, **hp)
        for _ in range(5):
            g = rng.standard_normal(10)
            a.step([g])
            b.step([g])
        np.testing.assert_array_equal(p1, p2)
        assert a.param_groups[0]["nesterov"] == hp.get("nesterov", False)


def test_functional_matches_optimizer(rng):
    p1 = rng.standard_normal(50).astype(np.float32)
    p2 = p1.copy()
    opt = fastopt.Adam([p1], lr=0.01, amsgrad=True)
    state = fastopt.AdamState.new(p2)
    for _ in range(10):
        g = rng.standard_normal(50).astype(np.float32)
        opt.step([g])
        fastopt.functional.adam(p2, g, state, lr=0.01, amsgrad=True)
    np.testing.assert_array_equal(p1, p2)
    assert state.step == 10 and state.max_v is not None


def test_update_is_in_place(rng):
    p = rng.standard_normal((4, 4)).astype(np.float32)
    address = p.ctypes.data
    opt = fastopt.Adam([p], lr=0.1)
    before = p.copy()
    opt.step([np.ones((4, 4), np.float32)])
    assert p.ctypes.data == address and p.dtype == np.float32
    assert not np.array_equal(p, before)
    for buf in opt.state[0].buffers().values():
        assert buf.dtype == np.float32 and buf.shape == (4, 4)


def test_zero_gradient_with_adam_leaves_params(rng):
    p = rng.standard_normal(9)
    before = p.copy()
    fastopt.Adam([p]).step([np.zeros(9)])
    np.testing.assert_array_equal(p, before)


def test_nan_gradient_propagates():
    """No fast-math: a NaN gradient must show up, not vanish."""
    for cls in (fastopt.SGD, fastopt.Adam, fastopt.AdaMax, fastopt.RMSprop):
        p = np.ones(17, np.float32)
        g = np.zeros(17, np.float32)
        g[3] = np.nan
        cls([p]).step([g])
        assert np.isnan(p[3]) and np.isfinite(np.delete(p, 3)).all(), cls.__name__


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_tensor_rules_take_the_ratio_as_one_at_zero_norms(dtype):
    """LAMB and LARS where a norm is 0: a zero parameter, a zero direction, a zero gradient
    without decay; each tensor's ratio is its own (one batch holds them all)."""
    cases = [(fastopt.LAMB, dict(lr=0.1, weight_decay=0.1)), (fastopt.LAMB, dict(lr=0.1)),
             (fastopt.LARS, dict(lr=0.1, weight_decay=0.1)), (fastopt.LARS, dict(lr=0.1))]
    for cls, hp in cases:
        rng = np.random.default_rng(2)
        params = [np.zeros(5, dtype), rng.standard_normal(7).astype(dtype),
                  rng.standard_normal(3).astype(dtype), np.zeros(0, dtype)]
        grads = [rng.standard_normal(5).astype(dtype), rng.standard_normal(7).astype(dtype),
                 np.zeros(3, dtype), np.zeros(0, dtype)]
        refs, states = [p.astype(np.float64) for p in params], [{} for _ in params]
        opt = cls(params, **hp)
        for _ in range(3):
            opt.step(grads)
            refs = [reference.RULES[cls.__name__](r, g.astype(np.float64), st, **hp)
                    for r, g, st in zip(refs, grads, states)]
        rtol = 1e-12 if dtype == np.float64 else 2e-5
        for p, r in zip(params, refs):
            np.testing.assert_allclose(p, r, rtol=rtol, atol=rtol * 1e-2)
        assert np.abs(params[0]).max() > 0  # a zero tensor moves with ratio 1


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "RMSprop", "Adadelta", "AdaMax", "Nadam"])
def test_infinite_weights_stay_infinite_without_weight_decay(name):
    """No L2 term without weight decay (it was 0 * theta: NaN for an infinite weight)."""
    p = np.array([np.inf, -np.inf, 1.0])
    getattr(fastopt, name)([p], lr=0.1).step([np.full(3, 0.5)])
    assert p[0] == np.inf and p[1] == -np.inf and np.isfinite(p[2])
