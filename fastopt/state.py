"""Per-parameter optimizer state: the buffers a rule keeps between steps, and its step count.

A state is created on the parameter's first step with its parameter's shape and dtype,
zero-filled (or with the initial value the rule's registry entry names, `fill`); a row rule's
buffers (RowwiseAdagrad's `sum`) hold one value per row along axis 0, shape param.shape[:1].  Buffers that
only some options use (AMSGrad's max_v, a momentum buffer) are None until needed.  States can be
used on their own with fastopt.functional.

The state classes (fastopt.<Rule>State, one per C rule) are made from the rule registry
(fastopt.rules) and the C rule list: BUFFERS are the C rule's state buffers, REQUIRED those its
default hyperparameters use.
"""
import numpy as np

from fastopt import _checks, storage
from fastopt.rules import RULES


class OptimizerState:
    """Base class.  Subclasses list their array fields in BUFFERS (those in REQUIRED always
    present, the rest created when an option needs them) and integer fields in COUNTERS."""

    KERNEL = None  # the C rule
    PER_ROW = ()   # the buffers holding one value per row (a row rule's state buffers)
    SHAPES = {}    # buffer -> its shape from the parameter's, None where it does not apply
                   # (a factored rule's: the registry's Rule.state_shapes)
    BUFFERS = ()
    REQUIRED = ()
    COUNTERS = ("step",)
    # sparse="exact": per row (axis 0) the step that last updated it, int64; None until the
    # parameter's first step with a SparseGrad under "exact"
    ROW_FIELDS = ("row_step",)

    def __init__(self, **fields):
        unknown = set(fields) - set(self.BUFFERS) - set(self.COUNTERS) - set(self.ROW_FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        for name in self.BUFFERS:
            setattr(self, name, fields.get(name))
        self.row_step = fields.get("row_step")
        for name in self.COUNTERS:
            setattr(self, name, fields.get(name, 0))

    INITIAL = {}  # buffer -> its start value when not given (the default of the hyperparameter that fills it)

    @classmethod
    def buffer_shape(cls, param, name):
        """Buffer `name`'s shape: param's, param.shape[:1] for one value per row, or what the
        rule's state_shapes say (None: the buffer does not apply to this parameter)."""
        if name in cls.SHAPES:
            return cls.SHAPES[name](param.shape)
        return param.shape[:1] if name in cls.PER_ROW else param.shape

    @classmethod
    def applies(cls, param, name):
        """Whether buffer `name` is one of param's (buffer_shape gives it a shape)."""
        return cls.buffer_shape(param, name) is not None

    @classmethod
    def new_buffer(cls, param, name, value=0.0, dtype=None):
        """Buffer `name` for `param`, filled with `value`, of `dtype` (default param's)."""
        return np.full(cls.buffer_shape(param, name), value,
                       dtype=param.dtype if dtype is None else dtype)

    @classmethod
    def new(cls, param, fill=None, **initial):
        """A fresh state for `param`, step 0: its required buffers filled with `fill` if given,
        else with their start value (`initial`, e.g. RpropState.new(p, step_size=lr), or the
        default of the hyperparameter the rule fills them with), else 0."""
        unknown = set(initial) - set(cls.REQUIRED)
        if unknown:
            raise TypeError(f"{cls.__name__}.new: no required buffer(s) {sorted(unknown)}")
        return cls(**{name: cls.new_buffer(param, name, initial.get(
            name, fill if fill is not None else cls.INITIAL.get(name, 0.0)))
            for name in cls.REQUIRED if cls.applies(param, name)})

    def add_missing(self, param, names, dtype=None):
        """Create, zero-filled (of `dtype`, default param's), those of the named buffers that
        this state lacks."""
        for name in names:
            if getattr(self, name) is None and self.applies(param, name):
                setattr(self, name, self.new_buffer(param, name, 0.0, dtype))

    def buffers(self):
        """{name: array} of the buffers this state holds."""
        return {name: getattr(self, name) for name in self.BUFFERS if getattr(self, name) is not None}

    def check(self, param, what, needed=(), bfloat16=True):
        """Raise unless the required and `needed` buffers exist, every buffer fits `param`
        (shape, dtype, C-contiguous, writeable) and the counters are valid.  bfloat16=False:
        the state buffers must be of the compute type (fastopt.functional's)."""
        for name in tuple(self.REQUIRED) + tuple(needed):
            if getattr(self, name) is None and self.applies(param, name):
                raise ValueError(f"{what}.{name} is missing")
        for name, buf in self.buffers().items():
            if not self.applies(param, name):
                raise ValueError(f"{what}.{name} does not apply to a parameter of shape "
                                 f"{tuple(param.shape)}")
            if name == "master":
                _checks.check_like(buf, param, f"{what}.master", writeable=True,
                                   dtype_ok=_master_dtype_ok(param))
            else:
                # a row rule's state (one value per row) stays in the compute type
                _checks.check_like(buf, param, f"{what}.{name}", writeable=True,
                                   dtype_ok=_checks.state_dtype_ok(
                                       param, bfloat16 and not (self.PER_ROW or self.SHAPES)),
                                   shape=self.buffer_shape(param, name))
        for name in self.COUNTERS:
            _checks.step_count(f"{what}.{name}", getattr(self, name))
        if self.row_step is not None:
            check_row_step(self.row_step, param, self.step, f"{what}.row_step")

    def to_dict(self):
        d = {name: buf for name, buf in self.buffers().items()}
        if self.row_step is not None:
            d["row_step"] = self.row_step
        d.update({name: getattr(self, name) for name in self.COUNTERS})
        return d

    def __repr__(self):
        parts = [f"{k}=<{v.dtype}{list(v.shape)}>" for k, v in self.buffers().items()]
        parts += [f"{k}={getattr(self, k)}" for k in self.COUNTERS]
        return f"{type(self).__name__}({', '.join(parts)})"


def check_row_step(r, param, step, what, writeable=True):
    """A row_step fits `param`: int64, one entry per row, C-contiguous, values in [0, step]."""
    if not isinstance(r, np.ndarray) or r.dtype != np.int64 or not r.dtype.isnative:
        raise TypeError(f"{what} must be an int64 numpy array, got "
                        f"{getattr(r, 'dtype', type(r).__name__)}")
    rows = param.shape[0] if param.ndim else None
    if r.shape != (rows,):
        raise ValueError(f"{what} must have shape ({rows},) (one per row), got {r.shape}")
    if not r.flags.c_contiguous or (writeable and not r.flags.writeable):
        raise ValueError(f"{what} must be C-contiguous" + (" and writeable" if writeable else ""))
    if r.size and (r.min() < 0 or r.max() > step):
        raise ValueError(f"{what} values must be in [0, step = {step}]")


def _master_dtype_ok(param):
    def ok(dtype):
        if not storage.is_bf16(param.dtype):
            return False, "master weights are for bfloat16 parameters"
        return dtype == storage.F32, "master weights are float32"
    return ok


def _state_class(rule):
    crule = rule.crule
    required = rule.required_state()
    doc = (f"State of {rule.name} (C rule {crule.name!r}): buffers {', '.join(crule.state)} "
           f"(always: {', '.join(required) or 'none'}; the others when an option needs them); "
           "master: float32 master weights of a bfloat16 parameter (master_weights=True); "
           "step: updates taken; ema: the exponential moving average of the parameter, kept "
           "when the optimizer has ema_decay." + (
               f" {', '.join(crule.state)}: one value per row along axis 0 (shape "
               "param.shape[:1])." if crule.per_row else "") + (
               f" {rule.state_doc}" if rule.state_doc else ""))
    return type(rule.state, (OptimizerState,), {
        "__doc__": doc, "__module__": __name__, "KERNEL": crule.name,
        "BUFFERS": crule.state + ("ema", "master"), "REQUIRED": required,
        "PER_ROW": crule.state if crule.per_row else (),
        "SHAPES": dict(rule.state_shapes),
        "INITIAL": {name: rule.defaults[hp] for name, hp in rule.fill.items()}})


STATE_TYPES = {}
for _rule in RULES:
    if _rule.state not in STATE_TYPES:
        STATE_TYPES[_rule.state] = _state_class(_rule)
        globals()[_rule.state] = STATE_TYPES[_rule.state]
del _rule
