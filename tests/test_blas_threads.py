"""fastopt.share_blas_threads(): OpenBLAS's parallel regions on fastopt's pool.  Each case runs
in a child process with a time limit, so that a deadlock (a job of a matmul waiting for another
that no thread runs) fails the test instead of hanging the suite."""
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

import fastopt

if not fastopt.config._loaded_openblas():
    pytest.skip("numpy's BLAS here is not an OpenBLAS that takes a threads callback",
                allow_module_level=True)

PRELUDE = """
import os, sys, threading
import numpy as np
import fastopt
rng = np.random.default_rng(0)
def products(dtype):
    a = rng.standard_normal((600, 500)).astype(dtype)
    b = rng.standard_normal((500, 700)).astype(dtype)
    v = rng.standard_normal(500).astype(dtype)
    x = rng.standard_normal(2_000_000).astype(dtype)
    return lambda: (a @ b, a @ v, np.dot(x, x))  # level 3, 2 and 1
def factorizations(dtype):
    # LAPACK, whose drivers run threaded BLAS in turn (from one thread at a time: concurrent
    # LU factorizations hang under any threads callback, see share_blas_threads)
    a = rng.standard_normal((600, 500)).astype(dtype)
    s = (a[:, :500] @ a[:, :500].T + 600 * np.eye(600)).astype(dtype)
    return lambda: (np.linalg.solve(s, a), np.linalg.eigh(s)[0], np.linalg.cholesky(s))
"""


def run_child(body, timeout=120, env=None, args=()):
    code = PRELUDE + textwrap.dedent(body)
    # (run from elsewhere: python -c puts the current folder, a source checkout, first)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir(),
                          env=None if env is None else {**os.environ, **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


POOL_AFTER_A_MATMUL = """
    import io
    fastopt.set_num_threads(2)
    if sys.argv[1:] == ["share"]:
        fastopt.share_blas_threads()
    a = rng.standard_normal((1500, 1500))
    a @ a
    config = io.StringIO()
    fastopt.show_config(config)
    print(sorted(open(f"/proc/self/task/{t}/comm").read().strip().startswith("fastopt")
                 for t in os.listdir("/proc/self/task"))[-1],
          "on fastopt's threads" in config.getvalue())
"""


def test_matmuls_run_on_fastopts_threads_only_once_shared():
    """Opt-in: after `import fastopt` numpy's matmuls stay on OpenBLAS's threads (no fastopt
    worker starts); after share_blas_threads() one does, and show_config says so."""
    env = {"OPENBLAS_NUM_THREADS": "2"}
    assert run_child(POOL_AFTER_A_MATMUL, env=env).split() == ["False", "False"]
    assert run_child(POOL_AFTER_A_MATMUL, env=env, args=["share"]).split() == ["True", "True"]


def test_products_and_factorizations_are_the_same_bits_on_either_pool():
    out = run_child("""
        for dtype, kind in [(d, k) for d in (np.float32, np.float64) for k in (products, factorizations)]:
            compute = kind(dtype)
            assert fastopt.share_blas_threads(False)
            own = compute()
            assert fastopt.share_blas_threads()
            shared = compute()
            for x, y in zip(own, shared):
                assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_concurrent_matmuls_and_steps_finish_and_agree():
    out = run_child("""
        fastopt.set_num_threads(2)
        compute = products(np.float32)
        expected = compute()
        fastopt.share_blas_threads()
        failures = []
        def matmuls():
            for _ in range(5):
                if any(np.asarray(x).tobytes() != np.asarray(y).tobytes()
                       for x, y in zip(compute(), expected)):
                    failures.append("product")
        p = np.ones(1_000_000, np.float32)
        opt = fastopt.Adam([p], lr=1e-3)
        def steps():
            for _ in range(20):
                opt.step([np.full_like(p, 0.5)])
        threads = [threading.Thread(target=matmuls) for _ in range(3)]
        threads.append(threading.Thread(target=steps))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        reference = np.ones(1_000_000, np.float32)
        ref_opt = fastopt.Adam([reference], lr=1e-3)
        for _ in range(20):
            ref_opt.step([np.full_like(reference, 0.5)])
        assert p.tobytes() == reference.tobytes()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_forked_child_keeps_the_callback_and_finishes():
    out = run_child("""
        compute = products(np.float64)
        expected = compute()
        fastopt.share_blas_threads()
        compute()  # the pool has run jobs before the fork
        pid = os.fork()
        if pid == 0:
            ok = all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                     for x, y in zip(compute(), expected))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print("ok")
    """)
    assert out.strip() == "ok"


def test_switching_back_and_bad_argument():
    libraries = fastopt.share_blas_threads(False)
    assert libraries and all("openblas" in path.lower() for path in libraries)
    with pytest.raises(TypeError, match="enable"):
        fastopt.share_blas_threads("yes")
