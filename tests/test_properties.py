"""Property tests over sizes (0, 1, odd, large) and unaligned views; threads."""
import threading

import numpy as np
from hypothesis import given, settings, strategies as st

import fastopt
import reference
from conftest import CASES

SIZES = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 65]),
                  st.integers(0, 300), st.integers(1000, 40_000))


def unaligned(values, offset):
    """A C-contiguous copy of `values` placed `offset` elements into a larger buffer."""
    base = np.empty(values.size + offset + 1, values.dtype)
    view = base[offset:offset + values.size].reshape(values.shape)
    view[...] = values
    return view


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), n=SIZES, dtype=st.sampled_from([np.float32, np.float64]),
       offset=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
def test_any_size_and_offset_matches_reference(case, n, dtype, offset, seed):
    cls, hp = case
    rng = np.random.default_rng(seed)
    p = unaligned(rng.standard_normal(n).astype(dtype), offset)
    p0 = p.astype(np.float64)
    ref = p0.copy()
    ref_state = {}
    opt = cls([p], **hp)
    ref_fn = reference.RULES[cls.__name__]
    ref_hp = {("decoupled" if k == "decoupled_weight_decay" else k): v
              for k, v in opt.param_groups[0].items() if k != "params"}
    for _ in range(3):
        g = unaligned(rng.standard_normal(n).astype(dtype), (offset + 3) % 8)
        opt.step([g])
        ref = ref_fn(ref, g.astype(np.float64), ref_state, **ref_hp)
    assert p.dtype == dtype and p.shape == (n,)
    if dtype == np.float64:
        np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-13)
    else:
        keep = reference.comparable(ref_state, p.shape)
        scale = np.abs(ref - p0).max() if n else 0.0
        np.testing.assert_allclose((p - p0)[keep], (ref - p0)[keep], rtol=0, atol=2e-4 * scale + 1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
       seed=st.integers(0, 1000))
def test_any_shape(shape, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape)
    ref = p.copy()
    opt = fastopt.Nadam([p], lr=0.1)
    g = rng.standard_normal(shape)
    opt.step([g])
    ref = reference.nadam(ref, g, {}, lr=0.1)
    assert p.shape == shape
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-13)


def test_threads_give_the_sequential_results():
    """Optimizers stepping in parallel threads (the GIL is released in the kernels) give
    exactly what they give one after another."""
    n_opt, steps, size = 6, 40, 200_000
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(size).astype(np.float32) for _ in range(n_opt)]
    grads = [[rng.standard_normal(size).astype(np.float32) for _ in range(3)] for _ in range(n_opt)]
    classes = [fastopt.Adam, fastopt.SGD, fastopt.RMSprop, fastopt.AdamW, fastopt.Adagrad,
               fastopt.Nadam]

    def run(k, params):
        opt = classes[k]([params[k]], lr=1e-3)
        for s in range(steps):
            opt.step([grads[k][s % 3]])

    sequential = [p.copy() for p in init]
    for k in range(n_opt):
        run(k, sequential)
    parallel = [p.copy() for p in init]
    threads = [threading.Thread(target=run, args=(k, parallel)) for k in range(n_opt)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(sequential, parallel):
        np.testing.assert_array_equal(a, b)


def test_kernel_releases_the_gil():
    """While the main thread is inside a kernel call, another thread runs Python and sees the
    parameter half-updated (some elements already written by this call, others not yet).

    Nothing here depends on timing: if the kernel held the GIL, Python code could only run
    between calls, when every element has had the same number of updates, so a mixed sample
    (taken by one numpy call, under the GIL) cannot appear; with the GIL released it appears
    as soon as the observer is scheduled during one of the calls (at most 200; at a load of
    10 on 2 vCPUs it took 1 to 6)."""
    p = np.zeros(4_000_000, np.float32)
    g = np.ones_like(p)
    state = fastopt.SGDState()
    seen, stop = threading.Event(), threading.Event()

    def observer():
        while not stop.is_set():
            sample = p[::250_000].copy()
            if sample.min() != sample.max():
                seen.set()
                return

    threads = fastopt.get_num_threads()
    fastopt.set_num_threads(1)  # one writer: the observer gets the other core
    t = threading.Thread(target=observer)
    t.start()
    try:
        for calls in range(1, 201):
            fastopt.functional.sgd(p, g, state, lr=1.0)
            if seen.is_set():
                break
    finally:
        stop.set()
        t.join()
        fastopt.set_num_threads(threads)
    assert seen.is_set()
    assert (p == -calls).all() and state.step == calls  # each call updated every element once
