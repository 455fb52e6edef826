"""fastopt.schedules against torch.optim.lr_scheduler over 1,000 steps, and the engine's use of
them (lr of step t evaluated from each batch's step count)."""
import math
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

STEPS = 1000


def torch_lrs(make_scheduler, lr, steps=STEPS):
    """The lr torch's scheduler gives the t-th optimizer.step(), t = 1..steps."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    scheduler = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    return np.array(lrs)


def seq(L, opt, parts, milestones):
    return L.SequentialLR(opt, [make(L, opt) for make in parts], milestones)


CASES = {
    "constant": (S.constant(0.1), 0.1, lambda L, o: L.ConstantLR(o, factor=1.0)),
    "step_decay": (S.step_decay(0.1, 70, gamma=0.5), 0.1, lambda L, o: L.StepLR(o, 70, 0.5)),
    "exponential": (S.exponential(0.1, 0.995), 0.1, lambda L, o: L.ExponentialLR(o, 0.995)),
    "cosine": (S.cosine(0.1, STEPS, final_lr=1e-3), 0.1,
               lambda L, o: L.CosineAnnealingLR(o, STEPS, eta_min=1e-3)),
    "cosine_warmup": (
        S.cosine(0.1, STEPS, warmup_steps=100, warmup_start_factor=0.01, final_lr=1e-3), 0.1,
        lambda L, o: seq(L, o, [lambda L, o: L.LinearLR(o, 0.01, 1.0, 100),
                                lambda L, o: L.CosineAnnealingLR(o, STEPS - 100, 1e-3)], [100])),
    "cosine_past_the_end": (S.cosine(0.1, 300), 0.1, lambda L, o: L.CosineAnnealingLR(o, 300)),
    "linear": (S.linear(0.1, 800, final_lr=0.02), 0.1,
               lambda L, o: L.LinearLR(o, 1.0, 0.2, 800)),
    "linear_warmup": (
        S.linear(0.1, STEPS, warmup_steps=50, warmup_start_factor=0.1, final_lr=0.0), 0.1,
        lambda L, o: seq(L, o, [lambda L, o: L.LinearLR(o, 0.1, 1.0, 50),
                                lambda L, o: L.LinearLR(o, 1.0, 0.0, STEPS - 50)], [50])),
    "one_cycle": (S.one_cycle(0.1, STEPS), 0.1,
                  lambda L, o: L.OneCycleLR(o, 0.1, total_steps=STEPS, cycle_momentum=False)),
    "one_cycle_options": (
        S.one_cycle(0.3, STEPS, pct_start=0.25, div_factor=10.0, final_div_factor=100.0), 0.3,
        lambda L, o: L.OneCycleLR(o, 0.3, total_steps=STEPS, pct_start=0.25, div_factor=10.0,
                                  final_div_factor=100.0, cycle_momentum=False)),
    "sequential": (
        S.sequential([S.constant(0.1), S.exponential(0.1, 0.99), S.step_decay(0.1, 100)],
                     [200, 500]), 0.1,
        lambda L, o: seq(L, o, [lambda L, o: L.ConstantLR(o, factor=1.0),
                                lambda L, o: L.ExponentialLR(o, 0.99),
                                lambda L, o: L.StepLR(o, 100, 0.1)], [200, 500])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_torch_scheduler(name):
    schedule, lr, make = CASES[name]
    expected = torch_lrs(make, lr)
    got = np.array([schedule(t) for t in range(1, STEPS + 1)])
    # torch updates most schedules recursively (lr_t from lr_{t-1}): float64 rounding adds up
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14 * lr)


def test_the_engine_uses_each_batchs_step(rng):
    """SGD with grads of ones moves each parameter by -lr(t) at its t-th update; two groups
    with their own schedules, one parameter joining later (its own step count)."""
    first, second = S.cosine(0.5, 40, warmup_steps=5, warmup_start_factor=0.1), S.exponential(0.2, 0.9)
    a, b, c = np.zeros(3), np.zeros(4, np.float32), np.zeros(2)
    opt = fastopt.SGD([{"params": [a, b]}, {"params": [c], "lr": second}], lr=first)
    grads = [np.ones(3), np.ones(4, np.float32), np.ones(2)]
    for _ in range(30):
        opt.step(grads)
    np.testing.assert_allclose(a, -sum(first(t) for t in range(1, 31)), rtol=1e-13)
    np.testing.assert_allclose(b, -sum(first(t) for t in range(1, 31)), rtol=1e-5)
    np.testing.assert_allclose(c, -sum(second(t) for t in range(1, 31)), rtol=1e-13)
    # replacing a schedule by a number and back rebuilds the plan
    opt.param_groups[1]["lr"] = 0.01
    opt.step(grads)
    np.testing.assert_allclose(c, -sum(second(t) for t in range(1, 31)) - 0.01, rtol=1e-13)
    opt.param_groups[1]["lr"] = second
    opt.step(grads)
    np.testing.assert_allclose(c, -sum(second(t) for t in range(1, 31)) - 0.01 - second(32),
                               rtol=1e-13)


def test_adam_with_a_schedule_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    init = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(60)]
    schedule = S.cosine(0.05, 60, warmup_steps=10, warmup_start_factor=0.1)
    ours = init.copy()
    opt = fastopt.Adam([ours], lr=schedule)
    p = torch.nn.Parameter(torch.tensor(init))
    topt = torch.optim.Adam([p], lr=0.05)
    L = torch.optim.lr_scheduler
    sched = L.SequentialLR(topt, [L.LinearLR(topt, 0.1, 1.0, 10), L.CosineAnnealingLR(topt, 50)], [10])
    for g in grads:
        opt.step([g])
        p.grad = torch.tensor(g)
        topt.step()
        sched.step()
    np.testing.assert_allclose(ours, p.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_functional_takes_a_schedule():
    schedule = S.exponential(0.1, 0.5)
    p = np.zeros(2)
    state = fastopt.SGDState.new(p)
    for _ in range(3):
        fastopt.functional.sgd(p, np.ones(2), state, lr=schedule)
    np.testing.assert_allclose(p, -(0.1 + 0.05 + 0.025), rtol=1e-15)


@pytest.mark.parametrize("make, error", [
    (lambda: S.constant(-1.0), ValueError), (lambda: S.constant("1"), TypeError),
    (lambda: S.step_decay(0.1, 0), ValueError), (lambda: S.step_decay(0.1, 1.5), TypeError),
    (lambda: S.exponential(0.1, 1.5), ValueError), (lambda: S.exponential(0.1, float("nan")), ValueError),
    (lambda: S.cosine(0.1, 10, warmup_steps=10), ValueError),
    (lambda: S.cosine(0.1, 10, warmup_start_factor=2.0), ValueError),
    (lambda: S.linear(float("inf"), 10), ValueError),
    (lambda: S.one_cycle(0.1, 10, pct_start=0.05), ValueError),
    (lambda: S.one_cycle(0.1, 10, div_factor=0.0), ValueError),
    (lambda: S.sequential([S.constant(1.0)], [3]), ValueError),
    (lambda: S.sequential([S.constant(1.0), 0.1], [3]), TypeError),
    (lambda: S.sequential([S.constant(1.0)] * 3, [5, 5]), ValueError),
])
def test_bad_arguments(make, error):
    with pytest.raises(error):
        make()


def test_schedules_pickle_compare_and_print():
    import pickle
    s = S.sequential([S.cosine(0.1, 100, warmup_steps=10), S.constant(0.01)], [100])
    t = pickle.loads(pickle.dumps(s))
    assert t == s and hash(t) == hash(s) and repr(t) == repr(s)
    assert [t(k) for k in range(1, 200)] == [s(k) for k in range(1, 200)]
    with pytest.raises(ValueError):
        s(0)


@pytest.mark.parametrize("make, match", [
    (lambda: S.one_cycle(1.0, 10, final_div_factor=1e-320), "final_div_factor: the final lr"),
    (lambda: S.one_cycle(1.0, 10, div_factor=1e-320), "div_factor: the initial lr"),
    (lambda: S.cosine(1e308, 10), r"lr and final_lr: \(lr - final_lr\) \* 2"),
    (lambda: S.cosine(0.0, 10, final_lr=1e308), r"lr and final_lr: \(lr - final_lr\) \* 2"),
    (lambda: S.step_decay(0.1, 2**63), "step_size must be in"),
    (lambda: S.cosine(0.1, 2**64), "total_steps must be in"),
    (lambda: S.sequential([S.constant(1.0), S.constant(0.1)], [2**63]), r"milestones\[0\] must be in"),
])
def test_arguments_whose_values_would_not_be_finite(make, match):
    """Refused when made, naming the argument (one_cycle's final_div_factor=1e-320 gave lr nan
    from step 4 on, and the step failed after other groups had been updated)."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("schedule", [
    S.linear(5.3639077248627335e-05, 651460),  # (final_lr - lr) * T / T rounded below 0
    S.linear(0.1, 7, warmup_steps=3),
    S.cosine(8e307, 10), S.cosine(0.0, 10, final_lr=8e307),
    S.one_cycle(1e308, 10), S.one_cycle(1.0, 10, div_factor=1e-300, final_div_factor=1e300),
    S.exponential(1e308, 1.0), S.step_decay(1e-300, 1, 0.5),
])
def test_every_value_is_finite_and_nonnegative(schedule):
    total = schedule.args.get("total_steps", 10)
    steps = list(range(1, 30)) + [total - 1, total, total + 1, total + 2, 2**53 + 1]
    values = [schedule(t) for t in steps if t >= 1]
    assert all(math.isfinite(v) and v >= 0.0 for v in values), values


def test_linear_ends_at_final_lr():
    schedule = S.linear(5.3639077248627335e-05, 651460)
    assert schedule(651461) == schedule(10**9) == 0.0


def test_a_step_past_int64_is_a_value_error():
    with pytest.raises(ValueError, match="step must be an int in"):
        S.constant(0.1)(2**63)


def test_rprop_with_a_schedule_starts_its_step_sizes_at_the_first_steps_lr():
    """Rprop's state starts each step size at the lr (a schedule: its value at step 1), then
    the step sizes evolve by the etas as with a fixed lr equal to it."""
    schedule = fastopt.schedules.exponential(0.05, 0.5)
    p, q = np.ones(6), np.ones(6)
    scheduled = fastopt.Rprop([p], lr=schedule)
    fixed = fastopt.Rprop([q], lr=schedule(1))
    g = np.array([1.0, -2.0, 0.5, 0.0, -1.0, 3.0])
    for k in range(4):
        scheduled.step([g * (-1) ** k])
        fixed.step([g * (-1) ** k])
    np.testing.assert_array_equal(scheduled.state[0].step_size, fixed.state[0].step_size)
    np.testing.assert_array_equal(p, q)
