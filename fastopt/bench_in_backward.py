"""Optimizer in backward, timed: a whole training iteration (forward + backward + step) of
CPU models, float32, with the step after backward and with the step in backward.

    python -m fastopt.bench_in_backward [--quick] [--rounds N] [--threads N] [--json FILE]

Variants, each on its own copy of the model (same initial weights):
  fwd+bwd only               zero_grad + forward + backward, no step (the floor)
  fastopt.torch              fastopt.torch.<RULE>: zero_grad, backward, step()
  fastopt.torch in-backward  step_in_backward(model, fastopt.torch.<RULE>)
  torch fused                torch.optim.<RULE>(fused=True): zero_grad, backward, step()
  torch fused in-backward    torch's recipe: one <RULE>([p], fused=True) per parameter, stepped
                             and zero_grad()-ed by p.register_post_accumulate_grad_hook

The variants are timed in interleaved rounds (the order rotates each round), so drift on a
shared machine hits all alike; each row gives the median time per iteration and its spread
(25th-75th percentile of the rounds), in wall time and in CPU time of the process, and the
ratio to the same implementation's ordinary step is the median of per-round ratios.  The same
rounds also time the optimizer work alone (one `step()` after backward, or the sum of the
per-parameter steps inside backward) with step pre/post hooks, and the rest of the
iteration.  The load average is printed before and after: on a shared machine compare within
one run only, and prefer `--threads 1` and the CPU-time columns (two threads on two busy
cores measure torch's OpenMP workers waiting for each other more than the step).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from fastopt.benchmark import IN_LOOP_RULE as RULE  # the rule the training-loop cases run

VARIANTS = ["fwd+bwd only", "fastopt.torch", "fastopt.torch in-backward", "torch fused",
            "torch fused in-backward"]
# variant -> (the ordinary variant its ratio is taken against)
PAIRS = {"fastopt.torch in-backward": "fastopt.torch", "torch fused in-backward": "torch fused"}


def model_cases(quick):
    """name -> (build the model, make a batch, loss), float32."""
    import torch

    def mlp(width):
        def build():
            layers = []
            for i in range(4):
                layers.append(torch.nn.Linear(width, width))
                if i < 3:
                    layers.append(torch.nn.ReLU())
            return torch.nn.Sequential(*layers)

        def batch(g):
            return torch.randn(64, width, generator=g), torch.randn(64, width, generator=g)
        return build, batch, torch.nn.functional.mse_loss

    def cnn_build():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10))

    def cnn_batch(g):
        return torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

    cases = {"MLP 4x4096, batch 64": mlp(4096),
             "CNN (3 conv + 2 linear), batch 32x3x32x32": (cnn_build, cnn_batch,
                                                           torch.nn.functional.cross_entropy)}
    if not quick:
        cases["MLP 4x1024, batch 64"] = mlp(1024)
    return cases


def make_iterations(case, lr=1e-4):
    """{variant: iteration()} plus {variant: [optimizers whose steps are timed]}."""
    import torch
    import fastopt.torch as ft
    from fastopt.torch_in_backward import step_in_backward

    build, batch, loss_fn = case
    torch.manual_seed(0)
    template = build()
    g = torch.Generator().manual_seed(1)
    x, y = batch(g)
    iterations, stepped = {}, {}
    for variant in VARIANTS:
        model = build()
        model.load_state_dict(template.state_dict())
        if variant == "fwd+bwd only":
            opt = None
            optimizers = []
        elif variant == "fastopt.torch":
            opt = getattr(ft, RULE)(model.parameters(), lr=lr)
            optimizers = [opt]
        elif variant == "torch fused":
            opt = getattr(torch.optim, RULE)(model.parameters(), lr=lr, fused=True)
            optimizers = [opt]
        elif variant == "fastopt.torch in-backward":
            opt = step_in_backward(model, getattr(ft, RULE), lr=lr)
            optimizers = opt.optimizers
        else:  # torch's "fuse the optimizer step into the backward pass" recipe
            per_param = {p: getattr(torch.optim, RULE)([p], lr=lr, fused=True)
                         for p in model.parameters()}

            def hook(p, per_param=per_param):
                per_param[p].step()
                per_param[p].zero_grad()
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(hook)
            opt = None
            optimizers = list(per_param.values())
        iterations[variant] = _iteration(model, opt, x, y, loss_fn,
                                         in_backward="in-backward" in variant)
        stepped[variant] = optimizers
    return iterations, stepped


def _iteration(model, opt, x, y, loss_fn, in_backward):
    if in_backward:
        def iteration():
            loss_fn(model(x), y).backward()
    elif opt is None:
        def iteration():
            model.zero_grad()
            loss_fn(model(x), y).backward()
    else:
        def iteration():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return iteration


def _time_rounds(fns, stepped, rounds, calls):
    """Per round and variant: wall and CPU seconds (all the process's threads) per iteration,
    and wall and CPU seconds of it inside the optimizers' step()s (timed by step pre/post
    hooks, about a microsecond per step() call)."""
    clocks = (time.perf_counter, time.process_time)
    spent = {name: [0.0, 0.0] for name in fns}
    handles = []
    for name, optimizers in stepped.items():
        for opt in optimizers:
            start = [0.0, 0.0]

            def pre(o, args, kwargs, start=start):
                start[0], start[1] = clocks[0](), clocks[1]()

            def post(o, args, kwargs, start=start, name=name):
                spent[name][0] += clocks[0]() - start[0]
                spent[name][1] += clocks[1]() - start[1]
            handles += [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    samples = {name: {"wall": [], "cpu": [], "step_wall": [], "step_cpu": []} for name in fns}
    names = list(fns)
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(0.01)  # let the previous variant's spinning OpenMP threads settle
                spent[name] = [0.0, 0.0]
                wall, cpu = clocks[0](), clocks[1]()
                for _ in range(calls):
                    fns[name]()
                out = samples[name]
                out["wall"].append((clocks[0]() - wall) / calls)
                out["cpu"].append((clocks[1]() - cpu) / calls)
                out["step_wall"].append(spent[name][0] / calls)
                out["step_cpu"].append(spent[name][1] / calls)
    finally:
        for h in handles:
            h.remove()
    return {name: {k: np.array(v) * 1e3 for k, v in d.items()} for name, d in samples.items()}


def _spread(values):
    return (float(np.median(values)), float(np.percentile(values, 25)),
            float(np.percentile(values, 75)))


def run(quick=False, rounds=None, print_fn=print, threads=None):
    """Time every case; print the table through print_fn and return its rows (dicts)."""
    import torch
    import fastopt
    from fastopt.benchmark import torch_reads_ready

    torch_reads_ready()
    if threads is not None:
        torch.set_num_threads(threads)
        fastopt.set_num_threads(threads)
    rounds = rounds or (4 if quick else 15)
    rows = []
    load_before = os.getloadavg()
    print_fn(f"optimizer in backward: forward + backward + {RULE} step, float32, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch threads, "
             f"{fastopt.get_num_threads()} fastopt threads, {rounds} interleaved rounds")
    print_fn(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
             f"on {os.cpu_count()} CPUs")
    for case_name, case in model_cases(quick).items():
        fns, stepped = make_iterations(case)
        params = stepped["fastopt.torch"][0].param_groups[0]["params"]
        n_params, n_elems = len(params), sum(p.numel() for p in params)
        for fn in fns.values():  # warm up: optimizer states, allocator
            fn()
            fn()
        t0 = time.perf_counter()
        fns["fastopt.torch"]()
        one = time.perf_counter() - t0
        calls = max(1, int(0.15 / max(one, 1e-6)))  # ~0.15 s per sample
        samples = _time_rounds(fns, stepped, rounds, calls)
        print_fn(f"\n{case_name}: {n_params} tensors, {n_elems / 1e6:.2f}M parameters; "
                 f"{calls} iteration(s) per sample; ms per iteration, median (p25-p75)")
        print_fn(f"{'variant':<26}{'wall ms':>23}{'CPU ms':>23}{'step':>8}{'rest':>8}"
                 f"{'ratio wall':>23}{'ratio CPU':>23}{'step':>7}")
        for variant in VARIANTS:
            d = samples[variant]
            row = dict(case=case_name, variant=variant, tensors=n_params, elements=n_elems,
                       rounds=rounds, calls_per_sample=calls)
            for key in ("wall", "cpu"):
                row[f"{key}_ms"], row[f"{key}_ms_p25"], row[f"{key}_ms_p75"] = _spread(d[key])
            row["step_cpu_ms"] = float(np.median(d["step_cpu"])) if stepped[variant] else None
            row["step_wall_ms"] = float(np.median(d["step_wall"])) if stepped[variant] else None
            row["rest_cpu_ms"] = float(np.median(d["cpu"] - d["step_cpu"]))
            text = (f"{variant:<26}{_fmt(row['wall_ms'], row['wall_ms_p25'], row['wall_ms_p75'])}"
                    f"{_fmt(row['cpu_ms'], row['cpu_ms_p25'], row['cpu_ms_p75'])}"
                    f"{'' if row['step_cpu_ms'] is None else format(row['step_cpu_ms'], '.2f'):>8}"
                    f"{row['rest_cpu_ms']:>8.1f}")
            if variant in PAIRS:
                base = samples[PAIRS[variant]]
                for key in ("wall", "cpu"):
                    row[f"ratio_{key}"], row[f"ratio_{key}_p25"], row[f"ratio_{key}_p75"] = \
                        _spread(d[key] / base[key])
                    text += _fmt(row[f"ratio_{key}"], row[f"ratio_{key}_p25"],
                                 row[f"ratio_{key}_p75"], "x", 3)
                row["step_cpu_ratio"] = float(np.median(d["step_cpu"] / base["step_cpu"]))
                text += f"{row['step_cpu_ratio']:>6.2f}x"
            print_fn(text)
            rows.append(row)
        del fns, stepped, samples
    load_after = os.getloadavg()
    print_fn(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print_fn("wall: elapsed time; CPU: CPU time of all the process's threads (what the work "
             "costs, whoever else holds the cores; spinning OpenMP workers count too); step: CPU "
             "ms inside the optimizer step() calls (one after backward, or one per parameter "
             "inside it); rest: CPU ms of the rest (forward, backward, zero_grad).  ratio: "
             "in-backward / the same optimizer stepping after backward, median (p25-p75) of "
             "per-round ratios, < 1: in-backward is faster; step: the same for the step CPU ms")
    for row in rows:
        row["load_before"], row["load_after"] = load_before, load_after
    return rows


def _fmt(median, p25, p75, unit="", digits=1):
    return f"{median:.{digits}f}{unit} ({p25:.{digits}f}-{p75:.{digits}f})".rjust(23)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastopt.bench_in_backward",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two models, 4 rounds (about a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick, rounds=args.rounds, threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
