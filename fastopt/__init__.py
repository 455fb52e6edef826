"""fastopt: gradient-descent update rules as in-place C kernels over numpy arrays.

One optimizer class per rule (fastopt.<Rule>, listed in fastopt.rules.RULES, each with its
formula in the docstring); fastopt.functional has one function per rule over (param, grad,
state, hyperparameters).  Every rule is described once, in fastopt.rules (and
csrc/fastopt.h for the C side).
"""
import os as _os
from importlib.util import find_spec as _find_spec

if _find_spec("fastopt._kernels") is None:  # a source tree without its built extension
    raise ImportError(
        f"fastopt's compiled extension (fastopt._kernels) is not in {_os.path.dirname(__file__)}: "
        "a source checkout without a build was found first on sys.path (python -m and python -c "
        "put the current folder there) instead of an installed fastopt. Install it with "
        "`pip install .` and run the tests as `pytest` from the checkout's root, or build in "
        "place with `python setup.py build_ext --inplace`.")

from fastopt import functional, init, optim, rules, schedules, state
from fastopt.config import get_num_threads, isa, set_num_threads, share_blas_threads, show_config
from fastopt._kernels import SparseGrad
from fastopt.flat import FlatParams
from fastopt.optim import Optimizer
from fastopt.state import OptimizerState

__version__ = "0.2.0"

# fastopt.<Rule> and fastopt.<Rule>State for every entry of the registry
RULE_CLASSES = [getattr(optim, r.name) for r in rules.RULES]
STATE_CLASSES = list(state.STATE_TYPES.values())
globals().update({cls.__name__: cls for cls in RULE_CLASSES + STATE_CLASSES})

__all__ = [cls.__name__ for cls in RULE_CLASSES + STATE_CLASSES] + [
    "Optimizer", "OptimizerState", "functional", "get_include", "get_sources", "init", "rules",
    "FlatParams", "SparseGrad", "set_num_threads", "get_num_threads", "share_blas_threads", "isa",
    "show_config",
]


def get_include():
    """The folder holding fastopt.h (and the C sources), for code that compiles against fastopt.

    C and C++ programs: `-I$(python -c "import fastopt; print(fastopt.get_include())")` and
    compile get_sources() in.  Cython extensions: add it to include_dirs and
    `from fastopt._kernels cimport <rule>_f32, fo_<rule>_params` (nothing to link).
    """
    here = _os.path.dirname(__file__)
    installed = _os.path.join(here, "csrc")
    return installed if _os.path.isdir(installed) else _os.path.normpath(_os.path.join(here, _os.pardir, "csrc"))


def get_sources():
    """The C files that implement fastopt.h, to compile into a C/C++ program (with -pthread, and
    the flags of fastopt._kernels.BUILD_FLAGS; never -ffast-math)."""
    folder = get_include()
    return sorted(_os.path.join(folder, f) for f in _os.listdir(folder) if f.endswith(".c"))
