"""fastopt.torch's C++ tensor reads (csrc/torch_tensors.cpp, fastopt/native_torch.py): what they
read is what torch's own Python API answers, planned steps through them equal torch.optim's,
autograd sees the same version bumps, and a machine that cannot build them still trains."""
import os
import subprocess
import sys

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
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".so")]  # no partial build left


def test_python_reads_when_asked():
    done = run_python(STEP_AND_REPORT, FASTOPT_TORCH_READS="python")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Python"


def test_a_bad_reads_setting_fails_at_import():
    done = run_python("import fastopt.torch", FASTOPT_TORCH_READS="fast")
    assert done.returncode != 0
    assert "FASTOPT_TORCH_READS must be one of background, wait, python, not 'fast'" in done.stderr
