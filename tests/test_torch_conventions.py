"""The kernels' FO_TORCH convention against torch.optim itself (skipped without torch).

This is what lets one kernel per rule serve both the textbook API and a torch drop-in:
momentum with dampening, eps outside the root, AdaMax's eps in the max, AMSGrad's max of v,
NAdam's momentum-decay schedule.
"""
import numpy as np
import pytest

from fastopt import _kernels

torch = pytest.importorskip("torch")

TORCH = _kernels.TORCH


def kernel_runner(name, hp, n):
    """A function(param, grad) that applies one torch-convention step with the raw kernels."""
    z = lambda: np.zeros(n)  # noqa: E731
    step = 0
    common = dict(weight_decay=hp.get("weight_decay", 0.0), maximize=hp.get("maximize", False))
    if name == "SGD":
        buf = z()

        def run(p, g):
            _kernels.sgd(p, g, buf, dict(lr=hp["lr"], momentum=hp.get("momentum", 0.0),
                         dampening=hp.get("dampening", 0.0), nesterov=hp.get("nesterov", False),
                         convention=TORCH, step=step, **common))
    elif name == "Adagrad":
        total = np.full(n, hp.get("initial_accumulator_value", 0.0))

        def run(p, g):
            lr = hp["lr"] / (1 + (step - 1) * hp.get("lr_decay", 0.0))
            _kernels.adagrad(p, g, total, dict(lr=lr, eps=hp.get("eps", 1e-10), convention=TORCH,
                             **common))
    elif name == "Adadelta":
        sq, acc = z(), z()

        def run(p, g):
            _kernels.adadelta(p, g, sq, acc, dict(lr=hp.get("lr", 1.0), rho=hp.get("rho", 0.9),
                              eps=hp.get("eps", 1e-6), **common))
    elif name == "RMSprop":
        sq, avg, buf = z(), z(), z()

        def run(p, g):
            _kernels.rmsprop(p, g, sq, avg, buf, dict(lr=hp["lr"], rho=hp.get("alpha", 0.99),
                             eps=hp.get("eps", 1e-8), momentum=hp.get("momentum", 0.0),
                             centered=hp.get("centered", False), convention=TORCH, **common))
    elif name in ("Adam", "AdamW"):
        m, v, vmax = z(), z(), z()
        b1, b2 = hp.get("betas", (0.9, 0.999))

        def run(p, g):
            _kernels.adam(p, g, m, v, vmax, dict(lr=hp["lr"], beta1=b1, beta2=b2,
                          eps=hp.get("eps", 1e-8), amsgrad=hp.get("amsgrad", False),
                          decoupled_weight_decay=name == "AdamW", convention=TORCH, step=step,
                          **{**common, "weight_decay": hp.get("weight_decay",
                                                              0.01 if name == "AdamW" else 0.0)}))
    elif name == "Adamax":
        m, u = z(), z()
        b1, b2 = hp.get("betas", (0.9, 0.999))

        def run(p, g):
            _kernels.adamax(p, g, m, u, dict(lr=hp["lr"], beta1=b1, beta2=b2, eps=hp.get("eps", 1e-8),
                            convention=TORCH, step=step, **common))
    elif name == "NAdam":
        m, v = z(), z()
        b1, b2 = hp.get("betas", (0.9, 0.999))
        psi = hp.get("momentum_decay", 4e-3)
        mu_product = 1.0

        def run(p, g):
            nonlocal mu_product
            mu_product *= b1 * (1 - 0.5 * 0.96 ** (step * psi))
            _kernels.nadam(p, g, m, v, dict(lr=hp["lr"], beta1=b1, beta2=b2, eps=hp.get("eps", 1e-8),
                           momentum_decay=psi, mu_product=mu_product,
                           decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
                           convention=TORCH, step=step, **common))

    def counted(p, g):
        nonlocal step
        step += 1
        run(p, g)
    return counted


TORCH_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5, rho=0.95, weight_decay=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]


@pytest.mark.parametrize("name, hp", TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_torch_convention_matches_torch_optim(name, hp):
    # torch keeps NAdam's mu_product in the default dtype; float64 makes it comparable at 1e-12
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run_against_torch(name, hp)
    finally:
        torch.set_default_dtype(previous)


def run_against_torch(name, hp):
    rng = np.random.default_rng(3)
    n = 37
    p = rng.standard_normal(n)
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = getattr(torch.optim, name)([tp], foreach=False, **hp)
    run = kernel_runner(name, hp, n)
    for _ in range(60):
        g = rng.standard_normal(n)
        tp.grad = torch.tensor(g)
        opt.step()
        run(p, g)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-12)
