"""fastopt.torch with bfloat16 storage: the step on stored values is the float32 step rounded
as the reference says (tests/bf16_reference.py), torch's own bfloat16 Adam agrees to bfloat16
precision, checkpoints resume bit for bit, and bad combinations are refused."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from bf16_reference import random_bits, round_bf16  # noqa: E402
from fastopt._kernels import RULES  # noqa: E402

BF16 = torch.bfloat16


def bits(t):
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).ravel()


def f32(t):
    return t.detach().float().numpy().ravel()


CLASSES = [(ft.Adam, dict(lr=1e-2, weight_decay=0.1)), (ft.SGD, dict(lr=0.1, momentum=0.9)),
           (ft.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1)),
           (ft.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)), (ft.NAdam, dict(lr=1e-2)),
           (ft.Lion, dict(lr=1e-2, weight_decay=0.1)),
           (ft.LARS, dict(lr=0.5, momentum=0.5, weight_decay=0.01, trust_coefficient=0.02)),
           (ft.RowwiseAdagrad, dict(lr=0.1, weight_decay=0.01))]


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("cls,hp", CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_step_is_the_float32_step_rounded(cls, hp, rounding, state_dtype, master):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(BF16).requires_grad_() for n in ((8, 5), (7,))]
    if state_dtype is not None and cls is ft.RowwiseAdagrad:  # (its per-row sums stay float32)
        with pytest.raises(ValueError, match="per-row accumulators need float32/float64 state"):
            cls(params, **hp, state_dtype=state_dtype)
        return
    opt = cls(params, **hp, state_dtype=state_dtype, rounding=rounding, seed=21,
              master_weights=master)
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen).to(BF16) for p in params]
        before = []
        for p in params:
            s = opt.state.get(p, {})
            before.append((s["master"].clone() if master and "master" in s else p.detach().float(),
                           {k: v.clone() for k, v in s.items() if k != "master"}))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref_params = [b[0].clone().requires_grad_() for b in before]
        ref = cls(ref_params, **hp)
        for rp, (_, st), g in zip(ref_params, before, grads):
            if st:
                ref.state[rp] = {k: (v.float() if k != "step" else v.clone()) for k, v in st.items()}
            rp.grad = g.float()
        ref.step()
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            n = p.numel()
            if master:
                assert torch.equal(opt.state[p]["master"], rp.detach())
                assert np.array_equal(bits(p), round_bf16(f32(rp), "nearest"))
            else:
                assert np.array_equal(bits(p), round_bf16(f32(rp), rounding,
                                                          random_bits(21, i, step, len(RULES[opt.kernel].state), n)))
            for k, name in enumerate(opt.slots(opt._hyperparameters(0, opt.param_groups[0]))):
                got = opt.state[p].get(name) if name else None
                if got is None:
                    continue
                want = ref.state[rp][name]
                if got.dtype == BF16:
                    assert np.array_equal(bits(got), round_bf16(
                        f32(want), rounding, random_bits(21, i, step, k, n))), name
                else:
                    assert torch.equal(got, want), name


def test_torch_fused_adam_agrees_to_bfloat16_precision():
    """torch's fused Adam on bfloat16 tensors (state bfloat16, to nearest) and fastopt's with
    the same storage: a few bfloat16 ulps apart after a few steps."""
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(500, generator=gen).to(BF16)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ours = ft.Adam([a], lr=1e-2, state_dtype=BF16, rounding="nearest")
    theirs = torch.optim.Adam([b], lr=1e-2, fused=True)
    for _ in range(5):
        g = torch.randn(500, generator=gen).to(BF16)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert theirs.state[b]["exp_avg"].dtype == BF16
    ulp = 2.0 ** (torch.floor(torch.log2(b.detach().float().abs().clamp_min(1e-6))) - 7)
    assert torch.all((a.detach().float() - b.detach().float()).abs() <= 3 * ulp)


def test_resume_from_state_dict_repeats_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(300, generator=gen).to(BF16)
    grads = [torch.randn(300, generator=gen).to(BF16) for _ in range(6)]
    a = init.clone().requires_grad_()
    opt = ft.AdamW([a], lr=1e-2, state_dtype="bfloat16", seed=77)
    for g in grads:
        a.grad = g
        opt.step()
    b = init.clone().requires_grad_()
    first = ft.AdamW([b], lr=1e-2, state_dtype="bfloat16", seed=77)
    for g in grads[:3]:
        b.grad = g
        first.step()
    saved = first.state_dict()
    second = ft.AdamW([b], lr=1e-2)
    second.load_state_dict(saved)
    assert second.storage_options["seed"] == 77
    assert second.state[b]["exp_avg"].dtype == BF16
    for g in grads[3:]:
        b.grad = g
        second.step()
    assert torch.equal(a, b)


def test_refused_combinations():
    p32 = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="master_weights=True is for bfloat16"):
        ft.Adam([p32], master_weights=True)
    with pytest.raises(ValueError, match="unknown state_dtype"):
        ft.Adam([p32], state_dtype=torch.float16)
    p64 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = ft.Adam([p64], lr=0.1)
    p64.grad_dtype = None
    p64.grad = torch.ones(4, dtype=BF16)
    with pytest.raises(TypeError, match="gradient"):
        opt.step()
    assert torch.equal(p64, torch.zeros(4, dtype=torch.float64)) and not opt.state.get(p64)



TORCH_HAS = [(cls, hp) for cls, hp in CLASSES if hasattr(torch.optim, cls.__name__)]


@pytest.mark.parametrize("cls,hp", TORCH_HAS + [(ft.SGD, dict(lr=0.1))],
                         ids=[c.__name__ for c, _ in TORCH_HAS] + ["SGD-plain"])
def test_bfloat16_gradient_of_a_float32_parameter_without_storage_options(cls, hp):
    """torch lets a float32 parameter hold a bfloat16 gradient (p.grad_dtype = None): the
    kernels read it as bfloat16 (exact in float32), so every step, the planned ones included,
    is bit for bit the step on that gradient made float32, and torch's to float32 precision
    (torch's own Adam refuses the mix); beside it a float32 gradient in the same group."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in (40, 7)]
    ours, widened, theirs = ([t.clone().requires_grad_() for t in init] for _ in range(3))
    ours[0].grad_dtype = None
    opt, opt_widened = cls(ours, **hp), cls(widened, **hp)
    ref = getattr(torch.optim, cls.__name__)(theirs, **hp)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        ours[0].grad, ours[1].grad = grads[0].to(BF16), grads[1]
        for params in (widened, theirs):
            params[0].grad, params[1].grad = grads[0].to(BF16).float(), grads[1].clone()
        for o in (opt, opt_widened, ref):
            o.step()
        for p, w, q in zip(ours, widened, theirs):
            assert torch.equal(p, w)
            torch.testing.assert_close(p, q)
            for name, value in opt_widened.state[w].items():
                assert torch.equal(opt.state[p][name], value), name
    assert "fastopt_storage" not in opt.state
    if hp == dict(lr=0.1):  # torch's plain SGD takes the bfloat16 gradient itself
        theirs[0].grad_dtype = None
        theirs[0].grad = ours[0].grad.clone()
        ours[1].grad = theirs[1].grad = None
        opt.step()
        ref.step()
        torch.testing.assert_close(ours[0], theirs[0])


@pytest.mark.parametrize("options", [dict(seed=3), dict(state_dtype="float32"),
                                     dict(rounding="nearest")])
def test_complex_parameter_with_storage_options(options):
    """Storage options that a complex parameter admits (its state stays complex) change
    nothing in its step: bit for bit the step without them, and torch's to float32 precision."""
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(6, dtype=torch.complex64, generator=gen)
    ours, plain, theirs = (init.clone().requires_grad_() for _ in range(3))
    opts = [ft.Adam([ours], lr=0.1, **options), ft.Adam([plain], lr=0.1),
            torch.optim.Adam([theirs], lr=0.1)]
    for _ in range(3):
        g = torch.randn(6, dtype=torch.complex64, generator=gen)
        for p in (ours, plain, theirs):
            p.grad = g.clone()
        for o in opts:
            o.step()
        assert torch.equal(ours, plain)
        torch.testing.assert_close(ours, theirs)


def test_clip_norm_reads_bfloat16_gradients():
    """step(clip_norm=...) over bfloat16 gradients (of bfloat16 and of float32 parameters): the
    norm over float32 copies of them, bit for bit, and a float32 parameter takes the same step
    as with those copies; a clipped step's norm matches torch's float64 norm."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(300,), (40, 50)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    a = [torch.nn.Parameter(init[0].clone()), torch.nn.Parameter(init[1].to(BF16))]
    b = [torch.nn.Parameter(init[0].clone()), torch.nn.Parameter(init[1].to(BF16))]
    a[0].grad_dtype = None  # (torch's way to let a float32 parameter hold a bfloat16 gradient)
    opt_a, opt_b = ft.AdamW(a, lr=1e-2, seed=5), ft.AdamW(b, lr=1e-2, seed=5)
    for limit in (1e9, 1.0):
        grads = [(torch.randn(s, generator=gen) * 3).to(BF16) for s in shapes]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        b[0].grad, b[1].grad = grads[0].float(), grads[1].clone()
        opt_a.step(clip_norm=limit)
        opt_b.step(clip_norm=limit)
        want = torch.linalg.vector_norm(torch.cat([g.double().ravel() for g in grads])).item()
        assert opt_a.total_norm == opt_b.total_norm == pytest.approx(want, rel=1e-13)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], init[0])


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_lamb_bfloat16_is_the_numpy_engines(rounding, state_dtype, master):
    """fastopt.torch.LAMB with bfloat16 storage takes the numpy LAMB's steps bit for bit (the
    same kernel, keys and stored m and v: tests/test_bf16.py checks that one against its
    reference)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import fastopt
    gen = torch.Generator().manual_seed(2)
    shapes = [(40,), (6, 7)]
    init = [torch.randn(s, generator=gen).to(BF16) for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    arrays = [t.float().numpy().astype(ml_dtypes.bfloat16) for t in init]
    options = dict(lr=1e-2, weight_decay=0.1, rounding=rounding, seed=9, master_weights=master)
    opt = ft.LAMB(params, **options, state_dtype=state_dtype)
    twin = fastopt.LAMB(arrays, **options,
                        state_dtype=None if state_dtype is None else "bfloat16")
    for _ in range(3):
        grads = [torch.randn(s, generator=gen).to(BF16) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        twin.step([g.float().numpy().astype(ml_dtypes.bfloat16) for g in grads])
        for i, (p, a) in enumerate(zip(params, arrays)):
            assert np.array_equal(bits(p), a.view(np.uint16).ravel())
            for name, mine in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                got, want = opt.state[p][name], getattr(twin.state[i], mine)
                if got.dtype == BF16:
                    assert np.array_equal(bits(got), want.view(np.uint16).ravel()), name
                else:
                    assert np.array_equal(f32(got), want.ravel()), name


def _twins(options, gen):
    """Two optimizers over equal parameters: two bfloat16 ones and, without master weights, a
    float32 one whose gradient is bfloat16 (torch's p.grad_dtype = None)."""
    init = [torch.randn(n, generator=gen) for n in (300, 5000, 64)]
    out = []
    for _ in range(2):
        params = [torch.nn.Parameter(init[0].to(BF16)), torch.nn.Parameter(init[1].to(BF16))]
        if not options.get("master_weights"):
            params.append(torch.nn.Parameter(init[2].clone()))
            params[2].grad_dtype = None
        out.append((params, ft.Adam(params, lr=1e-2, weight_decay=0.1, seed=4, **options)))
    return out


def _same_everything(a, b):
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(p.view(torch.int16) if p.dtype == BF16 else p,
                           q.view(torch.int16) if q.dtype == BF16 else q)
        for k, v in a.state[p].items():
            w = b.state[q][k]
            assert torch.equal(v.view(torch.int16) if v.dtype == BF16 else v,
                               w.view(torch.int16) if w.dtype == BF16 else w), k
    assert a.state["fastopt_storage"] == b.state["fastopt_storage"]


@pytest.mark.parametrize("options", [dict(state_dtype=BF16), dict(state_dtype=BF16, rounding="nearest"),
                                     dict(master_weights=True), {}],
                         ids=["bf16-state", "bf16-state-nearest", "master", "default"])
def test_planned_steps_are_the_validated_steps(options):
    """After its first step fastopt.torch runs bfloat16 storage through its plan (the checks
    at C speed, the storage step advanced by the plan): the same bits as the validating path,
    step after step, and the same step count in the storage entry."""
    gen = torch.Generator().manual_seed(6)
    (pa, a), (pb, b) = _twins(options, gen)
    validated = []
    prepare = a._prepare_group
    a._prepare_group = lambda *args: validated.append(1) or prepare(*args)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(BF16) for p in pa]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        b._plan = None  # b validates every step
        a.step()
        b.step()
        assert len(validated) == 1  # the first step only: the others were planned
        _same_everything(a, b)
    assert a.state["fastopt_storage"]["step"] == 5


def test_plan_sees_the_storage_entry_and_master_change():
    """A planned step notices the storage entry's values changed in place (a new seed) and a
    master copy moved (state["master"].data = ...): it then takes the validating path."""
    gen = torch.Generator().manual_seed(8)
    (pa, a), (pb, b) = _twins(dict(master_weights=True), gen)

    def step():
        grads = [torch.randn(p.shape, generator=gen).to(BF16) for p in pa]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        b._plan = None
        a.step()
        b.step()
        _same_everything(a, b)

    step()
    step()
    for opt in (a, b):
        opt.state["fastopt_storage"]["seed"] = 99
        opt.state["fastopt_storage"]["rounding"] = "nearest"
    step()
    for opt, params in ((a, pa), (b, pb)):
        master = opt.state[params[0]]["master"]
        master.data = master.data.clone()
    step()
    assert a.state["fastopt_storage"]["step"] == 4


def test_clip_norm_sums_in_parameter_order_as_the_numpy_api():
    """step(clip_norm=...) over mixed float32 and bfloat16 gradients adds the per-parameter
    sums in parameter order, as the numpy API does: the same total_norm, bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import fastopt
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = rng.integers(1, 3000, 6)
        dtypes = [np.float32 if i % 2 else ml_dtypes.bfloat16 for i in range(6)]
        grads = [(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)).astype(d)
                 for n, d in zip(sizes, dtypes)]
        params = [torch.nn.Parameter(torch.zeros(int(n), dtype=BF16 if d != np.float32
                                                 else torch.float32)) for n, d in zip(sizes, dtypes)]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.astype(np.float32)).to(p.dtype)
        opt = ft.SGD(params, lr=0.1)
        opt.step(clip_norm=1.0)
        want = fastopt.SGD([np.zeros(int(n), d) for n, d in zip(sizes, dtypes)], lr=0.1).step(
            grads, clip_norm=1.0).total_norm
        assert opt.total_norm == want


@pytest.mark.parametrize("name, hp, slot", [("Adam", dict(lr=0.01), "exp_avg"),
                                           ("SGD", dict(lr=0.01, momentum=0.9), "momentum_buffer"),
                                           ("Adagrad", dict(lr=0.01), "sum")])
@pytest.mark.parametrize("fresh", [False, True])
def test_torch_state_dict_loads_into_bfloat16_parameters(name, hp, slot, fresh):
    """A torch.optim state dict has no fastopt storage entry: its load dropped the optimizer's
    (every later step then refused the bfloat16 parameter), or refused the state torch had
    cast to bfloat16.  The optimizer keeps its own options, and the checkpoint's float32 state
    its dtype and values."""
    p = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reference = getattr(torch.optim, name)([p], **hp)
    if not fresh:
        p.grad = torch.full_like(p, 0.5)
        reference.step()
    saved = copy.deepcopy(reference.state_dict())
    q = p.detach().to(torch.bfloat16).requires_grad_()
    opt = getattr(ft, name)([q], **hp)
    opt.load_state_dict(saved)
    assert opt.storage_options["state_dtype"] is None  # (float32 state for bfloat16 parameters)
    if not fresh:
        assert opt.state[q][slot].dtype == torch.float32
        assert torch.equal(opt.state[q][slot], reference.state[p][slot])
    q.grad = torch.full_like(q, 0.5)
    opt.step()
    assert opt.state[q][slot].dtype == torch.float32 and torch.isfinite(q).all()
