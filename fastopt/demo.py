"""`python -m fastopt demo`: watch every rule at work, from fastopt's own kernels.

On four 2-D functions (a saddle, Beale's, Rosenbrock's and a badly conditioned quadratic) every
rule starts from the same point; for each function it writes the paths over the contour plot
(PNG and an animated GIF) and the loss per step (PNG).  Then it trains a small MLP on the
handwritten digits that ship with scikit-learn, once per rule, and writes the training-loss
and test-accuracy curves.  It ends with a table: per rule, the final loss on each function and
the steps it took to get within a threshold of the minimum.

Needs matplotlib and scikit-learn: pip install "fastopt[demo]".
"""
import argparse
import math
import os
import sys
import time

import numpy as np

import fastopt

# ---- the functions, with their gradients ----------------------------------------------------


class Problem:
    def __init__(self, name, f, grad, start, minimum, box, threshold, levels):
        self.name, self.f, self.grad = name, f, grad
        self.start, self.minimum, self.box = np.array(start, float), minimum, box
        self.threshold, self.levels = threshold, levels


def _beale(p):
    x, y = p
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2)


def _beale_grad(p):
    x, y = p
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y ** 2, 2.625 - x + x * y ** 3
    return np.array([2 * a * (y - 1) + 2 * b * (y ** 2 - 1) + 2 * c * (y ** 3 - 1),
                     2 * a * x + 2 * b * 2 * x * y + 2 * c * 3 * x * y ** 2])


PROBLEMS = {
    # f = x^2 - y^2: minimizing slides off the saddle along y; started just off the ridge
    "saddle": Problem("saddle", lambda p: p[0] ** 2 - p[1] ** 2,
                      lambda p: np.array([2 * p[0], -2 * p[1]]),
                      start=(1.0, 1e-3), minimum=None, box=(-1.5, 1.5, -1.5, 1.5),
                      threshold=-1.0, levels=np.linspace(-2.25, 2.25, 19)),
    "beale": Problem("beale", _beale, _beale_grad, start=(1.0, 1.4), minimum=(3.0, 0.5),
                     box=(-0.5, 4.0, -1.5, 2.0), threshold=1e-3,
                     levels=np.logspace(-2, 3.5, 25)),
    "rosenbrock": Problem("rosenbrock", lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
                          lambda p: np.array([-2 * (1 - p[0]) - 400 * p[0] * (p[1] - p[0] ** 2),
                                              200 * (p[1] - p[0] ** 2)]),
                          start=(-1.5, 2.0), minimum=(1.0, 1.0), box=(-2.0, 2.0, -1.0, 3.0),
                          threshold=1e-3, levels=np.logspace(-1, 3.5, 25)),
    # f = (x^2 + 25 y^2) / 2: curvature 25x larger across the valley than along it
    "quadratic": Problem("quadratic", lambda p: 0.5 * (p[0] ** 2 + 25 * p[1] ** 2),
                         lambda p: np.array([p[0], 25 * p[1]]),
                         start=(-4.0, 1.0), minimum=(0.0, 0.0), box=(-4.5, 1.5, -1.5, 1.5),
                         threshold=1e-3, levels=np.logspace(-2, 1.5, 15)),
}

# ---- every rule, with hyperparameters chosen to show its character ---------------------------
# (name, class, hyperparameters for the 2-D functions, hyperparameters for the MLP)
RULES = [
    ("SGD", fastopt.SGD, dict(lr=0.01), dict(lr=0.1)),
    ("Momentum", fastopt.SGD, dict(lr=0.01, momentum=0.9), dict(lr=0.05, momentum=0.9)),
    ("NAG", fastopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True),
     dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", fastopt.Adagrad, dict(lr=0.5), dict(lr=0.05)),
    ("Adadelta", fastopt.Adadelta, dict(lr=1.0, rho=0.95, eps=1e-6), dict(lr=1.0)),
    ("RMSprop", fastopt.RMSprop, dict(lr=0.01), dict(lr=1e-3)),
    ("Adam", fastopt.Adam, dict(lr=0.05), dict(lr=2e-3)),
    ("AdamW", fastopt.AdamW, dict(lr=0.05, weight_decay=1e-3), dict(lr=2e-3, weight_decay=1e-2)),
    ("AdaMax", fastopt.AdaMax, dict(lr=0.1), dict(lr=4e-3)),
    ("Nadam", fastopt.Nadam, dict(lr=0.05), dict(lr=2e-3)),
    ("RAdam", fastopt.RAdam, dict(lr=0.01, betas=(0.9, 0.99)), dict(lr=5e-3)),
    ("Rprop", fastopt.Rprop, dict(lr=0.01), dict(lr=1e-3)),
    ("ASGD", fastopt.ASGD, dict(lr=0.01, t0=100), dict(lr=0.1, t0=100)),
    ("Lion", fastopt.Lion, dict(lr=0.01), dict(lr=1e-3)),
    ("LAMB", fastopt.LAMB, dict(lr=0.005), dict(lr=5e-3)),
    ("LARS", fastopt.LARS, dict(lr=0.5, trust_coefficient=0.02), dict(lr=0.2, trust_coefficient=0.02)),
    ("Adafactor", fastopt.Adafactor, dict(lr=0.05), dict(lr=1e-2)),
]
RULE_NAMES = [r[0] for r in RULES]
# the problems where a plain gradient step of 0.01 is too large or too small
# (SGD, Momentum, NAG, ASGD: lr times this; 5 on the quadratic puts lr x curvature at 1.25, where
# plain SGD zig-zags across the valley and NAG still damps what Momentum overshoots)
PROBLEM_SCALE = {"saddle": 1.0, "beale": 0.5, "rosenbrock": 0.1, "quadratic": 5.0}


def descend(problem, cls, hp, steps):
    """The path of `cls` on `problem`: (steps + 1, 2) points and the loss at each."""
    hp = dict(hp)
    if cls in (fastopt.SGD, fastopt.ASGD):  # plain gradient steps (ASGD: with its average)
        hp["lr"] = hp["lr"] * PROBLEM_SCALE[problem.name]
    p = problem.start.copy()
    opt = cls([p], **hp)
    path, losses = [p.copy()], [problem.f(p)]
    for _ in range(steps):
        g = problem.grad(p)
        if not np.isfinite(g).all() or np.abs(p).max() > 1e3:
            break
        opt.step([g])
        path.append(p.copy())
        losses.append(problem.f(p))
    return np.array(path), np.array(losses)


def steps_to(problem, losses):
    """First step whose loss is within the threshold of the minimum (None: never)."""
    target = problem.threshold if problem.minimum is None else problem.f(np.array(problem.minimum)) + problem.threshold
    hit = np.nonzero(losses <= target)[0]
    return int(hit[0]) if hit.size else None


# ---- the MLP on scikit-learn's digits --------------------------------------------------------

def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    return train_test_split(X, digits.target, test_size=0.25, random_state=0)


def train_mlp(cls, hp, data, steps, batch=64, hidden=32, seed=0):
    """A 64-32-10 tanh MLP with softmax cross-entropy; returns per-step train loss and, every
    so often, (step, test accuracy)."""
    X_train, X_test, y_train, y_test = data
    rng = np.random.default_rng(seed)
    W1 = fastopt.init.xavier_uniform(np.empty((64, hidden), np.float32), rng, "tanh")
    b1 = np.zeros(hidden, np.float32)
    W2 = fastopt.init.xavier_uniform(np.empty((hidden, 10), np.float32), rng)
    b2 = np.zeros(10, np.float32)
    params = [W1, b1, W2, b2]
    opt = cls(params, **hp)
    losses, accuracy = [], []
    order = np.random.default_rng(seed + 1)

    def forward(X):
        h = np.tanh(X @ W1 + b1)
        z = h @ W2 + b2
        z -= z.max(axis=1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(axis=1, keepdims=True)
        return h, prob

    for step in range(steps):
        idx = order.integers(0, len(X_train), batch)
        X, y = X_train[idx], y_train[idx]
        h, prob = forward(X)
        losses.append(float(-np.log(prob[np.arange(batch), y] + 1e-12).mean()))
        dz = prob
        dz[np.arange(batch), y] -= 1
        dz /= batch
        dh = (dz @ W2.T) * (1 - h * h)
        opt.step([X.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)])
        if step % 25 == 0 or step == steps - 1:
            accuracy.append((step, float((forward(X_test)[1].argmax(1) == y_test).mean())))
    return np.array(losses), accuracy


# ---- pictures --------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a",
          "#ff9896", "#c5b0d5", "#c49c94"]  # one per rule (zip stops at the shorter list)


def contour(ax, problem):
    x0, x1, y0, y1 = problem.box
    X, Y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    Z = problem.f(np.array([X, Y]))
    if problem.minimum is None:
        ax.contour(X, Y, Z, levels=problem.levels, cmap="gray", linewidths=0.6)
    else:
        from matplotlib.colors import LogNorm
        ax.contour(X, Y, Z, levels=problem.levels, norm=LogNorm(), cmap="gray", linewidths=0.6)
        ax.plot(*problem.minimum, "k*", markersize=12)
    ax.plot(*problem.start, "ko", markersize=5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(problem.name)


def draw_problem(problem, paths, out, frames=40):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, ax = plt.subplots(figsize=(7, 6))
    contour(ax, problem)
    for (name, (path, _)), color in zip(paths.items(), COLORS):
        ax.plot(path[:, 0], path[:, 1], "-", color=color, lw=1.5, label=name)
    ax.legend(loc="upper right", fontsize=8)
    files = [os.path.join(out, f"{problem.name}_paths.png")]
    fig.savefig(files[-1], dpi=90)

    # the animation: the same picture, the paths growing
    ax.clear()
    contour(ax, problem)
    longest = max(len(p) for p, _ in paths.values())
    lines = [ax.plot([], [], "-", color=c, lw=1.5, label=n)[0] for n, c in zip(paths, COLORS)]
    dots = [ax.plot([], [], "o", color=c, markersize=4)[0] for c in COLORS[:len(paths)]]
    ax.legend(loc="upper right", fontsize=8)

    def frame(k):
        upto = max(1, int(round(longest * (k + 1) / frames)))
        for (path, _), line, dot in zip(paths.values(), lines, dots):
            seg = path[:upto]
            line.set_data(seg[:, 0], seg[:, 1])
            dot.set_data(seg[-1:, 0], seg[-1:, 1])
        return lines + dots

    files.append(os.path.join(out, f"{problem.name}_paths.gif"))
    FuncAnimation(fig, frame, frames=frames, blit=True).save(files[-1], writer=PillowWriter(fps=10),
                                                             dpi=60)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, (_, losses)), color in zip(paths.items(), COLORS):
        shift = 0.0 if problem.minimum is None else problem.f(np.array(problem.minimum))
        y = losses - shift if problem.minimum is not None else losses
        ax.plot(y, color=color, label=name)
    if problem.minimum is not None:
        ax.set_yscale("log")
        ax.set_ylabel("f - f(minimum)")
    else:
        ax.set_ylabel("f")
        ax.set_ylim(-2.5, 1.5)
    ax.set_xlabel("step")
    ax.set_title(f"{problem.name}: loss per step")
    ax.legend(fontsize=8, ncol=2)
    files.append(os.path.join(out, f"{problem.name}_loss.png"))
    fig.savefig(files[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
    return files


def draw_mlp(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, (losses, _)), color in zip(results.items(), COLORS):
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
        ax.plot(smooth, color=color, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("MLP on scikit-learn's digits")
    ax.legend(fontsize=8, ncol=2)
    files.append(os.path.join(out, "digits_loss.png"))
    fig.savefig(files[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, (_, acc)), color in zip(results.items(), COLORS):
        steps, values = zip(*acc)
        ax.plot(steps, values, color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("MLP on scikit-learn's digits")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    files.append(os.path.join(out, "digits_accuracy.png"))
    fig.savefig(files[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
    return files


# ---- the command -----------------------------------------------------------------------------

def missing_packages():
    missing = []
    for module, package in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastopt demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="fastopt-demo", help="folder for the pictures (created)")
    ap.add_argument("--steps", type=int, default=1500, help="steps on each 2-D function")
    ap.add_argument("--mlp-steps", type=int, default=600, help="steps of MLP training per rule")
    ap.add_argument("--frames", type=int, default=40, help="frames of each animated path")
    args = ap.parse_args(argv)
    for name in ("steps", "mlp_steps", "frames"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    missing = missing_packages()
    if missing:
        print(f"the demo needs {' and '.join(missing)}: pip install \"fastopt[demo]\" "
              f"(or pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    files, table = [], {name: {} for name in RULE_NAMES}
    for problem in PROBLEMS.values():
        print(f"[{time.perf_counter() - started:5.1f}s] {problem.name}: {len(RULES)} rules, "
              f"{args.steps} steps ...", flush=True)
        paths = {name: descend(problem, cls, hp, args.steps) for name, cls, hp, _ in RULES}
        for name, (_, losses) in paths.items():
            table[name][problem.name] = (losses[-1], steps_to(problem, losses))
        files += draw_problem(problem, paths, args.out, args.frames)
    print(f"[{time.perf_counter() - started:5.1f}s] digits MLP: {len(RULES)} rules, "
          f"{args.mlp_steps} steps ...", flush=True)
    data = digits_data()
    results = {name: train_mlp(cls, hp, data, args.mlp_steps) for name, cls, _, hp in RULES}
    for name, (losses, acc) in results.items():
        table[name]["digits"] = (float(np.mean(losses[-20:])), acc[-1][1])
    files += draw_mlp(results, args.out)

    print(f"\nwrote {len(files)} files to {os.path.abspath(args.out)}:")
    for f in files:
        print("  " + os.path.basename(f))
    head = "".join(f"{p:>22}" for p in PROBLEMS) + f"{'digits MLP':>22}"
    print(f"\n{'rule':<10}{head}")
    print(f"{'':<10}" + "".join(f"{'final f':>12}{'steps':>10}" for _ in PROBLEMS)
          + f"{'loss':>12}{'accuracy':>10}")
    for name in RULE_NAMES:
        row = ""
        for p in PROBLEMS:
            final, steps = table[name][p]
            row += f"{final:>12.3g}{('-' if steps is None else steps):>10}"
        loss, acc = table[name]["digits"]
        print(f"{name:<10}{row}{loss:>12.3g}{acc:>10.3f}")
    print("\nsteps: first step within 1e-3 of the minimum (saddle: first step with f <= -1); "
          "- means not within the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
