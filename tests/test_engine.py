"""The speed machinery: every ISA and thread count gives the same bits, the many-tensor step
equals per-tensor calls, steps do not allocate, the fast path notices every change."""
import collections
import json
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import fastopt
import reference
from conftest import CASES, case_id

ISAS = ["baseline", "avx2", "avx512"]
# subprocesses start here and import the fastopt this process imported (installed or built in
# place), never a source tree without its extension
HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}


def available_isas():
    """The ISAs this CPU can run: FASTOPT_ISA=x gives x only where the CPU has it."""
    out = []
    for isa in ISAS:
        got = subprocess.run([sys.executable, "-c", "import fastopt; print(fastopt.isa())"],
                             env={**CHILD_ENV, "FASTOPT_ISA": isa}, capture_output=True,
                             text=True, check=True, cwd=HERE).stdout.strip()
        if got == isa:
            out.append(isa)
    return out


RUN_ALL_CASES = r"""
import json, sys, numpy as np, fastopt
sys.path.insert(0, sys.argv[1])
from conftest import CASES
out = {}
for k, (cls, hp) in enumerate(CASES):
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(k)
        params = [rng.standard_normal(n).astype(dtype) for n in (1, 37, 1000, 300_001)]
        opt = cls(params, **hp)
        for _ in range(4):
            opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params])
        out[f"{k}-{np.dtype(dtype).name}"] = [__import__("hashlib").sha256(p.tobytes()).hexdigest() for p in params]
print(json.dumps(out))
"""


def run_cases(env):
    res = subprocess.run([sys.executable, "-c", RUN_ALL_CASES, HERE], env={**CHILD_ENV, **env},
                         capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def baseline_results():
    return run_cases({"FASTOPT_ISA": "baseline"})


@pytest.mark.parametrize("isa", ISAS[1:])
def test_every_isa_gives_the_same_bits(isa, baseline_results):
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    assert run_cases({"FASTOPT_ISA": isa}) == baseline_results


def test_every_thread_count_gives_the_same_bits():
    results = [run_cases({"FASTOPT_NUM_THREADS": str(n)}) for n in (1, 2, 3, 8)]
    for r in results[1:]:
        assert r == results[0]


def test_set_num_threads_in_process_gives_the_same_bits():
    rng = np.random.default_rng(0)
    init = rng.standard_normal(1_000_003).astype(np.float32)
    grads = [rng.standard_normal(init.size).astype(np.float32) for _ in range(3)]
    before = fastopt.get_num_threads()
    finals = []
    try:
        for n in (1, 2, 5):
            fastopt.set_num_threads(n)
            assert fastopt.get_num_threads() == n
            p = init.copy()
            opt = fastopt.AdamW([p], amsgrad=True)
            for g in grads:
                opt.step([g])
            finals.append(p)
    finally:
        fastopt.set_num_threads(before)
    for p in finals[1:]:
        np.testing.assert_array_equal(p, finals[0])
    with pytest.raises(ValueError):
        fastopt.set_num_threads(0)
    with pytest.raises(TypeError):
        fastopt.set_num_threads(2.0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_many_tensor_step_equals_functional_calls(case):
    """The optimizer's one-call-per-group path against the functional one-tensor path."""
    cls, hp = case
    rng = np.random.default_rng(1)
    shapes = [(3, 3), (200_000,), (0,), (17,)]
    a = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    b = [x.copy() for x in a]
    opt = cls(a, **hp)
    rule = opt.rule
    h = rule.check({k: v for k, v in opt.param_groups[0].items() if k != "params"})[0]
    states = [opt.new_state(x, h) for x in b]
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(grads)
        for x, g, s in zip(b, grads, states):
            fastopt.functional.step_one(rule, x, g, s, {k: v for k, v in h.items()})
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_step_does_not_allocate():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(64, 64), (1000,), (10, 3, 3)]]
    opt = fastopt.Adam(params, amsgrad=True)
    grads = [np.ones_like(p) for p in params]
    opt.step(grads)
    opt.step(grads)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(200):
            opt.step(grads)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start <= 256, end - start   # nothing kept
    assert peak - start <= 4096, peak - start  # no buffer-sized temporaries (a param is 16 KiB)


def test_fast_path_applies_lr_changes_and_switches_options():
    rng = np.random.default_rng(2)
    p = rng.standard_normal(50)
    ref, ref_state = p.copy(), {}
    opt = fastopt.Adam([p], lr=0.1)
    for step in range(12):
        g = rng.standard_normal(50)
        if step == 4:
            opt.param_groups[0]["lr"] = 0.03        # a schedule
        if step == 8:
            opt.param_groups[0].update(weight_decay=0.5)
        opt.step([g])
        hp = {k: v for k, v in opt.param_groups[0].items()
              if k not in ("params", "decoupled_weight_decay")}
        ref = reference.adam(ref, g, ref_state, **hp)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-13)
    opt.param_groups[0]["amsgrad"] = True            # needs a buffer the plan lacked
    opt.step([np.ones(50)])
    assert opt.state[0].max_v is not None


def test_fast_path_notices_replaced_params_and_states():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(10), rng.standard_normal(10)]
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9)
    opt.step([np.ones(10), np.ones(10)])
    new = np.zeros(10)
    opt.param_groups[0]["params"][1] = new           # swapped in place in the group's list
    opt.step([np.ones(10), np.ones(10)])
    assert new.any()
    opt.state[0].momentum_buffer = np.zeros(3)       # corrupted state
    with pytest.raises(ValueError, match=r"state\[0\]\.momentum_buffer has shape"):
        opt.step([np.ones(10), np.ones(10)])
    opt.state[0].momentum_buffer = np.zeros(10)
    opt.state[0].step = 5                            # a state from elsewhere: still fine
    opt.step([np.ones(10), np.ones(10)])
    assert opt.state[0].step == 6 and opt.state[1].step == 3
    params[0].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step([np.ones(10), np.ones(10)])


class _PropertyState(fastopt.AdamState):
    """An AdamState whose m and step are properties: a data descriptor on the class comes
    before the instance dict, so the plan must read (and write) them through it."""
    reads = 0

    @property
    def m(self):
        _PropertyState.reads += 1
        return self.__dict__["_m"]

    @m.setter
    def m(self, value):
        self.__dict__["_m"] = value

    @property
    def step(self):
        return self.__dict__["_t"]

    @step.setter
    def step(self, value):
        self.__dict__["_t"] = value


def test_fast_path_reads_and_writes_state_fields_through_class_properties():
    rng = np.random.default_rng(5)
    p = rng.standard_normal(40)
    plain_p = p.copy()
    opt, plain = fastopt.Adam([p], lr=0.05), fastopt.Adam([plain_p], lr=0.05)
    grads = [[rng.standard_normal(40)] for _ in range(8)]
    opt.step(grads[0])
    plain.step(grads[0])
    old = opt.state[0]
    opt.state[0] = _PropertyState(m=old.m, v=old.v, step=old.step)
    for g in grads[1:]:
        opt.step(g)
        plain.step(g)
    np.testing.assert_array_equal(p, plain_p)
    assert opt.state[0].step == plain.state[0].step == 8
    assert opt.state[0].__dict__["_t"] == 8  # written through the setter, not the dict
    _PropertyState.reads = 0
    opt.step(grads[1])
    assert _PropertyState.reads >= 1  # the planned step went through the property


def test_fast_path_with_a_group_key_removed_is_refused():
    """del group["lr"] between planned steps: the next step names the missing key and changes
    nothing, as the validating path does (it used to take the rule's default, which need not
    be the lr the optimizer was made with); assigned again, the plan steps on."""
    p, q = np.zeros(6), np.zeros(6)
    opt = fastopt.Adam([p], lr=0.1)
    same = fastopt.Adam([q], lr=0.1)
    for _ in range(2):
        opt.step([np.ones(6)])
        same.step([np.ones(6)])
    del opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=r"param_groups\[0\] lacks hyperparameter.*'lr'"):
        opt.step([np.ones(6)])
    np.testing.assert_array_equal(p, q, strict=True)
    assert opt.state[0].step == 2
    opt.param_groups[0]["lr"] = 0.1
    opt.step([np.ones(6)])
    same.step([np.ones(6)])
    np.testing.assert_array_equal(p, q, strict=True)


def _planned_and_validated(edit):
    """Two Adam runs of three steps, `edit(opt)` before the third; the second run drops the
    plan first, so its third step takes the validating path: (params, state) of each."""
    out = []
    for planned in (True, False):
        p = np.zeros(5)
        opt = fastopt.Adam([p], lr=0.1)
        opt.step([np.ones(5)])
        opt.step([np.ones(5)])
        edit(opt)
        if not planned:
            opt._plan = None
        opt.step([np.ones(5)])
        out.append((p.copy(), opt.state[0]))
    return out


def test_fast_path_sees_a_state_whose_instance_dict_was_replaced():
    def edit(opt):
        s = opt.state[0]
        s.__dict__ = dict(s.__dict__, m=np.zeros(5), v=np.zeros(5))
    (p1, s1), (p2, s2) = _planned_and_validated(edit)
    np.testing.assert_array_equal(p1, p2)
    assert s1.step == s2.step == 3
    np.testing.assert_array_equal(s1.m, s2.m)


class _CountingState(fastopt.AdamState):
    """A state class that sees its own attribute writes."""
    step_writes = 0

    def __setattr__(self, name, value):
        if name == "step":
            _CountingState.step_writes += 1
        object.__setattr__(self, name, value)


def test_fast_path_goes_through_a_state_classes_setattr():
    def edit(opt):
        old = opt.state[0]
        opt.state[0] = _CountingState(m=old.m, v=old.v, step=old.step)
    _CountingState.step_writes = 0
    (p1, s1), (p2, s2) = _planned_and_validated(edit)
    np.testing.assert_array_equal(p1, p2)
    assert s1.step == s2.step == 3
    assert _CountingState.step_writes >= 4  # two constructions and both third steps


def test_fast_path_sees_a_parameter_moved_to_another_group():
    """The flattened parameter order unchanged, but b now takes group 1's lr of 0."""
    a, b, c = np.zeros(3), np.zeros(3), np.zeros(3)
    opt = fastopt.SGD([{"params": [a, b], "lr": 1.0}, {"params": [c], "lr": 0.0}], lr=1.0)
    opt.step([np.ones(3)] * 3)
    del opt.param_groups[0]["params"][1]
    opt.param_groups[1]["params"].insert(0, b)
    before = b.copy()
    opt.step([np.ones(3)] * 3)
    np.testing.assert_array_equal(b, before)


def test_plain_dict_groups_and_other_sequences_still_work():
    p = np.ones(8)
    opt = fastopt.SGD([p], lr=0.5)
    opt.param_groups[0] = {**opt.param_groups[0]}     # a plain dict replaces the group
    opt.step((np.ones(8),))
    opt.param_groups[0]["lr"] = 0.25
    opt.step(collections.UserList([np.ones(8)]))     # neither list nor tuple: the general path
    np.testing.assert_allclose(p, 1 - 0.5 - 0.25)


class Sub(np.ndarray):
    """A trivial ndarray subclass."""


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ndarray_subclass_grads_give_the_plain_array_step(dtype):
    """The plan takes exact ndarrays only; subclassed grads go the per-tensor way (where
    np.matrix keeps two dimensions through reshape(-1)) and must give the same step."""
    rng = np.random.default_rng(5)
    shapes = [(3, 4), (2, 3, 2), (5,)]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ours, plain = [p.copy() for p in init], [p.copy() for p in init]
    opt = fastopt.Adam(ours, lr=0.1, amsgrad=True)
    reference_opt = fastopt.Adam(plain, lr=0.1, amsgrad=True)
    for step in range(4):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        subclassed = [np.asmatrix(grads[0]), grads[1].view(Sub), grads[2].view(Sub)]
        assert [type(g) for g in subclassed] == [np.matrix, Sub, Sub]
        opt.step(grads if step == 2 else subclassed)   # on and off the plan
        reference_opt.step(grads)
    for a, b, a0 in zip(ours, plain, init):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, a0)
    assert [s.step for s in opt.state.values()] == [4, 4, 4]

    # the functional API, with a subclassed parameter too (its state buffers inherit the class)
    for param_type in (np.ndarray, np.matrix):
        p, q = np.asarray(init[0]).view(param_type).copy(), init[0].copy()
        p_state, q_state = fastopt.AdamState.new(p), fastopt.AdamState.new(q)
        for _ in range(3):
            g = rng.standard_normal(q.shape).astype(dtype)
            fastopt.functional.adam(p, np.asmatrix(g), p_state, lr=0.1, amsgrad=True)
            fastopt.functional.adam(q, g, q_state, lr=0.1, amsgrad=True)
        assert type(p) is param_type
        np.testing.assert_array_equal(np.asarray(p), q)
        assert not np.array_equal(q, init[0]) and p_state.step == 3


def test_flat_params_one_call_equals_separate_tensors():
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(5, 7), (3,), (2, 3, 4)]]
    flat = fastopt.FlatParams.from_arrays(arrays)
    for v in flat.params:
        assert np.shares_memory(v, flat.data)
    separate = [a.copy() for a in arrays]
    opt_flat = fastopt.Nadam([flat.data], lr=0.01)
    opt_sep = fastopt.Nadam(separate, lr=0.01)
    for _ in range(6):
        grads = [rng.standard_normal(a.shape).astype(np.float32) for a in arrays]
        for dst, g in zip(flat.grads, grads):
            dst[...] = g
        opt_flat.step([flat.grad])
        opt_sep.step(grads)
    for v, s in zip(flat.params, separate):
        np.testing.assert_array_equal(v, s)
    padding = np.ones(flat.data.size, bool)
    for o, v in zip(flat.offsets, flat.params):
        padding[o:o + v.size] = False
    assert not flat.data[padding].any()
    with pytest.raises(TypeError):
        fastopt.FlatParams([(2,)], dtype=np.int32)
    with pytest.raises(TypeError, match="several dtypes"):
        fastopt.FlatParams.from_arrays([np.ones(2), np.ones(2, np.float32)])


def config_line(out, key):
    """The value printed after `key:` by show_config()."""
    values = [line.split(":", 1)[1].split()[0] for line in out.splitlines()
              if line.strip().startswith(key + ":")]
    assert len(values) == 1, out
    return values[0]


def test_show_config(capsys):
    before = fastopt.get_num_threads()
    try:
        for n in (5, 1):
            fastopt.set_num_threads(n)
            fastopt.show_config()
            out = capsys.readouterr().out
            assert config_line(out, "threads") == str(n)
            assert config_line(out, "kernels") == fastopt.isa()
    finally:
        fastopt.set_num_threads(before)
    assert fastopt.isa() in ISAS
    assert "-ffp-contract=off" in out.split("build flags:")[1].splitlines()[0]
    # what the environment asks for, printed by a fresh process
    res = subprocess.run([sys.executable, "-c", "import fastopt; fastopt.show_config()"],
                         env={**CHILD_ENV, "FASTOPT_ISA": "baseline", "FASTOPT_NUM_THREADS": "3"},
                         capture_output=True, text=True, check=True, cwd=HERE)
    assert config_line(res.stdout, "kernels") == "baseline"
    assert config_line(res.stdout, "threads") == "3"


def test_fast_path_keeps_a_state_with_an_unused_buffer():
    """A state may keep a buffer its options stopped using (AMSGrad switched off): steps stay
    on the plan, yet a replaced or read-only unused buffer is still rejected."""
    p, g = np.ones(100, np.float32), np.full(100, 0.5, np.float32)
    opt = fastopt.Adam([p], amsgrad=True)
    opt.step([g])
    opt.param_groups[0]["amsgrad"] = False
    opt.step([g])
    plan = opt._plan
    opt.step([g])
    assert opt._plan is plan  # no full re-validation and new plan on every step
    opt.state[0].max_v = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"state\[0\]\.max_v has shape"):
        opt.step([g])
    opt.state[0].max_v = np.zeros(100, np.float32)
    opt.step([g])
    opt.state[0].max_v.flags.writeable = False
    before = p.copy()
    with pytest.raises(ValueError, match=r"state\[0\]\.max_v is read-only"):
        opt.step([g])
    np.testing.assert_array_equal(p, before)


@pytest.mark.parametrize("step, planned", [
    (2.0, True), (True, True), (2.5, True), (2.0, False), (True, False), (2.5, False)])
def test_a_step_count_that_is_not_an_int_is_refused(step, planned):
    """state.step = 2.0 (or True, for a state at step 1) is refused by the validating path; the
    planned one must agree (it takes a value equal to its own count)."""
    p = np.zeros(4)
    opt = fastopt.Adam([p], lr=0.1)
    for _ in range(1 if step is True else 2):
        opt.step([np.ones(4)])
    opt.state[0].step = step
    if not planned:
        opt._plan = None
    before = p.copy()
    with pytest.raises(TypeError, match=r"state\[0\]\.step must be an integer"):
        opt.step([np.ones(4)])
    np.testing.assert_array_equal(p, before, strict=True)
    assert opt.state[0].step is step


@pytest.mark.parametrize("call, error, message", [
    (lambda: fastopt.FlatParams.from_arrays([]), ValueError, "at least one parameter"),
    (lambda: fastopt.FlatParams([]), ValueError, "at least one parameter"),
    (lambda: fastopt.FlatParams([(2.5,)]), TypeError, r"shapes[0] must be a tuple of ints, got (2.5,)"),
    (lambda: fastopt.FlatParams([(2,), (3, True)]), TypeError, "shapes[1] must be a tuple of ints"),
    (lambda: fastopt.FlatParams([3, 4]), TypeError, "shapes[0] must be a tuple of ints, got 3"),
    (lambda: fastopt.FlatParams(3), TypeError, "shapes must be a list of shapes, got int"),
    (lambda: fastopt.FlatParams([(2, -1)]), ValueError, "negative dimension in shapes[0]"),
    (lambda: fastopt.FlatParams.from_arrays([np.ones(2), np.ones(2) + 1j], dtype=np.float32),
     TypeError, "arrays[1] has dtype complex128"),
    (lambda: fastopt.FlatParams.from_arrays([np.array(["a"])], dtype=np.float64),
     TypeError, "arrays[0] has dtype <U1"),
    (lambda: fastopt.FlatParams.from_arrays([np.array([1.0, 1e300])], dtype=np.float32),
     ValueError, "arrays[0] has values beyond float32's range"),
])
def test_flat_params_bad_input_is_named(call, error, message):
    """Each was misleading or silent: "several dtypes" for no arrays, 2.5 truncated to 2, a
    bare "'int' object is not iterable", imaginary parts dropped, overflow to inf."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear error, not numpy's overflow warning
        with pytest.raises(error, match=re.escape(message)):
            call()


def test_flat_params_keeps_what_converts():
    """Integers, and float64 values within float32's range (and infinities), still pack."""
    flat = fastopt.FlatParams.from_arrays([np.arange(3), np.array([0.1, -np.inf]),
                                           np.array([True])], dtype=np.float32)
    np.testing.assert_array_equal(flat.params[0], np.arange(3, dtype=np.float32), strict=True)
    np.testing.assert_array_equal(flat.params[1], np.array([0.1, -np.inf], np.float32), strict=True)
    assert flat.shapes == [(3,), (2,), (1,)] == fastopt.FlatParams([(np.int64(3),), [2], (1,)]).shapes
