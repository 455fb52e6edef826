"""Importing fastopt from a source tree that has no compiled extension fails at once, saying
what to do; `python -m pytest` from such a checkout tests the installed fastopt instead."""
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES

import fastopt

HERE = os.path.dirname(os.path.abspath(__file__))
# the children can import the fastopt under test (installed or built in place), but find the
# unbuilt copy first: python -c and python -m put the current folder before PYTHONPATH
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}


def unbuilt_copy(dest):
    """dest/fastopt: the Python sources of the fastopt under test, without its extension."""
    shutil.copytree(os.path.dirname(fastopt.__file__), dest / "fastopt",
                    ignore=shutil.ignore_patterns(*("*" + s for s in EXTENSION_SUFFIXES),
                                                  "__pycache__", "csrc"))
    assert not any(f.startswith("_kernels.") and f.endswith(tuple(EXTENSION_SUFFIXES))
                   for f in os.listdir(dest / "fastopt"))


def test_unbuilt_source_tree_says_what_to_do(tmp_path):
    unbuilt_copy(tmp_path)
    res = subprocess.run([sys.executable, "-c", "import fastopt"], cwd=tmp_path, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastopt's compiled extension (fastopt._kernels) is not "
                           f"in {tmp_path / 'fastopt'}"), res.stderr
    assert "pip install ." in last and "build_ext --inplace" in last and "`pytest`" in last
    assert "circular" not in res.stderr


def test_python_m_pytest_from_an_unbuilt_checkout_tests_the_installed_fastopt(tmp_path):
    unbuilt_copy(tmp_path)
    (tmp_path / "tests").mkdir()
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "tests")
    (tmp_path / "tests" / "test_which.py").write_text(
        "import fastopt\n\n\n"
        "def test_which():\n"
        f"    assert fastopt.__file__ == {fastopt.__file__!r}\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_which.py"], cwd=tmp_path, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
