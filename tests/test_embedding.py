"""fastopt from C and from Cython, against the installed package; the C tests, also under
AddressSanitizer and UndefinedBehaviorSanitizer."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastopt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
FLAGS = ["-O2", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Werror", "-pthread"]


def compile_c(sources, out, extra=()):
    """Each source compiled on its own core (the sanitized build took ~45 s on one), then linked."""
    sources = [*map(str, sources), *fastopt.get_sources()]
    objects = [f"{out}.{i}.o" for i in range(len(sources))]

    def compile_one(source, obj):
        subprocess.run([CC, *FLAGS, *extra, "-I", fastopt.get_include(), "-c", source, "-o", obj],
                       check=True, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(compile_one, sources, objects))  # (list: a compiler's error is raised here)
    subprocess.run([CC, *FLAGS, *extra, "-o", str(out), *objects, "-lm"], check=True,
                   capture_output=True, text=True)
    return out


def lcg_data():
    """The data examples/c/train_linear.c generates, rebuilt bit for bit."""
    seed = 12345

    def next_value():
        nonlocal seed
        seed = (seed * 1103515245 + 12345) % 2147483648
        return np.float32(seed % 2001 - 1000) / np.float32(1000.0)

    true_w = np.array([next_value() for _ in range(8)], np.float32)
    X = np.zeros((256, 8), np.float32)
    y = np.zeros(256, np.float32)
    for i in range(256):
        acc = np.float32(0.5)
        for j in range(8):
            X[i, j] = next_value()
            acc = np.float32(acc + X[i, j] * true_w[j])
        y[i] = acc
    return X, y


@needs_cc
def test_c_example_matches_python(tmp_path):
    exe = compile_c([os.path.join(ROOT, "examples", "c", "train_linear.c")], tmp_path / "train")
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    c_loss = float(out[0].split()[1])
    c_w = np.array(out[1].split(), np.float64)

    X, y = lcg_data()
    X64, y64 = X.astype(np.float64), y.astype(np.float64)
    w = np.zeros(9, np.float32)
    opt = fastopt.Adam([w], lr=0.05)
    for _ in range(300):
        err = X64 @ w[:8].astype(np.float64) + w[8] - y64
        loss = float(np.mean(err ** 2))
        grad = np.append(2 * X64.T @ err / 256, 2 * err.mean()).astype(np.float32)
        opt.step([grad])
    # the same kernels on the same data; only the gradient sums run in another order
    np.testing.assert_allclose(c_w, w, rtol=1e-5, atol=1e-6)
    assert c_loss < 1e-6 and loss < 1e-6


@needs_cc
@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan+ubsan"])
def test_c_kernel_tests(tmp_path, sanitize):
    extra = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"] if sanitize else []
    try:
        exe = compile_c([os.path.join(HERE, "c", "test_kernels.c")], tmp_path / "t", extra)
    except subprocess.CalledProcessError as e:
        if sanitize and "sanitize" in e.stderr:
            pytest.skip("this compiler has no sanitizer runtime: " + e.stderr[-300:])
        raise
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1"}
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "runtime error" not in res.stderr and "AddressSanitizer" not in res.stderr, res.stderr
    assert res.stdout.strip().endswith(" 0 failed")
    passed = int(res.stdout.strip().split("\n")[-1].split()[0])
    assert passed > 1000


CYTHON_EXT = textwrap.dedent('''
    # cython: language_level=3
    from fastopt._kernels cimport adam_many_f32, fo_adam_params, FO_OK, FO_TEXTBOOK
    from libc.stdint cimport int64_t

    def train(float[::1] w, float[::1] g, float[::1] m, float[::1] v, int steps):
        """Adam with a constant gradient, stepped in a nogil loop of our own."""
        cdef fo_adam_params hp
        hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay = 0.01, 0.9, 0.999, 1e-8, 0.0
        hp.amsgrad = hp.decoupled_weight_decay = hp.maximize = 0
        hp.convention = FO_TEXTBOOK
        cdef float *p = &w[0]
        cdef const float *gp = &g[0]
        cdef float *mp = &m[0]
        cdef float *vp = &v[0]
        cdef size_t n = w.shape[0]
        cdef int64_t t
        cdef int status = FO_OK
        with nogil:
            for t in range(1, steps + 1):
                hp.step = t
                status = adam_many_f32(1, &p, &gp, &mp, &vp, NULL, &n, &hp)
                if status != FO_OK:
                    break
        return status
''')


@needs_cc
def test_cython_extension_cimports_the_kernels(tmp_path):
    pytest.importorskip("Cython")
    (tmp_path / "use_fastopt.pyx").write_text(CYTHON_EXT)
    (tmp_path / "setup.py").write_text(textwrap.dedent(f'''
        from setuptools import Extension, setup
        from Cython.Build import cythonize
        setup(ext_modules=cythonize([Extension("use_fastopt", ["use_fastopt.pyx"],
                                               include_dirs={[fastopt.get_include()]!r})],
                                    include_path={[os.path.dirname(os.path.dirname(fastopt.__file__))]!r}))
    '''))
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import use_fastopt
    finally:
        sys.path.remove(str(tmp_path))
    rng = np.random.default_rng(0)
    w = rng.standard_normal(1001).astype(np.float32)
    g = rng.standard_normal(1001).astype(np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    expected = w.copy()
    assert use_fastopt.train(w, g, m, v, 25) == 0
    opt = fastopt.Adam([expected], lr=0.01)
    for _ in range(25):
        opt.step([g])
    np.testing.assert_array_equal(w, expected)   # the same kernels: the same bits
    np.testing.assert_array_equal(m, opt.state[0].m)


@needs_cc
def test_out_of_memory_is_reported_as_such(tmp_path):
    exe = compile_c([os.path.join(HERE, "c", "test_out_of_memory.c")], tmp_path / "oom",
                    ["-Wl,--wrap=malloc"])
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
