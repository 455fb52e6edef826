"""Why stochastic rounding: the digits MLP (fastopt.demo) trained with Adam at lr 1e-4 with its
parameters, gradients and state stored in bfloat16, against float32.

An Adam step moves a weight by about lr = 1e-4, under half a bfloat16 ulp of most weights
(2^-9 ~ 0.002 at 0.25): rounded to nearest, most updates are lost and training stalls;
stochastic rounding keeps them on average, and float32 master weights keep them exactly.

    python examples/bf16_digits.py [--steps 4000] [--out docs/images/bf16_digits.png]
"""
import argparse

import ml_dtypes
import numpy as np

import fastopt
from fastopt.demo import digits_data

BF16 = np.dtype(ml_dtypes.bfloat16)
RUNS = {
    "float32": dict(dtype=np.float32, options={}),
    "bfloat16, round to nearest": dict(dtype=BF16, options=dict(state_dtype="bfloat16",
                                                                rounding="nearest")),
    "bfloat16, stochastic rounding": dict(dtype=BF16, options=dict(state_dtype="bfloat16")),
    "bfloat16, float32 master weights": dict(dtype=BF16, options=dict(master_weights=True)),
}


def train(dtype, options, data, steps, lr=1e-4, batch=64, hidden=32, seed=0):
    """The 64-32-10 tanh MLP of fastopt.demo, its forward and backward in float32 from the
    stored parameters; returns the training loss of every step."""
    X_train, _, y_train, _ = data
    rng = np.random.default_rng(seed)
    shapes = [(64, hidden), (hidden,), (hidden, 10), (10,)]
    init = [fastopt.init.xavier_uniform(np.empty(shapes[0], np.float32), rng, "tanh"),
            np.zeros(hidden, np.float32),
            fastopt.init.xavier_uniform(np.empty(shapes[2], np.float32), rng),
            np.zeros(10, np.float32)]
    params = [p.astype(dtype) for p in init]
    opt = fastopt.Adam(params, lr=lr, **options)
    order = np.random.default_rng(seed + 1)
    losses = []
    for _ in range(steps):
        W1, b1, W2, b2 = (p.astype(np.float32) for p in params)
        idx = order.integers(0, len(X_train), batch)
        X, y = X_train[idx], y_train[idx]
        h = np.tanh(X @ W1 + b1)
        z = h @ W2 + b2
        z -= z.max(axis=1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(axis=1, keepdims=True)
        losses.append(float(-np.log(prob[np.arange(batch), y] + 1e-12).mean()))
        dz = prob
        dz[np.arange(batch), y] -= 1
        dz /= batch
        dh = (dz @ W2.T) * (1 - h * h)
        grads = [X.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]
        opt.step([g.astype(dtype) for g in grads])
    return np.array(losses)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--out", default=None, help="write the plot here (needs matplotlib)")
    args = ap.parse_args(argv)
    data = digits_data()
    curves = {}
    for name, run in RUNS.items():
        curves[name] = train(run["dtype"], run["options"], data, args.steps)
        print(f"{name:<34} loss, mean of the last 200 steps: {curves[name][-200:].mean():.4f}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        window = 50
        styles = [dict(lw=3, alpha=0.5), dict(lw=1.5), dict(lw=1.5, ls="--"), dict(lw=1.5, ls=":")]
        for (name, losses), style in zip(curves.items(), styles):
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, label=name, **style)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({window}-step mean)")
        ax.set_title("digits MLP, Adam lr 1e-4: parameters, gradients, state in bfloat16")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
