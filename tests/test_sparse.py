"""Sparse rows (fastopt.SparseGrad): every rule x dtype against the float64 reference applied to
the touched rows only, duplicates and unsorted indices, rows skipped for several steps; the same
bits for any thread count or interleaving of duplicates; bad input refused with nothing changed."""
from pathlib import Path

import numpy as np
import pytest

import fastopt
import reference
from conftest import CASES, assert_same_snapshot, case_id, snapshot
from test_rules import reference_kwargs, reference_name

# LAMB, LARS, Adafactor: norms over whole tensors, no rows
CASES = [c for c in CASES if c[0].rule.rows]

SHAPES = [(12, 5), (9,), (6, 2, 3)]  # rows of 5, of one element, of 2 x 3
STEPS = 50


def draw_rows(rng, n_rows, index_dtype):
    """Some rows (each touched with probability 0.3, so rows sit out several steps in a row),
    listed in random order with duplicates; values for each listed row."""
    touched = np.flatnonzero(rng.random(n_rows) < 0.3)
    if len(touched) == 0:
        return np.zeros(0, dtype=index_dtype)
    extra = rng.choice(touched, size=rng.integers(0, 2 * len(touched) + 1))
    indices = np.concatenate([touched, extra])
    rng.shuffle(indices)
    return indices.astype(index_dtype)


def lazy_reference(ref_fn, theta, indices, values, row_states, step, hp):
    """The reference's dense update of each touched row alone, with the sum of its gradient
    rows; the step count t is the parameter's (it advances every step)."""
    for r in np.unique(indices):
        g = values[indices == r].astype(np.float64).sum(axis=0)
        s = row_states.setdefault(int(r), {})
        s["t"] = step
        # the row as a tensor of one row (a row rule's reference reduces along it)
        theta[r:r + 1] = ref_fn(theta[r:r + 1], g[None], s, **hp)


def run_both(cls, hp, dtype, index_dtype, rng):
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [p.copy() for p in init]
    opt = cls(params, **hp)
    assert opt.sparse == "lazy"
    ref_fn = reference.RULES[reference_name(cls)]
    ref_hp = reference_kwargs({k: v for k, v in opt.param_groups[0].items()
                               if k != "params" and k not in cls.rule.fixed})
    ref_params = [p.astype(np.float64) for p in init]
    ref_states = [{} for _ in init]
    skipped = [np.zeros(s[0], dtype=int) for s in SHAPES]
    longest_skip = 0
    for step in range(STEPS):
        grads = []
        for k, shape in enumerate(SHAPES):
            indices = draw_rows(rng, shape[0], index_dtype)
            values = rng.standard_normal((len(indices),) + shape[1:]).astype(dtype)
            grads.append(fastopt.SparseGrad(indices, values))
            lazy_reference(ref_fn, ref_params[k], indices, values, ref_states[k], step, ref_hp)
            hit = np.zeros(shape[0], dtype=bool)
            hit[indices] = True
            skipped[k] = np.where(hit, 0, skipped[k] + 1)
            longest_skip = max(longest_skip, skipped[k].max())
        before = [p.copy() for p in params]
        opt.step(grads)
        for k in range(len(SHAPES)):
            untouched = np.setdiff1d(np.arange(SHAPES[k][0]), grads[k].indices)
            np.testing.assert_array_equal(params[k][untouched], before[k][untouched])
    assert longest_skip >= 4  # the run did skip rows for several steps
    assert all(s.step == STEPS for s in opt.state.values())
    return params, ref_params, init


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lazy_float64_matches_reference_on_touched_rows(case, index_dtype, rng):
    params, ref_params, init = run_both(*case, np.float64, index_dtype, rng)
    for p, r, p0 in zip(params, ref_params, init):
        np.testing.assert_allclose(p, r, rtol=1e-12, atol=1e-12)
        assert not np.array_equal(p, p0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lazy_float32_matches_reference_within_rounding(case, rng):
    params, ref_params, init = run_both(*case, np.float32, np.int64, rng)
    for p, r, p0 in zip(params, ref_params, init):
        moved, ref_moved = p.astype(np.float64) - p0, r - p0
        scale = np.abs(ref_moved).max()
        assert scale > 0
        np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=2e-4 * scale + 2e-6)


def test_untouched_rows_and_their_state_are_not_written(rng):
    p = rng.standard_normal((8, 3))
    opt = fastopt.Adam([p], lr=0.1)
    opt.step([rng.standard_normal((8, 3))])  # a dense step first: every row has state
    before = snapshot(opt)
    opt.step([fastopt.SparseGrad(np.array([5, 2, 5]), rng.standard_normal((3, 3)))])
    rest = [0, 1, 3, 4, 6, 7]
    np.testing.assert_array_equal(p[rest], before[0][0][rest])
    for name in ("m", "v"):
        np.testing.assert_array_equal(opt.state[0].to_dict()[name][rest], before[1][0][name][rest])
        assert not np.array_equal(opt.state[0].to_dict()[name][[2, 5]], before[1][0][name][[2, 5]])
    assert opt.state[0].step == 2


def test_sparse_and_dense_grads_mix_in_one_step(rng):
    a, b = rng.standard_normal((10, 4)), rng.standard_normal(7)
    a2, b2 = a.copy(), b.copy()
    opt, ref = fastopt.Adagrad([a, b], lr=0.1), fastopt.Adagrad([a2, b2], lr=0.1)
    for _ in range(5):
        indices = np.arange(10)[::-1].copy()  # every row once: equals the dense step
        values = rng.standard_normal((10, 4))
        gb = rng.standard_normal(7)
        opt.step([fastopt.SparseGrad(indices, values), gb])
        ref.step([values[::-1].copy(), gb])
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def _big_run(threads, order_seed):
    """A step large enough to be split across threads (touched elements and summed rows both
    over the engine's threshold); the duplicates interleaved as order_seed says."""
    rng = np.random.default_rng(7)
    p = rng.standard_normal((4096, 96)).astype(np.float32)
    indices = rng.integers(0, 4096, size=9000)
    values = rng.standard_normal((9000, 96)).astype(np.float32)
    # reorder the list while keeping each row's own duplicates in their order
    key = np.random.default_rng(order_seed).random(9000)
    first = {}
    for j, r in enumerate(indices):
        first.setdefault(r, key[j])
    order = np.lexsort((np.arange(9000), np.array([first[r] for r in indices])))
    opt = fastopt.Adam([p], lr=0.01)
    previous = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        for _ in range(3):
            opt.step([fastopt.SparseGrad(indices[order], values[order])])
    finally:
        fastopt.set_num_threads(previous)
    return p


def test_same_bits_for_any_thread_count_and_interleaving():
    one = _big_run(1, 0)
    for threads, order_seed in [(2, 0), (8, 0), (2, 1), (8, 2)]:
        np.testing.assert_array_equal(_big_run(threads, order_seed), one)


def _bad_grads(rng):
    p = (12, 5)
    good_idx = np.array([1, 3, 3])
    good_val = rng.standard_normal((3, 5))
    return [
        (fastopt.SparseGrad(np.array([1, 12]), good_val[:2]), ValueError, "out of range"),
        (fastopt.SparseGrad(np.array([-1, 2]), good_val[:2]), ValueError, "negative"),
        (fastopt.SparseGrad(good_idx.astype(np.int16), good_val), TypeError, "int32 or int64"),
        (fastopt.SparseGrad(good_idx.astype(np.float64), good_val), TypeError, "int32 or int64"),
        (fastopt.SparseGrad(good_idx.reshape(3, 1), good_val), ValueError, "1-D"),
        (fastopt.SparseGrad(good_idx, good_val[:2]), ValueError, "shape"),
        (fastopt.SparseGrad(good_idx, rng.standard_normal((3, 4))), ValueError, "shape"),
        (fastopt.SparseGrad(good_idx, good_val.astype(np.float32)), TypeError, "dtype"),
        (fastopt.SparseGrad(good_idx, np.asfortranarray(rng.standard_normal((3, 5, 1)))[..., 0]),
         ValueError, "C-contiguous"),
    ], p


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "planned"])
def test_bad_rows_are_refused_with_nothing_changed(warm, rng):
    bad, shape = _bad_grads(rng)
    for grad, error, match in bad:
        a, b = rng.standard_normal(shape), rng.standard_normal(shape)
        opt = fastopt.Adam([a, b], lr=0.1)
        if warm:
            opt.step([fastopt.SparseGrad(np.array([0]), rng.standard_normal((1, 5))),
                      rng.standard_normal(shape)])
        before = snapshot(opt)
        good = fastopt.SparseGrad(np.array([2, 0]), rng.standard_normal((2, 5)))
        with pytest.raises(error, match=match):
            opt.step([good, grad])
        assert_same_snapshot(before, snapshot(opt))


def test_scalar_parameter_and_overlap_are_refused(rng):
    opt = fastopt.SGD([np.zeros(())], lr=0.1)
    with pytest.raises(ValueError, match="ndim >= 1"):
        opt.step([fastopt.SparseGrad(np.array([0]), np.ones((1,)))])
    p = rng.standard_normal((4, 2))
    opt = fastopt.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="overlaps"):
        opt.step([fastopt.SparseGrad(np.array([0]), p[:1])])
    with pytest.raises(TypeError, match="numpy arrays"):
        fastopt.SparseGrad([0], np.ones((1, 2)))


def test_sparse_mode_is_checked():
    with pytest.raises(ValueError, match="sparse"):
        fastopt.Adam([np.zeros(3)], sparse="eager")
    with pytest.raises(ValueError, match="sparse"):
        fastopt.SGD([{"params": [np.zeros(3)], "sparse": "dense"}])


def test_empty_and_zero_width_rows(rng):
    p = rng.standard_normal((5, 3))
    before = p.copy()
    opt = fastopt.Adam([p, np.zeros((4, 0))], lr=0.1)
    opt.step([fastopt.SparseGrad(np.zeros(0, np.int64), np.zeros((0, 3))),
              fastopt.SparseGrad(np.array([3, 1]), np.zeros((2, 0)))])
    np.testing.assert_array_equal(p, before)
    assert opt.state[0].step == 1


@pytest.mark.parametrize("cls, hp", [(fastopt.LAMB, {}), (fastopt.LARS, dict(lr=0.1)),
                                     (fastopt.Adafactor, {})])
def test_rules_with_per_tensor_norms_refuse_rows(cls, hp, rng):
    opt = cls([rng.standard_normal((4, 3))], **hp)
    opt.step([rng.standard_normal((4, 3))])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step([fastopt.SparseGrad(np.array([1]), rng.standard_normal((1, 3)))])
    assert_same_snapshot(before, snapshot(opt))


def test_readme_names_the_error_rules_with_per_tensor_norms_raise():
    # the README's "Sparse rows" promise and the test above must name the same exception
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    claim = " ".join(readme[readme.index("(LAMB, LARS and Adafactor"):].split(")", 1)[0].split())
    assert "refuse it with a `TypeError`" in claim, claim



@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "planned"])
def test_grad_scale_unscales_rows_as_a_dense_step(warm, rng):
    """Rows scaled by s, stepped with grad_scale=s: the dense step of the same scaled gradient
    with grad_scale=s, and of the unscaled one (s a power of two: the same bits).  Every row
    is touched (duplicates among them), so the lazy step is the dense step."""
    init = rng.standard_normal((6, 3))
    p, q, r = init.copy(), init.copy(), init.copy()
    opt, scaled, plain = (fastopt.Adam([x], lr=0.1, weight_decay=0.01, ema_decay=0.9)
                          for x in (p, q, r))
    s = 1024.0
    for _ in range(3 if warm else 1):
        indices = np.concatenate([rng.permutation(6), rng.integers(0, 6, 4)])
        values = rng.standard_normal((len(indices), 3))
        dense = np.zeros((6, 3))
        np.add.at(dense, indices, values * s)
        result = opt.step([fastopt.SparseGrad(indices, values * s)], grad_scale=s)
        assert result.total_norm is None and not result.skipped
        scaled.step([dense], grad_scale=s)
        plain.step([dense / s])
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(p, r)
        np.testing.assert_array_equal(opt.state[0].ema, scaled.state[0].ema)


@pytest.mark.parametrize("sparse", ["lazy", "exact"])
def test_grad_scale_unscales_rows_that_skip_steps(sparse, rng):
    """Some rows touched: grad_scale=s on rows scaled by s is the step of the unscaled rows."""
    init = rng.standard_normal((8, 2))
    p, q = init.copy(), init.copy()
    opt, ref = (fastopt.SGD([x], lr=0.1, momentum=0.9, weight_decay=0.1, sparse=sparse)
                for x in (p, q))
    for _ in range(4):
        indices = draw_rows(rng, 8, np.int32)
        values = rng.standard_normal((len(indices), 2))
        opt.step([fastopt.SparseGrad(indices, values * 8.0)], grad_scale=8.0)
        ref.step([fastopt.SparseGrad(indices, values)])
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(opt.state[0].momentum_buffer, ref.state[0].momentum_buffer)


@pytest.mark.parametrize("option", [dict(clip_norm=1.0), dict(skip_nonfinite=True),
                                    dict(compute_norm=True)], ids=str)
@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "planned"])
def test_norm_options_refuse_rows(option, warm, rng):
    p = rng.standard_normal((4, 2))
    opt = fastopt.Adam([p], lr=0.1)
    g = fastopt.SparseGrad(np.array([1, 3]), rng.standard_normal((2, 2)))
    if warm:
        opt.step([g])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="need dense gradients.*grad_scale works"):
        opt.step([g], **option)
    assert_same_snapshot(before, snapshot(opt))

# ---- sparse="exact": the steps a row missed, caught up in closed form ---------------------------

# (class, hyperparameters): the rules and options whose exact run is the dense run with zero
# gradients on untouched rows (README, "Sparse rows", the table)
EXACT_CASES = [
    (fastopt.SGD, dict(lr=0.1)),
    (fastopt.SGD, dict(lr=0.1, weight_decay=0.05)),
    (fastopt.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
    (fastopt.Momentum, dict(lr=0.05)),
    (fastopt.Momentum, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    (fastopt.NAG, dict(lr=0.05)),
    (fastopt.NAG, dict(lr=0.05, weight_decay=0.1)),
    (fastopt.Adagrad, dict(lr=0.1)),
    (fastopt.Adadelta, dict(lr=1.0, rho=0.8)),
    (fastopt.RMSprop, dict(lr=0.01, rho=0.8, momentum=0.9, centered=True)),
]


def exact_run(cls, hp, dtype, rng, steps=STEPS, dense_every=0):
    """fastopt with sparse="exact" and the float64 reference run densely, every untouched row
    with a zero gradient, on the same numbers.  After each step the touched rows are up to
    date: compared there (rows a step skipped are compared when touched again).  Yields
    (fastopt params, reference params, reference states, touched rows) per step."""
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [p.copy() for p in init]
    opt = cls(params, sparse="exact", **hp)
    ref_fn = reference.RULES[reference_name(cls)]
    ref_hp = reference_kwargs({k: v for k, v in opt.param_groups[0].items()
                               if k not in ("params", "sparse")})
    ref_params = [p.astype(np.float64) for p in init]
    ref_states = [{} for _ in init]
    longest_skip, skipped = 0, [np.zeros(s[0], dtype=int) for s in SHAPES]
    for step in range(steps):
        grads, touched = [], []
        for k, shape in enumerate(SHAPES):
            if dense_every and step % dense_every == dense_every - 1:
                dense = rng.standard_normal(shape).astype(dtype)
                grads.append(dense)
                touched.append(np.arange(shape[0]))
            else:
                indices = draw_rows(rng, shape[0], np.int64)
                values = rng.standard_normal((len(indices),) + shape[1:]).astype(dtype)
                grads.append(fastopt.SparseGrad(indices, values))
                touched.append(np.unique(indices))
                dense = np.zeros(shape)
                np.add.at(dense, indices, values.astype(np.float64))
            ref_params[k] = ref_fn(ref_params[k], dense.astype(np.float64), ref_states[k], **ref_hp)
            hit = np.zeros(shape[0], dtype=bool)
            hit[touched[k]] = True
            skipped[k] = np.where(hit, 0, skipped[k] + 1)
            longest_skip = max(longest_skip, skipped[k].max())
        opt.step(grads)
        yield opt, params, ref_params, ref_states, touched
    assert longest_skip >= 4


@pytest.mark.parametrize("cls, hp", EXACT_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_exact_equals_dense_run_with_zero_gradients(cls, hp, rng):
    for opt, params, ref, ref_states, touched in exact_run(cls, hp, np.float64, rng):
        for k in range(len(SHAPES)):
            np.testing.assert_allclose(params[k][touched[k]], ref[k][touched[k]],
                                       rtol=1e-10, atol=1e-12)
    # a dense zero gradient brings every row up to date
    opt.step([np.zeros(s) for s in SHAPES])
    ref_fn = reference.RULES[reference_name(cls)]
    ref_hp = reference_kwargs({k: v for k, v in opt.param_groups[0].items()
                               if k not in ("params", "sparse")})
    for k, shape in enumerate(SHAPES):
        ref[k] = ref_fn(ref[k], np.zeros(shape), ref_states[k], **ref_hp)
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-10, atol=1e-12)
    assert all((s.row_step == STEPS + 1).all() for s in opt.state.values())


@pytest.mark.parametrize("cls, hp", EXACT_CASES[2:5], ids=lambda x: getattr(x, "__name__", str(x)))
def test_exact_float32_and_dense_steps_between(cls, hp, rng):
    for _, params, ref, _, touched in exact_run(cls, hp, np.float32, rng, dense_every=7):
        for k in range(len(SHAPES)):
            np.testing.assert_allclose(params[k][touched[k]], ref[k][touched[k]],
                                       rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("cls, hp", [(fastopt.Adam, dict(lr=0.01)),
                                     (fastopt.Adam, dict(lr=0.01, amsgrad=True)),
                                     (fastopt.AdamW, dict(lr=0.01, weight_decay=0.1))])
def test_exact_adam_decays_its_averages(cls, hp, rng):
    """Adam's exact: m and v of a touched row are the dense run's (decayed by beta1^k, beta2^k
    for the k steps it missed); its parameter is not (the missed steps' moves are left out)."""
    differs = False
    for opt, params, ref, ref_states, touched in exact_run(cls, hp, np.float64, rng):
        for k in range(len(SHAPES)):
            rows, state = touched[k], opt.state[k]
            np.testing.assert_allclose(state.m[rows], ref_states[k]["m"][rows], rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(state.v[rows], ref_states[k]["v"][rows], rtol=1e-10, atol=1e-14)
            differs |= not np.allclose(params[k][rows], ref[k][rows], rtol=1e-10)
    assert differs  # the claim is about m and v only


def test_exact_adamw_decay_compounds(rng):
    """With zero gradients everywhere AdamW's exact run only decays: theta (1 - lr wd)^k."""
    p = rng.standard_normal((6, 3))
    init = p.copy()
    opt = fastopt.AdamW([p], lr=0.1, weight_decay=0.2, sparse="exact")
    for _ in range(9):
        opt.step([fastopt.SparseGrad(np.array([0]), np.zeros((1, 3)))])
    opt.step([fastopt.SparseGrad(np.array([4]), np.zeros((1, 3)))])
    np.testing.assert_allclose(p[4], init[4] * (1 - 0.1 * 0.2) ** 10, rtol=1e-13)
    np.testing.assert_array_equal(p[1], init[1])  # not touched: not caught up yet
    assert list(opt.state[0].row_step) == [9, 0, 0, 0, 10, 0]


@pytest.mark.parametrize("cls, hp, named", [
    (fastopt.Adam, dict(weight_decay=0.1), "weight_decay"),
    (fastopt.RMSprop, dict(lr=0.01, weight_decay=0.1), "weight_decay"),
    (fastopt.Adagrad, dict(weight_decay=0.1), "weight_decay"),
    (fastopt.Adadelta, dict(weight_decay=0.1), "weight_decay"),
    (fastopt.AdaMax, {}, "AdaMax"), (fastopt.Nadam, {}, "Nadam"), (fastopt.RAdam, {}, "RAdam"),
    (fastopt.Lion, dict(lr=1e-4), "Lion"), (fastopt.Rprop, {}, "Rprop"),
    (fastopt.ASGD, {}, "ASGD"), (fastopt.LAMB, {}, "LAMB"), (fastopt.Adafactor, {}, "Adafactor")])
def test_exact_without_closed_form_is_refused(cls, hp, named):
    with pytest.raises(ValueError, match=named):
        cls([np.zeros((3, 2))], sparse="exact", **hp)
    with pytest.raises(ValueError, match=named):
        cls([{"params": [np.zeros((3, 2))], "sparse": "exact"}], **hp)


def test_exact_param_group_and_mode_change(rng):
    a, b = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    a0, b0 = a.copy(), b.copy()
    opt = fastopt.SGD([{"params": [a], "sparse": "exact"}, {"params": [b]}], lr=0.1,
                      weight_decay=0.5)
    g = fastopt.SparseGrad(np.array([0]), np.zeros((1, 2)))
    for _ in range(3):
        opt.step([g, g])
    opt.step([fastopt.SparseGrad(np.array([1]), np.zeros((1, 2)))] * 2)
    np.testing.assert_allclose(a[1], a0[1] * 0.95 ** 4, rtol=1e-14)  # caught up
    np.testing.assert_allclose(b[1], b0[1] * 0.95, rtol=1e-14)       # lazy
    assert opt.state[1].row_step is None
    opt.param_groups[0]["weight_decay"] = 0.1  # the catch-up uses the current values
    opt.param_groups[1]["sparse"] = "exact"
    opt.step([fastopt.SparseGrad(np.array([2]), np.zeros((1, 2)))] * 2)
    np.testing.assert_allclose(a[2], a0[2] * 0.99 ** 5, rtol=1e-14)
    assert list(opt.state[1].row_step) == [4, 4, 5, 4, 4]



@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_exact_after_lazy_steps_catches_up_only_what_rows_missed(index_dtype):
    """row_step is the step that last updated a row, in lazy steps too: a group switched to
    "lazy" and back to "exact" catches a row up through the steps it missed, not through the
    lazy steps it took (SGD, weight decay: a zero-gradient step multiplies a row by 0.95)."""
    p = np.ones((4, 2))
    opt = fastopt.SGD([p], lr=0.1, weight_decay=0.5, sparse="exact")

    def rows(*r):
        return fastopt.SparseGrad(np.array(r, dtype=index_dtype), np.zeros((len(r), 2)))

    for _ in range(2):
        opt.step([rows(0)])                          # steps 1, 2
    opt.param_groups[0]["sparse"] = "lazy"
    for _ in range(3):                               # steps 3-5 (the first builds a plan,
        opt.step([rows(0, 0)])                       # the others run it)
    np.testing.assert_array_equal(opt.state[0].row_step, [5, 0, 0, 0])
    opt.param_groups[0]["sparse"] = "exact"
    opt.step([rows(0, 2)])                           # step 6
    np.testing.assert_allclose(p[:, 0], [0.95 ** 6, 1, 0.95 ** 6, 1], rtol=1e-14)
    np.testing.assert_array_equal(opt.state[0].row_step, [6, 0, 6, 0])
    # dense steps while lazy update every row: an exact step then catches up the steps after
    opt.param_groups[0]["sparse"] = "lazy"
    for _ in range(2):
        opt.step([np.zeros((4, 2))])                 # steps 7, 8: every row decays, no catch-up
    opt.step([rows(3)])                              # step 9
    np.testing.assert_array_equal(opt.state[0].row_step, [8, 8, 8, 9])
    opt.param_groups[0]["sparse"] = "exact"
    opt.step([rows(1, 3)])                           # step 10
    np.testing.assert_allclose(p[:, 0], [0.95 ** 8, 0.95 ** 4, 0.95 ** 8, 0.95 ** 4], rtol=1e-14)
    np.testing.assert_array_equal(opt.state[0].row_step, [8, 10, 8, 10])


def test_lazy_steps_keep_row_step_in_a_group_beside_an_exact_one(rng):
    """Two groups, one switched to lazy: its row_step follows its lazy steps (planned or not),
    the exact group's is the C call's; a row untouched while lazy still lags from there."""
    a, b = np.ones((5, 3)), np.ones((5, 3))
    opt = fastopt.Momentum([{"params": [a]}, {"params": [b]}], lr=0.1, weight_decay=0.2,
                           sparse="exact")
    g = fastopt.SparseGrad(np.array([1, 4, 1]), rng.standard_normal((3, 3)))
    opt.step([g, g])
    opt.param_groups[1]["sparse"] = "lazy"
    for _ in range(3):
        opt.step([g, fastopt.SparseGrad(np.array([2]), rng.standard_normal((1, 3)))])
    np.testing.assert_array_equal(opt.state[0].row_step, [0, 4, 0, 0, 4])
    np.testing.assert_array_equal(opt.state[1].row_step, [0, 1, 4, 0, 1])
    opt.step([g, np.zeros((5, 3))])
    np.testing.assert_array_equal(opt.state[1].row_step, [5] * 5)

def test_exact_row_step_in_checkpoints_and_checked(rng, tmp_path):
    p = rng.standard_normal((4, 3))
    opt = fastopt.Momentum([p], lr=0.1, sparse="exact")
    for r in (0, 1, 1):
        opt.step([fastopt.SparseGrad(np.array([r]), rng.standard_normal((1, 3)))])
    opt.save(tmp_path / "c.npz")
    q = p.copy()
    other = fastopt.Momentum([q], lr=0.1, sparse="exact")
    other.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(other.state[0].row_step, [1, 3, 0, 0])
    g = fastopt.SparseGrad(np.array([0, 2]), rng.standard_normal((2, 3)))
    opt.step([g])
    other.step([g])
    np.testing.assert_array_equal(p, q)
    d = opt.state_dict()
    for bad, error in [(np.array([0, 1, 9, 0]), ValueError), (np.zeros(3, np.int64), ValueError),
                       (np.zeros(4, np.int32), TypeError)]:
        d["state"][0]["row_step"] = bad.astype(np.int64) if error is ValueError else bad
        before = snapshot(other)
        with pytest.raises(error, match="row_step"):
            other.load_state_dict(d)
        assert_same_snapshot(before, snapshot(other))
    opt.state[0].row_step = np.full(4, 99, np.int64)  # beyond the step count
    before = snapshot(opt)
    with pytest.raises(ValueError, match="row_step"):
        opt.step([g])
    assert_same_snapshot(before, snapshot(opt))


def _big_exact_run(threads):
    """Exact catch-ups over more elements than one thread takes, rows of different lags."""
    rng = np.random.default_rng(11)
    p = rng.standard_normal((3000, 64))
    opt = fastopt.Momentum([p], lr=0.01, weight_decay=0.01, sparse="exact")
    previous = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        for step in range(4):
            indices = rng.integers(0, 3000, size=2500 if step < 3 else 6000)
            opt.step([fastopt.SparseGrad(indices, rng.standard_normal((len(indices), 64)))])
    finally:
        fastopt.set_num_threads(previous)
    return p, opt.state[0].momentum_buffer


def test_exact_same_bits_for_any_thread_count():
    p1, b1 = _big_exact_run(1)
    for threads in (2, 8):
        p, b = _big_exact_run(threads)
        np.testing.assert_array_equal(p, p1)
        np.testing.assert_array_equal(b, b1)


def test_exact_refuses_a_changed_value_without_closed_form(rng):
    a, b = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    opt = fastopt.RMSprop([{"params": [a]}, {"params": [b], "sparse": "exact"}], lr=0.01)
    g = [fastopt.SparseGrad(np.array([1]), rng.standard_normal((1, 2)))] * 2
    opt.step(g)
    opt.step(g)  # planned
    opt.param_groups[1]["weight_decay"] = 0.1
    before = snapshot(opt)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step(g)
    assert_same_snapshot(before, snapshot(opt))
    opt.param_groups[1]["sparse"] = "lazy"
    opt.step(g)
    assert opt.state[1].step == 3


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "planned"])
def test_exact_gradient_overlapping_row_step_is_refused(warm, rng):
    p = rng.standard_normal((4, 2))
    opt = fastopt.SGD([p], lr=0.1, sparse="exact")
    opt.step([fastopt.SparseGrad(np.array([0]), rng.standard_normal((1, 2)))])
    if warm:
        opt.step([fastopt.SparseGrad(np.array([1]), rng.standard_normal((1, 2)))])
    before = snapshot(opt)
    values = opt.state[0].row_step.view(np.float64).reshape(2, 2)
    with pytest.raises(ValueError, match="overlap"):
        opt.step([fastopt.SparseGrad(np.array([2, 3]), values)])
    assert_same_snapshot(before, snapshot(opt))
