"""The thread pool (csrc/threads.c): the same bits for any thread count on both of its paths
(its own workers, and the OpenMP runtime torch has loaded), after fork, and no worker left
spinning once the pool is idle."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
import reference
from conftest import openblas_runs_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}
for var in ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS"):
    CHILD_ENV.pop(var, None)

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

# Tensor sizes whose pieces straddle tensor boundaries, empty and one-element tensors among
# them; together well over the size below which a call stays on one thread.
SIZES = (0, 1, 5, 131_071, 16_384 * 9 + 3, 700_001, 1_000_003)

CHILD = r"""
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
mode = sys.argv[2]
if mode == "torch":
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    (torch.randn(1_000_000) * 2).sum()  # torch's OpenMP workers exist and spin
import numpy as np, fastopt
from conftest import CASES
CASES = [c for c in CASES if c[0].__name__ in %(rules)r]

def run_cases():
    out = {}
    for k, (cls, hp) in enumerate(CASES):
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(k)
            params = [rng.standard_normal(n).astype(dtype) for n in %(sizes)r]
            opt = cls(params, **hp)
            for _ in range(3):
                opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params])
            out[f"{k}-{np.dtype(dtype).name}"] = hashlib.sha256(b"".join(p.tobytes() for p in params)).hexdigest()
    return out

def fastopt_threads():
    return sum(open(f"/proc/self/task/{t}/comm").read().startswith("fastopt")
               for t in os.listdir("/proc/self/task"))

result = {"cases": run_cases(), "workers": fastopt_threads(),
          "libgomp": "libgomp" in open("/proc/self/maps").read()}
if "fork" in sys.argv[3:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(run_cases()).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.waitpid(pid, 0)
    result["forked"] = json.loads(data)
print(json.dumps(result))
""" % {"sizes": SIZES, "rules": ("SGD", "Adadelta", "AdamW", "Nadam")}


def run_child(mode, threads, *extra, omp=None, blas=1):
    # blas: OpenBLAS's thread count; with 2 or more, numpy mode's steps run on OpenBLAS's
    # workers, with 1 on the library's own
    env = {**CHILD_ENV, "FASTOPT_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(blas)}
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    res = subprocess.run([sys.executable, "-c", CHILD, HERE, mode, *extra], env=env,
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def one_thread():
    return run_child("numpy", 1)["cases"]


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_own_workers_give_the_one_thread_bits(threads, one_thread):
    got = run_child("numpy", threads)
    assert got["cases"] == one_thread
    assert got["workers"] == threads - 1  # the library's own workers did the splitting


@pytest.mark.skipif(not openblas_runs_jobs(),
                    reason="numpy's BLAS is not a pthread OpenBLAS")
@pytest.mark.parametrize("threads,blas", [(2, 2), (2, 8), (3, 2)])
def test_openblas_workers_give_the_one_thread_bits(threads, blas, one_thread):
    """Where numpy's OpenBLAS has as many threads as the step (and no libgomp is loaded), the
    step's helpers are its workers: no thread of the library's own starts; with fewer, the
    library's own workers split it.  (OpenBLAS caps its threads at the CPUs it may use.)"""
    got = run_child("numpy", threads, blas=blas)
    assert got["cases"] == one_thread
    openblas_threads = min(blas, len(os.sched_getaffinity(0)))
    assert got["workers"] == (0 if openblas_threads >= threads else threads - 1)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch (its OpenMP runtime)")
@pytest.mark.parametrize("threads,omp", [(1, 2), (2, 1), (2, 2), (2, 4), (3, 2), (8, 2)])
def test_torch_openmp_runtime_gives_the_one_thread_bits(threads, omp, one_thread):
    got = run_child("torch", threads, omp=omp)
    assert got["cases"] == one_thread
    if got["libgomp"]:
        assert got["workers"] == 0  # the split ran on the OpenMP runtime torch had loaded


@pytest.mark.parametrize("mode", ["numpy"] + (["torch"] if HAVE_TORCH else []))
def test_a_forked_child_steps_with_threads(mode, one_thread):
    # libgomp's workers do not exist in a forked child and a parallel region there can hang;
    # the child must fall back to the library's own pool and still get the same bits
    got = run_child(mode, 2, "fork")
    assert got["cases"] == one_thread
    assert got["forked"] == one_thread


def test_threaded_many_tensor_step_matches_the_reference():
    """No element skipped or updated twice where pieces cross tensor boundaries."""
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(2)
        rng = np.random.default_rng(1)
        params = [rng.standard_normal(n) for n in SIZES]
        refs = [p.copy() for p in params]
        states = [{} for _ in params]
        opt = fastopt.Adam(params, lr=0.01)
        for _ in range(3):
            grads = [rng.standard_normal(p.shape) for p in params]
            opt.step(grads)
            refs = [reference.adam(r, g, s, lr=0.01) for r, g, s in zip(refs, grads, states)]
        for p, r in zip(params, refs):
            np.testing.assert_allclose(p, r, rtol=1e-12, atol=1e-12)
    finally:
        fastopt.set_num_threads(before)


IDLE = r"""
import os, sys, time
import numpy as np, fastopt
fastopt.set_num_threads(2)
params = [np.zeros(2_000_000, np.float32)]
opt = fastopt.Adam(params)
g = [np.ones(2_000_000, np.float32)]
def worker_cpu_ns():
    total = 0
    for t in os.listdir("/proc/self/task"):
        if open(f"/proc/self/task/{t}/comm").read().startswith("fastopt"):
            total += int(open(f"/proc/self/task/{t}/schedstat").read().split()[0])
    return total
for _ in range(50):
    opt.step(g)
time.sleep(0.1)  # longer than the workers' spin
start = worker_cpu_ns()
time.sleep(0.5)
print(worker_cpu_ns() - start)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
def test_idle_workers_stop_spinning():
    res = subprocess.run([sys.executable, "-c", IDLE], env=CHILD_ENV, capture_output=True,
                         text=True, timeout=120, cwd=HERE, check=True)
    # a worker spinning through the half second would use ~500 ms of CPU; sleeping ones none
    assert int(res.stdout) < 5_000_000


def test_rules_with_a_per_tensor_pass_run_on_a_small_thread_stack():
    """LAMB and LARS on a thread with musl's default 128 KiB stack: their per-tensor pass keeps
    its bfloat16 staging rows in a frame of their own, which unstaged steps never enter (a
    child process: a stack overflow would kill it)."""
    code = (
        "import threading, numpy as np, fastopt\n"
        "out = []\n"
        "def work():\n"
        "    for dtype in (np.float64, np.float32):\n"
        "        for cls, kw in ((fastopt.LAMB, {}), (fastopt.LARS, dict(lr=0.1))):\n"
        "            w = np.ones(9000, dtype)\n"
        "            cls([w], **kw).step([np.full(9000, 0.5, dtype)])\n"
        "            out.append(bool(np.all(w < 1)))\n"
        "threading.stack_size(128 * 1024)\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
        "print(out)\n")
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str([True] * 4)


def test_a_staged_row_rule_runs_on_a_small_thread_stack():
    """RowwiseAdagrad with bfloat16 parameters on a 128 KiB thread stack: its staging rows
    (~48 KiB, rows of up to 4096 elements) fit beside Python's own frames."""
    pytest.importorskip("ml_dtypes")
    code = (
        "import threading, numpy as np, ml_dtypes, fastopt\n"
        "out = []\n"
        "def work():\n"
        "    bf = ml_dtypes.bfloat16\n"
        "    for shape in ((3, 4096), (5000, 3)):\n"
        "        w = np.ones(shape, bf)\n"
        "        fastopt.RowwiseAdagrad([w], lr=0.1, master_weights=True, ema_decay=0.9).step(\n"
        "            [np.full(shape, 0.5, bf)])\n"
        "        out.append(bool(np.all(w < 1)))\n"
        "threading.stack_size(128 * 1024)\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
        "print(out)\n")
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str([True] * 2)


CONCURRENT = r"""
import threading, numpy as np, fastopt
fastopt.set_num_threads(2)
rng = np.random.default_rng(0)
a = rng.standard_normal((600, 500))
s = a[:, :500] @ a[:, :500].T + 600 * np.eye(600)
b = rng.standard_normal((800, 800)).astype(np.float32)
expected = np.linalg.solve(s, a), b @ b
failures, stepped = [], {}
def blas():
    for _ in range(10):
        if not (np.array_equal(np.linalg.solve(s, a), expected[0]) and np.array_equal(b @ b, expected[1])):
            failures.append("blas")
def steps(k):
    p = np.ones(1_500_000, np.float32)
    opt = fastopt.Adam([p], lr=1e-3)
    for _ in range(20):
        opt.step([np.full_like(p, 0.5)])
    stepped[k] = p
threads = [threading.Thread(target=blas) for _ in range(2)]
threads += [threading.Thread(target=steps, args=(k,)) for k in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
fastopt.set_num_threads(1)
steps("alone")
print(not failures and all(np.array_equal(p, stepped["alone"]) for p in stepped.values()))
"""


def test_concurrent_steps_matmuls_and_factorizations_finish_and_agree():
    """Steps in three threads while two others run matmuls and LU solves, with OpenBLAS's
    workers (where numpy has them) shared by both: nothing hangs, every result is the
    one-thread one (a child process with a time limit)."""
    res = subprocess.run([sys.executable, "-c", CONCURRENT], env={**CHILD_ENV, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, timeout=120, cwd=HERE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"
