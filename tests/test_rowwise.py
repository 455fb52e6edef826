"""RowwiseAdagrad (one Adagrad accumulator per row along axis 0) in every API: dense and sparse
rows against the float64 numpy reference (tests/reference.py), sparse="exact", the refusals
(nothing changed), thread counts, checkpoints, EMA, grad_scale and fastopt.torch.  The shared
suites (tests/conftest.py's CASES) run it through every generic check besides."""
import copy

import ml_dtypes
import numpy as np
import pytest

import fastopt
import reference
from fastopt import functional as F
from conftest import assert_same_snapshot, snapshot
from test_sparse import draw_rows

STEPS = 50
DENSE_SHAPES = [(12, 5), (9,), (), (6, 2, 3)]  # rows of 5, of one element, one row, rows of 2x3
SPARSE_SHAPES = [(12, 5), (9,), (6, 2, 3)]     # a 0-d parameter has no rows to index
HPS = [dict(lr=0.05), dict(lr=0.05, weight_decay=0.1, maximize=True),
       dict(lr=0.1, eps=1e-3, maximize=True)]


def ref_step(theta, grad, G, **hp):
    """One step of the reference in float64: returns (theta, G), G one entry per row along
    axis 0 (shape () for a 0-d theta, as the state's)."""
    s = {"G": G.reshape(-1)}
    theta = reference.rowwise_adagrad(theta, grad, s, **hp)
    return theta, s["G"].reshape(G.shape)


def ref_lazy(theta, G, indices, values, hp):
    """Each touched row once, with the sum of its duplicate gradient rows; the rest untouched."""
    for r in np.unique(indices):
        g = values[indices == r].astype(np.float64).sum(axis=0)
        theta[r:r + 1], G[r:r + 1] = ref_step(theta[r:r + 1], g[None], G[r:r + 1], **hp)


def assert_close(got, ref, dtype):
    if dtype == np.float64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    else:
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-5, atol=1e-6)


# ---- numpy optimizer ------------------------------------------------------------------------

def dense_run(rng, dtype, hp, steps=STEPS, ema_decay=None, grad_scale=None):
    """fastopt and the reference on the same dense gradients (fastopt's scaled by grad_scale
    and unscaled by the step): (opt, params, init, reference params, G, reference EMA)."""
    init = [rng.standard_normal(s).astype(dtype) for s in DENSE_SHAPES]
    params = [p.copy() for p in init]
    opt = fastopt.RowwiseAdagrad(params, ema_decay=ema_decay, **hp)
    ref = [p.astype(np.float64) for p in init]
    ema = [p.copy() for p in ref]  # the average starts as the parameter
    G = [np.zeros(s[:1]) for s in DENSE_SHAPES]
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) for s in DENSE_SHAPES]
        if grad_scale is None:
            opt.step(grads)
        else:
            opt.step([np.asarray(g * grad_scale) for g in grads], grad_scale=grad_scale)
        for k in range(len(ref)):
            ref[k], G[k] = ref_step(ref[k], grads[k].astype(np.float64), G[k], **hp)
            if ema_decay is not None:
                ema[k] = ema_decay * ema[k] + (1 - ema_decay) * ref[k]
    return opt, params, init, ref, G, ema


@pytest.mark.parametrize("hp", HPS, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_matches_reference(hp, dtype, rng):
    opt, params, init, ref, G, _ = dense_run(rng, dtype, hp)
    for k, shape in enumerate(DENSE_SHAPES):
        state = opt.state[k]
        assert state.sum.shape == shape[:1] and state.sum.dtype == dtype
        assert state.step == STEPS
        assert_close(params[k], ref[k], dtype)
        assert_close(state.sum, G[k], dtype)
        assert not np.array_equal(params[k], init[k])
    assert opt.state[0].sum.nbytes == 12 * np.dtype(dtype).itemsize  # one value per row


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("hp", HPS, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparse_lazy_matches_reference(hp, dtype, index_dtype, rng):
    """Sparse rows of three parameters and a dense 0-d one in the same steps; untouched rows and
    their accumulators are not written at all."""
    shapes = SPARSE_SHAPES + [()]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    params = [p.copy() for p in init]
    opt = fastopt.RowwiseAdagrad(params, **hp)
    assert opt.sparse == "lazy"
    ref = [p.astype(np.float64) for p in init]
    G = [np.zeros(s[:1]) for s in shapes]
    skipped = [np.zeros(s[0], int) for s in SPARSE_SHAPES]
    longest_skip = 0
    for step in range(STEPS):
        grads = []
        for k, shape in enumerate(SPARSE_SHAPES):
            indices = draw_rows(rng, shape[0], index_dtype)
            values = rng.standard_normal((len(indices),) + shape[1:]).astype(dtype)
            grads.append(fastopt.SparseGrad(indices, values))
            ref_lazy(ref[k], G[k], indices, values, hp)
            skipped[k] = np.where(np.isin(np.arange(shape[0]), indices), 0, skipped[k] + 1)
            longest_skip = max(longest_skip, skipped[k].max())
        grads.append(np.asarray(rng.standard_normal(), dtype=dtype))
        ref[-1], G[-1] = ref_step(ref[-1], grads[-1].astype(np.float64), G[-1], **hp)
        before = [(params[k].copy(), opt.state[k].sum.copy() if k in opt.state else
                   np.zeros(s[:1], dtype)) for k, s in enumerate(SPARSE_SHAPES)]
        opt.step(grads)
        for k, (p0, G0) in enumerate(before):
            untouched = np.setdiff1d(np.arange(SPARSE_SHAPES[k][0]), grads[k].indices)
            np.testing.assert_array_equal(params[k][untouched], p0[untouched])
            np.testing.assert_array_equal(opt.state[k].sum[untouched], G0[untouched])
    assert longest_skip >= 4  # the run did skip rows for several steps
    for k, shape in enumerate(shapes):
        assert opt.state[k].step == STEPS and opt.state[k].sum.shape == shape[:1]
        assert_close(params[k], ref[k], dtype)
        assert_close(opt.state[k].sum, G[k], dtype)


@pytest.mark.parametrize("maximize", [False, True])
def test_exact_without_weight_decay_is_lazy(maximize, rng):
    """A missed step with zero gradient moves nothing: exact is the lazy run, bit for bit."""
    init = [rng.standard_normal(s).astype(np.float32) for s in SPARSE_SHAPES]
    lazy, exact = [p.copy() for p in init], [p.copy() for p in init]
    opt_lazy = fastopt.RowwiseAdagrad(lazy, lr=0.05, maximize=maximize)
    opt_exact = fastopt.RowwiseAdagrad(exact, lr=0.05, maximize=maximize, sparse="exact")
    for _ in range(STEPS):
        grads = []
        for shape in SPARSE_SHAPES:
            indices = draw_rows(rng, shape[0], np.int64)
            grads.append(fastopt.SparseGrad(indices, rng.standard_normal(
                (len(indices),) + shape[1:]).astype(np.float32)))
        opt_lazy.step(grads)
        opt_exact.step(grads)
    for k in range(len(init)):
        np.testing.assert_array_equal(exact[k], lazy[k])
        np.testing.assert_array_equal(opt_exact.state[k].sum, opt_lazy.state[k].sum)


def test_exact_with_weight_decay_is_refused(rng):
    with pytest.raises(ValueError, match="weight_decay"):
        opt = fastopt.RowwiseAdagrad([np.zeros((3, 2))], weight_decay=0.1, sparse="exact")
        opt.step([fastopt.SparseGrad(np.array([1]), np.ones((1, 2)))])
    with pytest.raises(ValueError, match="weight_decay"):
        fastopt.RowwiseAdagrad([{"params": [np.zeros((3, 2))], "sparse": "exact"}],
                               weight_decay=0.1)
    # set on a running optimizer: refused at the step, nothing changed
    opt = fastopt.RowwiseAdagrad([rng.standard_normal((4, 2))], sparse="exact")
    g = [fastopt.SparseGrad(np.array([1, 3, 1]), rng.standard_normal((3, 2)))]
    opt.step(g)
    opt.param_groups[0]["weight_decay"] = 0.1
    before = snapshot(opt)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step(g)
    assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_functional_matches_reference(dtype, rng):
    for shape in DENSE_SHAPES:
        param = rng.standard_normal(shape).astype(dtype)
        state = fastopt.RowwiseAdagradState.new(param)
        assert state.sum.shape == shape[:1] and state.sum.dtype == dtype
        ref, G = param.astype(np.float64), np.zeros(shape[:1])
        hp = dict(lr=0.05, eps=1e-6, weight_decay=0.1, maximize=True)
        for _ in range(20):
            grad = rng.standard_normal(shape).astype(dtype)
            F.rowwise_adagrad(param, grad, state, **hp)
            ref, G = ref_step(ref, grad.astype(np.float64), G, **hp)
        assert_close(param, ref, dtype)
        assert_close(state.sum, G, dtype)
        assert state.step == 20


def test_construction_refuses_bfloat16_state_and_long_bfloat16_rows():
    """bfloat16 parameters are staged a group of whole rows at a time: rows of at most
    ROW_STAGING elements; the per-row accumulators stay float32/float64."""
    with pytest.raises(ValueError, match="per-row accumulators need float32/float64 state"):
        fastopt.RowwiseAdagrad([np.zeros((3, 2), np.float32)], state_dtype="bfloat16")
    limit = fastopt._kernels.ROW_STAGING
    with pytest.raises(ValueError, match=f"params\\[1\\]: .* at most {limit} elements .* {limit + 1}"):
        fastopt.RowwiseAdagrad([np.zeros((3, limit), ml_dtypes.bfloat16),
                                np.zeros((2, limit + 1), ml_dtypes.bfloat16)])
    fastopt.RowwiseAdagrad([np.zeros((2, limit + 1), np.float32)])  # unstaged: any length
    fastopt.RowwiseAdagrad([np.zeros((0, limit + 1), ml_dtypes.bfloat16)])  # nothing staged


def test_long_rows_with_bfloat16_gradients_change_nothing():
    limit = fastopt._kernels.ROW_STAGING
    params = [np.ones((2, 3), np.float32), np.ones((2, limit + 1), np.float32)]
    opt = fastopt.RowwiseAdagrad(params, lr=0.1)
    grads = [np.ones((2, 3), ml_dtypes.bfloat16), np.ones((2, limit + 1), ml_dtypes.bfloat16)]
    with pytest.raises(ValueError, match=f"grads\\[1\\]: .* at most {limit} elements"):
        opt.step(grads)
    assert not opt.state and all((p == 1).all() for p in params)
    opt.step([grads[0], grads[1].astype(np.float32)])  # float32 gradients: any row length
    assert (params[0] < 1).all() and (params[1] < 1).all()


def _warm(rng):
    """A float32 and a float64 parameter, two steps in: every state exists."""
    params = [rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(5)]
    opt = fastopt.RowwiseAdagrad(params, lr=0.1)
    for _ in range(2):
        opt.step([rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(5)])
    return opt


BAD_STEPS = [  # (what, rng -> the bad step's gradients, error, message)
    ("bf16-grad-of-float64", lambda r: [np.ones((6, 3), ml_dtypes.bfloat16),
                                        np.ones(5, ml_dtypes.bfloat16)], TypeError, "bfloat16"),
    ("bf16-rows-of-float64", lambda r: [np.ones((6, 3), np.float32), fastopt.SparseGrad(
        np.array([1]), np.ones(1, ml_dtypes.bfloat16))], TypeError, "bfloat16"),
    ("index-out-of-range", lambda r: [fastopt.SparseGrad(np.array([2, 6]), np.ones(
        (2, 3), np.float32)), r.standard_normal(5)], ValueError, "out of range"),
    ("negative-index", lambda r: [np.ones((6, 3), np.float32), fastopt.SparseGrad(
        np.array([0, -1], np.int32), np.ones(2))], ValueError, "negative"),
]


@pytest.mark.parametrize("what, make, error, match", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_gradients_change_nothing(what, make, error, match, rng):
    opt = _warm(rng)
    grads = make(rng)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("bad_sum", [np.zeros((6, 3), np.float32), np.zeros(7, np.float32),
                                     np.zeros(5, np.float32)], ids=["param-shaped", "7", "5"])
def test_wrong_state_shape_changes_nothing(bad_sum, rng):
    opt = _warm(rng)
    opt.state[0].sum = bad_sum
    before = snapshot(opt)
    grads = [rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(5)]
    with pytest.raises(ValueError, match=r"shape \(6, 3\)"):  # the parameter's shape is named
        opt.step(grads)
    assert_same_snapshot(before, snapshot(opt))
    # the same through load_state_dict and the functional API
    opt = _warm(rng)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0]["sum"] = bad_sum
    before = snapshot(opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state_dict)
    assert_same_snapshot(before, snapshot(opt))
    param = rng.standard_normal((6, 3)).astype(np.float32)
    state = fastopt.RowwiseAdagradState(sum=bad_sum.copy(), step=3)
    p0 = param.copy()
    with pytest.raises(ValueError, match="shape"):
        F.rowwise_adagrad(param, np.ones_like(param), state, lr=0.1)
    np.testing.assert_array_equal(param, p0)
    np.testing.assert_array_equal(state.sum, bad_sum)
    assert state.step == 3


def test_bfloat16_state_buffer_is_refused(rng):
    """A bfloat16 `sum` handed in (not made by the optimizer) is refused like
    state_dtype="bfloat16", through step, load_state_dict and functional, nothing changed."""
    opt = _warm(rng)
    opt.state[0].sum = np.zeros(6, ml_dtypes.bfloat16)
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.step([rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(5)])
    assert_same_snapshot(before, snapshot(opt))
    opt = _warm(rng)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0]["sum"] = np.zeros(6, ml_dtypes.bfloat16)
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(state_dict)
    assert_same_snapshot(before, snapshot(opt))
    param = np.ones((6, 3), np.float32)
    state = fastopt.RowwiseAdagradState(sum=np.zeros(6, ml_dtypes.bfloat16), step=0)
    with pytest.raises((TypeError, ValueError)):
        F.rowwise_adagrad(param, np.ones_like(param), state, lr=0.1)
    np.testing.assert_array_equal(param, np.ones((6, 3), np.float32))
    assert state.step == 0 and not state.sum.astype(np.float32).any()


def _threaded_run(threads):
    """Parameters over the size one thread takes, one of few rows much longer than that,
    dense steps then sparse steps with many duplicates."""
    rng = np.random.default_rng(21)
    shapes = [(200_000, 16), (300_001,), (3, 70_001)]
    dtypes = [np.float32, np.float32, np.float64]
    params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    opt = fastopt.RowwiseAdagrad(params, lr=0.01, weight_decay=0.01)
    previous = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        for _ in range(2):
            opt.step([rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)])
        for _ in range(2):
            grads = []
            for s, d, n in zip(shapes, dtypes, (300_000, 400_000, 9)):
                indices = rng.integers(0, s[0], size=n)
                grads.append(fastopt.SparseGrad(indices, rng.standard_normal(
                    (n,) + s[1:]).astype(d)))
            # a dense tensor of long rows in the same row batch as the sparse rows
            grads[-1] = rng.standard_normal(shapes[-1]).astype(dtypes[-1])
            opt.step(grads)
    finally:
        fastopt.set_num_threads(previous)
    return params + [opt.state[k].sum for k in range(len(shapes))]


def test_same_bits_for_any_thread_count():
    one = _threaded_run(1)
    for threads in (2, 8):
        for a, b in zip(_threaded_run(threads), one):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip(tmp_path, rng):
    shapes, dtypes = [(10, 4), (7,), ()], [np.float32, np.float64, np.float64]
    params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    hp = dict(lr=0.05, weight_decay=0.01)

    def grads():
        rows32 = rng.standard_normal((6, 4)).astype(np.float32)
        return [fastopt.SparseGrad(rng.integers(0, 10, 6), rows32),
                fastopt.SparseGrad(rng.integers(0, 7, 3).astype(np.int32), rng.standard_normal(3)),
                np.asarray(rng.standard_normal())]

    opt = fastopt.RowwiseAdagrad(params, **hp)
    for _ in range(5):
        opt.step(grads())
    opt.save(tmp_path / "opt.npz")
    from_file = [p.copy() for p in params]
    from_dict = [p.copy() for p in params]
    loaded = fastopt.RowwiseAdagrad(from_file, **hp)
    loaded.load(tmp_path / "opt.npz")
    other = fastopt.RowwiseAdagrad(from_dict, **hp)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o in (loaded, other):
        for k, (s, d) in enumerate(zip(shapes, dtypes)):
            assert o.state[k].sum.shape == s[:1] and o.state[k].sum.dtype == d
            assert o.state[k].step == 5
    for _ in range(10):
        g = grads()
        for o in (opt, loaded, other):
            o.step(g)
    for k in range(len(shapes)):
        for copies, o in ((from_file, loaded), (from_dict, other)):
            np.testing.assert_array_equal(copies[k], params[k], strict=True)
            np.testing.assert_array_equal(o.state[k].sum, opt.state[k].sum, strict=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ema_follows_the_updated_parameter(dtype, rng):
    opt, params, _, ref, _, ema = dense_run(rng, dtype, dict(lr=0.05, weight_decay=0.1),
                                            steps=20, ema_decay=0.9)
    for k, shape in enumerate(DENSE_SHAPES):
        assert opt.state[k].ema.shape == shape and opt.state[k].ema.dtype == dtype
        assert_close(opt.state[k].ema, ema[k], dtype)
        assert_close(params[k], ref[k], dtype)


def test_grad_scale_divides_the_gradient(rng):
    """Gradients 4x the reference's, stepped with grad_scale=4."""
    opt, params, _, ref, G, _ = dense_run(rng, np.float64, HPS[1], steps=10, grad_scale=4.0)
    for k in range(len(ref)):
        assert_close(params[k], ref[k], np.float64)
        assert_close(opt.state[k].sum, G[k], np.float64)


# ---- fastopt.torch --------------------------------------------------------------------------

@pytest.fixture
def torch_rowwise(request):
    """(torch, fastopt.torch.RowwiseAdagrad), torch on one thread; skipped without torch."""
    torch = pytest.importorskip("torch")
    request.getfixturevalue("one_torch_thread")
    return torch, pytest.importorskip("fastopt.torch").RowwiseAdagrad


@pytest.mark.parametrize("module, dtype, hp", [
    ("embedding", "float32", dict(lr=0.05, eps=1e-6, weight_decay=0.0, maximize=False)),
    ("embedding", "float64", dict(lr=0.05, eps=1e-8, weight_decay=0.01, maximize=True)),
    ("bag", "float32", dict(lr=0.05, eps=1e-8, weight_decay=0.01, maximize=False))], ids=str)
def test_torch_sparse_matches_reference(module, dtype, hp, torch_rowwise):
    torch, RowwiseAdagrad = torch_rowwise
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    if module == "bag":
        m = torch.nn.EmbeddingBag(1000, 16, mode="sum", sparse=True).to(dtype)
    else:
        m = torch.nn.Embedding(1000, 16, sparse=True).to(dtype)
    opt = RowwiseAdagrad(m.parameters(), **hp)
    ref, G = m.weight.detach().double().numpy().copy(), np.zeros(1000)
    hot = torch.randperm(1000)[:300]  # rows outside it are touched rarely
    for step in range(STEPS):
        pool = hot if step % 4 else torch.arange(1000)
        indices = pool[torch.randint(0, len(pool), (64,))]  # duplicates, unsorted
        out = m(indices.reshape(4, 16)) if module == "bag" else m(indices)
        loss = (out * torch.randn(out.shape, dtype=dtype)).sum() + out.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        grad = m.weight.grad
        assert grad.layout == torch.sparse_coo
        rows = grad._indices()[0].numpy()
        ref_lazy(ref, G, rows, grad._values().double().numpy(), hp)
        before = (m.weight.detach().clone(),
                  opt.state[m.weight].get("sum", torch.zeros(1000)).clone())
        opt.step()
        untouched = np.setdiff1d(np.arange(1000), rows)
        assert torch.equal(m.weight.detach()[untouched], before[0][untouched])
        assert not (opt.state[m.weight]["sum"][untouched] != before[1][untouched]).any()
    state = opt.state[m.weight]
    assert state["sum"].shape == (1000,) and state["sum"].dtype == dtype
    assert state["step"].dim() == 0 and float(state["step"]) == STEPS
    assert (G == 0).any()  # some rows never touched: checked to stay as they were
    assert_close(m.weight.detach().numpy(), ref, np.float64 if dtype == torch.float64 else
                 np.float32)
    assert_close(state["sum"].numpy(), G, np.float64 if dtype == torch.float64 else np.float32)


def test_torch_dense_matches_reference_and_state_dict_round_trip(torch_rowwise):
    torch, RowwiseAdagrad = torch_rowwise
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3).double()  # a (3, 5) weight and a (3,) bias
    hp = dict(lr=0.05, eps=1e-8, weight_decay=0.1, maximize=True)
    opt = RowwiseAdagrad(model.parameters(), **hp)
    ref = [p.detach().numpy().copy() for p in model.parameters()]
    G = [np.zeros(p.shape[:1]) for p in model.parameters()]
    x = torch.randn(8, 5, dtype=torch.float64)

    def train(model, opt, steps, ref=None):
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            for k, p in enumerate(model.parameters() if ref else ()):
                ref[k], G[k] = ref_step(ref[k], p.grad.numpy(), G[k], **hp)
            opt.step()

    train(model, opt, 30, ref)
    for k, p in enumerate(model.parameters()):
        assert_close(p.detach().numpy(), ref[k], np.float64)
        assert_close(opt.state[p]["sum"].numpy(), G[k], np.float64)
    # a copy resumed from state_dict() continues exactly as the original
    other = copy.deepcopy(model)
    other_opt = RowwiseAdagrad(other.parameters(), **hp)
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in other.parameters():
        assert other_opt.state[p]["sum"].shape == p.shape[:1]
    train(model, opt, 5)
    train(other, other_opt, 5)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["sum"], other_opt.state[b]["sum"])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_parameters_without_elements_take_empty_rows(shape):
    """No rows, or rows of no elements: a step (dense or of no rows) changes nothing and fails
    nowhere."""
    p = np.zeros(shape, np.float32)
    opt = fastopt.RowwiseAdagrad([p])
    opt.step([fastopt.SparseGrad(np.zeros(0, np.int64), np.zeros((0,) + shape[1:], np.float32))])
    opt.step([np.zeros(shape, np.float32)])
    assert opt.state[0].step == 2 and opt.state[0].sum.shape == shape[:1]
    assert not opt.state[0].sum.any()


def test_torch_empty_batches_and_empty_rows(torch_rowwise):
    """An embedding step on no indices (an empty sparse gradient) or on rows of no elements: the
    step is taken (its count advances) and nothing else changes."""
    torch, RowwiseAdagrad = torch_rowwise
    for rows, dim, batch in ((5, 4, []), (5, 0, [1, 2])):
        emb = torch.nn.Embedding(rows, dim, sparse=True)
        before = emb.weight.detach().clone()
        opt = RowwiseAdagrad(emb.parameters(), lr=0.1)
        emb(torch.tensor(batch, dtype=torch.long)).sum().backward()
        opt.step()
        assert opt.state[emb.weight]["step"] == 1
        assert torch.equal(emb.weight.detach(), before)


def test_a_parameter_reshaped_in_place_gets_its_new_rows(rng):
    """A parameter reshaped in place between steps (same memory, other rows): the next step
    does not run on the old rows; the state, one value per old row, no longer fits and is
    refused by name, nothing changed."""
    p = rng.standard_normal((4, 3))
    opt = fastopt.RowwiseAdagrad([p], lr=0.1)
    opt.step([np.ones((4, 3))])
    opt.step([np.ones((4, 3))])  # planned
    p.shape = (2, 6)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state\[0\]\.sum has shape \(4,\)"):
        opt.step([np.ones((2, 6))])
    assert_same_snapshot(snapshot(opt), before)


def test_torch_parameter_reshaped_after_planning_is_checked(torch_rowwise):
    """The same through fastopt.torch's planned step: p.data viewed with other rows."""
    torch, RowwiseAdagrad = torch_rowwise
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = RowwiseAdagrad([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(4, 3)
        opt.step()
    p.data = p.data.view(2, 6)
    p.grad = torch.ones(2, 6)
    with pytest.raises(ValueError, match="state 'sum'"):
        opt.step()
    assert opt.state[p]["step"] == 2


def test_torch_refuses_complex_parameters(torch_rowwise):
    """A row's mean of g^2 is for real parameters: a complex one is refused when its group is
    added, and the optimizer keeps the groups it had."""
    torch, RowwiseAdagrad = torch_rowwise
    opt = RowwiseAdagrad([torch.nn.Parameter(torch.ones(3, 2))])
    with pytest.raises(TypeError, match="is complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
