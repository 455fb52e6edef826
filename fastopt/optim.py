"""The optimizer classes: validate, own the per-parameter states, run the rule's kernels.

    opt = fastopt.Adam([w, b], lr=1e-3)
    opt.step([dw, db])            # w and b updated in place

A step validates every input (grads, states, hyperparameters, memory overlap) before it
updates any parameter.
"""
import threading

import numpy as np

from fastopt import _checks, _kernels, checkpoint
from fastopt import functional as F
from fastopt._kernels import ParamGroup


class Optimizer:
    """Base class.  params: a list of arrays, or of dicts {"params": [...], <hyperparameter>: ...}
    (param groups, each overriding the optimizer's defaults).

    Attributes: param_groups (list of dicts; change hyperparameters there between steps),
    state (dict: global parameter index -> state object, created on a parameter's first step).
    """

    rule = None

    def __init__(self, params, **defaults):
        self.defaults = self.rule.hyperparameters(defaults)
        groups = self._groups(params)
        for i, g in enumerate(groups):
            self._group_hyperparameters(g, f"param group {i}")
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        for i, p in enumerate(params):
            _checks.check_param(p, f"params[{i}]")
        seen = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"params[{i}] is the same array as params[{seen[id(p)]}]")
            seen[id(p)] = i
        _checks.check_no_overlap(params, [f"params[{i}]" for i in range(len(params))])
        self.param_groups = [ParamGroup({**self.defaults, **g}) for g in groups]
        self.state = {}
        self._plan = None
        self._lock = threading.Lock()  # serializes step and the checkpoint functions

    def _groups(self, params):
        if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
            raise TypeError("params must be a list of arrays or of param-group dicts, "
                            f"got {type(params).__name__}")
        if params and all(isinstance(g, dict) for g in params):
            groups = []
            for i, g in enumerate(params):
                if "params" not in g:
                    raise ValueError(f"param group {i} has no 'params' key")
                group_params = g["params"]
                if isinstance(group_params, np.ndarray):
                    group_params = [group_params]
                groups.append({**g, "params": list(group_params)})
            return groups
        if any(isinstance(g, dict) for g in params):
            raise TypeError("params mixes arrays and param-group dicts")
        return [{"params": list(params)}]

    @property
    def params(self):
        """Every parameter, in order: the indices of `state` and of step's grads."""
        return [p for g in self.param_groups for p in g["params"]]

    def _group_hyperparameters(self, group, where):
        """The group's hyperparameters, validated (the error names the group)."""
        try:
            return self.rule.hyperparameters({k: v for k, v in group.items() if k != "params"})
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None

    def step(self, grads):
        """Update every parameter in place from `grads` (one array per parameter, same shape and
        dtype, C-contiguous).  Nothing is changed if any input is invalid."""
        with self._lock:
            plan = self._plan
            if plan is not None:
                if plan.run(self.param_groups, self.state, grads):
                    return
                if plan.refresh(self.param_groups, self._group_kernel_args) and \
                        plan.run(self.param_groups, self.state, grads):
                    return
            self._checked_step(grads)

    def _group_kernel_args(self, k):
        hp = self._group_hyperparameters(self.param_groups[k], f"param_groups[{k}]")
        return self.rule.slots(hp), self.rule.kernel_args(hp, 1)

    def _checked_step(self, grads):
        """The full validation, then the update through a new plan (see fastopt/_engine.pxi)."""
        hps = [self._group_hyperparameters(g, f"param_groups[{i}]")
               for i, g in enumerate(self.param_groups)]
        params = self.params
        _checks.check_grads(grads, params)
        written, names = list(params), [f"params[{i}]" for i in range(len(params))]
        for i, p in enumerate(params):
            state = self.state.get(i)
            if state is not None:
                F.check_state(self.rule, p, state, f"state[{i}]")
                for k, buf in state.buffers().items():
                    written.append(buf)
                    names.append(f"state[{i}].{k}")
        _checks.check_no_overlap(written, names, list(grads),
                                 [f"grads[{i}]" for i in range(len(grads))])
        # everything is valid: from here on nothing can fail
        batches, i = [], 0
        for group_index, (group, hp) in enumerate(zip(self.param_groups, hps)):
            needed, slots = self.rule.buffers(hp), self.rule.slots(hp)
            by_key = {}
            for p in group["params"]:
                state = self.state.get(i)
                if state is None:
                    state = self.state[i] = self.rule.new_state(p, hp)
                state.add_missing(p, needed)
                by_key.setdefault((p.dtype, state.step), []).append(i)
                i += 1
            for (_, step), indices in by_key.items():
                batch = _kernels.Batch(self.rule.kernel, [params[j] for j in indices],
                                       [self.state[j] for j in indices], indices, slots,
                                       self.rule.kernel_args(hp, 1), step)
                batch.group_index = group_index
                batches.append(batch)
        plan = _kernels.Plan(self.param_groups, self.state, batches)
        if all(isinstance(g, ParamGroup) for g in self.param_groups):
            self._plan = plan
        if not plan.run(self.param_groups, self.state, grads):
            # grads that are valid but not plain (ndarray subclasses, another sequence type)
            k = 0
            for group, hp in zip(self.param_groups, hps):
                for p in group["params"]:
                    self.rule.update(p, grads[k], self.state[k], hp)
                    k += 1

    # ---- checkpoints (fastopt/checkpoint.py) --------------------------------------------

    def state_dict(self):
        """{"optimizer", "version", "state": {index: {buffer: array, "step": int}},
        "param_groups": [{hyperparameters..., "params": [indices]}]}; arrays are copies."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict):
        """Replace hyperparameters and states with those of `state_dict` (copied).  Everything
        is validated first: on any error nothing changes."""
        checkpoint.load_state_dict(self, state_dict)

    def save(self, path):
        """Write state_dict() to an .npz file, atomically (an old file at `path` survives any
        failure); numbers and arrays only, loadable without pickle."""
        checkpoint.save(self, path)

    def load(self, path):
        """load_state_dict() from a file written by save(); never unpickles.  An unreadable file
        raises ValueError("not a fastopt checkpoint: <path>: <reason>") and changes nothing."""
        checkpoint.load(self, path)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join(lines + [")"])


class SGD(Optimizer):
    """Stochastic gradient descent, with optional Momentum and Nesterov (NAG); textbook forms.

    SGD:       theta <- theta - lr g
    Momentum:  v <- momentum v + lr g;  theta <- theta - v
    NAG:       v <- momentum v + lr g;  theta <- theta - (momentum v + lr g)
    g = grad (negated if maximize) + weight_decay theta.
    """
    rule = F.SGD_RULE

    def __init__(self, params, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, *,
                 maximize=False):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, maximize=maximize)


class Momentum(SGD):
    """SGD with classical momentum: v <- momentum v + lr g;  theta <- theta - v."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, *, maximize=False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         maximize=maximize)


class NAG(SGD):
    """Nesterov accelerated gradient (lookahead form):
    v <- momentum v + lr g;  theta <- theta - (momentum v + lr g)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, *, maximize=False):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=True,
                         weight_decay=weight_decay, maximize=maximize)


class Adagrad(Optimizer):
    """G <- G + g^2;  theta <- theta - lr g / sqrt(G + eps)   (G starts at
    initial_accumulator_value)."""
    rule = F.ADAGRAD_RULE

    def __init__(self, params, lr=0.01, eps=1e-8, weight_decay=0.0, initial_accumulator_value=0.0,
                 *, maximize=False):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, maximize=maximize)


class Adadelta(Optimizer):
    """E[g^2] <- rho E[g^2] + (1 - rho) g^2;
    delta <- sqrt(E[delta^2] + eps) / sqrt(E[g^2] + eps) g;
    E[delta^2] <- rho E[delta^2] + (1 - rho) delta^2;  theta <- theta - lr delta."""
    rule = F.ADADELTA_RULE

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False):
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)


class RMSprop(Optimizer):
    """E[g^2] <- rho E[g^2] + (1 - rho) g^2;  theta <- theta - lr g / sqrt(E[g^2] + eps).
    Options: centered (subtract E[g]^2 under the root), momentum (b <- momentum b + step)."""
    rule = F.RMSPROP_RULE

    def __init__(self, params, lr=1e-3, rho=0.9, eps=1e-8, weight_decay=0.0, *, momentum=0.0,
                 centered=False, maximize=False):
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize)


class Adam(Optimizer):
    """m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  m_hat = m / (1 - b1^t);
    v_hat = v / (1 - b2^t);  theta <- theta - lr m_hat / (sqrt(v_hat) + eps).
    amsgrad: the running max of v_hat replaces v_hat."""
    rule = F.ADAM_RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)


class AdamW(Optimizer):
    """Adam with decoupled weight decay: theta <- theta (1 - lr weight_decay) first, then Adam
    without the L2 term."""
    rule = F.ADAMW_RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)


class AdaMax(Optimizer):
    """m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g|);  theta <- theta - (lr / (1 - b1^t)) m / (u + eps)."""
    rule = F.ADAMAX_RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)


class Nadam(Optimizer):
    """m, v, m_hat, v_hat as in Adam;
    theta <- theta - lr / (sqrt(v_hat) + eps) (b1 m_hat + (1 - b1) g / (1 - b1^t))."""
    rule = F.NADAM_RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize)
