"""Build of fastopt's C extension; the project's metadata lives in pyproject.toml."""
import glob
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# -ffp-contract=off: no a*b+c fused into FMA, so every instruction set rounds alike (README, "Numerics").
# -fno-math-errno lets sqrt vectorize; it changes no result.  Never -ffast-math: NaNs must propagate.
# No -march=native: the baseline build runs on any x86-64; csrc/loops_avx2.c and loops_avx512.c
# select their targets themselves and csrc/kernels.c picks one at run time.
C_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-Wall"]

extension = Extension(
    "fastopt._kernels",
    # every .c file in csrc/ is part of the library (fastopt.get_sources() lists the same)
    sources=["fastopt/_kernels.pyx", *sorted(glob.glob("csrc/*.c"))],
    include_dirs=["csrc", numpy.get_include()],
    depends=["csrc/fastopt.h", "csrc/internal.h", "csrc/torch_access.h", "csrc/loops.inc", "csrc/step_loops.inc",
             *[os.path.join("csrc", "rules", f) for f in os.listdir(os.path.join(HERE, "csrc", "rules"))]],
    extra_compile_args=C_FLAGS + ["-pthread"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                   ("FO_BUILD_FLAGS", '"' + " ".join(C_FLAGS) + '"')],
)


class build_ext_on_every_core(build_ext):
    """Compile the extension's sources side by side, one compiler per core (a fresh build
    takes ~70 s on one core: most of CI's set-up)."""

    def build_extension(self, ext):
        compile_sources = self.compiler.compile

        def compile_each(sources, *args, **kwargs):
            # the objects' folders first: compilers started side by side would race to make them
            for obj in self.compiler.object_filenames(sources, output_dir=kwargs.get("output_dir", "")):
                os.makedirs(os.path.dirname(obj) or ".", exist_ok=True)
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                objects = pool.map(lambda source: compile_sources([source], *args, **kwargs), sources)
                return [obj for part in objects for obj in part]

        self.compiler.compile = compile_each
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


class build_py_with_csrc(build_py):
    """Ship the C header and sources inside the package (fastopt/csrc), where
    fastopt.get_include() and fastopt.get_sources() find them for C programs."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastopt", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target)


setup(ext_modules=cythonize([extension], language_level=3),
      cmdclass={"build_py": build_py_with_csrc, "build_ext": build_ext_on_every_core})
