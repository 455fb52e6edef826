"""fastopt.torch takes parameters in every form torch.optim takes, keeps named state dicts
loadable both ways, and validates every group, gradient and state buffer before a step or a
load changes anything (against torch.optim itself, and bit for bit against a snapshot)."""
import collections
import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from conftest import assert_torch_unchanged, torch_snapshot  # noqa: E402


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def train(net, opt, steps=3, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def first(net):
    return net[0]


def second(net):
    return net[2]


# every form torch.optim accepts, built from a model (generators are made fresh per call)
FORMS = {
    "generator": lambda m: m.parameters(),
    "list": lambda m: list(m.parameters()),
    "tuple": lambda m: tuple(m.parameters()),
    "named generator": lambda m: m.named_parameters(),
    "named list": lambda m: list(m.named_parameters()),
    "group of generator": lambda m: [{"params": m.parameters(), "lr": 0.05}],
    "group of iterator": lambda m: [{"params": iter(list(m.parameters()))}],
    "group of tuple": lambda m: [{"params": tuple(m.parameters())}],
    "group of named generator": lambda m: [{"params": m.named_parameters()}],
    "groups per submodule": lambda m: [{"params": first(m).parameters(), "lr": 0.05},
                                       {"params": second(m).parameters()}],
    "groups of one tensor": lambda m: [{"params": first(m).weight}, {"params": first(m).bias},
                                       {"params": second(m).weight, "lr": 0.02},
                                       {"params": second(m).bias}],
    "named groups per submodule": lambda m: [{"params": first(m).named_parameters()},
                                             {"params": second(m).named_parameters(), "lr": 0.02}],
}


def groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_every_parameter_form_trains_like_torch(form, name):
    hp = dict(lr=0.1) if name == "SGD" else dict(lr=0.01)
    reference, ours = model(), model()
    topt = getattr(torch.optim, name)(FORMS[form](reference), foreach=False, **hp)
    fopt = getattr(ft, name)(FORMS[form](ours), **hp)
    assert [len(g["params"]) for g in fopt.param_groups] == [len(g["params"]) for g in topt.param_groups]
    assert sum(len(g["params"]) for g in fopt.param_groups) == 4  # nothing lost to a spent generator
    expected = groups_without_params(topt)
    for g in expected:
        g["foreach"] = None
    assert groups_without_params(fopt) == expected  # param_names included
    before = [p.detach().clone() for p in ours.parameters()]
    train(reference, topt)
    train(ours, fopt)
    for a, b, start in zip(reference.parameters(), ours.parameters(), before):
        assert not torch.equal(b.detach(), start)  # every parameter trained
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params_of", [
    lambda m: {"params": second(m).parameters(), "lr": 0.02},
    lambda m: {"params": iter([second(m).weight, second(m).bias])},
    lambda m: {"params": (second(m).weight, second(m).bias)},
    lambda m: {"params": second(m).weight},
], ids=["generator", "iterator", "tuple", "tensor"])
def test_add_param_group_takes_every_form(params_of):
    reference, ours = model(), model()
    topt = torch.optim.Adam(first(reference).parameters(), lr=0.01, foreach=False)
    fopt = ft.Adam(first(ours).parameters(), lr=0.01)
    topt.add_param_group(params_of(reference))
    fopt.add_param_group(params_of(ours))
    assert [len(g["params"]) for g in fopt.param_groups] == [len(g["params"]) for g in topt.param_groups]
    before = second(ours).weight.detach().clone()
    train(reference, topt)
    train(ours, fopt)
    assert not torch.equal(second(ours).weight.detach(), before)
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def test_add_named_param_group_to_a_named_optimizer():
    reference, ours = model(), model()
    topt = torch.optim.SGD(first(reference).named_parameters(), lr=0.1)
    fopt = ft.SGD(first(ours).named_parameters(), lr=0.1)
    topt.add_param_group({"params": second(reference).named_parameters(prefix="2")})
    fopt.add_param_group({"params": second(ours).named_parameters(prefix="2")})
    assert fopt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    train(reference, topt)
    train(ours, fopt)
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the exception itself is what is compared
        return e
    raise AssertionError("no exception")


# mixes torch.optim rejects: fastopt.torch raises torch's own error and keeps its groups
REJECTED_AT_CONSTRUCTION = {
    "a tensor, not an iterable": lambda m: first(m).weight,
    "a group of a set": lambda m: [{"params": set(m.parameters())}],
    "named and unnamed in a group": lambda m: [("w", first(m).weight), first(m).bias],
    "named and unnamed groups": lambda m: [{"params": [first(m).weight]},
                                          {"params": [("b", first(m).bias)]}],
    "a param in two groups": lambda m: [{"params": [first(m).weight]},
                                        {"params": [first(m).weight]}],
    "not a tensor": lambda m: [first(m).weight, 3.0],
    "empty": lambda m: [],
    "a non-leaf tensor": lambda m: [first(m).weight * 2],
}


@pytest.mark.parametrize("case", REJECTED_AT_CONSTRUCTION)
def test_rejected_mixes_raise_torchs_error(case):
    m = model()
    expected = raised(lambda: torch.optim.Adam(REJECTED_AT_CONSTRUCTION[case](m)))
    got = raised(lambda: ft.Adam(REJECTED_AT_CONSTRUCTION[case](m)))
    assert type(got) is type(expected) and str(got) == str(expected)


REJECTED_GROUPS = {
    "not a dict": lambda m: [second(m).weight],
    "a set": lambda m: {"params": {second(m).weight}},
    "named group in an unnamed optimizer": lambda m: {"params": second(m).named_parameters()},
    "a param already in a group": lambda m: {"params": [first(m).weight]},
}


@pytest.mark.parametrize("case", REJECTED_GROUPS)
def test_rejected_groups_raise_torchs_error_and_change_nothing(case):
    m = model()
    topt = torch.optim.Adam(first(m).parameters())
    fopt = ft.Adam(first(m).parameters())
    expected = raised(lambda: topt.add_param_group(REJECTED_GROUPS[case](m)))
    got = raised(lambda: fopt.add_param_group(REJECTED_GROUPS[case](m)))
    assert type(got) is type(expected) and str(got) == str(expected)
    assert len(fopt.param_groups) == 1 and len(fopt.param_groups[0]["params"]) == 2


def test_group_fastopt_cannot_update_is_rejected_and_not_kept():
    m = model()
    opt = ft.Adam(first(m).parameters())
    with pytest.raises(TypeError, match="param group 1.*float16"):
        opt.add_param_group({"params": iter([torch.zeros(2, dtype=torch.float16, requires_grad=True)])})
    with pytest.raises(ValueError, match="param group 1: Invalid learning rate: nan"):
        opt.add_param_group({"params": second(m).parameters(), "lr": float("nan")})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": second(m).parameters()})  # the parameters are still free
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW",
                                  "Adamax", "NAdam"])
def test_named_state_dicts_load_both_ways(name, direction):
    hp = dict(lr=0.05, momentum=0.9) if name == "SGD" else {}
    first_impl, second_impl = (torch.optim, ft) if direction == "torch->fastopt" else (ft, torch.optim)
    net = model()

    def params(m):
        return [{"params": first(m).named_parameters(prefix="0")},
                {"params": second(m).named_parameters(prefix="2"), "lr": 0.02}]

    opt = getattr(first_impl, name)(params(net), **hp)
    train(net, opt, 4)
    saved = opt.state_dict()
    assert [g["param_names"] for g in saved["param_groups"]] == [["0.weight", "0.bias"],
                                                                 ["2.weight", "2.bias"]]
    resumed = copy.deepcopy(net)
    opt2 = getattr(second_impl, name)(params(resumed), **hp)
    opt2.load_state_dict(copy.deepcopy(saved))
    assert opt2.state_dict()["param_groups"] == saved["param_groups"]
    train(net, opt, 4, start=4)
    train(resumed, opt2, 4, start=4)
    for a, b in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


def test_state_dict_is_a_snapshot():
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 2)
    saved = opt.state_dict()
    exp_avg = saved["state"][0]["exp_avg"].clone()
    train(net, opt, 2, start=2)
    assert torch.equal(saved["state"][0]["exp_avg"], exp_avg)
    assert int(saved["state"][0]["step"]) == 2 and int(opt.state_dict()["state"][0]["step"]) == 4


# ---- validation before anything changes ------------------------------------------------------

def two_group_optimizer(name, **hp):
    a = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
    b = torch.randn(4, generator=torch.Generator().manual_seed(2)).requires_grad_()
    opt = getattr(ft, name)([{"params": [a]}, {"params": [b]}], **hp)
    a.grad, b.grad = torch.ones_like(a), torch.full_like(b, 0.5)
    opt.step()  # state and counters exist in both groups
    return opt, a, b


BAD_HYPERPARAMETERS = [
    ("Adam", {}, "lr", float("nan"), ValueError, r"param group 1: Invalid learning rate: nan .*group\['lr'\]"),
    ("Adam", {}, "lr", float("inf"), ValueError, r"param group 1: Invalid learning rate: inf"),
    ("Adam", {}, "lr", -0.1, ValueError, r"param group 1: Invalid learning rate: -0.1"),
    ("Adam", {}, "lr", torch.tensor([0.1, 0.2]), ValueError, r"param group 1: Tensor lr must be 1-element"),
    ("Adam", {}, "lr", "0.1", TypeError, r"param group 1: group\['lr'\] must be a number"),
    ("Adam", {}, "betas", (0.9, 1.0), ValueError, r"param group 1: Invalid beta parameter at index 1: 1.0"),
    ("Adam", {}, "eps", -1e-8, ValueError, r"param group 1: Invalid epsilon value"),
    ("Adam", {}, "weight_decay", float("nan"), ValueError, r"param group 1: Invalid weight_decay value: nan"),
    ("Adam", {}, "capturable", True, ValueError, r"param group 1: capturable=True is not supported"),
    ("Adam", {}, "differentiable", True, ValueError, r"param group 1: differentiable=True"),
    ("AdamW", {}, "betas", (-0.1, 0.9), ValueError, r"param group 1: Invalid beta parameter at index 0"),
    # (an IndexError, and a third value silently ignored)
    ("Adam", {}, "betas", (0.9,), ValueError, r"param group 1: betas must be a pair \(2 values\), got \(0\.9,\)"),
    ("Adam", {}, "betas", (0.9, 0.99, 0.5), ValueError, r"param group 1: betas must be a pair"),
    ("Rprop", {}, "etas", [0.5], ValueError, r"param group 1: etas must be a pair"),
    ("SGD", dict(lr=0.1, momentum=0.9), "momentum", -0.5, ValueError, r"param group 1: Invalid momentum value: -0.5"),
    ("SGD", dict(lr=0.1, momentum=0.9), "dampening", 1.5, ValueError, r"param group 1: Invalid dampening value: 1.5"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1), "nesterov", True, ValueError, r"param group 1: Nesterov momentum requires"),
    ("Adagrad", {}, "lr_decay", -1.0, ValueError, r"param group 1: Invalid lr_decay value: -1.0"),
    ("Adadelta", {}, "rho", 1.0, ValueError, r"param group 1: Invalid rho value: 1.0 .*\[0, 1\)"),
    ("RMSprop", {}, "alpha", float("nan"), ValueError, r"param group 1: Invalid alpha value: nan"),
    ("RMSprop", {}, "momentum", float("inf"), ValueError, r"param group 1: Invalid momentum value: inf"),
    ("Adamax", {}, "eps", float("nan"), ValueError, r"param group 1: Invalid epsilon value: nan"),
    ("NAdam", {}, "momentum_decay", -0.2, ValueError, r"param group 1: Invalid momentum_decay value: -0.2"),
]


@pytest.mark.parametrize("name, hp, key, value, error, message", BAD_HYPERPARAMETERS,
                         ids=[f"{c[0]}-{c[2]}={c[3]!r}" for c in BAD_HYPERPARAMETERS])
def test_bad_hyperparameter_in_a_later_group_changes_nothing(name, hp, key, value, error, message):
    opt, a, b = two_group_optimizer(name, **hp)
    before = torch_snapshot(opt)
    opt.param_groups[1][key] = value  # as a scheduler or a user would, after construction
    with pytest.raises(error, match=message):
        opt.step()
    assert_torch_unchanged(before, torch_snapshot(opt))


def test_torchs_wording_for_a_nan_lr():
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=float("nan"))
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        ft.Adam([torch.zeros(1, requires_grad=True)], lr=float("nan"))


def _wrong_dtype(b):
    b.data = b.data.double()  # torch's grad setter refuses a mixed pair; a .data swap gets past it


def _wrong_shape(b):
    b.data = torch.zeros(5)  # the gradient keeps shape (4,)


BAD_GRADIENTS = {
    "sparse": (lambda b: setattr(b, "grad", torch.full((4,), 0.5).to_sparse()), TypeError, "sparse"),
    "dtype": (_wrong_dtype, TypeError, "float64"),
    "shape": (_wrong_shape, TypeError, r"shape \(4,\)"),
    "aliases the parameter": (lambda b: setattr(b, "grad", b.detach()), ValueError, "shares memory"),
}


@pytest.mark.parametrize("name, case", [
    (name, case) for name in ["Adam", "SGD", "NAdam", "Adagrad"] for case in BAD_GRADIENTS
    # SGD and Adagrad take sparse gradients, as torch's do (tests/test_torch_sparse.py)
    if not (case == "sparse" and name in ("SGD", "Adagrad"))])
def test_bad_gradient_in_a_later_group_changes_nothing(name, case):
    opt, a, b = two_group_optimizer(name, **(dict(lr=0.1, momentum=0.9) if name == "SGD" else {}))
    before = torch_snapshot(opt)
    spoil, error, message = BAD_GRADIENTS[case]
    spoil(b)
    with pytest.raises(error, match=f"param group 1, parameter 0.*{message}"):
        opt.step()
    if case in ("dtype", "shape"):
        before[0][1] = b.detach().clone()  # the test itself replaced b's data
    assert_torch_unchanged(before, torch_snapshot(opt))


def test_parameter_listed_twice_is_refused_before_anything_changes():
    """torch.optim warns at construction and then updates a repeated parameter twice per
    step; fastopt.torch warns alike and refuses the step (one C call would update both copies
    from one state), in one group or across groups, before and after a planned step."""
    p = torch.zeros(3, requires_grad=True)
    for cls in (torch.optim.Adam, ft.Adam):
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = cls([p, p], lr=0.1)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"param group 0, parameter 1 is also parameter 0 of "
                                         r"param group 0: a parameter appears more than once"):
        opt.step()
    assert torch.equal(p, torch.zeros(3)) and not opt.state.get(p)

    opt, a, b = two_group_optimizer("Adam")
    opt.step()  # (a planned step)
    for group, repeated, message in ((0, a, "param group 0, parameter 1 is also parameter 0 of "
                                            "param group 0"),
                                     (1, a, "param group 1, parameter 1 is also parameter 0 of "
                                            "param group 0")):
        opt.param_groups[group]["params"].append(repeated)
        before = torch_snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.step()
        assert_torch_unchanged(before, torch_snapshot(opt))
        opt.param_groups[group]["params"].pop()
    opt.step()
    assert int(opt.state[a]["step"]) == int(opt.state[b]["step"]) == 3


def test_corrupt_state_buffer_is_caught_at_load_and_at_step():
    opt, a, b = two_group_optimizer("Adam")
    saved = opt.state_dict()
    saved["state"][1]["exp_avg"] = torch.zeros(3)  # wrong shape: a kernel would run off its end
    before = torch_snapshot(opt)
    groups = opt.param_groups
    with pytest.raises(ValueError, match=r"param group 1, parameter 0: state 'exp_avg'.*shape \(3,\)"):
        opt.load_state_dict(saved)
    assert opt.param_groups is groups
    assert_torch_unchanged(before, torch_snapshot(opt))
    good = opt.state[b]["exp_avg_sq"]
    opt.state[b]["exp_avg_sq"] = torch.zeros(4, dtype=torch.float64)  # changed by hand
    with pytest.raises(ValueError, match=r"param group 1, parameter 0: state 'exp_avg_sq'.*float64"):
        opt.step()
    opt.state[b]["exp_avg_sq"] = good
    assert_torch_unchanged(before, torch_snapshot(opt))


def test_named_parameter_is_named_in_errors():
    w = torch.zeros(3, requires_grad=True)
    opt = ft.Adam([("encoder.w", w)])
    w.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match=r"param group 0, parameter 0 \('encoder.w'\)"):
        opt.step()


def test_tensor_lr_is_read_each_step():
    p = torch.zeros(3, requires_grad=True)
    lr = torch.tensor(0.5)
    opt = ft.SGD([p], lr=lr)
    p.grad = torch.ones(3)
    opt.step()
    lr.fill_(0.25)  # as torch's schedulers update a tensor lr in place
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), -0.75))


def test_optimizer_survives_deepcopy_and_pickle():
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._lock is not opt._lock
        clone.load_state_dict(opt.state_dict())  # takes the recreated lock
        assert int(clone.state_dict()["state"][0]["step"]) == 2


# ---- the planned step: hooks, the profiler, changed values ------------------------------------

def test_step_hooks_and_the_profiler_see_every_step():
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(
        lambda o, args, kwargs: calls.append("global pre"))
    try:
        train(net, opt, steps=3)
    finally:
        handle.remove()
    assert calls == ["global pre", "pre", "post"] * 3
    with torch.profiler.profile() as prof:
        train(net, opt, steps=2, start=3)
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#Adam.step") == 2


@pytest.mark.parametrize("name, hp, change, replans", [
    ("Adam", dict(lr=0.01), dict(weight_decay=0.1, betas=(0.8, 0.99), maximize=True), False),
    ("NAdam", dict(lr=0.01), dict(momentum_decay=0.002, eps=1e-6), False),
    ("SGD", dict(lr=0.05, momentum=0.0), dict(momentum=0.9), True),
])
def test_values_changed_between_steps_match_torch(name, hp, change, replans):
    """lr from a schedule every step (the plan stays), then other values (the plan stays) or
    an option that needs another state buffer (the plan is rebuilt): the same numbers as
    torch.optim all along."""
    nets = model(), model()
    opts = getattr(torch.optim, name)(nets[0].parameters(), **hp), getattr(ft, name)(nets[1].parameters(), **hp)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.1 * t)) for o in opts]
    plans = []
    for step in range(12):
        if step == 6:
            for o in opts:
                o.param_groups[0].update(change)
        for net, opt, sched in zip(nets, opts, scheds):
            train(net, opt, steps=1, start=step)
            sched.step()
        plans.append(opts[1]._plan)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert plans[1] is plans[5]  # the lr changes kept the plan
    assert (plans[6] is not plans[5]) == replans


class _ShadowGrad(torch.nn.Parameter):
    """A parameter type that routes .grad through its own property (the plan must not read
    torch's getter directly for it)."""
    reads = 0

    @property
    def grad(self):
        type(self).reads += 1
        return torch.nn.Parameter.grad.__get__(self)

    @grad.setter
    def grad(self, value):
        torch.nn.Parameter.grad.__set__(self, value)


@pytest.mark.parametrize("kind", ["tensor", "parameter", "own grad property"])
def test_planned_steps_read_each_parameter_type_like_torch(kind):
    """The plan reads .grad through torch's getter for tensors and parameters and through a
    subclass's own property where it has one: the same numbers as torch.optim, step after step."""
    make = {"tensor": lambda t: t.clone().requires_grad_(),
            "parameter": lambda t: torch.nn.Parameter(t.clone()),
            "own grad property": lambda t: _ShadowGrad(t.clone())}[kind]
    init = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours, theirs = [make(t) for t in init], [t.clone().requires_grad_() for t in init]
    opts = ft.Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1)
    _ShadowGrad.reads = 0
    for step in range(6):
        g = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(5, 3, generator=g) for _ in init]
        for params, opt in zip((ours, theirs), opts):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert opts[0]._plan is not None
    if kind == "own grad property":
        assert _ShadowGrad.reads >= 6 * len(init)  # the planned steps went through it too


@pytest.mark.parametrize("what", ["buffer", "state dict", "OrderedDict state"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_state_buffer_replaced_between_steps_is_used_like_torch(name, what):
    """A state buffer, or a parameter's whole state dict, replaced by the user between planned
    steps (a momentum reset) is the one the next step reads and writes, as in torch.optim; the
    replaced one is never written.  Also for a state held in a dict subclass (OrderedDict)."""
    hp = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.05)
    buffer = "momentum_buffer" if name == "SGD" else "exp_avg"
    nets = model(), model()
    opts = getattr(torch.optim, name)(nets[0].parameters(), **hp), getattr(ft, name)(nets[1].parameters(), **hp)
    for step in range(8):
        if step == 2 and what == "OrderedDict state":  # planned with a dict subclass as state
            for net, opt in zip(nets, opts):
                weight = first(net).weight
                opt.state[weight] = collections.OrderedDict(opt.state[weight])
        if step == 4:
            for net, opt in zip(nets, opts):
                state = opt.state[first(net).weight]
                old = state[buffer]
                kept = old.clone()
                if what != "state dict":
                    opt.state[first(net).weight][buffer] = torch.zeros_like(old)
                else:  # a fresh dict: zeroed buffers, the same step count
                    opt.state[first(net).weight] = {k: torch.zeros_like(v) if k == buffer else v.clone()
                                                    for k, v in state.items()}
        for net, opt in zip(nets, opts):
            train(net, opt, steps=1, start=step)
        if step == 4:
            assert torch.equal(old, kept)  # fastopt's old buffer: not written after the swap
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_parameter_made_bfloat16_after_construction_is_refused():
    """p.data replaced by a bfloat16 tensor after the optimizer was made for float32 (no
    bfloat16 storage options): a TypeError naming the parameter, nothing changed."""
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.1)
    train(net, opt, steps=1)
    w = first(net).weight
    w.data = w.data.to(torch.bfloat16)
    w.grad = torch.ones_like(w)
    before = {k: v.clone() for k, v in opt.state[w].items()}
    with pytest.raises(TypeError, match="now torch.bfloat16"):
        opt.step()
    assert all(torch.equal(opt.state[w][k], v) for k, v in before.items())
