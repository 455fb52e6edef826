"""fastopt.torch's C++ tensor reads (csrc/torch_tensors.cpp, fastopt/native_torch.py): what they
read is what torch's own Python API answers, planned steps through them equal torch.optim's,
autograd sees the same version bumps, and a machine that cannot build them still trains."""
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from fastopt import _kernels, native_torch  # noqa: E402


@pytest.fixture(autouse=True)
def reads_in_use():
    if not native_torch.start(wait=True):
        pytest.fail(f"fastopt.torch's C++ reads did not build: {native_torch.status()}")
    assert native_torch.status() == "C++"


def torch_answer(t):
    return t.data_ptr(), t.nbytes, _kernels.torch_dtype_code(t.dtype), t.is_contiguous()


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12, dtype=torch.float32),
    lambda: torch.ones(3, 4, dtype=torch.float64).t(),
    lambda: torch.ones(5, dtype=torch.bfloat16)[1:],
    lambda: torch.ones(4, 6)[:, ::2],
    lambda: torch.zeros(0),
    lambda: torch.ones(3, dtype=torch.complex64),
    lambda: torch.nn.Parameter(torch.ones(7)),
    lambda: torch.ones(2, 3, 4).permute(2, 0, 1).contiguous(),
])
def test_a_dense_tensor_reads_as_torch_answers(make):
    t = make()
    assert _kernels.read_tensor(t) == torch_answer(t)


def test_an_inference_tensor_reads_as_torch_answers():
    with torch.inference_mode():
        t = torch.ones(5)
    assert _kernels.read_tensor(t) == torch_answer(t)


@pytest.mark.parametrize("make", [
    lambda: torch.ones(3).to_sparse(),
    lambda: torch.ones(2, 2).to_sparse_csr(),
    lambda: torch.empty(4, device="meta"),
])
def test_what_only_torch_can_read_goes_to_the_python_route(make):
    assert _kernels.read_tensor(make()) is False


def test_lazily_conjugated_or_negated_views_are_named():
    assert _kernels.read_tensor(torch.ones(3, dtype=torch.complex64).conj()) == "a lazy view"
    assert _kernels.read_tensor(torch._neg_view(torch.ones(3))) == "a lazy view"
    assert isinstance(_kernels.read_tensor(torch.ones(3, dtype=torch.complex64)), tuple)


def test_gradients_read_as_torch_answers():
    p = torch.nn.Parameter(torch.ones(6))
    assert _kernels.read_tensor(p, grad=True) is None
    p.grad = torch.ones(12)[::2]
    assert _kernels.read_tensor(p, grad=True) == torch_answer(p.grad)
    p.grad = torch.ones(6).to_sparse()
    assert _kernels.read_tensor(p, grad=True) is False


def test_dtype_codes_name_each_dtype_once():
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32,
              torch.complex64]
    codes = [_kernels.torch_dtype_code(d) for d in dtypes]
    assert min(codes) >= 0 and len(set(codes)) == len(codes)
    assert _kernels.torch_dtype_code("float32") == -1


def test_read_tensor_refuses_what_is_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        _kernels.read_tensor([1.0])


@pytest.mark.parametrize("cls_name, kw", [("Adam", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                          ("AdamW", dict(lr=0.1, amsgrad=True))])
def test_planned_steps_bump_versions_and_match_torch(cls_name, kw):
    """Many planned steps through the C++ reads: torch's numbers, and each step tells autograd
    that the parameters changed (a graph that saved one must see it), as torch's step does."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4), (1,), (64,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    runs = []
    for module in (torch.optim, ft):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(module, cls_name)(params, **kw)
        versions = []
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
            versions.append([p._version for p in params])
        runs.append((params, versions))
        if module is ft:
            assert opt._plan is not None
    (expected, _), (got, versions) = runs
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for before, after in zip(versions, versions[1:]):
        assert all(x > y for x, y in zip(after, before))


def test_clip_grad_norm_reads_and_bumps_like_torch():
    made = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in [(10,), (3, 3), (0,), (7,)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        made.append(params)
    versions = [p.grad._version for p in made[1]]
    expected = torch.nn.utils.clip_grad_norm_(made[0], 0.5)
    got = ft.clip_grad_norm_(made[1], 0.5)
    torch.testing.assert_close(got, expected)
    for a, b in zip(made[1], made[0]):
        torch.testing.assert_close(a.grad, b.grad)
    assert all(p.grad._version > v for p, v in zip(made[1], versions))


class _MainGrad(torch.nn.Parameter):
    """A parameter whose .grad is another tensor (as Megatron-style main_grad wrappers do)."""

    @property
    def grad(self):
        return self.main_grad

    @grad.setter
    def grad(self, value):
        self.main_grad = value


def test_clip_bumps_the_gradient_a_parameter_type_returns():
    p = _MainGrad(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.full((4,), 4.0)
    versions = p.main_grad._version, q.grad._version
    ft.clip_grad_norm_([p, q], 1.0)
    assert p.main_grad._version > versions[0] and q.grad._version > versions[1]
    torch.testing.assert_close(p.main_grad, torch.full((4,), 0.3))  # (total norm 10)
    torch.testing.assert_close(q.grad, torch.full((4,), 0.4))


@pytest.mark.usefixtures("tensor_reads")
def test_a_gradient_of_a_tensor_subclass_goes_where_the_python_route_sends_it():
    """clip_norm takes plain tensors as gradients; a subclass's (whose methods may be its own)
    is refused with nothing changed, whichever way the gradients are read."""
    class Sub(torch.Tensor):
        pass
    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.full((4,), 3.0).as_subclass(Sub)
    with pytest.raises(TypeError, match="clip_norm takes dense contiguous"):
        opt.step(clip_norm=1.0)
    assert torch.equal(p.detach(), torch.ones(4)) and not opt.state


@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("view", ["conj", "neg"])
def test_a_lazily_conjugated_or_negated_gradient_is_refused(view):
    """Such a view's memory holds other values than it shows (torch resolves them lazily):
    the first step refuses it, and a planned step sends it back to that check."""
    dtype = torch.complex64 if view == "conj" else torch.float32
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = ft.SGD([p], lr=0.5)
    p.grad = torch.ones(4, dtype=dtype)
    opt.step()
    opt.step()  # (planned)
    before = p.detach().clone()
    g = torch.full((4,), 2.0, dtype=dtype)
    p.grad = g.conj() if view == "conj" else torch._neg_view(g)
    if view == "neg" and native_torch.status() != "C++":
        pytest.skip("the Python route's planned checks do not read the negative bit (a private view)")
    with pytest.raises(ValueError, match="conjugated or negated view"):
        opt.step()
    assert torch.equal(p.detach(), before)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__),  # (not the checkout: its fastopt is unbuilt)
                          env={**os.environ, **env})


STEP_AND_REPORT = """
import torch, fastopt.torch as ft
from fastopt import native_torch
p = torch.nn.Parameter(torch.ones(4))
opt = ft.Adam([p], lr=0.5)
for _ in range(3):
    p.grad = torch.full((4,), 2.0)
    opt.step()
ref = torch.nn.Parameter(torch.ones(4))
topt = torch.optim.Adam([ref], lr=0.5)
for _ in range(3):
    ref.grad = torch.full((4,), 2.0)
    topt.step()
assert torch.equal(p.detach(), ref.detach()), (p, ref)
print(native_torch.status())
"""


def test_a_cached_build_is_used_from_the_first_planned_step():
    done = run_python(STEP_AND_REPORT, FASTOPT_CACHE_DIR=os.path.dirname(native_torch.built_path()))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "C++"


def test_a_machine_that_cannot_compile_still_trains(tmp_path):
    done = run_python(STEP_AND_REPORT + "\nprint(native_torch.start(wait=True))",
                      FASTOPT_CACHE_DIR=str(tmp_path), CXX="false")
    assert done.returncode == 0, done.stderr
    status, waited = done.stdout.strip().splitlines()
    assert status.startswith("Python (RuntimeError: the C++ compiler failed") or status == "building"
    assert waited == "False"
    left = os.listdir(tmp_path)  # the failure remembered; no build, partial file or lock left
    assert len(left) == 1 and left[0].endswith(".so.failed"), left
    with open(tmp_path / left[0]) as f:
        assert f.read().startswith("the C++ compiler failed")
    # remembered: a new process does not run the compiler again by itself
    done = run_python(STEP_AND_REPORT, FASTOPT_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("building", "Python (RuntimeError: the C++ compiler failed (1): )")


@pytest.fixture
def copying_compiler(tmp_path, monkeypatch):
    """A stand-in for the C++ compiler that takes two seconds and writes this session's real
    build to its -o (so the tests of the build's life cycle compile nothing)."""
    script = tmp_path / "fake-c++"
    script.write_text("#!/bin/sh\nsleep 2\n"
                      'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                      'cp "$FASTOPT_TEST_BUILD" "$out"\n')
    script.chmod(0o755)
    cache = tmp_path / "cache"
    env = dict(FASTOPT_CACHE_DIR=str(cache), CXX=str(script),
               FASTOPT_TEST_BUILD=native_torch.built_path())
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return cache, env


def test_a_build_outlives_the_process_that_started_it(copying_compiler):
    """A short script starts the build and exits: the build still fills the cache, and a
    process that waits for it meanwhile waits for that build (its lock) rather than starting
    another; nothing else is left behind."""
    cache, env = copying_compiler
    started = run_python("import fastopt.native_torch as n; n.start(); print(n.status())", **env)
    assert started.returncode == 0 and started.stdout.strip() == "building", started
    assert [f for f in os.listdir(cache) if f.endswith(".lock")]  # (its builder runs on)
    waited = run_python(STEP_AND_REPORT, FASTOPT_TORCH_READS="wait", **env)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "C++"
    built = os.path.basename(native_torch.built_path())
    assert sorted(os.listdir(cache)) == [built, built + ".sha256"]


def test_a_damaged_cached_build_is_built_again(copying_compiler):
    cache, env = copying_compiler
    os.makedirs(cache)
    with open(native_torch.built_path(), "wb") as f:  # (the path under the stand-in compiler)
        f.write(b"not a shared object")
    code = STEP_AND_REPORT + "\nprint(native_torch.start(wait=True), native_torch.status())"
    done = run_python(code, FASTOPT_TORCH_READS="python", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True C++"


def test_a_truncated_cached_build_is_built_again_not_loaded(copying_compiler):
    """A cut-off copy of a real build (a full disk, a killed copy) killed every process that
    loaded it (SIGBUS): only a file whose SHA-256 its build wrote is loaded."""
    cache, env = copying_compiler
    os.makedirs(cache)
    with open(env["FASTOPT_TEST_BUILD"], "rb") as f:
        whole = f.read()
    with open(native_torch.built_path(), "wb") as f:  # (the path under the stand-in compiler)
        f.write(whole[:len(whole) // 3])
    code = STEP_AND_REPORT + "\nprint(native_torch.start(wait=True), native_torch.status())"
    done = run_python(code, FASTOPT_TORCH_READS="python", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True C++"


def test_an_old_lock_with_a_live_pid_does_not_hold_a_waiting_process(copying_compiler):
    """A builder killed with SIGKILL leaves its pid in the lock, which another live process may
    have later: a lock older than any build is stale (a waiting process hung forever)."""
    cache, env = copying_compiler
    os.makedirs(cache)
    lock = native_torch.built_path() + ".lock"
    with open(lock, "w") as f:
        f.write(str(os.getpid()))  # (alive: this test's process)
    old = time.time() - 2 * native_torch._MAX_BUILD_S
    os.utime(lock, (old, old))
    done = run_python(STEP_AND_REPORT, FASTOPT_TORCH_READS="wait", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "C++"


def test_python_reads_when_asked():
    done = run_python(STEP_AND_REPORT, FASTOPT_TORCH_READS="python")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Python"


def test_a_bad_reads_setting_fails_at_import():
    done = run_python("import fastopt.torch", FASTOPT_TORCH_READS="fast")
    assert done.returncode != 0
    assert "FASTOPT_TORCH_READS must be one of background, wait, python, not 'fast'" in done.stderr


def test_stop_holds_until_an_explicit_start():
    native_torch.stop()
    assert not _kernels.torch_access_in_use() and native_torch.status().startswith("Python")
    native_torch.start()  # (what each new plan calls: it must not undo stop())
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.SGD([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    assert not _kernels.torch_access_in_use()
    assert native_torch.start(wait=False) and _kernels.torch_access_in_use()


def test_the_benchmark_times_both_routes_and_leaves_the_cpp_one_on():
    from fastopt import benchmark
    per_tensor = benchmark.run_torch_overheads(1, 0.02, n=20)
    assert set(per_tensor) == {"torch fused", "fastopt.torch (C++ reads)", "fastopt.torch (Python reads)"}
    assert _kernels.torch_access_in_use()


def test_planned_steps_and_the_clip_take_the_cpp_reads():
    """The C++ reads are what planned steps and clip_grad_norm_ use once loaded (a route that
    quietly fell back to Python would pass every other test here)."""
    params = [torch.nn.Parameter(torch.ones(5)) for _ in range(3)]
    opt = ft.Adam(params, lr=0.1)
    reads, bumps = _kernels.torch_reads_counts()
    for _ in range(4):  # a validated step, then three planned ones
        for p in params:
            p.grad = torch.ones(5)
        opt.step()
    after = _kernels.torch_reads_counts()
    assert (after[0] - reads, after[1] - bumps) == (3 * 3, 3)
    ft.clip_grad_norm_(params, 1e-3)  # (scales: the gradients' versions are bumped)
    last = _kernels.torch_reads_counts()
    assert (last[0] - after[0], last[1] - after[1]) == (3, 1)
