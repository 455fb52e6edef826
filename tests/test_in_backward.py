"""Optimizer in backward (fastopt.torch_in_backward): each parameter stepped by its
post-accumulate-grad hook gives the same training as an ordinary step after a full backward,
with fastopt.torch and against torch.optim."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from fastopt.torch_in_backward import InBackwardOptimizer, step_in_backward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
]
EVERY_CLASS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-3)),
    ("Adadelta", dict(weight_decay=1e-3)),
    ("RMSprop", dict(lr=1e-3, momentum=0.5, centered=True)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2)),
    ("Adafactor", dict(lr=1e-2, weight_decay=0.1)),  # per-tensor norms: each step whole tensors
]


class SharedMLP(torch.nn.Module):
    """`hidden` is applied twice, so its weight and bias get two gradient contributions per
    backward; `branch` is used on even steps only, so it has no gradient on odd ones."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.branch = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x, step):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))
        if step % 2 == 0:
            h = h + torch.tanh(self.branch(h))
        return self.out(h)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.branch = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x, step):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        h = torch.tanh(self.conv2(h))  # conv2 shared
        if step % 3 == 0:
            h = h + self.branch(h)
        return self.head(h.flatten(1))


MODELS = {"mlp": SharedMLP, "cnn": SmallCNN}


def loss_at(model, step, dtype):
    g = torch.Generator().manual_seed(step)
    shape = (8, 6) if isinstance(getattr(model, "module", model), SharedMLP) else (8, 1, 8, 8)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(x, step), y)


def make_model(kind, dtype):
    torch.manual_seed(0)
    return MODELS[kind]().to(dtype)


def train_normal(model, opt, steps, dtype, first=0):
    for step in range(first, first + steps):
        opt.zero_grad()
        loss_at(model, step, dtype).backward()
        opt.step()


def train_in_backward(model, opt, steps, dtype, first=0):
    for step in range(first, first + steps):
        loss_at(model, step, dtype).backward()
        opt.step()  # a no-op, as a training loop written for an ordinary optimizer calls it


def max_relative_difference(model_a, model_b):
    worst = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        scale = b.detach().abs().max().clamp_min(1e-30)
        worst = max(worst, ((a - b).abs().max() / scale).item())
    return worst


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name,hp", CASES, ids=[c[0] for c in CASES])
def test_equals_an_ordinary_step_after_backward(name, hp, kind, dtype):
    reference = make_model(kind, dtype)
    ours = copy.deepcopy(reference)
    train_normal(reference, getattr(ft, name)(reference.parameters(), **hp), 20, dtype)
    opt = step_in_backward(ours, getattr(ft, name), **hp)
    train_in_backward(ours, opt, 20, dtype)
    # the same kernels on the same gradients: bit for bit, float32 too
    assert max_relative_difference(ours, reference) == 0.0
    # and against torch.optim's own step, an independent implementation
    torch_reference = make_model(kind, dtype)
    train_normal(torch_reference, getattr(torch.optim, name)(torch_reference.parameters(),
                                                                foreach=False, **hp), 20, dtype)
    assert max_relative_difference(ours, torch_reference) <= tolerance(dtype)
    assert all(p.grad is None for p in ours.parameters())


@pytest.mark.parametrize("name,hp", EVERY_CLASS, ids=[c[0] for c in EVERY_CLASS])
def test_every_fastopt_torch_class_matches_torch_optim(name, hp):
    dtype = torch.float64
    reference = make_model("mlp", dtype)
    ours = copy.deepcopy(reference)
    train_normal(reference, getattr(torch.optim, name)(reference.parameters(), foreach=False,
                                                       **hp), 12, dtype)
    train_in_backward(ours, step_in_backward(ours, getattr(ft, name), **hp), 12, dtype)
    assert max_relative_difference(ours, reference) <= 1e-12


def test_shared_parameter_is_stepped_once_with_its_accumulated_gradient():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    opt = step_in_backward(model, ft.Adam, lr=1e-2)
    seen = {}
    for p, o in zip(opt.params, opt.optimizers):
        o.register_step_pre_hook(
            lambda o, args, kw, p=p: seen.setdefault(p, []).append(p.grad.clone()))
    twin = copy.deepcopy(model)  # before the step, for the full gradient (no hooks copied)
    full = torch.autograd.grad(loss_at(twin, 0, dtype), list(twin.parameters()))
    loss_at(model, 0, dtype).backward()
    for p, expected in zip(model.parameters(), full):
        assert len(seen[p]) == 1  # one step per backward, after both contributions
        torch.testing.assert_close(seen[p][0], expected, rtol=0, atol=0)
    # hidden's gradient really has two terms: one use alone gives something else
    one_use = twin.hidden(torch.tanh(twin.inp(torch.ones(1, 6, dtype=dtype)))).sum()
    partial = torch.autograd.grad(one_use, twin.hidden.weight)[0]
    names = [n for n, _ in twin.named_parameters()]
    assert not torch.equal(partial, full[names.index("hidden.weight")])


def test_a_parameter_without_gradient_is_not_stepped():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    opt = step_in_backward(model, ft.Adam, lr=1e-2)
    branch_before = model.branch.weight.detach().clone()
    loss_at(model, 1, dtype).backward()  # odd step: branch unused
    assert torch.equal(model.branch.weight, branch_before)
    assert model.branch.weight not in opt.state
    assert not torch.equal(model.out.weight, make_model("mlp", dtype).out.weight)
    loss_at(model, 2, dtype).backward()
    loss_at(model, 3, dtype).backward()
    assert int(opt.state[model.branch.weight]["step"]) == 1
    assert int(opt.state[model.out.weight]["step"]) == 3


def test_each_backward_is_a_step_so_gradient_accumulation_is_not_supported():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    opt = step_in_backward(model, ft.SGD, lr=0.1, momentum=0.9)
    loss_at(model, 1, dtype).backward()
    loss_at(model, 3, dtype).backward()
    assert all(p.grad is None for p in model.parameters())
    reference = make_model("mlp", dtype)
    ref_opt = ft.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in (1, 3):  # two steps, not one with the summed gradient
        ref_opt.zero_grad()
        loss_at(reference, step, dtype).backward()
        ref_opt.step()
    assert max_relative_difference(model, reference) <= 1e-12
    assert len(opt.state) == len(list(model.parameters())) - 2  # branch unused on odd steps


def test_remove_restores_ordinary_gradients():
    from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map
    dtype = torch.float64
    model = make_model("cnn", dtype)
    opt = step_in_backward(model, ft.Adam, lr=1e-2)
    loss_at(model, 0, dtype).backward()
    opt.remove()
    opt.remove()  # twice is harmless
    before = [p.detach().clone() for p in model.parameters()]
    loss_at(model, 1, dtype).backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.branch.weight
               and p is not model.branch.bias)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p in model.parameters():
        assert not hasattr(p, "_in_backward_optimizers")
        assert not param_to_optim_hook_handle_map.get(p)
    # and the parameters can take a new optimizer in backward
    model.zero_grad()
    step_in_backward(model, ft.SGD, lr=0.1)
    loss_at(model, 3, dtype).backward()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_torch_convention_attributes_and_lookup():
    from torch.distributed.optim import _get_in_backward_optimizers
    model = make_model("mlp", torch.float32)
    opt = step_in_backward(model, ft.AdamW, lr=1e-3)
    assert _get_in_backward_optimizers(model) == opt.optimizers
    assert opt.names == [n for n, _ in model.named_parameters()]
    assert opt.optimizer_for(model.out.bias) is opt.optimizers[-1]
    assert all(isinstance(o, ft.AdamW) for o in opt.optimizers)
    with pytest.raises(KeyError):
        opt.optimizer_for(torch.zeros(1))


def test_param_groups_override_the_keyword_arguments():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    reference = copy.deepcopy(model)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = step_in_backward([{"params": decay}, {"params": iter(no_decay), "weight_decay": 0.0}],
                           ft.AdamW, lr=1e-2, weight_decay=0.1)
    train_in_backward(model, opt, 8, dtype)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for n, p in reference.named_parameters() if n.endswith("weight")]},
         {"params": [p for n, p in reference.named_parameters() if n.endswith("bias")],
          "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1, foreach=False)
    train_normal(reference, ref_opt, 8, dtype)
    assert max_relative_difference(model, reference) <= 1e-12


def test_lr_scheduler_and_set_lr_drive_every_parameter():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    reference = copy.deepcopy(model)
    opt = step_in_backward(model.named_parameters(), ft.Adam, lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    for step in range(10):
        train_in_backward(model, opt, 1, dtype, first=step)
        sched.step()
        train_normal(reference, ref_opt, 1, dtype, first=step)
        ref_sched.step()
    assert {g["lr"] for g in opt.param_groups} == {1e-2 * 0.5 ** 3}
    assert max_relative_difference(model, reference) <= 1e-12
    opt.set_lr(0.25)
    assert all(o.param_groups[0]["lr"] == 0.25 for o in opt.optimizers)


def test_state_dict_round_trip_and_switching_from_an_ordinary_optimizer():
    dtype = torch.float64
    straight = make_model("cnn", dtype)
    train_in_backward(straight, step_in_backward(straight, ft.Adam, lr=1e-2), 10, dtype)

    # 5 in-backward steps, checkpoint, a fresh model and handle resume from it
    first = make_model("cnn", dtype)
    opt = step_in_backward(first, ft.Adam, lr=1e-2)
    train_in_backward(first, opt, 5, dtype)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict()})
    assert [g["params"] for g in saved["opt"]["param_groups"]] == [[i] for i in range(8)]
    assert saved["opt"]["param_groups"][2]["param_names"] == ["conv2.weight"]
    resumed = make_model("cnn", dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = step_in_backward(resumed, ft.Adam, lr=0.5)  # lr comes from the checkpoint
    opt2.load_state_dict(saved["opt"])
    train_in_backward(resumed, opt2, 5, dtype, first=5)
    assert max_relative_difference(resumed, straight) <= 1e-12

    # an ordinary torch.optim checkpoint (one group) continues in backward
    ordinary = make_model("cnn", dtype)
    ordinary_opt = torch.optim.Adam(ordinary.parameters(), lr=1e-2, foreach=False)
    train_normal(ordinary, ordinary_opt, 5, dtype)
    switched = make_model("cnn", dtype)
    switched.load_state_dict(ordinary.state_dict())
    opt3 = step_in_backward(switched, ft.Adam, lr=0.5)
    opt3.load_state_dict(copy.deepcopy(ordinary_opt.state_dict()))  # as if saved and loaded
    train_in_backward(switched, opt3, 5, dtype, first=5)
    train_normal(ordinary, ordinary_opt, 5, dtype, first=5)
    assert max_relative_difference(switched, ordinary) <= 1e-12
    assert max_relative_difference(switched, straight) <= 1e-12


def test_a_failed_load_changes_nothing():
    dtype = torch.float64
    model = make_model("mlp", dtype)
    opt = step_in_backward(model, ft.Adam, lr=1e-2)
    train_in_backward(model, opt, 3, dtype)
    before = copy.deepcopy(opt.state_dict())
    other = step_in_backward(list(make_model("cnn", dtype).parameters())[:3], ft.Adam, lr=1.0)
    with pytest.raises(ValueError, match="3 parameters.*has 8"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})

    def refuse(optimizer, state_dict):
        raise RuntimeError("refused")
    # the fourth parameter's load fails after three have loaded: all are rolled back
    opt.optimizers[3].register_load_state_dict_pre_hook(refuse)
    other = step_in_backward(make_model("mlp", dtype), ft.Adam, lr=1.0)
    with pytest.raises(RuntimeError, match="refused"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [1e-2] * 8
    assert after["state"].keys() == before["state"].keys()
    for i in before["state"]:
        for key, value in before["state"][i].items():
            assert torch.equal(after["state"][i][key], value)
    assert all(opt.optimizers[i].state[p] is opt.state[p] for i, p in enumerate(opt.params)
               if p in opt.state)


def test_bad_input_is_refused_before_any_hook_exists():
    model = make_model("mlp", torch.float32)

    def untouched():
        model.zero_grad()
        loss_at(model, 0, torch.float32).backward()
        return all(p.grad is not None for n, p in model.named_parameters() if "branch" not in n) \
            and not any(hasattr(p, "_in_backward_optimizers") for p in model.parameters())

    with pytest.raises(TypeError, match="optimizer_class"):
        step_in_backward(model, "Adam", lr=1e-3)
    with pytest.raises(TypeError, match="optimizer_class"):
        step_in_backward(model, ft.Adam(model.parameters()), lr=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        step_in_backward(model, ft.Adam, lr=-1.0)
    with pytest.raises(ValueError, match="empty parameter list"):
        step_in_backward([], ft.Adam)
    with pytest.raises(ValueError, match="more than once"):
        step_in_backward([model.out.weight, model.out.weight], ft.Adam)
    with pytest.raises(TypeError, match="single tensor"):
        step_in_backward(model.out.weight, ft.Adam)
    with pytest.raises(TypeError, match="not a tensor"):
        step_in_backward([model.out.weight, 3.0], ft.Adam)
    with pytest.raises(TypeError, match="mixes"):
        step_in_backward([("w", model.out.weight), model.out.bias], ft.Adam)
    with pytest.raises(ValueError, match="does not require grad"):
        step_in_backward([model.out.weight, torch.zeros(3)], ft.Adam)
    with pytest.raises(TypeError, match="needs float32, float64"):  # fastopt.torch's own check
        half = torch.zeros(3, dtype=torch.float16, requires_grad=True)
        step_in_backward([model.out.weight, half], ft.Adam)
    assert untouched()

    opt = step_in_backward(model, ft.Adam, lr=1e-3)
    with pytest.raises(ValueError, match="already has an optimizer in backward"):
        step_in_backward([model.inp.weight], ft.SGD, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        opt.set_lr(float("nan"))
    with pytest.raises(TypeError, match="lr must be a number"):
        opt.set_lr("0.1")
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    opt.remove()
    assert untouched()


def test_torch_apply_optimizer_in_backward_takes_a_fastopt_class():
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map
    dtype = torch.float64
    model = make_model("mlp", dtype)
    reference = copy.deepcopy(model)
    _apply_optimizer_in_backward(ft.AdamW, model.parameters(), {"lr": 1e-2, "weight_decay": 0.1})
    try:
        for step in range(12):
            loss_at(model, step, dtype).backward()
        train_normal(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2,
                                                  weight_decay=0.1, foreach=False), 12, dtype)
        assert max_relative_difference(model, reference) <= 1e-12
    finally:
        for p in model.parameters():
            for handle in param_to_optim_hook_handle_map.get(p, []):
                handle.remove()


DDP_SCRIPT = textwrap.dedent("""
    import copy, sys
    import torch, torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    import fastopt.torch as ft
    from fastopt.torch_in_backward import step_in_backward
    from test_in_backward import loss_at, make_model, train_normal, max_relative_difference

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dtype = torch.float64
    for how in ("torch", "fastopt"):
        model = make_model("mlp", dtype)
        reference = copy.deepcopy(model)
        if how == "torch":
            _apply_optimizer_in_backward(torch.optim.Adam, model.parameters(), {"lr": 1e-2})
        else:
            step_in_backward(model, ft.Adam, lr=1e-2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reference_opt = ft.Adam(reference.parameters(), lr=1e-2)
        error = None
        try:
            for step in range(0, 16, 2):  # even steps: every parameter is used
                loss_at(ddp, step, dtype).backward()
                train_normal(reference, reference_opt, 1, dtype, first=step)
        except RuntimeError as e:
            error = str(e).splitlines()[0]
        steps = sorted({int(o.state[p]["step"]) for p in model.parameters()
                        for o in p._in_backward_optimizers})
        difference = max_relative_difference(model, reference) if error is None else None
        print(repr((how, error, steps, difference)))
    dist.destroy_process_group()
""")


def test_under_ddp_it_behaves_as_torchs_own_apply_optimizer_in_backward():
    # DistributedDataParallel removes the hooks it finds in torch's in-backward registry and
    # steps param._in_backward_optimizers after its all-reduce.  step_in_backward registers its
    # hooks there, so under DDP it does exactly what torch's _apply_optimizer_in_backward does:
    # one step per backward on the reduced gradient, never a step on the local gradient first.
    # (torch 2.13's hook for this needs an accelerator: on a CPU-only torch both raise the
    # same error at the end of the first backward, after one step.)
    import ast
    run = subprocess.run([sys.executable, "-c", DDP_SCRIPT], capture_output=True, text=True,
                         timeout=300, cwd=os.path.join(ROOT, "tests"))  # not ROOT: the source
    assert run.returncode == 0, run.stderr[-3000:]                      # tree would shadow fastopt
    (_, torch_error, torch_steps, _), (_, error, steps, difference) = \
        [ast.literal_eval(line) for line in run.stdout.strip().splitlines()[-2:]]
    assert error == torch_error
    assert steps == torch_steps
    if error is None:
        assert steps == [8] and difference <= 1e-12
    else:
        assert steps == [1]
