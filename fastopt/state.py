"""Per-parameter optimizer state: the buffers a rule keeps between steps, and its step count.

A state is created zero-filled with its parameter's shape and dtype (Adagrad's sum with its
initial value) on the parameter's first step.  Buffers that only some options use (AMSGrad's
max_v, RMSprop's grad_avg and momentum_buffer, SGD's momentum_buffer) are None until needed.
States can be used on their own with fastopt.functional.
"""
import numpy as np

from fastopt import _checks


class OptimizerState:
    """Base class.  Subclasses list their array fields in BUFFERS (the first REQUIRED of them
    always present, the rest created when an option needs them) and integer fields in COUNTERS."""

    BUFFERS = ()
    REQUIRED = 0
    COUNTERS = ()

    def __init__(self, **fields):
        unknown = set(fields) - set(self.BUFFERS) - set(self.COUNTERS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        for name in self.BUFFERS:
            setattr(self, name, fields.get(name))
        for name in self.COUNTERS:
            setattr(self, name, fields.get(name, 0))

    @classmethod
    def new(cls, param, fill=0.0):
        """A fresh state for `param`: its required buffers filled with `fill`, step 0."""
        return cls(**{name: np.full_like(param, fill, order="C")
                      for name in cls.BUFFERS[:cls.REQUIRED]})

    def add_missing(self, param, names):
        """Create, zero-filled, those of the named buffers that this state lacks."""
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, np.zeros_like(param, order="C"))

    def buffers(self):
        """{name: array} of the buffers this state holds."""
        return {name: getattr(self, name) for name in self.BUFFERS if getattr(self, name) is not None}

    def check(self, param, what, needed=()):
        """Raise unless the required and `needed` buffers exist, every buffer fits `param`
        (shape, dtype, C-contiguous, writeable) and the counters are valid."""
        for name in self.BUFFERS[:self.REQUIRED] + tuple(needed):
            if getattr(self, name) is None:
                raise ValueError(f"{what}.{name} is missing")
        for name, buf in self.buffers().items():
            _checks.check_like(buf, param, f"{what}.{name}", writeable=True)
        for name in self.COUNTERS:
            _checks.step_count(f"{what}.{name}", getattr(self, name))

    def to_dict(self):
        d = {name: buf for name, buf in self.buffers().items()}
        d.update({name: getattr(self, name) for name in self.COUNTERS})
        return d

    def __repr__(self):
        parts = [f"{k}=<{v.dtype}{list(v.shape)}>" for k, v in self.buffers().items()]
        parts += [f"{k}={getattr(self, k)}" for k in self.COUNTERS]
        return f"{type(self).__name__}({', '.join(parts)})"


class SGDState(OptimizerState):
    """momentum_buffer: v of Momentum/NAG (None without momentum); step: updates taken."""
    BUFFERS = ("momentum_buffer",)
    REQUIRED = 0
    COUNTERS = ("step",)


class AdagradState(OptimizerState):
    """sum: G, the running sum of squared gradients; step: updates taken."""
    BUFFERS = ("sum",)
    REQUIRED = 1
    COUNTERS = ("step",)


class AdadeltaState(OptimizerState):
    """square_avg: E[g^2]; acc_delta: E[delta^2]; step: updates taken."""
    BUFFERS = ("square_avg", "acc_delta")
    REQUIRED = 2
    COUNTERS = ("step",)


class RMSpropState(OptimizerState):
    """square_avg: E[g^2]; grad_avg: E[g] (centered only); momentum_buffer (momentum > 0 only)."""
    BUFFERS = ("square_avg", "grad_avg", "momentum_buffer")
    REQUIRED = 1
    COUNTERS = ("step",)


class AdamState(OptimizerState):
    """m, v: first and second moment estimates; max_v: AMSGrad's running max; step: t."""
    BUFFERS = ("m", "v", "max_v")
    REQUIRED = 2
    COUNTERS = ("step",)


class AdaMaxState(OptimizerState):
    """m: first moment; u: the exponentially weighted infinity norm; step: t."""
    BUFFERS = ("m", "u")
    REQUIRED = 2
    COUNTERS = ("step",)


class NadamState(OptimizerState):
    """m, v: first and second moment estimates; step: t."""
    BUFFERS = ("m", "v")
    REQUIRED = 2
    COUNTERS = ("step",)
