"""fastopt: gradient-descent update rules as in-place C kernels over numpy arrays.

Optimizers: SGD (Momentum, NAG), Adagrad, Adadelta, RMSprop, Adam, AdamW, AdaMax, Nadam.
fastopt.functional has one function per rule over (param, grad, state, hyperparameters).
"""
import os as _os

from fastopt import functional
from fastopt.config import get_num_threads, isa, set_num_threads, show_config
from fastopt.flat import FlatParams
from fastopt.optim import (NAG, SGD, Adadelta, Adagrad, AdaMax, Adam, AdamW, Momentum, Nadam,
                           Optimizer, RMSprop)
from fastopt.state import (AdadeltaState, AdagradState, AdaMaxState, AdamState, NadamState,
                           OptimizerState, RMSpropState, SGDState)

__version__ = "0.1.0"

__all__ = [
    "SGD", "Momentum", "NAG", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "AdaMax",
    "Nadam", "Optimizer", "OptimizerState", "SGDState", "AdagradState", "AdadeltaState",
    "RMSpropState", "AdamState", "AdaMaxState", "NadamState", "functional", "get_include",
    "FlatParams", "set_num_threads", "get_num_threads", "isa", "show_config",
]


def get_include():
    """The folder holding fastopt.h and the .pxd files, for code that compiles against fastopt."""
    return _os.path.join(_os.path.dirname(__file__), "include")
