"""Optimizer in backward, timed: a whole training iteration (forward + backward + step) of
CPU models, float32, with the step after backward and with the step in backward.

    python -m fastopt.bench_in_backward [--quick] [--rounds N] [--json FILE]

Variants, each on its own copy of the model (same initial weights):
  fwd+bwd only               zero_grad + forward + backward, no step (the floor)
  fastopt.torch              fastopt.torch.Adam: zero_grad, backward, step()
  fastopt.torch in-backward  step_in_backward(model, fastopt.torch.Adam)
  torch fused                torch.optim.Adam(fused=True): zero_grad, backward, step()
  torch fused in-backward    torch's recipe: one Adam([p], fused=True) per parameter, stepped
                             and zero_grad()-ed by p.register_post_accumulate_grad_hook

The variants are timed in interleaved rounds (the order rotates each round), so drift on a
shared machine hits all alike; each row gives the median time per iteration and its spread
(25th-75th percentile of the rounds), and the ratio to the same implementation's ordinary
step is the median of per-round ratios.  A separate set of rounds times the optimizer work
alone (one `step()` after backward, or the sum of the per-parameter steps inside backward),
with step pre/post hooks.  The load average is printed before and after: on a shared
machine, compare within one run only.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

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
            opt = ft.Adam(model.parameters(), lr=lr)
            optimizers = [opt]
        elif variant == "torch fused":
            opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
            optimizers = [opt]
        elif variant == "fastopt.torch in-backward":
            opt = step_in_backward(model, ft.Adam, lr=lr)
            optimizers = opt.optimizers
        else:  # torch's "fuse the optimizer step into the backward pass" recipe
            per_param = {p: torch.optim.Adam([p], lr=lr, fused=True) for p in model.parameters()}

            def hook(p, per_param=per_param):
                per_param[p].step()
                per_param[p].zero_grad()
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(hook)
            opt = None
            optimizers = list(per_param.values())
        iterations[variant] = _iteration(model, opt, x, y, loss_fn, in_backward="in-backward" in variant)
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


def _time_rounds(fns, rounds, calls):
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.01)  # let the previous variant's spinning OpenMP threads settle
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.perf_counter() - t0) / calls)
    return samples


def _step_seconds(fns, stepped, rounds):
    """Median seconds per iteration spent inside the optimizers' step()s."""
    spent = {name: 0.0 for name in fns}
    handles = []
    for name, optimizers in stepped.items():
        for opt in optimizers:
            start = {}

            def pre(o, args, kwargs, start=start):
                start[0] = time.perf_counter()

            def post(o, args, kwargs, start=start, name=name):
                spent[name] += time.perf_counter() - start[0]
            handles += [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    per_round = {name: [] for name in fns}
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                spent[name] = 0.0
                fn()
                per_round[name].append(spent[name])
    finally:
        for h in handles:
            h.remove()
    return {name: float(np.median(v)) for name, v in per_round.items()}


def run(quick=False, rounds=None, print_fn=print, threads=None):
    """Time every case; print the table through print_fn and return its rows (dicts)."""
    import torch
    import fastopt

    if threads is not None:
        torch.set_num_threads(threads)
        fastopt.set_num_threads(threads)
    rounds = rounds or (4 if quick else 15)
    rows = []
    load_before = os.getloadavg()
    print_fn(f"optimizer in backward: forward + backward + Adam step, float32, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch threads, "
             f"{fastopt.get_num_threads()} fastopt threads, {rounds} interleaved rounds")
    print_fn(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
             f"on {os.cpu_count()} CPUs")
    for case_name, case in model_cases(quick).items():
        fns, stepped = make_iterations(case)
        n_params = len(list(stepped["fastopt.torch"][0].param_groups[0]["params"]))
        n_elems = sum(p.numel() for p in stepped["fastopt.torch"][0].param_groups[0]["params"])
        for fn in fns.values():  # warm up: optimizer states, allocator
            fn()
            fn()
        t0 = time.perf_counter()
        fns["fastopt.torch"]()
        one = time.perf_counter() - t0
        calls = max(1, int(0.15 / max(one, 1e-6)))  # ~0.15 s per sample
        samples = _time_rounds(fns, rounds, calls)
        step_s = _step_seconds(fns, stepped, max(3, rounds // 3))
        print_fn(f"\n{case_name}: {n_params} tensors, {n_elems / 1e6:.2f}M parameters; "
                 f"{calls} iteration(s) per sample")
        print_fn(f"{'variant':<27}{'ms/iter':>9}{'p25-p75':>16}{'step ms':>9}"
                 f"{'in-bwd/ordinary (p25-p75)':>30}")
        for variant in VARIANTS:
            s = np.array(samples[variant]) * 1e3
            row = dict(case=case_name, variant=variant, tensors=n_params, elements=n_elems,
                       rounds=rounds, calls_per_sample=calls, ms=float(np.median(s)),
                       ms_p25=float(np.percentile(s, 25)), ms_p75=float(np.percentile(s, 75)),
                       ms_min=float(s.min()), ms_max=float(s.max()),
                       step_ms=step_s[variant] * 1e3 if variant != "fwd+bwd only" else None)
            ratio_text = ""
            if variant in PAIRS:
                ratios = np.array(samples[variant]) / np.array(samples[PAIRS[variant]])
                row.update(ratio=float(np.median(ratios)), ratio_p25=float(np.percentile(ratios, 25)),
                           ratio_p75=float(np.percentile(ratios, 75)))
                ratio_text = (f"{row['ratio']:.3f}x ({row['ratio_p25']:.3f}-"
                              f"{row['ratio_p75']:.3f})")
            step_text = "" if row["step_ms"] is None else f"{row['step_ms']:.2f}"
            print_fn(f"{variant:<27}{row['ms']:>9.2f}{row['ms_p25']:>8.2f}-{row['ms_p75']:<7.2f}"
                     f"{step_text:>9}{ratio_text:>30}")
            rows.append(row)
        del fns, stepped
    load_after = os.getloadavg()
    print_fn(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print_fn("ratio < 1: the in-backward iteration is faster than the same optimizer stepping "
             "after backward; step ms: time inside the optimizer step(s) per iteration "
             "(separate rounds, with step hooks)")
    for row in rows:
        row["load_before"], row["load_after"] = load_before, load_after
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastopt.bench_in_backward",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two models, 4 rounds")
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
