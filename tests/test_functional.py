"""Every function of fastopt.functional against the float64 references (tests/reference.py),
in both dtypes, with the options that change its formula; bad hyperparameters change nothing."""
import inspect
import re

import numpy as np
import pytest

import fastopt
import reference
from fastopt import functional as F

STEPS = 20
SHAPES = [(7, 5), (33,)]  # odd sizes: no size is a multiple of a SIMD width

# The README's defaults, written out here so that a wrong default in fastopt shows up
README_DEFAULTS = {
    "sgd": dict(lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0),
    "adagrad": dict(lr=0.01, eps=1e-8, weight_decay=0.0, initial_accumulator_value=0.0),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0),
    "rmsprop": dict(lr=1e-3, rho=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False),
    "adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "nadam": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
    "radam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "rprop": dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)),
    "asgd": dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0),
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0),
    "lars": dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.001),  # lr: no default
    "rowwise_adagrad": dict(lr=0.01, eps=1e-8, weight_decay=0.0),
    "adafactor": dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0),
    # the SGD shorthands: lr has no default
    "momentum": dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    "nag": dict(momentum=0.9, nesterov=True, weight_decay=0.0),
}
REFERENCE = {"momentum": "sgd", "nag": "sgd"}

STATES = {"sgd": fastopt.SGDState, "adagrad": fastopt.AdagradState,
          "adadelta": fastopt.AdadeltaState, "rmsprop": fastopt.RMSpropState,
          "adam": fastopt.AdamState, "adamw": fastopt.AdamState, "adamax": fastopt.AdaMaxState,
          "nadam": fastopt.NadamState, "momentum": fastopt.SGDState, "nag": fastopt.SGDState,
          "lion": fastopt.LionState, "radam": fastopt.RAdamState, "rprop": fastopt.RpropState,
          "asgd": fastopt.ASGDState, "lamb": fastopt.LAMBState, "lars": fastopt.LARSState,
          "rowwise_adagrad": fastopt.RowwiseAdagradState, "adafactor": fastopt.AdafactorState}

# (function, hyperparameters, the state buffers they need): every option of every function
CASES = [
    ("sgd", dict(), ()),
    ("sgd", dict(lr=0.05, weight_decay=0.1, maximize=True), ()),
    ("sgd", dict(lr=0.05, momentum=0.9), ("momentum_buffer",)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), ("momentum_buffer",)),
    ("adagrad", dict(lr=0.05), ("sum",)),
    ("adagrad", dict(lr=0.05, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True),
     ("sum",)),
    ("adadelta", dict(), ("square_avg", "acc_delta")),
    ("adadelta", dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1, maximize=True),
     ("square_avg", "acc_delta")),
    ("rmsprop", dict(lr=0.01), ("square_avg",)),
    ("rmsprop", dict(lr=0.01, centered=True), ("square_avg", "grad_avg")),
    ("rmsprop", dict(lr=0.01, momentum=0.5, weight_decay=0.1, maximize=True),
     ("square_avg", "momentum_buffer")),
    ("rmsprop", dict(lr=0.01, rho=0.8, centered=True, momentum=0.5),
     ("square_avg", "grad_avg", "momentum_buffer")),
    ("adam", dict(), ("m", "v")),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True),
     ("m", "v")),
    ("adam", dict(lr=0.01, amsgrad=True), ("m", "v", "max_v")),
    ("adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), ("m", "v")),
    ("adamw", dict(), ("m", "v")),
    ("adamw", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), ("m", "v", "max_v")),
    ("adamax", dict(), ("m", "u")),
    ("adamax", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True), ("m", "u")),
    ("nadam", dict(), ("m", "v")),
    ("nadam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True), ("m", "v")),
    ("momentum", dict(lr=0.05), ("momentum_buffer",)),
    ("nag", dict(lr=0.05, momentum=0.8, weight_decay=0.01, maximize=True), ("momentum_buffer",)),
    ("lion", dict(), ("m",)),
    ("lion", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, maximize=True), ("m",)),
    ("radam", dict(), ("m", "v")),
    ("radam", dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, maximize=True),
     ("m", "v")),
    ("radam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), ("m", "v")),
    ("rprop", dict(), ("prev", "step_size")),
    ("rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2), maximize=True),
     ("prev", "step_size")),
    ("asgd", dict(), ("ax",)),
    ("asgd", dict(lr=0.05, lambd=0.1, alpha=0.5, t0=5, weight_decay=0.1, maximize=True), ("ax",)),
    ("lamb", dict(), ("m", "v")),
    ("lamb", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1, maximize=True),
     ("m", "v")),
    ("lars", dict(lr=0.1), ("momentum_buffer",)),
    ("lars", dict(lr=0.5, momentum=0.5, weight_decay=0.01, trust_coefficient=0.02, maximize=True),
     ("momentum_buffer",)),
    ("rowwise_adagrad", dict(), ("sum",)),
    ("rowwise_adagrad", dict(lr=0.05, eps=1e-6, weight_decay=0.1, maximize=True), ("sum",)),
    # a factored rule: which of its buffers a parameter has depends on its shape (a matrix:
    # row_var and col_var; a vector: variance)
    ("adafactor", dict(), ("row_var", "col_var", "variance")),
    ("adafactor", dict(lr=0.05, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=2.0, weight_decay=0.1,
                       maximize=True), ("row_var", "col_var", "variance")),
]


def case_id(case):
    name, hp, _ = case
    return "-".join([name] + [f"{k}={v}" for k, v in hp.items()])


def new_state(name, param, hp):
    if name == "adagrad":  # the accumulator's start is the state's, not the call's
        return fastopt.AdagradState.new(param, fill=hp.get("initial_accumulator_value", 0.0))
    if name == "rprop":  # so is the step size's
        return fastopt.RpropState.new(param, step_size=hp.get("lr", 0.01))
    return STATES[name].new(param)


def reference_step(name, theta, grad, state, hp):
    kwargs = {**README_DEFAULTS[name], **hp}
    if kwargs.pop("decoupled_weight_decay", False):
        kwargs["decoupled"] = True
    return getattr(reference, REFERENCE.get(name, name))(theta, grad, state, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    name, hp, needed = case
    rng = np.random.default_rng(sum(map(ord, case_id(case))))
    for shape in SHAPES:
        init = rng.standard_normal(shape).astype(dtype)
        param = init.copy()
        state = new_state(name, param, hp)
        ref, ref_state = init.astype(np.float64), {}
        for _ in range(STEPS):
            grad = rng.standard_normal(shape).astype(dtype)
            getattr(F, name)(param, grad, state, **hp)
            ref = reference_step(name, ref, grad.astype(np.float64), ref_state, hp)
        assert param.dtype == dtype and param.shape == shape and state.step == STEPS
        # a factored rule's buffers: those that apply to this shape, shaped as the rule says
        assert sorted(state.buffers()) == sorted(k for k in needed if state.applies(param, k))
        for name_, buf in state.buffers().items():  # a row rule's: one value per row
            assert buf.dtype == dtype
            expected = (state.SHAPES[name_](shape) if name_ in state.SHAPES else
                        shape[:1] if name_ in state.PER_ROW else shape)
            assert buf.shape == expected
        if dtype == np.float64:
            np.testing.assert_allclose(param, ref, rtol=1e-12, atol=1e-12)
        else:
            # float32 keeps ~7 digits per step: compare the distance travelled, which a formula
            # error would change, at a tolerance far below one step's size (as test_rules.py)
            keep = reference.comparable(ref_state, shape)
            moved, ref_moved = (param.astype(np.float64) - init)[keep], (ref - init)[keep]
            scale = np.abs(ref_moved).max()
            assert scale > 0
            np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=2e-4 * scale + 2e-6)


def test_cases_cover_every_function():
    assert {c[0] for c in CASES} == set(STATES) == {
        n for n in dir(F) if not n.startswith("_") and n.islower() and callable(getattr(F, n))
        and n not in ("check_state", "step_one", "check_initial_values")}


# (function, bad hyperparameters, error, a word the message must contain)
BAD = [
    ("sgd", dict(lr=-0.1), ValueError, "lr"),
    ("sgd", dict(momentum=-0.5), ValueError, "momentum"),
    ("sgd", dict(nesterov=True), ValueError, "nesterov"),
    ("sgd", dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    ("sgd", dict(maximize="yes"), TypeError, "maximize"),
    ("adagrad", dict(eps=-1e-8), ValueError, "eps"),
    ("adagrad", dict(lr=float("inf")), ValueError, "lr"),
    ("adagrad", dict(initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
    ("adadelta", dict(rho=1.0), ValueError, "rho"),
    ("adadelta", dict(lr="1.0"), TypeError, "lr"),
    ("rmsprop", dict(rho=-0.1), ValueError, "rho"),
    ("rmsprop", dict(momentum=-1.0, centered=True), ValueError, "momentum"),
    ("rmsprop", dict(centered=1), TypeError, "centered"),
    ("adam", dict(betas=(0.9, 1.0)), ValueError, "betas"),
    ("adam", dict(betas=(0.9,)), TypeError, "betas"),
    ("adam", dict(lr=-1e-3, amsgrad=True), ValueError, "lr"),
    ("adam", dict(amsgrad="no"), TypeError, "amsgrad"),
    ("adamw", dict(weight_decay=-0.01), ValueError, "weight_decay"),
    ("adamw", dict(lr=-1.0, amsgrad=True), ValueError, "lr"),
    ("adamax", dict(betas=(-0.1, 0.9)), ValueError, "betas"),
    ("adamax", dict(eps=float("nan")), ValueError, "eps"),
    ("nadam", dict(betas=(0.9, 1.5)), ValueError, "betas"),
    ("nadam", dict(weight_decay=-1.0), ValueError, "weight_decay"),
    ("lion", dict(betas=(1.0, 0.99)), ValueError, "betas"),
    ("lion", dict(lr=-1e-4), ValueError, "lr"),
    ("radam", dict(betas=(0.9, 1.0)), ValueError, "betas"),
    ("radam", dict(eps=-1.0, decoupled_weight_decay=True), ValueError, "eps"),
    ("rprop", dict(etas=(1.0, 1.2)), ValueError, "etas[0]"),
    ("rprop", dict(etas=(0.5, 1.0)), ValueError, "etas[1]"),
    ("rprop", dict(etas=(0.5,)), TypeError, "etas"),
    ("rprop", dict(step_sizes=(0.5, 0.1)), ValueError, "step_sizes[1]"),
    ("rprop", dict(step_sizes=(-1.0, 0.1)), ValueError, "step_sizes[0]"),
    ("asgd", dict(lambd=-1.0), ValueError, "lambd"),
    ("asgd", dict(alpha=float("nan")), ValueError, "alpha"),
    ("asgd", dict(t0=float("inf")), ValueError, "t0"),
    ("lamb", dict(betas=(0.9, 1.0)), ValueError, "betas"),
    ("lamb", dict(eps=-1e-6), ValueError, "eps"),
    ("lars", dict(lr=0.1, trust_coefficient=-1.0), ValueError, "trust_coefficient"),
    ("lars", dict(lr=0.1, momentum=float("nan")), ValueError, "momentum"),
    ("adafactor", dict(beta2_decay=0.5), ValueError, "beta2_decay"),
    ("adafactor", dict(eps=(-1e-3, 1e-3)), ValueError, "eps1"),
    ("adafactor", dict(eps=(None, -1.0)), ValueError, "eps2"),
    ("adafactor", dict(d=0.5), ValueError, "d"),
    ("adafactor", dict(eps=(None,)), TypeError, "eps"),
]


@pytest.mark.parametrize("name, hp, error, word", BAD,
                         ids=[f"{b[0]}-{'-'.join(b[1])}" for b in BAD])
def test_bad_hyperparameter_changes_nothing(name, hp, error, word):
    rng = np.random.default_rng(3)
    param = rng.standard_normal((4, 3)).astype(np.float32)
    grad = rng.standard_normal((4, 3)).astype(np.float32)
    state = new_state(name, param, {})
    lr_default = inspect.signature(getattr(F, name)).parameters["lr"].default
    base = {"lr": 0.1} if lr_default is inspect.Parameter.empty else {}  # LARS: lr required
    for _ in range(2):  # a state with history, whose buffers a bad call must not touch
        getattr(F, name)(param, grad, state, **base)
    before = (param.copy(), grad.copy(), state.step,
              {k: v.copy() for k, v in state.buffers().items()})
    with pytest.raises(error, match=re.escape(word)):
        getattr(F, name)(param, grad, state, **{**base, **hp})
    np.testing.assert_array_equal(param, before[0], strict=True)
    np.testing.assert_array_equal(grad, before[1], strict=True)
    assert state.step == before[2] == 2
    assert state.buffers().keys() == before[3].keys()  # no buffer created (max_v, ...)
    for k, v in before[3].items():
        np.testing.assert_array_equal(state.buffers()[k], v, strict=True)


@pytest.mark.parametrize("step, error", [(2**63 - 1, ValueError), (2**64, ValueError),
                                         (-1, ValueError), (1.0, TypeError)])
@pytest.mark.parametrize("lr", [0.1, fastopt.schedules.exponential(0.1, 0.5)])
def test_bad_step_count_changes_nothing(step, error, lr):
    """A step count outside [0, 2**53] is refused naming state.step (2**63 - 1 raised
    OverflowError; with a schedule, its lr was that of step 1)."""
    param = np.ones(4)
    state = fastopt.AdamState.new(param)
    state.step = step
    with pytest.raises(error, match=r"state\.step must be"):
        F.adam(param, np.ones(4), state, lr=lr)
    np.testing.assert_array_equal(param, np.ones(4), strict=True)
    assert state.step == step and not state.m.any() and not state.v.any()


@pytest.mark.parametrize("lr", [0.1, fastopt.schedules.exponential(0.1, 0.5)])
def test_step_count_past_the_limit_changes_nothing(lr):
    test_bad_step_count_changes_nothing(2**53 + 1, ValueError, lr)


@pytest.mark.parametrize("lr", [0.1, fastopt.schedules.exponential(0.1, 0.5)])
def test_no_step_past_the_limit(lr):
    """A state may hold 2**53 steps, but no step takes it to 2**53 + 1 (it did, and the optimizer
    then refused its own checkpoint)."""
    param = np.ones(4)
    state = fastopt.AdamState.new(param)
    state.step = 2**53
    with pytest.raises(ValueError, match="step count is 9007199254740992.*no further step"):
        F.adam(param, np.ones(4), state, lr=lr)
    np.testing.assert_array_equal(param, np.ones(4), strict=True)
    assert state.step == 2**53 and not state.m.any() and not state.v.any()


@pytest.mark.parametrize("lr", [0.1, fastopt.schedules.exponential(0.1, 0.5)])
def test_step_count_of_any_integer_type(lr):
    """A numpy integer step count is a valid one (it raised RuntimeError); the result, and a
    schedule's lr, are those of the same int."""
    results = []
    for step in (5, np.int64(5), 2**53 - 1):
        param = np.ones(4)
        state = fastopt.AdamState.new(param)
        state.step = step
        F.adam(param, np.full(4, 0.5), state, lr=lr)
        assert type(state.step) is int and state.step == step + 1
        results.append(param)
    np.testing.assert_array_equal(results[0], results[1], strict=True)


@pytest.mark.parametrize("name, buffer, hp", [("adam", "m", {}), ("adam", "v", {}),
                                              ("sgd", "momentum_buffer", dict(momentum=0.9)),
                                              ("adagrad", "sum", {})])
def test_bfloat16_state_buffer_is_refused(name, buffer, hp):
    """fastopt.functional runs float32/float64 state: a bfloat16 buffer is a TypeError naming
    it (it passed the checks, then the engine refused it: RuntimeError)."""
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    param = np.ones(4, np.float32)
    state = new_state(name, param, hp)
    setattr(state, buffer, np.zeros(4, bfloat16) if getattr(state, buffer) is None
            else getattr(state, buffer).astype(bfloat16))
    before = {k: v.copy() for k, v in state.buffers().items()}
    with pytest.raises(TypeError, match=rf"state\.{buffer} has dtype bfloat16.*must be float32"):
        getattr(F, name)(param, np.ones(4, np.float32), state, **hp)
    np.testing.assert_array_equal(param, np.ones(4, np.float32), strict=True)
    assert state.step == 0 and state.buffers().keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(state.buffers()[k], v, strict=True)


FILLED = [rule for rule in fastopt.rules.RULES if rule.fill]  # Adagrad, Rprop


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", FILLED, ids=lambda r: r.name)
def test_start_value_is_the_states_and_matches_the_class(rule, dtype):
    """A buffer the class fills from a hyperparameter at creation (Adagrad's sum from
    initial_accumulator_value, Rprop's step_size from lr): the caller's state made with that
    start gives the class's bits; a fresh state that does not hold a given start value is a
    ValueError that changes nothing (the value was silently ignored)."""
    (buffer, name), = rule.fill.items()
    start = 0.3  # neither hyperparameter's default
    rng = np.random.default_rng(5)
    init = rng.standard_normal(9).astype(dtype)
    grads = [rng.standard_normal(9).astype(dtype) for _ in range(3)]
    opt = getattr(fastopt, rule.name)([init.copy()], **{name: start})
    param = init.copy()
    state = getattr(fastopt, rule.state).new(param, **{buffer: start})
    for g in grads:
        opt.step([g])
        getattr(F, rule.function)(param, g, state, **{name: start})
    np.testing.assert_array_equal(param, opt.params[0], strict=True)
    np.testing.assert_array_equal(getattr(state, buffer), getattr(opt.state[0], buffer), strict=True)

    param = init.copy()
    state = getattr(fastopt, rule.state).new(param)  # starts at the default, not at 0.3
    before = getattr(state, buffer).copy()
    with pytest.raises(ValueError, match=rf"{name}=0\.3 is where state\.{buffer} starts.*"
                                         rf"{rule.state}\.new\(param, {buffer}=0\.3\)"):
        getattr(F, rule.function)(param, grads[0], state, **{name: start})
    np.testing.assert_array_equal(param, init, strict=True)
    np.testing.assert_array_equal(getattr(state, buffer), before, strict=True)
    assert state.step == 0


@pytest.mark.parametrize("rule", FILLED, ids=lambda r: r.name)
def test_start_value_is_not_used_after_the_first_step(rule):
    """As in the classes, which fill the buffer once: past step 0 the value is not checked."""
    (buffer, name), = rule.fill.items()
    param = np.ones(4)
    state = getattr(fastopt, rule.state).new(param)
    getattr(F, rule.function)(param, np.full(4, 0.5), state)
    getattr(F, rule.function)(param, np.full(4, 0.5), state, **{name: 0.3})
    assert state.step == 2


def test_start_value_from_a_schedule_is_its_first_value():
    """Rprop's lr as a schedule: a fresh state's step_size must hold its value at step 1."""
    lr = fastopt.schedules.exponential(0.1, 0.5)
    param = np.ones(4)
    with pytest.raises(ValueError, match=r"lr=0\.1 is where state\.step_size starts"):
        F.rprop(param, np.ones(4), fastopt.RpropState.new(param), lr=lr)
    state = fastopt.RpropState.new(param, step_size=0.1)
    F.rprop(param, np.ones(4), state, lr=lr)
    np.testing.assert_array_equal(param, np.full(4, 0.9), strict=True)
