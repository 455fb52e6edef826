"""pytest-benchmark groups: rule x dtype x size, and whole models, fastopt against numpy in
place and torch.optim (for-loop, foreach, fused) when torch is installed.

    pytest bench/ --benchmark-only                      # everything
    pytest bench/ --benchmark-only -k "Adam and 1e6"    # a subset

Compare within one run: the machine this runs on is shared and noisy.  `python -m fastopt
bench` prints the same cases as one table, with the bandwidth ceiling.
"""
import math

import numpy as np
import pytest

import fastopt
from fastopt.benchmark import MODELS, NUMPY_RULES, RULES, numpy_runner, torch_runners

SIZES = {"1e3": 1000, "1e5": 100_000, "1e6": 1_000_000, "1.6e7": 16_000_000}
IMPLEMENTATIONS = ["fastopt", "numpy", "torch for-loop", "torch foreach", "torch fused"]


def make_step(rule, dtype, shapes, implementation):
    cls, kw, _, torch_name = RULES[rule]
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in shapes]
    if implementation == "fastopt":
        opt = cls(params, **kw)
        return lambda: opt.step(grads)
    if implementation == "numpy":
        if rule not in NUMPY_RULES:
            pytest.skip(f"no numpy version of {rule}")
        return numpy_runner(rule, params, grads)
    runners = torch_runners(torch_name, params, grads, fastopt.get_num_threads())
    if implementation not in runners:
        pytest.skip(f"{implementation} not available for {rule}")
    return runners[implementation]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule", list(RULES))
def test_rule(benchmark, rule, dtype, size, implementation):
    benchmark.group = f"{rule} {dtype} {size}"
    benchmark.extra_info["elements"] = SIZES[size]
    step = make_step(rule, np.dtype(dtype), [(SIZES[size],)], implementation)
    benchmark(step)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("rule", list(RULES))
def test_model(benchmark, rule, model, implementation):
    shapes = MODELS[model]
    benchmark.group = f"{rule} {model} ({len(shapes)} tensors, "\
                      f"{sum(math.prod(s) for s in shapes) / 1e6:.1f}M)"
    step = make_step(rule, np.float32, shapes, implementation)
    benchmark(step)


@pytest.mark.parametrize("implementation", ["fastopt.torch", "torch for-loop", "torch foreach",
                                            "torch fused"])
@pytest.mark.parametrize("case", ["1.6e7", "ResNet-18", "ResNet-50"])
@pytest.mark.parametrize("rule", [r for r in RULES if RULES[r][3]])
def test_torch_dropin(benchmark, rule, case, implementation):
    pytest.importorskip("torch")
    from fastopt.benchmark import dropin_runners
    shapes = [(16_000_000,)] if case == "1.6e7" else MODELS[case]
    benchmark.group = f"fastopt.torch {rule} {case}"
    runners = dropin_runners(RULES[rule][3], shapes, fastopt.get_num_threads())
    if implementation not in runners:
        pytest.skip(f"{implementation} not available for {rule}")
    benchmark(runners[implementation])


@pytest.mark.parametrize("call", ["step", "step, lr changed", "functional", "step without lock"])
def test_python_side_cost(benchmark, call):
    """One tensor of 1e3 float32: the engine's cost around a ~0.3 us kernel (see
    fastopt.benchmark.overhead_calls for what each call is)."""
    from fastopt.benchmark import overhead_calls
    benchmark.group = "Python-side cost per call, 1e3 float32"
    benchmark(overhead_calls()[call])


@pytest.mark.parametrize("implementation", ["fastopt.torch", "torch"])
@pytest.mark.parametrize("distribution", ["zipf", "uniform"])
@pytest.mark.parametrize("rule", ["SparseAdam", "Adagrad", "SGD", "RowwiseAdagrad"])
def test_sparse_embedding(benchmark, rule, distribution, implementation):
    """A 1M x 64 nn.Embedding(sparse=True), 16,384 indices per step (fastopt.bench_sparse;
    RowwiseAdagrad against torch's sparse Adagrad)."""
    pytest.importorskip("torch")
    from fastopt.bench_sparse import torch_runners
    benchmark.group = f"sparse {rule} {distribution}"
    runners, _ = torch_runners(rule, distribution, fastopt.get_num_threads(), {})
    benchmark(runners[implementation])


@pytest.mark.parametrize("implementation", ["SparseGrad", "dense"])
@pytest.mark.parametrize("distribution", ["zipf", "uniform"])
def test_sparse_numpy_adam(benchmark, distribution, implementation):
    from fastopt.bench_sparse import numpy_runners
    benchmark.group = f"sparse numpy Adam {distribution}"
    benchmark(numpy_runners(distribution)[implementation])


@pytest.mark.parametrize("implementation", ["fastopt", "fastopt all-float32", "torch fused"])
@pytest.mark.parametrize("storage", ["f32, bf16 state", "f32, bf16 grad+state", "bf16, f32 state",
                                     "bf16 stochastic", "bf16 nearest", "bf16 + master"])
@pytest.mark.parametrize("size", ["1e6", "1.6e7"])
@pytest.mark.parametrize("rule", ["Adam", "SGD", "Adagrad", "Lion"])
def test_storage(benchmark, rule, size, storage, implementation):
    """bfloat16 storage (fastopt.benchmark.STORAGE_CASES) against all-float32 fastopt and torch's
    fused step on the same bfloat16 tensors; bytes per element in extra_info."""
    pytest.importorskip("ml_dtypes")
    from fastopt.benchmark import STORAGE_CASES, TORCH_KW, storage_bytes
    from fastopt import storage as st
    if rule not in RULES:
        pytest.skip(f"{rule} has no benchmark entry")
    cls, kw, streams, torch_name = RULES[rule]
    pd, gd, options = STORAGE_CASES[storage]
    n = SIZES[size]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    base_g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    cast = lambda a, d: a.astype(st.bfloat16() if d == "bf16" else d)  # noqa: E731
    benchmark.group = f"{rule} {size} {storage}"
    benchmark.extra_info["bytes_per_element"] = storage_bytes(
        streams, 2 if pd == "bf16" else 4, 2 if gd == "bf16" else 4,
        2 if options.get("state_dtype") == "bfloat16" else 4, options.get("master_weights", False))
    if implementation == "fastopt":
        params, grads = [cast(base, pd)], [cast(base_g, gd)]
        opt = cls(params, **kw, **options)
        benchmark(lambda: opt.step(grads))
    elif implementation == "fastopt all-float32":
        params, grads = [base.copy()], [base_g]
        opt = cls(params, **kw)
        benchmark(lambda: opt.step(grads))
    else:
        torch = pytest.importorskip("torch")
        if not (pd == gd == "bf16" and options.get("state_dtype") == "bfloat16"
                and not options.get("master_weights")):
            pytest.skip("torch's fused step keeps the parameter's dtype everywhere")
        t = torch.from_numpy(base).to(torch.bfloat16).requires_grad_()
        t.grad = torch.from_numpy(base_g).to(torch.bfloat16)
        try:
            opt = getattr(torch.optim, torch_name)([t], **TORCH_KW[torch_name], fused=True)
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            pytest.skip(f"no fused bfloat16 {torch_name}")
        benchmark(opt.step)
