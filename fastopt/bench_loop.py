"""The optimizer step where users run it: right after a training iteration's heavy work.

In isolation an optimizer step has the machine to itself.  In a training loop it runs right
after the forward and backward passes (torch: OpenMP) or after BLAS matmuls (numpy: OpenBLAS),
whose worker threads keep spinning on the cores for a while after their last parallel region
(torch's ~8 ms, numpy's OpenBLAS up to ~100 ms on this machine), and a step that needs a
second core has to get it from them.  These cases time the step at that point, and the whole
iteration, for every implementation in the same run:

- torch loop: a 2048-2048-2048-10 MLP (8.41M parameters), batch 256, float32, the rule
  `benchmark.IN_LOOP_RULE` -- fastopt.torch's class against torch.optim's with `fused=True` and
  the default (foreach).
- numpy loop: two 2048x2048 float32 weights whose gradients come out of an `np.dot` of
  2048x2048 inputs right before the step -- the same rule in fastopt with N threads, with 1
  thread, and in plain in-place numpy, with the matmuls on OpenBLAS's own threads (the
  default: its workers spin for up to ~100 ms after each matmul on the cores the step needs);
  then, where numpy's OpenBLAS takes a threads callback, all three again with the matmuls on
  fastopt's threads (fastopt.share_blas_threads()).  Each of the two runs in a process of its
  own.

Implementations alternate iteration by iteration (the order rotates every round), so drift on
a shared machine hits all alike; times are medians, with the 25th-75th percentiles, and each
ratio is also computed per block of rounds to show its spread, and over the "quiet" rounds
alone: those in which no implementation's heavy work was slowed by other processes.
"""
import os
import time

import numpy as np

import fastopt
from fastopt.benchmark import IN_LOOP_RULE, numpy_runner

MLP_WIDTHS = (2048, 2048, 2048, 10)
BATCH = 256
MATMUL_N = 2048


def _load():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def time_in_loop(cases, rounds, pause_s=0.0):
    """cases: {name: (before, step)}.  Every round runs each case's before() and step() once,
    in an order that rotates every round.  Returns {name: {'before': [...], 'step': [...],
    'iteration': [...]}} in seconds, one entry per round; `iteration` is before() + step() (a
    pause between them is not counted)."""
    names = list(cases)
    samples = {name: {"before": [], "step": [], "iteration": []} for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            before, step = cases[name]
            t0 = time.perf_counter()
            before()
            t1 = time.perf_counter()
            if pause_s:
                time.sleep(pause_s)
            t2 = time.perf_counter()
            step()
            t3 = time.perf_counter()
            samples[name]["before"].append(t1 - t0)
            samples[name]["step"].append(t3 - t2)
            samples[name]["iteration"].append((t1 - t0) + (t3 - t2))
    return samples


def quiet_rounds(samples, slack=1.2):
    """The rounds in which no case's forward/backward (or matmuls) ran over `slack` times its
    10th percentile: those that other processes on a shared machine left alone.  Both the
    heavy work and the step use every core, so a round that slowed the one usually hit both."""
    keep = None
    for s in samples.values():
        before = np.asarray(s["before"])
        ok = before <= slack * np.percentile(before, 10)
        keep = ok if keep is None else keep & ok
    return keep


def summarize(samples, blocks=5, rounds=None):
    """Medians, quartiles, and the medians over blocks of rounds (for the spread of ratios);
    `rounds`: a mask of the rounds to use (all by default)."""
    out = {}
    for name, s in samples.items():
        out[name] = {}
        for kind in ("step", "iteration"):
            xs = np.asarray(s[kind])
            if rounds is not None:
                xs = xs[rounds]
            out[name][kind] = dict(median=float(np.median(xs)), p25=float(np.percentile(xs, 25)),
                                   p75=float(np.percentile(xs, 75)), n=int(xs.size),
                                   blocks=[float(np.median(b)) for b in np.array_split(xs, min(blocks, xs.size))])
    return out


def ratio(summary, other, mine, kind):
    """other's median time / mine, and its min..max over blocks (>1: `mine` is faster)."""
    a, b = summary[other][kind], summary[mine][kind]
    per_block = [x / y for x, y in zip(a["blocks"], b["blocks"])]
    return a["median"] / b["median"], min(per_block), max(per_block)


# ---- the torch loop ----

def torch_loop_cases(threads, seed=0):
    import torch
    import fastopt.torch as ft
    from fastopt.benchmark import torch_reads_ready
    torch_reads_ready()

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, MLP_WIDTHS[0], generator=gen)
    y = torch.randint(0, MLP_WIDTHS[-1], (BATCH,), generator=gen)

    def model():
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    cases = {}
    torch_class, fastopt_class = getattr(torch.optim, IN_LOOP_RULE), getattr(ft, IN_LOOP_RULE)
    for name, make in (("torch fused", lambda p: torch_class(p, lr=1e-4, fused=True)),
                       ("torch foreach", lambda p: torch_class(p, lr=1e-4, foreach=True)),
                       ("fastopt.torch", lambda p: fastopt_class(p, lr=1e-4))):
        net = model()
        opt = make(net.parameters())

        def forward_backward(net=net, opt=opt):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()

        cases[name] = (forward_backward, opt.step)
    n_params = sum(p.numel() for p in net.parameters())
    return cases, n_params


# ---- the numpy loop ----

def numpy_loop_cases(threads, seed=0, shared=False):
    """The numpy loop's cases; shared: their matmuls on fastopt's threads
    (fastopt.share_blas_threads()) rather than on OpenBLAS's own."""
    rng = np.random.default_rng(seed)
    inputs = (rng.standard_normal((MATMUL_N, MATMUL_N)) / MATMUL_N).astype(np.float32)
    init = [(rng.standard_normal((MATMUL_N, MATMUL_N)) * 0.02).astype(np.float32) for _ in range(2)]
    fastopt.share_blas_threads(shared)

    def make(kind):
        params = [w.copy() for w in init]
        grads = [np.empty_like(w) for w in init]

        def matmuls():  # the gradients come out of BLAS right before the step
            for w, g in zip(params, grads):
                np.dot(inputs, w, out=g)

        if kind == "numpy":
            return matmuls, numpy_runner(IN_LOOP_RULE, params, grads)
        opt = getattr(fastopt, IN_LOOP_RULE)(params, lr=1e-4)
        n = 1 if kind == "one" else threads

        def step():
            fastopt.set_num_threads(n)
            opt.step(grads)
        return matmuls, step

    cases = {f"fastopt {threads} threads": make("many"), "fastopt 1 thread": make("one"),
             "numpy": make("numpy")}
    return cases, 2 * MATMUL_N * MATMUL_N


# ---- reporting ----

def _ms(s):
    return f"{s['median'] * 1e3:8.2f} ms [{s['p25'] * 1e3:6.2f}-{s['p75'] * 1e3:6.2f}]"


def _print_table(summary, pause_summary):
    print(f"  {'':<20}{'step right after':>29}{'whole iteration':>31}"
          + (f"{'step after 10 ms pause':>31}" if pause_summary else ""))
    for name, s in summary.items():
        line = f"  {name:<20}{_ms(s['step']):>29}{_ms(s['iteration']):>31}"
        if pause_summary:
            line += f"{_ms(pause_summary[name]['step']):>31}"
        print(line)


def _print_ratios(summaries, lines):
    """lines: (other, mine, kind, what); each ratio over all rounds and over the quiet ones."""
    quiet = summaries.get("quiet")
    for other, mine, kind, what in lines:
        r, lo, hi = ratio(summaries["all"], other, mine, kind)
        text = f"  {what}: {r:.2f}x (blocks of rounds {lo:.2f}-{hi:.2f})"
        if quiet:
            q, qlo, qhi = ratio(quiet, other, mine, kind)
            text += f"; quiet rounds {q:.2f}x ({qlo:.2f}-{qhi:.2f})"
        print(text)


def _measure(cases, rounds, pause):
    for before, step in cases.values():  # warm up: first steps build state and plans
        for _ in range(2):
            before()
            step()
    samples = time_in_loop(cases, rounds)
    quiet = quiet_rounds(samples)
    out = {"all": summarize(samples), "rounds": rounds, "quiet_rounds": int(quiet.sum())}
    if quiet.sum() >= 5:
        out["quiet"] = summarize(samples, rounds=quiet)
    if pause:
        out["pause"] = summarize(time_in_loop(cases, max(5, rounds // 3), pause_s=0.01))
    _print_table(out["all"], out.get("pause"))
    print(f"  quiet rounds (no case's heavy work over 1.2x its 10th percentile): "
          f"{out['quiet_rounds']} of {rounds}")
    return out


def numpy_phase(threads, seed, shared, rounds, pause):
    """The numpy loop's cases with the matmuls on OpenBLAS's own threads or (shared) on
    fastopt's; prints the table and ratios, returns the summaries."""
    cases, n = numpy_loop_cases(threads, seed, shared=shared)
    many, one = f"fastopt {threads} threads", "fastopt 1 thread"
    where = ("the matmuls on fastopt's threads (fastopt.share_blas_threads())" if shared
             else "the matmuls on OpenBLAS's own threads (the default)")
    print(f"numpy loop, {where}: two {MATMUL_N}x{MATMUL_N} float32 weights, np.dot of "
          f"{MATMUL_N}x{MATMUL_N} inputs with each, then {IN_LOOP_RULE}; {rounds} interleaved "
          f"iterations each; load average {_load()}")
    m = _measure(cases, rounds, pause)
    m["elements"] = n
    _print_ratios(m, [
        (one, many, "step", f"step after matmuls, fastopt 1 thread / {threads} threads"),
        ("numpy", many, "step", f"step after matmuls, numpy / fastopt {threads} threads"),
        (one, many, "iteration", f"whole iteration, fastopt 1 thread / {threads} threads")])
    return m


def _numpy_phase_in_child(threads, seed, shared, rounds, pause):
    """numpy_phase in a process of its own: a process keeps one record of whether threads pay
    for a rule (csrc/threads.c), which spinning OpenBLAS workers teach that they do not, and a
    user's process runs one setting or the other."""
    import json
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "phase.json")
        code = ("import json; from fastopt import bench_loop; "
                f"m = bench_loop.numpy_phase({threads}, {seed}, {shared}, {rounds}, {bool(pause)}); "
                f"json.dump(m, open({out!r}, 'w'))")
        # (from elsewhere, with fastopt's own folder first: python -c puts the current one first)
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fastopt.__file__))}
        sys.stdout.flush()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=folder, env=env)
        with open(out) as f:
            return json.load(f)


def run(threads=None, quick=False, pause=None, seed=0):
    """Both loops; prints their tables and returns the summaries."""
    threads = threads or fastopt.get_num_threads()
    saved = fastopt.get_num_threads()
    pause = (not quick) if pause is None else pause
    results = {"threads": threads}
    print(f"In a training loop: the step right after the iteration's heavy work, {threads} threads "
          "(medians [25th-75th percentiles]; ratios: the other's time / fastopt's)")
    try:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("  torch loop: skipped (no torch)")
        else:
            cases, n_params = torch_loop_cases(threads, seed)
            rounds = 30 if quick else 150
            print(f"torch loop: MLP {'-'.join(map(str, MLP_WIDTHS))} ({n_params / 1e6:.2f}M "
                  f"parameters), batch {BATCH}, {IN_LOOP_RULE} float32, {rounds} interleaved iterations "
                  f"each; load average {_load()}")
            results["torch"] = m = _measure(cases, rounds, pause)
            m["n_params"] = n_params
            _print_ratios(m, [
                ("torch fused", "fastopt.torch", "step", "step after backward, torch fused / fastopt.torch"),
                ("torch foreach", "fastopt.torch", "step", "step after backward, torch foreach / fastopt.torch"),
                ("torch fused", "fastopt.torch", "iteration", "whole iteration, torch fused / fastopt.torch")])
        rounds = 14 if quick else 60
        callback = bool(fastopt.config._loaded_openblas())
        for shared in [False, True] if callback else [False]:
            results["numpy shared" if shared else "numpy"] = _numpy_phase_in_child(
                threads, seed, shared, rounds, pause)
    finally:
        fastopt.set_num_threads(saved)
    print(flush=True)
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pause", action="store_true", help="also time the step after a 10 ms pause")
    a = ap.parse_args()
    run(a.threads, a.quick, pause=a.pause or None)
