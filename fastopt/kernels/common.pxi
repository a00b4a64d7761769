# What every kernel file of the compiled backend shares: the runtime (OpenMP,
# cpuid, the FPU's flush-to-zero switch), the parallel threshold, the C imports.
# Included first by _baseline.pyx and _avx2.pyx, which are the same source compiled
# for two instruction sets; fastopt.backends.compiled picks one at import time.
#
# The files, in include order:
#   common.pxi     this
#   _registry.pxi  generated from fastopt/rules.py: kernel ids, plan structs, dispatch
#   rules.pxi      the per-element math, one chunk function per kernel
#   engine.pxi     segments: checks, the balanced parallel run, Bound, run_segments
#   roof.pxi       the memory roof the benchmark measures
#   lbfgs.pxi      L-BFGS's vector passes

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, fabs, fabsf
from libc.stdint cimport uintptr_t

cdef extern from "fastopt_runtime.h" nogil:
    int FASTOPT_HAVE_OPENMP
    const char* FASTOPT_ISA
    int fastopt_max_threads()
    int fastopt_cpu_has_avx2_fma()
    unsigned int fastopt_fpu_enter(int flush)
    void fastopt_fpu_leave(int flush, unsigned int saved)

# Below this many elements a call runs on the calling thread: starting a
# parallel region costs more than the work.
DEF PARALLEL_MIN = 32768

HAVE_OPENMP = bool(FASTOPT_HAVE_OPENMP)
ISA = FASTOPT_ISA.decode()


# Subnormal inputs and results flush to zero inside the kernels (FTZ|DAZ on each
# thread, restored afterwards) unless switched off: the IEEE result then differs
# only where a value is below the normal range (< 1.2e-38 in float32).
cdef int _flush_denormals = 1


def set_flush_denormals(bint on):
    global _flush_denormals
    _flush_denormals = on


def get_flush_denormals():
    return bool(_flush_denormals)


def cpu_has_avx2_fma():
    return bool(fastopt_cpu_has_avx2_fma())


def max_threads():
    return fastopt_max_threads()
