"""Adafactor (torch 2.13's torch.optim.Adafactor formulas): fastopt.Adafactor against torch's
class and the float64 reference (tests/reference.py) on shapes that take every path of the
kernel (vectors, 0-d, single and batched small matrices, matrices split into tiles by columns
and by row bands, a batch of split matrices), every option; the same bits for any thread
count; fastopt.torch.Adafactor against torch on a small CNN and checkpoints both ways; the
functional form; refusals that change nothing."""
import copy
import functools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastopt
import reference
from conftest import assert_same_snapshot, continue_from_checkpoint, openblas_runs_jobs, snapshot
from fastopt import functional as F

try:
    import torch
    import fastopt.torch as ft
    HAVE_TORCH = True
except ImportError:
    torch = ft = None
    HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread") if HAVE_TORCH else []

STEPS = 50
# A tile holds 262144 elements and at most 4096 columns (csrc/rules/adafactor.inc): (4, 6, 3)
# and (2, 3, 3, 3) are batches of matrices in one tile, (3, 5000) is split by columns (two
# chunks), (600, 700) by row bands (two), (2, 5, 4100) is a batch of two split matrices.
# Matrices of at most 64 elements in rows under 32 go 16 at a time, side by side: (37, 3, 3)
# is two batches and a part one, (9, 1, 5) one-row matrices.
SHAPES = [(), (7,), (5, 3), (4, 6, 3), (2, 3, 3, 3), (1, 1), (3, 5000), (600, 700),
          (2, 5, 4100), (6, 5), (9,), (37, 3, 3), (9, 1, 5)]
TINY = SHAPES.index((1, 1))  # starts at 1e-5: RMS(theta) < eps2, alpha = eps2 rho
# gradients far below 1 where eps1 is reached, so that its value matters: (6, 5)'s row mean
# (~1e-10) is clamped at eps1 for eps1 = 1e-6, 0.1 and float32's machine epsilon, not
# float64's; (9,)'s v (~1e-14) is at float32's eps1^2, and clamped for eps1 = 1e-6 and 0.1
GRAD_SCALE = {SHAPES.index((6, 5)): 1e-5, SHAPES.index((9,)): 1e-7}

# hyperparameter sets: together every option, both branches of each max/min
HPS = [
    dict(),  # the defaults: lr 1e-2, beta2_decay -0.8, eps (None, 1e-3), d 1
    dict(lr=0.05, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=1.25, weight_decay=0.1, maximize=True),
    # rho = min(lr, 1/sqrt(t)) switches branch at t = 4; eps1 large enough that v and the
    # row means are clamped; eps2 = 0: alpha is RMS(theta) rho even for the tiny tensor
    dict(lr=0.5, beta2_decay=-1.0, eps=(0.1, 0.0), d=1.5, weight_decay=0.01),
    # beta2_decay = 0: w = 1, v is this step's g^2 (torch's lerp with weight 1)
    dict(lr=1e-3, beta2_decay=0.0, eps=(None, 1e-3), maximize=True),
]


def hp_id(hp):
    return "-".join(f"{k}={v}" for k, v in hp.items()) or "defaults"


@functools.lru_cache(maxsize=2)
def problem(dtype):
    """(initial params, per-shape (noise arrays, pattern)) in `dtype`, made once: the steps'
    gradients combine them cheaply (grad below)."""
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    init[TINY] *= dtype(1e-5)
    parts = []
    for s in SHAPES:
        noise = [rng.standard_normal(s).astype(dtype) for _ in range(3)]
        # rows and columns of different scales: the factored v is not a constant
        pattern = (np.exp(0.5 * rng.standard_normal(s[:-1] + (1,))) *
                   np.exp(0.5 * rng.standard_normal(s[:-2] + (1,) + s[-1:]))).astype(dtype) \
            if len(s) >= 2 else np.ones(s, dtype)
        parts.append((noise, pattern))
    return init, parts


def grads(dtype, step):
    """Step `step`'s gradients: their scale swings by e^3 over the run, so v lags behind g and
    RMS(u) exceeds d at some steps (the clipping branch) and not at others.  At the first step
    (w = 1: v = g^2) a row and a column of each matrix, an element of the vector and the whole
    (1, 1) are zero: v is clamped at eps1^2, and the row mean at eps1."""
    _, parts = problem(dtype)
    scale = math.exp(1.5 * math.sin(step / 4.0))
    a, b = 1.0 + 0.3 * math.cos(step), 0.7 * math.sin(1.3 * step)
    out = []
    for k, (s, (noise, pattern)) in enumerate(zip(SHAPES, parts)):
        g = (a * noise[step % 3] + b * noise[(step + 1) % 3]) * pattern
        g = np.asarray(g * (scale * GRAD_SCALE.get(k, 1.0)), dtype)
        if step == 0 and len(s) >= 2:
            g[..., 0, :] = 0
            g[..., :, -1] = 0
        elif step == 0 and len(s) == 1:
            g[0] = 0
        out.append(g)
    return out


def param_groups(params, hp):
    """Two groups, the second with half the lr."""
    lr = hp.get("lr", 1e-2)
    return [{"params": params[:4]}, {"params": params[4:], "lr": lr / 2}]


def schedule(step, groups):
    if step == STEPS // 2:  # an lr schedule between steps
        for group in groups:
            group["lr"] *= 0.3


def run_fastopt(hp, dtype, steps=STEPS):
    init, _ = problem(dtype)
    params = [p.copy() for p in init]
    opt = fastopt.Adafactor(param_groups(params, hp), **hp)
    for step in range(steps):
        schedule(step, opt.param_groups)
        opt.step(grads(dtype, step))
    return params, opt


def close(ours, theirs, tol, what):
    """max |ours - theirs| <= tol (a number, or a function of the reference's scale)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    if not theirs.size:
        return
    assert np.isfinite(ours).all(), what
    bound = tol(np.abs(theirs).max()) if callable(tol) else tol
    err = np.abs(ours - theirs).max()
    assert err <= bound, (what, err, bound)


def tolerances(dtype):
    """Against torch, (parameters, state): float64 1e-10 of the tensor's scale; float32 1e-4
    absolute for the parameters (of scale ~1), plus 1e-5 of the scale, and 1e-4 of the scale
    for the state.  torch's float32 reductions are themselves less accurate than fastopt's
    double ones: with lr = 0.5 and eps2 = 0 the parameters grow to ~30, and torch's float32
    run ends 1.3e-4 from the float64 reference on (600, 700), fastopt's float32 run 1.3e-5."""
    if dtype == np.float64:
        return (lambda s: 1e-10 * s + 1e-300), (lambda s: 1e-10 * s + 1e-300)
    return (lambda s: 1e-4 + 1e-5 * s), (lambda s: 1e-4 * s + 1e-30)


# ---- (a) against torch.optim.Adafactor ------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hp", HPS, ids=hp_id)
def test_matches_torch(hp, dtype):
    params, opt = run_fastopt(hp, dtype)
    init, _ = problem(dtype)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    topt = torch.optim.Adafactor(param_groups(tparams, hp), foreach=False, **hp)
    for step in range(STEPS):
        schedule(step, topt.param_groups)
        for p, g in zip(tparams, grads(dtype, step)):
            p.grad = torch.from_numpy(g)
        topt.step()
    param_tol, state_tol = tolerances(dtype)
    for i, (p, tp, p0) in enumerate(zip(params, tparams, init)):
        assert p.dtype == dtype and p.shape == SHAPES[i]
        assert not np.array_equal(p, p0), SHAPES[i]
        close(p, tp.detach().numpy(), param_tol, f"param {SHAPES[i]}")
        ours, theirs = opt.state[i], topt.state[tp]
        assert ours.step == STEPS and theirs["step"].item() == STEPS
        assert sorted(ours.buffers()) == sorted(k for k in theirs if k != "step"), SHAPES[i]
        for name, buf in ours.buffers().items():
            assert buf.dtype == dtype
            close(buf, theirs[name].numpy(), state_tol, f"{name} {SHAPES[i]}")


# ---- (b) against the float64 reference --------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hp", HPS, ids=hp_id)
def test_matches_reference(hp, dtype):
    params, opt = run_fastopt(hp, dtype)
    init, _ = problem(dtype)
    refs, states = [p.astype(np.float64) for p in init], [{} for _ in init]
    lr = hp.get("lr", 1e-2)
    groups = [{"params": range(4), "lr": lr}, {"params": range(4, len(SHAPES)), "lr": lr / 2}]
    for step in range(STEPS):
        schedule(step, groups)
        gs = grads(dtype, step)
        for group in groups:
            for k in group["params"]:
                refs[k] = reference.adafactor(refs[k], gs[k].astype(np.float64), states[k],
                                              **{**hp, "lr": group["lr"]}, dtype=dtype)
    # both branches of max(1, RMS(u) / d) are taken (with beta2_decay = 0, v = g^2: a
    # vector's RMS(u) is 1, a large matrix's above 1 at every step)
    if hp.get("beta2_decay") != 0.0:
        assert all(states[SHAPES.index(s)]["clipped"] for s in [(600, 700), (2, 5, 4100)])
        assert all(states[SHAPES.index(s)]["clipped"] < STEPS for s in [(600, 700), (5, 3)])
    # float32: 50 steps of float32 rounding (measured at most ~2e-5, on tensors of scale ~45)
    param_tol = (lambda s: 1e-12 * s + 1e-300) if dtype == np.float64 else \
        (lambda s: 3e-5 + 2e-6 * s)
    state_tol = (lambda s: (1e-12 if dtype == np.float64 else 1e-5) * s + 1e-300)
    for i, (p, r, state) in enumerate(zip(params, refs, states)):
        close(p, r, param_tol, f"param {SHAPES[i]}")
        assert opt.state[i].step == state["t"] == STEPS
        assert sorted(opt.state[i].buffers()) == \
            sorted(k for k in state if k not in ("t", "clipped"))
        for name, buf in opt.state[i].buffers().items():
            close(buf, state[name], state_tol, f"{name} {SHAPES[i]}")


# ---- (c) the same bits for any thread count ---------------------------------------------------

# A child process per thread count (FASTOPT_NUM_THREADS, as tests/test_threads.py): the
# library's own workers, or with torch loaded first the OpenMP runtime torch brought.  Each
# child steps a large split matrix (19 row bands x 2 column chunks), a batch of two split
# matrices and a vector together, and a CNN's worth of small tensors (600, over the size that
# stays on one thread together), in both dtypes, and prints a digest of every parameter and
# state buffer.
THREADS_CHILD = r"""
import hashlib, json, os, sys
if sys.argv[1] == "torch":
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    (torch.randn(1_000_000) * 2).sum()  # torch's OpenMP workers exist
import numpy as np, fastopt
out = {}
for kind in ("split", "many_small"):
    shapes = ([(1200, 5000), (2, 300, 1000), (33,)] if kind == "split" else
              [(16, 8, 3, 3), (16,), (10, 7), (3, 3, 1, 1), ()] * 120)
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(3)
        def randn(shape, scale=1.0):
            return np.asarray(rng.standard_normal(shape, dtype=np.float32) * scale, dtype)
        params = [randn(s) for s in shapes]
        first = params[0].copy()
        opt = fastopt.Adafactor(params, lr=0.05, weight_decay=0.01)
        for k in range(3):
            opt.step([randn(s, 1.0 + k) for s in shapes])
        assert not np.array_equal(first, params[0])
        digest = hashlib.sha256()
        for i, p in enumerate(params):
            digest.update(p.tobytes())
            for name, buf in sorted(opt.state[i].buffers().items()):
                digest.update(name.encode() + buf.tobytes())
        out[kind + "-" + np.dtype(dtype).name] = digest.hexdigest()
tasks = "/proc/self/task"
workers = (sum(open(f"{tasks}/{t}/comm").read().startswith("fastopt") for t in os.listdir(tasks))
           if os.path.isdir(tasks) else None)
libgomp = os.path.exists("/proc/self/maps") and "libgomp" in open("/proc/self/maps").read()
print(json.dumps({"digests": out, "workers": workers, "libgomp": libgomp}))
"""
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}
for _var in ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS"):
    CHILD_ENV.pop(_var, None)


def run_threads_child(mode, threads, omp=None, blas=1):
    # blas: OpenBLAS's thread count (1: the library's own workers; more: OpenBLAS's)
    env = {**CHILD_ENV, "FASTOPT_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(blas)}
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    res = subprocess.run([sys.executable, "-c", THREADS_CHILD, mode], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def one_thread_digests():
    return run_threads_child("numpy", 1)["digests"]


@pytest.mark.parametrize("threads", [2, 3])
def test_own_workers_give_the_one_thread_bits(threads, one_thread_digests):
    got = run_threads_child("numpy", threads)
    assert got["digests"] == one_thread_digests
    if got["workers"] is not None:
        assert got["workers"] == threads - 1  # the library's own workers did the splitting


@pytest.mark.skipif(not openblas_runs_jobs(), reason="numpy's BLAS is not a pthread OpenBLAS")
def test_openblas_workers_give_the_one_thread_bits(one_thread_digests):
    got = run_threads_child("numpy", 2, blas=2)
    assert got["digests"] == one_thread_digests
    if got["workers"] is not None and len(os.sched_getaffinity(0)) >= 2:
        assert got["workers"] == 0  # the split ran on OpenBLAS's workers


@needs_torch
def test_torch_openmp_runtime_gives_the_one_thread_bits(one_thread_digests):
    got = run_threads_child("torch", 3, omp=2)
    assert got["digests"] == one_thread_digests
    if got["libgomp"] and got["workers"] is not None:
        assert got["workers"] == 0  # the split ran on the OpenMP runtime torch had loaded


def test_set_num_threads_changes_no_bit():
    """The same in this process, through fastopt.set_num_threads (with whatever runtime the
    test session has loaded)."""
    rng = np.random.default_rng(5)
    shapes = [(1200, 5000), (3, 3), (7,)]
    init = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    steps = [[rng.standard_normal(s, dtype=np.float32) * (1 + k) for s in shapes]
             for k in range(3)]
    before = fastopt.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fastopt.set_num_threads(threads)
            assert fastopt.get_num_threads() == threads
            params = [p.copy() for p in init]
            opt = fastopt.Adafactor(params, lr=0.05)
            for gs in steps:
                opt.step(gs)
            results.append(params + [b for i in range(len(shapes))
                                     for _, b in sorted(opt.state[i].buffers().items())])
    finally:
        fastopt.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b, strict=True)


# ---- (d) fastopt.torch.Adafactor against torch.optim.Adafactor on a small CNN -----------------

def cnn(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 6, 3), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 10), torch.nn.Tanh(),
        torch.nn.Linear(10, 3)).to(dtype)


def train(model, opt, start, steps, dtype, maximize=False):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 1, 8, 8, generator=gen, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (-loss if maximize else loss).backward()  # maximize: ascend the negated loss
        opt.step()


TORCH_DTYPES = [pytest.param("float32", id="float32"), pytest.param("float64", id="float64")]
MODEL_HPS = [dict(), dict(lr=0.05, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=1.2, weight_decay=0.1,
                          maximize=True)]


def model_tolerance(dtype):
    return (lambda s: 1e-10 * s) if dtype == torch.float64 else (lambda s: 1e-4)


def assert_models_close(a, b, dtype):
    tol = model_tolerance(dtype)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        close(q.detach().numpy(), p.detach().numpy(), tol, name)


@needs_torch
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
@pytest.mark.parametrize("hp", MODEL_HPS, ids=hp_id)
def test_fastopt_torch_matches_torch_on_a_cnn(hp, dtype_name):
    dtype = getattr(torch, dtype_name)
    theirs, ours = cnn(dtype), cnn(dtype)
    topt = torch.optim.Adafactor(theirs.parameters(), foreach=False, **hp)
    fopt = ft.Adafactor(ours.parameters(), **hp)
    initial = [p.detach().clone() for p in ours.parameters()]
    maximize = hp.get("maximize", False)
    train(theirs, topt, 0, STEPS, dtype, maximize)
    train(ours, fopt, 0, STEPS, dtype, maximize)
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), initial))
    assert_models_close(theirs, ours, dtype)
    a, b = topt.state_dict(), fopt.state_dict()
    for group in a["param_groups"]:
        group["foreach"] = None  # torch's was built with foreach=False, ours with the default
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    tol = model_tolerance(dtype) if dtype == torch.float64 else (lambda s: 1e-4 * s + 1e-30)
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys(), k
        for key, value in a["state"][k].items():
            assert b["state"][k][key].dtype == value.dtype, (k, key)
            assert b["state"][k][key].shape == value.shape, (k, key)
            close(b["state"][k][key].numpy(), value.numpy(), tol, (k, key))
    keys = {tuple(sorted(s)) for s in b["state"].values()}
    assert keys == {("col_var", "row_var", "step"), ("step", "variance")}  # conv, linear, bias


@needs_torch
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch", "fastopt->fastopt"])
def test_state_dicts_load_into_each_other(direction, dtype_name):
    dtype = getattr(torch, dtype_name)
    first, second = {"torch->fastopt": (torch.optim, ft), "fastopt->torch": (ft, torch.optim),
                     "fastopt->fastopt": (ft, ft)}[direction]
    hp = MODEL_HPS[1]
    model = cnn(dtype)
    opt = first.Adafactor(model.parameters(), **hp)
    train(model, opt, 0, STEPS // 2, dtype, maximize=True)
    resumed = copy.deepcopy(model)
    opt2 = second.Adafactor(resumed.parameters(), lr=0.3)  # the checkpoint brings the rest
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == hp["lr"] and opt2.param_groups[0]["d"] == hp["d"]
    train(model, opt, STEPS // 2, STEPS // 2, dtype, maximize=True)      # the original goes on
    train(resumed, opt2, STEPS // 2, STEPS // 2, dtype, maximize=True)   # and the loaded one
    if first is second:
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(p, q)
    else:
        assert_models_close(model, resumed, dtype)
    for p in resumed.parameters():
        assert opt2.state[p]["step"].item() == STEPS


@pytest.mark.parametrize("via_file", [False, True], ids=["state_dict", "npz"])
@pytest.mark.parametrize("hp", [dict(), HPS[1]], ids=hp_id)
def test_numpy_checkpoint_continues_identically(hp, via_file, tmp_path):
    """fastopt.Adafactor's own checkpoints: each parameter's state has the buffers of its
    shape (row_var and col_var, or variance), and eps may hold None."""
    shapes = [(), (7,), (5, 3), (2, 3, 3, 3)]
    rng = np.random.default_rng(4)
    init = [np.asarray(rng.standard_normal(s)) for s in shapes]
    a = fastopt.Adafactor([p.copy() for p in init], **hp)
    b = fastopt.Adafactor([p.copy() for p in init], **hp)
    steps = [[np.asarray(rng.standard_normal(s)) for s in shapes] for _ in range(6)]
    for gs in steps[:3]:
        a.step(gs)
    continue_from_checkpoint(a, b, via_file, tmp_path)
    for gs in steps[3:]:
        a.step(gs)
        b.step(gs)
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        np.testing.assert_array_equal(pa, pb, strict=True)
        assert a.state[i].buffers().keys() == b.state[i].buffers().keys()
        assert b.state[i].step == 6


# ---- (e) refusals: nothing changes ---------------------------------------------------------------

def trained(**hp):
    """fastopt.Adafactor over a matrix, a vector and a batch of matrices, of two dtypes,
    after two steps."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal((2, 3, 4)).astype(np.float32)]
    opt = fastopt.Adafactor(params, **hp)
    for _ in range(2):
        opt.step(good_grads(opt))
    return opt


def good_grads(opt):
    return [np.full_like(p, 0.5) for p in opt.params]


# (hyperparameters, error, a word the message must contain)
BAD_HPS = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=math.nan), ValueError, "lr"),
    (dict(lr=math.inf), ValueError, "lr"),
    (dict(beta2_decay=0.1), ValueError, "beta2_decay"),
    (dict(beta2_decay=math.nan), ValueError, "beta2_decay"),
    (dict(eps=(-1e-3, 1e-3)), ValueError, "eps1"),
    (dict(eps=(-1.0, 1e-3)), ValueError, "eps1"),  # not the machine epsilon that None means
    (dict(eps=(math.nan, 1e-3)), ValueError, "eps[0]"),
    (dict(eps=(None, -1e-3)), ValueError, "eps2"),
    (dict(eps=(None, math.nan)), ValueError, "eps[1]"),
    (dict(eps=1e-3), TypeError, "eps"),
    (dict(eps=(None,)), TypeError, "eps"),
    (dict(eps=(None, None)), TypeError, "eps[1]"),
    (dict(d=0.5), ValueError, "d"),
    (dict(d=math.nan), ValueError, "d"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay"),
    (dict(maximize=1), TypeError, "maximize"),
    (dict(lr="0.1"), TypeError, "lr"),
]
BAD_IDS = [f"{k}={v}" for hp, _, _ in BAD_HPS for k, v in hp.items()]


@pytest.mark.parametrize("hp, error, word", BAD_HPS, ids=BAD_IDS)
def test_bad_hyperparameter_is_refused_at_construction(hp, error, word):
    with pytest.raises(error, match=re.escape(word)):
        fastopt.Adafactor([np.ones((3, 2))], **hp)


@pytest.mark.parametrize("hp, error, word", BAD_HPS, ids=BAD_IDS)
def test_bad_hyperparameter_between_steps_changes_nothing(hp, error, word):
    opt = trained()
    for k, v in hp.items():
        opt.param_groups[0][k] = v
    grads_ = good_grads(opt)
    before = snapshot(opt, grads_)
    with pytest.raises(error, match=re.escape(word)):
        opt.step(grads_)
    assert_same_snapshot(before, snapshot(opt, grads_))
    assert all(s.step == 2 for s in opt.state.values())


@pytest.mark.parametrize("hp, error, word", BAD_HPS, ids=BAD_IDS)
def test_functional_bad_hyperparameter_changes_nothing(hp, error, word):
    rng = np.random.default_rng(1)
    param = rng.standard_normal((4, 3)).astype(np.float32)
    grad = rng.standard_normal((4, 3)).astype(np.float32)
    state = fastopt.AdafactorState.new(param)
    F.adafactor(param, grad, state)
    before = (param.copy(), {k: v.copy() for k, v in state.buffers().items()})
    with pytest.raises(error, match=re.escape(word)):
        F.adafactor(param, grad, state, **hp)
    np.testing.assert_array_equal(param, before[0], strict=True)
    assert state.step == 1 and state.buffers().keys() == before[1].keys()
    for k, v in before[1].items():
        np.testing.assert_array_equal(state.buffers()[k], v, strict=True)


def state_corruptions():
    """(name, how to corrupt opt.state (params: (4, 3) f32, (5,) f64, (2, 3, 4) f32), error,
    message)."""
    def setter(i, name, value):
        def corrupt(opt):
            setattr(opt.state[i], name, value(opt.params[i]) if callable(value) else value)
        return corrupt

    return [
        ("row_var shaped like the param", setter(0, "row_var", lambda p: np.zeros_like(p)),
         ValueError, r"state\[0\]\.row_var has shape \(4, 3\).*must be \(4, 1\)"),
        ("row_var transposed", setter(0, "row_var", np.zeros((1, 4), np.float32)), ValueError,
         r"state\[0\]\.row_var has shape \(1, 4\)"),
        ("col_var transposed", setter(2, "col_var", np.zeros((2, 4, 1), np.float32)), ValueError,
         r"state\[2\]\.col_var has shape \(2, 4, 1\).*must be \(2, 1, 4\)"),
        ("col_var flat", setter(0, "col_var", np.zeros(3, np.float32)), ValueError,
         r"state\[0\]\.col_var has shape"),
        ("variance for a matrix", setter(0, "variance", lambda p: np.zeros_like(p)), ValueError,
         r"state\[0\]\.variance does not apply to a parameter of shape \(4, 3\)"),
        ("row_var for a vector", setter(1, "row_var", np.zeros((5, 1))), ValueError,
         r"state\[1\]\.row_var does not apply"),
        ("col_var missing", setter(2, "col_var", None), ValueError,
         r"state\[2\]\.col_var is missing"),
        ("variance missing", setter(1, "variance", None), ValueError,
         r"state\[1\]\.variance is missing"),
        ("row_var dtype", setter(0, "row_var", np.zeros((4, 1))), TypeError,
         r"state\[0\]\.row_var has dtype float64"),
        ("col_var read-only", lambda opt: opt.state[0].col_var.setflags(write=False), ValueError,
         r"state\[0\]\.col_var is read-only"),
    ]


@pytest.mark.parametrize("name, corrupt, error, match", state_corruptions(),
                         ids=[c[0] for c in state_corruptions()])
def test_bad_state_buffer_changes_nothing(name, corrupt, error, match):
    opt = trained()
    corrupt(opt)
    grads_ = good_grads(opt)
    before = snapshot(opt, grads_)
    with pytest.raises(error, match=match):
        opt.step(grads_)
    assert_same_snapshot(before, snapshot(opt, grads_))


def test_functional_refuses_a_state_that_does_not_fit():
    param, grad = np.ones((4, 3)), np.full((4, 3), 0.5)
    cases = [
        (fastopt.AdafactorState(row_var=np.zeros((4, 1)), col_var=np.zeros((1, 3)),
                                variance=np.zeros((4, 3))), "variance does not apply"),
        (fastopt.AdafactorState(row_var=np.zeros((3, 1)), col_var=np.zeros((1, 3))),
         r"row_var has shape \(3, 1\)"),
        (fastopt.AdafactorState(row_var=np.zeros((4, 1))), "col_var is missing"),
        (fastopt.AdafactorState.new(np.ones(12)), "row_var is missing|variance does not apply"),
        (fastopt.AdamState.new(param), "AdafactorState"),
    ]
    for state, match in cases:
        buffers = {k: v.copy() for k, v in state.buffers().items()}
        with pytest.raises((ValueError, TypeError), match=match):
            F.adafactor(param, grad, state)
        assert state.step == 0
        for k, v in buffers.items():
            np.testing.assert_array_equal(state.buffers()[k], v)
    np.testing.assert_array_equal(param, np.ones((4, 3)))


def test_sparse_rows_are_refused():
    opt = trained()
    grads_ = good_grads(opt)
    grads_[0] = fastopt.SparseGrad(np.array([1, 3]), np.ones((2, 3), np.float32))
    before = snapshot(opt)
    with pytest.raises(TypeError, match="Adafactor takes dense gradients"):
        opt.step(grads_)
    assert_same_snapshot(before, snapshot(opt))
    with pytest.raises(ValueError, match="Adafactor"):
        fastopt.Adafactor([np.zeros((3, 2))], sparse="exact")


def test_bfloat16_state_is_refused():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(ValueError, match="factored second moments need float32/float64 state"):
        fastopt.Adafactor([np.ones((3, 2), np.float32)], state_dtype="bfloat16")
    with pytest.raises(ValueError, match="factored second moments need float32/float64 state"):
        fastopt.Adafactor([np.ones((3, 2), ml_dtypes.bfloat16)], state_dtype="bfloat16")


# every way the passes read a tensor: a long vector (pieces of 4,096), a small and an in-cache
# matrix, a batch of matrices, 1 x 1 matrices, one row, and a matrix split into tiles
BF16_SHAPES = [(10000,), (5, 7), (130, 120), (2, 3, 5, 7), (4, 3, 1, 1), (1, 9), (600, 500), (40, 3, 3)]


@pytest.mark.parametrize("storage", ["bfloat16 params and grads", "bfloat16 grads",
                                     "master weights", "bfloat16 params, EMA"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bfloat16_step_is_the_float32_step_rounded(storage, rounding):
    """bfloat16 parameters and gradients: every pass reads them widened, so the step is the
    float32 step on the widened values (the same norms, bit for bit), the parameter then
    rounded as the keyed generator says (to nearest from the master with master weights)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from bf16_reference import random_bits, round_bf16
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(2)
    param_dtype = np.float32 if storage == "bfloat16 grads" else bf16
    kw = dict(lr=0.05, weight_decay=0.1, rounding=rounding, seed=7)
    if storage == "master weights":
        kw["master_weights"] = True
    if storage == "bfloat16 params, EMA":
        kw["ema_decay"] = 0.5
    params = [rng.standard_normal(s).astype(param_dtype) for s in BF16_SHAPES]
    opt = fastopt.Adafactor(params, **kw)
    opt.step([rng.standard_normal(s).astype(bf16) for s in BF16_SHAPES])
    for _ in range(2):
        grads = [(rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(bf16) for s in BF16_SHAPES]
        ref = fastopt.Adafactor([(opt.state[i].master if storage == "master weights" else p)
                                 .astype(np.float32) for i, p in enumerate(params)],
                                lr=0.05, weight_decay=0.1,
                                ema_decay=kw.get("ema_decay"))
        for i in range(len(params)):
            ref.state[i] = copy.deepcopy(opt.state[i])
            ref.state[i].master = None
        opt.step(grads)
        ref.step([g.astype(np.float32) for g in grads])
        for i, p in enumerate(params):
            want = ref.param_groups[0]["params"][i]
            for name in ("row_var", "col_var", "variance"):
                if getattr(opt.state[i], name) is not None:
                    np.testing.assert_array_equal(getattr(opt.state[i], name),
                                                  getattr(ref.state[i], name), strict=True)
            if param_dtype == np.float32:
                np.testing.assert_array_equal(p, want, strict=True)
                continue
            if storage == "master weights":
                np.testing.assert_array_equal(opt.state[i].master, want, strict=True)
                expected = round_bf16(want.ravel(), "nearest")
            else:
                expected = round_bf16(want.ravel(), rounding,
                                      random_bits(7, i, opt.state[i].step, 3, p.size))
            assert np.array_equal(p.view(np.uint16).ravel(), expected), (BF16_SHAPES[i], storage)
            if storage == "bfloat16 params, EMA":
                np.testing.assert_array_equal(opt.state[i].ema, ref.state[i].ema, strict=True)


@needs_torch
def test_fastopt_torch_refusals_change_nothing():
    def torch_snapshot(opt, params):
        return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())

    def same(a, b):
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        assert str(a[1]) == str(b[1])

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = ft.Adafactor(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    # hyperparameters set between steps, in torch's wording
    for key, value, error, match in [
            ("lr", -1.0, ValueError, "Invalid learning rate"),
            ("lr", math.nan, ValueError, "Invalid learning rate"),
            ("beta2_decay", 0.5, ValueError, "beta2_decay should be <= 0"),
            ("eps", (-1.0, 1e-3), ValueError, "epsilon1 should be >= 0"),
            ("eps", (None, -1.0), ValueError, "epsilon2 should be >= 0"),
            ("eps", (None, math.nan), ValueError, "epsilon2 should be >= 0"),
            ("eps", 1e-3, TypeError, "eps must be a pair"),
            ("d", 0.5, ValueError, "Clipping threshold d should be >= 1"),
            ("d", math.inf, ValueError, "Clipping threshold d should be >= 1"),
            ("weight_decay", -1.0, ValueError, "Invalid weight_decay value")]:
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        before = torch_snapshot(opt, params)
        with pytest.raises(error, match=re.escape(match)):
            opt.step()
        same(before, torch_snapshot(opt, params))
        opt.param_groups[0][key] = good
    # state buffers that do not fit the parameter
    state = opt.state[params[0]]
    for key, value, match in [("row_var", torch.zeros(4, 3), "state 'row_var'"),
                              ("col_var", torch.zeros(3, 1), "state 'col_var'"),
                              ("variance", torch.zeros(4, 3), "'variance' does not apply")]:
        good = state.get(key)
        state[key] = value
        before = torch_snapshot(opt, params)
        with pytest.raises(ValueError, match=match):
            opt.step()
        same(before, torch_snapshot(opt, params))
        if good is None:
            del state[key]
        else:
            state[key] = good
    opt.step()  # fits again
    assert state["step"].item() == 2
    # the constructor's checks are torch's own, with its messages
    for kwargs in [dict(lr=-1.0), dict(beta2_decay=0.5), dict(eps=(-1.0, 1e-3)),
                   dict(eps=(None, -1.0)), dict(d=0.5), dict(weight_decay=-1.0),
                   dict(lr=math.nan)]:
        with pytest.raises(ValueError) as theirs:
            torch.optim.Adafactor([torch.nn.Parameter(torch.ones(2))], **kwargs)
        with pytest.raises(ValueError) as ours:
            ft.Adafactor([torch.nn.Parameter(torch.ones(2))], **kwargs)
        assert str(ours.value) == str(theirs.value)


@needs_torch
def test_fastopt_torch_refuses_sparse_bfloat16_and_complex():
    emb = torch.nn.Embedding(6, 3, sparse=True)
    emb(torch.tensor([1, 4])).sum().backward()
    opt = ft.Adafactor(emb.parameters())
    before = emb.weight.detach().clone()
    with pytest.raises((TypeError, RuntimeError), match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and not opt.state
    for p in [torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(3, 2)]:
        with pytest.raises(ValueError, match="factored second moments need float32/float64 state"):
            ft.Adafactor([torch.nn.Parameter(p)], state_dtype="bfloat16")
    # complex parameters: torch's Adafactor refuses them (at its step), and so does fastopt's
    c = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.complex64))
    with pytest.raises((TypeError, RuntimeError), match="complex"):
        opt = ft.Adafactor([c])
        c.grad = torch.ones_like(c)
        opt.step()
    assert torch.equal(c.detach(), torch.ones(3, 2, dtype=torch.complex64))
    real = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adafactor([real])
    with pytest.raises((TypeError, RuntimeError), match="complex"):
        opt.add_param_group({"params": [c]})
        c.grad = torch.ones_like(c)
        real.grad = torch.ones_like(real)
        opt.step()
    assert torch.equal(c.detach(), torch.ones(3, 2, dtype=torch.complex64))


# ---- (f) the functional form ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hp", HPS[:3], ids=hp_id)
def test_functional_matches_the_class(hp, dtype):
    init, _ = problem(dtype)
    params = [p.copy() for p in init]
    opt = fastopt.Adafactor(params, **hp)
    own = [p.copy() for p in init]
    states = [fastopt.AdafactorState.new(p) for p in own]
    for p, state in zip(own, states):  # fresh: zero buffers of the rule's shapes, step 0
        assert state.step == 0
        expected = {"variance": p.shape} if p.ndim < 2 else \
            {"row_var": p.shape[:-1] + (1,), "col_var": p.shape[:-2] + (1,) + p.shape[-1:]}
        assert {k: v.shape for k, v in state.buffers().items()} == expected
        assert all(v.dtype == dtype and not v.any() for v in state.buffers().values())
    for step in range(5):
        gs = grads(dtype, step)
        opt.step(gs)
        for p, g, state in zip(own, gs, states):
            F.adafactor(p, g, state, **hp)
    for i, (a, b) in enumerate(zip(params, own)):
        np.testing.assert_array_equal(a, b, strict=True)
        assert opt.state[i].step == states[i].step == 5
        assert opt.state[i].buffers().keys() == states[i].buffers().keys()
        for k, v in opt.state[i].buffers().items():
            np.testing.assert_array_equal(v, states[i].buffers()[k], strict=True)


def test_empty_parameters_step():
    """Tensors without elements (torch's own step divides by their size): nothing to update,
    the state has the rule's shapes, and the other tensors of the step are unaffected."""
    shapes = [(0,), (5, 0), (0, 5), (2, 0, 3)]
    params = [np.ones(s) for s in shapes] + [np.ones((3, 4))]
    alone = np.ones((3, 4))
    opt, single = fastopt.Adafactor(params), fastopt.Adafactor([alone])
    for _ in range(2):
        opt.step([np.full(p.shape, 0.5) for p in params])
        single.step([np.full((3, 4), 0.5)])
    np.testing.assert_array_equal(params[-1], alone)
    for i, s in enumerate(shapes):
        assert params[i].shape == s and opt.state[i].step == 2
        for name, buf in opt.state[i].buffers().items():
            assert buf.shape == fastopt.AdafactorState.buffer_shape(params[i], name)
            assert not buf.any()


@needs_torch
def test_fastopt_torch_bfloat16_steps_are_the_float32_steps_rounded():
    """fastopt.torch's Adafactor on bfloat16 parameters and gradients, planned steps included:
    each step is its float32 step on the widened values, rounded to nearest."""
    g = torch.Generator().manual_seed(0)
    shapes = [(10000,), (5, 7), (600, 500), (4, 3, 1, 1)]
    init = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    stored = [torch.nn.Parameter(t.clone()) for t in init]
    widened = [torch.nn.Parameter(t.float()) for t in init]
    opt_stored = ft.Adafactor(stored, lr=0.05, weight_decay=0.1, rounding="nearest")
    opt_widened = ft.Adafactor(widened, lr=0.05, weight_decay=0.1)
    for _ in range(4):
        for p, q in zip(stored, widened):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            q.grad = p.grad.float()
        opt_stored.step()
        opt_widened.step()
        for p, q in zip(stored, widened):
            assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))
            with torch.no_grad():
                q.copy_(p.float())  # (the next step starts from the stored values)
        for p, q in zip(stored, widened):
            for name, value in opt_widened.state[q].items():
                assert torch.equal(opt_stored.state[p][name], value), name
    assert opt_stored._plan is not None
