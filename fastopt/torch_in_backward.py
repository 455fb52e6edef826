"""Optimizer in backward: each parameter is updated as soon as its gradient is accumulated.

    import fastopt.torch
    from fastopt.torch_in_backward import step_in_backward

    model = Net()
    opt = step_in_backward(model, fastopt.torch.AdamW, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in batches:
        loss_fn(model(x), y).backward()     # every parameter is updated here
        opt.step()                          # nothing left to do (kept for schedulers)
        sched.step()
    opt.remove()                            # back to plain gradients

During `backward()`, autograd calls each parameter's post-accumulate-grad hook
(`Tensor.register_post_accumulate_grad_hook`) once its gradient is complete: the hook runs that
parameter's own optimizer (one `optimizer_class([param], **kwargs)` per parameter, as
`torch.distributed.optim._apply_optimizer_in_backward` builds them) and then sets the gradient
to None, as torch's "fuse the optimizer step into the backward pass" recipe does.  The gradient
is read right after the backward kernel wrote it, so it may still be in cache, and it is
released at once, so a model never holds all its gradients at the same time.

A parameter used several times in the graph is updated once, with the sum of its
contributions: autograd accumulates them before the hook fires.  A parameter that gets no
gradient in a backward is not stepped (its state does not advance), exactly as
`optimizer.step()` skips parameters whose `.grad` is None after `zero_grad()`.

**Gradient accumulation is not supported**: every `backward()` is a step.  Code that calls
`backward()` several times per step, clips the global gradient norm, or reads `.grad` after
`backward()` needs the ordinary optimizer.  (`retain_graph` and a second `backward()` step
again.)

`params` is what a torch optimizer takes: an `nn.Module` (its parameters that require grad,
with their names), tensors, `(name, tensor)` pairs, or param-group dicts whose keys override
the keyword arguments for their parameters (e.g. no weight decay on biases).  Any
`torch.optim.Optimizer` class works (fastopt.torch's and torch.optim's).

The returned `InBackwardOptimizer` is a `torch.optim.Optimizer`, so lr schedulers and
training loops take it unchanged:

- `param_groups`: one group per parameter, in parameter order; these are the per-parameter
  optimizers' own group dicts, so `group["lr"] = ...` or a scheduler changes the real thing.
  `set_lr(lr)` sets every group's lr.
- `optimizers`: the per-parameter optimizers, in order (`optimizer_for(param)` finds one);
  `names`: the parameters' names, or None.
- `state_dict()`: torch's layout, one group per parameter, state keyed by parameter index
  (and `param_names` in each group when the names are known).  `load_state_dict()` takes it,
  or any torch-layout optimizer state dict over the same parameters in the same order with
  any grouping (e.g. from an ordinary `fastopt.torch.AdamW(model.parameters())`), and
  changes nothing if it fails.
- `step(closure=None)`: the updates already happened in backward; with a closure it calls the
  closure (which runs backward, so the updates happen) and returns its loss.
- `zero_grad()`: sets the gradients to None (they already are after a backward).
- `remove()`: removes the hooks; `backward()` then leaves gradients as usual.

The parameters also carry torch's convention, `param._in_backward_optimizers` (read by
`torch.distributed.optim._get_in_backward_optimizers(module)`), and the hooks are registered
where `DistributedDataParallel` finds and replaces them with its own all-reduce-then-step
hook.  `torch.distributed.optim._apply_optimizer_in_backward(fastopt.torch.AdamW, params,
{"lr": 1e-3})` works as well; it returns nothing and has no remove().

The hook calls the per-parameter optimizer's ordinary `step()`, so any speed-up of a
one-parameter `step()` applies here unchanged.
"""
import copy
import numbers
from collections import OrderedDict

import torch

try:  # where DistributedDataParallel looks for in-backward hooks to replace with its own
    from torch.distributed.optim.apply_optimizer_in_backward import \
        param_to_optim_hook_handle_map as _DDP_HOOKS
except ImportError:  # a torch built without distributed
    _DDP_HOOKS = None

__all__ = ["step_in_backward", "InBackwardOptimizer"]


def step_in_backward(params, optimizer_class, **optimizer_kwargs):
    """Update each parameter in `params` during backward, as soon as its gradient is ready,
    with its own `optimizer_class(..., **optimizer_kwargs)`.  Returns an InBackwardOptimizer
    (see the module docstring)."""
    return InBackwardOptimizer(params, optimizer_class, **optimizer_kwargs)


class _StateView(dict):
    """Read-only snapshot {param: state} of the per-parameter optimizers' states."""


class InBackwardOptimizer(torch.optim.Optimizer):
    """The per-parameter optimizers run by step_in_backward, seen as one optimizer."""

    def __init__(self, params, optimizer_class, **optimizer_kwargs):
        if not (isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, not "
                            f"{optimizer_class!r}")
        entries = _parse_params(params)  # [(name or None, param, overrides)]
        seen = set()
        for i, (name, p, _) in enumerate(entries):
            where = f"parameter {i}" + (f" ({name})" if name is not None else "")
            if id(p) in seen:
                raise ValueError(f"{where} appears more than once; each parameter gets one "
                                 "optimizer")
            seen.add(id(p))
            if not p.requires_grad:
                raise ValueError(f"{where} does not require grad, so backward never updates it")
            if getattr(p, "_in_backward_optimizers", None):
                raise ValueError(f"{where} already has an optimizer in backward (another "
                                 "step_in_backward or _apply_optimizer_in_backward); remove it "
                                 "first, or it would be updated twice per backward")
        # build every optimizer first: a bad argument raises here, before any hook exists
        optimizers = [optimizer_class([p], **{**optimizer_kwargs, **overrides})
                      for _, p, overrides in entries]

        # what torch.optim.Optimizer.__init__ sets up, minus the param groups we delegate
        self.defaults = dict(optimizers[0].defaults)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

        self.optimizer_class = optimizer_class
        self.optimizers = optimizers
        self.params = [p for _, p, _ in entries]
        names = [name for name, _, _ in entries]
        self.names = names if all(n is not None for n in names) else None
        self._hooks = []
        for p, opt, (_, _, overrides) in zip(self.params, optimizers, entries):
            p._in_backward_optimizers = [opt]
            p._optimizer_classes = [optimizer_class]
            p._optimizer_kwargs = [{**optimizer_kwargs, **overrides}]
            handle = p.register_post_accumulate_grad_hook(_make_hook(opt))
            self._hooks.append(handle)
            if _DDP_HOOKS is not None:
                _DDP_HOOKS.setdefault(p, []).append(handle)

    # -- the Optimizer interface ------------------------------------------------------------

    @property
    def param_groups(self):
        return [opt.param_groups[0] for opt in self.optimizers]

    @property
    def state(self):
        view = _StateView()
        for p, opt in zip(self.params, self.optimizers):
            if p in opt.state:
                view[p] = opt.state[p]
        return view

    def step(self, closure=None):
        """The updates already ran in backward; a closure is called (its backward updates)
        and its loss returned."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        raise NotImplementedError("an InBackwardOptimizer's parameters are fixed when it is "
                                  "built; call step_in_backward again for more parameters")

    def set_lr(self, lr):
        """Set every parameter's learning rate."""
        if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
            raise TypeError(f"lr must be a number, not {type(lr).__name__}")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr must be a single number, not a tensor of shape {tuple(lr.shape)}")
        if not 0.0 <= float(lr) < float("inf"):
            raise ValueError(f"Invalid learning rate: {lr}")
        for group in self.param_groups:
            group["lr"] = lr

    def optimizer_for(self, param):
        for p, opt in zip(self.params, self.optimizers):
            if p is param:
                return opt
        raise KeyError("that tensor is not one of this InBackwardOptimizer's parameters")

    def remove(self):
        """Remove the hooks: backward() leaves gradients in .grad again.  Idempotent."""
        for p, opt, handle in zip(self.params, self.optimizers, self._hooks):
            handle.remove()
            handles = _DDP_HOOKS.get(p, []) if _DDP_HOOKS is not None else []
            if handle in handles:
                handles.remove(handle)
            if opt in getattr(p, "_in_backward_optimizers", []):
                k = p._in_backward_optimizers.index(opt)
                for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
                    del getattr(p, attr)[k]
                if not p._in_backward_optimizers:
                    del p._in_backward_optimizers, p._optimizer_classes, p._optimizer_kwargs
        self._hooks = []

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state, groups = {}, []
        for i, opt in enumerate(self.optimizers):
            one = opt.state_dict()
            (group,) = one["param_groups"]
            group = dict(group, params=[i])
            if self.names is not None:
                group["param_names"] = [self.names[i]]
            groups.append(group)
            if one["state"]:
                state[i] = one["state"][0]
        result = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            changed = hook(self, result)
            if changed is not None:
                result = changed
        return result

    def load_state_dict(self, state_dict):
        """Load a torch-layout state dict over the same parameters in the same order, one
        group per parameter (this class's own) or any grouping (an ordinary optimizer's).
        Changes nothing if it fails."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("an optimizer state dict has the keys 'state' and 'param_groups'")
        per_param = []  # one single-parameter state dict for each of our parameters, in order
        for g, group in enumerate(state_dict["param_groups"]):
            if not isinstance(group, dict) or "params" not in group:
                raise ValueError(f"param group {g} of the state dict has no 'params'")
            for k, key in enumerate(group["params"]):
                hyper = {name: value for name, value in group.items()
                         if name not in ("params", "param_names")}
                hyper["params"] = [0]
                if "param_names" in group:
                    hyper["param_names"] = [group["param_names"][k]]
                saved = state_dict["state"].get(key)
                per_param.append({"state": {} if saved is None else {0: saved},
                                  "param_groups": [hyper]})
        if len(per_param) != len(self.optimizers):
            raise ValueError(f"the state dict has {len(per_param)} parameters, this "
                             f"InBackwardOptimizer has {len(self.optimizers)}")
        before = [_shallow_snapshot(opt) for opt in self.optimizers]
        try:
            for opt, one in zip(self.optimizers, per_param):
                opt.load_state_dict(one)
        except Exception:
            for opt, snapshot in zip(self.optimizers, before):
                opt.__setstate__(snapshot)
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("an InBackwardOptimizer holds autograd hooks and cannot be pickled; "
                        "save its state_dict()")

    def __repr__(self):
        return (f"InBackwardOptimizer({self.optimizer_class.__name__}, "
                f"{len(self.optimizers)} parameters, hooks "
                f"{'active' if self._hooks else 'removed'})")


def _make_hook(optimizer):
    def step_then_release(param):
        optimizer.step()
        param.grad = None  # released as the recipe does: the update has consumed it
    return step_then_release


def _shallow_snapshot(opt):
    # load_state_dict replaces these containers (it never writes into the old tensors)
    return {"state": copy.copy(opt.state), "param_groups": list(opt.param_groups)}


def _parse_params(params):
    """[(name or None, tensor, {group overrides})] from any form a torch optimizer takes."""
    if isinstance(params, torch.nn.Module):
        return [(name, p, {}) for name, p in params.named_parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or param "
                        "groups, or an nn.Module, not a single tensor (wrap it in a list)")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be an nn.Module or an iterable, not "
                        f"{type(params).__name__}") from None
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        entries = []
        for g, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"param group {g} has no 'params'")
            overrides = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            inner = group["params"]
            inner = [inner] if isinstance(inner, torch.Tensor) else list(inner)
            for name, p in _named(inner, f"param group {g}"):
                entries.append((name, p, overrides))
        if not entries:
            raise ValueError("optimizer got an empty parameter list")
        return entries
    if any(isinstance(item, dict) for item in items):
        raise TypeError("params mixes param-group dicts with tensors; give all groups or none")
    return [(name, p, {}) for name, p in _named(items, "params")]


def _named(items, where):
    named = [isinstance(item, tuple) for item in items]
    if any(named) and not all(named):
        raise TypeError(f"{where} mixes (name, tensor) pairs with plain tensors")
    out = []
    for i, item in enumerate(items):
        if named[i] and (len(item) != 2 or not isinstance(item[0], str)):
            raise TypeError(f"{where}: item {i} is not a (name, tensor) pair")
        name, p = item if named[i] else (None, item)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: item {i} is a {type(p).__name__}, not a tensor")
        out.append((name, p))
    return out
