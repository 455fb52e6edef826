"""opt.step's training-step options (unscale, skip non-finite, clip by the global norm) and the
reduction pass under them, against float64 numpy written from the README's formulas."""
import copy
import math

import numpy as np
import pytest

import fastopt
import reference
from conftest import CASES, case_id
from fastopt import _kernels
from test_rules import reference_kwargs, reference_name

SHAPES = [(7, 5), (33,), (2, 3, 4)]


def ref_norm(grads):
    return float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)))


def ref_step(ref_fn, ref_params, ref_states, grads, group_hps, grad_scale, clip_norm):
    """The issue's semantics: g <- g / grad_scale; g <- g min(1, clip / (norm + 1e-6))."""
    g64 = [g.astype(np.float64) / grad_scale for g in grads]
    norm = ref_norm(g64)
    factor = min(1.0, clip_norm / (norm + 1e-6)) if clip_norm is not None else 1.0
    for k, hp in enumerate(group_hps):
        ref_params[k] = ref_fn(ref_params[k], g64[k] * factor, ref_states[k], **hp)
    return norm


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_rule_with_unscale_and_clip(case, dtype, rng):
    cls, hp = case
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [p.copy() for p in init]
    opt = cls(params, ema_decay=0.8, **hp)
    ref_fn = reference.RULES[reference_name(cls)]
    ref_params = [p.astype(np.float64) for p in init]
    ref_states = [{} for _ in init]
    ref_ema = [p.astype(np.float64) for p in init]  # the EMA starts as the parameter
    group_hp = reference_kwargs({k: v for k, v in opt.param_groups[0].items()
                                 if k != "params" and k not in cls.rule.fixed})
    clipped = unclipped = 0
    for step in range(12):
        grad_scale = 8.0 if step % 3 else 1.0
        grads = [(rng.standard_normal(s) * grad_scale).astype(dtype) for s in SHAPES]
        # the limit below the norm on even steps (clipped), far above it on odd ones
        clip_norm = ref_norm(grads) / grad_scale * (0.3 if step % 2 == 0 else 3.0)
        result = opt.step(grads, grad_scale=grad_scale, clip_norm=clip_norm)
        norm = ref_step(ref_fn, ref_params, ref_states, grads, [group_hp] * len(SHAPES),
                        grad_scale, clip_norm)
        ref_ema = [0.8 * e + 0.2 * p for e, p in zip(ref_ema, ref_params)]
        assert not result.skipped
        assert result.total_norm == pytest.approx(norm, rel=1e-13)
        clipped += clip_norm < norm
        unclipped += clip_norm > norm
    assert clipped and unclipped
    emas = opt.ema_arrays()
    assert [e.dtype for e in emas] == [dtype] * len(SHAPES)
    for got, ref in [(params, ref_params), (emas, ref_ema)]:
        for p, r, p0, state in zip(got, ref, init, ref_states):
            if dtype == np.float64:
                np.testing.assert_allclose(p, r, rtol=1e-11, atol=1e-12)
            else:
                keep = reference.comparable(state, p.shape)
                moved, ref_moved = (p.astype(np.float64) - p0)[keep], (r - p0)[keep]
                scale = np.abs(ref_moved).max()
                np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=2e-4 * scale + 2e-6)


def snapshot(opt):
    return copy.deepcopy(opt.state_dict()), [p.copy() for p in opt.params]


def assert_same(before, opt):
    state, params = before
    now_state, now_params = snapshot(opt)
    for a, b in zip(params, now_params):
        assert a.tobytes() == b.tobytes()
    assert state.keys() == now_state.keys()
    assert state["state"].keys() == now_state["state"].keys()
    for i, s in state["state"].items():
        t = now_state["state"][i]
        assert s.keys() == t.keys()
        for k in s:
            if isinstance(s[k], np.ndarray):
                assert s[k].tobytes() == t[k].tobytes()
            else:
                assert s[k] == t[k]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_skipped_step_changes_nothing(bad, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    opt = fastopt.Adam(params, lr=0.01, amsgrad=True, ema_decay=0.99)
    grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    # the very first step: no state may be created either
    bad_grads = [g.copy() for g in grads]
    bad_grads[2].flat[5] = bad
    before = snapshot(opt)
    result = opt.step(bad_grads, skip_nonfinite=True, clip_norm=1.0)
    assert result.skipped and not np.isfinite(result.total_norm)
    assert opt.state == {}
    assert_same(before, opt)
    for _ in range(3):  # then planned steps
        assert not opt.step(grads, skip_nonfinite=True).skipped
    before = snapshot(opt)
    for _ in range(2):
        assert opt.step(bad_grads, skip_nonfinite=True, grad_scale=4.0).skipped
    assert_same(before, opt)
    assert opt.state[0].step == 3
    assert not opt.step(grads, skip_nonfinite=True).skipped
    assert opt.state[0].step == 4


def test_total_norm_is_identical_for_any_thread_count(rng):
    shapes = [(5000,), (150_000,), (3,), (70_001,)]  # large enough to be split across threads
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    norms = set()
    before = fastopt.get_num_threads()
    try:
        for threads in (1, 2, 8):
            fastopt.set_num_threads(threads)
            opt = fastopt.SGD([p.copy() for p in params], lr=0.1)
            for _ in range(3):  # the validating path, then planned steps
                norms.add(opt.step(grads, compute_norm=True).total_norm)
            norms.add(_kernels.norms([g.ctypes.data for g in grads], [g.size for g in grads], 2.0, False)[1] ** 0.5)
    finally:
        fastopt.set_num_threads(before)
    assert len(norms) == 1
    assert norms.pop() == pytest.approx(ref_norm(grads), rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_reduction_pass_for_every_norm_type(dtype, rng):
    arrays = [rng.standard_normal(n).astype(dtype) for n in (1, 4095, 4097, 20000, 0)]
    arrays[2][::7] = 0
    pairs = [a.ctypes.data for a in arrays], [a.size for a in arrays]
    f64 = dtype == np.float64
    as64 = [a.astype(np.float64) for a in arrays]
    for p, per, combine in [
            (2.0, lambda a: (a ** 2).sum(), sum), (1.0, lambda a: np.abs(a).sum(), sum),
            (3.5, lambda a: (np.abs(a) ** 3.5).sum(), sum),
            (0.0, lambda a: float(np.count_nonzero(a)), sum),
            (np.inf, lambda a: np.abs(a).max(initial=0.0), max)]:
        sums, total, nonfinite = _kernels.norms(*pairs, p, f64)
        expected = [per(a) for a in as64]
        np.testing.assert_allclose(sums, expected, rtol=1e-12)
        assert total == pytest.approx(combine(expected), rel=1e-12)
        assert nonfinite is False
    for bad, p in [(np.inf, 2.0), (np.nan, 2.0), (np.nan, np.inf), (np.inf, np.inf), (np.inf, 1.0)]:
        arrays[3][1234] = bad
        sums, total, nonfinite = _kernels.norms(*pairs, p, f64)
        assert nonfinite is True
        assert np.isnan(total) if np.isnan(bad) else total == np.inf
        arrays[3][1234] = 0.5
    with pytest.raises(ValueError):
        _kernels.norms(*pairs, -1.0, f64)


def documented_order_sum(terms, block=4096, lanes=32):
    """fo_norm's sum as fastopt.h documents it: per block of `block` elements, element i goes to
    partial sum i % lanes (each added up in element order), the partial sums combined pairwise,
    the blocks' sums added in order."""
    total = 0.0
    for at in range(0, len(terms), block):
        part = terms[at:at + block]
        padded = np.zeros(-(-len(part) // lanes) * lanes)
        padded[:len(part)] = part  # (zeros added at the end change no partial sum)
        acc = list(np.cumsum(padded.reshape(-1, lanes), axis=0)[-1])  # (cumsum adds in order)
        width = lanes // 2
        while width >= 1:
            for j in range(width):
                acc[j] += acc[j + width]
            width //= 2
        total += acc[0]
    return total


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_reduction_pass_adds_in_its_documented_order(dtype, threads, rng):
    """Bit for bit: the pass reads blocks several at a time, side by side, and must still add
    every block's terms in the one documented order (sizes: within a block, several groups of
    blocks and a short last block, and over the threads' threshold)."""
    sizes = (5000, 4 * 4096, 4 * 4096 * 3 + 4096 * 2 + 77, 300_001)
    arrays = [(rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(dtype) for n in sizes]
    pairs = [a.ctypes.data for a in arrays], [a.size for a in arrays]
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(threads)
        for p, term in [(2.0, lambda a: a * a), (1.0, np.abs)]:
            sums, total, _ = _kernels.norms(*pairs, p, dtype == np.float64)
            expected = [documented_order_sum(term(a.astype(np.float64))) for a in arrays]
            assert sums == expected
            running = 0.0
            for e in expected:
                running += e
            assert total == running
    finally:
        fastopt.set_num_threads(before)


@pytest.mark.parametrize("kwargs", [
    dict(grad_scale=0.0), dict(grad_scale=-2.0), dict(grad_scale=np.nan), dict(grad_scale=np.inf),
    dict(grad_scale="2"), dict(grad_scale=True), dict(clip_norm=-1.0), dict(clip_norm=np.nan),
    dict(clip_norm="1"), dict(skip_nonfinite=1), dict(compute_norm=None)])
def test_invalid_options_change_nothing(kwargs, rng):
    params = [rng.standard_normal(s) for s in SHAPES]
    opt = fastopt.Adam(params)
    grads = [rng.standard_normal(s) for s in SHAPES]
    opt.step(grads)
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.step(grads, **kwargs)
    assert_same(before, opt)


def test_options_on_a_mixed_dtype_optimizer_with_groups(rng):
    p32 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    p64 = [rng.standard_normal(s) for s in SHAPES]
    opt = fastopt.SGD([{"params": p32}, {"params": p64, "lr": 0.05}], lr=0.1)
    ref = [p.astype(np.float64) for p in p32 + p64]
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in p32 + p64]
        norm = ref_norm(grads) / 2.0
        result = opt.step(grads, grad_scale=2.0, clip_norm=1.0)
        assert result.total_norm == pytest.approx(norm, rel=1e-12)
        factor = min(1.0, 1.0 / (norm + 1e-6))
        for k, g in enumerate(grads):
            ref[k] = ref[k] - (0.1 if k < 3 else 0.05) * g.astype(np.float64) / 2.0 * factor
    for p, r in zip(p32 + p64, ref):
        np.testing.assert_allclose(p, r, rtol=1e-5 if p.dtype == np.float32 else 1e-12, atol=1e-6)


def test_ema_checkpoints_threads_and_errors(rng, tmp_path):
    shapes = [(150_000,), (9,)]  # the large one is split across threads
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    results = []
    before = fastopt.get_num_threads()
    try:
        for threads in (1, 2):
            fastopt.set_num_threads(threads)
            opt = fastopt.AdamW([p.copy() for p in params], lr=0.01, ema_decay=0.9)
            assert [e.tobytes() for e in opt.ema_arrays()] == [p.tobytes() for p in params]
            for _ in range(3):
                opt.step(grads)
            results.append([e.copy() for e in opt.ema_arrays()])
    finally:
        fastopt.set_num_threads(before)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()
    opt.save(tmp_path / "ckpt.npz")
    other = fastopt.AdamW([p.copy() for p in opt.params], lr=0.01, ema_decay=0.9)
    other.load(tmp_path / "ckpt.npz")
    for a, b in zip(opt.ema_arrays(), other.ema_arrays()):
        assert a.tobytes() == b.tobytes()
    opt.step(grads)
    other.step(grads)
    for a, b in zip(opt.ema_arrays() + opt.params, other.ema_arrays() + other.params):
        assert a.tobytes() == b.tobytes()
    # a replaced ema buffer is taken (the plan notices)
    opt.state[1].ema = np.zeros(9, np.float32)
    opt.step(grads)
    np.testing.assert_allclose(opt.ema_arrays()[1], 0.1 * opt.params[1], rtol=1e-6)
    for bad, error in [(1.5, ValueError), (-0.1, ValueError), ("0.9", TypeError), (np.nan, ValueError)]:
        with pytest.raises(error):
            fastopt.SGD(params, ema_decay=bad)
    with pytest.raises(ValueError):
        fastopt.SGD(params).ema_arrays()


@pytest.mark.parametrize("value", [-1.0, 0.0, math.inf, math.nan])
def test_grad_scale_refusal_says_greater_than_zero(value):
    opt = fastopt.Adam([np.ones(3)])
    with pytest.raises(ValueError, match=r"grad_scale must be finite and > 0"):
        opt.step([np.ones(3)], grad_scale=value)
