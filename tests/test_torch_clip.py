"""fastopt.torch.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ itself."""
import math

import pytest

torch = pytest.importorskip("torch")
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZES = [1000, 5000, 3, 1, 131_001]  # one large enough to be split across threads


def twin_params(dtypes, generator, scale=1.0):
    """Two lists of parameters with equal gradients (None for the third parameter)."""
    ours, theirs = [], []
    for k, n in enumerate(SIZES):
        dtype = dtypes[k % len(dtypes)]
        p = torch.randn(n, dtype=dtype, generator=generator)
        a, b = torch.nn.Parameter(p.clone()), torch.nn.Parameter(p.clone())
        if k != 2:
            g = torch.randn(n, dtype=dtype, generator=generator) * scale
            a.grad, b.grad = g.clone(), g.clone()
        ours.append(a)
        theirs.append(b)
    return ours, theirs


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, "inf", 0.0, 3.0, 0.5])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,),
                                    (torch.float32, torch.float64)], ids=["f32", "f64", "mixed"])
@pytest.mark.parametrize("max_norm", [1e-2, 1e12])  # clipped, and not
def test_matches_torch(norm_type, dtypes, max_norm):
    generator = torch.Generator().manual_seed(0)
    ours, theirs = twin_params(dtypes, generator)
    # torch's own norm of float64 copies: what ours (accumulated in double) must round to
    exact = torch.nn.utils.get_total_norm(
        [p.grad.double() for p in theirs if p.grad is not None], norm_type).item()
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    got = ft.clip_grad_norm_(iter(ours), max_norm, norm_type)  # a generator, as parameters() is
    assert got.dtype == expected.dtype and got.shape == expected.shape
    f32 = torch.float32 in dtypes
    assert got.item() == pytest.approx(exact, rel=1e-7 if expected.dtype == torch.float32 else 1e-12)
    # torch's float32 sums of 200,000 powers carry its own rounding (into its float64 total too)
    rtol = 1e-4 if f32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
    for a, b in zip(ours, theirs):
        if b.grad is None:
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=0)
        if max_norm > 1e6:
            assert torch.equal(a.grad, b.grad)  # factor 1: bit for bit


def test_norm_is_identical_for_any_thread_count():
    values = set()
    before = fastopt.get_num_threads()
    try:
        for threads in (1, 2, 8):
            fastopt.set_num_threads(threads)
            ours, _ = twin_params((torch.float32,), torch.Generator().manual_seed(1))
            values.add(ft.clip_grad_norm_(ours, 1e12).item())
    finally:
        fastopt.set_num_threads(before)
    assert len(values) == 1


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite(bad):
    generator = torch.Generator().manual_seed(2)
    ours, theirs = twin_params((torch.float32,), generator)
    for ps in (ours, theirs):
        ps[1].grad[17] = bad
    before = [p.grad.clone() for p in ours if p.grad is not None]
    with pytest.raises(RuntimeError, match="non-finite"):
        ft.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    for g, p in zip(before, [p for p in ours if p.grad is not None]):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0, equal_nan=True)  # nothing scaled
    for norm_type in (2.0, math.inf):
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        got = ft.clip_grad_norm_(ours, 1.0, norm_type)
        torch.testing.assert_close(got, expected, equal_nan=True)
        for a, b in zip(ours, theirs):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_single_tensor_empty_and_handed_to_torch():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    assert ft.clip_grad_norm_(p, 1.0).item() == pytest.approx(4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))
    q = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(ft.clip_grad_norm_([q], 1.0), torch.nn.utils.clip_grad_norm_([q], 1.0))
    # not contiguous, and a negative norm type: torch's own function, torch's results
    for make, norm_type in [(lambda: torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).t(), 2.0),
                            (lambda: torch.randn(5, generator=torch.Generator().manual_seed(4)), -2.0)]:
        a = torch.nn.Parameter(torch.zeros_like(make()))
        b = torch.nn.Parameter(torch.zeros_like(make()))
        a.grad, b.grad = make(), make()
        torch.testing.assert_close(ft.clip_grad_norm_([a], 0.5, norm_type),
                                   torch.nn.utils.clip_grad_norm_([b], 0.5, norm_type))
        torch.testing.assert_close(a.grad, b.grad)
