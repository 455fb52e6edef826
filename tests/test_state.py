"""State round trips (state_dict, .npz), and corrupt state dicts rejected with nothing changed."""
import numpy as np
import pytest

import fastopt
from conftest import CASES, assert_same_snapshot, case_id, continue_from_checkpoint, snapshot


def make(cls, hp, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(7),
              rng.standard_normal(4)]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.003}]
    return cls(groups, **hp)


def train(opt, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params])


@pytest.mark.parametrize("via_file", [False, True], ids=["state_dict", "npz"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_round_trip_continues_identically(case, via_file, tmp_path):
    cls, hp = case
    a = make(cls, hp)
    train(a, 7, seed=1)
    a.param_groups[1]["lr"] = 0.002  # a changed hyperparameter travels too
    b = make(cls, hp)
    continue_from_checkpoint(a, b, via_file, tmp_path)
    assert b.param_groups[1]["lr"] == 0.002
    train(a, 5, seed=2)
    train(b, 5, seed=2)
    for pa, pb in zip(a.params, b.params):
        np.testing.assert_array_equal(pa, pb, strict=True)
    for i in a.state:
        for k, buf in a.state[i].buffers().items():
            np.testing.assert_array_equal(buf, getattr(b.state[i], k), strict=True)
        assert a.state[i].step == b.state[i].step == 12


def test_state_dict_is_a_copy():
    opt = make(fastopt.Adam, {})
    train(opt, 2, seed=0)
    d = opt.state_dict()
    d["state"][0]["m"][...] = 99.0
    assert not (opt.state[0].m == 99.0).any()
    other = make(fastopt.Adam, {})
    other.load_state_dict(d)
    d["state"][0]["m"][...] = 7.0
    assert (other.state[0].m == 99.0).all()


def test_state_dict_contents():
    opt = make(fastopt.Adam, dict(amsgrad=True))
    train(opt, 3, seed=0)
    d = opt.state_dict()
    assert d["optimizer"] == "Adam"
    assert [g["params"] for g in d["param_groups"]] == [[0, 1], [2]]
    assert set(d["state"][0]) == {"m", "v", "max_v", "step"} and d["state"][0]["step"] == 3
    assert d["state"][0]["m"].dtype == np.float32 and d["state"][1]["m"].dtype == np.float64


def corruptions():
    def drop(i, key):
        def f(d):
            del d["state"][i][key]
        return f

    def setval(i, key, value):
        def f(d):
            d["state"][i][key] = value(d["state"][i][key]) if callable(value) else value
        return f

    def group(i, key, value):
        def f(d):
            if value is KeyError:
                del d["param_groups"][i][key]
            else:
                d["param_groups"][i][key] = value
        return f

    return [
        ("missing m", drop(0, "m"), ValueError, "lacks 'm'"),
        ("missing step", drop(1, "step"), ValueError, "lacks"),
        ("missing max_v with amsgrad", drop(2, "max_v"), ValueError, "lacks 'max_v'"),
        ("wrong shape", setval(0, "v", lambda a: a.reshape(-1)), ValueError, "shape"),
        ("wrong dtype", setval(0, "v", lambda a: a.astype(np.float64)), TypeError, "dtype"),
        ("not an array", setval(1, "m", [1.0] * 7), TypeError, "numpy array"),
        ("negative step", setval(1, "step", -3), ValueError, "step"),
        ("unknown field", setval(1, "momentum_buffer_x", 1), ValueError, "unknown field"),
        ("bad index", lambda d: d["state"].__setitem__(9, {}), ValueError, "parameter index"),
        ("missing hyperparameter", group(0, "eps", KeyError), ValueError, "lacks.*eps"),
        ("invalid hyperparameter", group(1, "lr", float("nan")), ValueError, "lr"),
        ("group count", lambda d: d["param_groups"].pop(), ValueError, "param groups"),
        ("group params", group(1, "params", [1]), ValueError, "param group 1"),
        ("other optimizer", lambda d: d.__setitem__("optimizer", "SGD"), ValueError, "from SGD"),
        ("no state key", lambda d: d.pop("state"), ValueError, "'state'"),
    ]


@pytest.mark.parametrize("name, corrupt, error, match", corruptions(),
                         ids=[c[0] for c in corruptions()])
def test_corrupt_state_dict_changes_nothing(name, corrupt, error, match):
    source = make(fastopt.Adam, dict(amsgrad=True))
    train(source, 3, seed=0)
    d = source.state_dict()
    corrupt(d)
    target = make(fastopt.Adam, dict(amsgrad=True), seed=5)
    train(target, 2, seed=9)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(d)
    assert_same_snapshot(before, snapshot(target))


def test_load_rejects_pickles_and_garbage(tmp_path):
    opt = make(fastopt.Adam, {})
    train(opt, 1, seed=0)
    before = snapshot(opt)
    np.savez(tmp_path / "pickled.npz", optimizer=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError):
        opt.load(tmp_path / "pickled.npz")
    np.savez(tmp_path / "junk.npz", something=np.ones(3))
    with pytest.raises(ValueError, match="not a fastopt checkpoint"):
        opt.load(tmp_path / "junk.npz")
    assert_same_snapshot(before, snapshot(opt))


def test_load_before_first_step_then_train(tmp_path):
    """A checkpoint taken before any step has no states; loading it keeps it that way."""
    a = make(fastopt.SGD, dict(momentum=0.9))
    a.save(tmp_path / "fresh.npz")
    b = make(fastopt.SGD, dict(momentum=0.9))
    train(b, 2, seed=0)
    b.load(tmp_path / "fresh.npz")
    assert b.state == {}
