"""fastopt.torch with sparse COO gradients (nn.Embedding / nn.EmbeddingBag with sparse=True):
SparseAdam, Adagrad and SGD against torch's own over 60 steps; torch's refusals."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from conftest import assert_torch_unchanged, torch_snapshot  # noqa: E402

STEPS = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(seed, n_rows, steps=STEPS):
    """Index batches with duplicates, in random order; rows sit out several steps."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.randperm(n_rows, generator=g)[: n_rows // 3]
    for step in range(steps):
        k = int(torch.randint(3, 12, (1,), generator=g))
        pool = hot if step % 3 else torch.arange(n_rows)
        yield pool[torch.randint(0, len(pool), (k,), generator=g)], torch.randn(k, generator=g)


def _train(module_factory, opt_factory, dtype, seed, bag=False):
    torch.manual_seed(seed)
    ours = module_factory().to(dtype)
    theirs = copy.deepcopy(ours)
    initial = ours.weight.detach().clone()
    opt_ours, opt_theirs = opt_factory(ft, ours), opt_factory(torch.optim, theirs)
    for indices, weights in _batches(seed, ours.weight.shape[0]):
        for module, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            if bag:
                out = module(indices.reshape(1, -1))[0]
                loss = (out * torch.arange(out.shape[0], dtype=dtype)).sum()
            else:
                loss = (module(indices) * weights.to(dtype)[:, None]).pow(2).sum()
            loss.backward()
            assert module.weight.grad.layout == torch.sparse_coo
            opt.step()
    assert not torch.equal(ours.weight, initial)  # the run trained
    return ours, theirs, opt_ours, opt_theirs


CASES = [
    ("SparseAdam", dict(lr=0.05)),
    ("SparseAdam", dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, maximize=True)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),  # torch: dense-equivalent momentum buffer
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,hp", CASES, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items()))
def test_embedding_matches_torch(name, hp, dtype):
    ours, theirs, opt_ours, opt_theirs = _train(
        lambda: torch.nn.Embedding(40, 6, sparse=True),
        lambda lib, m: getattr(lib, name)(m.parameters(), **hp), dtype, seed=3)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(ours.weight, theirs.weight, **tol)
    mine, torchs = opt_ours.state[ours.weight], opt_theirs.state[theirs.weight]
    for key, value in torchs.items():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            torch.testing.assert_close(mine[key], value, **tol)
        elif not isinstance(value, torch.Tensor):
            assert mine[key] == value  # SparseAdam's int step


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad", "SGD"])
def test_embedding_bag_matches_torch(name):
    ours, theirs, _, _ = _train(
        lambda: torch.nn.EmbeddingBag(30, 5, mode="sum", sparse=True),
        lambda lib, m: getattr(lib, name)(m.parameters(), lr=0.05), torch.float32, seed=5, bag=True)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)


def test_sparse_grad_is_used_where_it_lies():
    """The kernels read the gradient's own indices and values: a coalesced gradient with
    unsorted storage order still gives torch's result, and the gradient is left unchanged."""
    w = torch.randn(10, 3)
    p, q = w.clone().requires_grad_(), w.clone().requires_grad_()
    indices = torch.tensor([[7, 2, 7, 0]])
    values = torch.randn(4, 3)
    for t in (p, q):
        t.grad = torch.sparse_coo_tensor(indices, values, (10, 3))
    ft.SparseAdam([p], lr=0.1).step()
    torch.optim.SparseAdam([q], lr=0.1).step()
    torch.testing.assert_close(p, q)
    assert torch.equal(p.grad._values(), values) and torch.equal(p.grad._indices(), indices)
    assert torch.equal(p[[1, 3, 4, 5, 6, 8, 9]], w[[1, 3, 4, 5, 6, 8, 9]])



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hp", [dict(lr=0.05, momentum=0.9),
                                dict(lr=0.05, momentum=0.9, nesterov=True),
                                dict(lr=0.05, momentum=0.8, dampening=0.3)], ids=str)
def test_sgd_momentum_checkpoint_from_torch_continues_as_torch(hp, dtype):
    """torch's SGD keeps a sparse COO momentum buffer for sparse gradients: its checkpoint
    loads into fastopt.torch.SGD (the buffer made dense) and training goes on with torch's
    numbers; fastopt's checkpoint (a dense buffer) goes back into torch's SGD."""
    torch.manual_seed(5)
    theirs = torch.nn.Embedding(30, 4, sparse=True).to(dtype)
    opt_theirs = torch.optim.SGD(theirs.parameters(), **hp)

    def train(module, opt, batches):
        for indices, weights in batches:
            opt.zero_grad()
            (module(indices) * weights.to(dtype)[:, None]).pow(2).sum().backward()
            opt.step()

    batches = list(_batches(7, 30, steps=40))
    train(theirs, opt_theirs, batches[:20])
    checkpoint = copy.deepcopy(opt_theirs.state_dict())
    assert checkpoint["state"][0]["momentum_buffer"].layout == torch.sparse_coo
    ours = copy.deepcopy(theirs)
    opt_ours = ft.SGD(ours.parameters(), **hp)
    opt_ours.load_state_dict(checkpoint)
    assert opt_ours.state[ours.weight]["momentum_buffer"].layout == torch.strided
    train(theirs, opt_theirs, batches[20:30])
    train(ours, opt_ours, batches[20:30])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ours.weight, theirs.weight, **tol)
    torch.testing.assert_close(opt_ours.state[ours.weight]["momentum_buffer"],
                               opt_theirs.state[theirs.weight]["momentum_buffer"].to_dense(), **tol)
    if hp.get("nesterov"):
        return  # torch's own nesterov step cannot add a dense buffer to a sparse gradient
    # and back: torch's SGD continues from fastopt's dense buffer
    back = copy.deepcopy(ours)
    opt_back = torch.optim.SGD(back.parameters(), **hp)
    opt_back.load_state_dict(opt_ours.state_dict())
    train(back, opt_back, batches[30:])
    train(ours, opt_ours, batches[30:])
    torch.testing.assert_close(ours.weight, back.weight, **tol)

def _refused(opt, p, error, match):
    before = p.detach().clone()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert str(opt.state_dict()) == str(state)


def test_torch_refusals_are_kept():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    _refused(ft.Adagrad(emb.parameters(), weight_decay=0.1), emb.weight, RuntimeError,
             "weight_decay option is not compatible with sparse gradients")
    _refused(ft.SGD(emb.parameters(), lr=0.1, weight_decay=0.1), emb.weight, RuntimeError,
             "add\\(sparse, dense\\)")
    _refused(ft.Adam(emb.parameters()), emb.weight, TypeError, "sparse")
    dense = torch.nn.Linear(3, 2)
    dense(torch.randn(4, 3)).sum().backward()
    _refused(ft.SparseAdam(dense.parameters()), dense.weight, RuntimeError,
             "SparseAdam does not support dense gradients")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ft.SparseAdam(emb.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        ft.SparseAdam(emb.parameters(), betas=(0.9, 1.0))
    assert issubclass(ft.SparseAdam, torch.optim.SparseAdam)


def test_several_sparse_dimensions_and_a_mixed_model():
    """A fully sparse 2-D gradient (rows of one element) and a dense parameter in one step."""
    a, b = torch.randn(4, 5), torch.randn(3)
    pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
    qa, qb = a.clone().requires_grad_(), b.clone().requires_grad_()
    grad_a = torch.sparse_coo_tensor(torch.tensor([[3, 0, 3], [1, 4, 1]]), torch.randn(3), (4, 5))
    grad_b = torch.randn(3)
    for x, y in ((pa, pb), (qa, qb)):
        x.grad, y.grad = grad_a.clone(), grad_b.clone()
    ft.Adagrad([pa, pb], lr=0.1).step()
    torch.optim.Adagrad([qa, qb], lr=0.1).step()
    torch.testing.assert_close(pa, qa)
    torch.testing.assert_close(pb, qb)
    assert np.count_nonzero((pa != a).numpy()) == 2


def _rows_of_a(a):
    return torch.sparse_coo_tensor([[0, 3]], torch.ones(2, 2), a.shape)


BAD_SPARSE_GRADIENTS = {  # a's gradient (a: 4 x 2) -> the error's wording
    "row past the end": (lambda a: torch.sparse_coo_tensor([[0, 7]], torch.ones(2, 2), a.shape),
                         "has index 7, out of bounds for dimension 0 with size 4"),
    "negative row": (lambda a: torch.sparse_coo_tensor([[-1]], torch.ones(1, 2), a.shape),
                     "has index -1, out of bounds for dimension 0 with size 4"),
    # (1, 2) as a flat row is in range: each dimension is checked on its own
    "column past the end": (lambda a: torch.sparse_coo_tensor([[0], [2]], torch.ones(1), a.shape),
                            "has index 2, out of bounds for dimension 1 with size 2"),
    "values on the parameter": (
        lambda a: torch.sparse_coo_tensor([[0]], a.detach()[1:2], a.shape),
        "its gradient or a state buffer shares memory"),
}
SPARSE_OPTIMIZERS = {"Adagrad": dict(lr=0.1), "SGD": dict(lr=0.1),
                     "SGD-momentum": dict(lr=0.1, momentum=0.9), "SparseAdam": dict(lr=0.1),
                     "RowwiseAdagrad": dict(lr=0.1)}


@pytest.mark.parametrize("case", BAD_SPARSE_GRADIENTS)
@pytest.mark.parametrize("name", SPARSE_OPTIMIZERS)
def test_bad_sparse_gradient_in_a_later_group_changes_nothing(name, case):
    """Indices out of range and values that alias the parameter are refused before any group
    runs or any counter moves (the kernels would refuse them only in their own group)."""
    make_grad, message = BAD_SPARSE_GRADIENTS[case]
    if name == "RowwiseAdagrad" and case == "column past the end":
        pytest.skip("its sparse gradients have one sparse dimension (refused as such)")
    if name == "SGD-momentum" and case == "values on the parameter":
        pytest.skip("its sparse gradient is made dense, a copy, before the update (as torch's)")
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(3, generator=gen).requires_grad_()  # group 0
    a = torch.randn(4, 2, generator=gen).requires_grad_()  # group 1
    opt = getattr(ft, name.split("-")[0])([{"params": [b]}, {"params": [a]}],
                                          **SPARSE_OPTIMIZERS[name])
    def b_grad():  # (SparseAdam takes sparse gradients only)
        return torch.ones(3).to_sparse() if name == "SparseAdam" else torch.ones(3)
    b.grad, a.grad = b_grad(), _rows_of_a(a)
    opt.step()
    before = torch_snapshot(opt)
    b.grad, a.grad = b_grad(), make_grad(a)
    with pytest.raises(ValueError, match=f"param group 1, parameter 0: .*{message}"):
        opt.step()
    assert_torch_unchanged(before, torch_snapshot(opt))
    a.grad = _rows_of_a(a)  # the next good step counts as the second
    opt.step()
    if "step" in opt.state[a]:
        assert int(opt.state[a]["step"]) == 2
