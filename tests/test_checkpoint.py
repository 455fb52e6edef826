"""Checkpoint files: anything unreadable is rejected with one clear ValueError and changes
nothing; save() replaces the file atomically, so a failed save keeps the previous checkpoint."""
import errno
import io
import os
import pathlib
import re
import stat
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest

import fastopt
from conftest import assert_same_snapshot, snapshot


def make(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(7)]
    opt = fastopt.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 0.003}])
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    return opt


@pytest.fixture
def saved(tmp_path):
    """The bytes of a real checkpoint written by save()."""
    path = tmp_path / "source.npz"
    make(seed=1).save(path)
    return path.read_bytes()


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def flat_entries(data):
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def edited(data, change):
    """The checkpoint `data` with its entries changed by change(dict of arrays)."""
    flat = flat_entries(data)
    change(flat)
    return npz_bytes(**flat)


def zip_bytes(entries):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name warns
        with zipfile.ZipFile(buf, "w") as z:
            for name, content in entries:
                z.writestr(name, content)
    return buf.getvalue()


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def hide_last_entries(data, n):
    """`data` with one damaged length in its zip directory: the comment of an entry grows over
    the directory records of the last n entries, which zipfile then no longer lists."""
    end = data.rindex(b"PK\x05\x06")
    size_cd, offset_cd = struct.unpack_from("<LL", data, end + 12)
    starts, at = [], offset_cd
    while at < offset_cd + size_cd:
        starts.append(at)
        name_len, extra_len, comment_len = struct.unpack_from("<3H", data, at + 28)
        at += 46 + name_len + extra_len + comment_len
    out = bytearray(data)
    struct.pack_into("<H", out, starts[-n - 1] + 32, offset_cd + size_cd - starts[-n])
    return bytes(out)


def flipped(data, i):
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


def npy_claiming(shape, data):
    """A .npy file whose header announces `shape` (float64) followed by the bytes `data`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + data


# (id, make the file's bytes from a real checkpoint's bytes, what the message must say)
UNREADABLE = [
    ("empty", lambda d: b"", "the file is empty"),
    *[(f"truncated-to-{n}", (lambda n: lambda d: d[:n])(n), "truncated")
      for n in (1, 2, 3, 4, 30, 100, 1000)],
    ("truncated-to-half", lambda d: d[:len(d) // 2], "truncated"),
    ("truncated-by-1", lambda d: d[:-1], "truncated"),
    ("truncated-by-22", lambda d: d[:-22], "truncated"),
    ("random-bytes", lambda d: np.random.default_rng(3).bytes(5000), "not an .npz"),
    ("text", lambda d: b"step,loss\n1,0.5\n2,0.25\n", "not an .npz"),
    ("npy", lambda d: npy_bytes(np.ones(3)), "single .npy array"),
    ("other-npz", lambda d: npz_bytes(weights=np.ones(3), bias=np.zeros(2)),
     "no 'optimizer' entry"),
    ("pickled", lambda d: npz_bytes(optimizer=np.array([{"evil": 1}], dtype=object)),
     "pickled"),
    ("zip-of-text", lambda d: zip_bytes([("notes.txt", "hello")]), "'notes.txt' is not a .npy"),
    ("zip-of-bad-npy", lambda d: zip_bytes([("optimizer.npy", b"not an array")]),
     "entry 'optimizer.npy'"),
    ("duplicate-entry", lambda d: zip_bytes([("optimizer.npy", npy_bytes(np.array("Adam")))] * 2),
     "appears twice"),
    ("byte-changed-in-a-buffer",
     lambda d: flipped(d, d.index(make(seed=1).state[1].v.tobytes()) + 9),
     "entry 'state/1/v.npy': BadZipFile: Bad CRC-32"),
    ("header-shape-lies", lambda d: zip_bytes([("optimizer.npy", npy_claiming(
        (9,), np.arange(3.0).tobytes()))]), "announces 72 bytes of data, it holds 24"),
    ("header-shape-huge", lambda d: zip_bytes([("optimizer.npy", npy_claiming(
        (2**60,), np.arange(3.0).tobytes()))]), f"announces {2**63} bytes"),
    ("directory-hides-a-state", lambda d: hide_last_entries(d, 3),
     "directory lists .* entries, its end record"),
    ("optimizer-not-a-name", lambda d: edited(d, lambda f: f.update(optimizer=np.float64(1))),
     "'optimizer' entry is not a name"),
    ("version-not-an-integer", lambda d: edited(d, lambda f: f.update(version=np.array([1]))),
     "'version' entry is not an integer"),
    ("no-n_groups", lambda d: edited(d, lambda f: f.pop("n_groups")), "no 'n_groups' entry"),
    # more groups than entries (bounded so that the list of groups is never allocated)
    ("n_groups-too-many", lambda d: edited(d, lambda f: f.update(n_groups=np.int64(1000))),
     "n_groups is 1000"),
    ("unexpected-entry", lambda d: edited(d, lambda f: f.update({"extra": np.ones(2)})),
     "unexpected entry 'extra'"),
    ("index-not-a-number", lambda d: edited(d, lambda f: f.update({"state/x/m": np.ones(2)})),
     "unexpected entry 'state/x/m'"),
    ("index-with-leading-zero", lambda d: edited(d, lambda f: f.update({"state/01/m": np.ones(2)})),
     "unexpected entry 'state/01/m'"),
    ("group-beyond-n_groups", lambda d: edited(
        d, lambda f: f.update({"param_groups/2/lr": np.float64(0.1)})), "n_groups is 2"),
    ("group-without-params", lambda d: edited(d, lambda f: f.pop("param_groups/1/params")),
     "param group 1 has no 'params' entry"),
    ("params-not-indices", lambda d: edited(
        d, lambda f: f.update({"param_groups/0/params": np.array([0.5])})),
     "not a list of parameter indices"),
    ("hyperparameter-2d", lambda d: edited(
        d, lambda f: f.update({"param_groups/0/lr": np.ones((2, 2))})),
     "not a number or a tuple"),
]


@pytest.mark.parametrize("name, make_bytes, reason", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_unreadable_file_raises_one_valueerror_and_changes_nothing(name, make_bytes, reason, saved,
                                                                   tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(make_bytes(saved))
    opt = make(seed=5)
    before = snapshot(opt)
    expected = f"^not a fastopt checkpoint: {re.escape(str(path))}: .*{reason}"
    with pytest.raises(ValueError, match=expected) as e:
        opt.load(path)
    assert type(e.value) is ValueError
    assert_same_snapshot(before, snapshot(opt))
    opt.step([np.ones_like(p) for p in opt.params])  # still works
    assert opt.state[0].step == 4


def test_every_single_byte_change_is_caught_or_harmless(tmp_path):
    """Damage one byte anywhere in the file (a sample of positions): the file
    either loads exactly the original checkpoint (a timestamp or another field load ignores)
    or is rejected as unreadable with nothing changed."""
    def tiny(seed):
        p = np.random.default_rng(seed).standard_normal(4).astype(np.float32)
        opt = fastopt.Adam([p], lr=0.01)
        opt.step([p + 1])
        return opt

    source = tiny(1)
    source.save(tmp_path / "opt.npz")
    saved = (tmp_path / "opt.npz").read_bytes()
    original = snapshot(source)[1:3]  # states and hyperparameters
    directory = struct.unpack_from("<L", saved, saved.rindex(b"PK\x05\x06") + 16)[0]
    # every byte of the first directory records and of the end record, a sample elsewhere
    positions = sorted(set(range(0, directory, 7)) | set(range(directory, len(saved), 4))
                       | set(range(directory, directory + 200))
                       | set(range(len(saved) - 22, len(saved))))
    opt = tiny(2)
    outcomes = {"loaded": 0, "rejected": 0}
    for i in positions:
        before = snapshot(opt)
        try:
            opt.load(io.BytesIO(flipped(saved, i)))
        except ValueError as e:
            assert str(e).startswith("not a fastopt checkpoint: "), (i, e)
            assert_same_snapshot(before, snapshot(opt))
            outcomes["rejected"] += 1
        else:
            assert_same_snapshot((before[0],) + original + (before[3],), snapshot(opt))
            outcomes["loaded"] += 1
            opt = tiny(2)
    assert outcomes["rejected"] > outcomes["loaded"] > 0


def test_newer_version_says_so(saved, tmp_path):
    path = tmp_path / "v2.npz"
    path.write_bytes(edited(saved, lambda f: f.update(version=np.int64(2))))
    opt = make(seed=5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="checkpoint version 2; this fastopt reads version 1"):
        opt.load(path)
    assert_same_snapshot(before, snapshot(opt))


def test_checkpoint_that_does_not_fit_names_the_file(saved, tmp_path):
    """A readable checkpoint of another optimizer keeps load_state_dict's message, with the path."""
    path = tmp_path / "sgd.npz"
    fastopt.SGD([np.ones(3)]).save(path)
    opt = make(seed=5)
    before = snapshot(opt)
    expected = f"^{re.escape(str(path))}: state_dict is from SGD, not Adam"
    with pytest.raises(ValueError, match=expected):
        opt.load(path)
    assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("step", [2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("via_file", [False, True])
def test_step_count_past_the_limit_is_refused_and_changes_nothing(step, via_file, tmp_path):
    """A step count over 2**53 is refused at load time (before, 2**63 - 1 loaded and the next
    step failed in the second group's C call, after the first group had been updated)."""
    opt = make(seed=6)
    d = opt.state_dict()
    d["state"][1]["step"] = step
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state 1\.step must be in \[0, 2\*\*53\]"):
        if via_file:
            if step >= 2**64:
                pytest.skip("an .npz step is an int64 or uint64")
            np.savez(tmp_path / "big.npz", **dict(checkpoint_arrays(opt, d)))
            opt.load(tmp_path / "big.npz")
        else:
            opt.load_state_dict(d)
    assert_same_snapshot(before, snapshot(opt))


def checkpoint_arrays(opt, d):
    from fastopt import checkpoint
    for key, value in checkpoint._flatten(d):
        yield key, np.asarray(value)


def test_step_count_reaches_the_limit_and_stops_there():
    """A state steps up to 2**53 and its checkpoint loads; the step past it is refused, naming
    the step count, and changes nothing (it went to 2**53 + 1, a state that neither the
    optimizer's own load_state_dict nor load took back)."""
    opt = make(seed=7)
    d = opt.state_dict()
    d["state"][0]["step"] = d["state"][1]["step"] = 2**53 - 1
    opt.load_state_dict(d)
    grads = [np.ones_like(p) for p in opt.params]
    opt.step(grads)
    assert opt.state[0].step == opt.state[1].step == 2**53
    opt.load_state_dict(opt.state_dict())
    before = snapshot(opt)
    for _ in range(2):  # the full checks, then the plan's
        with pytest.raises(ValueError, match=r"step count is 9007199254740992.*no further step"):
            opt.step(grads)
        assert_same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_missing_file_or_folder_is_an_oserror(kind, tmp_path):
    """Not a damaged checkpoint but no file to read: the usual OSError, nothing changed."""
    path = tmp_path / "nothing.npz"
    if kind == "folder":
        path.mkdir()
    opt = make(seed=5)
    before = snapshot(opt)
    with pytest.raises(FileNotFoundError if kind == "missing" else IsADirectoryError):
        opt.load(path)
    assert_same_snapshot(before, snapshot(opt))


def test_load_from_a_file_object(saved):
    opt = make(seed=5)
    opt.load(io.BytesIO(saved))
    expected = make(seed=1).state_dict()
    np.testing.assert_array_equal(opt.state[1].v, expected["state"][1]["v"], strict=True)


def test_buffers_larger_than_one_read_and_fortran_order_load_exactly(tmp_path):
    rng = np.random.default_rng(4)
    big = rng.standard_normal(1_300_000)  # 10.4 MB: read in several pieces
    a = fastopt.Adam([big, rng.standard_normal((3, 5)).astype(np.float32)])
    a.step([rng.standard_normal(big.shape), rng.standard_normal((3, 5)).astype(np.float32)])
    path = tmp_path / "opt.npz"
    a.save(path)
    # another writer may store a buffer in Fortran order
    path.write_bytes(edited(path.read_bytes(), lambda f: f.update(
        {"state/1/m": np.asfortranarray(f["state/1/m"])})))
    b = fastopt.Adam([np.zeros_like(big), np.zeros((3, 5), np.float32)])
    b.load(path)
    for i in (0, 1):
        for k, buf in a.state[i].buffers().items():
            np.testing.assert_array_equal(getattr(b.state[i], k), buf, strict=True)
            assert getattr(b.state[i], k).flags.c_contiguous


def test_zip64_archive_loads(tmp_path, monkeypatch):
    """Checkpoints over 2 GiB end in zip64 records; the entry count is read from those."""
    path = tmp_path / "big.npz"
    a = make(seed=1)
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP64_LIMIT", 64)  # what a > 2 GiB archive would need
        a.save(path)
    assert b"PK\x06\x06" in path.read_bytes()
    b = make(seed=5)
    b.load(path)
    np.testing.assert_array_equal(b.state[0].m, a.state[0].m, strict=True)
    path.write_bytes(hide_last_entries(path.read_bytes(), 2))
    with pytest.raises(ValueError, match="directory lists"):
        b.load(path)


# ---- save -------------------------------------------------------------------------------

def assert_old_checkpoint_intact(path, old_bytes, old_opt):
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert path.read_bytes() == old_bytes
    fresh = make(seed=5)
    fresh.load(path)
    for i, s in old_opt.state.items():
        for k, buf in s.buffers().items():
            np.testing.assert_array_equal(getattr(fresh.state[i], k), buf, strict=True)
        assert fresh.state[i].step == s.step


@pytest.fixture
def old_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "opt.npz"
    old = make(seed=1)
    old.save(path)
    return path, path.read_bytes(), old


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["disk-full", "interrupt"])
def test_failed_write_keeps_the_old_checkpoint(error, old_checkpoint, monkeypatch):
    path, old_bytes, old = old_checkpoint

    def savez_that_fails_halfway(f, **arrays):
        f.write(b"PK\x03\x04" + b"\x00" * 5000)  # part of an archive reached the file
        raise error

    monkeypatch.setattr(np, "savez", savez_that_fails_halfway)
    new = make(seed=2, steps=5)
    with pytest.raises(type(error)):
        new.save(path)
    monkeypatch.undo()
    assert_old_checkpoint_intact(path, old_bytes, old)


def test_failed_rename_keeps_the_old_checkpoint(old_checkpoint, monkeypatch):
    path, old_bytes, old = old_checkpoint

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        make(seed=2).save(path)
    monkeypatch.undo()
    assert_old_checkpoint_intact(path, old_bytes, old)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_savez(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError):
        make().save(tmp_path / "opt.npz")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="RLIMIT_FSIZE test is for Linux")
def test_file_size_limit_keeps_the_old_checkpoint(old_checkpoint):
    """A real write failure: a child process whose file-size limit is below the new
    checkpoint's size saves over the old one."""
    path, old_bytes, old = old_checkpoint
    script = textwrap.dedent(f"""
        import resource, numpy as np, fastopt
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(old_bytes) + 4096}, resource.RLIM_INFINITY))
        p = np.ones(1_000_000, np.float32)
        opt = fastopt.Adam([p])
        opt.step([p.copy()])
        try:
            opt.save({str(path)!r})
        except OSError as e:
            print("errno", e.errno)
        else:
            print("saved")
    """)
    # the child imports the fastopt this process imported, never a source tree without its
    # extension
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["errno", str(errno.EFBIG)]
    assert_old_checkpoint_intact(path, old_bytes, old)


def test_save_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (calls.append(("replace", a, b)), real_replace(a, b)))
    path = tmp_path / "opt.npz"
    make().save(path)
    kinds = [c[0] for c in calls]
    assert kinds[:2] == ["fsync", "replace"]  # the data, then the rename (then the folder)
    temp, target = calls[1][1], calls[1][2]
    assert os.path.dirname(temp) == str(tmp_path) and os.path.basename(temp).startswith(".opt.npz.")
    assert temp.endswith(".tmp") and target == str(path)
    assert os.listdir(tmp_path) == ["opt.npz"]


@pytest.mark.parametrize("as_type", [str, pathlib.Path, os.fsencode], ids=["str", "Path", "bytes"])
def test_save_accepts_paths(as_type, tmp_path):
    a = make(seed=1)
    a.save(as_type(str(tmp_path / "opt.npz")))
    b = make(seed=5)
    b.load(as_type(str(tmp_path / "opt.npz")))
    np.testing.assert_array_equal(b.state[1].m, a.state[1].m, strict=True)
    assert os.listdir(tmp_path) == ["opt.npz"]  # the exact name: no ".npz" added


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_keeps_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = tmp_path / "opt.npz"
    make().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    path.chmod(0o640)
    make(seed=2).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="POSIX permissions, not root")
def test_save_refuses_a_read_only_checkpoint(old_checkpoint):
    path, old_bytes, old = old_checkpoint
    path.chmod(0o444)
    with pytest.raises(PermissionError):
        make(seed=2).save(path)
    assert_old_checkpoint_intact(path, old_bytes, old)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_save_writes_through_a_symbolic_link(tmp_path):
    target = tmp_path / "step100.npz"
    link = tmp_path / "latest.npz"
    make().save(target)
    link.symlink_to(target.name)
    a = make(seed=2)
    a.save(link)
    assert link.is_symlink()
    b = make(seed=5)
    b.load(target)
    np.testing.assert_array_equal(b.state[0].v, a.state[0].v, strict=True)
    assert sorted(os.listdir(tmp_path)) == ["latest.npz", "step100.npz"]


def test_save_refuses_what_load_could_not_read(tmp_path):
    """A hyperparameter that is not a number would be pickled: refused before any file exists."""
    opt = make()
    opt.param_groups[0]["lr"] = None
    with pytest.raises(TypeError, match="cannot save param_groups/0/lr"):
        opt.save(tmp_path / "opt.npz")
    assert os.listdir(tmp_path) == []
