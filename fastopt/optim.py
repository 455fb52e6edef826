"""The optimizer classes: validate, own the per-parameter states, run the rule's kernels.

    opt = fastopt.<Rule>([w, b], lr=1e-3)
    opt.step([dw, db])            # w and b updated in place

A step validates every input (grads, states, hyperparameters, memory overlap) before it
updates any parameter.  The classes are made from the rule registry (fastopt.rules), one per
entry: each is `Optimizer` with its rule, signature and docstring.
"""
import inspect

import numpy as np

from fastopt import _checks, _kernels, checkpoint, storage
from fastopt._kernels import ParamGroup
from fastopt.rules import REQUIRED, RULES
from fastopt.state import STATE_TYPES



class Optimizer:
    """Base class.  params: a list of arrays, or of dicts {"params": [...], <hyperparameter>: ...}
    (param groups, each overriding the optimizer's defaults).

    sparse: how a step whose gradient is a fastopt.SparseGrad (rows along axis 0) treats the
    rows it does not touch: "lazy" updates the touched rows alone, each with the sum of its
    gradient rows, exactly as a dense step over that row would (its state advances; the step
    count is the parameter's, which advances every step); untouched rows and their state stay
    as they are.  "exact" (the rules with a closed form, README "Sparse rows", its table; the
    others raise ValueError) keeps the state's `row_step` (int64 per row: the step
    that last updated the row) and, before a touched row's update, applies in closed form the
    steps it missed with a zero gradient, using the current step's hyperparameters (an EMA of
    the weights is not caught up).  A param group may carry its own "sparse"; switched to
    "lazy", its steps still set row_step for the rows they update (every row, for a dense
    gradient), so that "exact" later catches up only the steps a row missed.

    Attributes: param_groups (list of dicts; change hyperparameters there between steps),
    state (dict: global parameter index -> state object, created on a parameter's first step),
    storage_options (state_dtype, rounding, seed, master_weights: see fastopt.storage).
    """

    rule = None

    def __init__(self, params, *, sparse="lazy", ema_decay=None, **defaults):
        options = {k: defaults.pop(k) for k in storage.DEFAULTS if k in defaults}
        self.storage_options = storage.check_options(**options)
        if self.storage_options["state_dtype"] == "bfloat16":
            storage.bfloat16()  # ImportError now, not halfway through a step, without ml_dtypes
        # how a step with a SparseGrad treats the rows it does not touch (README, "Sparse
        # rows"); a param group may override it with its own "sparse" key
        self.sparse = _checks.sparse_mode("sparse", sparse)
        if self.sparse == "exact" and not self.rule.rows:
            raise ValueError(f'sparse="exact": {self.rule.name} takes no SparseGrad rows')
        if ema_decay is not None:
            ema_decay = _checks.real("ema_decay", ema_decay)
            if not 0.0 <= ema_decay <= 1.0:
                raise ValueError(f"Invalid ema_decay: {ema_decay} (must be in [0, 1])")
        self._ema_decay = ema_decay
        self.defaults = self.rule.check(defaults)[0]
        groups = [{**self.defaults, **g} for g in _parse_groups(params)]
        for i, g in enumerate(groups):
            self._group_hyperparameters(g, f"param group {i}")
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        for i, p in enumerate(params):
            _checks.check_param(p, f"params[{i}]", bfloat16=True)
            storage.check_param_dtype(p.dtype, self.storage_options, f"params[{i}]")
            if self.rule.plain_state and self.storage_options["state_dtype"] == "bfloat16":
                raise ValueError(f"{type(self).__name__}'s {self.rule.plain_state} need float32/float64 "
                                 "state: state_dtype='bfloat16' is refused (bfloat16 parameters and "
                                 "gradients are not)")
            if self.rule.crule.per_row and storage.is_bf16(p.dtype):
                _check_staged_rows(p.shape, f"params[{i}]", type(self).__name__)
        seen = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"params[{i}] is the same array as params[{seen[id(p)]}]")
            seen[id(p)] = i
        _checks.check_no_overlap(params, [f"params[{i}]" for i in range(len(params))])
        self.param_groups = [ParamGroup(g) for g in groups]
        self.state = {}
        self._plan = None
        self._lock = _kernels.StepLock()  # serializes step and the checkpoint functions

    @property
    def ema_decay(self):
        """None, or the decay d of the weights' moving average that every step updates after
        the rule, in the same pass:  ema <- d ema + (1 - d) theta  (ema starts as the parameter
        at its first step; kept in each state's `ema`, stored as the state buffers are:
        bfloat16 with state_dtype="bfloat16", rounded as they are; saved in checkpoints)."""
        return self._ema_decay

    def ema_arrays(self):
        """The weights' moving averages in parameter order (the state's arrays themselves; a
        copy of the parameter for one not stepped yet), e.g. to evaluate with."""
        if self._ema_decay is None:
            raise ValueError(f"{type(self).__name__} was made without ema_decay")
        out = []
        for i, p in enumerate(self.params):
            state = self.state.get(i)
            ema = getattr(state, "ema", None)
            out.append(ema if ema is not None else storage.copy_as(
                p, storage.state_dtype_for(p.dtype, self.storage_options)))
        return out

    @property
    def state_type(self):
        return STATE_TYPES[self.rule.state]

    @property
    def params(self):
        """Every parameter, in order: the indices of `state` and of step's grads."""
        return [p for g in self.param_groups for p in g["params"]]

    def _group_hyperparameters(self, group, where):
        """(hyperparameters, Hyper) of a group, validated (the error names the group).  Once
        valid, the group's list values are stored as tuples (_freeze_lists); a refused group
        is left as it was."""
        # every hyperparameter is the group's own: a deleted one is an error, not the
        # rule's default (which need not be this optimizer's), as in a state_dict
        missing = [k for k in self.defaults if k not in group]
        if missing:
            raise ValueError(f"{where} lacks hyperparameter(s) {missing}; assign a value "
                             "instead of deleting it")
        try:
            mode = _checks.sparse_mode("sparse", group.get("sparse", self.sparse))
            checked = self.rule.check({k: v for k, v in group.items() if k not in ("params", "sparse")})
            if mode == "exact":
                checked[1].check_exact(self.rule.name)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        _freeze_lists(group)
        return checked

    # step(grads, *, grad_scale=1.0, clip_norm=None, skip_nonfinite=False, compute_norm=False),
    # documented in fastopt/_engine.pxi: with its keywords at their defaults and a plan that
    # still fits it runs at C cost, with no Python frame; anything else goes to _full_step
    step = _kernels.optimizer_step

    def _full_step(self, grads, grad_scale, clip_norm, skip_nonfinite, compute_norm):
        """step() past the plan's plain path: other keywords, or a plan to check or build."""
        if not self.rule.rows:  # before the plan, which takes rows as they come
            _refuse_rows(self.rule, grads)
        if type(grad_scale) in (float, int) and grad_scale == 1.0 and clip_norm is None \
                and skip_nonfinite is False and compute_norm is False:
            options, result = None, _kernels.PLAIN_RESULT
        else:
            # grad_scale takes rows (its 1 / grad_scale is the rule's multiplier); the plan
            # refuses rows under a reduction pass and _checked_step names that error
            options = _kernels.StepOptions(sum(len(g["params"]) for g in self.param_groups),
                                           grad_scale, clip_norm, skip_nonfinite, compute_norm)
        plan = self._plan
        # (with the keywords at their defaults step() has just tried the plan: not again)
        if plan is not None and options is not None and plan.run_locked(
                self._lock, self.param_groups, self.state, grads, options):
            return options.result()
        with self._lock:
            plan = self._plan
            if plan is not None:
                if plan.refresh(self.param_groups, self._group_hyper) and \
                        plan.run(self.param_groups, self.state, grads, options):
                    return result if options is None else options.result()
            self._checked_step(grads, options)
        return result if options is None else options.result()

    def _group_hyper(self, k):
        return self._group_hyperparameters(self.param_groups[k], f"param_groups[{k}]")[1]

    def new_state(self, param, hp):
        """A parameter's fresh state (filled as the rule's registry entry says; stored as
        storage_options say, with a float32 copy of the parameter for master weights)."""
        state = self.state_type()
        dtype = storage.state_dtype_for(param.dtype, self.storage_options)
        for name in self.rule.required_state():
            if not state.applies(param, name):
                continue
            fill = hp[self.rule.fill[name]] if name in self.rule.fill else 0.0
            if isinstance(fill, _kernels.Schedule):  # (Rprop's step sizes: its first step's lr)
                fill = fill(1)
            setattr(state, name, state.new_buffer(param, name, fill, dtype))
        if self.storage_options["master_weights"]:
            state.master = param.astype(np.float32, order="C")
        return state

    def _checked_step(self, grads, options=None):
        """The full validation, then the update through a new plan (see fastopt/_engine.pxi)."""
        checked = [self._group_hyperparameters(g, f"param_groups[{i}]")
                   for i, g in enumerate(self.param_groups)]
        params = self.params
        stored_as = self.storage_options
        for i, p in enumerate(params):
            _checks.check_param(p, f"params[{i}]", bfloat16=True)
            storage.check_param_dtype(p.dtype, stored_as, f"params[{i}]")
        grads = _checks.check_grads(grads, params)
        if _kernels.reduces(options) and any(isinstance(g, _kernels.SparseGrad) for g in grads):
            # a wrong kind of gradient for the options (fastopt.torch's clip_norm says so too)
            raise TypeError("clip_norm, skip_nonfinite and compute_norm need dense gradients "
                            "(their norm pass does not read a SparseGrad's rows); grad_scale "
                            "works with a SparseGrad")
        if not self.rule.rows:
            _refuse_rows(self.rule, grads)
        written, names = list(params), [f"params[{i}]" for i in range(len(params))]
        state_type = self.state_type
        for i, p in enumerate(params):
            state = self.state.get(i)
            if state is not None:
                if not isinstance(state, state_type):
                    raise TypeError(f"state[{i}] must be a {state_type.__name__}, "
                                    f"got {type(state).__name__}")
                state.check(p, f"state[{i}]")
                for k, buf in state.buffers().items():
                    written.append(buf)
                    names.append(f"state[{i}].{k}")
                if state.row_step is not None:
                    written.append(state.row_step)
                    names.append(f"state[{i}].row_step")
        exact_of = [group.get("sparse", self.sparse) == "exact"
                    for group in self.param_groups for _ in group["params"]]
        read, read_names = [], []
        for i, g in enumerate(grads):
            state = self.state.get(i)
            # an exact step catches rows up (a SparseGrad, or any gradient once rows have
            # their own steps) in the compute type: every buffer it touches stored so
            if exact_of[i] and (isinstance(g, _kernels.SparseGrad) or (
                    state is not None and state.row_step is not None)):
                touched = [params[i], g.values if isinstance(g, _kernels.SparseGrad) else g]
                touched += list(state.buffers().values()) if state is not None else []
                if any(storage.is_bf16(a.dtype) for a in touched) or \
                        stored_as["state_dtype"] == "bfloat16" or stored_as["master_weights"]:
                    raise TypeError(f'grads[{i}]: sparse="exact" needs float32 or float64 '
                                    'storage of the parameter, its gradient and every state '
                                    'buffer, the EMA included (bfloat16 storage and master '
                                    'weights take sparse="lazy")')
            if isinstance(g, _kernels.SparseGrad):
                read += [g.indices, g.values]
                read_names += [f"grads[{i}].indices", f"grads[{i}].values"]
            else:
                read.append(g)
                read_names.append(f"grads[{i}]")
        _checks.check_no_overlap(written, names, read, read_names)
        bf16_grads = [storage.is_bf16((g.values if isinstance(g, _kernels.SparseGrad) else g).dtype)
                      for g in grads]
        if self.rule.crule.per_row:
            for i, (p, bf16) in enumerate(zip(params, bf16_grads)):
                if bf16:
                    _check_staged_rows(p.shape, f"grads[{i}]", type(self).__name__)
        # everything is valid: from here on nothing can fail
        plain = [_plain(g) for g in grads]
        if options is not None and not options.reduce_arrays(plain):
            return  # skipped: no state is created either
        batches, hypers, i = [], [], 0
        for group_index, (group, (hp, hyper)) in enumerate(zip(self.param_groups, checked)):
            needed = [name for name in hyper.used_state() if name is not None]
            hypers.append(hyper)
            if isinstance(group, ParamGroup):
                group.changed.clear()
            by_key = {}
            exact = group.get("sparse", self.sparse) == "exact"
            for p in group["params"]:
                state = self.state.get(i)
                if state is None:
                    state = self.state[i] = self.new_state(p, hp)
                state_dtype = storage.state_dtype_for(p.dtype, stored_as)
                state.add_missing(p, needed, state_dtype)
                if stored_as["master_weights"] and state.master is None:
                    state.master = p.astype(np.float32, order="C")
                if exact and state.row_step is None and isinstance(grads[i], _kernels.SparseGrad):
                    # every row is up to date with the parameter's steps so far
                    state.row_step = np.full(p.shape[0], state.step, dtype=np.int64)
                if self._ema_decay is not None and state.ema is None:
                    # stored as the state (bfloat16 only by state_dtype="bfloat16")
                    state.ema = storage.copy_as(p, state_dtype)
                stored = tuple(getattr(getattr(state, name), "dtype", None)
                               for name in needed + ["ema"])
                grad_dtype = grads[i].values.dtype if isinstance(grads[i], _kernels.SparseGrad) \
                    else grads[i].dtype
                by_key.setdefault((p.dtype, grad_dtype, stored, state.step), []).append(i)
                i += 1
            for (_, grad_dtype, _, step), indices in by_key.items():
                batch = _kernels.Batch(self.rule.crule, [params[j] for j in indices],
                                       [self.state[j] for j in indices], indices, hyper, step,
                                       grad_dtype, stored_as)
                batch.group_index = group_index
                if exact:
                    batch.set_exact()
                elif any(self.state[j].row_step is not None for j in indices):
                    # a lazy step updates rows too: their row_step says so, or a later exact
                    # step would apply the steps taken meanwhile again
                    batch.set_row_steps()
                if isinstance(hp["lr"], _kernels.Schedule):
                    batch.set_schedule(hp["lr"])
                if self._ema_decay is not None:
                    batch.set_ema(self._ema_decay)
                batches.append(batch)
        plan = _kernels.Plan(self.param_groups, self.state, batches, hypers, self.rule.direct)
        plan.dense_only = not self.rule.rows
        if all(isinstance(g, ParamGroup) for g in self.param_groups):
            self._plan = plan
        # grads may be any sequence of ndarrays (subclasses included): plain views of them
        plan.run_validated(plain, options)

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
        """Write state_dict() to an .npz file (numbers and arrays only, loadable without
        pickle), atomically: a temporary file in the same folder replaces `path` once written."""
        checkpoint.save(self, path)

    def load(self, path):
        """load_state_dict() from a file written by save(); never unpickles.  A file that is
        not a readable fastopt checkpoint raises ValueError("not a fastopt checkpoint: <path>:
        <reason>"); a missing path or a folder, the OSError open() gives.  Nothing changes."""
        checkpoint.load(self, path)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join(lines + [")"])


def _check_staged_rows(shape, where, name):
    """A row rule's rows (along dim 0) staged for bfloat16: at most _kernels.ROW_STAGING elements."""
    row_len = int(np.prod(shape[1:])) if len(shape) >= 1 else 1
    if row_len > _kernels.ROW_STAGING and np.prod(shape) > 0:  # (no elements: nothing staged)
        raise ValueError(f"{where}: {name} with bfloat16 storage takes rows (along dim 0) of at most "
                         f"{_kernels.ROW_STAGING} elements (staged whole); its rows have {row_len}")


def _plain(grad):
    """A validated gradient as the engine takes it: plain ndarray views of any subclass."""
    if isinstance(grad, _kernels.SparseGrad):
        return _kernels.SparseGrad(grad.indices.view(np.ndarray), grad.values.view(np.ndarray))
    return grad.view(np.ndarray)


def _freeze_lists(group):
    """Store a group's list (and 1-D array) values, such as betas=[0.9, 0.999], as tuples.  A
    step's plan sees a group's changes through its __setitem__; an edit inside a list it holds
    would go unseen (and unchecked), so after this only a new assignment can change a value.
    (dict's own store: a ParamGroup's counts a change, and this changes no value.)"""
    for key, value in list(group.items()):
        if key == "params":
            continue  # the plan keeps this very list
        if type(value) is list or (isinstance(value, np.ndarray) and value.ndim == 1):
            dict.__setitem__(group, key, tuple(value.tolist() if isinstance(value, np.ndarray)
                                               else value))


def _refuse_rows(rule, grads):
    if isinstance(grads, (list, tuple)) and any(isinstance(g, _kernels.SparseGrad) for g in grads):
        raise TypeError(f"{rule.name} takes dense gradients, not fastopt.SparseGrad rows (its "
                        "norms are over whole tensors)")


def _parse_groups(params):
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


def _optimizer_class(rule):
    """The numpy optimizer class of one registry rule: Optimizer with the rule's signature."""
    positional = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, default, _ in rule.params:
        if name in rule.fixed:
            continue
        kind = (inspect.Parameter.KEYWORD_ONLY if name in rule.keyword_only
                else inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional.append(inspect.Parameter(
            name, kind, default=inspect.Parameter.empty if default is REQUIRED else default))
    positional.append(inspect.Parameter("sparse", inspect.Parameter.KEYWORD_ONLY, default="lazy"))
    positional.append(inspect.Parameter("ema_decay", inspect.Parameter.KEYWORD_ONLY, default=None))
    positional += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                   for name, default in storage.DEFAULTS.items()]
    signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
                                  + positional)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        del given["self"]
        params = given.pop("params")
        Optimizer.__init__(self, params, **given)

    __init__.__signature__ = signature
    doc = f"{rule.name}({', '.join(str(p) for p in positional)})\n{rule.doc}"
    return type(rule.name, (Optimizer,), {"rule": rule, "__init__": __init__, "__doc__": doc,
                                          "__module__": __name__})


for _rule in RULES:
    globals()[_rule.name] = _optimizer_class(_rule)
del _rule
