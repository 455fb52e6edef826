"""Checkpoints of an Optimizer: state_dict / load_state_dict, and .npz files (save / load).

The file is an .npz archive of plain arrays, read without pickle:
    optimizer, version, n_groups             0-d arrays
    param_groups/<i>/<hyperparameter>        0-d arrays (1-d for tuples such as betas)
    param_groups/<i>/params                  the group's parameter indices
    state/<index>/<buffer or counter>        the state of parameter <index> (a bfloat16
                                             buffer as uint16 bits, named <buffer>.bfloat16)
    storage_<option>                         0-d: the storage options (fastopt.storage;
                                             state_dtype None is "")

Every function here holds the optimizer's lock while it reads or writes the optimizer, so a
checkpoint taken while another thread steps is all of one step.
"""
import errno
import math
import os
import re
import secrets
import stat
import struct
import zipfile

import numpy as np

from fastopt import _checks, storage

STATE_DICT_VERSION = 1


# ---- state dicts -------------------------------------------------------------------------

def state_dict(opt):
    """{"optimizer", "version", "state": {index: {buffer: array, "step": int}},
    "param_groups": [{hyperparameters..., "params": [indices]}]}; arrays are copies."""
    with opt._lock:
        groups, start = [], 0
        for g in opt.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                     for k, v in s.to_dict().items()} for i, s in opt.state.items()}
        options = dict(getattr(opt, "storage_options", storage.DEFAULTS))
    return {"optimizer": type(opt).__name__, "version": STATE_DICT_VERSION,
            "state": state, "param_groups": groups, "storage": options}


def load_state_dict(opt, d):
    """Replace opt's hyperparameters and states with those of `d` (copied).  Everything is
    validated first: on any error nothing changes."""
    with opt._lock:
        groups, states = _validated(opt, d)
        options = _validated_storage(opt, d)
        for group, hp in zip(opt.param_groups, groups):
            group.update(hp)
        opt.state = states
        if options is not None:
            opt.storage_options = options
        opt._plan = None


def _validated_storage(opt, d):
    """The state_dict's storage options (seed, rounding, ...), checked against the params;
    None when it has none (a checkpoint from before bfloat16 storage)."""
    options = d.get("storage")
    if options is None:
        return None
    if not isinstance(options, dict) or set(options) - set(storage.DEFAULTS):
        raise ValueError(f"state_dict storage must be a dict of {sorted(storage.DEFAULTS)}, "
                         f"got {options!r}")
    options = storage.check_options(**options)
    for i, p in enumerate(opt.params):
        storage.check_param_dtype(p.dtype, options, f"params[{i}]")
    return options


def _validated(opt, d):
    if not isinstance(d, dict):
        raise TypeError(f"state_dict must be a dict, got {type(d).__name__}")
    for key in ("state", "param_groups"):
        if key not in d:
            raise ValueError(f"state_dict has no {key!r} key")
    name = d.get("optimizer", type(opt).__name__)
    if name != type(opt).__name__:
        raise ValueError(f"state_dict is from {name}, not {type(opt).__name__}")
    loaded_groups = d["param_groups"]
    if not isinstance(loaded_groups, (list, tuple)) or len(loaded_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(loaded_groups)} param groups, "
                         f"the optimizer has {len(opt.param_groups)}")
    groups, group_of, start = [], [], 0  # group_of: each parameter's checked hyperparameters
    for i, (lg, g) in enumerate(zip(loaded_groups, opt.param_groups)):
        n = len(g["params"])
        if not isinstance(lg, dict) or list(lg.get("params", ())) != list(range(start, start + n)):
            raise ValueError(f"state_dict param group {i} does not hold parameters "
                             f"{start}..{start + n - 1}")
        hp = {k: v for k, v in lg.items() if k != "params"}
        group_of += [opt._group_hyperparameters(hp, f"state_dict param group {i}")] * n
        groups.append(hp)
        start += n
    params = opt.params
    loaded_states = d["state"]
    if not isinstance(loaded_states, dict):
        raise TypeError("state_dict['state'] must be a dict")
    states = {}
    state_type = opt.state_type
    for key, fields in loaded_states.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) \
                or not 0 <= key < len(params):
            raise ValueError(f"state_dict state key {key!r} is not a parameter index")
        if not isinstance(fields, dict):
            raise TypeError(f"state_dict state {key} must be a dict")
        known = set(state_type.BUFFERS) | set(state_type.COUNTERS) | set(state_type.ROW_FIELDS)
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"state_dict state {key} has unknown field(s) {sorted(unknown)}")
        missing = set(state_type.COUNTERS) - set(fields)
        if missing:
            raise ValueError(f"state_dict state {key} lacks {sorted(missing)}")
        what = f"state_dict state {key}"
        for k in (n for n in group_of[key][1].used_state() if n is not None):
            if k not in fields and state_type.applies(params[key], k):
                raise ValueError(f"{what} lacks {k!r}")
        copied = {}
        for k, v in fields.items():
            if k in state_type.COUNTERS:
                copied[k] = _checks.step_count(f"{what}.{k}", _scalar(v))
            elif k in state_type.ROW_FIELDS:
                if not isinstance(v, np.ndarray) or v.dtype != np.int64:
                    raise TypeError(f"{what}.{k} must be an int64 numpy array")
                copied[k] = np.array(v, dtype=np.int64, order="C", copy=True)
            else:
                if not isinstance(v, np.ndarray):
                    raise TypeError(f"{what}.{k} must be a numpy array, got {type(v).__name__}")
                if not state_type.applies(params[key], k):
                    raise ValueError(f"{what}.{k} does not apply to a parameter of shape "
                                     f"{tuple(params[key].shape)}")
                # (the dtype is state.check's below: state buffers and master differ)
                _checks.check_like(np.asarray(v, order="C"), params[key], f"{what}.{k}",
                                   writeable=False, dtype_ok=lambda dtype: (True, ""),
                                   shape=state_type.buffer_shape(params[key], k))
                copied[k] = np.array(v, order="C", copy=True)
        state = state_type(**copied)
        state.check(params[key], what)
        states[int(key)] = state
    return groups, states


def _scalar(v):
    if isinstance(v, np.ndarray) and v.shape == ():
        return v[()]
    return v


# ---- files -------------------------------------------------------------------------------

def save(opt, path):
    """Write state_dict(opt) to the .npz file `path` (str or os.PathLike) atomically: the file
    is written beside the target and then renamed onto it, so a crash, a full disk or a size
    limit leaves any previous checkpoint at `path` intact."""
    # through a symbolic link, as writing in place would (the rename would replace the link)
    path = os.path.realpath(os.fsdecode(path))
    flat = {}
    for key, value in _flatten(state_dict(opt)):
        flat[key] = np.asarray(value)
        if flat[key].dtype.hasobject:  # it would be pickled, and load() never unpickles
            raise TypeError(f"cannot save {key} = {value!r}: not a number or an array")
    _write_atomically(path, lambda f: np.savez(f, **flat))


def load(opt, path):
    """load_state_dict(opt) from a file written by save() (a path or a binary file object);
    never unpickles.  A file that is not a readable checkpoint raises
    ValueError("not a fastopt checkpoint: <path>: <reason>"); nothing changes on any error."""
    if hasattr(path, "read"):
        where = getattr(path, "name", repr(path))
        flat = _read_arrays(path, where)
    else:
        where = os.fsdecode(path)
        with open(where, "rb") as f:  # a missing file or a folder is an OSError of its own
            flat = _read_arrays(f, where)
    d = _unflatten(flat, where)
    try:
        load_state_dict(opt, d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


def _flatten(d):
    yield "optimizer", d["optimizer"]
    yield "version", d["version"]
    yield "n_groups", len(d["param_groups"])
    for i, g in enumerate(d["param_groups"]):
        for k, v in g.items():
            if isinstance(v, (tuple, list)) and any(x is None for x in v):
                # a tuple with None (an eps pair's default): the numbers, and where the Nones were
                yield f"param_groups/{i}/{k}", [0.0 if x is None else x for x in v]
                yield f"param_groups/{i}/{k}.none", np.array([x is None for x in v])
                continue
            yield f"param_groups/{i}/{k}", np.asarray(v, dtype=np.int64) if k == "params" else v
    for i, s in d["state"].items():
        for k, v in s.items():
            if isinstance(v, np.ndarray) and storage.is_bf16(v.dtype):
                yield f"state/{i}/{k}.bfloat16", v.view(np.uint16)
            else:
                yield f"state/{i}/{k}", v
    for k, v in d.get("storage", {}).items():
        yield f"storage_{k}", np.uint64(v) if k == "seed" else ("" if v is None else v)


_INDEX = re.compile(r"0|[1-9][0-9]*")


def _unflatten(flat, path):
    """The inverse of _flatten.  It checks the file's layout; load_state_dict checks whether
    the contents fit the optimizer."""
    def unreadable(reason):
        return ValueError(f"not a fastopt checkpoint: {path}: {reason}")

    flat = dict(flat)
    header = {}
    for key, kinds, what in (("optimizer", "U", "a name"), ("version", "iu", "an integer"),
                             ("n_groups", "iu", "an integer")):
        if key not in flat:
            raise unreadable(f"it has no {key!r} entry")
        value = flat.pop(key)
        if value.shape != () or value.dtype.kind not in kinds:
            raise unreadable(f"its {key!r} entry is not {what}")
        header[key] = value.item()
    if header["version"] != STATE_DICT_VERSION:
        raise ValueError(f"{path}: fastopt checkpoint version {header['version']}; this fastopt "
                         f"reads version {STATE_DICT_VERSION}")
    options = {}
    for name in storage.DEFAULTS:
        if f"storage_{name}" in flat:
            value = flat.pop(f"storage_{name}")
            if value.shape != ():
                raise unreadable(f"its storage_{name} entry is not a single value")
            value = value.item()
            options[name] = None if name == "state_dtype" and value == "" else value
    n_groups = header["n_groups"]
    if not 0 <= n_groups <= len(flat):  # each group has at least its params entry
        raise unreadable(f"n_groups is {n_groups}, with {len(flat)} other entries")
    groups, state, nones = [{} for _ in range(n_groups)], {}, []
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] not in ("param_groups", "state") \
                or not _INDEX.fullmatch(parts[1]) or not parts[2]:
            raise unreadable(f"unexpected entry {key!r}")
        index, field = int(parts[1]), parts[2]
        if parts[0] == "state":
            if field.endswith(".bfloat16"):
                if value.dtype != np.uint16:
                    raise unreadable(f"{key!r} is not bfloat16 bits (uint16)")
                field, value = field[:-len(".bfloat16")], value.view(storage.bfloat16())
            state.setdefault(index, {})[field] = value
        elif index >= n_groups:
            raise unreadable(f"entry {key!r}, but n_groups is {n_groups}")
        elif field == "params" and (value.ndim != 1 or value.dtype.kind not in "iu"):
            raise unreadable(f"{key!r} is not a list of parameter indices")
        elif value.ndim > 1:
            raise unreadable(f"{key!r} is not a number or a tuple of numbers")
        elif field.endswith(".none"):
            if value.dtype != np.bool_:
                raise unreadable(f"{key!r} is not a mask of Nones")
            nones.append((index, field[:-len(".none")], value))
        else:
            groups[index][field] = _from_array(field, value)
    for index, field, mask in nones:
        values = groups[index].get(field)
        if not isinstance(values, tuple) or len(values) != len(mask):
            raise unreadable(f"param group {index}'s {field!r} does not fit its mask of Nones")
        groups[index][field] = tuple(None if none else x for x, none in zip(values, mask))
    for i, g in enumerate(groups):
        if "params" not in g:
            raise unreadable(f"param group {i} has no 'params' entry")
    d = {"optimizer": header["optimizer"], "version": header["version"],
         "param_groups": groups, "state": state}
    if options:
        d["storage"] = options
    return d


def _from_array(name, value):
    if name == "params":
        return value.tolist()
    if value.shape == ():
        return value.item()
    return tuple(value.tolist())


# ---- reading an .npz archive safely ------------------------------------------------------

class _Unreadable(Exception):
    """Why a file is not a readable checkpoint (load turns it into a ValueError)."""


def _read_arrays(f, path):
    """Every entry of the .npz archive in the binary file `f`, by name without ".npy"."""
    try:
        return _read_npz(f)
    except _Unreadable as e:
        reason = str(e)
    except MemoryError:
        raise
    except Exception as e:  # zipfile raises many kinds of error for damaged bytes
        reason = f"damaged archive ({type(e).__name__}: {e})"
    raise ValueError(f"not a fastopt checkpoint: {path}: {reason}")


def _read_npz(f):
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(4)
    if not head:
        raise _Unreadable("the file is empty")
    if head == b"\x93NUM":
        raise _Unreadable("it is a single .npy array, not an .npz archive")
    if not (b"PK\x03\x04".startswith(head) or b"PK\x05\x06".startswith(head)):
        raise _Unreadable("it is not an .npz (zip) archive")
    announced = _announced_entries(f, size)
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        if len(infos) != announced:
            raise _Unreadable(f"damaged archive: its directory lists {len(infos)} entries, its "
                              f"end record {announced}")
        arrays = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise _Unreadable(f"entry {info.filename!r} is not a .npy array")
            key = info.filename[:-len(".npy")]
            if key in arrays:
                raise _Unreadable(f"entry {info.filename!r} appears twice")
            arrays[key] = _read_entry(z, info)
    return arrays


# the zip end records (APPNOTE.TXT 4.3.14-4.3.16)
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


def _announced_entries(f, size):
    """The number of entries the archive's end record announces.  zipfile does not compare it
    with the entries it reads, and one damaged length in the directory can hide entries."""
    tail_size = min(size, _END.size + 0xFFFF)  # the record, then a comment of < 64 KiB
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        raise _Unreadable("truncated or damaged: the zip end record is missing")
    count = _END.unpack_from(tail, at)[4]
    locator_at = at - _END64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == b"PK\x06\x07":
        # zip64: the full count is in the record just before the locator (where zipfile reads it)
        record_at = size - tail_size + locator_at - _END64.size
        if record_at < 0:
            raise _Unreadable("damaged archive: its zip64 end record is missing")
        f.seek(record_at)
        record = f.read(_END64.size)
        if len(record) != _END64.size or record[:4] != b"PK\x06\x06":
            raise _Unreadable("damaged archive: its zip64 end record is missing")
        count = _END64.unpack(record)[7]
    return count


_PIECE = 1 << 22


def _read_entry(z, info):
    """One .npy entry, its header checked against the entry's size before anything is
    allocated (a damaged shape could otherwise ask for any amount of memory)."""
    name = info.filename
    try:
        with z.open(info) as entry:
            version = np.lib.format.read_magic(entry)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(entry)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(entry)
            else:
                raise _Unreadable(f".npy format version {version} is not supported")
            if dtype.hasobject:
                raise _Unreadable("it holds Python objects (pickled data), which fastopt never "
                                  "loads")
            announced, held = math.prod(shape) * dtype.itemsize, info.file_size - entry.tell()
            if announced != held:
                raise _Unreadable(f"its header announces {announced} bytes of data, it holds "
                                  f"{held}")
            array = np.empty(math.prod(shape), dtype)
            into, done = array.view(np.uint8), 0
            while done < announced:  # in pieces: one big read() copies the whole entry twice
                piece = entry.read(min(_PIECE, announced - done))  # the last checks the CRC
                if not piece:
                    raise _Unreadable(f"it ends after {done} of {announced} bytes of data")
                into[done:done + len(piece)] = np.frombuffer(piece, np.uint8)
                done += len(piece)
            return array.reshape(shape, order="F" if fortran_order else "C")
    except _Unreadable as e:
        reason = str(e)
    except MemoryError:
        raise
    except Exception as e:  # zipfile's and numpy's readers raise many kinds of error
        reason = f"{type(e).__name__}: {e}"
    raise _Unreadable(f"entry {name!r}: {reason}")


# ---- writing a file atomically -----------------------------------------------------------

def _write_atomically(path, write):
    """write(f) into a new file beside `path`, flushed to disk, then renamed onto `path`.  On
    any error (or interrupt) the temporary file is removed and `path` is untouched."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        # a read-only checkpoint stays protected, as it was when save() wrote in place
        raise PermissionError(errno.EACCES, "the checkpoint is read-only", path)
    fd, temp = _create_temporary(folder, name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _create_temporary(folder, name):
    """A new file ".<name>.<random>.tmp" in `folder`.  Not tempfile.mkstemp: its files are
    private (0600), and the checkpoint must keep the permissions a plain open() would give it:
    the umask's for a new file, the old file's when one is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
        except OSError:
            mode = None  # no old file: the umask applied
        if mode is not None and hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, mode)
            except OSError:
                pass
        return fd, temp
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}")


def _fsync_folder(folder):
    """Make the rename durable (POSIX; other systems cannot open a folder, and need not)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
