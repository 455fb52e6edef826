"""bfloat16 storage: every rule x storage combination x rounding, the keyed generator bit for
bit (tests/bf16_reference.py, written from the README), unbiasedness, threads, instruction sets,
checkpoints, and the refused combinations."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastopt  # noqa: E402
import reference  # noqa: E402
from bf16_reference import random_bits, round_bf16, widen  # noqa: E402
from conftest import CASES, assert_same_snapshot, case_id, snapshot  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SHAPES = [(33,), (5, 7)]
SEED = 11
SIGN_RULES = ("Lion", "Rprop")

# (param dtype, grad dtype, state_dtype, master_weights)
STORAGE = [
    (F32, F32, "bfloat16", False),
    (F32, BF16, None, False),
    (BF16, BF16, None, False),
    (BF16, BF16, "bfloat16", False),
    (BF16, BF16, "bfloat16", True),
    (F64, F64, "bfloat16", False),
]


def storage_id(s):
    p, g, state, master = s
    return f"p{p.name}-g{g.name}-s{state or 'default'}" + ("-master" if master else "")


def bits16(a):
    return np.ascontiguousarray(a).view(np.uint16).ravel()


def compute(dtype):
    return F64 if dtype == F64 else F32


def lamb_update_from_stored_state(hp, theta, exact, stored, step):
    """LAMB with bfloat16 m and v (README, "bfloat16 storage"): its per-tensor pass computes m
    and v (as the compute-type step: `exact`), sums ||r||^2 from them and rounds them into
    storage; the update then reads the stored m and v:
    theta - lr (||theta|| / ||r||) r(stored m, stored v), in the compute type."""
    cdt = theta.dtype.type
    beta1, beta2 = hp.get("betas", (0.9, 0.999))
    m_scale, denom_scale = cdt(1 / (1 - beta1 ** step)), cdt(1 / np.sqrt(1 - beta2 ** step))
    eps, wd = cdt(hp.get("eps", 1e-6)), cdt(hp.get("weight_decay", 0.0))

    def r(m, v):
        return m_scale * m.astype(theta.dtype) / (denom_scale * np.sqrt(v.astype(theta.dtype))
                                                  + eps) + wd * theta
    theta_norm = np.sqrt(np.sum(theta.astype(F64) ** 2))
    r_norm = np.sqrt(np.sum(r(exact.m, exact.v).astype(F64) ** 2))
    coef = cdt(hp["lr"] * (theta_norm / r_norm if theta_norm > 0 and r_norm > 0 else 1.0))
    return theta - coef * r(stored.m, stored.v)


@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_is_the_compute_step_rounded(case, storage):
    """A step on stored values equals the float32 (float64) step on the widened values, with
    every bfloat16 write rounded as the reference says: exactly, for both roundings."""
    cls, hp = case
    pdt, gdt, state_dtype, master = storage
    if cls.rule.plain_state and state_dtype == "bfloat16":
        with pytest.raises(ValueError, match=f"{cls.rule.plain_state} need float32/float64 state"):
            cls([np.zeros(3, pdt)], **hp, state_dtype=state_dtype, master_weights=master)
        return
    rng = np.random.default_rng(3)
    for rounding in ("stochastic", "nearest"):
        params = [rng.standard_normal(s).astype(pdt) for s in SHAPES]
        opt = cls(params, **hp, state_dtype=state_dtype, rounding=rounding, seed=SEED,
                  master_weights=master)
        opt.step([rng.standard_normal(s).astype(gdt) for s in SHAPES])  # creates the state
        for _ in range(2):
            grads = [rng.standard_normal(s).astype(gdt) for s in SHAPES]
            cdt = compute(pdt)
            before = [(opt.state[i].master.copy() if master else p.astype(cdt),
                       {k: v.astype(cdt) for k, v in opt.state[i].buffers().items() if k != "master"},
                       opt.state[i].step) for i, p in enumerate(params)]
            opt.step(grads)
            ref_params = [b[0].copy() for b in before]
            ref = cls(ref_params, **hp)
            for i, (_, bufs, step) in enumerate(before):
                ref.state[i] = opt.state_type(**bufs, step=step)
            ref.step([g.astype(cdt) for g in grads])
            for i, p in enumerate(params):
                step = before[i][2] + 1
                n = p.size
                if cls is fastopt.LAMB and state_dtype == "bfloat16":
                    ref_params[i] = lamb_update_from_stored_state(
                        hp, before[i][0], ref.state[i], opt.state[i], step)
                if master:
                    np.testing.assert_array_equal(opt.state[i].master, ref_params[i], strict=True)
                    assert np.array_equal(bits16(p), round_bf16(ref_params[i].ravel(), "nearest"))
                elif pdt == BF16:
                    want = round_bf16(ref_params[i].ravel(), rounding,
                                      random_bits(SEED, i, step, len(opt.rule.crule.state), n))
                    assert np.array_equal(bits16(p), want), f"param {i} at step {step}"
                elif cls is fastopt.LAMB and state_dtype == "bfloat16" and pdt == F64:
                    # (||r|| summed in another order: the double coefficient may differ by an ulp)
                    np.testing.assert_allclose(p, ref_params[i], rtol=4e-16, atol=1e-16)
                else:
                    np.testing.assert_array_equal(p, ref_params[i], strict=True)
                for k, name in enumerate(opt.rule.crule.state):
                    got = getattr(opt.state[i], name)
                    if got is None:
                        continue
                    want = getattr(ref.state[i], name)
                    if got.dtype == BF16:
                        want = round_bf16(want.astype(F32).ravel(), rounding,
                                          random_bits(SEED, i, step, k, n))
                        assert np.array_equal(bits16(got), want), f"{name} of param {i}"
                    else:
                        np.testing.assert_array_equal(got, want, strict=True)


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bfloat16_follows_the_float64_reference(case, state_dtype):
    """All-bfloat16 storage, to nearest, a few steps, against the float64 reference rounding
    the parameter (and the state) to bfloat16 after each step: within a few bfloat16 ulps.
    Rules whose step is a sign (Lion, Rprop) are discontinuous where the rounding differences
    of float32 and float64 arithmetic decide a sign, so they are checked exactly above only."""
    cls, hp = case
    if cls.rule.plain_state and state_dtype == "bfloat16":
        pytest.skip(f"{cls.rule.plain_state}: float32/float64 state only (refusal tested above)")
    if cls.__name__ in SIGN_RULES:
        pytest.skip("a sign-valued step: compared exactly by test_step_is_the_compute_step_rounded")
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(s).astype(BF16) for s in SHAPES]
    params = [p.copy() for p in init]
    opt = cls(params, **hp, state_dtype=state_dtype, rounding="nearest")
    name = {"Momentum": "SGD", "NAG": "SGD"}.get(cls.__name__, cls.__name__)
    ref_fn = reference.RULES[name]
    ref_hp = {("decoupled" if k == "decoupled_weight_decay" else k): v for k, v in hp.items()}
    ref_params = [p.astype(F64) for p in init]
    ref_states = [{} for _ in init]
    for _ in range(4):
        grads = [rng.standard_normal(s).astype(BF16) for s in SHAPES]
        opt.step(grads)
        for i in range(len(init)):
            new = ref_fn(ref_params[i], grads[i].astype(F64), ref_states[i], **ref_hp)
            ref_params[i] = widen(round_bf16(new.astype(F32).ravel(), "nearest")).reshape(
                new.shape).astype(F64)
            if state_dtype == "bfloat16":
                for k, v in ref_states[i].items():
                    if isinstance(v, np.ndarray):
                        ref_states[i][k] = widen(round_bf16(v.astype(F32).ravel(), "nearest")
                                                 ).reshape(v.shape).astype(F64)
    for p, r in zip(params, ref_params):
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(r), 1e-30))) - 7)
        assert np.all(np.abs(p.astype(F64) - r) <= 4 * ulp + 1e-6)


def test_generator_bit_exact_through_sgd():
    """SGD with momentum on bfloat16 values with power-of-two coefficients is exact in float32,
    so every stored bit is fixed by the rounding and the keyed generator alone; three
    parameters, indices in two param groups, several steps."""
    rng = np.random.default_rng(0)
    shapes = [(1000,), (17, 3), (5,)]
    vals = [(rng.integers(-64, 64, s) / 64).astype(BF16) for s in shapes]
    params = [v.copy() for v in vals]
    opt = fastopt.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1 / 16, momentum=0.5,
                      seed=2 ** 63 + 5, state_dtype="bfloat16")
    theta = [v.astype(F32) for v in vals]
    buf = [None] * 3
    for step in range(1, 5):
        grads = [(rng.integers(-64, 64, s) / 64).astype(BF16) for s in shapes]
        opt.step(grads)
        for i, s in enumerate(shapes):
            n = int(np.prod(s))
            g = grads[i].astype(F32)
            b = np.float32(1 / 16) * g if buf[i] is None else \
                np.float32(0.5) * buf[i] + np.float32(1 / 16) * g
            buf[i] = widen(round_bf16(b.ravel(), "stochastic",
                                      random_bits(2 ** 63 + 5, i, step, 0, n))).reshape(s)
            theta[i] = widen(round_bf16((theta[i] - b).ravel(), "stochastic",
                                        random_bits(2 ** 63 + 5, i, step, 1, n))).reshape(s)
            assert np.array_equal(bits16(params[i]), bits16(theta[i].astype(BF16)))
            assert np.array_equal(bits16(opt.state[i].momentum_buffer), bits16(buf[i].astype(BF16)))


def test_stochastic_rounding_is_unbiased():
    """x between two bfloat16 neighbours: the mean of its stochastic roundings over many seeds
    and elements is x, within five standard errors."""
    lo = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)
    for frac in (0.1, 0.5, 0.83):
        # theta = 1 - lr * g, with g a bf16 value: x = 1 + frac * ulp exactly in float32
        g = np.full(2000, -frac * 2.0 ** -7, dtype=F32).astype(BF16)
        x = lo - np.float32(1.0) * g.astype(F32)[0]
        f = float((x - lo) / ulp)
        total, count = 0.0, 0
        for seed in range(30):
            p = np.ones(2000, dtype=BF16)
            fastopt.SGD([p], lr=1.0, seed=seed).step([g])
            got = p.astype(F64)
            assert set(np.unique(got)) <= {1.0, 1.0 + 2.0 ** -7}
            total += got.sum()
            count += got.size
        mean = total / count
        se = float(ulp) * np.sqrt(f * (1 - f) / count)
        assert abs(mean - float(x)) < 5 * se + 1e-12, (frac, mean, float(x), se)


def _adam_run(threads=None, steps=3):
    if threads is not None:
        fastopt.set_num_threads(threads)
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(BF16) for n in (300_001, 1000)]
    opt = fastopt.Adam(params, lr=1e-2, state_dtype="bfloat16", seed=9)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(BF16) for p in params])
    return [bits16(p).tobytes() + bits16(opt.state[i].m).tobytes() + bits16(opt.state[i].v).tobytes()
            for i, p in enumerate(params)]


def test_same_bits_for_any_thread_count():
    before = fastopt.get_num_threads()
    try:
        runs = {t: _adam_run(t) for t in (1, 2, 3, 8)}
    finally:
        fastopt.set_num_threads(before)
    assert all(r == runs[1] for r in runs.values())


def test_same_bits_in_any_order_of_tensors():
    """A tensor's result depends on its parameter index, not on which batch or call it is in:
    the same parameters as two optimizers' params give other bits, as one gives the same."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal(300).astype(BF16)
    g = rng.standard_normal(300).astype(BF16)
    p1, q1 = a.copy(), np.ones(7, dtype=F32)
    fastopt.SGD([q1, p1], lr=0.1).step([np.ones(7, F32), g])  # p1: index 1, another batch
    p2, q2 = a.copy(), np.ones(7, dtype=BF16)
    fastopt.SGD([q2, p2], lr=0.1).step([np.ones(7, BF16), g])  # p2: index 1, same batch as q2
    assert np.array_equal(bits16(p1), bits16(p2))


ISA_RUN = r"""
import hashlib, json, sys, numpy as np, fastopt, ml_dtypes
bf = ml_dtypes.bfloat16
out = {"isa": fastopt.isa(), "bf16_path": fastopt.config.bf16_path(),
       "random_path": fastopt.config.random_path()}
for rounding in ("stochastic", "nearest"):
    for state_dtype, master in ((None, False), ("bfloat16", False), ("bfloat16", True)):
        rng = np.random.default_rng(4)
        params = [rng.standard_normal(n).astype(bf) for n in (1, 37, 1000, 140_001)]
        opt = fastopt.Nadam(params, lr=1e-2, state_dtype=state_dtype, rounding=rounding,
                            master_weights=master, seed=3)
        for _ in range(3):
            opt.step([rng.standard_normal(p.shape).astype(bf) for p in params])
        h = hashlib.sha256()
        for i, p in enumerate(params):
            h.update(p.view(np.uint16).tobytes())
            for b in opt.state[i].buffers().values():
                h.update(b.tobytes())
        out[f"{rounding}-{state_dtype}-{master}"] = h.hexdigest()
print(json.dumps(out))
"""


def test_same_bits_on_every_instruction_set():
    from test_engine import CHILD_ENV, HERE
    results = {}
    for isa in ("baseline", "avx2", "avx512", "avx512bf16"):
        res = subprocess.run([sys.executable, "-c", ISA_RUN], env={**CHILD_ENV, "FASTOPT_ISA": isa},
                             capture_output=True, text=True, check=True, cwd=HERE)
        results[isa] = json.loads(res.stdout)
    paths = {isa: (r.pop("isa"), r.pop("bf16_path"), r.pop("random_path"))
             for isa, r in results.items()}
    # each cap runs the paths this CPU has up to it (so the comparison below covers them all)
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags
    aes = "aes" in flags
    assert paths["baseline"] == ("baseline", "integer", "portable")
    if {"avx2", "fma"} <= flags:
        assert paths["avx2"] == ("avx2", "integer",
                                 "vaes256" if aes and "vaes" in flags else "aesni" if aes else "portable")
    if avx512:
        assert paths["avx512"] == ("avx512", "integer",
                                   "vaes512" if aes and "vaes" in flags else "aesni" if aes else "portable")
        assert paths["avx512bf16"][1] == ("avx512bf16" if "avx512_bf16" in flags else "integer")
    first = results["baseline"]
    assert all(r == first for r in results.values()), paths


def test_resume_from_checkpoint_repeats_bit_for_bit(tmp_path):
    rng = np.random.default_rng(6)
    init = [rng.standard_normal(s).astype(BF16) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(BF16) for s in SHAPES] for _ in range(6)]
    straight = [p.copy() for p in init]
    opt = fastopt.Adam(straight, lr=1e-2, state_dtype="bfloat16", seed=1234, master_weights=True)
    for g in grads:
        opt.step(g)
    resumed = [p.copy() for p in init]
    first = fastopt.Adam(resumed, lr=1e-2, state_dtype="bfloat16", seed=1234, master_weights=True)
    for g in grads[:3]:
        first.step(g)
    first.save(tmp_path / "ckpt.npz")
    second = fastopt.Adam(resumed, lr=1e-2)  # seed, storage from the checkpoint
    second.load(tmp_path / "ckpt.npz")
    assert second.storage_options == first.storage_options
    assert second.state[0].m.dtype == BF16 and second.state[0].master.dtype == F32
    for g in grads[3:]:
        second.step(g)
    for a, b in zip(straight, resumed):
        assert np.array_equal(bits16(a), bits16(b))
    sd = second.state_dict()
    assert sd["storage"]["seed"] == 1234


def test_refused_combinations_change_nothing():
    rng = np.random.default_rng(7)
    p32 = rng.standard_normal(10).astype(F32)
    with pytest.raises(ValueError, match="master_weights=True is for bfloat16"):
        fastopt.Adam([p32], master_weights=True)
    with pytest.raises(ValueError, match="unknown state_dtype"):
        fastopt.Adam([p32], state_dtype="float16")
    with pytest.raises(ValueError, match="unknown rounding"):
        fastopt.Adam([p32], rounding="up")
    with pytest.raises(ValueError, match="seed"):
        fastopt.Adam([p32], seed=-1)
    with pytest.raises(ValueError, match="state_dtype='float32' is for float32"):
        fastopt.Adam([np.zeros(3)], state_dtype="float32")
    p64 = rng.standard_normal(10)
    opt = fastopt.Adam([p64, p32], lr=0.1)
    opt.step([np.ones(10), np.ones(10, F32)])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="its gradient must be float64"):
        opt.step([np.ones(10, BF16), np.ones(10, F32)])
    assert_same_snapshot(before, snapshot(opt))
    opt.state[1].m = np.zeros(10, F64)  # float64 state for a float32 parameter
    with pytest.raises(TypeError, match="its state must be float32 or bfloat16"):
        opt.step([np.ones(10), np.ones(10, F32)])
    assert np.array_equal(before[0][0], opt.params[0])


def test_show_config_names_the_bf16_path():
    import io
    out = io.StringIO()
    fastopt.show_config(out)
    assert f"bfloat16:     rounding to nearest: {fastopt.config.bf16_path()}" in out.getvalue()
    assert fastopt.config.bf16_path() in ("avx512bf16", "integer")
    assert f"stochastic: ARS-7 bits by {fastopt.config.random_path()}" in out.getvalue()
    assert fastopt.config.random_path() in ("vaes512", "vaes256", "aesni", "portable")


@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ema_in_every_storage(case, storage):
    """ema_decay with bfloat16 storage: ema <- d ema + (1 - d) theta in the compute type, theta
    the step's result before the parameter is rounded (the master copy with master weights),
    the EMA stored as the state is (bfloat16 with state_dtype="bfloat16") and rounded with
    its own stream, after the parameter's."""
    cls, hp = case
    pdt, gdt, state_dtype, master = storage
    if cls.rule.plain_state and state_dtype == "bfloat16":
        pytest.skip(f"{cls.rule.plain_state}: float32/float64 state only (refusal tested above)")
    decay = 0.75
    cdt = compute(pdt)
    rng = np.random.default_rng(8)
    for rounding in ("stochastic", "nearest"):
        params = [rng.standard_normal(s).astype(pdt) for s in SHAPES]
        opt = cls(params, **hp, state_dtype=state_dtype, rounding=rounding, seed=SEED,
                  master_weights=master, ema_decay=decay)
        opt.step([rng.standard_normal(s).astype(gdt) for s in SHAPES])
        ema_stream = len(opt.rule.crule.state) + 1  # (after the state's and the parameter's)
        for _ in range(2):
            grads = [rng.standard_normal(s).astype(gdt) for s in SHAPES]
            before = [(opt.state[i].master.copy() if master else p.astype(cdt),
                       {k: v.astype(cdt) for k, v in opt.state[i].buffers().items()
                        if k not in ("master", "ema")},
                       opt.state[i].step, opt.state[i].ema.astype(cdt))
                      for i, p in enumerate(params)]
            opt.step(grads)
            theta = [b[0].copy() for b in before]
            ref = cls(theta, **hp)
            for i, (_, bufs, step, _) in enumerate(before):
                ref.state[i] = opt.state_type(**bufs, step=step)
            ref.step([g.astype(cdt) for g in grads])
            for i, (_, _, step, ema) in enumerate(before):
                if cls is fastopt.LAMB and state_dtype == "bfloat16":
                    theta[i] = lamb_update_from_stored_state(hp, before[i][0], ref.state[i],
                                                             opt.state[i], step + 1)
                want = cdt.type(decay) * ema + cdt.type(1.0 - decay) * theta[i]
                got = opt.state[i].ema
                if state_dtype == "bfloat16":
                    assert got.dtype == BF16
                    bits = random_bits(SEED, i, step + 1, ema_stream, got.size)
                    assert np.array_equal(bits16(got), round_bf16(want.astype(F32).ravel(),
                                                                  rounding, bits)), f"ema {i}"
                else:
                    np.testing.assert_array_equal(got, want, strict=True)
            assert opt.ema_arrays()[0] is opt.state[0].ema


@pytest.mark.parametrize("pdt", [F32, BF16], ids=["float32-params", "bfloat16-params"])
def test_norm_options_read_bfloat16_gradients(pdt):
    """clip_norm, skip_nonfinite and compute_norm over bfloat16 gradients: the norm is the one
    over float32 copies of them, bit for bit (the widening is exact), and float32 parameters
    take the same step as with those copies; a non-finite bfloat16 gradient skips the step."""
    rng = np.random.default_rng(9)
    shapes = [(300,), (40, 50), (4097,)]
    init = [rng.standard_normal(s).astype(pdt) for s in shapes]
    with_bf16, with_f32 = [p.copy() for p in init], [p.copy() for p in init]
    opt = fastopt.AdamW(with_bf16, lr=1e-2, seed=3)
    twin = fastopt.AdamW(with_f32, lr=1e-2, seed=3) if pdt == F32 else None
    for limit in (1e9, 1.0):  # below and above the norm: no clipping, then clipping
        grads = [(rng.standard_normal(s) * 3).astype(BF16) for s in shapes]
        got = opt.step(grads, grad_scale=2.0, clip_norm=limit, skip_nonfinite=True)
        exact = np.sqrt(sum(np.sum(g.astype(F64) ** 2) for g in grads)) / 2.0
        assert not got.skipped and got.total_norm == pytest.approx(exact, rel=1e-13)
        if twin is not None:
            want = twin.step([g.astype(F32) for g in grads], grad_scale=2.0, clip_norm=limit,
                             skip_nonfinite=True)
            assert got.total_norm == want.total_norm
            for a, b in zip(with_bf16, with_f32):
                np.testing.assert_array_equal(a, b, strict=True)
    assert opt.step(grads, compute_norm=True).total_norm == pytest.approx(2 * exact, rel=1e-13)
    before = snapshot(opt)
    grads[2][17] = np.inf
    result = opt.step(grads, skip_nonfinite=True)
    assert result.skipped and result.total_norm == np.inf
    assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("n", [1, 15, 16, 37, 1000])
def test_rounding_of_special_values(rounding, n):
    """Every float32 class through a bfloat16 write, tails of every length: Lion's m with
    beta2 = 0 becomes 0 * m + 1 * g, the float32 gradient (but +0 for -0), rounded (stream 0)."""
    rng = np.random.default_rng(n)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 1.1754942e-38,
                        -1.17549e-38, 3.4028235e38, -3.4028235e38, 3.3961776e38, 1.0, -1.0 - 2 ** -9],
                       dtype=F32)
    g = np.where(rng.random(n) < 0.5, rng.choice(special, n), rng.standard_normal(n).astype(F32) * 1e3)
    g = g.astype(F32)
    g[: min(n, 4)] = np.array([np.nan, 1e-40, 3.4028235e38, -0.0], F32)[: min(n, 4)]
    g.view(np.uint32)[rng.random(n) < 0.1] |= np.uint32(0x7FC01234)  # NaNs with payloads
    p = np.zeros(n, F32)
    opt = fastopt.Lion([p], lr=0.0, betas=(0.9, 0.0), state_dtype="bfloat16", rounding=rounding,
                       seed=SEED)
    opt.step([g])
    assert opt.rule.crule.state[0] == "m"
    m = np.float32(0.0) * np.zeros(n, F32) + np.float32(1.0) * g
    want = round_bf16(m, rounding, random_bits(SEED, 0, 1, 0, n))
    got = bits16(opt.state[0].m)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_rowwise_adagrad_staged_in_many_row_groups(rounding):
    """RowwiseAdagrad's bfloat16 parameters go through staging rows a group of whole rows at a
    time, and a dense tensor through several groups and threads: every element rounded with its
    own element index's bits (stream n_state = 1), whatever the grouping and thread count."""
    rng = np.random.default_rng(12)
    shapes = [(3000, 7), (20000,), (9, 4096), (40, 3000)]  # (over 131072 elements: threads)
    init = [rng.standard_normal(s).astype(BF16) for s in shapes]
    grads = [rng.standard_normal(s).astype(BF16) for s in shapes]
    results = []
    for threads in (1, 2, 3):
        fastopt.set_num_threads(threads)
        try:
            params = [p.copy() for p in init]
            opt = fastopt.RowwiseAdagrad(params, lr=0.05, rounding=rounding, seed=SEED)
            opt.step(grads)
        finally:
            fastopt.set_num_threads(2)
        results.append([bits16(p) for p in params])
        ref_params = [p.astype(F32) for p in init]
        ref = fastopt.RowwiseAdagrad(ref_params, lr=0.05)
        ref.step([g.astype(F32) for g in grads])
        for i, (p, want) in enumerate(zip(params, ref_params)):
            expected = round_bf16(want.ravel(), rounding, random_bits(SEED, i, 1, 1, p.size))
            assert np.array_equal(bits16(p), expected), (threads, i)
            np.testing.assert_array_equal(opt.state[i].sum, ref.state[i].sum, strict=True)
    assert all(all(np.array_equal(a, b) for a, b in zip(r, results[0])) for r in results)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_norm_of_bfloat16_gradients_is_that_of_their_float32_values(threads, rng):
    """The reduction pass reads bfloat16 gradients as they are (widened exactly as it reads,
    blocks side by side): its total norm and its inf/NaN verdict are, bit for bit, those of a
    float32 copy's."""
    sizes = (5000, 4 * 4096 * 3 + 4096 * 2 + 77, 300_001)
    grads = [(rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(BF16) for n in sizes]
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(threads)
        for bad in (None, np.inf, np.nan):
            if bad is not None:
                grads[1][40_000] = bad
            norms = []
            for gs in (grads, [g.astype(F32) for g in grads]):
                opt = fastopt.SGD([np.zeros(g.shape, g.dtype) for g in gs], lr=0.0)
                result = opt.step(gs, compute_norm=True)
                norms.append(result.total_norm)
            if bad is None:
                assert norms[0] == norms[1]
                exact = np.sqrt(sum((g.astype(F64) ** 2).sum() for g in grads))
                assert norms[0] == pytest.approx(exact, rel=1e-12)
            else:  # (inf for an inf, NaN for a NaN: as the float32 copy's)
                assert np.isnan(norms[0]) == np.isnan(norms[1]) == np.isnan(bad), norms
                assert not np.isfinite(norms[0])
    finally:
        fastopt.set_num_threads(before)


@pytest.mark.parametrize("pdt", [np.float32, np.float64])
def test_first_ema_copy_rounds_as_a_step_stores(pdt):
    """A bfloat16 EMA starts as the parameter rounded to nearest with subnormals flushed, as
    every bfloat16 store (it was numpy's cast: the subnormal kept); a row no lazy sparse step has
    touched keeps that first value."""
    w = np.array([[1e-39, -1e-39, 1.0 + 2.0**-8, 3.0], [1.0, 2.0, 1e-39, 1.0 + 3 * 2.0**-9]], pdt)
    opt = fastopt.SGD([w], lr=0.1, state_dtype="bfloat16", ema_decay=0.9, rounding="stochastic")
    want = round_bf16(w.astype(np.float32), "nearest")
    assert np.array_equal(opt.ema_arrays()[0].view(np.uint16), want)  # (no state yet)
    opt.step([fastopt.SparseGrad(np.array([1]), np.ones((1, 4), pdt))])
    assert np.array_equal(opt.state[0].ema[0].view(np.uint16), want[0])
