"""Plain float64 numpy versions of every update rule, written from the README's formula table.

Nothing here is shared with fastopt.  Each function takes the parameter and gradient (float64
arrays), a dict of state arrays (created on first use) and the hyperparameters, and returns the
new parameter.  g is the gradient after maximize (g <- -g) and L2 weight decay (g <- g + wd theta).
"""
import numpy as np


def _grad(theta, grad, weight_decay, maximize):
    g = -grad if maximize else grad
    return g + weight_decay * theta


def sgd(theta, grad, s, lr, momentum=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    g = _grad(theta, grad, weight_decay, maximize)
    if momentum == 0.0:
        return theta - lr * g
    v = s.get("v", np.zeros_like(theta))
    v = momentum * v + lr * g
    s["v"] = v
    if nesterov:
        return theta - (momentum * v + lr * g)
    return theta - v


def adagrad(theta, grad, s, lr, eps=1e-8, weight_decay=0.0, initial_accumulator_value=0.0,
            maximize=False):
    g = _grad(theta, grad, weight_decay, maximize)
    G = s.get("G", np.full_like(theta, initial_accumulator_value)) + g * g
    s["G"] = G
    return theta - lr * g / np.sqrt(G + eps)


def adadelta(theta, grad, s, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
    g = _grad(theta, grad, weight_decay, maximize)
    Eg2 = rho * s.get("Eg2", np.zeros_like(theta)) + (1 - rho) * g * g
    Ed2 = s.get("Ed2", np.zeros_like(theta))
    delta = np.sqrt(Ed2 + eps) / np.sqrt(Eg2 + eps) * g
    s["Eg2"] = Eg2
    s["Ed2"] = rho * Ed2 + (1 - rho) * delta * delta
    return theta - lr * delta


def rmsprop(theta, grad, s, lr, rho=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False, maximize=False):
    g = _grad(theta, grad, weight_decay, maximize)
    Eg2 = rho * s.get("Eg2", np.zeros_like(theta)) + (1 - rho) * g * g
    s["Eg2"] = Eg2
    mean_square = Eg2
    if centered:
        Eg = rho * s.get("Eg", np.zeros_like(theta)) + (1 - rho) * g
        s["Eg"] = Eg
        mean_square = Eg2 - Eg * Eg
    step = g / np.sqrt(mean_square + eps)
    if momentum > 0.0:
        step = momentum * s.get("b", np.zeros_like(theta)) + step
        s["b"] = step
    return theta - lr * step


def _adam_moments(theta, grad, s, lr, betas, weight_decay, maximize, decoupled):
    """Adam's first steps, shared by Adam and RAdam: the decay (decoupled: θ ← θ(1 − ηλ); else
    L2 in g), then t, m and v updated in s.  Returns (θ, t, m, v)."""
    b1, b2 = betas
    if decoupled:
        theta = theta * (1 - lr * weight_decay)
        g = _grad(theta, grad, 0.0, maximize)
    else:
        g = _grad(theta, grad, weight_decay, maximize)
    t = s.get("t", 0) + 1
    m = b1 * s.get("m", np.zeros_like(theta)) + (1 - b1) * g
    v = b2 * s.get("v", np.zeros_like(theta)) + (1 - b2) * g * g
    s.update(t=t, m=m, v=v)
    return theta, t, m, v


def adam(theta, grad, s, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled=False):
    b1, b2 = betas
    theta, t, m, v = _adam_moments(theta, grad, s, lr, betas, weight_decay, maximize, decoupled)
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    if amsgrad:
        v_hat = np.maximum(s.get("v_hat_max", np.zeros_like(theta)), v_hat)
        s["v_hat_max"] = v_hat
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps)


def adamw(theta, grad, s, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
          maximize=False):
    return adam(theta, grad, s, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True)


def adamax(theta, grad, s, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False):
    b1, b2 = betas
    g = _grad(theta, grad, weight_decay, maximize)
    t = s.get("t", 0) + 1
    m = b1 * s.get("m", np.zeros_like(theta)) + (1 - b1) * g
    u = np.maximum(b2 * s.get("u", np.zeros_like(theta)), np.abs(g))
    s.update(t=t, m=m, u=u)
    return theta - (lr / (1 - b1 ** t)) * m / (u + eps)


def nadam(theta, grad, s, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False):
    b1, b2 = betas
    g = _grad(theta, grad, weight_decay, maximize)
    t = s.get("t", 0) + 1
    m = b1 * s.get("m", np.zeros_like(theta)) + (1 - b1) * g
    v = b2 * s.get("v", np.zeros_like(theta)) + (1 - b2) * g * g
    s.update(t=t, m=m, v=v)
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return theta - lr / (np.sqrt(v_hat) + eps) * (b1 * m_hat + (1 - b1) * g / (1 - b1 ** t))


def lion(theta, grad, s, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    b1, b2 = betas
    g = -grad if maximize else grad
    m = s.get("m", np.zeros_like(theta))
    c = b1 * m + (1 - b1) * g
    # where c cancels to within float32 rounding of its terms, its sign in float32 is a coin
    # toss: comparable() leaves those elements out of float32 comparisons
    s["sign_by_rounding"] = s.get("sign_by_rounding", np.zeros(theta.shape, bool)) | \
        (np.abs(c) <= 1e-5 * (np.abs(b1 * m) + np.abs((1 - b1) * g)))
    s["m"] = b2 * m + (1 - b2) * g
    return theta - lr * (np.sign(c) + weight_decay * theta)


def radam(theta, grad, s, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          maximize=False, decoupled=False):
    b1, b2 = betas
    theta, t, m, v = _adam_moments(theta, grad, s, lr, betas, weight_decay, maximize, decoupled)
    m_hat = m / (1 - b1 ** t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    if rho_t <= 5:
        return theta - lr * m_hat
    r = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return theta - lr * r * m_hat * np.sqrt(1 - b2 ** t) / (np.sqrt(v) + eps)


def rprop(theta, grad, s, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False):
    g = -grad if maximize else grad
    prev = s.get("prev", np.zeros_like(theta))
    size = s.get("step_size", np.full_like(theta, lr))
    sign = np.sign(g * prev)
    factor = np.where(sign > 0, etas[1], np.where(sign < 0, etas[0], 1.0))
    size = np.clip(size * factor, step_sizes[0], step_sizes[1])
    g = np.where(sign < 0, 0.0, g)
    s.update(prev=g, step_size=size)
    return theta - np.sign(g) * size


def asgd(theta, grad, s, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
         maximize=False):
    g = _grad(theta, grad, weight_decay, maximize)
    t = s.get("t", 0) + 1
    eta = lr / (1 + lambd * lr * (t - 1)) ** alpha
    mu = 1.0 if t == 1 else 1 / max(1, t - 1 - t0)
    theta = theta * (1 - lambd * eta) - eta * g
    ax = s.get("ax", np.zeros_like(theta))
    s["ax"] = theta.copy() if mu == 1 else ax + mu * (theta - ax)
    s["t"] = t
    return theta


def lamb(theta, grad, s, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
         maximize=False):
    b1, b2 = betas
    g = -grad if maximize else grad
    t = s.get("t", 0) + 1
    m = b1 * s.get("m", np.zeros_like(theta)) + (1 - b1) * g
    v = b2 * s.get("v", np.zeros_like(theta)) + (1 - b2) * g * g
    s.update(t=t, m=m, v=v)
    r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + weight_decay * theta
    theta_norm, r_norm = np.sqrt(np.sum(theta * theta)), np.sqrt(np.sum(r * r))
    ratio = theta_norm / r_norm if theta_norm > 0 and r_norm > 0 else 1.0
    return theta - lr * ratio * r


def lars(theta, grad, s, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
         maximize=False):
    g = -grad if maximize else grad
    theta_norm, g_norm = np.sqrt(np.sum(theta * theta)), np.sqrt(np.sum(g * g))
    denominator = g_norm + weight_decay * theta_norm
    local = trust_coefficient * theta_norm / denominator \
        if theta_norm > 0 and denominator > 0 else 1.0
    v = momentum * s.get("v", np.zeros_like(theta)) + lr * local * (g + weight_decay * theta)
    s["v"] = v
    return theta - v


def rowwise_adagrad(theta, grad, s, lr=0.01, eps=1e-8, weight_decay=0.0, maximize=False):
    """One accumulator per row along axis 0 (a 1-D theta's rows are its elements, a 0-d
    theta is one row): G_r += mean of g^2 over the row; theta_r -= lr g_r / (sqrt(G_r) + eps)."""
    g = _grad(theta, grad, weight_decay, maximize)
    n_rows = theta.shape[0] if theta.ndim else 1
    rows = g.reshape(n_rows, g.size // n_rows if n_rows else 0)  # (-1 is ambiguous when empty)
    G = s.get("G", np.zeros(rows.shape[0])) + (rows * rows).sum(axis=1) / max(rows.shape[1], 1)
    s["G"] = G
    return (theta.reshape(rows.shape) - lr * rows / (np.sqrt(G)[:, None] + eps)).reshape(theta.shape)


def _lerp(a, b, w):
    return a + w * (b - a)


def adafactor(theta, grad, s, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
              weight_decay=0.0, maximize=False, dtype=np.float32):
    """torch.optim.Adafactor's formulas, written from its documentation, in float64.  `dtype`
    is the parameter's type, whose machine epsilon eps1 = None stands for (the generic suites
    leave it float32: with their O(1) gradients no clamp at eps1 is reached in either type)."""
    eps1 = np.finfo(dtype).eps if eps[0] is None else eps[0]
    g = -grad if maximize else grad
    t = s.get("t", 0) + 1
    w = t ** beta2_decay
    rho = min(lr, 1 / np.sqrt(t))
    n = theta.size
    if n == 0:  # nothing to update (and no norm to divide by its size)
        s["t"] = t
        return theta.copy()
    alpha = max(eps[1], np.sqrt(np.sum(theta * theta)) / np.sqrt(n)) * rho
    if theta.ndim >= 2:
        R = _lerp(s.get("row_var", np.zeros(theta.shape[:-1] + (1,))),
                  np.mean(g * g, axis=-1, keepdims=True), w)
        C = _lerp(s.get("col_var", np.zeros(theta.shape[:-2] + (1,) + theta.shape[-1:])),
                  np.mean(g * g, axis=-2, keepdims=True), w)
        s.update(row_var=R, col_var=C)
        v = R * C / np.maximum(np.mean(R, axis=-2, keepdims=True), eps1)
    else:
        v = _lerp(s.get("variance", np.zeros(theta.shape)), g * g, w)
        s["variance"] = v
    s["t"] = t
    u = g / np.sqrt(np.maximum(v, eps1 * eps1))
    denom = max(1.0, np.sqrt(np.sum(u * u)) / (np.sqrt(n) * d))
    s["clipped"] = s.get("clipped", 0) + (denom > 1.0)  # steps where RMS(u) / d exceeded 1
    return theta * (1 - lr * weight_decay) - alpha / denom * u


def comparable(state, shape):
    """The elements whose float32 result a float64 reference predicts: all, except where a
    sign was decided by rounding (Lion)."""
    return ~state.get("sign_by_rounding", np.zeros(shape, bool))


# optimizer class name -> reference function
RULES = {
    "SGD": sgd, "Adagrad": adagrad, "Adadelta": adadelta, "RMSprop": rmsprop, "Adam": adam,
    "AdamW": adamw, "AdaMax": adamax, "Nadam": nadam, "Lion": lion, "RAdam": radam,
    "Rprop": rprop, "ASGD": asgd, "LAMB": lamb, "LARS": lars, "RowwiseAdagrad": rowwise_adagrad,
    "Adafactor": adafactor,
}
