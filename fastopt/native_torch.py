"""fastopt.torch's C++ tensor reads (csrc/torch_tensors.cpp), built for the torch in this process.

A planned fastopt.torch step checks, for every parameter, that its gradient, its storage and its
state buffers are where the plan points (address, size, dtype, layout).  Through torch's Python
getters and methods that costs ~1-2.5 us per parameter on a 2-vCPU VM; through the TensorImpl
fields, read in C++, ~0.3 us (README, "Costs around the kernel").  A C++ extension can only load
into the torch build whose headers it was compiled with, so it is not part of the wheel: it is
compiled here, once per torch build, with `$CXX` (else `c++`), and cached under
`$FASTOPT_CACHE_DIR` (default `$XDG_CACHE_HOME/fastopt`, else `~/.cache/fastopt`).

The compiler runs in a process of its own, at the lowest priority, which finishes the cached
file even if this one exits first; one build per cache entry at a time (a lock file), and a
failed build (no compiler, no headers) is remembered beside the entry and not retried unless
start(wait=True) asks for it.

`FASTOPT_TORCH_READS` chooses when:
  "background" (default): at the first planned step, without waiting (~20-25 s of one core,
    once); steps read through Python until it is loaded.
  "wait": at the first planned step, waiting for it.
  "python": never by itself (start(wait=...) still can); steps read through torch's Python API.
Either way the steps' results are the same: only the cost of the checks changes.
"""
import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
import time

from fastopt import _kernels, get_include

MODES = ("background", "wait", "python")
_NAME = "_fastopt_torch_tensors"
_STALE_LOCK_S = 60  # a lock without a builder's pid this old: the builder never started
# a build takes ~20-60 s: a lock this old is stale whoever holds its pid now (a builder killed
# with SIGKILL leaves its pid, which a later process in a new container may have), and a wait
# this long gives up (Python reads stay)
_MAX_BUILD_S = 300


def _mode():
    value = os.environ.get("FASTOPT_TORCH_READS", "background")
    if value not in MODES:
        raise ValueError(f"FASTOPT_TORCH_READS must be one of {', '.join(MODES)}, not {value!r}")
    return value


MODE = _mode()  # (read once, at import: a bad value fails there, not in a step)
_lock = threading.Lock()
_builder = None  # the thread waiting for a build, once started
_module = None  # the loaded build
_failure = None  # why the last build or load failed (a str), or None
_stopped = False  # stop() was called: implicit start()s leave the Python route in place


def cache_dir():
    folder = os.environ.get("FASTOPT_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "fastopt")
    return folder


def _command(source):
    """The compiler's command for source, without its output (-o)."""
    import torch
    torch_dir = os.path.dirname(torch.__file__)
    include, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    unresolved = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []  # (Python's)
    return [*shlex.split(os.environ.get("CXX") or "c++"), "-O2", "-std=c++17", "-fPIC", "-shared",
            "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I" + get_include(), "-I" + include,
            "-I" + os.path.join(include, "torch", "csrc", "api", "include"),
            "-I" + sysconfig.get_paths()["include"], source, *unresolved,
            "-L" + lib, "-ltorch_python", "-ltorch_cpu", "-lc10", "-Wl,-rpath," + lib]


def built_path():
    """Where the build for this torch, this Python and these sources is (or will be) cached."""
    import torch
    key = hashlib.sha256()
    for part in ("torch_tensors.cpp", "torch_access.h"):
        with open(os.path.join(get_include(), part), "rb") as f:
            key.update(f.read())
    key.update(repr((torch.__version__, torch.version.git_version, torch.__file__, sys.version,
                     _command(""))).encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(cache_dir(), f"{_NAME}-{key.hexdigest()[:20]}{suffix}")


# run in a process of its own: compile into a temporary file, write its SHA-256 beside the
# target, then rename it into place (a whole file or none); on failure leave the compiler's
# words in <target>.failed
_BUILD = """
import hashlib, json, os, subprocess, sys
command, target, lock = json.loads(sys.argv[1])
partial = target + f".{os.getpid()}.partial"
with open(lock, "w") as f:  # (who builds: a waiter that finds this pid gone builds again)
    f.write(str(os.getpid()))
try:
    os.nice(19)
    done = subprocess.run(command + ["-o", partial], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode == 0:
        os.chmod(partial, 0o755)
        with open(partial, "rb") as f, open(target + ".sha256", "w") as digest:
            digest.write(hashlib.sha256(f.read()).hexdigest())
        os.replace(partial, target)
    else:
        with open(target + ".failed", "w") as f:
            f.write(f"the C++ compiler failed ({done.returncode}): {done.stdout[-2000:]}")
except Exception as e:
    with open(target + ".failed", "w") as f:
        f.write(f"{type(e).__name__}: {e}")
finally:
    for path in (partial, lock):
        try:
            os.remove(path)
        except OSError:
            pass
"""


def _lock_is_stale(lock):
    """The build holding this lock is gone: its process ended, or it never started."""
    try:
        with open(lock) as f:
            pid = f.read().strip()
        age = time.time() - os.path.getmtime(lock)
        if not pid:
            return age > _STALE_LOCK_S
        if age > _MAX_BUILD_S:
            return True
        os.kill(int(pid), 0)
        return False
    except PermissionError:  # (another user's live process)
        return False
    except (OSError, ValueError):
        return os.path.exists(lock)


def _launch(target):
    """Start the build of target in a process of its own, unless a live one holds its lock."""
    lock = target + ".lock"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if _lock_is_stale(lock):
        try:
            os.remove(lock)
        except OSError:
            pass
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return  # (another process builds it: wait for the file)
    command = _command(os.path.join(get_include(), "torch_tensors.cpp"))
    try:
        builder = subprocess.Popen(
            [sys.executable, "-c", _BUILD, json.dumps([command, target, lock])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
    except OSError:
        os.remove(lock)
        raise
    with open(lock, "w") as f:  # (its builder also writes this, once it runs)
        f.write(str(builder.pid))


def _load(target):
    """Load the cached build (a damaged file is removed, to be built again): only a file whose
    SHA-256 is the one its build wrote beside it, since loading a truncated shared object can
    kill the process (SIGBUS) rather than raise."""
    global _module
    try:
        try:
            with open(target, "rb") as f, open(target + ".sha256") as digest:
                intact = hashlib.sha256(f.read()).hexdigest() == digest.read().strip()
        except OSError:
            intact = False
        if not intact:
            raise ImportError(f"{target} is not the file its build wrote (damaged, or from an "
                              "older fastopt): built again")
        spec = importlib.util.spec_from_file_location(_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        try:
            os.remove(target)
        except OSError:
            pass
        raise
    _module = module
    if not _stopped:
        _use(module)


def _use(module):
    import torch
    _kernels.set_torch_access(module.ACCESS, (torch.Tensor, torch.nn.Parameter))


def _build(target, retry):
    """Start building target, unless it is there, or a build of it failed and retry is False
    (raises then); in the caller's thread, so that the build outlives a process that exits
    right after (a daemon thread stops at exit)."""
    failed = target + ".failed"
    if os.path.exists(target):
        return
    if os.path.exists(failed) and not retry:
        with open(failed) as f:
            raise RuntimeError(f.read())
    if os.path.exists(failed):
        os.remove(failed)
    _launch(target)


def _wait_and_load(target):
    """Wait for target's build (starting it again if its builder died), then load it."""
    global _failure
    try:
        failed, lock = target + ".failed", target + ".lock"
        started = time.time()
        while not os.path.exists(target):
            if os.path.exists(failed):
                with open(failed) as f:
                    raise RuntimeError(f.read())
            if time.time() - started > _MAX_BUILD_S:
                raise RuntimeError(f"no build of {target} finished within {_MAX_BUILD_S} s "
                                   f"(its lock: {lock})")
            if (not os.path.exists(lock) or _lock_is_stale(lock)) and not os.path.exists(target):
                _launch(target)  # (its builder died)
            time.sleep(0.2)
        _load(target)
        _failure = None
    except Exception as e:  # (no compiler, no headers, a read-only cache: Python reads stay)
        _failure = f"{type(e).__name__}: {e}"


def start(wait=None):
    """Use the C++ reads: load the cached build at once, or build it (in the background, or
    waiting for it where wait is True or FASTOPT_TORCH_READS is "wait").  Called without wait
    (as each new plan does) it does nothing after stop() or under FASTOPT_TORCH_READS=python;
    with wait given it also retries a failed build.  Returns whether planned steps use them."""
    global _builder, _failure, _stopped
    if _kernels.torch_access_in_use():
        return True
    if wait is None and (_stopped or MODE == "python"):
        return False
    with _lock:
        _stopped = False
        if _module is not None:
            _use(_module)
            return True
        if _builder is None or (wait is not None and not _builder.is_alive()):
            try:
                target = built_path()
            except Exception as e:  # (torch without headers; an unreadable source)
                _failure = f"{type(e).__name__}: {e}"
                return False
            if os.path.exists(target):
                _wait_and_load(target)
                if _kernels.torch_access_in_use() or os.path.exists(target):
                    return _kernels.torch_access_in_use()
                # (a damaged file, removed by _load: built again)
            try:
                _build(target, wait is not None)
            except Exception as e:
                _failure = f"{type(e).__name__}: {e}"
                return False
            _builder = threading.Thread(target=_wait_and_load, args=(target,), daemon=True,
                                        name="fastopt-torch-reads")
            _builder.start()
        builder = _builder
    if wait or (wait is None and MODE == "wait"):
        builder.join()
    return _kernels.torch_access_in_use()


def stop():
    """Planned steps read through torch's Python API again, until start(wait=...) is called."""
    global _stopped
    with _lock:
        _stopped = True
        _kernels.set_torch_access(None)


def status():
    """'C++', 'building', or 'Python' with the reason."""
    if _kernels.torch_access_in_use():
        return "C++"
    if _builder is not None and _builder.is_alive():
        return "building"
    return "Python" + (f" ({_failure})" if _failure else "")
