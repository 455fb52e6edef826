"""One function per update rule over a single parameter, its gradient and its state.

    state = fastopt.<Rule>State.new(param)                    # the rule's state class
    fastopt.functional.<rule>(param, grad, state, lr=1e-3)   # param and state updated in place

For libraries that keep their own loop.  Each function validates everything (arrays, state,
hyperparameters) before it writes anything, then runs the C kernel with the GIL released,
through the same engine as the optimizers (plain inputs are checked at C speed; anything else
takes the full validation, which names the problem).  There is one function for each entry of
the rule registry (fastopt.rules, `Rule.function`); each one's docstring has its formula (g is the gradient after maximize and L2
weight decay, t = state.step after the increment).

A buffer that the optimizer classes fill from a hyperparameter when they create the state
(the registry's `Rule.fill`, e.g. an accumulator's start value) starts where the caller's
state starts: `<Rule>State.new(param, <buffer>=value)`.  Such a hyperparameter given to the
function is checked against a fresh state (step 0), whose buffer must hold that value
(ValueError otherwise, rather than the value being ignored); after that step it is not used,
as in the classes.
"""
import inspect
import numbers

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


def check_initial_values(rule, param, state, hp, given):
    """The rule's fill hyperparameters in `given` (checked values in `hp`) against a fresh
    state's buffers: the caller made the state, so a start value given here must be the one
    the buffer holds, or the call would silently differ from the class's first step."""
    step = getattr(state, "step", None)
    if not (isinstance(step, numbers.Integral) and step == 0):
        return  # a state past its first step: the start value is not used (nor by the classes)
    _checks.check_param(param, "param")
    check_state(rule, param, state, "state")
    for buffer, name in rule.fill.items():
        values = getattr(state, buffer)
        if name not in given or values is None:
            continue
        start = values.dtype.type(hp[name])  # as the class stores it, rounded to the dtype
        if not (values == start).all():
            raise ValueError(
                f"{name}={hp[name]!r} is where state.{buffer} starts, but this fresh state's "
                f"{buffer} holds other values: create it with "
                f"{type(state).__name__}.new(param, {buffer}={hp[name]!r}), or leave {name} out")


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
    _step_fixed(rule, param, grad, state, given)


def _step_fixed(rule, param, grad, state, given):
    """One update with fixed numbers: the rule's (cached) check, a start value against a fresh
    state, the engine's C-speed checks and step, the full validation where those refuse."""
    hp, hyper = rule.check(given, copy=False)
    if rule.fill and not rule.fill_hyperparameters.isdisjoint(given):
        check_initial_values(rule, param, state, hp, given)
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

    schedule_type = _kernels.Schedule

    def function(param, grad, state, **hyperparameters):
        if type(hyperparameters.get("lr")) is schedule_type:
            return step_one(rule, param, grad, state, hyperparameters)
        _step_fixed(rule, param, grad, state, hyperparameters)  # (no schedule to evaluate)

    function.__name__ = function.__qualname__ = rule.function
    function.__signature__ = inspect.Signature(parameters)
    starts = "".join(
        f"\n    The state's {buffer} starts where you create it: {rule.state}.new(param, "
        f"{buffer}=<{name}>); {name}, if given here, must be what a fresh state's {buffer} holds "
        f"(ValueError otherwise), and is not used after its first step.\n"
        for buffer, name in rule.fill.items())
    function.__doc__ = f"{rule.name} on one parameter (state: {rule.state}).\n{rule.doc}{starts}"
    return function


for _rule in RULES:
    globals()[_rule.function] = _function(_rule)
del _rule
