"""pytest-benchmark groups: a whole training iteration (forward + backward + Adam step) of a
CPU model, float32, with the step after backward and in backward (fastopt.torch and
torch.optim fused; see fastopt/bench_in_backward.py for the variants).

    pytest bench/test_in_backward.py --benchmark-only
    python -m fastopt.bench_in_backward          # the same, interleaved rounds and ratios

Compare within one group of one run: the machine this runs on is shared and noisy.
"""
import pytest

pytest.importorskip("torch")
from fastopt.bench_in_backward import VARIANTS, make_iterations, model_cases  # noqa: E402

CASES = model_cases(quick=False)
_built = {}


def iterations_for(case_name):
    if case_name not in _built:
        _built.clear()  # one case's models at a time (the 4x4096 MLP's five copies take ~5 GB)
        _built[case_name] = make_iterations(CASES[case_name])[0]
    return _built[case_name]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_iteration(benchmark, case_name, variant):
    benchmark.group = f"in backward: {case_name}"
    iteration = iterations_for(case_name)[variant]
    iteration()  # optimizer states exist before timing
    benchmark.pedantic(iteration, rounds=7 if "4096" in case_name else 20, warmup_rounds=1)
