"""One function per update rule over a single parameter, its gradient and its state.

    state = fastopt.AdamState.new(param)
    fastopt.functional.adam(param, grad, state, lr=1e-3)   # param and state updated in place

For libraries that keep their own loop.  Each function validates everything (arrays, state,
hyperparameters) before it writes anything, then runs the C kernel with the GIL released.
Formulas (g is the gradient after maximize and L2 weight decay, t = state.step after the
increment) are in each function's docstring and in the README.
"""
import numpy as np

from fastopt import _checks, _kernels
from fastopt.state import (AdadeltaState, AdagradState, AdaMaxState, AdamState, NadamState,
                           RMSpropState, SGDState)

TEXTBOOK = _kernels.TEXTBOOK


class Rule:
    """What an optimizer needs to know about one update rule.

    defaults: the hyperparameters with their defaults.  hyperparameters(): validated values.
    buffers(): the state buffers those values need.  kernel_args(): the C hyperparameter struct
    (csrc/fastopt.h) as a dict.  update(): one tensor's kernel call, without checks.
    """

    name = ""
    kernel = ""  # the C rule: fo_<kernel>_f32 / _f64
    state_type = None
    defaults = {}

    def __init__(self):
        self._cache = {}

    def hyperparameters(self, given):
        """The validated hyperparameters: defaults completed by `given`.  Results are cached by
        value and type (1 and True differ), since loops pass the same values every step."""
        try:
            key = tuple((k, type(v), v) for k, v in given.items())
            cached = self._cache.get(key)
        except TypeError:  # an unhashable value (a list of betas): validate without the cache
            key, cached = None, None
        if cached is not None:
            return dict(cached)
        checked = self._validate(given)
        if key is not None:
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = checked
        return dict(checked)

    def _validate(self, given):
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        hp = {**self.defaults, **given}
        checked = {name: check(name, hp[name]) for name, check in self.checks().items()}
        self.check_combination(checked)
        return checked

    def checks(self):
        return {}

    def check_combination(self, hp):
        pass

    def buffers(self, hp):
        return self.state_type.BUFFERS[:self.state_type.REQUIRED]

    def slots(self, hp):
        """The state's buffers in the kernel's argument order, None where hp leaves one unused."""
        needed = self.buffers(hp)
        return tuple(name if name in needed else None for name in self.state_type.BUFFERS)

    def kernel_args(self, hp, step):
        raise NotImplementedError

    def new_state(self, param, hp):
        return self.state_type.new(param)

    def update(self, param, grad, state, hp):
        """One tensor's step through the typed-memoryview binding; everything already checked."""
        arrays = [param, grad] + [None if name is None else getattr(state, name)
                                  for name in self.slots(hp)]
        # as plain ndarrays: a subclass may keep two dimensions through reshape(-1) (np.matrix)
        flat = [None if a is None else np.asarray(a).reshape(-1) for a in arrays]
        state.step += 1
        getattr(_kernels, self.kernel)(*flat, self.kernel_args(hp, state.step))


def _common(**extra):
    return {"lr": _checks.nonnegative, "weight_decay": _checks.nonnegative,
            "maximize": _checks.flag, **extra}


class _SGD(Rule):
    name = "SGD"
    kernel = "sgd"
    state_type = SGDState
    defaults = dict(lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, maximize=False)

    def checks(self):
        return _common(momentum=_checks.nonnegative, nesterov=_checks.flag)

    def check_combination(self, hp):
        if hp["nesterov"] and hp["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def buffers(self, hp):
        return ("momentum_buffer",) if hp["momentum"] > 0.0 else ()

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], momentum=hp["momentum"], dampening=0.0,
                    weight_decay=hp["weight_decay"], nesterov=hp["nesterov"],
                    maximize=hp["maximize"], convention=TEXTBOOK, step=step)


class _Adagrad(Rule):
    name = "Adagrad"
    kernel = "adagrad"
    state_type = AdagradState
    defaults = dict(lr=0.01, eps=1e-8, weight_decay=0.0, initial_accumulator_value=0.0,
                    maximize=False)

    def checks(self):
        return _common(eps=_checks.nonnegative, initial_accumulator_value=_checks.nonnegative)

    def new_state(self, param, hp):
        return AdagradState.new(param, fill=hp["initial_accumulator_value"])

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                    maximize=hp["maximize"], convention=TEXTBOOK)


class _Adadelta(Rule):
    name = "Adadelta"
    kernel = "adadelta"
    state_type = AdadeltaState
    defaults = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False)

    def checks(self):
        return _common(rho=_checks.unit_interval, eps=_checks.nonnegative)

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], rho=hp["rho"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                    maximize=hp["maximize"])


class _RMSprop(Rule):
    name = "RMSprop"
    kernel = "rmsprop"
    state_type = RMSpropState
    defaults = dict(lr=1e-3, rho=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                    maximize=False)

    def checks(self):
        return _common(rho=_checks.unit_interval, eps=_checks.nonnegative,
                       momentum=_checks.nonnegative, centered=_checks.flag)

    def buffers(self, hp):
        return (("square_avg",) + (("grad_avg",) if hp["centered"] else ())
                + (("momentum_buffer",) if hp["momentum"] > 0.0 else ()))

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], rho=hp["rho"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                    momentum=hp["momentum"], centered=hp["centered"], maximize=hp["maximize"],
                    convention=TEXTBOOK)


class _Adam(Rule):
    name = "Adam"
    kernel = "adam"
    state_type = AdamState
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    maximize=False, decoupled_weight_decay=False)

    def checks(self):
        return _common(betas=lambda name, x: _checks.betas(x), eps=_checks.nonnegative,
                       amsgrad=_checks.flag, decoupled_weight_decay=_checks.flag)

    def buffers(self, hp):
        return ("m", "v", "max_v") if hp["amsgrad"] else ("m", "v")

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                    weight_decay=hp["weight_decay"], amsgrad=hp["amsgrad"],
                    decoupled_weight_decay=hp["decoupled_weight_decay"], maximize=hp["maximize"],
                    convention=TEXTBOOK, step=step)


class _AdamW(_Adam):
    name = "AdamW"
    defaults = dict(_Adam.defaults, weight_decay=0.01, decoupled_weight_decay=True)


class _AdaMax(Rule):
    name = "AdaMax"
    kernel = "adamax"
    state_type = AdaMaxState
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)

    def checks(self):
        return _common(betas=lambda name, x: _checks.betas(x), eps=_checks.nonnegative)

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                    weight_decay=hp["weight_decay"], maximize=hp["maximize"],
                    convention=TEXTBOOK, step=step)


class _Nadam(Rule):
    name = "Nadam"
    kernel = "nadam"
    state_type = NadamState
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)

    def checks(self):
        return _common(betas=lambda name, x: _checks.betas(x), eps=_checks.nonnegative)

    def kernel_args(self, hp, step):
        return dict(lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                    weight_decay=hp["weight_decay"], momentum_decay=0.0, mu_product=0.0,
                    decoupled_weight_decay=False, maximize=hp["maximize"], convention=TEXTBOOK,
                    step=step)


SGD_RULE, ADAGRAD_RULE, ADADELTA_RULE, RMSPROP_RULE = _SGD(), _Adagrad(), _Adadelta(), _RMSprop()
ADAM_RULE, ADAMW_RULE, ADAMAX_RULE, NADAM_RULE = _Adam(), _AdamW(), _AdaMax(), _Nadam()


def check_state(rule, param, state, what):
    if not isinstance(state, rule.state_type):
        raise TypeError(f"{what} must be a {rule.state_type.__name__}, "
                        f"got {type(state).__name__}")
    state.check(param, what)


def step_one(rule, param, grad, state, given):
    """Validate one parameter's update completely, then apply it."""
    hp = rule.hyperparameters(given)
    _checks.check_param(param, "param")
    _checks.check_like(grad, param, "grad", writeable=False)
    check_state(rule, param, state, "state")
    buffers = state.buffers()
    _checks.check_no_overlap([param, *buffers.values()], ["param", *(f"state.{k}" for k in buffers)],
                             [grad], ["grad"])
    state.add_missing(param, rule.buffers(hp))
    rule.update(param, grad, state, hp)


def sgd(param, grad, state, *, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0,
        maximize=False):
    """SGD, Momentum and NAG on one parameter (state: SGDState).

    SGD:       theta <- theta - lr g
    Momentum:  v <- momentum v + lr g;  theta <- theta - v
    NAG:       v <- momentum v + lr g;  theta <- theta - (momentum v + lr g)
    """
    step_one(SGD_RULE, param, grad, state, dict(
        lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize))


def adagrad(param, grad, state, *, lr=0.01, eps=1e-8, weight_decay=0.0,
            initial_accumulator_value=0.0, maximize=False):
    """Adagrad on one parameter (state: AdagradState).

    G <- G + g^2;  theta <- theta - lr g / sqrt(G + eps)
    initial_accumulator_value only matters where the state is created (Adagrad optimizer).
    """
    step_one(ADAGRAD_RULE, param, grad, state, dict(
        lr=lr, eps=eps, weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value, maximize=maximize))


def adadelta(param, grad, state, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
    """Adadelta on one parameter (state: AdadeltaState).

    E[g^2] <- rho E[g^2] + (1 - rho) g^2
    delta <- sqrt(E[delta^2] + eps) / sqrt(E[g^2] + eps) * g
    E[delta^2] <- rho E[delta^2] + (1 - rho) delta^2;  theta <- theta - lr delta
    """
    step_one(ADADELTA_RULE, param, grad, state, dict(
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize))


def rmsprop(param, grad, state, *, lr=1e-3, rho=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False, maximize=False):
    """RMSprop on one parameter (state: RMSpropState).

    E[g^2] <- rho E[g^2] + (1 - rho) g^2;  theta <- theta - lr g / sqrt(E[g^2] + eps)
    centered: E[g] <- rho E[g] + (1 - rho) g and E[g^2] - E[g]^2 replaces E[g^2] under the root.
    momentum > 0: b <- momentum b + g / sqrt(...);  theta <- theta - lr b.
    """
    step_one(RMSPROP_RULE, param, grad, state, dict(
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, momentum=momentum,
        centered=centered, maximize=maximize))


def adam(param, grad, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
         amsgrad=False, maximize=False, decoupled_weight_decay=False):
    """Adam, AMSGrad and (decoupled_weight_decay=True) AdamW on one parameter (state: AdamState).

    AdamW first: theta <- theta (1 - lr weight_decay), and no L2 term in g.
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    theta <- theta - lr m_hat / (sqrt(v_hat) + eps)
    amsgrad: max_v <- max(max_v, v_hat) replaces v_hat.
    """
    step_one(ADAM_RULE, param, grad, state, dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))


def adamw(param, grad, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
          amsgrad=False, maximize=False):
    """AdamW: adam() with decoupled weight decay, theta <- theta (1 - lr weight_decay) first."""
    step_one(ADAMW_RULE, param, grad, state, dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        maximize=maximize))


def adamax(param, grad, state, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
           maximize=False):
    """AdaMax on one parameter (state: AdaMaxState).

    m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g|);  theta <- theta - (lr / (1 - b1^t)) m / (u + eps)
    """
    step_one(ADAMAX_RULE, param, grad, state, dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))


def nadam(param, grad, state, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          maximize=False):
    """Nadam on one parameter (state: NadamState).

    m, v, m_hat, v_hat as in Adam;
    theta <- theta - lr / (sqrt(v_hat) + eps) * (b1 m_hat + (1 - b1) g / (1 - b1^t))
    """
    step_one(NADAM_RULE, param, grad, state, dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))
