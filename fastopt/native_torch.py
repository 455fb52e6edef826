"""fastopt.torch's C++ tensor reads (csrc/torch_tensors.cpp), built for the torch in this process.

A planned fastopt.torch step checks, for every parameter, that its gradient, its storage and its
state buffers are where the plan points (address, size, dtype, layout).  Through torch's Python
getters and methods that costs ~1-2.5 us per parameter on a 2-vCPU VM; through the TensorImpl
fields, read in C++, ~0.3 us (README, "Costs around the kernel").  A C++ extension can only load into the torch build whose headers it was compiled
with, so it is not part of the wheel: it is compiled here, once per torch build, with the C++
compiler that built the torch extensions (`$CXX`, else `c++`), and cached under
`$FASTOPT_CACHE_DIR` (default `$XDG_CACHE_HOME/fastopt`, else `~/.cache/fastopt`).

`FASTOPT_TORCH_READS` chooses when:
  "background" (default): at the first planned step, in a background thread (the compiler at the
    lowest priority, ~20 s of one core, once); steps read through Python until it is ready.
  "wait": at the first planned step, waiting for it.
  "python": never; planned steps read through torch's Python API.
Either way the steps' results are the same: only the cost of the checks changes.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

from fastopt import _kernels, get_include

MODES = ("background", "wait", "python")
_NAME = "_fastopt_torch_tensors"
_lock = threading.Lock()
_builder = None  # the thread building it, once started
_module = None  # the loaded build
_failure = None  # why the last build or load failed (a str), or None


def _mode():
    value = os.environ.get("FASTOPT_TORCH_READS", "background")
    if value not in MODES:
        raise ValueError(f"FASTOPT_TORCH_READS must be one of {', '.join(MODES)}, not {value!r}")
    return value


MODE = _mode()  # (read once, at import: a bad value fails there, not in a step)


def cache_dir():
    folder = os.environ.get("FASTOPT_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "fastopt")
    return folder


def _command(source, output):
    import torch
    torch_dir = os.path.dirname(torch.__file__)
    include, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [os.environ.get("CXX") or "c++", "-O2", "-std=c++17", "-fPIC", "-shared", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I" + get_include(), "-I" + include,
            "-I" + os.path.join(include, "torch", "csrc", "api", "include"),
            "-I" + sysconfig.get_paths()["include"], source, "-o", output,
            "-L" + lib, "-ltorch_python", "-ltorch_cpu", "-lc10", "-Wl,-rpath," + lib]


def built_path():
    """Where the build for this torch, this Python and these sources is (or will be) cached."""
    import torch
    source = os.path.join(get_include(), "torch_tensors.cpp")
    key = hashlib.sha256()
    for part in (source, os.path.join(get_include(), "torch_access.h")):
        with open(part, "rb") as f:
            key.update(f.read())
    key.update(repr((torch.__version__, torch.version.git_version, torch.__file__, sys.version,
                     _command("", ""))).encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(cache_dir(), f"{_NAME}-{key.hexdigest()[:20]}{suffix}")


def _compile(target):
    """Compile into a temporary file beside target, then rename it there (atomic: processes
    building at once each leave a whole file)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", prefix=".building-", dir=os.path.dirname(target))
    os.close(fd)
    command = _command(os.path.join(get_include(), "torch_tensors.cpp"), partial)
    if shutil.which("nice"):  # the compiler must not slow the training it runs beside
        command = ["nice", "-n", "19"] + command
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the C++ compiler failed ({done.returncode}): {done.stdout[-2000:]}")
        os.chmod(partial, 0o755)  # (mkstemp's 0600: other users of a shared cache load it too)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _use(module):
    import torch
    _kernels.set_torch_access(module.ACCESS, (torch.Tensor, torch.nn.Parameter))


def _build_and_load(target):
    global _module, _failure
    try:
        if not os.path.exists(target):
            _compile(target)
        spec = importlib.util.spec_from_file_location(_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _use(module)
        _module, _failure = module, None
    except Exception as e:  # (no compiler, no headers, a read-only cache: Python reads stay)
        _failure = f"{type(e).__name__}: {e}"


def start(wait=None):
    """Use the C++ reads: load the cached build at once, or build it (in the background, or
    waiting for it where wait is True or FASTOPT_TORCH_READS is "wait").  A failed build is
    tried again only when waited for.  Returns whether planned steps use them now."""
    global _builder, _failure
    if _kernels.torch_access_in_use() or (MODE == "python" and wait is None):
        return _kernels.torch_access_in_use()
    with _lock:
        if _module is not None:
            _use(_module)
            return True
        if _builder is None or (wait and not _builder.is_alive()):
            try:
                target = built_path()
            except Exception as e:  # (torch without headers; an unreadable source)
                _failure = f"{type(e).__name__}: {e}"
                return False
            if os.path.exists(target):
                _build_and_load(target)
                return _kernels.torch_access_in_use()
            _builder = threading.Thread(target=_build_and_load, args=(target,), daemon=True,
                                        name="fastopt-torch-reads")
            _builder.start()
        builder = _builder
    if wait or (wait is None and MODE == "wait"):
        builder.join()
    return _kernels.torch_access_in_use()


def stop():
    """Planned steps read through torch's Python API again (start() switches back)."""
    _kernels.set_torch_access(None)


def status():
    """'C++', 'building', or 'Python' with the reason."""
    if _kernels.torch_access_in_use():
        return "C++"
    if _builder is not None and _builder.is_alive():
        return "building"
    return "Python" + (f" ({_failure})" if _failure else "")
