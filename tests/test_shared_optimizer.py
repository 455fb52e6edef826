"""One optimizer shared by several threads: steps are serialized (none is lost), and a
checkpoint taken while another thread steps holds all of one step."""
import hashlib
import threading

import numpy as np
import pytest

import fastopt

SIZE = 2_000_000

OPTIMIZERS = {
    "Adam": lambda p: fastopt.Adam([p], lr=1e-3),
    "AdamW": lambda p: fastopt.AdamW([p], lr=1e-3, weight_decay=0.1),
    "SGD-momentum": lambda p: fastopt.SGD([p], lr=1e-3, momentum=0.9),
}


def start_together(n, target):
    """n threads running target(k), released at once so that their steps collide."""
    barrier = threading.Barrier(n)
    errors = []

    def run(k):
        try:
            barrier.wait()
            target(k)
        except BaseException as e:  # reported by join_all
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    return threads, errors


def join_all(threads, errors):
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread is stuck"
    if errors:
        raise errors[0]


def buffers(opt):
    return {k: v.copy() for k, v in opt.state[0].buffers().items()}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("n_threads, steps_each", [(2, 12), (4, 6)])
def test_threads_stepping_one_optimizer_lose_no_step(n_threads, steps_each, name):
    rng = np.random.default_rng(0)
    init = rng.standard_normal(SIZE).astype(np.float32)
    grad = rng.standard_normal(SIZE).astype(np.float32)

    shared = init.copy()
    opt = OPTIMIZERS[name](shared)

    def steps(_):
        for _ in range(steps_each):
            opt.step([grad])

    join_all(*start_together(n_threads, steps))

    alone = init.copy()
    ref = OPTIMIZERS[name](alone)
    for _ in range(n_threads * steps_each):
        ref.step([grad])
    assert opt.state[0].step == ref.state[0].step == n_threads * steps_each
    np.testing.assert_array_equal(shared, alone, strict=True)
    for k, buf in buffers(ref).items():
        np.testing.assert_array_equal(getattr(opt.state[0], k), buf, strict=True)


def digest(a):
    return hashlib.blake2b(np.ascontiguousarray(a)).hexdigest()


def replay(make, init, grad, steps):
    """{step count: digests of the state buffers after that many sequential steps}."""
    p = init.copy()
    opt = make(p)
    out = {}
    for k in range(1, steps + 1):
        opt.step([grad])
        out[k] = {name: digest(buf) for name, buf in opt.state[0].buffers().items()}
    return out


def step_while(opt, grad, steps, take):
    """Step `opt` in one thread while the other calls take() until the steps are done; every
    take() result is kept.  Each step waits for a take() to finish first, as the lock is not
    fair: a thread stepping back to back could keep it to itself to the end."""
    done, taken_one = threading.Event(), threading.Event()
    taken = []

    def stepper(k):
        if k == 0:
            try:
                for _ in range(steps):
                    assert taken_one.wait(timeout=120)
                    taken_one.clear()
                    opt.step([grad])
            finally:
                done.set()
        else:
            while not done.is_set():
                taken.append(take())
                taken_one.set()

    join_all(*start_together(2, stepper))
    return taken


@pytest.mark.parametrize("name", ["Adam", "SGD-momentum"])
def test_state_dict_while_another_thread_steps_is_one_step(name):
    rng = np.random.default_rng(1)
    init = rng.standard_normal(SIZE).astype(np.float32)
    grad = rng.standard_normal(SIZE).astype(np.float32)
    steps = 16
    expected = replay(OPTIMIZERS[name], init, grad, steps)

    opt = OPTIMIZERS[name](init.copy())

    def take():
        d = opt.state_dict()
        if not d["state"]:
            return None  # before the first step
        s = d["state"][0]
        return s["step"], {k: digest(v) for k, v in s.items() if k != "step"}

    snapshots = [s for s in step_while(opt, grad, steps, take) if s is not None]
    for step, digests in snapshots:
        assert digests == expected[step], f"the snapshot at step {step} mixes two steps"
    assert len({step for step, _ in snapshots}) >= steps // 2  # it did look inside the run


def test_save_while_another_thread_steps_is_one_step(tmp_path):
    size = 1_000_000  # each save writes and reads back 8 MB of state
    rng = np.random.default_rng(2)
    init = rng.standard_normal(size).astype(np.float32)
    grad = rng.standard_normal(size).astype(np.float32)
    steps = 10
    expected = replay(OPTIMIZERS["Adam"], init, grad, steps)

    opt = OPTIMIZERS["Adam"](init.copy())
    path = tmp_path / "opt.npz"

    def take():
        opt.save(path)
        with np.load(path) as z:
            if "state/0/step" not in z.files:
                return None
            return int(z["state/0/step"]), {k: digest(z[f"state/0/{k}"]) for k in ("m", "v")}

    snapshots = [s for s in step_while(opt, grad, steps, take) if s is not None]
    for step, digests in snapshots:
        assert digests == expected[step], f"the file saved at step {step} mixes two steps"
    assert len({step for step, _ in snapshots}) >= steps // 2


class BlockingGrads(list):
    """A grads list whose len() waits for `release`: a step given it stops inside its
    validation, holding its optimizer."""

    def __init__(self, grads):
        super().__init__(grads)
        self.entered = threading.Event()
        self.release = threading.Event()

    def __len__(self):
        self.entered.set()
        assert self.release.wait(timeout=120)
        return super().__len__()


def test_other_optimizers_step_while_one_is_inside_a_step():
    """The lock is per optimizer: another optimizer steps, checkpoints and loads while the
    first one is stopped in the middle of a step (a process-wide lock would deadlock here)."""
    a, b = np.ones(1000, np.float32), np.ones(1000, np.float32)
    opt_a, opt_b = fastopt.Adam([a]), fastopt.Adam([b])
    grads = BlockingGrads([np.full_like(a, 0.5)])
    t = threading.Thread(target=opt_a.step, args=(grads,))
    t.start()
    try:
        assert grads.entered.wait(timeout=120)
        for _ in range(3):
            opt_b.step([np.ones_like(b)])
        opt_b.load_state_dict(opt_b.state_dict())
        assert opt_b.state[0].step == 3
    finally:
        grads.release.set()
        t.join(timeout=120)
    assert not t.is_alive()
    assert opt_a.state[0].step == 1 and (a < 1).all()


def test_a_failed_step_releases_the_optimizer():
    p = np.ones(10, np.float32)
    opt = fastopt.Adam([p])
    with pytest.raises(ValueError):
        opt.step([np.ones(3, np.float32)])
    t = threading.Thread(target=opt.step, args=([np.ones_like(p)],))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and opt.state[0].step == 1
