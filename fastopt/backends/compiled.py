"""The compiled (Cython + OpenMP) backend.

Two builds of the same kernels exist on x86-64: ``_avx2`` (AVX2/FMA) and
``_baseline``. The baseline module asks the CPU which one it can run; the AVX2 build
is imported only when the answer is yes. ``FASTOPT_ISA=baseline`` forces the
baseline build (for testing that both agree). Both give bitwise identical results:
the kernels are compiled without FMA contraction.
"""

import os

from fastopt.backends._host import as_array, copy_from_host, full, to_host  # noqa: F401
from fastopt.rules import KERNELS
from fastopt.kernels import _baseline

_mod = _baseline
if os.environ.get("FASTOPT_ISA", "").lower() != "baseline" and _baseline.cpu_has_avx2_fma():
    try:
        from fastopt.kernels import _avx2 as _mod
    except ImportError:  # built without it (non-x86 or failed compile): baseline is fine
        pass

NAME = "cython"
ISA = _mod.ISA
HAVE_OPENMP = _mod.HAVE_OPENMP
module = _mod

# one kernel per registry name: sgd, adam, ... (fastopt.rules.KERNELS)
globals().update({name: getattr(_mod, name) for name in KERNELS})


# L-BFGS's passes (fastopt/kernels/lbfgs.pxi), used by fastopt.lbfgs
LBFGS_KERNELS = ("lbfgs_blocks", "lbfgs_copy", "lbfgs_curvature", "lbfgs_move",
                 "lbfgs_direction")
globals().update({name: getattr(_mod, name) for name in LBFGS_KERNELS})

set_flush_denormals = _mod.set_flush_denormals
get_flush_denormals = _mod.get_flush_denormals


def max_threads():
    return _mod.max_threads()


def bind(kernel, param, buffers):
    """The optimizer classes' fast path: param and state acquired once;
    ``step(grad, args, nthreads)`` per call."""
    return _mod.Bound(kernel, param, buffers)
