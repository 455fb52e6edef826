import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, PathFinder

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _skip_unbuilt_checkout():
    """`python -m pytest` puts the current folder first on sys.path: from the checkout's root
    that is the source tree, whose fastopt/ has no compiled extension unless it was built in
    place.  Then test the installed fastopt, as plain `pytest` does."""
    source = os.path.join(ROOT, "fastopt")
    if not os.path.isdir(source) or any(
            f.startswith("_kernels.") and f.endswith(tuple(EXTENSION_SUFFIXES))
            for f in os.listdir(source)):
        return
    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != ROOT]
    if PathFinder.find_spec("fastopt", others) is not None:  # else fastopt's own error says why
        sys.path[:] = others


_skip_unbuilt_checkout()

import fastopt  # noqa: E402


# (optimizer class, hyperparameters) for every rule x the options that change its formula
CASES = [
    (fastopt.SGD, dict(lr=0.05)),
    (fastopt.SGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    (fastopt.SGD, dict(lr=0.05, momentum=0.9)),
    (fastopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fastopt.Adagrad, dict(lr=0.05)),
    (fastopt.Adagrad, dict(lr=0.05, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True)),
    (fastopt.Adadelta, dict()),
    (fastopt.Adadelta, dict(lr=0.5, rho=0.95, weight_decay=0.1, maximize=True)),
    (fastopt.RMSprop, dict(lr=0.01)),
    (fastopt.RMSprop, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    (fastopt.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (fastopt.Adam, dict(lr=0.01)),
    (fastopt.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    (fastopt.Adam, dict(lr=0.01, amsgrad=True)),
    (fastopt.AdamW, dict(lr=0.01)),
    (fastopt.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    (fastopt.AdaMax, dict(lr=0.01)),
    (fastopt.AdaMax, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    (fastopt.Nadam, dict(lr=0.01)),
    (fastopt.Nadam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    (fastopt.Lion, dict(lr=0.01)),
    (fastopt.Lion, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, maximize=True)),
    (fastopt.RAdam, dict(lr=0.01)),
    (fastopt.RAdam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    (fastopt.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (fastopt.Rprop, dict(lr=0.01)),
    (fastopt.Rprop, dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2), maximize=True)),
    (fastopt.ASGD, dict(lr=0.01)),
    (fastopt.ASGD, dict(lr=0.05, lambd=0.1, alpha=0.5, t0=20, weight_decay=0.1, maximize=True)),
    (fastopt.LAMB, dict(lr=0.01)),
    (fastopt.LAMB, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1, maximize=True)),
    (fastopt.LARS, dict(lr=0.1)),
    (fastopt.LARS, dict(lr=0.5, momentum=0.5, weight_decay=0.01, trust_coefficient=0.02,
                        maximize=True)),
    (fastopt.RowwiseAdagrad, dict(lr=0.05)),
    (fastopt.RowwiseAdagrad, dict(lr=0.05, eps=1e-6, weight_decay=0.1, maximize=True)),
    (fastopt.Adafactor, dict(lr=0.05)),
    (fastopt.Adafactor, dict(lr=0.05, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=2.0, weight_decay=0.1,
                             maximize=True)),
]


def case_id(case):
    cls, hp = case
    return cls.__name__ + ("-" + "-".join(f"{k}={v}" for k, v in hp.items()) if hp else "")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch with one intra-op thread for a module of tiny tensors: a second thread gains
    nothing there, and OpenMP's spinning workers make them several times slower on a busy
    2-vCPU machine (three small-CNN runs: 51 s, 1 thread 7 s; sparse ops ~2 ms a call).
    fastopt's results do not depend on it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def snapshot(opt, grads=()):
    """Deep copies of every parameter, state buffer, counter and hyperparameter of `opt`."""
    return ([p.copy() for p in opt.params],
            {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.to_dict().items()}
             for i, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            [g.copy() for g in grads if isinstance(g, np.ndarray)])


def assert_same_snapshot(a, b):
    params_a, state_a, groups_a, grads_a = a
    params_b, state_b, groups_b, grads_b = b
    for x, y in zip(params_a + grads_a, params_b + grads_b):
        np.testing.assert_array_equal(x, y, strict=True)
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for k in state_a[i]:
            if isinstance(state_a[i][k], np.ndarray):
                np.testing.assert_array_equal(state_a[i][k], state_b[i][k], strict=True)
            else:
                assert state_a[i][k] == state_b[i][k]
    assert groups_a == groups_b


def torch_snapshot(opt):
    """Copies of every parameter, state tensor and step counter of a torch optimizer, in group
    order."""
    import torch
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"] if p in opt.state]
    return params, state


def assert_torch_unchanged(before, after):
    import torch
    params_a, state_a = before
    params_b, state_b = after
    assert len(params_a) == len(params_b) and len(state_a) == len(state_b)
    for a, b in zip(params_a, params_b):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(state_a, state_b):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def continue_from_checkpoint(a, b, via_file, folder):
    """b takes a's parameters' values and a's checkpoint: through a file in `folder`
    (save/load) or through state_dict/load_state_dict."""
    for pa, pb in zip(a.params, b.params):
        pb[...] = pa
    if via_file:
        a.save(folder / "checkpoint.npz")
        b.load(folder / "checkpoint.npz")
    else:
        b.load_state_dict(a.state_dict())


@pytest.fixture(scope="session", autouse=True)
def _torch_reads_built():
    """fastopt.torch's C++ tensor reads built (or loaded from the cache) before any test, so
    every test sees one route; tests that must see both take `tensor_reads`."""
    try:
        import torch  # noqa: F401
    except ImportError:
        yield
        return
    from fastopt import native_torch
    native_torch.start(wait=True)  # (test_native_torch.py fails, with the reason, if it cannot)
    yield


@pytest.fixture(params=["C++", "Python"])
def tensor_reads(request):
    """The test runs once with fastopt.torch's planned steps reading tensors in C++, once through
    torch's Python API (fastopt/native_torch.py)."""
    from fastopt import _kernels, native_torch
    if request.param == "Python":
        native_torch.stop()
    elif not native_torch.start(wait=True):
        pytest.fail(f"fastopt.torch's C++ reads did not build: {native_torch.status()}")
    yield request.param
    # the route held through the test (a new plan must not switch it back on)
    assert _kernels.torch_access_in_use() == (request.param == "C++")
    native_torch.start(wait=True)


def openblas_runs_jobs():
    """Whether numpy's BLAS is a pthread OpenBLAS that exports gotoblas_pthread, on whose
    workers (csrc/threads.c) a step's helpers then run."""
    return any(hasattr(lib, "gotoblas_pthread") for _, lib in fastopt.config._openblas_libraries())
