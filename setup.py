"""Build of fastopt's C extension; the project's metadata lives in pyproject.toml."""
import os
import shutil

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# -ffp-contract=off: no a*b+c fused into FMA, so every instruction set rounds alike (README, "Numerics").
# -fno-math-errno lets sqrt vectorize; it changes no result.  Never -ffast-math: NaNs must propagate.
# No -march=native: the baseline build runs on any x86-64; csrc/loops_avx2.c and loops_avx512.c
# select their targets themselves and csrc/kernels.c picks one at run time.
C_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-Wall"]

extension = Extension(
    "fastopt._kernels",
    sources=["fastopt/_kernels.pyx", "csrc/kernels.c", "csrc/threads.c", "csrc/loops_baseline.c",
             "csrc/loops_avx2.c", "csrc/loops_avx512.c"],
    include_dirs=["csrc", numpy.get_include()],
    depends=["csrc/fastopt.h", "csrc/internal.h", "csrc/loops.inc", "csrc/api.inc",
             *[os.path.join("csrc", "rules", f) for f in os.listdir(os.path.join(HERE, "csrc", "rules"))]],
    extra_compile_args=C_FLAGS + ["-pthread"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                   ("FO_BUILD_FLAGS", '"' + " ".join(C_FLAGS) + '"')],
)



class build_py_with_header(build_py):
    """Ship the public header inside the package, where fastopt.get_include() finds it."""

    def run(self):
        super().run()
        include = os.path.join(self.build_lib, "fastopt", "include")
        os.makedirs(include, exist_ok=True)
        shutil.copy(os.path.join(HERE, "csrc", "fastopt.h"), include)


setup(ext_modules=cythonize([extension], language_level=3),
      cmdclass={"build_py": build_py_with_header})
