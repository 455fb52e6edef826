"""Sparse rows with bfloat16 storage (README "Sparse rows", "bfloat16 storage"): a lazy step with
a SparseGrad must write each touched row exactly as the dense step writes it, bit for bit, when
the dense gradient is the rows' coalesced gradient and zero elsewhere (stochastic rounding is
keyed by the parameter's index and the element's index in the parameter, not in the row); the
same bits for any thread count; fastopt.torch's sparse classes on a bfloat16 nn.Embedding."""
import numpy as np
import pytest

import fastopt
from bf16_reference import round_bf16, widen
from conftest import CASES, assert_same_snapshot, case_id, snapshot

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

CASES = [c for c in CASES if c[0].rule.rows]  # rows, bfloat16
SHAPES = [(12, 5), (6, 2, 3)]  # two parameters: the second's index keys its rounding
STEPS = 4

# (parameter dtype, gradient dtype, storage options)
STORAGES = {
    "f32-bf16state": (np.float32, np.float32, dict(state_dtype="bfloat16")),
    "f32-bf16grad-bf16state": (np.float32, BF16, dict(state_dtype="bfloat16", seed=3)),
    "bf16-stochastic": (BF16, BF16, dict(state_dtype="bfloat16", seed=11)),
    "bf16-nearest": (BF16, BF16, dict(state_dtype="bfloat16", rounding="nearest")),
    "bf16-master": (BF16, BF16, dict(master_weights=True, seed=5)),
}


def coalesced(indices, values, grad_dtype, n_rows):
    """The dense gradient of rows given with duplicates: each row's values summed in the order
    listed (float32 for bfloat16 values, the sum rounded once to nearest even), zero elsewhere."""
    dense = np.zeros((n_rows,) + values.shape[1:], dtype=np.float32 if grad_dtype == BF16
                     else grad_dtype)
    for r in np.unique(indices):
        rows = values[indices == r]
        total = rows[0].astype(np.float32) if grad_dtype == BF16 else rows[0].copy()
        for row in rows[1:]:
            total += row.astype(np.float32) if grad_dtype == BF16 else row
        dense[r] = total
    if grad_dtype == BF16:
        bits = round_bf16(dense.ravel(), "nearest").reshape(dense.shape)
        dense = bits.view(BF16)
    return dense


def bits(a):
    return a.view(np.uint16) if a.dtype == BF16 else a.view(np.uint32)


def draw(rng, n_rows, grad_dtype, shape):
    touched = np.flatnonzero(rng.random(n_rows) < 0.4)
    if len(touched) == 0:
        touched = np.array([0])
    extra = rng.choice(touched, size=rng.integers(1, 2 * len(touched) + 1))
    indices = np.concatenate([touched, extra])
    rng.shuffle(indices)
    values = rng.standard_normal((len(indices),) + shape[1:]).astype(np.float32)
    return indices.astype(np.int64), values.astype(grad_dtype)


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lazy_rows_round_as_the_dense_step(case, storage, rng):
    cls, hp = case
    param_dtype, grad_dtype, options = STORAGES[storage]
    if cls.rule.plain_state:  # (its state in float32: the parameters and gradients as given)
        options = {k: v for k, v in options.items() if k != "state_dtype"}
    init = [rng.standard_normal(s).astype(np.float32).astype(param_dtype) for s in SHAPES]
    sparse_params = [p.copy() for p in init]
    dense_params = [p.copy() for p in init]
    sparse = cls(sparse_params, **hp, **options)
    dense = cls(dense_params, **hp, **options)
    for step in range(STEPS):
        grads, dense_grads, touched = [], [], []
        for shape in SHAPES:
            indices, values = draw(rng, shape[0], grad_dtype, shape)
            grads.append(fastopt.SparseGrad(indices, values))
            dense_grads.append(coalesced(indices, values, grad_dtype, shape[0]))
            touched.append(np.unique(indices))
        before = [p.copy() for p in sparse_params]
        sparse.step(grads)
        dense.step(dense_grads)
        for k in range(len(SHAPES)):
            rows, others = touched[k], np.setdiff1d(np.arange(SHAPES[k][0]), touched[k])
            np.testing.assert_array_equal(bits(sparse_params[k][rows]),
                                          bits(dense_params[k][rows]), err_msg=f"param {k}")
            np.testing.assert_array_equal(bits(sparse_params[k][others]), bits(before[k][others]))
            sparse_state, dense_state = sparse.state[k].buffers(), dense.state[k].buffers()
            assert sparse_state.keys() == dense_state.keys()
            if "master" in sparse_state:
                assert sparse_state["master"].dtype == np.float32
            for name, buf in sparse_state.items():
                np.testing.assert_array_equal(bits(buf[rows]), bits(dense_state[name][rows]),
                                              err_msg=f"state {k}.{name}, step {step}")
        # the dense step also moved untouched rows' state: start the next step from the
        # sparse run's, so the two steps see the same rows again
        for k, p in enumerate(dense_params):
            p[...] = sparse_params[k]
            for name, buf in dense.state[k].buffers().items():
                buf[...] = sparse.state[k].buffers()[name]
    assert sparse.state[0].step == STEPS
    assert any(np.any(bits(p) != bits(q)) for p, q in zip(sparse_params, init))


def test_bf16_gradient_rows_sum_in_float32_then_round_once():
    p = np.zeros((3, 4), dtype=np.float32)
    values = np.array([[1.0] * 4, [2.0 ** -9] * 4, [2.0 ** -9] * 4], dtype=BF16)
    fastopt.SGD([p], lr=1.0).step([fastopt.SparseGrad(np.array([1, 1, 1]), values)])
    # 1 + 2^-9 rounds back to 1 in bfloat16 each time; summed in float32, 1 + 2^-8 is exact
    expected = widen(round_bf16(np.float32([1.0 + 2.0 ** -8]), "nearest"))[0]
    np.testing.assert_array_equal(p[1], -expected)
    np.testing.assert_array_equal(p[[0, 2]], 0.0)


def _big_run(threads, cls=fastopt.Adam, **options):
    rng = np.random.default_rng(8)
    p = rng.standard_normal((4096, 96)).astype(BF16)
    indices = rng.integers(0, 4096, size=9000)
    values = rng.standard_normal((9000, 96)).astype(BF16)
    opt = cls([p], lr=0.01, seed=4, **options)
    previous = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        for _ in range(3):
            opt.step([fastopt.SparseGrad(indices, values)])
    finally:
        fastopt.set_num_threads(previous)
    return p.view(np.uint16), {k: v.view(np.uint16) for k, v in opt.state[0].buffers().items()}


@pytest.mark.parametrize("cls, options", [
    (fastopt.Adam, dict(state_dtype="bfloat16")),
    # a row rule: its touched rows staged whole, its sums float32, an EMA and master weights
    (fastopt.RowwiseAdagrad, dict(ema_decay=0.9)),
    (fastopt.RowwiseAdagrad, dict(master_weights=True, ema_decay=0.9)),
], ids=["Adam", "RowwiseAdagrad", "RowwiseAdagrad-master"])
def test_same_bits_for_any_thread_count(cls, options):
    one, one_state = _big_run(1, cls, **options)
    for threads in (2, 8):
        p, state = _big_run(threads, cls, **options)
        np.testing.assert_array_equal(p, one)
        for k in one_state:
            np.testing.assert_array_equal(state[k], one_state[k])


def test_exact_with_bf16_storage_is_refused_with_nothing_changed(rng):
    p = rng.standard_normal((6, 3)).astype(BF16)
    before = p.copy()
    opt = fastopt.Adam([p], sparse="exact", betas=(0.9, 0.999))
    grad = fastopt.SparseGrad(np.array([1, 4]), np.ones((2, 3), dtype=BF16))
    with pytest.raises(TypeError, match="exact"):
        opt.step([grad])
    np.testing.assert_array_equal(p.view(np.uint16), before.view(np.uint16))
    assert not opt.state or all(s.step == 0 for s in opt.state.values())


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name, kwargs, numpy_cls, numpy_kwargs", [
    # (eps=0: torch's Adagrad divides by sqrt(G) + eps, the textbook one by sqrt(G + eps))
    ("Adagrad", dict(lr=0.1, eps=0.0), fastopt.Adagrad, dict(lr=0.1, eps=0.0)),
    ("SparseAdam", dict(lr=0.01), fastopt.Adam, dict(lr=0.01)),
    ("SparseAdam", dict(lr=0.01, master_weights=True), fastopt.Adam,
     dict(lr=0.01, master_weights=True)),
    # (its per-row sums stay float32: state_dtype is left out below)
    ("RowwiseAdagrad", dict(lr=0.1), fastopt.RowwiseAdagrad, dict(lr=0.1)),
    ("RowwiseAdagrad", dict(lr=0.1, master_weights=True, rounding="nearest"),
     fastopt.RowwiseAdagrad, dict(lr=0.1, master_weights=True, rounding="nearest")),
])
def test_torch_bf16_embedding_trains_like_the_numpy_rows(name, kwargs, numpy_cls, numpy_kwargs):
    import fastopt.torch as ft
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 4, sparse=True).to(torch.bfloat16)
    weights = emb.weight.detach().float().numpy().astype(BF16)
    init = weights.copy()
    state = {} if name == "RowwiseAdagrad" else dict(state_dtype="bfloat16")
    opt = getattr(ft, name)(emb.parameters(), seed=2, **state, **kwargs)
    ref = numpy_cls([weights], seed=2, **state, **numpy_kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        idx = torch.randint(0, 30, (12,), generator=gen)
        opt.zero_grad()
        (emb(idx).float() ** 2).sum().backward()
        g = emb.weight.grad
        assert g.layout == torch.sparse_coo and g.dtype == torch.bfloat16
        indices = g._indices()[0].numpy().copy()
        values = g._values().float().numpy().astype(BF16)
        opt.step()
        ref.step([fastopt.SparseGrad(indices, values)])
        np.testing.assert_array_equal(emb.weight.detach().view(torch.int16).numpy(),
                                      weights.view(np.int16))
    assert np.any(weights.view(np.int16) != init.view(np.int16))


@pytest.mark.parametrize("buffer", ["ema", "m"])
def test_exact_rows_refuse_a_bfloat16_buffer_with_nothing_changed(buffer):
    """sparse="exact" catches rows up in the compute type: a state buffer stored as bfloat16
    (assigned by hand; the EMA included) is refused before any parameter changes."""
    w0, w1 = np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)
    opt = fastopt.Adam([w0, w1], lr=0.1, sparse="exact", ema_decay=0.9)
    opt.step([np.ones((4, 3), np.float32)] * 2)
    setattr(opt.state[1], buffer, getattr(opt.state[1], buffer).astype(BF16))
    before = snapshot(opt)
    g = fastopt.SparseGrad(np.array([1]), np.ones((1, 3), np.float32))
    with pytest.raises(TypeError, match=r'grads\[1\]: sparse="exact" needs float32 or float64'):
        opt.step([g, g])
    assert_same_snapshot(before, snapshot(opt))
