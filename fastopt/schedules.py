"""Learning-rate schedules: `lr=<schedule>` on any fastopt optimizer (or param group).

    opt = fastopt.AdamW(params, lr=fastopt.schedules.cosine(1e-3, total_steps=10_000,
                                                            warmup_steps=500))

A schedule is lr as a function of the step t, t = 1 for a parameter's first update.  The
engine evaluates it in double from the step count of each batch of parameters, right before the
C call (no Python per step, no re-validation: the arguments are checked here, once).  Each one
equals the lr that the named torch.optim.lr_scheduler gives the t-th optimizer.step() after
t - 1 scheduler.step() calls (to float64 rounding: torch updates most of them recursively).
With e = t - 1:

    constant(lr)                                   lr
    step_decay(lr, step_size, gamma=0.1)           lr gamma^floor(e / step_size)      (StepLR)
    exponential(lr, gamma)                         lr gamma^e                  (ExponentialLR)
    cosine(lr, total_steps, warmup_steps=0, warmup_start_factor=0.0, final_lr=0.0)
        e < W:   lr (s + (1 - s) e / W)            (LinearLR, s = warmup_start_factor, W = warmup_steps)
        else:    final_lr + (lr - final_lr) (1 + cos(pi (e - W) / (total_steps - W))) / 2
                                                   (CosineAnnealingLR, T_max = total_steps - W;
                                                    periodic past total_steps, as torch's)
    linear(lr, total_steps, warmup_steps=0, warmup_start_factor=0.0, final_lr=0.0)
        e < W:   as cosine's warmup
        else:    lr + (final_lr - lr) min(e - W, T) / T,  T = total_steps - W   (LinearLR)
    one_cycle(max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
        (OneCycleLR's lr, cosine annealing, two phases; held at its final value past total_steps)
        a = max_lr / div_factor,  z = a / final_div_factor,  E = pct_start total_steps - 1
        e <= E:  anneal(a, max_lr, e / E);  else anneal(max_lr, z, min(1, (e - E) / (total_steps - 1 - E)))
        anneal(x, y, p) = y + (x - y) / 2 (1 + cos(pi p))
    sequential(schedules, milestones)              (SequentialLR) schedule k from step
        milestones[k - 1] + 1 on, counting its own steps from 1: schedules[k](t - milestones[k - 1])

Arguments are checked here (TypeError/ValueError naming the argument): learning rates finite and
>= 0, gamma in [0, 1] (a decay; so every value stays finite), warmup_start_factor in [0, 1],
step counts ints with 0 <= warmup_steps < total_steps <= 2**53, milestones increasing ints in
[1, 2**53]; and what the schedule computes from them finite: cosine's (lr - final_lr) * 2,
one_cycle's initial lr max_lr / div_factor and final lr initial / final_div_factor.  So every
value a schedule gives is finite and >= 0 (each lies between two of these).
"""
import math
import numbers

from fastopt._checks import MAX_STEP, as_float
from fastopt._kernels import Schedule

__all__ = ["Schedule", "constant", "step_decay", "exponential", "cosine", "linear", "one_cycle",
           "sequential"]


def _real(name, value, low=0.0, high=None):
    if type(value) is bool or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = as_float(name, value)
    if not (x >= low) or x == float("inf") or (high is not None and not x <= high):
        span = f"in [{low}, {high}]" if high is not None else f"finite and >= {low}"
        raise ValueError(f"{name} must be {span}, got {value!r}")
    return x


def _count(name, value, low):
    if type(value) is bool or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= MAX_STEP:  # (no step count goes past MAX_STEP)
        raise ValueError(f"{name} must be in [{low}, 2**53], got {value!r}")
    return int(value)


def _finite(value, names, formula):
    """A value the schedule computes from its arguments (its largest, or a phase's lr) must be
    finite, or the engine would refuse the lr of some later step, mid-run."""
    if not math.isfinite(value):
        raise ValueError(f"{names}: {formula} is {value}, not finite")
    return value


def constant(lr):
    """lr at every step."""
    return Schedule("constant", dict(lr=_real("lr", lr)))


def step_decay(lr, step_size, gamma=0.1):
    """lr gamma^floor((t - 1) / step_size)  (torch's StepLR)."""
    return Schedule("step_decay", dict(lr=_real("lr", lr), step_size=_count("step_size", step_size, 1),
                                       gamma=_real("gamma", gamma, 0.0, 1.0)))


def exponential(lr, gamma):
    """lr gamma^(t - 1)  (torch's ExponentialLR)."""
    return Schedule("exponential", dict(lr=_real("lr", lr), gamma=_real("gamma", gamma, 0.0, 1.0)))


def _warmup_args(lr, total_steps, warmup_steps, warmup_start_factor, final_lr):
    total = _count("total_steps", total_steps, 1)
    warmup = _count("warmup_steps", warmup_steps, 0)
    if warmup >= total:
        raise ValueError(f"warmup_steps must be < total_steps ({total}), got {warmup}")
    return dict(lr=_real("lr", lr), total_steps=total, warmup_steps=warmup,
                warmup_start_factor=_real("warmup_start_factor", warmup_start_factor, 0.0, 1.0),
                final_lr=_real("final_lr", final_lr))


def cosine(lr, total_steps, warmup_steps=0, warmup_start_factor=0.0, final_lr=0.0):
    """Linear warmup from lr warmup_start_factor to lr over warmup_steps (LinearLR), then cosine
    annealing to final_lr over total_steps - warmup_steps (CosineAnnealingLR)."""
    args = _warmup_args(lr, total_steps, warmup_steps, warmup_start_factor, final_lr)
    _finite((args["lr"] - args["final_lr"]) * 2.0, "lr and final_lr",
            "(lr - final_lr) * 2 (a product the annealing computes)")
    return Schedule("cosine", args)


def linear(lr, total_steps, warmup_steps=0, warmup_start_factor=0.0, final_lr=0.0):
    """cosine()'s warmup, then a linear decay to final_lr over total_steps - warmup_steps."""
    return Schedule("linear", _warmup_args(lr, total_steps, warmup_steps, warmup_start_factor,
                                           final_lr))


def one_cycle(max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    """torch's OneCycleLR learning rate (anneal_strategy="cos", three_phase=False)."""
    total = _count("total_steps", total_steps, 2)
    pct = _real("pct_start", pct_start, 0.0, 1.0)
    phase_end = pct * total - 1.0
    if not 0.0 < phase_end < total - 1:
        raise ValueError(f"pct_start * total_steps - 1 must be in (0, total_steps - 1), got "
                         f"{phase_end} (pct_start={pct_start}, total_steps={total})")
    div = _real("div_factor", div_factor)
    final_div = _real("final_div_factor", final_div_factor)
    if div == 0.0 or final_div == 0.0:
        raise ValueError("div_factor and final_div_factor must be > 0")
    top = _real("max_lr", max_lr)
    # the lr at the start and at the end, as the engine computes them (lr(t) lies between them
    # and max_lr): a tiny divisor overflows (final_div_factor=1e-320 gave nan from step 4 on)
    initial = _finite(top / div, "div_factor", "the initial lr, max_lr / div_factor")
    _finite(initial / final_div, "final_div_factor",
            "the final lr, max_lr / div_factor / final_div_factor")
    return Schedule("one_cycle", dict(max_lr=top, total_steps=total, pct_start=pct,
                                      div_factor=div, final_div_factor=final_div))


def sequential(schedules, milestones):
    """schedules[k] from step milestones[k - 1] + 1 on, counting its own steps from 1
    (torch's SequentialLR)."""
    schedules, milestones = list(schedules), list(milestones)
    if not schedules or not all(isinstance(s, Schedule) for s in schedules):
        raise TypeError("schedules must be a non-empty list of fastopt.schedules schedules")
    if len(milestones) != len(schedules) - 1:
        raise ValueError(f"{len(schedules)} schedules need {len(schedules) - 1} milestones, "
                         f"got {len(milestones)}")
    previous = 0
    for k, m in enumerate(milestones):
        m = _count(f"milestones[{k}]", m, previous + 1)
        previous = milestones[k] = m
    return Schedule("sequential", {}, schedules, milestones)
