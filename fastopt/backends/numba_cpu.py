"""The Numba CPU backend: the fallback when the compiled kernels cannot load.

Same kernels, same call (``kernel(param, grad, *buffers, *plan_args, nthreads)``),
same results as the compiled backend, bit for bit: the per-element math is
``_numba_math`` (a transcription of ``kernels/rules.pxi``), float32 buffers are
computed in float32, and nothing is compiled with fastmath.

Each kernel is a Python wrapper that checks the arrays' types and then makes one
call into compiled code, which checks lengths and overlap before it writes
anything and returns an error code the wrapper turns into the message the
compiled backend gives. Small buffers (< ``PARALLEL_MIN`` elements) or
``nthreads == 1`` take a serial loop; otherwise the buffer is split into one
contiguous chunk per thread, as rules.pxi does. Everything is compiled lazily,
per rule and dtype, with ``cache=True`` so a second process loads it from disk.
"""

import numba
import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from fastopt.backends import _numba_math as M
from fastopt.backends._numba_lbfgs import (lbfgs_blocks, lbfgs_copy,  # noqa: F401
                                           lbfgs_curvature, lbfgs_direction, lbfgs_move)
from fastopt.rules import KERNELS
from fastopt.backends._host import as_array, copy_from_host, full, to_host  # noqa: F401

NAME = "numba"

# Below this many elements a call runs on the calling thread (as rules.pxi).
PARALLEL_MIN = 32768

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def max_threads():
    return numba.config.NUMBA_NUM_THREADS


# --------------------------------------------------------------------------
# Checks done in compiled code, before anything is written: the lengths, then
# overlap between any two buffers (as rules.pxi's _launch). 0 means fine;
# otherwise a code that _raise() decodes. An absent buffer is None: Numba
# compiles one version per pattern of absent buffers and drops their code.
# --------------------------------------------------------------------------

@register_jitable
def _len(a):
    if a is None:
        return -1
    return a.shape[0]


@register_jitable
def _addr(a):
    # 0 (NULL) for an absent or empty buffer: it overlaps nothing
    if a is None:
        return np.uint64(0)
    if a.shape[0] == 0:
        return np.uint64(0)
    return np.uint64(a.ctypes.data)


@register_jitable
def _check(p, g, s0, s1, s2):
    n = p.shape[0]
    lens = (_len(g), _len(s0), _len(s1), _len(s2))
    for k in range(4):
        if lens[k] >= 0 and lens[k] != n:
            return 1 + k
    if n == 0:
        return 0
    nbytes = np.uint64(n * p.itemsize)
    ptrs = (_addr(p), _addr(g), _addr(s0), _addr(s1), _addr(s2))
    for k in range(5):
        for j in range(k + 1, 5):
            a, b = ptrs[k], ptrs[j]
            if a != 0 and b != 0 and a < b + nbytes and b < a + nbytes:
                return 10 + 5 * k + j
    return 0


# --------------------------------------------------------------------------
# The loops, generated once per rule from its _numba_math pair: a chunk
# [lo, hi) that calls the element function, a serial driver and a parallel one
# (one chunk per thread, aligned to 16 elements, as rules.pxi's _run).
# The chunk bounds are unsigned so that Numba emits no negative-index
# wraparound, which would stop LLVM from vectorising the loop; the `is None`
# tests are resolved at compile time.
# --------------------------------------------------------------------------

def _loops(coefs, element):
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)

    @register_jitable
    def chunk(p, g, s0, s1, s2, c, lo, hi):
        k = coefs(c, p.dtype.type)
        zero = p.dtype.type(0)  # stands for an absent buffer's element
        for i in range(lo, hi):
            a0 = zero if s0 is None else s0[i]
            a1 = zero if s1 is None else s1[i]
            a2 = zero if s2 is None else s2[i]
            pi, a0, a1, a2 = element(p[i], g[i], a0, a1, a2, k,
                                     s0 is not None, s1 is not None, s2 is not None)
            p[i] = pi
            if s0 is not None:
                s0[i] = a0
            if s1 is not None:
                s1[i] = a1
            if s2 is not None:
                s2[i] = a2

    @njit(cache=True, nogil=True, error_model="numpy")
    def serial(p, g, s0, s1, s2, c):
        digest  # noqa: B018 (kept in the closure on purpose)
        err = _check(p, g, s0, s1, s2)
        if err == 0:
            chunk(p, g, s0, s1, s2, c, np.uint64(0), np.uint64(p.shape[0]))
        return err

    @njit(cache=True, nogil=True, parallel=True, error_model="numpy")
    def parallel(p, g, s0, s1, s2, c, nthreads):
        digest  # noqa: B018 (kept in the closure on purpose)
        err = _check(p, g, s0, s1, s2)
        if err != 0:
            return err
        n = p.shape[0]
        size = ((n + nthreads - 1) // nthreads + 15) // 16 * 16
        nchunks = (n + size - 1) // size
        for j in prange(nchunks):
            lo = j * size
            hi = min(lo + size, n)
            chunk(p, g, s0, s1, s2, c, np.uint64(lo), np.uint64(hi))
        return 0

    return serial, parallel


_LOOPS = {kernel: _loops(coefs, element)
          for kernel, (coefs, element, _, _) in M.RULES.items()}


# --------------------------------------------------------------------------
# The Python side of a call: type checks, then one compiled call.
# --------------------------------------------------------------------------

def _array(name, rule, x, writable):
    if type(x) is not np.ndarray:
        if x is None:
            raise TypeError(f"{rule}: {name} must be an array, got None")
        try:
            x = as_array(x)
        except TypeError:
            raise TypeError(f"{rule}: {name} must be an array, got {type(x).__name__}") from None
    if x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(f"{rule}: {name} must be a C-contiguous 1-D array, "
                         f"got shape {x.shape} with strides {x.strides}")
    if writable and not x.flags.writeable:
        raise ValueError(f"{rule}: {name} is read-only")
    return x


def _raise(err, rule, names, arrays):
    if err < 10:
        k = err  # 1..4: grad, s0, s1, s2
        raise ValueError(f"{rule}: {names[k]} has length {arrays[k].shape[0]}, "
                         f"param has length {arrays[0].shape[0]}")
    k, j = divmod(err - 10, 5)
    raise ValueError(f"{rule}: {names[j]} shares memory with {names[k]}; "
                     "every buffer must be distinct")


def _run(kernel, param, grad, s0, s1, s2, c, nthreads):
    _, _, rule, names = M.RULES[kernel]
    p = _array("param", rule, param, True)
    dt = p.dtype
    if dt not in _DTYPES:
        raise TypeError(f"{rule}: param must be float32 or float64, got {dt}")
    g = _array("grad", rule, grad, False)
    if g.dtype != dt:
        raise TypeError(f"{rule}: grad has dtype {g.dtype}, param has dtype {dt}")
    bufs = [s0, s1, s2]
    for k, s in enumerate(bufs):
        if s is not None:
            s = bufs[k] = _array(names[2 + k], rule, s, True)
            if s.dtype != dt:
                raise TypeError(f"{rule}: {names[2 + k]} has dtype {s.dtype}, "
                                f"param has dtype {dt}")
    s0, s1, s2 = bufs
    serial, parallel = _LOOPS[kernel]
    nthreads = int(nthreads)
    if nthreads <= 1 or p.shape[0] < PARALLEL_MIN:
        err = serial(p, g, s0, s1, s2, c)
    else:
        nthreads = min(nthreads, numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != nthreads:
            numba.set_num_threads(nthreads)
        err = parallel(p, g, s0, s1, s2, c, nthreads)
    if err:
        _raise(err, rule, names, (p, g, s0, s1, s2))


# --------------------------------------------------------------------------
# Entry points, with rules.pxi's signatures.
# --------------------------------------------------------------------------

# one kernel per registry name: sgd, adam, ... (fastopt.rules.KERNELS)
_entry = M.entry_points(_run)
globals().update({name: _entry[name] for name in KERNELS})
