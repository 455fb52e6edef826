"""fastopt.torch: drop-in replacements for torch.optim on CPU, running fastopt's C kernels.

    from fastopt.torch import Adam        # instead of: from torch.optim import Adam

Each class subclasses the torch.optim class of the same name and replaces only its step():
constructor arguments, defaults, argument checks, param groups, add_param_group, zero_grad,
step(closure), hooks, lr schedulers and the state_dict layout are torch's own, so checkpoints
move both ways and training continues identically.  The update runs in place, zero-copy, on
the parameters' storage with torch's formulas (fastopt's FO_TORCH convention: momentum with
dampening, eps outside the root for Adagrad/RMSprop, AdaMax's eps in the max, AMSGrad's max of
v, NAdam's momentum-decay schedule), one C call per group and dtype, threads split by bytes.

Parameters are given in every form torch.optim takes: an iterable (a generator too) of tensors
or of ``(name, tensor)`` pairs from ``named_parameters()``, or param groups whose "params" is a
tensor, a list, a tuple or a generator.  They must be dense, contiguous float32/float64 CPU
tensors, or complex64/complex128 ones, which are updated as their real and imaginary parts as
torch does (checked when the optimizer is built and when a group is added); anything else gets
a clear error rather than a silent copy that would lose the update.  `foreach` and `fused` are
accepted and ignored (fastopt is always fused); `capturable=True` and `differentiable=True` are
rejected (CPU, no autograd through the step).  A 0-d tensor lr is read once per step.
DTensor parameters (FSDP2's fully_shard) are updated through their local shard, zero copy, with
their states DTensors placed like them, as torch.optim makes them; torch.distributed.checkpoint's
get_optimizer_state_dict / set_optimizer_state_dict work (examples/fsdp2_train.py).

After a first, validated step, a step re-checks only what can change, reading the tensors
through a C++ module built for the installed torch (fastopt/native_torch.py: once, in the
background; through torch's Python API until then or without a compiler).

A step validates every group's hyperparameters, every gradient and every state buffer before it
changes any parameter, state buffer or step counter; the error names the group and the field,
in torch's wording where torch has one.  A parameter listed twice (in one group, which
torch.optim allows with a warning and then updates twice per step, or in two) is refused at
the step with a ValueError: its copies would share one state and race in one C call.
fastopt's ranges are torch's, finite, and, where the kernels need it, narrower: Adadelta's rho
and RMSprop's alpha in [0, 1), SGD's dampening in [0, 1].

Threads: each optimizer serializes step(), state_dict(), load_state_dict(), add_param_group()
and zero_grad() with its own re-entrant lock, so threads sharing one optimizer lose no update,
and different optimizers still step in parallel (the kernels release the GIL).  step(closure)
runs the closure inside the lock: the gradients a step applies are the ones its own closure
computed, at the parameters that step updates (a closure that waits for another thread using
the same optimizer would deadlock).  state_dict() returns copies of the state tensors taken
under the lock (torch returns the live buffers, which a later step changes, and which an
optimizer that loads them would share), so a checkpoint taken while another thread steps is all
of one step; the copy costs the state's memory once more while the dict is alive.
"""
import array
import math
import threading
from numbers import Real

import torch
from torch.optim.optimizer import (_get_scalar_dtype, _global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

from fastopt import _kernels, native_torch, storage
from fastopt import rules as _rules

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    class DTensor:  # noqa: D101 - never instantiated: isinstance is always False
        pass

__all__ = ["Adafactor", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam",
           "Rprop", "ASGD", "Lion", "LAMB", "LARS", "SparseAdam",
           "RowwiseAdagrad"]

TORCH = _kernels.TORCH
# a parameter's dtype -> the real dtype the kernels see (complex: its real and imaginary parts)
_KERNEL_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.complex64: torch.float32, torch.complex128: torch.float64,
                  torch.bfloat16: torch.bfloat16}
# the kernels' storage code of each real dtype (csrc/fastopt.h, fo_dtype)
_FO_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# where the storage options and the step count that keys stochastic rounding live in
# self.state (torch's state_dict keeps non-tensor keys as they are)
_STORAGE_KEY = "fastopt_storage"
# rules that need float32/float64 storage -> why (norms per whole tensor read the buffers as
# stored), and rules whose state needs it (those, and a row rule's one value per row)
_PLAIN_STATE_KERNELS = {r.kernel: r.plain_state for r in _rules.RULES if r.plain_state}
# row rules: a row's mean of g^2 is for real parameters
_PER_ROW_KERNELS = frozenset(r.kernel for r in _rules.RULES if r.crule.per_row)
# factored rules: each state buffer's shape from the parameter's (the registry's state_shapes)
_STATE_SHAPES = {r.kernel: r.state_shapes for r in _rules.RULES if r.state_shapes}
# rules whose state buffers are not shaped like the parameter (row and factored rules)
_SHAPED_STATE_KERNELS = frozenset(r.kernel for r in _rules.RULES if r.crule.shaped_state)
_UNSUPPORTED_FLAGS = ("capturable", "differentiable")


def _local_like(t, local_p, error, what):
    """t's local shard (t itself unless a DTensor), which must be shaped like its parameter's."""
    local = _local(t)
    if local.shape != local_p.shape:
        raise error(f"{what} sharded as {tuple(local.shape)} here, its parameter as "
                    f"{tuple(local_p.shape)}")
    return local


def _local(t):
    """The tensor the kernels update: a DTensor's local shard (zero copy: it shares storage,
    as FSDP2's sharded parameters do), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _check_param(p, where):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
    if p.device.type != "cpu":
        raise ValueError(f"{where} is on {p.device}; fastopt.torch updates CPU tensors "
                         "(use torch.optim for other devices)")
    if p.layout != torch.strided:
        raise ValueError(f"{where} is a {p.layout} tensor; fastopt.torch needs dense tensors")
    if p.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; fastopt.torch needs float32, float64, "
                        "bfloat16, complex64 or complex128")
    if not _local(p).is_contiguous():
        raise ValueError(f"{where} is not contiguous; fastopt.torch updates parameters in place "
                         "and would lose the update on a copy")
    if p.is_conj() or p.is_neg():  # (its memory holds other values than it shows)
        raise ValueError(f"{where} is a lazily conjugated or negated view; fastopt.torch updates "
                         "the memory itself (resolve_conj(), resolve_neg())")


# ---- hyperparameter ranges -------------------------------------------------------------------
# Each entry: (group key, index in it or None, torch's wording of the error, the test, the range in words).  The
# ranges are torch's constructor checks made finite, narrowed where the kernels need it, so a
# group that passes here never makes a kernel fail halfway through a step.

def _finite_nonneg(x):
    return 0.0 <= x < math.inf


def _unit_half_open(x):
    return 0.0 <= x < 1.0


def _unit_closed(x):
    return 0.0 <= x <= 1.0


_NONNEG = (_finite_nonneg, "finite and >= 0")
_HALF_OPEN = (_unit_half_open, "in [0, 1)")
_CLOSED = (_unit_closed, "in [0, 1]")

_LR = ("lr", None, "Invalid learning rate", *_NONNEG)
_WEIGHT_DECAY = ("weight_decay", None, "Invalid weight_decay value", *_NONNEG)
_EPS = ("eps", None, "Invalid epsilon value", *_NONNEG)
_MOMENTUM = ("momentum", None, "Invalid momentum value", *_NONNEG)
_BETAS = (("betas", 0, "Invalid beta parameter at index 0", *_HALF_OPEN),
          ("betas", 1, "Invalid beta parameter at index 1", *_HALF_OPEN))


class _Fastopt:
    """The step shared by every class.  Subclasses name the kernel and give their
    hyperparameter ranges, the state slots in the kernel's order, a parameter's fresh state,
    how a step advances a state, and the kernel's arguments."""

    kernel = ""
    ranges = (_LR, _WEIGHT_DECAY)
    flags = ("maximize",)
    # torch.amp.GradScaler's fused protocol: it sets grad_scale and found_inf (0-d tensors) on
    # the optimizer instead of unscaling; step() skips on found_inf and unscales inside the
    # update's C call (the multiplier 1 / grad_scale folded into the rule's scalars)
    _step_supports_amp_scaling = True

    def __init__(self, params, *args, state_dtype=None, rounding="stochastic", seed=0,
                 master_weights=False, **kwargs):
        """torch's arguments, and fastopt's storage options (fastopt.storage): state_dtype
        (None, "float32", "bfloat16", torch.float32 or torch.bfloat16), rounding
        ("stochastic" or "nearest"), seed, master_weights."""
        for flag in _UNSUPPORTED_FLAGS:
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported by fastopt.torch (CPU kernels "
                                 "outside autograd); use torch.optim for it")
        options = storage.check_options(state_dtype, rounding, seed, master_weights)
        self._lock = threading.RLock()  # before torch's __init__, which adds the param groups
        self._storage_options = options  # read by add_param_group
        self.total_norm = None  # what the last step(clip_norm=...) measured
        super().__init__(params, *args, **kwargs)
        self._add_storage_entry_if_needed()

    def _add_storage_entry_if_needed(self):
        """The state's storage entry (options, and the step count that keys stochastic
        rounding), from this optimizer's own options, where they are not the defaults or a
        parameter is bfloat16."""
        options = self.storage_options
        if options != storage.DEFAULTS or any(
                p.dtype == torch.bfloat16 for g in self.param_groups for p in g["params"]):
            self.state[_STORAGE_KEY] = dict(options, step=0)

    @property
    def storage_options(self):
        entry = self.state.get(_STORAGE_KEY)
        if entry is None:
            return dict(self.__dict__.get("_storage_options", storage.DEFAULTS))
        return {k: entry[k] for k in storage.DEFAULTS}

    def __setstate__(self, state):
        # unpickling and copy.deepcopy come here without __init__; load_state_dict comes here
        # holding the lock, which must stay the same object
        super().__setstate__(state)
        if "_lock" not in self.__dict__:
            self._lock = threading.RLock()
        self.__dict__.setdefault("total_norm", None)

    # ---- the methods that read or write parameters and state, each under the lock ---------

    def add_param_group(self, param_group):
        with self._lock:
            self._plan = None
            index = len(self.param_groups)
            # torch's own normalization: a tensor, list, tuple or generator (read once), and
            # (name, tensor) pairs; torch's errors for the mixes it rejects
            super().add_param_group(param_group)
            try:
                group = self.param_groups[index]
                for i, p in enumerate(group["params"]):
                    where = f"{type(self).__name__}: parameter {i} of param group {index}"
                    _check_param(p, where)
                    _check_storage(p, self.storage_options, where, self.kernel)
                    if p.dtype == torch.bfloat16 and _STORAGE_KEY not in self.state \
                            and "_storage_options" in self.__dict__ and self.param_groups[:index]:
                        self.state[_STORAGE_KEY] = dict(self.storage_options, step=0)
                self._hyperparameters(index, group)
            except BaseException:
                del self.param_groups[index:]
                raise

    def zero_grad(self, set_to_none=True):
        with self._lock:
            super().zero_grad(set_to_none)

    def state_dict(self):
        with self._lock:
            return _copy_tensors(super().state_dict())

    def load_state_dict(self, state_dict):
        with self._lock:
            self._plan = None
            before = self.state, self.param_groups  # torch replaces both objects, never edits them
            super().load_state_dict(state_dict)
            try:
                entry = self.state.get(_STORAGE_KEY)
                if entry is not None:
                    options = _storage_entry_options(entry, "state_dict's")
                    step = int(entry["step"])
                    self.state[_STORAGE_KEY] = dict(options, step=step)
                else:  # torch.optim's state dict: this optimizer's own options, from step 0
                    self._add_storage_entry_if_needed()
                if self.state.get(_STORAGE_KEY) is not None:
                    _keep_stored_dtypes(self, state_dict)
                for index, group in enumerate(self.param_groups):
                    hp = self._hyperparameters(index, group)
                    for i, p in enumerate(group["params"]):
                        _check_storage(p, self.storage_options, self._where(index, group, i),
                                       self.kernel)
                        state = self.state.get(p)
                        if state:
                            _densify_sparse_buffers(state, self.slots(hp))
                            self._state_pointers(index, i, group, p, _local(p), state,
                                                 self.slots(hp))
            except BaseException:
                self.state, self.param_groups = before
                raise

    def step(self, closure=None, *, clip_norm=None):
        """One update of every parameter with a gradient (torch.optim's `step`).

        clip_norm: clip by the global norm inside the update (fastopt's option; torch's
        optimizers have none): total_norm = the L2 norm over every gradient of the optimizer
        (after GradScaler's unscaling), in double with a fixed summation order, read in one
        pass before the update; then every gradient is multiplied by
        min(1, clip_norm / (total_norm + 1e-6)) inside the update's own pass (torch's
        clip_grad_norm_ formula; the gradients themselves are not written).  The step keeps
        total_norm in `self.total_norm` (None after a step without clip_norm).  It takes
        dense contiguous float32/float64 CPU gradients (fastopt.torch.clip_grad_norm_ takes
        the others) and needs the whole model's gradients in this process (not FSDP2's
        DTensor shards).  With GradScaler: scaler.step(optimizer, clip_norm=...).  A NaN
        total_norm leaves the factor at 1 (the numpy API's rule; torch's clip_grad_norm_
        would multiply every gradient by NaN); GradScaler skips such a step anyway."""
        # torch wraps step() in a profiler range and its hook calls, ~10 us a step; that
        # wrapper runs only when a profiler or a hook is there to see it
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
                or torch._C._autograd._profiler_enabled()):
            return self._hooked_step(closure, clip_norm=clip_norm)
        return self._step(closure, clip_norm)

    step.hooked = True  # tells torch's __init__ not to wrap it again

    def _step(self, closure=None, clip_norm=None):
        with self._lock:
            loss = None
            if closure is not None:
                # inside the lock: the step applies exactly the gradients its closure computed
                with torch.enable_grad():
                    loss = closure()
            self.total_norm = None
            # torch.amp.GradScaler's fused protocol (its attributes, only where it set them)
            found_inf = self.__dict__.get("found_inf")
            if found_inf is not None and float(found_inf) != 0.0:
                return loss  # as torch's fused step: nothing changes, step counts included
            grad_scale = self.__dict__.get("grad_scale")
            multiplier = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
            if not math.isfinite(multiplier) or multiplier < 0.0:
                raise ValueError(f"grad_scale must be finite and > 0, got {float(grad_scale)}")
            total_norm = None
            if clip_norm is not None:  # the norm pass (reads only), the factor into the update
                multiplier, total_norm = self._clipped(
                    clip_norm, 1.0 if grad_scale is None else float(grad_scale))
            grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # torch.no_grad() without its ~1 us of wrapping
            try:
                plan = self.__dict__.get("_plan")
                if plan is not None and plan.run(self, _group_key, multiplier):
                    self.total_norm = total_norm  # (only a step that happened reports one)
                    return loss
                # everything is validated before anything changes
                entry = self.state.get(_STORAGE_KEY)
                if entry is not None:
                    _check_storage_entry(entry)
                work = [self._prepare_group(index, group)
                        for index, group in enumerate(self.param_groups)]
                indices = self._parameter_indices()  # (a repeated parameter named as one)
                self._check_across_parameters(work)
                if entry is not None:
                    entry["step"] += 1  # keys this step's stochastic rounding
                self._indices = indices
                for hp, members in work:
                    if members:
                        self._step_group(hp, members, multiplier)
                # a step with rows takes this validating path every time (no plan to build)
                with_rows = any(isinstance(g, _Rows) for _, members in work for _, _, g, _ in members)
                self._plan = None if with_rows else self._make_plan([hp for hp, _ in work])
                self.total_norm = total_norm
                return loss
            finally:
                torch._C._set_grad_enabled(grad_mode)

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _check_across_parameters(self, work):
        """What _prepare_group, one parameter at a time, cannot see: a gradient that is memory
        the step writes for another parameter (that parameter or one of its state buffers), or
        two parameters whose written memory overlaps.  The kernels update the tensors in any
        order, split across threads, so the result would depend on both."""
        spans, k = [], -1  # (start, end, written?, owner: the member's number in work)
        for hp, members in work:
            slots = self.slots(hp)
            for p, local_p, local_g, state in members:
                k += 1
                spans += [(a, b, True, k) for a, b in _written_spans(local_p, state or {}, slots)]
                spans += [(a, b, False, k) for a, b in _read_spans(local_g)]
        # in order of start, the span reaching furthest of each kind (written; any) and the
        # furthest of another owner than its: a span overlaps an earlier-starting span of
        # another owner iff that one ends after it starts; a written span may overlap any
        # other owner's, a read one only a written one
        reach = {True: [None, None], False: [None, None]}  # written only / any: [first, second]
        for start, end, written, k in sorted(spans):
            top = reach[False] if written else reach[True]
            other = top[1] if top[0] is not None and top[0][1] == k else top[0]
            if other is not None and start < other[0]:
                self._raise_shared(work, (k, written), other[1:])
            for kind in ((True, False) if written else (False,)):
                first, second = reach[kind]
                if first is None or (first[1] == k and end > first[0]):
                    first = (end, k, written)
                elif first[1] != k and end > first[0]:
                    first, second = (end, k, written), first
                elif first[1] != k and (second is None or end > second[0]):
                    second = (end, k, written)
                reach[kind] = [first, second]

    def _raise_shared(self, work, span, other):
        """The error for two parameters' spans that overlap: span and other are (owner,
        written?), owners numbered as _check_across_parameters numbers them."""
        named = []
        for owner, written in (span, other):
            for index, (hp, members) in enumerate(work):
                if owner < len(members):
                    p, group = members[owner][0], self.param_groups[index]
                    i = next(i for i, q in enumerate(group["params"]) if q is p)
                    named.append((index, group, i, "parameter or a state buffer" if written
                                  else "gradient"))
                    break
                owner -= len(members)
        (ik, gk, pk, what), (ij, gj, pj, its) = named
        raise ValueError(f"{self._where(ik, gk, pk)}: its {what} shares memory with the {its} "
                         f"of param group {ij}, {_param_name(gj, pj)}; the update needs separate "
                         "buffers")

    def _clipped(self, clip_norm, scale):
        """(the update's gradient multiplier, total_norm) for step(clip_norm=...): the
        numpy API's step options (fastopt.StepOptions) over this optimizer's gradients."""
        params = [p for g in self.param_groups for p in g["params"]]
        options = _kernels.StepOptions(len(params), scale, clip_norm)  # checks clip_norm first
        tables = _kernels.gather_grads(params, torch.Tensor, torch.float32, torch.float64,
                                       torch.bfloat16)
        if tables is None:
            raise TypeError("clip_norm takes dense contiguous float32/float64/bfloat16 CPU "
                            "gradients (not sparse, complex or DTensor ones); "
                            "fastopt.torch.clip_grad_norm_ takes the others")
        options.reduce_tables(tables)
        return options.grad_multiplier, options.total_norm

    def _make_plan(self, hps):
        try:
            plan = self._planned(hps)
        except (TypeError, ValueError, KeyError):  # (a plan is an optimization: the step stands)
            return None
        if plan is not None:
            native_torch.start()  # the plan's checks in C++ (fastopt/native_torch.py)
        return plan

    def _planned(self, hps):
        """After a validated step: the engine's plan for the next ones (fastopt/_engine.pxi,
        ObjectPlan), which re-checks only what can change.  None where a group's values cannot
        be compared cheaply (a tensor lr), and for DTensor parameters (FSDP2), whose shards the
        validating path finds each step."""
        groups, written = [], []
        for group, hp in zip(self.param_groups, hps):
            key = _group_key(group)
            if key is None or any(isinstance(p, DTensor) for p in group["params"]):
                return None
            keep, slots = self.keeps_state(hp), self.slots(hp)
            members, by_key, n_with_grad = [], {}, 0
            for p in group["params"]:
                present = p.grad is not None
                state = self.state.get(p) if keep else None
                # the state buffers the tables point into (their addresses are re-checked)
                buffers = [state[name] for name in slots
                           if present and name is not None and state and name in state]
                if present and state and state.get("master") is not None:
                    buffers.append(state["master"])
                members.append((p, present, p.data_ptr(), state, p.numel() * p.element_size(),
                                (p.grad.dtype, p.grad.numel() * p.grad.element_size()) if present else None,
                                buffers))
                if not present:
                    continue
                # what the next step's batch depends on: dtype, step count, buffers, extra
                next_key = (_KERNEL_DTYPES[p.dtype],
                            float(state["step"]) if keep and "step" in state else None,
                            tuple(keep and state.get(n) is None for n in slots if n is not None),
                            self.batch_extra(state) if keep else None,
                            p.grad.dtype,  # (storage: the gradient's and each buffer's dtype)
                            tuple(getattr(state.get(n), "dtype", None) for n in slots
                                  if n is not None) if keep and state else None)
                by_key.setdefault(next_key, []).append(n_with_grad)
                n_with_grad += 1
            with_grad = [m for m in members if m[1]]
            tables = []
            for (dtype, *_), indices in by_key.items():
                batch = [with_grad[i] for i in indices]
                addresses = [[p.data_ptr() for p, *_ in batch], None]
                addresses += [None if name is None else
                              [m[3][name].data_ptr() if name in m[3] else 0 for m in batch]
                              for name in slots]
                sizes = [p.numel() * (2 if p.is_complex() else 1) for p, *_ in batch]
                states = [m[3] if keep else {} for m in batch]
                counters = _gather_counters(states, self.counters)
                if counters is None:
                    return None
                stored_as, storage_step = self._storage(
                    [(p, p.grad, s, self._indices.get(id(p), 0)) for (p, *_), s in zip(batch, states)],
                    slots)
                tables.append(_kernels._Table(dtype == torch.float64, indices, sizes, addresses,
                                              states, counters, self.planned_step(states[0]),
                                              [self.dense_rows(p) for p, *_ in batch],
                                              storage=stored_as, storage_step=storage_step))
                # autograd is told about the parameters (what a graph may have saved); the
                # state buffers are the optimizer's own
                written += [p for p, *_ in batch]
            groups.append((group, hp, key, group["params"], members, tables, keep))
        states_written = [t for _, _, _, state, *_ in (m for g in groups for m in g[4])
                          if state for t in state.values() if isinstance(t, torch.Tensor)]
        return _kernels.ObjectPlan(_kernels.RULES[self.kernel], self, groups,
                                   torch.autograd.graph.increment_version, written,
                                   [_span(t) for t in written + states_written], torch.Tensor,
                                   _STORAGE_KEY)

    def refreshed_hyperparameters(self, index, group, hp):
        """A planned group's values changed (an lr schedule): the new hyperparameters, checked
        as a first step checks them, or None if they change which state the kernels use."""
        new = self._hyperparameters(index, group)
        if self.keeps_state(new) != self.keeps_state(hp) or self.slots(new) != self.slots(hp):
            return None
        return new

    # ---- validation (changes nothing) -----------------------------------------------------

    def _hyperparameters(self, index, group):
        """The group's hyperparameters as plain floats and bools, after checking every one."""
        for flag in _UNSUPPORTED_FLAGS:
            if group.get(flag):
                raise ValueError(f"{type(self).__name__}: param group {index}: {flag}=True is not "
                                 "supported by fastopt.torch (CPU kernels outside autograd); use "
                                 "torch.optim for it")
        hp = {}
        for key, position, wording, test, rule in self.ranges:
            if position == 0:  # a pair (betas, etas, step_sizes): torch unpacks exactly two
                pair = group[key]
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(f"{type(self).__name__}: param group {index}: {key} must be "
                                     f"a pair (2 values), got {pair!r}")
            value = group[key] if position is None else group[key][position]
            if type(value) is not float or not test(value):  # the usual case costs one test
                value = self._number(index, key, position, wording, test, rule, value)
            if position is None:
                hp[key] = value
            elif position == 0:
                hp[key] = (value,)
            else:
                hp[key] += (value,)
        for flag in self.flags:
            hp[flag] = bool(group.get(flag, False))
        self._check_combination(index, hp)
        hp["fused"] = bool(group.get("fused"))
        return hp

    def _number(self, index, key, position, wording, test, rule, value):
        """A hyperparameter that is not a plain valid float: a 0-d tensor, an int, or an error."""
        where = f"{type(self).__name__}: param group {index}"
        field = f"group[{key!r}]" + ("" if position is None else f"[{position}]")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                name = key if position is None else f"{key}[{position}]"
                raise ValueError(f"{where}: Tensor {name} must be 1-element ({field} has "
                                 f"{value.numel()})")
            value = value.item()  # read once per step; the kernels take a double
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{where}: {field} must be a number, not {type(value).__name__}")
        value = float(value)
        if not test(value):
            raise ValueError(f"{where}: {wording}: {value} ({field} must be {rule})")
        return value

    def _check_combination(self, index, hp):
        pass

    def _parameter_indices(self):
        """{id(p): p's position among every group's parameters}, refusing a parameter listed
        twice: one C call would update both copies from the same state, racing across threads
        (torch.optim, after a warning, updates it twice in turn)."""
        indices, first_seen = {}, {}
        for index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                seen = first_seen.setdefault(id(p), (index, i))
                if seen != (index, i):
                    raise ValueError(
                        f"{self._where(index, group, i)} is also parameter {seen[1]} of param "
                        f"group {seen[0]}: a parameter appears more than once in "
                        f"param_groups; {type(self).__name__} updates each parameter once per "
                        "step and refuses a repeated one")
                indices[id(p)] = len(indices)
        return indices

    def _where(self, index, group, i):
        return f"{type(self).__name__}: param group {index}, {_param_name(group, i)}"

    def _state_pointers(self, index, i, group, p, local_p, state, slots):
        """Checks a parameter's existing state; returns the addresses of the buffers the kernel
        will write in place (a strided buffer is replaced by a fresh contiguous copy)."""
        dtype, sharded = p.dtype, local_p is not p
        pointers = []
        master = self.storage_options["master_weights"]
        for name in slots + (("master",) if master else ()):
            buffer = state.get(name) if name is not None else None
            shape = self.buffer_shape(p, name) if name != "master" else p.shape
            if buffer is None:
                continue  # created on this step
            if shape is None:
                raise ValueError(f"{self._where(index, group, i)}: state {name!r} does not apply "
                                 f"to a parameter of shape {tuple(p.shape)}")
            expected = _state_dtypes(p)
            if self.state.get(_STORAGE_KEY) is None or self.kernel in _PLAIN_STATE_KERNELS:
                # without storage options every buffer is the compute type (the kernels take
                # them so); a rule that needs compute-type storage has nothing else
                expected = expected[:1]
            if name == "master":
                expected = (torch.float32,)
            if not isinstance(buffer, torch.Tensor) or buffer.dtype not in expected \
                    or buffer.shape != shape or buffer.layout != torch.strided \
                    or not buffer.is_cpu or isinstance(buffer, DTensor) != sharded:
                like = (f"like its parameter ({_describe(p)})" if shape == p.shape else
                        f"of shape {tuple(shape)} (for its parameter, {_describe(p)})")
                raise ValueError(f"{self._where(index, group, i)}: state {name!r} is "
                                 f"{_describe(buffer)}; it must be a dense "
                                 f"{' or '.join(str(d) for d in expected)} tensor {like}")
            local = buffer if shape != p.shape else _local_like(  # (own shapes: no DTensors)
                buffer, local_p, ValueError, f"{self._where(index, group, i)}: state {name!r} is")
            if local.is_contiguous():
                pointers.append(local.data_ptr())
        for name in self.counters:
            counter = state.get(name)
            if counter is not None and (not isinstance(counter, torch.Tensor)
                                        or counter.numel() != 1):
                raise ValueError(f"{self._where(index, group, i)}: state {name!r} must be a "
                                 f"1-element tensor, not {_describe(counter)}")
        return pointers

    def _prepare_group(self, index, group):
        """Checks one group for this step and returns (hyperparameters, members), members being
        (param, the tensor the kernel updates, its contiguous grad, existing state or None) for
        every param with a gradient."""
        hp = self._hyperparameters(index, group)
        slots = self.slots(hp)
        keep = self.keeps_state(hp)
        entry = self.state.get(_STORAGE_KEY)
        if entry is not None and entry["master_weights"] and not keep:
            raise ValueError(f"{type(self).__name__}: param group {index}: master_weights=True "
                             "needs per-parameter state to keep the float32 copies in, and these "
                             "hyperparameters keep none (SGD without momentum)")
        strided = torch.strided
        members = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            sharded = isinstance(p, DTensor)
            local_p = p.to_local() if sharded else p
            dtype = p.dtype
            # a parameter's data can be replaced after construction (p.data = ...)
            if dtype not in _KERNEL_DTYPES or p.layout != strided or not p.is_cpu \
                    or not local_p.is_contiguous():
                _check_param(p, self._where(index, group, i))
            if self.kernel in _STATE_SHAPES and p.is_complex():  # torch's error, at the step
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            if (dtype == torch.bfloat16 and entry is None) or (
                    self.kernel in _PER_ROW_KERNELS and p.is_complex()) or (
                    entry is not None and entry["master_weights"] and dtype != torch.bfloat16):
                # p.data replaced after construction by a tensor its storage options (made for
                # its first dtype) or its rule cannot take
                raise TypeError(f"{self._where(index, group, i)} is now {dtype}; "
                                f"{type(self).__name__} was made for its earlier dtype (make the "
                                "optimizer after changing the parameter's dtype)")
            sparse = g.layout == torch.sparse_coo and not sharded and not p.is_complex()
            if g.layout != strided and (not sparse or self.sparse_grads(hp) is None):
                raise TypeError(f"{self._where(index, group, i)}: {type(self).__name__} does "
                                f"not support sparse gradients ({g.layout})")
            if not sparse:
                self.check_dense_grad()
            if (g.dtype != dtype and not (dtype == torch.float32 and g.dtype == torch.bfloat16)) \
                    or g.shape != p.shape or not g.is_cpu \
                    or isinstance(g, DTensor) != sharded:
                raise TypeError(f"{self._where(index, group, i)}: its gradient is "
                                f"{_describe(g)}; the parameter is {_describe(p)}")
            if g.is_conj() or g.is_neg():  # (its memory holds other values than it shows)
                raise ValueError(f"{self._where(index, group, i)}: its gradient is a lazily "
                                 "conjugated or negated view; resolve it first "
                                 "(g.resolve_conj(), g.resolve_neg())")
            if self.per_row and g.dtype == torch.bfloat16:
                _check_staged_rows(p, self._where(index, group, i))
            if sparse:
                self.check_sparse_grad(hp)
                if self.per_row and g.sparse_dim() != 1:
                    raise TypeError(f"{self._where(index, group, i)}: its sparse gradient has "
                                    f"{g.sparse_dim()} sparse dimensions; {type(self).__name__}'s "
                                    "rows are along dim 0 (one sparse dimension: "
                                    "grad.to_sparse(1), as nn.Embedding(sparse=True) gives)")
                _check_sparse_indices(g, self._where(index, group, i))
                local_g = _Rows.of(g) if self.sparse_grads(hp) == "rows" else g.to_dense()
            else:
                local_g = _local_like(g, local_p, TypeError,
                                      f"{self._where(index, group, i)}: its gradient is")
            if not isinstance(local_g, _Rows) and not local_g.is_contiguous():
                local_g = local_g.contiguous()
            state = self.state.get(p) if keep else None  # .get: state is a defaultdict
            pointers = [local_p.data_ptr()]
            if not isinstance(local_g, _Rows):  # rows: the C layer checks their overlaps
                pointers.append(local_g.data_ptr())
            if state:
                pointers += self._state_pointers(index, i, group, p, local_p, state, slots)
            # every buffer the kernel touches spans the same nbytes from its address: two
            # overlap exactly when their addresses are closer than that
            nbytes = local_p.nbytes
            if nbytes and ((state and (self.state.get(_STORAGE_KEY) is not None
                                       or self.kernel in _SHAPED_STATE_KERNELS))
                           or (not isinstance(local_g, _Rows) and local_g.dtype != local_p.dtype)):
                # storage of several sizes (a bfloat16 gradient of a float32 parameter), or
                # state of its own shapes: compare spans
                spans = sorted(_spans_of(local_p, local_g, state or {}, slots))
                shared = any(b0 < a1 for (a0, a1), (b0, b1) in zip(spans, spans[1:]))
            else:
                pointers.sort()
                shared = any(b - a < nbytes for a, b in zip(pointers, pointers[1:]))
            if not shared and nbytes and isinstance(local_g, _Rows):
                # the rows' values and indices are read while the others are written (a
                # sparse tensor may be built on a view of the parameter)
                written = _spans_of(local_p, local_g, state or {}, slots)
                read = _read_spans(local_g)
                shared = any(r0 < w1 and w0 < r1 for r0, r1 in read for w0, w1 in written)
            if shared:
                raise ValueError(f"{self._where(index, group, i)}: its gradient or a state "
                                 "buffer shares memory with the parameter or another buffer")
            members.append((p, local_p, local_g, state))
        return hp, members

    # ---- the update ------------------------------------------------------------------------

    counters = ("step",)
    # a row rule (RowwiseAdagrad): its state buffers hold one value per row, shape p.shape[:1]
    per_row = False

    def slots(self, hp):
        raise NotImplementedError

    def dense_rows(self, p):
        """How the kernels take p with a dense gradient: None, or for a row rule its rows
        (fastopt.h: no indices, p's row length), for a factored rule its matrices (its last
        two dimensions, none for ndim <= 1)."""
        if self.kernel in _STATE_SHAPES:
            return (0, True, 0, p.shape[-1], p.shape[-2]) if p.dim() >= 2 else None
        return (0, True, 0, _row_len(p)) if self.per_row else None

    def buffer_shape(self, p, name):
        """State buffer `name`'s shape for p: p's, one value per row (a row rule's), or the
        rule's own (the registry's state_shapes); None where the buffer is not p's."""
        shapes = _STATE_SHAPES.get(self.kernel)
        if shapes and name in shapes:
            return shapes[name](tuple(p.shape))
        return p.shape[:1] if self.per_row else p.shape

    def sparse_grads(self, hp):
        """How a sparse COO gradient is taken: None (refused, as torch refuses it), "rows"
        (only the touched rows and their state are updated, fastopt's row batch), or "dense"
        (torch's result is the dense update: the gradient is made dense)."""
        return None

    def check_sparse_grad(self, hp):
        """Raise torch's error where torch refuses a sparse gradient with these options."""

    def check_dense_grad(self):
        """Raise torch's error where torch refuses a dense gradient (SparseAdam)."""

    def keeps_state(self, hp):
        return True

    def new_state(self, p, hp):
        return {"step": _step_tensor(hp)}

    def advance(self, states, hp):
        """Move the states' counters to this step; returns each one's step number t (from 1)."""
        counters = [s["step"] for s in states]
        if not counters:
            return []
        torch._foreach_add_(counters, 1.0)
        try:
            values = torch.stack(counters).reshape(-1).tolist()
        except RuntimeError:  # 0-d and 1-element counters mixed (old checkpoints)
            values = [c.item() for c in counters]
        return [int(t) for t in values]

    def batch_extra(self, state):
        return None

    # the engine's plan advances a whole batch at once: its states share one step number
    def planned_step(self, state):
        """The step number the next step of this (already stepped) state will be."""
        return int(state["step"]) + 1

    def advance_planned(self, hp, states, counters, step):
        """advance() for a batch whose states are all at step - 1 (the plan knows); counters
        are the batch's counters gathered into one numpy view each (_gather_counters), in the
        order of self.counters.  Returns step."""
        counters[0] += 1.0
        return step

    def planned_step_after(self, hp, step):
        return step + 1

    def kernel_args(self, hp, step, state):
        raise NotImplementedError

    def _step_group(self, hp, members, multiplier=1.0):
        """Creates missing state, advances the counters and updates one validated group."""
        slots = self.slots(hp)
        keep = self.keeps_state(hp)
        states = []
        for p, _, _, state in members:
            if state is None:
                state = self.state[p] if keep else {}
            if not state:
                fresh = self.new_state(p, hp)
                dtype = _new_state_dtype(p, self.storage_options)
                for name in slots:  # a buffer new_state fills (Adagrad's sum), stored as asked
                    if name is not None and name in fresh and fresh[name].dtype != dtype:
                        fresh[name] = fresh[name].to(dtype)
                state.update(fresh)
            states.append(state)
        steps = self.advance(states, hp)  # before the buffers appear: SGD reads their absence
        options = self.storage_options
        for (p, _, _, _), state in zip(members, states):
            dtype = _new_state_dtype(p, options)
            for name in slots:  # options switched on later, or a checkpoint's strided buffers
                if name is not None:
                    if state.get(name) is None:
                        shape = self.buffer_shape(p, name)
                        if shape is not None:
                            state[name] = _zeros(p, dtype, shape)
                    elif not _local(state[name]).is_contiguous():
                        state[name] = state[name].contiguous()
            if options["master_weights"] and state.get("master") is None:
                state["master"] = p.detach().to(torch.float32, copy=True)
        batches = {}
        indices = getattr(self, "_indices", {})
        for (p, local_p, local_g, _), state, t in zip(members, states, steps):
            stored = tuple(getattr(state.get(n), "dtype", None) for n in slots if n is not None)
            grad_dtype = (local_g.values if isinstance(local_g, _Rows) else local_g).dtype
            key = (_KERNEL_DTYPES[p.dtype], grad_dtype, stored, t, self.batch_extra(state))
            batches.setdefault(key, []).append((local_p, local_g, state, indices.get(id(p), 0)))
        for (dtype, _, _, t, _), batch in batches.items():
            self._run_kernel(dtype, t, slots, batch, self.kernel_args(hp, t, batch[0][2]),
                             multiplier)

    def _storage(self, batch, slots):
        """(the kernels' Storage for a batch of (param, grad, state, parameter index) of one
        kernel dtype and storage, the step keying its stochastic rounding), or (None, 0) when
        every buffer is in the compute type and no storage options are set."""
        p0, g0, s0, _ = batch[0]
        g0 = g0.values if isinstance(g0, _Rows) else g0
        entry = self.state.get(_STORAGE_KEY)
        if entry is None and _KERNEL_DTYPES[g0.dtype] == _KERNEL_DTYPES[p0.dtype]:
            return None, 0
        if entry is None:
            # a bfloat16 gradient of a float32 parameter (torch's p.grad_dtype = None) without
            # storage options: the kernels read it as stored and write nothing in bfloat16, so
            # the default rounding and seed are never used
            entry = dict(storage.DEFAULTS, step=0)
        # (complex tensors go in as their real parts' dtype)
        dtypes = [_FO_DTYPE[_KERNEL_DTYPES[t.dtype]] for t in (p0, g0)]
        dtypes += [None if name is None or s0.get(name) is None
                   else _FO_DTYPE[_KERNEL_DTYPES[s0[name].dtype]] for name in slots]
        masters = None
        if entry["master_weights"]:
            masters = [_local(s["master"]).data_ptr() for _, _, s, _ in batch]
        indices = [index for *_, index in batch]
        return (_kernels.Storage(dtypes, indices, entry["rounding"] == "nearest", entry["seed"],
                                 masters), entry["step"])

    def _run_kernel(self, dtype, step, slots, batch, kernel_args, multiplier=1.0):
        """One C call over a batch of (param, grad, state) of one real dtype and step number,
        all validated, param and grad local (a DTensor's shard); complex tensors go in as their
        real and imaginary parts."""
        buffers = [None if name is None else [s.get(name) for _, _, s, _ in batch]
                   for name in slots]  # (a buffer not some parameter's: None, its address 0)
        addresses = [[p.data_ptr() for p, *_ in batch],
                     [(g.values if isinstance(g, _Rows) else g).data_ptr() for _, g, *_ in batch]]
        addresses += [None if b is None else [0 if t is None else _local(t).data_ptr() for t in b]
                      for b in buffers]
        sizes = [p.numel() * (2 if p.is_complex() else 1) for p, *_ in batch]
        rows = [g.address() if isinstance(g, _Rows) else self.dense_rows(p) for p, g, *_ in batch]
        stored_as, step_key = self._storage(batch, slots)
        _kernels.run_addresses(_kernels.RULES[self.kernel], dtype == torch.float64, addresses,
                               sizes, kernel_args, rows, multiplier, stored_as, step_key)
        # the kernels write memory directly: tell autograd about the parameters, as an in-place
        # op would (what a graph may have saved; the state buffers are the optimizer's own)
        torch.autograd.graph.increment_version([p for p, *_ in batch])


class _Rows:
    """A sparse COO gradient as the kernels take it (fastopt.h, "Sparse rows"): the parameter
    as rows along its sparse dimensions, 1-D int64 row indices and their values, contiguous.
    Zero copy for what nn.Embedding(sparse=True) / EmbeddingBag produce (one sparse
    dimension, contiguous indices and values); duplicates are summed by the kernels."""
    __slots__ = ("indices", "values", "row_len")

    def __init__(self, indices, values, row_len):
        self.indices, self.values, self.row_len = indices, values, row_len

    @classmethod
    def of(cls, g):
        indices, values = g._indices(), g._values()
        sparse_dims = indices.shape[0]
        if sparse_dims == 1:
            rows = indices[0]
        else:  # several sparse dimensions: rows numbered in C order over them
            rows = torch.zeros(indices.shape[1], dtype=torch.int64)
            for d in range(sparse_dims):
                rows.mul_(g.shape[d]).add_(indices[d])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if not values.is_contiguous():
            values = values.contiguous()
        row_len = math.prod(g.shape[sparse_dims:])
        return cls(rows, values, row_len)

    def address(self):
        # no rows: a real address all the same (NULL indices would mean a dense gradient)
        indices = self.indices if self.indices.numel() else _NO_ROWS
        return (indices.data_ptr(), True, self.indices.numel(), self.row_len)


_NO_ROWS = torch.zeros(1, dtype=torch.int64)


def _storage_entry_options(entry, whose):
    """The storage options a storage entry holds, checked (storage.check_options, normalized);
    whose: the error's words for where the entry is."""
    if not isinstance(entry, dict) or set(entry) != set(storage.DEFAULTS) | {"step"}:
        raise ValueError(f"{whose} {_STORAGE_KEY!r} entry must hold {sorted(storage.DEFAULTS)} "
                         "and 'step'")
    return storage.check_options(**{k: entry[k] for k in storage.DEFAULTS})


def _check_storage_entry(entry):
    """The storage entry of an optimizer's state exactly as _storage_entry_options normalizes
    it, its step an int in [0, 2**64 - 1): an entry edited in place is refused before a step
    changes anything."""
    options = _storage_entry_options(entry, "the optimizer state's")
    if options != {k: entry[k] for k in storage.DEFAULTS} or type(options["master_weights"]) \
            is not type(entry["master_weights"]):
        raise ValueError(f"state[{_STORAGE_KEY!r}] holds {entry!r}; its options must be "
                         f"{options!r}")
    step = entry["step"]
    if type(step) is not int or not 0 <= step < 2 ** 64 - 1:
        raise ValueError(f"state[{_STORAGE_KEY!r}]['step'] must be an int in [0, 2**64 - 1), "
                         f"got {step!r}")


def _check_sparse_indices(g, where):
    """Every index of a sparse COO gradient within its dimension (torch builds one without
    checking; the kernels would refuse an out-of-range row only after earlier groups and the
    step counters moved, and see only the flat row that several sparse dimensions make)."""
    indices = g._indices()
    if not indices.numel():
        return
    lows, highs = torch.aminmax(indices, dim=1)
    for dim, (low, high, size) in enumerate(zip(lows.tolist(), highs.tolist(), g.shape)):
        if low < 0 or high >= size:
            raise ValueError(f"{where}: its sparse gradient has index {low if low < 0 else high}, "
                             f"out of bounds for dimension {dim} with size {size}")


def _gather_counters(states, names):
    """[one array per counter name]: the batch's counters (torch's 0-d step tensors, NAdam's
    mu_product) made views of one tensor each, so that a planned step advances a whole batch
    with one op (a foreach op over 0-d CPU tensors costs ~1.5 us per tensor), given as numpy
    views of that memory (a numpy op on them costs a third of a torch op).  None if they
    cannot be (missing in some states, not 1-element tensors, mixed dtypes)."""
    gathered = []
    for name in names:
        values = [s.get(name) for s in states]
        if all(v is None for v in values):
            continue
        if any(not isinstance(v, torch.Tensor) or v.numel() != 1 or v.dtype != values[0].dtype
               or v.device.type != "cpu" for v in values):
            return None
        flat = torch.stack([v.reshape(()) for v in values])
        for i, state in enumerate(states):
            state[name] = flat[i]
        gathered.append(flat.numpy())
    return gathered


def _span(t):
    """The bytes a dense tensor occupies: [start, end)."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _group_key(group):
    """A group's values, to tell cheaply that none changed (the engine's _same_values): (name,
    value, its items if a list, which can change in place); None if one is a tensor or holds
    one (betas=(torch.tensor(0.9), ...)), whose value can change in place."""
    key = []
    for k, v in group.items():
        if k != "params":
            if isinstance(v, torch.Tensor) or (
                    isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)):
                return None
            key.append((k, v, tuple(v) if type(v) is list else None))
    return tuple(key)


def _param_name(group, i):
    names = group.get("param_names")
    return f"parameter {i}" + (f" ({names[i]!r})" if names and i < len(names) else "")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a {x.layout} {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def _copy_tensors(value):
    """A copy of a state dict whose tensors are copies: a snapshot later steps do not change."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tensors(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copy_tensors(v) for v in value)
    return value


def _keep_stored_dtypes(opt, state_dict):
    """torch's load_state_dict casts every floating state tensor to its parameter's dtype;
    bfloat16 parameters keep float32 state and master weights, float32 ones bfloat16 state:
    put back the checkpoint's dtypes (copies, on the parameter's device)."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in zip(ids, params):
        saved, state = state_dict["state"].get(i), opt.state.get(p)
        if not saved or not state:
            continue
        for name, value in saved.items():
            if name != "step" and isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and value.dtype in (torch.float32, torch.bfloat16) \
                    and isinstance(state.get(name), torch.Tensor) and state[name].dtype != value.dtype:
                state[name] = value.to(device=p.device, copy=True)


def _densify_sparse_buffers(state, slots):
    """torch.optim.SGD keeps a sparse COO momentum buffer for sparse gradients, one that
    moves every row it ever touched: its dense equal, which the kernels take, continues it
    with torch's numbers (fastopt's own buffer for sparse gradients is dense too)."""
    for name in slots:
        buffer = state.get(name) if name is not None else None
        if isinstance(buffer, torch.Tensor) and buffer.layout == torch.sparse_coo:
            state[name] = buffer.to_dense()


def _zeros(p, dtype=None, shape=None):
    """A state buffer of p: p's shape, or `shape` (a rule's own: _Fastopt.buffer_shape)."""
    if shape is not None and shape != p.shape:
        return torch.zeros(shape, dtype=p.dtype if dtype is None else dtype)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _check_staged_rows(p, where):
    """A row rule's bfloat16 rows are staged whole: at most _kernels.ROW_STAGING elements."""
    if _row_len(p) > _kernels.ROW_STAGING:
        raise ValueError(f"{where}: with bfloat16 storage a row (along dim 0) holds at most "
                         f"{_kernels.ROW_STAGING} elements; this parameter's hold {_row_len(p)}")


def _row_len(p):
    """Elements per row of p viewed as rows along dim 0 (a 0-d tensor: one row of one)."""
    return p.numel() // p.shape[0] if p.dim() and p.shape[0] and p.numel() else 1


def _state_dtypes(p):
    """The dtypes a state buffer of p may have: p's (float64 for float64, float32 for float32
    and bfloat16 parameters) or bfloat16; complex parameters keep their own."""
    if p.is_complex():
        return (p.dtype,)
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    return (compute, torch.bfloat16)


def _new_state_dtype(p, options):
    if p.is_complex():
        return p.dtype
    if options["state_dtype"] == "bfloat16":
        return torch.bfloat16
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _check_storage(p, options, where, kernel=None):
    """Refuse a parameter that the storage options do not fit."""
    if kernel in _PLAIN_STATE_KERNELS and options["state_dtype"] == "bfloat16":
        raise ValueError(f"{where}: {_PLAIN_STATE_KERNELS[kernel]} need float32/float64 state, "
                         "not bfloat16")
    if kernel in _PER_ROW_KERNELS and p.is_complex():
        raise TypeError(f"{where} is complex; a row's mean of g^2 is for real parameters")
    if kernel in _PER_ROW_KERNELS and p.dtype == torch.bfloat16:
        _check_staged_rows(p, where)
    if options["master_weights"] and p.dtype != torch.bfloat16:
        raise ValueError(f"{where}: master_weights=True is for bfloat16 parameters, not {p.dtype}")
    if options["state_dtype"] == "float32" and p.dtype in (torch.float64, torch.complex128):
        raise ValueError(f"{where}: state_dtype='float32' is for float32 and bfloat16 parameters, "
                         f"not {p.dtype}")
    if options["state_dtype"] == "bfloat16" and p.is_complex():
        raise ValueError(f"{where}: state_dtype='bfloat16' is for real parameters, not {p.dtype}")


def _spans_of(local_p, local_g, state, slots):
    """The byte spans of a parameter's buffers: its gradient's (dense: rows are checked in C)
    and what its step writes."""
    grad = [] if isinstance(local_g, _Rows) else _read_spans(local_g)
    return grad + _written_spans(local_p, state, slots)


def _written_spans(local_p, state, slots):
    """The byte spans a parameter's step writes: the parameter and its state buffers."""
    out = [_span(local_p)]
    for name in tuple(slots) + ("master",):
        t = state.get(name) if name is not None else None
        if isinstance(t, torch.Tensor) and t.nbytes:
            out.append(_span(_local(t)))
    return [s for s in out if s[1] > s[0]]


def _read_spans(local_g):
    """The byte spans a parameter's step reads of its gradient (a row gradient's values and
    indices)."""
    tensors = (local_g.values, local_g.indices) if isinstance(local_g, _Rows) else (local_g,)
    return [_span(t) for t in tensors if t.numel()]


def _step_tensor(hp):
    """torch's step counter: a 0-d tensor, float32 for fused groups, else of the default float
    dtype (float32 unless float64)."""
    return torch.tensor(0.0, dtype=_get_scalar_dtype(is_fused=hp["fused"]))


def _common(hp):
    return dict(lr=hp["lr"], weight_decay=hp["weight_decay"], maximize=hp["maximize"])


class SGD(_Fastopt, torch.optim.SGD):
    kernel = "sgd"
    ranges = (_LR, _WEIGHT_DECAY, _MOMENTUM,
              ("dampening", None, "Invalid dampening value", *_CLOSED))
    flags = ("maximize", "nesterov")
    counters = ()

    def _check_combination(self, index, hp):
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError(f"{type(self).__name__}: param group {index}: Nesterov momentum "
                             "requires a momentum and zero dampening (momentum="
                             f"{hp['momentum']}, dampening={hp['dampening']})")

    def slots(self, hp):
        return ("momentum_buffer",) if hp["momentum"] != 0 else (None,)

    def sparse_grads(self, hp):
        # torch's momentum buffer of a sparse gradient moves every row it ever touched: the
        # dense update (kept in a dense buffer); plain SGD updates the touched rows only
        return "dense" if hp["momentum"] != 0 else "rows"

    def check_sparse_grad(self, hp):
        if hp["weight_decay"] != 0:
            raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) "
                               "instead.")  # torch's own error for weight decay

    def keeps_state(self, hp):
        return hp["momentum"] != 0  # as torch: plain SGD stores nothing

    def new_state(self, p, hp):
        return {}  # as torch: no step; the buffer appears on the first step with momentum

    def advance(self, states, hp):
        # step 1 (no buffer yet): torch seeds the buffer with g, dampening unused
        return [1 if s.get("momentum_buffer") is None else 2 for s in states]

    def planned_step(self, state):
        return 1 if state.get("momentum_buffer") is None else 2

    def advance_planned(self, hp, states, counters, step):
        return step  # no counters: 1 without a buffer (plain SGD), 2 once it exists

    def planned_step_after(self, hp, step):
        return 2 if self.keeps_state(hp) else 1

    def kernel_args(self, hp, step, state):
        return dict(_common(hp), momentum=hp["momentum"], dampening=hp["dampening"],
                    nesterov=hp["nesterov"], convention=TORCH, step=step)


class Adagrad(_Fastopt, torch.optim.Adagrad):
    kernel = "adagrad"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, ("lr_decay", None, "Invalid lr_decay value", *_NONNEG),
              ("initial_accumulator_value", None, "Invalid initial_accumulator_value value", *_NONNEG))

    def slots(self, hp):
        return ("sum",)

    def sparse_grads(self, hp):
        return "rows"

    def check_sparse_grad(self, hp):
        if hp["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def new_state(self, p, hp):
        # as torch: the constructor's value, not the group's (torch never reads the group's)
        value = float(self.defaults["initial_accumulator_value"])
        return {"step": _step_tensor(hp),
                "sum": torch.full_like(p, complex(value, value) if p.is_complex() else value,
                                       memory_format=torch.preserve_format)}

    def kernel_args(self, hp, step, state):
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        return dict(_common(hp), lr=clr, eps=hp["eps"], convention=TORCH)


class Adadelta(_Fastopt, torch.optim.Adadelta):
    kernel = "adadelta"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, ("rho", None, "Invalid rho value", *_HALF_OPEN))

    def slots(self, hp):
        return ("square_avg", "acc_delta")

    def kernel_args(self, hp, step, state):
        return dict(_common(hp), rho=hp["rho"], eps=hp["eps"])


class RMSprop(_Fastopt, torch.optim.RMSprop):
    kernel = "rmsprop"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, _MOMENTUM, ("alpha", None, "Invalid alpha value", *_HALF_OPEN))
    flags = ("maximize", "centered")

    def slots(self, hp):
        return ("square_avg", "grad_avg" if hp["centered"] else None,
                "momentum_buffer" if hp["momentum"] > 0 else None)

    def kernel_args(self, hp, step, state):
        return dict(_common(hp), rho=hp["alpha"], eps=hp["eps"], momentum=hp["momentum"],
                    centered=hp["centered"], convention=TORCH)


class Adam(_Fastopt, torch.optim.Adam):
    kernel = "adam"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, *_BETAS)
    flags = ("maximize", "amsgrad", "decoupled_weight_decay")

    def slots(self, hp):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if hp["amsgrad"] else None)

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2, eps=hp["eps"], amsgrad=hp["amsgrad"],
                    decoupled_weight_decay=hp["decoupled_weight_decay"], convention=TORCH,
                    step=step)


class AdamW(Adam, torch.optim.AdamW):
    pass


class Adamax(_Fastopt, torch.optim.Adamax):
    kernel = "adamax"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, *_BETAS)

    def slots(self, hp):
        return ("exp_avg", "exp_inf")

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2, eps=hp["eps"], convention=TORCH,
                    step=step)


class SparseAdam(_Fastopt, torch.optim.SparseAdam):
    # Adam on the rows a sparse gradient touches (torch's masked Adam): only those rows of the
    # parameter and of exp_avg / exp_avg_sq change; the step count is the parameter's and
    # advances at every step with a gradient.  torch's update is
    # p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps): Adam's kernel with
    # eps / sqrt(1 - b2^t) in place of eps.
    kernel = "adam"
    ranges = (_LR, _EPS, *_BETAS)
    counters = ()  # torch keeps SparseAdam's step as a Python int

    def slots(self, hp):
        return ("exp_avg", "exp_avg_sq", None)

    def sparse_grads(self, hp):
        return "rows"

    def check_dense_grad(self):
        raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam "
                           "instead")

    def new_state(self, p, hp):
        return {"step": 0}

    def advance(self, states, hp):
        for s in states:
            s["step"] += 1
        return [s["step"] for s in states]

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(lr=hp["lr"], weight_decay=0.0, maximize=hp["maximize"], beta1=beta1,
                    beta2=beta2, eps=hp["eps"] / math.sqrt(1.0 - beta2 ** step), amsgrad=False,
                    decoupled_weight_decay=False, convention=TORCH, step=step)


def _nadam_mu(hp, t):
    """mu_t = beta1 (1 - 0.5 * 0.96^(t psi)); torch keeps the running product as a tensor."""
    return hp["betas"][0] * (1.0 - 0.5 * 0.96 ** (t * hp["momentum_decay"]))


class NAdam(_Fastopt, torch.optim.NAdam):
    kernel = "nadam"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, *_BETAS,
              ("momentum_decay", None, "Invalid momentum_decay value", *_NONNEG))
    flags = ("maximize", "decoupled_weight_decay")
    counters = ("step", "mu_product")

    def slots(self, hp):
        return ("exp_avg", "exp_avg_sq")

    def new_state(self, p, hp):
        return {"step": _step_tensor(hp), "mu_product": torch.ones((), dtype=_get_scalar_dtype())}

    def advance(self, states, hp):
        steps = super().advance(states, hp)
        by_step = {}
        for s, t in zip(states, steps):
            by_step.setdefault(t, []).append(s["mu_product"])
        for t, products in by_step.items():
            torch._foreach_mul_(products, _nadam_mu(hp, t))
        return steps

    def advance_planned(self, hp, states, counters, step):
        counters[0] += 1.0
        counters[1] *= _nadam_mu(hp, step)
        return step

    def batch_extra(self, state):
        return float(state["mu_product"])

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2, eps=hp["eps"],
                    momentum_decay=hp["momentum_decay"], mu_product=float(state["mu_product"]),
                    decoupled_weight_decay=hp["decoupled_weight_decay"], convention=TORCH,
                    step=step)


class RAdam(_Fastopt, torch.optim.RAdam):
    kernel = "radam"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, *_BETAS)
    flags = ("maximize", "decoupled_weight_decay")

    def slots(self, hp):
        return ("exp_avg", "exp_avg_sq")

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2, eps=hp["eps"],
                    decoupled_weight_decay=hp["decoupled_weight_decay"], step=step)


def _open_unit(x):
    return 0.0 < x < 1.0


def _above_one(x):
    return 1.0 < x < math.inf


class Rprop(_Fastopt, torch.optim.Rprop):
    kernel = "rprop"
    ranges = (_LR, ("etas", 0, "Invalid eta values", _open_unit, "in (0, 1)"),
              ("etas", 1, "Invalid eta values", _above_one, "finite and > 1"),
              ("step_sizes", 0, "Invalid step_sizes value", *_NONNEG),
              ("step_sizes", 1, "Invalid step_sizes value", *_NONNEG))

    def _check_combination(self, index, hp):
        low, high = hp["step_sizes"]
        if low > high:
            raise ValueError(f"{type(self).__name__}: param group {index}: Invalid step_sizes "
                             f"value: ({low}, {high}) (the minimum is above the maximum)")

    def slots(self, hp):
        return ("prev", "step_size")

    def new_state(self, p, hp):
        # as torch: every element's step size starts at the group's lr (read only here)
        lr = hp["lr"]
        return {"step": _step_tensor(hp), "prev": _zeros(p),
                "step_size": torch.full_like(p, complex(lr, lr) if p.is_complex() else lr,
                                             memory_format=torch.preserve_format)}

    def kernel_args(self, hp, step, state):
        (eta_minus, eta_plus), (low, high) = hp["etas"], hp["step_sizes"]
        return dict(lr=hp["lr"], eta_minus=eta_minus, eta_plus=eta_plus, step_size_min=low,
                    step_size_max=high, maximize=hp["maximize"])


def _asgd_next(hp, t):
    """torch's eta and mu for the step after step t (computed with this step's lr), rounded as
    torch rounds them: it makes each a tensor of the default dtype (torch.as_tensor of a
    Python float) before copying it into the state, which is float64 after a load_state_dict
    onto float64 parameters."""
    lr = hp["lr"]
    values = lr / ((1 + hp["lambd"] * lr * t) ** hp["alpha"]), 1 / max(1, t - hp["t0"])
    code = _ARRAY_CODES.get(torch.get_default_dtype())
    return array.array(code, values).tolist() if code else torch.tensor(values).tolist()


# array.array rounds to float32 as torch.tensor does (to nearest, inf past the range), 10x faster
_ARRAY_CODES = {torch.float32: "f", torch.float64: "d"}


class ASGD(_Fastopt, torch.optim.ASGD):
    """A step runs with the eta and mu that torch keeps in the state (computed by the step
    before, with its lr, in the state's dtype), then stores the next ones, as torch does; the
    kernel's "step" handed around below is (t, eta, mu)."""

    kernel = "asgd"
    ranges = (_LR, _WEIGHT_DECAY, ("lambd", None, "Invalid lambd value", *_NONNEG),
              ("alpha", None, "Invalid alpha value", lambda x: math.isfinite(x), "finite"),
              ("t0", None, "Invalid t0 value", lambda x: math.isfinite(x), "finite"))
    counters = ("step", "eta", "mu")

    def slots(self, hp):
        return ("ax",)

    def new_state(self, p, hp):
        dtype = _get_scalar_dtype()
        return {"step": torch.zeros((), dtype=dtype), "eta": torch.tensor(hp["lr"], dtype=dtype),
                "mu": torch.ones((), dtype=dtype)}

    def advance(self, states, hp):
        steps = super().advance(states, hp)
        now = []
        for state, t in zip(states, steps):
            now.append((t, state["eta"].item(), state["mu"].item()))
            eta, mu = _asgd_next(hp, t)
            state["eta"].fill_(eta)
            state["mu"].fill_(mu)
        return now

    def batch_extra(self, state):
        return float(state["eta"]), float(state["mu"])

    def advance_planned(self, hp, states, counters, step):
        # a table's states share eta and mu (batch_extra keyed it; each step sets them alike)
        now = (step, counters[1][0].item(), counters[2][0].item())
        eta, mu = _asgd_next(hp, step)
        counters[0] += 1.0
        counters[1].fill(eta)  # rounded to the state's dtype, as torch's copy_ does
        counters[2].fill(mu)
        return now

    def planned_step_after(self, hp, step):
        return step[0] + 1

    def kernel_args(self, hp, step, state):
        t, eta, mu = step
        return dict(_common(hp), lambd=hp["lambd"], alpha=hp["alpha"], t0=hp["t0"], eta=eta,
                    mu=mu, convention=TORCH, step=t)


def _constructor_checks(lr, betas=None, eps=None, weight_decay=None, momentum=None):
    """torch.optim's constructor checks, in its wording, for the classes torch does not have."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if momentum is not None and not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if betas is not None:
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if weight_decay is not None and not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Lion(_Fastopt, torch.optim.Optimizer):
    """Lion (Chen et al. 2023): c = b1 m + (1 - b1) g;  p <- p - lr (sign(c) + weight_decay p);
    m <- b2 m + (1 - b2) g  (sign(0) = 0; decoupled decay; g = -grad when maximize).  State per
    parameter: "step" and "exp_avg" (m), torch.optim's layout.  torch has no Lion: this is a
    torch.optim.Optimizer with torch's conventions (param groups, add_param_group, zero_grad,
    step(closure), state_dict, lr schedulers), its step in fastopt's kernel."""

    kernel = "lion"
    ranges = (_LR, _WEIGHT_DECAY, *_BETAS)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, foreach=None, differentiable=False, state_dtype=None,
                 rounding="stochastic", seed=0, master_weights=False):
        _constructor_checks(lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable),
                         state_dtype=state_dtype, rounding=rounding, seed=seed,
                         master_weights=master_weights)

    def slots(self, hp):
        return ("exp_avg",)

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2)


class _WholeTensors:
    """Per-tensor norms (LAMB, LARS) need whole tensors: a DTensor's shard would give the
    shard's norm, so sharded parameters are refused (and a row rule's per-row state, which is
    not sharded with its parameter yet)."""
    needs = "its per-tensor norms need whole tensors"

    def add_param_group(self, param_group):
        with self._lock:
            index = len(self.param_groups)
            super().add_param_group(param_group)
            if any(isinstance(p, DTensor) for p in self.param_groups[index]["params"]):
                del self.param_groups[index:]
                raise ValueError(f"{type(self).__name__}: param group {index} has DTensor "
                                 f"(sharded) parameters; {self.needs}")


class LAMB(_WholeTensors, _Fastopt, torch.optim.Optimizer):
    """LAMB (You et al. 2020), per tensor: m, v, m_hat, v_hat as Adam;
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay p;  p <- p - lr (||p|| / ||r||) r (the ratio
    1 when either norm is 0); g = -grad when maximize.  State: "step", "exp_avg",
    "exp_avg_sq".  A torch.optim.Optimizer with torch's conventions, its step in fastopt's
    kernel (a per-tensor pass for the norms, in double and a fixed order, then the update)."""

    kernel = "lamb"
    ranges = (_LR, _WEIGHT_DECAY, _EPS, *_BETAS)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 maximize=False, foreach=None, differentiable=False, state_dtype=None,
                 rounding="stochastic", seed=0, master_weights=False):
        _constructor_checks(lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable),
                         state_dtype=state_dtype, rounding=rounding, seed=seed,
                         master_weights=master_weights)

    def slots(self, hp):
        return ("exp_avg", "exp_avg_sq")

    def kernel_args(self, hp, step, state):
        beta1, beta2 = hp["betas"]
        return dict(_common(hp), beta1=beta1, beta2=beta2, eps=hp["eps"], step=step)


class LARS(_WholeTensors, _Fastopt, torch.optim.Optimizer):
    """LARS (You et al. 2017), per tensor: local = trust_coefficient ||p|| / (||g|| +
    weight_decay ||p||) (1 when ||p|| or the denominator is 0);  v <- momentum v + lr local
    (g + weight_decay p);  p <- p - v; g = -grad when maximize.  State: "step",
    "momentum_buffer".  A torch.optim.Optimizer with torch's conventions, its step in
    fastopt's kernel (a per-tensor pass for the norms, in double and a fixed order)."""

    kernel = "lars"
    ranges = (_LR, _WEIGHT_DECAY, _MOMENTUM,
              ("trust_coefficient", None, "Invalid trust_coefficient value", *_NONNEG))

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, *,
                 maximize=False, foreach=None, differentiable=False, state_dtype=None,
                 rounding="stochastic", seed=0, master_weights=False):
        _constructor_checks(lr, weight_decay=weight_decay, momentum=momentum)
        if not 0.0 <= trust_coefficient:
            raise ValueError(f"Invalid trust_coefficient value: {trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, maximize=maximize,
                                      foreach=foreach, differentiable=differentiable),
                         state_dtype=state_dtype, rounding=rounding, seed=seed,
                         master_weights=master_weights)

    def slots(self, hp):
        return ("momentum_buffer",)

    def kernel_args(self, hp, step, state):
        return dict(_common(hp), momentum=hp["momentum"],
                    trust_coefficient=hp["trust_coefficient"])


class RowwiseAdagrad(_WholeTensors, _Fastopt, torch.optim.Optimizer):
    """Row-wise Adagrad (FBGEMM/torchrec's embedding optimizer), rows along dim 0 (a 1-D
    parameter's rows are its elements): g = grad (-grad when maximize) + weight_decay p;
    G_r <- G_r + mean over row r of g^2;  p_r <- p_r - lr g_r / (sqrt(G_r) + eps).  State per
    parameter: "step" and "sum" (G, shape p.shape[:1]: 4 bytes per row for float32).  Dense and
    sparse COO gradients (nn.Embedding / nn.EmbeddingBag with sparse=True): a sparse step
    updates the touched rows and their G only, duplicates summed.  A torch.optim.Optimizer with
    torch's conventions, its step in fastopt's kernel; float32/float64/bfloat16 real parameters
    (bfloat16, and float32 with bfloat16 gradients: rows of at most fastopt's ROW_STAGING =
    4096 elements, staged whole; G stays float32: state_dtype="bfloat16" is refused)."""

    kernel = "rowwise_adagrad"
    per_row = True
    bench_against = "Adagrad"  # torch's class a user would take instead (its sparse Adagrad)
    needs = "its per-row state is not sharded with them (yet)"
    ranges = (_LR, _WEIGHT_DECAY, _EPS)

    def __init__(self, params, lr=0.01, eps=1e-8, weight_decay=0.0, *, maximize=False,
                 foreach=None, differentiable=False, state_dtype=None, rounding="stochastic",
                 seed=0, master_weights=False):
        _constructor_checks(lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable),
                         state_dtype=state_dtype, rounding=rounding, seed=seed,
                         master_weights=master_weights)

    def slots(self, hp):
        return ("sum",)

    def sparse_grads(self, hp):
        return "rows"

    def new_state(self, p, hp):
        return {"step": _step_tensor(hp), "sum": _zeros(p, None, p.shape[:1])}

    def kernel_args(self, hp, step, state):
        return dict(_common(hp), eps=hp["eps"])


class Adafactor(_WholeTensors, _Fastopt, torch.optim.Adafactor):
    """torch.optim.Adafactor with its step in fastopt's kernel: per-tensor norms and the row
    and column sums of g^2 in double, in an order fixed by the shapes, then the update.  State:
    "step", and "row_var" and "col_var" (a parameter with dim >= 2) or "variance", torch's
    layout.  float32/float64 real parameters, whole (not sharded) tensors."""

    kernel = "adafactor"
    ranges = (_LR, _WEIGHT_DECAY,
              ("beta2_decay", None, "beta2_decay should be <= 0", lambda x: -math.inf < x <= 0.0,
               "finite and <= 0"),
              ("d", None, "Clipping threshold d should be >= 1", lambda x: 1.0 <= x < math.inf,
               "finite and >= 1"))

    def _hyperparameters(self, index, group):
        hp = super()._hyperparameters(index, group)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"{type(self).__name__}: param group {index}: eps must be a pair "
                            f"(eps1 or None, eps2), got {eps!r}")
        eps1, eps2 = eps  # eps1 None: the parameter dtype's machine epsilon, as torch
        if eps1 is not None and (type(eps1) is not float or not _finite_nonneg(eps1)):
            eps1 = self._number(index, "eps", 0, "epsilon1 should be >= 0", *_NONNEG, eps1)
        if type(eps2) is not float or not _finite_nonneg(eps2):
            eps2 = self._number(index, "eps", 1, "epsilon2 should be >= 0", *_NONNEG, eps2)
        hp["eps"] = (eps1, eps2)
        return hp

    def slots(self, hp):
        return ("row_var", "col_var", "variance")

    def new_state(self, p, hp):
        return {"step": _step_tensor(hp)}  # (the buffers that are p's follow, zero-filled)

    def kernel_args(self, hp, step, state):
        eps1, eps2 = hp["eps"]
        return dict(_common(hp), beta2_decay=hp["beta2_decay"],
                    eps1=-1.0 if eps1 is None else eps1, eps2=eps2, d=hp["d"], step=step)


for _cls in (SGD, Adagrad, Adadelta, RMSprop, Adam, AdamW, Adamax, NAdam, RAdam, Rprop, ASGD,
             SparseAdam, Adafactor):
    _cls.__doc__ = (f"torch.optim.{_cls.__name__}, with its step in fastopt's C kernels "
                    "(see fastopt.torch).\n\n" + (getattr(torch.optim, _cls.__name__).__doc__ or ""))
del _cls


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """torch.nn.utils.clip_grad_norm_, same signature and result, as one multi-threaded C
    reduction over all gradients (fastopt's fo_norm, in double with a fixed summation order)
    and, when the factor is below 1, one multi-threaded C scaling pass.

    total_norm = (sum over every gradient element of |g|^p)^(1/p) (p = norm_type; inf: the max
    of |g|; 0: torch's count of gradients with a nonzero element), returned as a 0-d tensor of
    the gradients' dtype (float64 if any is); then g <- g min(1, max_norm / (total_norm + 1e-6)),
    the factor computed as torch computes it.  error_if_nonfinite: RuntimeError (torch's) if the
    total norm is inf or NaN, before any gradient changes.  `foreach` is accepted and ignored.
    Gradients that are not dense contiguous float32/float64 CPU tensors, and negative norm
    types, are handed to torch's own function."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    native_torch.start()  # the gradients read in C++ (fastopt/native_torch.py)
    p = float(norm_type)
    tables = (_kernels.gather_grads(parameters, torch.Tensor, torch.float32, torch.float64)
              if p >= 0.0 else None)
    if tables is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite, foreach)
    max_norm = float(max_norm)
    if not tables.owners:
        return torch.tensor(0.0)
    total, nonzero_tensors = tables.norm(p)
    if p == 0.0:  # torch: the 0-"norm" of the per-tensor counts
        total = float(nonzero_tensors)
    elif p == 2.0:
        total = math.sqrt(total)
    elif not math.isinf(p) and p != 1.0:
        total = total ** (1.0 / p)
    total_norm = torch.tensor(total, dtype=torch.float64 if tables.has_float64 else torch.float32)
    if error_if_nonfinite and not math.isfinite(total_norm.item()):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`")
    factor = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0).item()
    if factor != 1.0:  # (multiplying by 1 changes no bit)
        tables.scale(factor)
        tables.mark_written()
    return total_norm


__all__ += ["clip_grad_norm_"]


# each parameter stepped by its own hook as soon as its gradient is ready (fastopt/torch_in_backward.py)
from fastopt.torch_in_backward import InBackwardOptimizer, step_in_backward  # noqa: E402

__all__ += ["step_in_backward", "InBackwardOptimizer"]
