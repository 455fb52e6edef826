"""What a cached plan must notice between steps.  After a first, fully validated step both
engines (the numpy optimizers' Plan, fastopt.torch's ObjectPlan) re-check only what can change;
each case here changes one such thing in place, keeping every object's identity, and the next
step must do what a fresh optimizer (numpy) or torch.optim itself does with the same inputs,
or refuse it with nothing changed."""
import warnings

import numpy as np
import pytest

import fastopt


def snapshot_numpy(opt):
    return ([p.copy() for g in opt.param_groups for p in g["params"]],
            {i: (s.step, {k: v.copy() for k, v in vars(s).items() if isinstance(v, np.ndarray)})
             for i, s in opt.state.items()})


def assert_same_numpy(before, after):
    for a, b in zip(before[0], after[0]):
        assert a.tobytes() == b.tobytes()
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        assert before[1][i][0] == after[1][i][0]
        for k, v in before[1][i][1].items():
            assert v.tobytes() == after[1][i][1][k].tobytes()


# ---- numpy: arrays changed in place (same object, often the same address) ----

def test_parameter_shrunk_in_place_is_stepped_at_its_new_size():
    p = np.zeros(1000, np.float32)
    opt = fastopt.SGD([p], lr=1.0)
    opt.step([np.ones(1000, np.float32)])
    p.resize(4, refcheck=False)  # glibc usually keeps the address: the plan's pointer still fits
    opt.step([np.full(4, 2.0, np.float32)])
    assert p.shape == (4,)
    assert np.array_equal(p, np.full(4, -3.0, np.float32))


@pytest.mark.parametrize("with_ema", [False, True])
def test_parameter_reshaped_in_place_is_refused_as_a_fresh_check_refuses_it(with_ema):
    """w.shape = ... keeps the array, its address and size: the plan stepped it, leaving state
    buffers of the old shape, which the full checks (and a load of the optimizer's own
    state_dict) refuse; now the planned step refuses it the same way, changing nothing."""
    w = np.zeros((4, 5), np.float32)
    opt = fastopt.SGD([w], lr=0.1, momentum=0.9, **(dict(ema_decay=0.9) if with_ema else {}))
    for _ in range(2):
        opt.step([np.ones((4, 5), np.float32)])
    w.shape = (5, 4)
    before = snapshot_numpy(opt)
    with pytest.raises(ValueError, match=r"has shape \(4, 5\), the parameter has \(5, 4\)"):
        opt.step([np.ones((5, 4), np.float32)])
    assert_same_numpy(before, snapshot_numpy(opt))


def test_state_buffer_shrunk_in_place_is_refused_and_nothing_changes():
    p = np.ones(1000, np.float32)
    opt = fastopt.Adam([p], lr=0.1)
    g = np.full(1000, 0.5, np.float32)
    opt.step([g])
    opt.state[0].m.resize(4, refcheck=False)
    before = snapshot_numpy(opt)
    with pytest.raises(ValueError, match="m has shape"):
        opt.step([g])
    assert_same_numpy(before, snapshot_numpy(opt))


def test_state_buffer_retyped_in_place_is_refused_and_nothing_changes():
    p = np.ones(16, np.float32)
    opt = fastopt.Adam([p], lr=0.1)
    g = np.full(16, 0.5, np.float32)
    opt.step([g])
    opt.state[0].v.dtype = np.int32  # the same bytes, read as integers
    before = snapshot_numpy(opt)
    with pytest.raises((TypeError, ValueError), match="v"):
        opt.step([g])
    assert_same_numpy(before, snapshot_numpy(opt))


def test_parameter_restrided_in_place_is_refused():
    p = np.ones(64, np.float32)
    opt = fastopt.SGD([p], lr=1.0)
    opt.step([np.ones(64, np.float32)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            p.shape = (32, 2)
            p.strides = (4, 128)  # the same memory, now column-major, in place
    except (AttributeError, ValueError, TypeError):
        pytest.skip("this numpy no longer sets strides in place")
    before = p.copy()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step([np.ones((32, 2), np.float32)])
    assert np.array_equal(p, before)


def test_step_count_set_to_a_float_is_refused_by_the_planned_step():
    p = np.ones(8, np.float32)
    opt = fastopt.Adam([p], lr=0.1)
    opt.step([np.ones(8, np.float32)])
    opt.state[0].step = 1.0
    with pytest.raises(TypeError, match="step must be an integer"):
        opt.step([np.ones(8, np.float32)])


def test_a_step_dependent_refusal_in_a_later_group_changes_nothing():
    # ASGD's step size lr / (1 + lambd lr (t - 1))^alpha = 3^1000 overflows at t = 3: a check
    # only the step count can trigger, in the second of two batches
    a, b = np.full(4, 0.9, np.float32), np.full(4, 0.9, np.float32)
    opt = fastopt.ASGD([{"params": [a]},
                        {"params": [b], "alpha": -1000.0, "lambd": 1.0, "lr": 1.0}], lr=0.1)
    g = [np.full(4, 0.5, np.float32)] * 2
    opt.step(g)
    opt.step(g)
    before = snapshot_numpy(opt)
    with pytest.raises(ValueError, match="alpha"):
        opt.step(g)
    assert_same_numpy(before, snapshot_numpy(opt))


# ---- fastopt.torch: tensors changed in place, against torch.optim ----

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402


def torch_pair(cls_name, values=(1.0, 2.0, 3.0), **kw):
    """The same parameter under torch.optim's class and fastopt.torch's."""
    out = []
    for module in (torch.optim, ft):
        p = torch.tensor(values, requires_grad=True)
        out.append((p, getattr(module, cls_name)([p], **kw)))
    return out


def step_both(pairs, grad=(0.5, -1.0, 0.25)):
    for p, opt in pairs:
        p.grad = torch.tensor(grad, dtype=p.dtype)
        opt.step()


def assert_close_pair(pairs):
    (p, opt), (q, fopt) = pairs
    torch.testing.assert_close(q, p)
    for name, value in opt.state[p].items():
        torch.testing.assert_close(fopt.state[q][name], value)


@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("cls_name", ["Adam", "NAdam", "RAdam", "Adamax"])
def test_step_counter_reset_in_place_restarts_the_bias_correction(cls_name):
    pairs = torch_pair(cls_name, lr=0.1)
    for _ in range(3):
        step_both(pairs)
    for p, opt in pairs:  # back to a fresh state, in place
        for value in opt.state[p].values():
            value.zero_()
        if "mu_product" in opt.state[p]:
            opt.state[p]["mu_product"].fill_(1.0)
    for _ in range(2):
        step_both(pairs)
    assert_close_pair(pairs)


@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("swap", ["data", "set_"])
def test_state_buffer_given_new_memory_is_the_one_updated(swap):
    pairs = torch_pair("Adam", lr=0.1)
    step_both(pairs)
    for p, opt in pairs:
        new = torch.full((3,), 0.25)
        if swap == "data":
            opt.state[p]["exp_avg"].data = new
        else:
            opt.state[p]["exp_avg"].set_(new)
    step_both(pairs)
    step_both(pairs)
    assert_close_pair(pairs)


@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("cls_name, key, index, value", [
    ("NAdam", "betas", 0, 0.5), ("Rprop", "etas", 1, 1.5), ("Rprop", "step_sizes", 1, 0.01)])
def test_list_hyperparameter_edited_in_place_is_used(cls_name, key, index, value):
    pairs = torch_pair(cls_name, lr=0.1)
    for _, opt in pairs:
        opt.param_groups[0][key] = list(opt.param_groups[0][key])
    step_both(pairs)
    step_both(pairs)
    for _, opt in pairs:
        opt.param_groups[0][key][index] = value
    for _ in range(3):
        step_both(pairs, grad=(0.5, -1.0, 0.25))
    assert_close_pair(pairs)


@pytest.mark.usefixtures("tensor_reads")
def test_tensor_betas_changed_in_place_are_used():
    """betas=(tensor, tensor): a plan took the tuple, the same object, for unchanged, and kept
    stepping with the old beta1 after betas[0].fill_(0.0)."""
    betas = (torch.tensor(0.9), torch.tensor(0.999))  # (both optimizers hold these two)
    pairs = torch_pair("Adam", lr=0.1, betas=betas)
    step_both(pairs)
    step_both(pairs)
    betas[0].fill_(0.0)
    for _ in range(2):
        step_both(pairs, grad=(0.5, -1.0, 0.25))
    assert_close_pair(pairs)
    (p, opt), (q, fopt) = pairs
    assert torch.equal(fopt.state[q]["exp_avg"], opt.state[p]["exp_avg"])  # = the last gradient


@pytest.mark.usefixtures("tensor_reads")
def test_gradient_retyped_through_data_is_refused_with_nothing_changed():
    p = torch.ones(4, requires_grad=True)
    opt = ft.SGD([p], lr=1.0)
    p.grad = torch.ones(4)
    opt.step()
    p.grad.data = torch.ones(4, dtype=torch.float64)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.usefixtures("tensor_reads")
def test_gradient_resized_through_data_is_refused_with_nothing_changed():
    p = torch.ones(6, requires_grad=True)
    opt = ft.SGD([p], lr=1.0)
    p.grad = torch.ones(6)
    opt.step()
    p.grad.data = torch.ones(2)
    before = p.detach().clone()
    with pytest.raises((TypeError, ValueError)):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "Adagrad", "Adafactor"])
def test_gradient_reshaped_through_data_is_refused_with_nothing_changed(cls_name):
    """As many elements in another shape: the plan re-checked only the gradient's dtype and byte
    size and applied it; refused now as a first step (and torch.optim) refuses it."""
    from conftest import assert_torch_unchanged, torch_snapshot
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = getattr(ft, cls_name)([p], lr=0.1)
    for _ in range(2):  # the second step is planned
        p.grad = torch.ones(3, 4)
        opt.step()
    p.grad.data = torch.arange(12.0)
    before = torch_snapshot(opt)
    for _ in range(2):
        with pytest.raises(TypeError, match=r"gradient is .* of shape \(12,\)"):
            opt.step()
        assert_torch_unchanged(before, torch_snapshot(opt))


@pytest.mark.usefixtures("tensor_reads")
def test_parameter_narrowed_through_data_is_stepped_at_its_new_size():
    pairs = torch_pair("SGD", values=(1.0,) * 6, lr=1.0)
    step_both(pairs, grad=(1.0,) * 6)
    storages = []
    for p, _ in pairs:
        storages.append(p.data)
        p.data = p.data[:2]
    step_both(pairs, grad=(1.0, 1.0))
    (p, _), (q, _) = pairs
    assert torch.equal(q.detach(), p.detach())
    assert torch.equal(storages[1], storages[0])  # nothing written past the new end


@pytest.mark.usefixtures("tensor_reads")
def test_state_buffer_retyped_through_data_at_its_address_is_refused():
    """exp_avg.data = a bfloat16 view of its own memory keeps the address: the plan checks the
    buffer's dtype and size too (written as float32 it would overrun the new, smaller buffer
    when the allocator hands it the old address), and the step is refused as a first one is."""
    p = torch.nn.Parameter(torch.ones(1000))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(1000)
    opt.step()
    m = opt.state[p]["exp_avg"]
    m.data = m.data.view(torch.bfloat16)[:1000]
    before = p.detach().clone()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.usefixtures("tensor_reads")
def test_parameter_transposed_through_data_at_its_address_is_refused():
    """p.data = p.data.t() keeps the address, dtype and size: the plan checks contiguity, as
    the first step does."""
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3, 4)
    opt.step()
    p.data = p.data.t()
    p.grad = torch.ones(4, 3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.usefixtures("tensor_reads")
def test_bfloat16_gradient_just_below_its_parameter_is_planned():
    """A bfloat16 gradient of a float32 parameter is half the parameter's size: the checks
    (first step and planned ones) compare its own bytes, so one that ends where the parameter
    starts is neither refused nor sent to the validating path every step."""
    base = torch.zeros(1500)
    p = torch.nn.Parameter(base[500:1500])
    p.grad_dtype = None
    opt = ft.SGD([p], lr=0.1)
    p.grad = base[:500].view(torch.bfloat16)  # bytes just below the parameter's
    p.grad.fill_(1.0)
    opt.step()
    plan = opt._plan
    for _ in range(3):
        opt.step()
    assert opt._plan is plan
    torch.testing.assert_close(p.detach(), torch.full((1000,), -0.4))


@pytest.mark.usefixtures("tensor_reads")
def test_storage_entry_edited_in_place_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    for key, value in (("step", 5.0), ("seed", -1), ("rounding", "Nearest")):
        entry = opt.state["fastopt_storage"]
        kept = dict(entry)
        entry[key] = value
        before = p.detach().clone()
        with pytest.raises(ValueError):
            opt.step()
        assert torch.equal(p.detach(), before) and entry == dict(kept, **{key: value})
        entry[key] = kept[key]
    opt.step()


@pytest.mark.usefixtures("tensor_reads")
def test_master_weights_without_kept_state_are_refused_with_nothing_changed():
    """SGD without momentum keeps no per-parameter state, so there is nowhere to keep a
    float32 master copy: refused before anything changes (not silently dropped)."""
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = ft.SGD([p], lr=1e-4, master_weights=True)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="master_weights"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(8, dtype=torch.bfloat16))
    assert opt.state["fastopt_storage"]["step"] == 0


# ---- fastopt.torch: memory shared across parameters ----

@pytest.mark.usefixtures("tensor_reads")
@pytest.mark.parametrize("source", ["its own parameter", "its own exp_avg", "another parameter",
                                    "another parameter's exp_avg_sq"])
def test_gradient_sharing_written_memory_is_refused_by_a_planned_step(source):
    """After planned steps, a gradient that is memory the step writes is refused with nothing
    changed, as the numpy optimizers refuse it: the plan's C call skips the per-tensor overlap
    checks (fo_step_planned), so the plan's own check sends such a step to the validating path,
    which names both parameters where the memory is another parameter's."""
    a, b = torch.ones(8, requires_grad=True), torch.full((8,), 2.0, requires_grad=True)
    opt = ft.Adam([a, b], lr=0.1)
    for _ in range(3):  # planned steps from the second on
        a.grad, b.grad = torch.full((8,), 0.5), torch.full((8,), 0.25)
        opt.step()
    shared = {"its own parameter": a, "its own exp_avg": opt.state[a]["exp_avg"],
              "another parameter": b, "another parameter's exp_avg_sq": opt.state[b]["exp_avg_sq"]}
    a.grad = shared[source].detach()
    before = [t.detach().clone() for t in (a, b)] + \
        [v.clone() for p in (a, b) for v in opt.state[p].values()]
    word = "parameter 0" if source.startswith("its own") else "parameter 1"
    with pytest.raises(ValueError, match=f"{word}.*shares memory"):
        opt.step()
    after = [t.detach() for t in (a, b)] + [v for p in (a, b) for v in opt.state[p].values()]
    for x, y in zip(before, after):
        assert torch.equal(x, y)


def test_parameters_sharing_memory_are_refused_with_nothing_changed():
    """Two parameters that are overlapping views of one buffer: each step would write the shared
    elements twice, in an order the threads decide. A ValueError naming both; nothing changes."""
    base = torch.zeros(12)
    a, b = torch.nn.Parameter(base[:8]), torch.nn.Parameter(base[4:])
    opt = ft.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    with pytest.raises(ValueError, match="parameter 1: its parameter or a state buffer shares "
                                         "memory with the parameter or a state buffer of param "
                                         "group 0, parameter 0"):
        opt.step()
    assert torch.equal(base, torch.zeros(12)) and not opt.state
    # disjoint views of one buffer are fine (a flat parameter's pieces)
    c, d = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[6:])
    opt = ft.SGD([c, d], lr=0.1)
    c.grad, d.grad = torch.ones(6), torch.full((6,), 2.0)
    opt.step()
    assert torch.equal(base, torch.cat([torch.full((6,), -0.1), torch.full((6,), -0.2)]))
