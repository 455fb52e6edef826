"""fastopt.torch with torch.amp.GradScaler("cpu") through torch's fused-scaling protocol, against
torch's fused optimizers under the same scaler, with injected inf/NaN steps."""
import math

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

STEPS = 12
CLIP = 0.5  # below most steps' gradient norm: those steps clip
BAD_STEPS = {3: math.inf, 4: math.nan, 9: -math.inf}  # a skipped step, twice in a row, later


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(make_optimizer, inject=True, clip=None):
    """clip: None, "torch" (unscale_, torch's clip_grad_norm_, step) or "step" (fastopt's
    step(clip_norm=...) through scaler.step): both clip to CLIP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=4)
    data = torch.Generator().manual_seed(1)
    history = []
    for step in range(STEPS):
        x = torch.randn(32, 8, generator=data)
        y = torch.randn(32, 1, generator=data)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if inject and step in BAD_STEPS:
            model[0].weight.grad[1, 2] = BAD_STEPS[step]
        if clip == "torch":
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(opt)
        elif clip == "step":
            scaler.step(opt, clip_norm=CLIP)
            norm = opt.total_norm
        else:
            scaler.step(opt)
            norm = None
        scaler.update()
        history.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale(),
                        None if norm is None else float(norm)))
    return history, opt


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9))])
def test_grad_scaler_matches_torch_fused(name, kwargs):
    ours, opt = train(lambda ps: getattr(ft, name)(ps, **kwargs))
    theirs, topt = train(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs))
    assert [s for _, s, _ in ours] == [s for _, s, _ in theirs]  # the scale: skips and growth alike
    for step, ((p_ours, _, _), (p_theirs, _, _)) in enumerate(zip(ours, theirs)):
        for a, b in zip(p_ours, p_theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
    # skipped steps changed nothing: the parameters, and the step counts
    for step in BAD_STEPS:
        for a, b in zip(ours[step][0], ours[step - 1][0]):
            assert torch.equal(a, b)
    ours_steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
    assert ours_steps == [float(s["step"]) for s in topt.state.values() if "step" in s]


def test_without_a_scaler_nothing_changes():
    """The protocol's attributes are only read when GradScaler set them."""
    ours, _ = train(lambda ps: ft.Adam(ps, lr=1e-2), inject=False)
    assert all(math.isfinite(p.sum().item()) for ps, _, _ in ours for p in ps)


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=1e-2)), ("SGD", dict(lr=0.05, momentum=0.9))])
def test_step_clip_norm_under_grad_scaler_matches_unscale_clip_step(name, kwargs):
    """scaler.step(opt, clip_norm=c): the norm of the unscaled gradients and the clipped update
    inside fastopt's step, against torch's recipe (scaler.unscale_, clip_grad_norm_, step),
    with the injected inf/NaN steps skipped alike."""
    ours, opt = train(lambda ps: getattr(ft, name)(ps, **kwargs), clip="step")
    theirs, _ = train(lambda ps: getattr(torch.optim, name)(ps, **kwargs), clip="torch")
    assert [s for _, s, _ in ours] == [s for _, s, _ in theirs]
    clipped = 0
    for step, ((p_ours, _, n_ours), (p_theirs, _, n_theirs)) in enumerate(zip(ours, theirs)):
        for a, b in zip(p_ours, p_theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        if step in BAD_STEPS:
            assert n_ours is None  # skipped before any pass
            continue
        assert n_ours == pytest.approx(n_theirs, rel=1e-5)
        clipped += n_theirs > CLIP
    assert clipped >= 3  # the clip did act


def _twins(dtype, generator):
    shapes = [(40, 30), (30,), (6, 5, 4)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=generator)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("Adagrad", dict(lr=0.1))])
def test_step_clip_norm_matches_clip_grad_norm_then_step(name, kwargs, dtype):
    """Two param groups; gradients above and below the limit; the planned steps and the
    validating first one alike; total_norm is torch's total norm."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = _twins(dtype, g)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": kwargs["lr"] / 2}]
    opt = getattr(ft, name)(groups(ours), **kwargs)
    ref = getattr(torch.optim, name)(groups(theirs), **kwargs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for step in range(8):
        scale = 4.0 if step % 2 else 0.01  # norms above and below the limit of 1
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, dtype=dtype, generator=g) * scale
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step(clip_norm=1.0)
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        assert opt.total_norm == pytest.approx(float(norm), rel=1e-6)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), **tol)
        for a, b in zip(ours, theirs):  # the gradients are read, not written
            assert not torch.equal(a.grad, b.grad) or scale < 1
    assert opt._plan is not None
    opt.step()
    assert opt.total_norm is None


def test_step_clip_norm_refusals_change_nothing():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(10, generator=g))
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=g))
    opt = ft.Adam([p, z], lr=0.1)
    p.grad, z.grad = torch.randn(10, generator=g), torch.randn(4, dtype=torch.complex64, generator=g)
    opt.step()
    before = [t.detach().clone() for t in (p, z)]
    state = {k: v.clone() for s in opt.state.values() for k, v in s.items()}
    for bad, error, match in ((-1.0, ValueError, "clip_norm must be finite and >= 0"),
                              (math.inf, ValueError, "clip_norm must be finite"),
                              ("1", TypeError, "clip_norm must be a real number"),
                              (True, TypeError, "clip_norm must be a real number"),
                              (1.0, TypeError, "clip_norm takes dense contiguous float32/float64")):
        with pytest.raises(error, match=match):
            opt.step(clip_norm=bad)
        assert all(torch.equal(a, b) for a, b in zip((p, z), before))
        after = {k: v for s in opt.state.values() for k, v in s.items()}
        assert all(torch.equal(after[k], v) for k, v in state.items())


def test_total_norm_reports_only_steps_that_happened():
    import copy
    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.SGD([p], lr=0.1)
    assert opt.total_norm is None and copy.deepcopy(opt).total_norm is None
    p.grad = torch.full((4,), 1.0)
    opt.step(clip_norm=10.0)
    assert opt.total_norm == pytest.approx(2.0)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(clip_norm=10.0)
    assert opt.total_norm is None
