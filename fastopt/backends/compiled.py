"""The compiled (Cython + OpenMP) backend.

Two builds of the same kernels exist on x86-64: ``_avx2`` (AVX2/FMA) and
``_baseline``. The baseline module asks the CPU which one it can run; the AVX2 build
is imported only when the answer is yes. ``FASTOPT_ISA=baseline`` forces the
baseline build (for testing that both agree). Both give bitwise identical results:
the kernels are compiled without FMA contraction.

Every call goes through the segment engine (``fastopt/kernels/engine.pxi``):
``bind_many`` binds a list of arrays, ``bind`` one array, ``run_segments`` takes raw
addresses, and the per-kernel entry points (``adam(param, grad, ...)``) bind one
array and step it once.
"""

import functools
import os

from fastopt.backends._host import as_array, copy_from_host, full, to_host  # noqa: F401
from fastopt.rules import KERNELS, kernel_rule
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

set_flush_denormals = _mod.set_flush_denormals
get_flush_denormals = _mod.get_flush_denormals
run_segments = _mod.run_segments


def max_threads():
    return _mod.max_threads()


def bind(kernel, param, buffers, *, grad_dtype=None, absmax=None, qmaps=None):
    """One array and its state: ``step(grad, args, nthreads, copies=None,
    sr_key=None)`` per call (the keywords: ``bind_many``'s)."""
    return _mod.Bound(kernel, [param], [tuple(buffers)], True, None, grad_dtype,
                      None if absmax is None else [tuple(absmax)], qmaps)


def bind_many(kernel, params, buffers, labels=None, *, grad_dtype=None, absmax=None,
              qmaps=None):
    """Arrays of one storage type and their state (one tuple per array), one call
    per step: ``step(grads, args, nthreads, copies=None, sr_key=None)`` with one
    gradient per array (``labels``: the arrays' indices in messages).
    ``grad_dtype``: the gradients' dtype when it is not the params'; ``absmax``:
    per array, the float32 block scales of its 8-bit (uint8) state buffers;
    ``qmaps``: per state slot, its 256-entry map; ``copies``: arrays the new params
    are written to (float32/float16/bfloat16); ``sr_key``: bf16 params round
    stochastically with this 32-bit key."""
    return _mod.Bound(kernel, params, [tuple(b) for b in buffers], False, labels,
                      grad_dtype, None if absmax is None else [tuple(a) for a in absmax],
                      qmaps)


def _call(kernel, nbuf, param, grad, *rest):
    """``kernel(param, grad, *buffers, *plan_args, nthreads)``: one step."""
    buffers, args, nthreads = rest[:nbuf], rest[nbuf:-1], rest[-1]
    bind(kernel, param, buffers).step(grad, tuple(args), nthreads)


# one entry per registry kernel: sgd, adam, ... (fastopt.rules.KERNELS)
globals().update({k: functools.partial(_call, k, len(kernel_rule(k).buffers))
                  for k in KERNELS})


# L-BFGS's passes (fastopt/kernels/lbfgs.pxi), used by fastopt.lbfgs
LBFGS_KERNELS = ("lbfgs_blocks", "lbfgs_copy", "lbfgs_curvature", "lbfgs_move",
                 "lbfgs_direction")
globals().update({name: getattr(_mod, name) for name in LBFGS_KERNELS})
