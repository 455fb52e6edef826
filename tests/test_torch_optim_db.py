"""fastopt.torch against torch.optim, driven by torch's own optimizer test database.

torch ships, in torch.testing._internal.common_optimizers.optim_db, the configurations
(optim_inputs_func, with the foreach/fused/differentiable variants torch tests on CPU) and the
error inputs (optim_error_inputs_func) of each optimizer.  For every class fastopt.torch has,
every CPU configuration trains the same parameters for 10 steps with torch's class and with
fastopt.torch's, from the same start, in float32, float64, complex64 and complex128 (where
torch's class takes complex parameters; where it refuses them, fastopt.torch's must too), and
the parameters and state must agree: float64/complex128 to 1e-12 relative, float32/complex64
within accumulated rounding.  Every error input must raise torch's exception and message.

Configurations refused by design (REFUSED below; also in the README) are checked to be refused
with a clear error, never run.
"""
import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch.testing._internal imports expecttest "
                                         "(in fastopt's test extra)")
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import fastopt.torch as ft  # noqa: E402

CLASSES = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam",
           "Rprop", "ASGD", "Adafactor"]
INFOS = {info.name: info for info in optim_db if info.name in CLASSES}
assert sorted(INFOS) == sorted(CLASSES)  # the database still covers every class we have

# flag -> why fastopt.torch refuses a configuration that sets it
REFUSED = {
    "differentiable": "autograd through the update itself: fastopt's kernels write the "
                      "parameters in place outside autograd, so no graph is recorded",
    "capturable": "CUDA/XPU graph capture: fastopt's kernels run on the CPU",
}
STEPS = 10


def refusal(kwargs):
    return next((REFUSED[flag] for flag in REFUSED if kwargs.get(flag)), None)


def configs():
    for name in CLASSES:
        for inp in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, INFOS[name]):
            yield name, inp.desc, inp.kwargs


CONFIGS = list(configs())
ACCEPTED = [c for c in CONFIGS if refusal(c[2]) is None]
REFUSED_CONFIGS = [c for c in CONFIGS if refusal(c[2]) is not None]


def config_id(config):
    return f"{config[0]}-{config[1]}".replace(" ", "_")


def make_params(dtype):
    """A 4-2-3 MLP's parameters, the same for both implementations."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4), (2,), (3, 2), (3,)]
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in shapes]


def batch(step, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(6, 4, generator=gen, dtype=dtype), torch.randn(6, 3, generator=gen, dtype=dtype)


def loss_of(params, x, y):
    w1, b1, w2, b2 = params
    hidden = x @ w1.T + b1
    # complex tanh has poles (at i*pi/2), near which the model, not the optimizer, would
    # amplify rounding differences: the complex runs use a linear hidden layer
    out = (hidden if hidden.is_complex() else torch.tanh(hidden)) @ w2.T + b2
    return (out - y).abs().pow(2).mean()  # real for complex parameters too


def groups(name, params, kwargs):
    """Two param groups, the second with half the learning rate (a tensor if lr is one)."""
    lr = kwargs.get("lr", inspect.signature(getattr(torch.optim, name).__init__).parameters["lr"].default)
    half = lr.clone() * 0.5 if isinstance(lr, torch.Tensor) else lr * 0.5
    return [{"params": params[:2]}, {"params": params[2:], "lr": half}]


def train(cls, name, kwargs, dtype):
    params = make_params(dtype)
    opt = cls(groups(name, params, kwargs), **copy.deepcopy(kwargs))
    for step in range(STEPS):
        x, y = batch(step, dtype)
        opt.zero_grad()
        loss_of(params, x, y).backward()
        if step % 3 == 1:
            params[3].grad = None  # skipped this step, as torch skips a param without a grad
        if step == 5:  # a schedule changes every group's lr between steps
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].mul_(0.5)
                else:
                    g["lr"] = g["lr"] * 0.5
        opt.step()
    return params, opt


def worst_relative_error(reference, ours):
    """max |a - b| / max |a| over a tensor: relative to the tensor's scale, as the update is."""
    a, b = torch.view_as_real(reference) if reference.is_complex() else reference, \
        torch.view_as_real(ours) if ours.is_complex() else ours
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# float32 runs: 10 steps of updates whose every element is rounded differently by the two
# implementations (fastopt computes per-step scalars in double and never contracts into FMAs,
# torch rounds each op in float32); measured worst case 6.9e-7 relative (a NAdam state,
# complex64), 4.4e-7 for a parameter: the bound is 7 times that, about 40 float32 ulps
TOLERANCE = {torch.float64: 1e-12, torch.complex128: 1e-12,
             torch.float32: 5e-6, torch.complex64: 5e-6}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("config", ACCEPTED, ids=config_id)
def test_parity_with_torch_on_every_optim_db_config(config, dtype):
    name, desc, kwargs = config
    if dtype.is_complex and kwargs.get("fused"):
        pytest.skip("torch's fused kernels refuse complex parameters: nothing to compare with")
    if dtype.is_complex and not INFOS[name].supports_complex:
        # torch's class refuses complex parameters (Adafactor): fastopt.torch's must too
        with pytest.raises(RuntimeError, match="complex"):
            train(getattr(torch.optim, name), name, kwargs, dtype)
        with pytest.raises((RuntimeError, TypeError), match="complex"):
            train(getattr(ft, name), name, kwargs, dtype)
        return
    ref_params, ref_opt = train(getattr(torch.optim, name), name, kwargs, dtype)
    our_params, our_opt = train(getattr(ft, name), name, kwargs, dtype)
    tolerance = TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(ref_params, our_params)):
        assert not torch.equal(b.detach(), make_params(dtype)[i]) or kwargs.get("lr") == 0
        err = worst_relative_error(a.detach(), b.detach())
        assert err <= tolerance, (f"param {i}", err)
    ref_state, our_state = ref_opt.state_dict(), our_opt.state_dict()
    assert ref_state["param_groups"] == our_state["param_groups"] or \
        any(isinstance(g["lr"], torch.Tensor) for g in ref_state["param_groups"])
    assert ref_state["state"].keys() == our_state["state"].keys()
    for i in ref_state["state"]:
        ref, ours = ref_state["state"][i], our_state["state"][i]
        assert ref.keys() == ours.keys(), i
        for key, value in ref.items():
            if value is None:
                assert ours[key] is None
                continue
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, (i, key)
            err = worst_relative_error(value, ours[key])
            assert err <= tolerance, (i, key, err)


@pytest.mark.parametrize("config", REFUSED_CONFIGS, ids=config_id)
def test_configs_refused_by_design_are_refused_clearly(config):
    name, desc, kwargs = config
    getattr(torch.optim, name)(make_params(torch.float32), **copy.deepcopy(kwargs))  # torch takes it
    flag = next(f for f in REFUSED if kwargs.get(f))
    with pytest.raises(ValueError, match=f"{flag}=True is not supported by fastopt.torch"):
        getattr(ft, name)(make_params(torch.float32), **copy.deepcopy(kwargs))


def error_inputs():
    for name in CLASSES:
        for dtype in (torch.float32, torch.float64):
            for i, error in enumerate(INFOS[name].optim_error_inputs_func("cpu", dtype)):
                yield pytest.param(name, dtype, i, id=f"{name}-{dtype}-{error.optimizer_error_input.desc}")


def run_error_input(cls, name, dtype, index):
    # rebuilt for each implementation: the inputs hold parameters a first run could change
    error = INFOS[name].optim_error_inputs_func("cpu", dtype)[index]
    inp = error.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 2, dtype=dtype))]
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        return error, lambda: cls(params, **inp.kwargs)

    def step():
        opt = cls(params, **inp.kwargs)
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.rand_like(p)
        opt.step()
    return error, step


@pytest.mark.parametrize("name, dtype, index", error_inputs())
def test_error_inputs_raise_torchs_errors(name, dtype, index):
    error, ours = run_error_input(getattr(ft, name), name, dtype, index)
    _, theirs = run_error_input(getattr(torch.optim, name), name, dtype, index)
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            theirs()
        with pytest.warns(error.error_type, match=error.error_regex):
            ours()
        return
    with pytest.raises(error.error_type, match=error.error_regex) as expected:
        theirs()
    with pytest.raises(error.error_type, match=error.error_regex) as got:
        ours()
    assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)
