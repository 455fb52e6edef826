"""The whole training step's costs (part of `python -m fastopt bench`; alone:
`python -m fastopt.bench_step [--quick] [--threads N]`): the issue-13 targets, each measured
side by side in one run (interleaved rounds, medians; fastopt.benchmark.time_side_by_side).

  clip          fastopt.torch.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_, on
                2,000 tensors of 1,000 elements and on the ResNet-50 gradient set (clipping)
  numpy step    the in-loop rule (fastopt.benchmark.IN_LOOP_RULE, a 7-stream rule) on the
                ResNet-50 set: step(grads, clip_norm=, skip_nonfinite=True) against the plain
                step (one extra read of the gradients: 4 of 28 bytes)
  GradScaler    clipping under GradScaler on the ResNet-50 set, the same numbers:
                fastopt.torch's scaler.step(opt, clip_norm=...) (the clip inside the update)
                against torch's scaler.unscale_ + clip_grad_norm_ + fused step
  schedule      a step with lr=fastopt.schedules.cosine(...) against a fixed lr, 1e3 elements
"""
import math
import sys

import numpy as np

import fastopt
from fastopt import schedules
from fastopt.benchmark import IN_LOOP_RULE, MODELS, RULES, section_main, time_side_by_side

MANY_SMALL = [(1000,)] * 2000
OPTIMIZER = getattr(fastopt, IN_LOOP_RULE)
TORCH_NAME = RULES[IN_LOOP_RULE][3]


def clip_runners(shapes, threads):
    import torch
    import fastopt.torch as ft
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for label, clip in (("fastopt", ft.clip_grad_norm_), ("torch", torch.nn.utils.clip_grad_norm_)):
        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        # each call's limit 1% below the one before: the norm (the previous limit, or just
        # under it) is always above the limit, so every call scales on both sides, as in
        # training where every step's fresh gradients are clipped.  A fixed limit would not do:
        # once clipped to it, the gradients' norm rounds to the limit and the factor to 1, and
        # fastopt skips a scaling by 1 where torch still multiplies.  (0.99^1000 = 4e-5: no
        # denormals within any budget.)
        limit = [clip(params, math.inf).item()]

        def run(clip=clip, params=params, limit=limit):
            limit[0] *= 0.99
            clip(params, limit[0])
        out[label] = run
    return out


def numpy_step_runners(shapes):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(np.float32) for s in shapes]
    plain = OPTIMIZER([p.copy() for p in params], lr=1e-3)
    full = OPTIMIZER([p.copy() for p in params], lr=1e-3)
    limit = 0.5 * math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
    return {"plain step": lambda: plain.step(grads),
            "clip + skip_nonfinite": lambda: full.step(grads, clip_norm=limit, skip_nonfinite=True)}


def grad_scaler_runners(shapes, threads):
    """torch: scaler.unscale_, clip_grad_norm_, scaler.step (fused), scaler.update -- four
    passes over the gradients; fastopt.torch: scaler.step(opt, clip_norm=...) (GradScaler's
    inf check, then the step's norm pass and the update with the clip and the unscaling
    folded in), scaler.update."""
    import torch
    import fastopt.torch as ft
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for label, make in (
            ("fastopt", lambda ps: getattr(ft, TORCH_NAME)(ps, lr=1e-3)),
            ("torch", lambda ps: getattr(torch.optim, TORCH_NAME)(ps, lr=1e-3, fused=True))):
        params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt = make(params)
        # scale 1, never grown: every round unscales the same gradients (by 1, a full pass
        # on torch's side), clips them (the limit below their norm) and steps
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10 ** 9)
        scaler.scale(torch.ones(()))  # (what a loss's scaling does first: makes the scale)
        limit = 0.5 * ft.clip_grad_norm_(params, math.inf).item()

        if label == "fastopt":
            def step(opt=opt, scaler=scaler, limit=limit):
                scaler.step(opt, clip_norm=limit)
                scaler.update()
        else:
            def step(opt=opt, scaler=scaler, params=params, limit=limit):
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, limit)
                scaler.step(opt)
                scaler.update()
        out[label] = step
    return out


SCHEDULE_REPEAT = 1000  # steps per timed call: a 1e3-element step is ~1 us, below the timer's grain


def schedule_runners(repeat=SCHEDULE_REPEAT):
    """Each runner makes `repeat` steps."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(1000).astype(np.float32)
    g = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
    fixed = OPTIMIZER([p.copy()], lr=1e-3)
    cosine = OPTIMIZER([p.copy()], lr=schedules.cosine(1e-3, 10 ** 9, warmup_steps=1000,
                                                          warmup_start_factor=0.01))
    grads = [g]

    def steps(opt):
        def run():
            for _ in range(repeat):
                opt.step(grads)
        return run
    return {"fixed lr": steps(fixed), "cosine schedule": steps(cosine)}


def run(threads, quick=False, budget=1.0):
    """Prints the table; returns its rows as dicts."""
    fastopt.set_num_threads(threads)
    budget = budget / 2 if quick else budget
    rows = []

    def show(case, times, ours, theirs, target, reverse=False):
        ratio = times[ours] / times[theirs] if reverse else times[theirs] / times[ours]
        print(f"  {case:<34} {ours} {times[ours] * 1e3:9.4f} ms   {theirs} {times[theirs] * 1e3:9.4f} ms"
              f"   {ratio:6.2f}x  (target {target})", flush=True)
        rows.append(dict(case=case, times=times, ratio=ratio, target=target))

    print(f"\nThe training step (issue 13), float32, {threads} threads; medians of interleaved "
          "rounds:")
    resnet50 = MODELS["ResNet-50"]
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    if have_torch:
        show("clip_grad_norm_ 2000 x 1e3", time_side_by_side(clip_runners(MANY_SMALL, threads), budget),
             "fastopt", "torch", ">= 10x")
        if not quick:
            show("clip_grad_norm_ ResNet-50", time_side_by_side(clip_runners(resnet50, threads), budget * 2),
                 "fastopt", "torch", ">= 2.5x")
    shapes = resnet50 if not quick else MODELS["ResNet-18"]
    name = "ResNet-50" if not quick else "ResNet-18"
    show(f"numpy {IN_LOOP_RULE}, clip + skip, {name}", time_side_by_side(numpy_step_runners(shapes), budget * 2),
         "clip + skip_nonfinite", "plain step", "<= 1.25x", reverse=True)
    if have_torch:
        show(f"GradScaler + clip + {IN_LOOP_RULE}, {name}",
             time_side_by_side(grad_scaler_runners(shapes, threads), budget * 2),
             "fastopt", "torch", ">= 1.3x")
    times = time_side_by_side(schedule_runners(), budget, min_rounds=15)
    show(f"{IN_LOOP_RULE} 1e3, cosine schedule (per step)",
         {k: v / SCHEDULE_REPEAT for k, v in times.items()},
         "cosine schedule", "fixed lr", "<= 1.2x", reverse=True)
    return rows


def main(argv=None):
    return section_main("fastopt.bench_step", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
