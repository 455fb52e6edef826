"""Fit a linear model y = X w + b by least squares with fastopt.Adam, in float32.

Run: python examples/quickstart.py
"""
import numpy as np

import fastopt

rng = np.random.default_rng(0)
X = rng.standard_normal((512, 8)).astype(np.float32)
true_w = rng.standard_normal(8).astype(np.float32)
y = X @ true_w + 0.5

w = np.zeros(8, np.float32)
b = np.zeros(1, np.float32)
opt = fastopt.Adam([w, b], lr=0.05)

for step in range(1, 301):
    err = X @ w + b - y                      # residuals
    grad_w = (2 / len(y)) * X.T @ err        # d(mean squared error)/dw
    grad_b = np.array([2 * err.mean()], np.float32)
    opt.step([grad_w, grad_b])               # w and b are updated in place
    if step % 50 == 0:
        print(f"step {step:3d}  loss {np.mean(err ** 2):.6f}")

print("max |w - true_w| =", float(np.abs(w - true_w).max()), " b =", float(b[0]))
