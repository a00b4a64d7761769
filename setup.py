"""Builds the compiled kernels: fastopt/kernels/rules.pxi, twice.

* ``fastopt.kernels._baseline``: the target's baseline instruction set, always.
* ``fastopt.kernels._avx2``: -mavx2 -mfma -mf16c, on x86-64 only; fastopt imports it
  only when the running CPU reports both (see csrc/fastopt_runtime.h).

OpenMP is probed with a test compile; without it the kernels build
single-threaded and the build says so. Without a working C compiler the
install still succeeds and fastopt runs on its Numba backend.

Environment switches:
  FASTOPT_CYTHON_DEBUG=1  bounds/wraparound checks on, -O0 -g (debugging)
  FASTOPT_NO_OPENMP=1     build without OpenMP even where it is available
  FASTOPT_NO_EXTENSIONS=1 skip the compiled kernels entirely
"""

import os
import platform
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("FASTOPT_CYTHON_DEBUG") == "1"


def _log(msg):
    print(f"fastopt build: {msg}", file=sys.stderr)


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _compiles(compiler, flags, source="int main(void){return 0;}\n", link=None):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                     extra_postargs=link if link is not None else flags)
        except Exception:
            return False
    return True


_OMP_PROBE = """#include <omp.h>
int main(void){ int n = 0;
#pragma omp parallel reduction(+:n)
n += 1;
return n > 0 ? 0 : 1; }
"""


class BuildExt(build_ext):
    """Adds the compiler flags once the compiler is known, and turns a missing
    compiler into a loud warning instead of a failed install."""

    def build_extensions(self):
        cc = self.compiler
        if cc.compiler_type == "msvc":
            base = ["/O2", "/fp:precise"]
            omp_c, omp_l = ["/openmp"], []
        else:
            base = (["-O0", "-g"] if DEBUG else ["-O3"]) + [
                # No FMA contraction: every element rounds identically in SIMD
                # lanes and scalar tails, whatever the thread split or ISA.
                "-ffp-contract=off",
                # sqrt without errno lets sqrt vectorise; NaN/inf semantics stay.
                "-fno-math-errno",
                "-fno-trapping-math",
                "-Wno-unreachable-code", "-Wno-unused-function",
            ]
            omp_c, omp_l = ["-fopenmp"], ["-fopenmp"]
        use_omp = os.environ.get("FASTOPT_NO_OPENMP") != "1" and _compiles(
            cc, omp_c, _OMP_PROBE, link=omp_l)
        if use_omp:
            _log("OpenMP found: kernels run multi-threaded")
        else:
            _log("WARNING: OpenMP not available; kernels will run SINGLE-THREADED")
        for ext in self.extensions:
            ext.extra_compile_args = base + (omp_c if use_omp else []) + ext.extra_compile_args
            ext.extra_link_args = (omp_l if use_omp else []) + ext.extra_link_args
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, broken toolchain, ...
            self._give_up(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(exc, ext.name)

    def _give_up(self, exc, name="the compiled kernels"):
        if os.environ.get("FASTOPT_REQUIRE_EXTENSIONS") == "1":
            raise
        _log(f"WARNING: could not build {name} ({type(exc).__name__}: {exc}); "
             "fastopt will run on its Numba backend (pip install numba)")


def _extensions():
    if os.environ.get("FASTOPT_NO_EXTENSIONS") == "1":
        _log("FASTOPT_NO_EXTENSIONS=1: skipping the compiled kernels")
        return []
    try:
        import numpy  # the engine reads arrays through NumPy's C API
        from Cython.Build import cythonize
    except ImportError as exc:
        _log(f"WARNING: {exc}; building without compiled kernels")
        return []
    common = dict(include_dirs=[os.path.join(HERE, "csrc"), numpy.get_include()],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    exts = [Extension("fastopt.kernels._baseline", ["fastopt/kernels/_baseline.pyx"],
                      **common)]
    if _is_x86():
        exts.append(Extension("fastopt.kernels._avx2", ["fastopt/kernels/_avx2.pyx"],
                              extra_compile_args=["-mavx2", "-mfma", "-mf16c"], **common))
    directives = dict(language_level=3, boundscheck=DEBUG, wraparound=DEBUG,
                      initializedcheck=DEBUG, cdivision=True, nonecheck=False,
                      embedsignature=True)
    return cythonize(exts, compiler_directives=directives,
                     include_path=[os.path.join(HERE, "fastopt", "kernels")])


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
