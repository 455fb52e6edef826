"""pytest-benchmark groups for the whole training step (issue 13): clip_grad_norm_ (fastopt.torch
against torch), numpy Adam with clip_norm + skip_nonfinite against the plain step, GradScaler +
clip + Adam (fastopt.torch against torch fused), and a step with a cosine schedule against a
fixed lr.  The same runners as `python -m fastopt.bench_step`; compare within one run.

    pytest bench/test_step.py --benchmark-only
"""
import pytest

import fastopt
from fastopt import bench_step
from fastopt.benchmark import MODELS

CLIP_CASES = {"2000x1e3": bench_step.MANY_SMALL, "ResNet-50": MODELS["ResNet-50"]}


@pytest.mark.parametrize("implementation", ["fastopt", "torch"])
@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_grad_norm(benchmark, case, implementation):
    pytest.importorskip("torch")
    benchmark.group = f"clip_grad_norm_ {case}"
    benchmark(bench_step.clip_runners(CLIP_CASES[case], fastopt.get_num_threads())[implementation])


@pytest.mark.parametrize("variant", ["plain step", "clip + skip_nonfinite"])
def test_numpy_step_options(benchmark, variant):
    benchmark.group = "numpy ResNet-50, step options"
    benchmark(bench_step.numpy_step_runners(MODELS["ResNet-50"])[variant])


@pytest.mark.parametrize("implementation", ["fastopt", "torch"])
def test_grad_scaler(benchmark, implementation):
    pytest.importorskip("torch")
    benchmark.group = "GradScaler + clip + step ResNet-50"
    benchmark(bench_step.grad_scaler_runners(MODELS["ResNet-50"], fastopt.get_num_threads())[implementation])


@pytest.mark.parametrize("variant", ["fixed lr", "cosine schedule"])
def test_schedule(benchmark, variant):
    benchmark.group = "1e3, lr schedule"
    benchmark(bench_step.schedule_runners(repeat=1)[variant])
