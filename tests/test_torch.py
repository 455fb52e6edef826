"""fastopt.torch against torch.optim: parity on real models, checkpoints both ways, errors,
and distributed training (DDP, ZeroRedundancyOptimizer) in 2 processes."""
import copy
import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
import torchrun  # noqa: E402
from torchrun import retry_reason  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-3, initial_accumulator_value=0.1, weight_decay=1e-3)),
    ("Adadelta", dict(weight_decay=1e-3)),
    ("RMSprop", dict(lr=1e-3)),
    ("RMSprop", dict(lr=1e-3, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-3, maximize=True)),
    ("Adam", dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("Adamax", dict(lr=1e-2, weight_decay=1e-3)),
    ("NAdam", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2, momentum_decay=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=1e-2)),
    ("RAdam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Rprop", dict(lr=1e-3)),
    ("Rprop", dict(lr=1e-3, etas=(0.4, 1.3), step_sizes=(1e-5, 1e-2), maximize=True)),
    ("ASGD", dict(lr=1e-2)),
    ("ASGD", dict(lr=5e-2, lambd=1e-2, alpha=0.5, t0=50, weight_decay=1e-3, maximize=True)),
    ("Adafactor", dict(lr=1e-2)),
    ("Adafactor", dict(lr=5e-2, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=2.0, weight_decay=0.1,
                       maximize=True)),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def cnn():
    # tanh, not ReLU: float32 runs whose last bits differ stay close for 200 steps only on a
    # smooth model; with ReLU one unit flipping sign sends two runs apart by ~1e-3, as happens
    # between any two implementations that round differently (the float64 runs show the
    # formulas agree to 1e-12 either way)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))


def data(model_fn, step, dtype):
    g = torch.Generator().manual_seed(step)
    shape = (16, 6) if model_fn is mlp else (16, 1, 8, 8)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def train_pair(name, hp, model_fn, dtype, steps=200):
    torch.manual_seed(0)
    reference = model_fn().to(dtype)
    ours = copy.deepcopy(reference)
    opts = [getattr(torch.optim, name)(reference.parameters(), foreach=False, **hp),
            getattr(ft, name)(ours.parameters(), **hp)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5) for o in opts]
    for step in range(steps):
        x, y = data(model_fn, step, dtype)
        for model, opt, sched in zip((reference, ours), opts, scheds):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if hp.get("maximize"):
                    loss = -loss  # ascend the negated loss: the same training, bounded
                loss.backward()
                return loss
            opt.step(closure)
            sched.step()
    return reference, ours, opts


def assert_close(reference, ours, rtol):
    for a, b in zip(reference.parameters(), ours.parameters()):
        scale = a.detach().abs().max().item()
        err = (a.detach() - b.detach()).abs().max().item()
        assert err <= rtol * scale, (err, scale)


@pytest.mark.parametrize("model_fn", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name, hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity_float32(name, hp, model_fn):
    reference, ours, _ = train_pair(name, hp, model_fn, torch.float32)
    assert_close(reference, ours, 1e-5)


@pytest.mark.parametrize("model_fn", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name, hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity_float64(name, hp, model_fn):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's scalar state (step, mu_product) in float64
    try:
        reference, ours, _ = train_pair(name, hp, model_fn, torch.float64)
    finally:
        torch.set_default_dtype(previous)
    assert_close(reference, ours, 1e-12)


@pytest.mark.parametrize("name, hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_state_dict_layout_matches_torch(name, hp):
    reference, ours, (topt, fopt) = train_pair(name, hp, mlp, torch.float32, steps=3)
    a, b = topt.state_dict(), fopt.state_dict()
    for group in a["param_groups"]:
        group["foreach"] = None  # the reference was built with foreach=False, ours with defaults
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, value in a["state"][k].items():
            assert b["state"][k][key].dtype == value.dtype and b["state"][k][key].shape == value.shape


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name, hp", [CASES[1], CASES[6], CASES[8], CASES[14], CASES[17],
                                      CASES[19], CASES[21], CASES[23]],
                         ids=["SGD", "RMSprop", "Adam", "NAdam", "RAdam", "Rprop", "ASGD",
                              "Adafactor"])
def test_checkpoints_move_both_ways(name, hp, direction):
    first, second = (torch.optim, ft) if direction == "torch->fastopt" else (ft, torch.optim)
    torch.manual_seed(0)
    model = mlp()
    opt = getattr(first, name)(model.parameters(), **hp)

    def run(model, opt, steps, start):
        for step in range(start, start + steps):
            x, y = data(mlp, step, torch.float32)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    run(model, opt, 20, 0)
    resumed = copy.deepcopy(model)
    opt2 = getattr(second, name)(resumed.parameters(), **hp)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, 20, 20)     # the original continues
    run(resumed, opt2, 20, 20)  # the other implementation continues from the checkpoint
    assert_close(model, resumed, 1e-5)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="meta"):
        ft.Adam([torch.empty(3, device="meta", requires_grad=True)])
    with pytest.raises(TypeError, match="float16"):
        ft.Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError, match="contiguous"):
        ft.SGD([torch.zeros(4, 4).t().requires_grad_()])
    with pytest.raises(ValueError, match="sparse"):
        ft.SGD([torch.zeros(3, 3).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="capturable"):
        ft.Adam([torch.zeros(3, requires_grad=True)], capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        ft.Adam([torch.zeros(3, requires_grad=True)], differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own checks
        ft.Adam([torch.zeros(3, requires_grad=True)], lr=-1.0)
    ft.Adam([torch.zeros(3, requires_grad=True)], foreach=True)  # accepted, and ignored
    opt = ft.Adam([torch.zeros(3, requires_grad=True)], fused=True)
    with pytest.raises(TypeError, match="float16"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float16, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_bad_gradient_changes_nothing():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = ft.Adam([a, b], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(2).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert not a.detach().any() and not opt.state


def test_add_param_group_zero_grad_and_skipped_grads():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = ft.SGD([a], lr=0.5, momentum=0.9)
    opt.add_param_group({"params": [b], "lr": 0.25})
    a.grad = torch.ones(3)
    opt.step()                      # b has no grad: untouched, as in torch
    assert torch.equal(a.detach(), torch.full((3,), 0.5)) and torch.equal(b.detach(), torch.ones(3))
    opt.zero_grad()
    assert a.grad is None


def test_version_counter_moves_like_an_in_place_update():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    before = p._version
    ft.Adam([p]).step()
    assert p._version > before


# ---- distributed: 2 processes on 127.0.0.1 (gloo) ------------------------------------------

# seconds; a healthy run takes 5-30 s on this project's 2 vCPUs (the longer with a load of 10),
# and longer than the example's gloo timeout (60 s), so that a stuck collective raises first
RUN_TIMEOUT = 90


def load_example():
    spec = importlib.util.spec_from_file_location("ddp_train", os.path.join(ROOT, "examples", "ddp_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(tmp_path, steps, *args):
    """examples/ddp_train.py under torchrun, 2 ranks (tests/torchrun.py: killed and retried
    when gloo hangs or fails); returns rank 0's and rank 1's params."""
    return torchrun.run_example(
        tmp_path, "ddp_train.py",
        lambda folder: ["--steps", str(steps), "--out", str(folder / "params.pt"), *args],
        lambda folder: (torch.load(folder / "params.pt"), torch.load(folder / "params.pt.1")),
        RUN_TIMEOUT,
        finished=lambda folder: (folder / "params.pt").exists() and (folder / "params.pt.1").exists())


@pytest.mark.parametrize("zero", [False, True], ids=["DDP", "DDP+ZeroRedundancyOptimizer"])
def test_distributed_training_matches_single_process(tmp_path, zero):
    steps = 60
    rank0, rank1 = run_example(tmp_path, steps, *(["--zero"] if zero else []))
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)     # the ranks agree exactly
    # one process, the whole batches, torch.optim.Adam: the same training
    ex = load_example()
    model = ex.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    for x, y in ex.batches(steps, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert len(rank0) == len(list(model.parameters()))
    for a, b in zip(model.parameters(), rank0):
        scale = a.detach().abs().max().item()
        assert (a.detach() - b).abs().max().item() <= 1e-5 * scale


TORCHRUN_TAIL = """E1126 01:26:08 api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 8686)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


@pytest.mark.parametrize("log, finished, retried", [
    ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"ddp_train.py\"\n"
     "[rank0]: ValueError: Invalid learning rate: -1.0\n", False, False),
    ("[rank0]: ValueError: state[3].m has shape (2,), the parameter has (4,)\n"
     "[rank1]: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer\n",
     False, False),
    ("[rank1]: torch.distributed.DistBackendError: [../third_party/gloo/gloo/transport/tcp/"
     "unbound_buffer.cc:81] Timed out waiting 60000ms for recv operation to complete\n",
     False, True),
    ("step   50  loss 0.6549\n  exitcode  : -6 (pid: 8685)\n", True, True),
    ("step   50  loss 0.6549\n  exitcode  : -11 (pid: 8685)\n", False, False),
], ids=["python-error", "python-error-and-peer-lost", "gloo-timeout", "teardown-abort",
        "crash-in-training"])
def test_only_hangs_and_gloo_failures_are_retried(log, finished, retried):
    assert (retry_reason(1, False, log + TORCHRUN_TAIL, finished, RUN_TIMEOUT) is not None) == retried
    assert retry_reason(-9, True, log, finished, RUN_TIMEOUT) is not None  # a hang, whatever it printed
    assert retry_reason(0, False, log, True, RUN_TIMEOUT) is None


# ---- Lion, LAMB, LARS: torch has none; against the float64 references (tests/reference.py) ---

NO_TORCH_CASES = [
    ("Lion", dict()), ("Lion", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, maximize=True)),
    ("LAMB", dict()), ("LAMB", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1,
                                    maximize=True)),
    ("LARS", dict(lr=0.1)), ("LARS", dict(lr=0.5, momentum=0.5, weight_decay=0.01,
                                          trust_coefficient=0.02, maximize=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, hp", NO_TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(NO_TORCH_CASES)])
def test_classes_torch_lacks_match_the_reference(name, hp, dtype):
    import inspect
    import numpy as np
    import reference
    ref_fn = getattr(reference, name.lower())
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
              for shape in ((7, 5), (33,), (2, 3, 4))]
    params[2].data.zero_()  # a zero tensor: the per-tensor rules' ratio of 1
    init = [p.detach().clone() for p in params]
    lr = hp.get("lr", inspect.signature(getattr(ft, name)).parameters["lr"].default)
    opt = getattr(ft, name)([{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}], **hp)
    refs, ref_states = [p.double().numpy() for p in init], [{} for _ in params]
    accepted = set(inspect.signature(ref_fn).parameters)
    for step in range(60):
        if step == 30:  # a schedule
            for group in opt.param_groups:
                group["lr"] *= 0.3
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        if step % 7 == 3:
            params[1].grad = None  # skipped this step
        opt.step()
        k = 0
        for group in opt.param_groups:
            group_hp = {key: v for key, v in group.items() if key in accepted}
            for p in group["params"]:
                if p.grad is not None:
                    refs[k] = ref_fn(refs[k], p.grad.double().numpy(), ref_states[k], **group_hp)
                k += 1
    for p, r, p0, ref_state in zip(params, refs, init, ref_states):
        p, p0 = p.detach().double().numpy(), p0.double().numpy()
        if dtype == torch.float32:
            keep = reference.comparable(ref_state, p.shape)
            p, r, p0 = p[keep], r[keep], p0[keep]
        moved, ref_moved = p - p0, r - p0
        scale = np.abs(ref_moved).max()
        assert scale > 0
        if dtype == torch.float64:
            np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=1e-12 * scale)
        else:  # each of the 60 steps rounds the parameter to float32 (~6e-8 of it)
            rounding = 60 * 2.0 ** -24 * np.abs(p0).max()
            np.testing.assert_allclose(moved, ref_moved, rtol=0, atol=2e-4 * scale + rounding)
    state = opt.state_dict()["state"]
    keys = {"Lion": ["exp_avg"], "LAMB": ["exp_avg", "exp_avg_sq"], "LARS": ["momentum_buffer"]}
    assert sorted(state[0]) == keys[name] + ["step"] and state[0]["step"].item() == 60
    assert state[1]["step"].item() == 60 - len([s for s in range(60) if s % 7 == 3])


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_asgd_eta_and_mu_are_rounded_as_torchs(default_dtype):
    """torch makes the next eta and mu tensors of the default dtype before copying them into
    the state, so a float64 state (load_state_dict onto float64 parameters casts it) holds
    float32 values under the usual default: the same bits here, planned steps included."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        gen = torch.Generator().manual_seed(6)
        init = torch.randn(50, dtype=torch.float64, generator=gen)
        params = [init.clone().requires_grad_() for _ in range(2)]
        hp = dict(lr=5e-2, lambd=1e-2, alpha=0.5, t0=2)
        opts = [ft.ASGD([params[0]], **hp), torch.optim.ASGD([params[1]], **hp)]
        for step in range(6):
            g = torch.randn(50, dtype=torch.float64, generator=gen)
            for p, opt in zip(params, opts):
                p.grad = g.clone()
                opt.step()
                if step == 0:
                    opt.load_state_dict(opt.state_dict())
            ours, theirs = (opt.state[p] for p, opt in zip(params, opts))
            assert ours["eta"].dtype == theirs["eta"].dtype == torch.float64
            for name in ("eta", "mu", "step"):
                assert torch.equal(ours[name], theirs[name]), name
            # (the updates themselves round apart in the last bits: torch's separate ops,
            # FMAs in C)
            torch.testing.assert_close(params[0], params[1], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(ours["ax"], theirs["ax"], rtol=1e-12, atol=1e-15)
    finally:
        torch.set_default_dtype(before)


def test_lion_sign_of_zero_is_zero():
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    opt = ft.Lion([p], lr=0.1, weight_decay=0.5)
    opt.step()  # m = 0, c = (1 - b1) g: the zero gradient moves only by the decay
    expected = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * (1 - 0.1 * 0.5) \
        - 0.1 * torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


def test_lion_checks_and_checkpoints():
    p = torch.ones(4, requires_grad=True)
    for kwargs, match in [(dict(lr=-1.0), "Invalid learning rate"),
                          (dict(betas=(1.0, 0.99)), "Invalid beta parameter at index 0"),
                          (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
                          (dict(weight_decay=-1.0), "Invalid weight_decay value"),
                          (dict(lr=float("nan")), "Invalid learning rate"),
                          (dict(differentiable=True), "differentiable")]:
        with pytest.raises(ValueError, match=match):
            ft.Lion([p], **kwargs)
    opt = ft.Lion([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert torch.equal(opt.state[p]["exp_avg"], before[1]["state"][0]["exp_avg"])
    assert opt.state[p]["step"].item() == 1
    opt.param_groups[0]["betas"] = (0.9, 0.99)
    # a checkpoint resumes identically
    twin_p = p.detach().clone().requires_grad_()
    twin = ft.Lion([twin_p], lr=0.1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(5):
        p.grad = twin_p.grad = torch.full((4,), (-1.0) ** step)
        opt.step()
        twin.step()
    assert torch.equal(p.detach(), twin_p.detach())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05


def test_lamb_and_lars_check_their_hyperparameters_and_change_nothing_on_refusal():
    p = torch.ones(4, requires_grad=True)
    for cls, kwargs, match in [(ft.LAMB, dict(eps=-1.0), "Invalid epsilon value"),
                               (ft.LAMB, dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
                               (ft.LARS, dict(lr=0.1, momentum=-1.0), "Invalid momentum value"),
                               (ft.LARS, dict(lr=0.1, trust_coefficient=-1.0),
                                "Invalid trust_coefficient value"),
                               (ft.LARS, dict(lr=float("nan")), "Invalid learning rate")]:
        with pytest.raises(ValueError, match=match):
            cls([p], **kwargs)
    for opt in (ft.LAMB([p], lr=0.1), ft.LARS([p], lr=0.1)):
        p.grad = torch.ones(4)
        opt.step()
        before = p.detach().clone(), copy.deepcopy(opt.state_dict())
        opt.param_groups[0]["weight_decay"] = -1.0
        with pytest.raises(ValueError, match="Invalid weight_decay value"):
            opt.step()
        assert torch.equal(p.detach(), before[0])
        for key, value in before[1]["state"][0].items():
            assert torch.equal(opt.state[p][key], value)


@pytest.mark.parametrize("name, hp", [
    ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.1)),
    ("AdamW", dict(lr=0.1, weight_decay=0.0)), ("Adagrad", dict(lr=0.1)), ("RMSprop", dict(lr=0.1)),
    ("Adadelta", dict(lr=0.1)), ("Adamax", dict(lr=0.1)), ("NAdam", dict(lr=0.1)),
    ("RAdam", dict(lr=0.1)), ("ASGD", dict(lr=0.1)),
])
def test_infinite_weights_stay_infinite_without_weight_decay(name, hp):
    """Without weight decay the gradient has no L2 term, as in torch.optim: it had 0 * theta,
    which turned an infinite weight into NaN."""
    import fastopt.torch as ft
    results = []
    for module in (torch.optim, ft):
        p = torch.tensor([float("inf"), -float("inf"), 1.0], requires_grad=True)
        opt = getattr(module, name)([p], **hp)
        for _ in range(2):
            p.grad = torch.tensor([0.5, 0.5, 0.5])
            opt.step()
        results.append(p.detach())
    assert torch.isinf(results[1][:2]).all() and torch.equal(results[1][:2], results[0][:2])
    torch.testing.assert_close(results[1], results[0])



def test_rprop_takes_sign_of_nan_as_zero_like_torch():
    """torch's sign(NaN) is 0: a NaN gradient leaves the element's weight and step size as they
    were and the element recovers; here it made both NaN for good."""
    results = []
    for module in (torch.optim, ft):
        p = torch.zeros(3, requires_grad=True)
        opt = module.Rprop([p], lr=0.01)
        for g in ([1.0, 1.0, -1.0], [float("nan"), 1.0, float("nan")], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]):
            p.grad = torch.tensor(g)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["step_size"].clone(), opt.state[p]["prev"].clone()))
    for torch_value, fastopt_value in zip(*results):
        assert not fastopt_value.isnan().any()
        assert torch.equal(fastopt_value, torch_value)
