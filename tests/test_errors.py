"""Bad input gets a TypeError/ValueError naming the problem, and changes nothing."""
import fractions
import inspect
import math

import numpy as np
import pytest

import fastopt
import reference
from conftest import assert_same_snapshot, snapshot

ALL = [fastopt.SGD, fastopt.Adagrad, fastopt.Adadelta, fastopt.RMSprop, fastopt.Adam,
       fastopt.AdamW, fastopt.AdaMax, fastopt.Nadam, fastopt.Lion, fastopt.RAdam, fastopt.Rprop,
       fastopt.ASGD, fastopt.LAMB, fastopt.Adafactor]


def trained(cls=fastopt.Adam, **hp):
    """An optimizer over three params of two dtypes that has taken two steps."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal(2).astype(np.float32)]
    opt = cls(params, **hp)
    for _ in range(2):
        opt.step(good_grads(opt))
    return opt


def good_grads(opt):
    return [np.full_like(p, 0.5) for p in opt.params]


# ---- construction ------------------------------------------------------------------------

@pytest.mark.parametrize("params, error, match", [
    ([], ValueError, "empty parameter list"),
    ([{"params": []}], ValueError, "empty parameter list"),
    (np.ones(3), TypeError, "list of arrays"),
    ([[1.0, 2.0]], TypeError, r"params\[0\] must be a numpy array"),
    ([np.ones(3, np.int64)], TypeError, "float32, float64 or bfloat16"),
    ([np.ones(3, np.float16)], TypeError, "float32, float64 or bfloat16"),
    ([np.ones(3, ">f8")], TypeError, "float32, float64 or bfloat16"),
    ([np.ones((4, 4))[:, ::2]], ValueError, "C-contiguous"),
    ([np.ones((4, 4)).T], ValueError, "C-contiguous"),
    ([{"lr": 0.1}], ValueError, "no 'params' key"),
])
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        fastopt.Adam(params)


def test_read_only_param():
    p = np.ones(3)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastopt.SGD([p])


def test_same_array_twice():
    p = np.ones(3)
    with pytest.raises(ValueError, match=r"params\[1\] is the same array as params\[0\]"):
        fastopt.SGD([p, p])
    with pytest.raises(ValueError, match="same array"):
        fastopt.SGD([{"params": [p]}, {"params": [p], "lr": 0.1}])


def test_overlapping_param_views():
    base = np.ones(10)
    with pytest.raises(ValueError, match="overlaps"):
        fastopt.SGD([base[:6], base[4:]])
    fastopt.SGD([base[:5], base[5:]])  # disjoint views of one buffer are fine


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("name, value, error", [
    ("lr", -0.1, ValueError), ("lr", math.nan, ValueError), ("lr", math.inf, ValueError),
    ("lr", "0.1", TypeError), ("weight_decay", -1e-4, ValueError),
    ("weight_decay", math.nan, ValueError), ("maximize", 1, TypeError),
])
def test_bad_common_hyperparameters(cls, name, value, error):
    if name not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__name__} has no {name} (Rprop: no weight decay, as torch's)")
    with pytest.raises(error, match=name):
        cls([np.ones(3)], **{name: value})


@pytest.mark.parametrize("cls, hp, error, match", [
    (fastopt.Adam, dict(eps=-1e-8), ValueError, "eps"),
    (fastopt.Adagrad, dict(eps=math.nan), ValueError, "eps"),
    (fastopt.Adam, dict(betas=(1.0, 0.999)), ValueError, "beta1"),
    (fastopt.AdamW, dict(betas=(0.9, -0.1)), ValueError, "beta2"),
    (fastopt.Nadam, dict(betas=(0.9, math.nan)), ValueError, "beta2"),
    (fastopt.AdaMax, dict(betas=(0.9,)), TypeError, "betas"),
    (fastopt.Adadelta, dict(rho=1.0), ValueError, "rho"),
    (fastopt.RMSprop, dict(rho=-0.5), ValueError, "rho"),
    (fastopt.SGD, dict(momentum=-0.9), ValueError, "momentum"),
    (fastopt.RMSprop, dict(momentum=-0.9), ValueError, "momentum"),
    (fastopt.SGD, dict(nesterov=True), ValueError, "nesterov"),
    (fastopt.Adagrad, dict(initial_accumulator_value=-1.0), ValueError, "initial_accumulator"),
    (fastopt.Adam, dict(amsgrad="yes"), TypeError, "amsgrad"),
    (fastopt.Lion, dict(betas=(0.9, 1.0)), ValueError, "beta2"),
    (fastopt.RAdam, dict(eps=-1.0), ValueError, "eps"),
    (fastopt.RAdam, dict(decoupled_weight_decay=1), TypeError, "decoupled_weight_decay"),
    (fastopt.Rprop, dict(etas=(0.0, 1.2)), ValueError, r"eta_minus \(etas\[0\]\)"),
    (fastopt.Rprop, dict(etas=(0.5, math.inf)), ValueError, "etas"),
    (fastopt.Rprop, dict(step_sizes=(1e-3, 1e-4)), ValueError, r"step_size_max \(step_sizes\[1\]\)"),
    (fastopt.Rprop, dict(step_sizes=(1e-6, math.nan)), ValueError, "step_sizes"),
    (fastopt.ASGD, dict(lambd=-1e-4), ValueError, "lambd"),
    (fastopt.ASGD, dict(alpha=math.inf), ValueError, "alpha"),
    (fastopt.ASGD, dict(t0="1e6"), TypeError, "t0"),
    (fastopt.LAMB, dict(betas=(1.0, 0.9)), ValueError, "beta1"),
    (fastopt.LARS, dict(lr=0.1, trust_coefficient=math.nan), ValueError, "trust_coefficient"),
    (fastopt.LARS, dict(lr=-0.1), ValueError, "lr"),
    (fastopt.LARS, dict(momentum=0.9), TypeError, "lr"),
    (fastopt.Adafactor, dict(beta2_decay=0.1), ValueError, "beta2_decay"),
    (fastopt.Adafactor, dict(eps=(-1e-30, 1e-3)), ValueError, r"eps1 \(eps\[0\]\)"),
    (fastopt.Adafactor, dict(eps=(None, -1.0)), ValueError, r"eps2 \(eps\[1\]\)"),
    (fastopt.Adafactor, dict(eps=(None, math.nan)), ValueError, r"eps\[1\]"),
    (fastopt.Adafactor, dict(eps=1e-3), TypeError, "eps"),
    (fastopt.Adafactor, dict(d=0.5), ValueError, "d"),
    (fastopt.Adafactor, dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_bad_rule_hyperparameters(cls, hp, error, match):
    with pytest.raises(error, match=match):
        cls([np.ones(3)], **hp)


def test_bad_group_hyperparameters():
    with pytest.raises(ValueError, match="param group 1.*lr"):
        fastopt.Adam([{"params": [np.ones(2)]}, {"params": [np.ones(2)], "lr": -1.0}])
    with pytest.raises(ValueError, match="unknown hyperparameter.*learning_rate"):
        fastopt.Adam([{"params": [np.ones(2)], "learning_rate": 0.1}])


# ---- step: nothing may change -------------------------------------------------------------

def bad_steps():
    """(name, how to break an optimizer's step, expected error, message)."""
    def grads_with(i, g):
        return lambda opt: [g(opt.params[j]) if j == i else np.full_like(p, 0.5)
                            for j, p in enumerate(opt.params)]

    def set_group(key, value):
        def mutate(opt):
            opt.param_groups[-1][key] = value
            return good_grads(opt)
        return mutate

    def set_state(field, value):
        def mutate(opt):
            setattr(opt.state[2], field, value(opt.state[2]))
            return good_grads(opt)
        return mutate

    def grad_is_param(opt):
        g = good_grads(opt)
        g[2] = opt.params[0].reshape(-1)[:2]
        return g

    def grad_is_state(opt):
        g = good_grads(opt)
        g[2] = opt.state[0].m.reshape(-1)[:2]
        return g

    def state_shares_param(opt):
        opt.state[1].v = opt.params[1]
        return good_grads(opt)

    return [
        ("too few grads", lambda opt: good_grads(opt)[:-1], ValueError, "got 2 grads for 3"),
        ("grads not a list", lambda opt: np.ones(3), TypeError, "sequence"),
        ("grad shape", grads_with(2, lambda p: np.ones(3, p.dtype)), ValueError,
         r"grads\[2\] has shape \(3,\), the parameter has \(2,\)"),
        ("grad dtype", grads_with(2, lambda p: np.ones(2)), TypeError,
         r"grads\[2\] has dtype float64, the parameter has float32"),
        ("integer grad", grads_with(1, lambda p: np.ones(5, np.int64)), TypeError, "int64"),
        ("grad list", grads_with(2, lambda p: [0.5, 0.5]), TypeError, "numpy array"),
        ("grad layout", grads_with(1, lambda p: np.ones(10)[::2]), ValueError, "C-contiguous"),
        ("grad aliases a param", grad_is_param, ValueError, r"params\[0\] overlaps grads\[2\]"),
        ("grad aliases a state", grad_is_state, ValueError, r"state\[0\]\.m overlaps grads\[2\]"),
        ("state aliases a param", state_shares_param, ValueError, "overlaps"),
        ("negative lr set between steps", set_group("lr", -1.0), ValueError, "lr"),
        ("NaN eps set between steps", set_group("eps", math.nan), ValueError, "eps"),
        ("bad betas set between steps", set_group("betas", (0.9, 1.5)), ValueError, "beta2"),
        ("state buffer shape", set_state("m", lambda s: np.zeros(3, np.float32)), ValueError,
         r"state\[2\]\.m has shape"),
        ("state buffer dtype", set_state("v", lambda s: np.zeros(2)), TypeError,
         r"state\[2\]\.v has dtype"),
        ("state buffer missing", set_state("v", lambda s: None), ValueError,
         r"state\[2\]\.v is missing"),
        ("state step negative", set_state("step", lambda s: -1), ValueError, "step"),
        ("state step not an int", set_state("step", lambda s: 1.5), TypeError, "step"),
    ]


@pytest.mark.parametrize("name, make_grads, error, match", bad_steps(), ids=[b[0] for b in bad_steps()])
def test_bad_step_changes_nothing(name, make_grads, error, match):
    opt = trained(fastopt.Adam)
    grads = make_grads(opt)
    before = snapshot(opt, grads)
    with pytest.raises(error, match=match):
        opt.step(grads)
    after = snapshot(opt, grads)
    assert_same_snapshot(before, after)


def test_list_hyperparameters_are_frozen():
    """A list value (betas=[...]) is kept as a tuple: an edit inside it cannot slip past the
    step's cached plan; a new value is assigned to the group, where the plan sees it."""
    betas = [0.9, 0.999]
    p, q = np.ones(3), np.ones(3)
    opt = fastopt.Adam([{"params": [p], "betas": betas}], lr=0.1)
    same = fastopt.Adam([{"params": [q], "betas": (0.9, 0.999)}], lr=0.1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    opt.step([np.full(3, 0.5)])
    same.step([np.full(3, 0.5)])
    betas[0] = 5.0  # the caller's list, not the group's
    with pytest.raises(TypeError):
        opt.param_groups[0]["betas"][0] = 5.0
    opt.step([np.full(3, 0.5)])
    same.step([np.full(3, 0.5)])
    np.testing.assert_array_equal(p, q, strict=True)
    # a list assigned between steps is frozen by the step that reads it
    opt.param_groups[0]["betas"] = [0.8, 0.99]
    same.param_groups[0]["betas"] = (0.8, 0.99)
    opt.step([np.full(3, 0.5)])
    same.step([np.full(3, 0.5)])
    assert type(opt.param_groups[0]["betas"]) is tuple
    np.testing.assert_array_equal(p, q, strict=True)
    # an invalid list assigned between steps is refused, and changes nothing
    opt.param_groups[0]["betas"] = [5.0, 0.99]
    before = snapshot(opt)
    with pytest.raises(ValueError, match="beta1"):
        opt.step([np.full(3, 0.5)])
    assert_same_snapshot(before, snapshot(opt))
    assert opt.state[0].step == 3


@pytest.mark.parametrize("cls, lr", [(fastopt.SGD, 0.5), (fastopt.LARS, 0.5),
                                     (fastopt.Adam, fastopt.schedules.constant(0.5))])
def test_deleted_hyperparameter_is_refused(cls, lr):
    """A group without its lr does not fall back to the rule's default (SGD's 0.01, not the
    0.5 this optimizer was made with): the step names the missing key and changes nothing."""
    opt = cls([np.zeros(3)], lr=lr)
    opt.step([np.ones(3)])
    del opt.param_groups[0]["lr"]
    before = snapshot(opt)
    for planned in (True, False):
        if not planned:
            opt._plan = None
        with pytest.raises(ValueError, match=r"param_groups\[0\] lacks hyperparameter.*'lr'"):
            opt.step([np.ones(3)])
        assert_same_snapshot(before, snapshot(opt))
    assert opt.state[0].step == 1
    opt.param_groups[0]["lr"] = lr  # assigned again, it steps
    opt.step([np.ones(3)])
    assert opt.state[0].step == 2


HUGE = 10 ** 400  # an int too large for a double: float() raises OverflowError


@pytest.mark.parametrize("make, match", [
    (lambda p: fastopt.Adam([p], lr=HUGE), "lr must be finite"),
    (lambda p: fastopt.Adam([p], betas=(HUGE, 0.9)), r"beta1 \(betas\[0\]\) must be finite"),
    (lambda p: fastopt.SGD([p], ema_decay=HUGE), "ema_decay must be finite"),
    (lambda p: fastopt.Adam([p], weight_decay=fractions.Fraction(HUGE)), "weight_decay must be finite"),
    (lambda p: fastopt.functional.adam(p, np.ones(3), fastopt.AdamState.new(p), lr=HUGE),
     "lr must be finite"),
    (lambda p: fastopt.schedules.constant(HUGE), "lr must be finite"),
])
def test_number_too_large_for_a_double_is_a_value_error(make, match):
    p = np.ones(3)
    with pytest.raises(ValueError, match=match):
        make(p)
    np.testing.assert_array_equal(p, np.ones(3), strict=True)


@pytest.mark.parametrize("options, match", [
    (dict(grad_scale=HUGE), "grad_scale must be finite"),
    (dict(clip_norm=HUGE), "clip_norm must be finite"),
    (dict(grad_scale=1e-320), r"grad_scale must be >= .*1 / grad_scale must be finite"),
])
def test_step_option_too_large_or_small_changes_nothing(options, match):
    opt = trained(fastopt.Adam, ema_decay=0.5)
    grads = good_grads(opt)
    before = snapshot(opt, grads)
    with pytest.raises(ValueError, match=match):
        opt.step(grads, **options)
    assert_same_snapshot(before, snapshot(opt, grads))


def test_hyperparameter_too_large_set_between_steps_changes_nothing():
    opt = trained(fastopt.Adam)
    opt.param_groups[0]["lr"] = HUGE
    opt._plan = None  # the validating path (the planned one: the next test)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be finite"):
        opt.step(good_grads(opt))
    assert_same_snapshot(before, snapshot(opt))


def test_hyperparameter_too_large_set_between_planned_steps():
    opt = trained(fastopt.Adam)
    opt.param_groups[0]["lr"] = HUGE
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be finite"):
        opt.step(good_grads(opt))


def test_read_only_state_buffer_is_rejected():
    opt = trained(fastopt.RMSprop)
    opt.state[1].square_avg.flags.writeable = False
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state\[1\]\.square_avg is read-only"):
        opt.step(good_grads(opt))
    assert_same_snapshot(before, snapshot(opt))


def test_param_replaced_by_bad_array_between_steps():
    opt = trained(fastopt.SGD, momentum=0.9)
    opt.param_groups[0]["params"][1] = np.ones(5, np.int32)
    with pytest.raises(TypeError):
        opt.step(good_grads(opt))


@pytest.mark.parametrize("cls", ALL)
def test_read_only_grad_is_fine(cls):
    """Read-only grads are read like any others: the step equals the step with writeable
    copies, moves every parameter, matches the float64 reference and leaves the grads alone."""
    rng = np.random.default_rng(6)
    init = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5)]
    ours, twin = [p.copy() for p in init], [p.copy() for p in init]
    opt, twin_opt = cls(ours, lr=0.1), cls(twin, lr=0.1)
    hp = {k: v for k, v in opt.param_groups[0].items()
          if k not in ("params", "decoupled_weight_decay")}
    ref, ref_state = init[1].copy(), {}
    for step in range(3):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in init]
        read_only = [g.copy() for g in grads]
        for g in read_only:
            g.flags.writeable = False
        opt.step(read_only)
        twin_opt.step(grads)
        ref = reference.RULES[cls.__name__](ref, grads[1], ref_state, **hp)
        for g, r in zip(grads, read_only):
            np.testing.assert_array_equal(r, g)
    for p, q, p0 in zip(ours, twin, init):
        np.testing.assert_array_equal(p, q)
        assert (p != p0).all()
    np.testing.assert_allclose(ours[1], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_grads_may_share_memory_with_each_other(cls):
    p1, p2 = np.ones(4), np.ones(4)
    g = np.full(4, 0.25)
    cls([p1, p2]).step([g, g])
    np.testing.assert_array_equal(p1, p2)


# ---- functional --------------------------------------------------------------------------

def test_functional_rejects_wrong_state_type():
    with pytest.raises(TypeError, match="AdamState"):
        fastopt.functional.adam(np.ones(3), np.ones(3), fastopt.SGDState())


def test_functional_rejects_grad_overlapping_state():
    p = np.ones(4)
    state = fastopt.AdamState.new(p)
    before = (p.copy(), state.m.copy(), state.v.copy())
    with pytest.raises(ValueError, match="state.m overlaps grad"):
        fastopt.functional.adam(p, state.m, state)
    np.testing.assert_array_equal(p, before[0])
    assert state.step == 0


def test_functional_bad_hyperparameter_leaves_state():
    p = np.ones(4)
    state = fastopt.AdamState.new(p)
    with pytest.raises(ValueError, match="lr"):
        fastopt.functional.adam(p, np.ones(4), state, lr=-1.0)
    assert state.step == 0 and not state.m.any()


# ---- the C layer's own checks (the last line of defence) ------------------------------------

def test_kernel_rejects_bad_hyperparameters_and_overlap():
    from fastopt import _kernels
    p, g, m, v = (np.ones(8) for _ in range(4))
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
              decoupled_weight_decay=False, maximize=False, convention=0, step=1)
    with pytest.raises(ValueError, match="hyperparameter"):
        _kernels.adam(p, g, m, v, None, {**kw, "beta1": 1.0})
    with pytest.raises(ValueError, match="hyperparameter"):
        _kernels.adam(p, g, m, v, None, {**kw, "step": 0})
    with pytest.raises(ValueError, match="overlaps"):
        _kernels.adam(p, p, m, v, None, kw)
    with pytest.raises(ValueError, match="overlaps"):
        _kernels.adam(p, g, m, m, None, kw)
    with pytest.raises(ValueError, match="8 were expected"):
        _kernels.adam(p, g[:4], m, v, None, kw)
    with pytest.raises(TypeError, match="NULL"):
        _kernels.adam(p, g, m, v, None, {**kw, "amsgrad": True})
    np.testing.assert_array_equal(p, np.ones(8))
    np.testing.assert_array_equal(m, np.ones(8))


def test_validation_cache_tells_types_apart():
    """Hyperparameters are cached by value and type: True must not vouch for 1 (1 == True)."""
    p, g = np.ones(4), np.ones(4)
    state = fastopt.AdamState.new(p)
    fastopt.functional.adam(p, g, state, maximize=True)
    with pytest.raises(TypeError, match="maximize"):
        fastopt.functional.adam(p, g, state, maximize=1)
    with pytest.raises(ValueError, match="lr"):
        fastopt.functional.adam(p, g, state, lr=float("nan"))
    assert state.step == 1


class _AnswersOnceThenAnother:
    """A sequence of one gradient whose later reads answer `later` (a wrong array)."""

    def __init__(self, first, later):
        self.first, self.later, self.reads = first, later, 0

    def __len__(self):
        return 1

    def __getitem__(self, i):
        if i >= 1:
            raise IndexError(i)
        self.reads += 1
        return self.first if self.reads == 1 else self.later


@pytest.mark.parametrize("later", ["short", "the parameter"])
@pytest.mark.parametrize("first_step", [True, False])
def test_grads_sequence_is_read_once(later, first_step):
    """The full checks read grads once and step with what they checked: a later read of a
    sequence that answers otherwise (a wrong shape, the parameter itself) raised the engine's
    RuntimeError, after a first step had created its state."""
    w, same = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    opt, plain = fastopt.Adam([w], lr=1.0), fastopt.Adam([same], lr=1.0)
    if not first_step:
        opt.step([np.ones_like(w)])
        plain.step([np.ones_like(same)])
    grads = _AnswersOnceThenAnother(np.ones_like(w), np.ones(4, np.float32) if later == "short" else w)
    opt.step(grads)
    plain.step([np.ones_like(same)])
    assert grads.reads == 1
    np.testing.assert_array_equal(w, same)
    assert opt.state[0].step == plain.state[0].step
