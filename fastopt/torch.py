"""fastopt.torch: drop-in replacements for torch.optim on CPU, running fastopt's C kernels.

    from fastopt.torch import Adam        # instead of: from torch.optim import Adam

Each class subclasses the torch.optim class of the same name and replaces only its step():
constructor arguments, defaults, argument checks, param groups, add_param_group, zero_grad,
step(closure), hooks, lr schedulers and the state_dict layout are torch's own, so checkpoints
move both ways and training continues identically.  The update runs in place, zero-copy, on
the parameters' storage with torch's formulas (fastopt's FO_TORCH convention: momentum with
dampening, eps outside the root for Adagrad/RMSprop, AdaMax's eps in the max, AMSGrad's max of
v, NAdam's momentum-decay schedule), one C call per group and dtype, threads split by bytes.

Parameters must be dense, contiguous float32/float64 CPU tensors (checked when the optimizer
is built and when a group is added); anything else gets a clear error rather than a silent
copy that would lose the update.  `foreach` and `fused` are accepted and ignored (fastopt is
always fused); `capturable=True` and `differentiable=True` are rejected (CPU, no autograd
through the step).
"""
import math

import torch

from fastopt import _kernels

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam"]

TORCH = _kernels.TORCH
_DTYPES = (torch.float32, torch.float64)


def _check_param(p, where):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
    if p.device.type != "cpu":
        raise ValueError(f"{where} is on {p.device}; fastopt.torch updates CPU tensors "
                         "(use torch.optim for other devices)")
    if p.layout != torch.strided:
        raise ValueError(f"{where} is a {p.layout} tensor; fastopt.torch needs dense tensors")
    if p.dtype not in _DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; fastopt.torch needs float32 or float64")
    if not p.is_contiguous():
        raise ValueError(f"{where} is not contiguous; fastopt.torch updates parameters in place "
                         "and would lose the update on a copy")


class _Fastopt:
    """The step shared by every class.  Subclasses name the kernel and give the state slots in
    the kernel's order, a parameter's fresh state, how a step advances a state, and the
    kernel's arguments."""

    kernel = ""

    def __init__(self, params, *args, **kwargs):
        for flag in ("capturable", "differentiable"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported by fastopt.torch (CPU kernels "
                                 "outside autograd); use torch.optim for it")
        super().__init__(params, *args, **kwargs)

    def add_param_group(self, param_group):
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            _check_param(p, f"{type(self).__name__}: parameter {i} of param group "
                            f"{len(getattr(self, 'param_groups', []))}")
        super().add_param_group(param_group)

    def slots(self, group):
        raise NotImplementedError

    def keeps_state(self, group):
        return True

    def new_state(self, p, group):
        return {"step": _step_tensor()}

    def advance(self, states, group):
        """Move the states' counters to this step; returns each one's step number t (from 1)."""
        counters = [s["step"] for s in states]
        if not counters:
            return []
        torch._foreach_add_(counters, 1.0)
        return [int(t) for t in torch.stack(counters).tolist()]

    def batch_extra(self, state):
        return None

    def kernel_args(self, group, step, state):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, its params with a gradient)
        for group in self.param_groups:  # validate everything before anything changes
            with_grad = []
            work.append((group, with_grad))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype not in _DTYPES or p.device.type != "cpu" or p.layout != torch.strided \
                        or not p.is_contiguous():
                    _check_param(p, f"{type(self).__name__}: a parameter")
                g = p.grad
                if g.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                    raise TypeError(f"a gradient of {g.dtype} {tuple(g.shape)} on {g.device} for a "
                                    f"parameter of {p.dtype} {tuple(p.shape)} on {p.device}")
                with_grad.append(p)
        for group, params in work:
            self._step_group(group, params)
        return loss

    def _step_group(self, group, params):
        slots = self.slots(group)
        keep = self.keeps_state(group)
        states = []
        for p in params:
            state = self.state[p] if keep else {}
            if not state:
                state.update(self.new_state(p, group))
            states.append(state)
        steps = self.advance(states, group)
        batches = {}
        for p, state, t in zip(params, states, steps):
            for name in slots:  # options switched on later, or a checkpoint's strided buffers
                if name is not None:
                    if state.get(name) is None:
                        state[name] = _zeros(p)
                    elif not state[name].is_contiguous():
                        state[name] = state[name].contiguous()
            key = (p.dtype, t, self.batch_extra(state))
            batches.setdefault(key, []).append((p, p.grad.contiguous(), state))
        for (dtype, t, _), members in batches.items():
            batch_states = [s for _, _, s in members]
            addresses = [[p.data_ptr() for p, _, _ in members],
                         [g.data_ptr() for _, g, _ in members]]
            addresses += [None if name is None else [s[name].data_ptr() for s in batch_states]
                          for name in slots]
            _kernels.run_addresses(_kernels.RULES[self.kernel], dtype == torch.float64, addresses,
                                   [p.numel() for p, _, _ in members],
                                   self.kernel_args(group, t, batch_states[0]))
            # the kernels write memory directly: tell autograd, as an in-place op would
            written = [p for p, _, _ in members]
            written += [s[name] for s in batch_states for name in slots if name is not None]
            torch.autograd.graph.increment_version(written)


def _zeros(p):
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _step_tensor():
    """torch's step counter: a 0-d tensor of the default float dtype (float32 unless float64)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


def _common(group):
    return dict(lr=group["lr"], weight_decay=group["weight_decay"], maximize=group["maximize"])


class SGD(_Fastopt, torch.optim.SGD):
    kernel = "sgd"

    def slots(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else (None,)

    def keeps_state(self, group):
        return group["momentum"] != 0  # as torch: plain SGD stores nothing

    def new_state(self, p, group):
        return {}  # as torch: no step; the buffer appears on the first step with momentum

    def advance(self, states, group):
        # step 1 (no buffer yet): torch seeds the buffer with g, dampening unused
        return [1 if s.get("momentum_buffer") is None else 2 for s in states]

    def kernel_args(self, group, step, state):
        return dict(_common(group), momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], convention=TORCH, step=step)


class Adagrad(_Fastopt, torch.optim.Adagrad):
    kernel = "adagrad"

    def slots(self, group):
        return ("sum",)

    def new_state(self, p, group):
        return {"step": _step_tensor(),
                "sum": torch.full_like(p, group["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)}

    def kernel_args(self, group, step, state):
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        return dict(_common(group), lr=clr, eps=group["eps"], convention=TORCH)


class Adadelta(_Fastopt, torch.optim.Adadelta):
    kernel = "adadelta"

    def slots(self, group):
        return ("square_avg", "acc_delta")

    def kernel_args(self, group, step, state):
        return dict(_common(group), rho=group["rho"], eps=group["eps"])


class RMSprop(_Fastopt, torch.optim.RMSprop):
    kernel = "rmsprop"

    def slots(self, group):
        return ("square_avg", "grad_avg" if group["centered"] else None,
                "momentum_buffer" if group["momentum"] > 0 else None)

    def kernel_args(self, group, step, state):
        return dict(_common(group), rho=group["alpha"], eps=group["eps"],
                    momentum=group["momentum"], centered=group["centered"], convention=TORCH)


class Adam(_Fastopt, torch.optim.Adam):
    kernel = "adam"

    def slots(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def kernel_args(self, group, step, state):
        beta1, beta2 = group["betas"]
        return dict(_common(group), beta1=beta1, beta2=beta2, eps=group["eps"],
                    amsgrad=group["amsgrad"],
                    decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                    convention=TORCH, step=step)


class AdamW(Adam, torch.optim.AdamW):
    pass


class Adamax(_Fastopt, torch.optim.Adamax):
    kernel = "adamax"

    def slots(self, group):
        return ("exp_avg", "exp_inf")

    def kernel_args(self, group, step, state):
        beta1, beta2 = group["betas"]
        return dict(_common(group), beta1=beta1, beta2=beta2, eps=group["eps"],
                    convention=TORCH, step=step)


class NAdam(_Fastopt, torch.optim.NAdam):
    kernel = "nadam"

    def slots(self, group):
        return ("exp_avg", "exp_avg_sq")

    def new_state(self, p, group):
        return {"step": _step_tensor(), "mu_product": torch.ones((), dtype=_step_tensor().dtype)}

    def advance(self, states, group):
        steps = super().advance(states, group)
        by_step = {}
        for s, t in zip(states, steps):
            by_step.setdefault(t, []).append(s["mu_product"])
        for t, products in by_step.items():
            # mu_t = beta1 (1 - 0.5 * 0.96^(t psi)); torch keeps the running product as a tensor
            torch._foreach_mul_(products, group["betas"][0] * (1.0 - 0.5 * 0.96 ** (t * group["momentum_decay"])))
        return steps

    def batch_extra(self, state):
        return float(state["mu_product"])

    def kernel_args(self, group, step, state):
        beta1, beta2 = group["betas"]
        return dict(_common(group), beta1=beta1, beta2=beta2, eps=group["eps"],
                    momentum_decay=group["momentum_decay"],
                    mu_product=float(state["mu_product"]),
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    convention=TORCH, step=step)


for _cls in (SGD, Adagrad, Adadelta, RMSprop, Adam, AdamW, Adamax, NAdam):
    _cls.__doc__ = (f"torch.optim.{_cls.__name__}, with its step in fastopt's C kernels "
                    "(see fastopt.torch).\n\n" + (getattr(torch.optim, _cls.__name__).__doc__ or ""))
del _cls
