"""Running an example under torchrun (2 ranks, gloo) for the multi-process tests, robustly.

gloo on these VMs can hang or fail at teardown (see examples/ddp_train.py); a run that hangs,
fails only in gloo, or aborts after writing its results is killed with every process below it
and tried again, up to ATTEMPTS runs, each retry reported as a warning and on stderr.  Anything
else (an exception in the training, wrong numbers) fails at once.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTEMPTS = 3
# what a worker's exception says when gloo's communication failed, not the training
COMMUNICATION_ERRORS = ("gloo", "DistBackendError", "DistNetworkError", "DistStoreError",
                        "Connection closed by peer", "Connection reset by peer")


def kill_tree(pid):
    """SIGKILL `pid`, its process group and every process below it.  torchrun starts each
    worker in a session of its own, out of reach of its group; they are found through their
    parents in /proc while torchrun still lives."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    below, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            below.append(child)
            todo.append(child)
    for target, kill in [*((p, os.kill) for p in below), (pid, os.killpg)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def worker_exceptions(log):
    """The last line of every exception the workers printed (torchrun prefixes `[rankN]: `)."""
    return re.findall(r"^\[rank\d+\]: ([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$", log, re.M)


def retry_reason(returncode, timed_out, log, finished, run_timeout):
    """Why a failed run may be tried again, or None for a real failure (or a success).

    Retried: a run that hung, one whose only errors are gloo's, and one that aborted after
    both ranks had written their results (at teardown).  Never retried: an exception in the
    training, wrong numbers (checked by the caller), a crash before the results were written."""
    if timed_out:
        return f"hung (no exit within {run_timeout} s)"
    if returncode == 0:
        return None
    errors = worker_exceptions(log)
    if errors:
        if all(any(word in e for word in COMMUNICATION_ERRORS) for e in errors):
            return f"failed in gloo: {errors[0]}"
        return None
    if finished:
        return f"aborted at teardown, after training (exit status {returncode})"
    return None


def run_example(tmp_path, script, args_for, load, run_timeout, finished=lambda folder: False):
    """examples/<script> under torchrun with args_for(folder), each attempt in a folder of its
    own; returns load(folder) after a clean exit.  finished(folder): whether the run wrote its
    results (a teardown abort after that is retried)."""
    import fastopt  # the workers import the fastopt under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}
    if "lo" in dict(socket.if_nameindex()).values():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback, whatever the hostname says
    for attempt in range(1, ATTEMPTS + 1):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        name = " ".join([f"examples/{script}", *args_for(folder)])
        # --standalone: torchrun binds a free port itself, no race with another process for it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "examples", script), *args_for(folder)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=folder, start_new_session=True)
        timed_out = False
        try:
            log, _ = proc.communicate(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:  # hung, or interrupted: leave no process behind
                kill_tree(proc.pid)
        if timed_out:
            log, _ = proc.communicate()
        if proc.returncode == 0 and not timed_out:
            return load(folder)
        reason = retry_reason(proc.returncode, timed_out, log, finished(folder), run_timeout)
        assert reason is not None, f"{name}: exit status {proc.returncode}:\n{log[-4000:]}"
        message = (f"{name}: attempt {attempt} of {ATTEMPTS} {reason}; "
                   f"its output ends:\n{log[-1500:]}")
        print(message, file=sys.stderr)
        warnings.warn(message, RuntimeWarning)
    pytest.fail(f"examples/{script}: all {ATTEMPTS} attempts failed; the last {reason}")
