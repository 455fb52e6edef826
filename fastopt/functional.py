"""One function per update rule over a single parameter, its gradient and its state.

    state = fastopt.<Rule>State.new(param)                    # the rule's state class
    fastopt.functional.<rule>(param, grad, state, lr=1e-3)   # param and state updated in place

For libraries that keep their own loop.  Each function validates everything (arrays, state,
hyperparameters) before it writes anything, then runs the C kernel with the GIL released,
through the same engine as the optimizers (plain inputs are checked at C speed; anything else
takes the full validation, which names the problem).  There is one function for each entry of
the rule registry (fastopt.rules, `Rule.function`); each one's docstring has its formula (g is the gradient after maximize and L2
weight decay, t = state.step after the increment).
"""
import inspect

from numpy import ndarray as _ndarray

from fastopt import _checks, _kernels
from fastopt.rules import REQUIRED, RULES
from fastopt.state import STATE_TYPES


def check_state(rule, param, state, what):
    state_type = STATE_TYPES[rule.state]
    if not isinstance(state, state_type):
        raise TypeError(f"{what} must be a {state_type.__name__}, got {type(state).__name__}")
    # bfloat16 state is the optimizers' (state_dtype="bfloat16"); the engine's one-tensor
    # step here runs float32/float64 buffers only
    state.check(param, what, bfloat16=False)


def step_one(rule, param, grad, state, given):
    """One parameter's update, validated completely before anything is written."""
    schedule = given.get("lr")
    if type(schedule) is _kernels.Schedule:  # its value at this update's step
        step = getattr(state, "step", None)
        if not (type(step) is int and 0 <= step <= _checks.MAX_STEP):
            # the full checks name what is wrong (or pass an integer of another type)
            _checks.check_param(param, "param")
            check_state(rule, param, state, "state")
            step = int(state.step)
        given = dict(given, lr=schedule(step + 1))
    hp, hyper = rule.check(given, copy=False)
    try:
        done = _kernels.run_single(rule.crule, hyper, STATE_TYPES[rule.state], param, grad, state)
    except OverflowError:  # a step count past int64's end: _validated_step names it
        done = False
    if not done:
        _validated_step(rule, param, grad, state, hyper)


def _validated_step(rule, param, grad, state, hyper):
    """The update the engine's C-speed checks did not take (an ndarray or state subclass, or
    an input to refuse): everything validated in Python, naming what is wrong, then run."""
    state_type = STATE_TYPES[rule.state]
    _checks.check_param(param, "param")
    _checks.check_like(grad, param, "grad", writeable=False)
    check_state(rule, param, state, "state")
    buffers = state.buffers()
    _checks.check_no_overlap([param, *buffers.values()], ["param", *(f"state.{k}" for k in buffers)],
                             [grad], ["grad"])
    state.add_missing(param, [name for name in hyper.used_state() if name is not None])
    # valid: an ndarray subclass or a state subclass still runs, through plain views
    plain = state_type(**{**state.to_dict(), **{k: v.view(_ndarray) for k, v in state.buffers().items()},
                          "step": int(state.step)})  # (the engine takes a plain int)
    if not _kernels.run_single(rule.crule, hyper, state_type, param.view(_ndarray),
                               grad.view(_ndarray), plain):
        raise RuntimeError("fastopt: a validated step was refused by the engine")
    state.step = plain.step


def _function(rule):
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for name in ("param", "grad", "state")]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                     default=inspect.Parameter.empty if d is REQUIRED else d)
                   for name, d, _ in rule.params if name not in rule.fixed]

    crule, state_type, check, run_single = (rule.crule, STATE_TYPES[rule.state], rule.check,
                                            _kernels.run_single)
    schedule_type = _kernels.Schedule

    def function(param, grad, state, **hyperparameters):
        # fixed numbers (no schedule): step_one's steps in this one frame (the cached check,
        # the engine's C-speed checks), the full validation only where those refuse
        if type(hyperparameters.get("lr")) is schedule_type:
            return step_one(rule, param, grad, state, hyperparameters)
        hyper = check(hyperparameters, copy=False)[1]
        try:
            done = run_single(crule, hyper, state_type, param, grad, state)
        except OverflowError:  # a step count past int64's end: _validated_step names it
            done = False
        if not done:
            _validated_step(rule, param, grad, state, hyper)

    function.__name__ = function.__qualname__ = rule.function
    function.__signature__ = inspect.Signature(parameters)
    function.__doc__ = (f"{rule.name} on one parameter (state: {rule.state}).\n{rule.doc}")
    return function


for _rule in RULES:
    globals()[_rule.function] = _function(_rule)
del _rule
