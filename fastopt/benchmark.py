"""`python -m fastopt bench`: fastopt against numpy (in place) and torch.optim, side by side.

Every number comes from one run of this command: implementations are timed in interleaved
rounds (so drift on a shared machine hits all alike) and reported as medians.  The bandwidth
ceiling is measured in the same run by fastopt's streaming kernel (Adam's 7 streams with no
arithmetic, same threads) at the same memory footprint as the case it is compared with.
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np

import fastopt
from fastopt import _kernels

# from the registry: rule name -> (fastopt class, kwargs, memory streams per element: reads +
# writes, torch class); and the torch class's kwargs (the same values, torch's names)
RULES = {r.name: (getattr(fastopt, r.name), r.benchmark[0], r.benchmark[1], r.torch)
         for r in fastopt.rules.RULES if r.benchmark is not None}
TORCH_KW = {torch_name: {("alpha" if k == "rho" else k): v for k, v in kw.items()}
            for _, kw, _, torch_name in RULES.values()}


# the rule that the in-a-training-loop cases (fastopt.bench_in_backward) run
IN_LOOP_RULE = "Adam"

# pairs of rules timed side by side on 1.6e7 float32 elements: (rule, the rule it is compared with)
PAIRS = [("Lion", "Adam")]  # one state buffer against two: 20 against 28 bytes per element


# ---- model parameter shapes (torchvision's ResNet-18 and ResNet-50, without running torch) ----

def resnet_shapes(blocks, bottleneck):
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin, expansion = 64, 4 if bottleneck else 1
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for b in range(n):
            cout = width * expansion
            if bottleneck:
                convs = [(width, cin, 1, 1), (width, width, 3, 3), (cout, width, 1, 1)]
            else:
                convs = [(width, cin, 3, 3), (width, width, 3, 3)]
            for c in convs:
                shapes += [c, (c[0],), (c[0],)]
            if b == 0 and (stage > 0 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, cin), (1000,)]


MODELS = {"ResNet-18": resnet_shapes((2, 2, 2, 2), False),
          "ResNet-50": resnet_shapes((3, 4, 6, 3), True)}


# ---- numpy in place (preallocated temporaries, out=) ----

def _decay_add_square(buf, g, rho, tmp):
    """buf <- rho buf + (1 - rho) g^2, in place (tmp is scratch)."""
    buf *= rho
    np.multiply(g, g, out=tmp)
    tmp *= 1 - rho
    buf += tmp


def numpy_step(rule, p, g, state, t, tmp, tmp2):
    if rule == "SGD":  # with momentum 0.9
        b = state["b"]
        b *= 0.9
        np.multiply(g, 0.01, out=tmp)
        b += tmp
        p -= b
    elif rule == "Adagrad":
        G = state["G"]
        np.multiply(g, g, out=tmp)
        G += tmp
        np.add(G, 1e-8, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.divide(g, tmp, out=tmp)
        tmp *= 0.01
        p -= tmp
    elif rule == "Adadelta":
        sq, acc = state["sq"], state["acc"]
        _decay_add_square(sq, g, 0.9, tmp)
        np.add(acc, 1e-6, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.add(sq, 1e-6, out=tmp2)
        np.sqrt(tmp2, out=tmp2)
        np.divide(tmp, tmp2, out=tmp)
        tmp *= g
        _decay_add_square(acc, tmp, 0.9, tmp2)
        p -= tmp
    elif rule == "RMSprop":
        sq = state["sq"]
        _decay_add_square(sq, g, 0.9, tmp)
        np.add(sq, 1e-8, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.divide(g, tmp, out=tmp)
        tmp *= 1e-3
        p -= tmp
    else:  # the Adam family: m, v, and their update
        b1, b2 = 0.9, 0.999
        m, v = state["m"], state["v"]
        if rule == "AdamW":
            p *= 1 - 1e-3 * 0.01
        m *= b1
        np.multiply(g, 1 - b1, out=tmp)
        m += tmp
        if rule == "AdaMax":
            v *= b2
            np.abs(g, out=tmp)
            np.maximum(v, tmp, out=v)
            np.add(v, 1e-8, out=tmp)
            np.divide(m, tmp, out=tmp)
            tmp *= 2e-3 / (1 - b1 ** t)
            p -= tmp
            return
        _decay_add_square(v, g, b2, tmp)
        np.sqrt(v, out=tmp)
        tmp *= 1 / math.sqrt(1 - b2 ** t)
        tmp += 1e-8
        if rule == "Nadam":
            np.multiply(m, 0.9 * 2e-3 / (1 - b1 ** t), out=tmp2)
            tmp2 += g * (0.1 * 2e-3 / (1 - b1 ** t))
        else:
            np.multiply(m, 1e-3 / (1 - b1 ** t), out=tmp2)
        np.divide(tmp2, tmp, out=tmp2)
        p -= tmp2


# the rules numpy_step writes out (the others are compared with torch only)
NUMPY_RULES = ("SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "AdaMax", "Nadam")


def numpy_runner(rule, params, grads):
    state = [{k: np.zeros_like(p) for k in ("b", "G", "sq", "acc", "m", "v")} for p in params]
    tmps = [(np.empty_like(p), np.empty_like(p)) for p in params]
    t = [0]

    def step():
        t[0] += 1
        for p, g, s, (a, b) in zip(params, grads, state, tmps):
            numpy_step(rule, p, g, s, t[0], a, b)
    return step


def dropin_runners(torch_name, shapes, threads):
    """fastopt.torch against torch.optim's for-loop, foreach and fused on the same tensors."""
    import torch
    import fastopt.torch as ft
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for label, module, flag in (("fastopt.torch", ft, {}), ("torch for-loop", torch.optim, dict(foreach=False)),
                                ("torch foreach", torch.optim, dict(foreach=True)),
                                ("torch fused", torch.optim, dict(fused=True))):
        tensors = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        for t in tensors:
            t.grad = torch.randn(t.shape, generator=g) * 1e-3
        try:
            opt = getattr(module, torch_name)(tensors, **TORCH_KW[torch_name], **flag)
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue
        out[label] = opt.step
    return out


def run_dropin(rule, shapes, threads, budget_s):
    """Seconds per step of each runner.  torch's fused step, at the memory floor as fastopt.torch
    is, is timed against fastopt.torch alone, in 15 rounds of its own: interleaved with torch's
    for-loop and foreach steps (which allocate and free temporaries of the model's size), the
    same pair's ratio moved by 0.2 between runs; the slower runners' ratios to fastopt.torch come
    from their own rounds with it."""
    runners = dropin_runners(RULES[rule][3], shapes, threads)
    floor_pair = {k: runners.pop(k) for k in ("fastopt.torch", "torch fused") if k in runners}
    times = time_side_by_side(floor_pair, budget_s, min_rounds=15)
    if runners:
        slower = time_side_by_side({"fastopt.torch": floor_pair["fastopt.torch"], **runners}, budget_s)
        times.update({k: slower[k] / slower["fastopt.torch"] * times["fastopt.torch"] for k in runners})
    return times


def torch_runners(torch_name, params, grads, threads):
    """{'torch for-loop': step, 'torch foreach': ..., 'torch fused': ...} where torch has them."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    out = {}
    for label, flag in (("torch for-loop", dict(foreach=False)), ("torch foreach", dict(foreach=True)),
                        ("torch fused", dict(fused=True))):
        tensors = [torch.from_numpy(p.copy()).requires_grad_() for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        try:
            opt = getattr(torch.optim, torch_name)(tensors, **TORCH_KW[torch_name], **flag)
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue  # e.g. no fused CPU kernel for this rule
        out[label] = opt.step
    return out


# ---- timing ----

def time_side_by_side(fns, budget_s, min_rounds=7):
    """Median seconds per call of each function, timed in interleaved rounds."""
    calls = {}
    for name, fn in fns.items():  # warm up, and size the batches to ~budget/rounds
        fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        calls[name] = max(1, int(budget_s / min_rounds / len(fns) / one))
    samples = {name: [] for name in fns}
    order = list(fns.items())
    for _ in range(min_rounds):
        order.reverse()  # alternate rounds run backwards: none always follows the same one
        for name, fn in order:
            time.sleep(0.01)  # let the previous implementation's spinning threads (OpenMP) settle
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: float(np.median(s)) for name, s in samples.items()}


def stream_count(streams, shapes):
    """Element streams a step over tensors of these shapes moves: streams per element, or the
    rule's function of each shape (registry: Rule.benchmark)."""
    per = streams if callable(streams) else (lambda shape: streams)
    return sum(per(tuple(s)) * math.prod(s) for s in shapes)


def stream_runner(n_bytes):
    """The 7-stream kernel over the same memory footprint; returns (step, bytes it moves)."""
    n = max(1, n_bytes // 28)
    bufs = [np.ones(n, np.float32) for _ in range(4)]
    bufs[1][:] = 0.0
    return (lambda: _kernels.stream(*bufs)), 28 * n


def busy_loop(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


# ---- Python-side costs: what the engine adds around the kernel ----

def overhead_calls():
    """Calls on one tensor of 1e3 float32 elements (the kernel itself is ~0.3 us): a step, the
    same with lr changed before every step (a schedule), the functional call, and the step
    without the optimizer's lock and method call (the engine's plan called directly)."""
    rule = fastopt.rules.BY_NAME[IN_LOOP_RULE]
    rng = np.random.default_rng(0)
    p = rng.standard_normal(1000).astype(np.float32)
    g = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
    opt = getattr(fastopt, rule.name)([p.copy()])
    opt.step([g])
    plan, groups, state, grads = opt._plan, opt.param_groups, opt.state, [g]
    scheduled = getattr(fastopt, rule.name)([p.copy()])
    scheduled.step([g])
    lrs, flip = (1e-3, 2e-3), [0]

    def lr_changed():
        flip[0] ^= 1
        scheduled.param_groups[0]["lr"] = lrs[flip[0]]
        scheduled.step([g])
    q = p.copy()
    st = getattr(fastopt, rule.state).new(q)
    function = getattr(fastopt.functional, rule.function)
    fns = {"step": lambda: opt.step(grads), "step, lr changed": lr_changed,
           "functional": lambda: function(q, g, st, lr=1e-3),
           "step without lock": lambda: plan.run(groups, state, grads)}
    return fns


def run_overheads(budget_s):
    return time_side_by_side(overhead_calls(), budget_s, min_rounds=15)


def run_torch_overheads(threads, budget_s, n=161):
    """fastopt.torch's and torch fused's cost per tensor, from n tensors of 1 element against
    1 tensor of 1 element: (t_n - t_1) / (n - 1), the per-tensor Python and bookkeeping cost."""
    import torch
    import fastopt.torch as ft
    from fastopt import native_torch
    torch.set_num_threads(threads)
    fastopt_kind = lambda ts: getattr(ft, IN_LOOP_RULE)(ts, lr=1e-3)
    kinds = {"torch fused": (lambda ts: getattr(torch.optim, IN_LOOP_RULE)(ts, lr=1e-3, fused=True), None)}
    # both ways fastopt.torch's planned step reads the tensors, each set before its own steps
    if native_torch.start(wait=True):  # (an explicit start: after stop(), a plain one would not)
        kinds["fastopt.torch (C++ reads)"] = (fastopt_kind, lambda: native_torch.start(wait=False))
    kinds["fastopt.torch (Python reads)"] = (fastopt_kind, native_torch.stop)
    fns = {}
    for label, (make, route) in kinds.items():
        for count in (1, n):
            tensors = [torch.zeros(1, requires_grad=True) for _ in range(count)]
            for t in tensors:
                t.grad = torch.full((1,), 1e-3)
            opt = make(tensors)
            opt.step()
            fns[(label, count)] = opt.step if route is None else \
                (lambda step=opt.step, route=route: (route(), step()))
    try:
        t = time_side_by_side(fns, budget_s, min_rounds=15)
    finally:
        native_torch.start(wait=False)
    return {label: (t[(label, n)] - t[(label, 1)]) / (n - 1) for label in kinds}


# ---- the cases ----

def run_case(rule, dtype, shapes, threads, budget_s, with_numpy=True):
    cls, kw, streams, torch_name = RULES[rule]
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in shapes]
    opt = cls(params, **kw)
    n = sum(math.prod(s) for s in shapes)
    bytes_moved = stream_count(streams, shapes) * np.dtype(dtype).itemsize
    ceiling, ceiling_bytes = stream_runner(bytes_moved)
    fns = {"fastopt": lambda: opt.step(grads), "ceiling": ceiling}
    if with_numpy and rule in NUMPY_RULES:
        fns["numpy"] = numpy_runner(rule, [p.copy() for p in params], grads)
    fns.update(torch_runners(torch_name, params, grads, threads))
    times = time_side_by_side(fns, budget_s)
    return dict(rule=rule, dtype=np.dtype(dtype).name, elements=n, tensors=len(shapes),
                threads=threads, bytes=bytes_moved, times=times,
                ceiling_gbs=ceiling_bytes / times.pop("ceiling") / 1e9)


# ---- storage: bfloat16 parameters, gradients, state (fastopt.storage) ----

# label -> (param dtype, grad dtype, optimizer storage options); "bf16" is ml_dtypes.bfloat16
STORAGE_CASES = {
    "f32": ("float32", "float32", {}),
    "f32, bf16 state": ("float32", "float32", dict(state_dtype="bfloat16")),
    "f32, bf16 grad+state": ("float32", "bf16", dict(state_dtype="bfloat16")),
    "bf16, f32 state": ("bf16", "bf16", {}),
    "bf16 stochastic": ("bf16", "bf16", dict(state_dtype="bfloat16")),
    "bf16 nearest": ("bf16", "bf16", dict(state_dtype="bfloat16", rounding="nearest")),
    "bf16 + master": ("bf16", "bf16", dict(state_dtype="bfloat16", master_weights=True)),
}


def storage_bytes(streams, param, grad, state, master):
    """Bytes one step moves per element: the parameter read and written (with master weights:
    the float32 master read and written, the parameter only written), the gradient read, and
    streams - 3 state streams."""
    p = 2 * param if not master else param + 8
    return p + grad + (streams - 3) * state


def run_storage_case(rule, label, n, threads, budget_s):
    """One rule at n elements in the storage `label`, timed with all-float32 fastopt (and, for
    the all-bfloat16 cases, torch's fused step on the same bfloat16 tensors, where torch has
    it) in the same interleaved rounds."""
    from fastopt import storage
    cls, kw, streams, torch_name = RULES[rule]
    streams = stream_count(streams, [(n,)]) // n
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    base_g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    as_dtype = lambda a, d: a.astype(storage.bfloat16() if d == "bf16" else d)  # noqa: E731
    pd, gd, options = STORAGE_CASES[label]
    params, grads = [as_dtype(base, pd)], [as_dtype(base_g, gd)]
    opt = cls(params, **kw, **options)
    ref_params, ref_grads = [base.copy()], [base_g]
    ref = cls(ref_params, **kw)
    size = lambda d: 2 if d == "bf16" else np.dtype(d).itemsize  # noqa: E731
    state_size = 2 if options.get("state_dtype") == "bfloat16" else 4
    per_element = storage_bytes(streams, size(pd), size(gd), state_size,
                                options.get("master_weights", False))
    ceiling, ceiling_bytes = stream_runner(per_element * n)
    fns = {"fastopt": lambda: opt.step(grads), "f32": lambda: ref.step(ref_grads), "ceiling": ceiling}
    if pd == gd == "bf16" and options.get("state_dtype") == "bfloat16" and not options.get("master_weights"):
        try:
            import torch
            torch.set_num_threads(threads)
            t = torch.from_numpy(base).to(torch.bfloat16).requires_grad_()
            t.grad = torch.from_numpy(base_g).to(torch.bfloat16)
            tf = getattr(torch.optim, torch_name)([t], **TORCH_KW[torch_name], fused=True)
            tf.step()
            fns["torch fused"] = tf.step
        except (ImportError, RuntimeError, TypeError, ValueError):
            pass
    times = time_side_by_side(fns, budget_s)
    return dict(rule=rule, storage=label, elements=n, threads=threads, bytes_per_element=per_element,
                bytes=per_element * n, times=times, ceiling_gbs=ceiling_bytes / times.pop("ceiling") / 1e9)


STORAGE_HEADER = (f"{'rule':<10}{'storage':<22}{'size':>8}{'thr':>4} {'us/step':>10} {'B/el':>5} "
                  f"{'GB/s':>6} {'%ceil':>6} {'vs f32':>8} {'vs t.fused':>10}")


def format_storage_row(r):
    t = r["times"]
    gbs = r["bytes"] / t["fastopt"] / 1e9
    fused = f"{t['torch fused'] / t['fastopt']:9.2f}x" if "torch fused" in t else "         –"
    return (f"{r['rule']:<10}{r['storage']:<22}{size_label(r['elements']):>8}{r['threads']:>4} "
            f"{t['fastopt'] * 1e6:>10.0f} {r['bytes_per_element']:>5} {gbs:>6.1f} "
            f"{100 * gbs / r['ceiling_gbs']:>5.0f}% {t['f32'] / t['fastopt']:>7.2f}x {fused}")


def run_storage_table(rules, n, threads, budget_s, results):
    """The storage combinations of bfloat16 (needs ml_dtypes): printed and appended."""
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        print("\nbfloat16 storage: skipped (pip install ml_dtypes)")
        return
    print(f"\nbfloat16 storage ({fastopt.config.bf16_path()} rounding to nearest), {threads} threads: "
          "time of all-float32 fastopt (vs f32) and of torch's fused step on the same bfloat16 "
          "tensors (vs t.fused) / this one's; B/el: bytes moved per element")
    print(STORAGE_HEADER)
    for rule in rules:
        plain_state = RULES[rule][0].rule.plain_state
        if plain_state:
            print(f"{rule:<10}(bfloat16 parameters and gradients only: its {plain_state} need "
                  "float32/float64 state)")
        for label in STORAGE_CASES:
            if label == "f32" or (plain_state and STORAGE_CASES[label][2].get("state_dtype")):
                continue
            r = run_storage_case(rule, label, n, threads, budget_s)
            r["label"] = "storage"
            print(format_storage_row(r), flush=True)
            results.append(r)

def run_pair(rule, other, n, threads, budget_s):
    """Two rules on the same n float32 elements, timed in the same interleaved rounds."""
    fns = {}
    for name in (rule, other):
        cls, kw, _, _ = RULES[name]
        rng = np.random.default_rng(0)
        params, grads = [rng.standard_normal(n).astype(np.float32)], [(rng.standard_normal(n) * 1e-3).astype(np.float32)]
        opt = cls(params, **kw)
        fns[name] = (lambda o, g: lambda: o.step(g))(opt, grads)
    return time_side_by_side(fns, budget_s)


def size_label(n):
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def format_row(r):
    t, ceiling = r["times"], r["ceiling_gbs"]
    gbs = r["bytes"] / t["fastopt"] / 1e9
    ratio = lambda k: f"{t[k] / t['fastopt']:7.2f}x" if k in t else "      –"  # noqa: E731
    return (f"{r['rule']:<13}{r['dtype']:<8}{r['label']:>12}{r['threads']:>3} "
            f"{t['fastopt'] * 1e6:>11.1f} {gbs:>7.1f} {100 * gbs / ceiling:>6.0f}%"
            f" {ratio('numpy')} {ratio('torch for-loop')} {ratio('torch foreach')} {ratio('torch fused')}")


HEADER = (f"{'rule':<13}{'dtype':<8}{'size':>12}{'thr':>3} {'us/step':>11} {'GB/s':>7} {'%ceil':>7}"
          f" {'numpy':>8} {'t.loop':>8} {'t.fe':>8} {'t.fused':>8}")
LEGEND = ("ratios: the other implementation's time / fastopt's (>1: fastopt is faster); numpy is\n"
          "written in place with out=; t.loop, t.fe, t.fused: torch.optim for-loop, foreach, fused\n"
          "(– where torch lacks it); GB/s: bytes the rule must move / time; %ceil: that over the\n"
          "streaming kernel's GB/s at the same footprint, timed in the same interleaved rounds\n")


def torch_reads_ready():
    """Where torch is installed, fastopt.torch's tensor reads built before anything is timed (a
    build in the background would share the cores with the cases): prints which are in use."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    from fastopt import native_torch
    native_torch.start(wait=True)
    print(f"fastopt.torch's tensor reads: {native_torch.status()}")


def section_main(module, doc, run, argv=None):
    """The command line of one benchmark section run alone (python -m fastopt.bench_<name>):
    --quick and --threads, handed to the section's run(threads, quick)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=fastopt.get_num_threads())
    args = ap.parse_args(argv)
    torch_reads_ready()
    run(args.threads, args.quick)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastopt bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rules, ~70 s with --no-loop")
    ap.add_argument("--rules", default=None, help="comma-separated subset of " + ",".join(RULES))
    ap.add_argument("--threads", type=int, default=fastopt.get_num_threads())
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--no-loop", action="store_true", help="skip the training-loop cases (alone: "
                    "python -m fastopt.bench_loop)")
    ap.add_argument("--storage-only", action="store_true", help="only the bfloat16 storage table")
    args = ap.parse_args(argv)
    # (argument errors before any timing: an unknown rule stopped a run after minutes of it)
    asked = args.rules.split(",") if args.rules else None
    unknown = [r for r in asked or () if r not in RULES]
    if unknown:
        ap.error(f"unknown rule(s) {','.join(unknown)}: use a subset of {','.join(RULES)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            ap.error(f"--json: cannot write {args.json}: {e}")

    fastopt.set_num_threads(args.threads)
    if args.quick:
        sizes, rules, dtypes, budget = [1000, 100_000, 1_000_000, 16_000_000], ["Adam", "SGD"], [np.float32], 0.25
    else:
        sizes, rules, dtypes, budget = [1000, 10_000, 100_000, 1_000_000, 16_000_000, 64_000_000], list(RULES), [np.float32, np.float64], 1.0
    if asked:
        rules = asked
    results = []
    fastopt.show_config()
    torch_reads_ready()
    if args.storage_only:
        run_storage_table(rules, 16_000_000, args.threads, budget * 2, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    if not args.no_loop:  # the step where users run it leads; the isolated ceilings follow
        from fastopt import bench_loop
        results.append(dict(loop=bench_loop.run(args.threads, args.quick)))
    t = run_overheads(budget)
    print(f"\nPython-side costs, {IN_LOOP_RULE}, one tensor of 1e3 float32 (us per call; ratio to "
          "the step):")
    for k, v in t.items():
        print(f"  {k:<20} {v * 1e6:8.2f} us  {v / t['step']:5.2f}x")
    print(f"  the lock: {(t['step'] - t['step without lock']) * 1e9:.0f} ns per step")
    results.append(dict(label="overheads", times=t))
    try:
        per_tensor = run_torch_overheads(args.threads, budget)
        print("  per tensor: " + ", ".join(f"{k} {v * 1e6:.3f} us" for k, v in per_tensor.items()))
        results.append(dict(label="per-tensor", times=per_tensor))
    except ImportError:
        pass
    print()
    print(LEGEND)
    print(HEADER)

    def report(r, label):
        r["label"] = label
        print(format_row(r), flush=True)
        results.append(r)

    for dtype in dtypes:
        for n in sizes:
            for rule in rules:
                big = n >= 16_000_000
                r = run_case(rule, dtype, [(n,)], args.threads, budget * (2 if big else 1),
                             with_numpy=n <= 16_000_000)
                report(r, size_label(n))
    model_rules = ["Adam"] if args.quick else rules
    models = {k: v for k, v in MODELS.items() if not (args.quick and k == "ResNet-50")}
    for model, shapes in models.items():
        for rule in model_rules:
            report(run_case(rule, np.float32, shapes, args.threads, budget * 2), model)
    for rule, other in PAIRS:
        if rule in rules and other in RULES and not args.quick:
            t = run_pair(rule, other, 16_000_000, args.threads, budget * 2)
            print(f"{rule} against {other}, 1.6e7 float32, side by side: {t[rule] * 1e6:.1f} us, "
                  f"{t[other] * 1e6:.1f} us: {t[other] / t[rule]:.2f}x", flush=True)
            results.append(dict(label=f"{rule} vs {other}", times=t))
    # a competing busy process on one core: threads must degrade, not collapse
    stop = multiprocessing.Event()
    hog = multiprocessing.Process(target=busy_loop, args=(stop,), daemon=True)
    hog.start()
    try:
        for model, shapes in models.items():
            for threads in sorted({1, args.threads}):
                fastopt.set_num_threads(threads)
                r = run_case("Adam", np.float32, shapes, threads, budget * 2, with_numpy=False)
                r["busy"] = True
                report(r, model + "+busy")
    finally:
        stop.set()
        hog.join()
        fastopt.set_num_threads(args.threads)
    run_storage_table(rules, 16_000_000, args.threads, budget * 2, results)
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    if torch is not None:
        print("\nfastopt.torch (the drop-in) against torch.optim, float32, "
              f"{args.threads} threads: time / fastopt.torch's")
        print(f"{'rule':<13}{'case':>22} {'us/step':>11} {'t.loop':>8} {'t.fe':>8} {'t.fused':>8}")
        cases = {"1.6e7": [(16_000_000,)], "ResNet-18": MODELS["ResNet-18"]}
        if not args.quick:
            cases["ResNet-50"] = MODELS["ResNet-50"]
        for rule in (["Adam"] if args.quick else [r for r in rules if RULES[r][3]]):
            for case, shapes in cases.items():  # SGD with momentum 0.9 (RULES)
                t = run_dropin(rule, shapes, args.threads, budget * 2)
                ratio = lambda k: f"{t[k] / t['fastopt.torch']:7.2f}x" if k in t else "      –"  # noqa: E731
                print(f"{rule:<13}{case:>22} {t['fastopt.torch'] * 1e6:>11.1f} {ratio('torch for-loop')} "
                      f"{ratio('torch foreach')} {ratio('torch fused')}", flush=True)
                results.append(dict(rule=rule, label=case, dropin=True, times=t))
    from fastopt import bench_sparse  # embedding tables: the rows a batch touches
    results += bench_sparse.run(args.threads, args.quick, budget)
    # the whole training step: clipping, the reduction pass, GradScaler, schedules (issue 13)
    from fastopt import bench_step
    results.append(dict(training_step=bench_step.run(args.threads, args.quick, budget)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
