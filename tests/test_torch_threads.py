"""Threads sharing one fastopt.torch optimizer lose no update and read consistent checkpoints;
different optimizers do not wait for each other (issue 16, the fastopt.torch half)."""
import threading

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402


def adam_with_fixed_grads(n=1 << 18):
    """Two params in two groups; their grads are set once (a step does not clear them), so
    every step is the same step and the order in which threads take them does not matter."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=gen).requires_grad_()
    b = torch.randn(n // 3, generator=gen).requires_grad_()
    a.grad = torch.randn(n, generator=gen)
    b.grad = torch.randn(n // 3, generator=gen)
    opt = ft.Adam([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=1e-3, amsgrad=True)
    return opt, (a, b)


def run_threads(count, target):
    errors = []

    def guarded():
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


@pytest.mark.parametrize("threads, steps_each", [(2, 40), (4, 20)])
def test_threads_stepping_one_optimizer_equal_sequential_steps(threads, steps_each):
    shared, shared_params = adam_with_fixed_grads()
    alone, alone_params = adam_with_fixed_grads()

    def work():
        for _ in range(steps_each):
            shared.step()

    run_threads(threads, work)
    for _ in range(threads * steps_each):
        alone.step()
    for p, q in zip(shared_params, alone_params):
        assert torch.equal(p.detach(), q.detach())
        for key, value in alone.state[q].items():
            assert torch.equal(shared.state[p][key], value), key
        assert int(shared.state[p]["step"]) == threads * steps_each


def test_state_dict_taken_while_another_thread_steps_is_one_step():
    steps = 40
    opt, _ = adam_with_fixed_grads(1 << 16)
    replay, _ = adam_with_fixed_grads(1 << 16)
    expected = {0: replay.state_dict()}  # the state after k sequential steps, k = 0..steps
    for k in range(1, steps + 1):
        replay.step()
        expected[k] = replay.state_dict()
    halfway, seen_halfway, done = threading.Event(), threading.Event(), threading.Event()
    snapshots = []

    def stepper():
        try:
            for k in range(steps):
                opt.step()
                if k == steps // 2:  # one snapshot surely falls strictly inside the run
                    halfway.set()
                    seen_halfway.wait(timeout=60)
        finally:
            done.set()

    def snapshotter():
        while not done.is_set():
            after_halfway = halfway.is_set()
            state = opt.state_dict()["state"]
            snapshots.append(({i: int(s.get("step", 0)) for i, s in state.items()}, state))
            if after_halfway:
                seen_halfway.set()

    workers = [threading.Thread(target=stepper), threading.Thread(target=snapshotter)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in workers)
    assert any(0 < max(counts.values(), default=0) < steps for counts, _ in snapshots)
    for counts_when_taken, state in snapshots:
        if not state:
            continue  # taken before the first step
        k = counts_when_taken[0]
        assert counts_when_taken == {0: k, 1: k}  # both groups at the same step
        for i, per_param in state.items():
            assert int(per_param["step"]) == k  # a copy: later steps did not move it
            for key, value in per_param.items():
                assert torch.equal(value, expected[k]["state"][i][key]), (k, i, key)


def test_state_dict_waits_for_a_step_in_progress():
    p = torch.zeros(4, requires_grad=True)
    opt = ft.SGD([p], lr=0.5, momentum=0.9)
    in_closure, release = threading.Event(), threading.Event()
    taken = []

    def closure():
        opt.zero_grad()  # the lock is re-entrant: a closure may call the optimizer's methods
        p.grad = torch.ones(4)
        in_closure.set()
        release.wait(timeout=60)

    stepping = threading.Thread(target=opt.step, args=(closure,))
    stepping.start()
    assert in_closure.wait(timeout=60)
    reader = threading.Thread(target=lambda: taken.append(opt.state_dict()))
    reader.start()
    reader.join(timeout=0.5)
    blocked = reader.is_alive()  # held back by the step, which runs its closure in the lock
    release.set()
    stepping.join(timeout=60)
    reader.join(timeout=60)
    assert blocked and len(taken) == 1
    assert torch.equal(taken[0]["state"][0]["momentum_buffer"], torch.ones(4))  # after the step


def test_different_optimizers_do_not_wait_for_each_other():
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    first, second = ft.Adam([p]), ft.Adam([q])
    q.grad = torch.ones(4)
    second_done = threading.Event()
    second_stepped_meanwhile = []

    def closure():  # holds first's lock until second has stepped (or 60 s have passed)
        p.grad = torch.ones(4)
        second_stepped_meanwhile.append(second_done.wait(timeout=60))

    def step_second():
        second.step()
        second_done.set()

    holder = threading.Thread(target=first.step, args=(closure,))
    holder.start()
    other = threading.Thread(target=step_second)
    other.start()
    other.join(timeout=60)
    holder.join(timeout=60)
    assert second_stepped_meanwhile == [True] and not holder.is_alive()
    assert int(first.state[p]["step"]) == 1 and int(second.state[q]["step"]) == 1
