"""pytest-benchmark groups for the step inside a training loop (fastopt/bench_loop.py):
the step timed right after the forward/backward pass (torch) or the BLAS matmuls (numpy) that
precede it, and the whole iteration.

    pytest bench/test_loop.py --benchmark-only

pytest-benchmark times one implementation after another; `python -m fastopt bench` interleaves
them iteration by iteration, which is the comparison to trust on a shared machine.
"""
import pytest

import fastopt
from fastopt.bench_loop import numpy_loop_cases, torch_loop_cases

ROUNDS = 30
THREADS = fastopt.get_num_threads()


SHARED = " (matmuls on fastopt's threads)"


def _cases(loop, implementation):
    if loop == "torch":
        pytest.importorskip("torch")
        return torch_loop_cases(THREADS)[0]
    if implementation.endswith(SHARED):
        if not fastopt.config._loaded_openblas():
            pytest.skip("numpy's BLAS takes no threads callback here")
        cases = numpy_loop_cases(THREADS, shared=True)[0]
        return {name + SHARED: case for name, case in cases.items()}
    return numpy_loop_cases(THREADS)[0]


def _names(loop):
    if loop == "torch":
        return ["torch fused", "torch foreach", "fastopt.torch"]
    fastopt_cases = [f"fastopt {THREADS} threads", "fastopt 1 thread"]
    return fastopt_cases + ["numpy"] + [name + SHARED for name in fastopt_cases]


def _params():
    return [(loop, name) for loop in ("torch", "numpy") for name in _names(loop)]


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    fastopt.set_num_threads(THREADS)
    fastopt.share_blas_threads(False)


@pytest.mark.parametrize("loop,implementation", _params())
def test_step_right_after(benchmark, loop, implementation):
    before, step = _cases(loop, implementation)[implementation]
    before()
    step()  # first step: state and plans
    benchmark.group = f"{loop} loop: step right after " + ("backward" if loop == "torch" else "matmuls")
    benchmark.pedantic(step, setup=before, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("loop,implementation", _params())
def test_whole_iteration(benchmark, loop, implementation):
    before, step = _cases(loop, implementation)[implementation]

    def iteration():
        before()
        step()
    iteration()
    benchmark.group = f"{loop} loop: whole iteration"
    benchmark.pedantic(iteration, rounds=ROUNDS, iterations=1, warmup_rounds=1)
