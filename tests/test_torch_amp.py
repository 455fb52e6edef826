"""fastopt.torch with torch.amp.GradScaler("cpu") through torch's fused-scaling protocol, against
torch's fused optimizers under the same scaler, with injected inf/NaN steps."""
import math

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

STEPS = 12
BAD_STEPS = {3: math.inf, 4: math.nan, 9: -math.inf}  # a skipped step, twice in a row, later


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(make_optimizer, inject=True):
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
        scaler.step(opt)
        scaler.update()
        history.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    return history, opt


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9))])
def test_grad_scaler_matches_torch_fused(name, kwargs):
    ours, opt = train(lambda ps: getattr(ft, name)(ps, **kwargs))
    theirs, topt = train(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs))
    assert [s for _, s in ours] == [s for _, s in theirs]  # the scale: skips and growth alike
    for step, ((p_ours, _), (p_theirs, _)) in enumerate(zip(ours, theirs)):
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
    assert all(math.isfinite(p.sum().item()) for ps, _ in ours for p in ps)
