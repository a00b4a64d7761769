"""The Numba CPU backend: the fallback when the compiled kernels cannot load.

Same engine, same results as the compiled backend, bit for bit: the per-element
math is ``_numba_math`` (a transcription of ``kernels/rules.pxi``), float32 buffers
are computed in float32, and nothing is compiled with fastmath.

A call runs over segments, as ``kernels/engine.pxi`` does: a table of addresses (one
row per segment: param, grad, state buffers) and lengths. Compiled code turns each
row into arrays (``numba.carray`` over the address), and the parallel driver cuts
the concatenated element range into one part per thread at multiples of 16
elements within a segment, exactly as the compiled engine. Below ``PARALLEL_MIN``
elements or with one thread, a serial loop. Loops are compiled lazily per kernel,
dtype and set of present buffers (a constant of the loop, so an absent buffer is
never touched), with ``cache=True`` so a second process loads them from disk.

The checks are Python's, before the compiled call: types, lengths, and overlap (no
written buffer may share memory with another buffer of the call).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, register_jitable

from fastopt.backends import _numba_math as M
from fastopt.backends import _segments as S
from fastopt.backends._host import as_array, copy_from_host, full, to_host  # noqa: F401
from fastopt.backends._numba_lbfgs import (lbfgs_blocks, lbfgs_copy,  # noqa: F401
                                           lbfgs_curvature, lbfgs_direction, lbfgs_move)
from fastopt.rules import KERNELS

NAME = "numba"

# Below this many elements a call runs on the calling thread (as engine.pxi).
PARALLEL_MIN = 32768
ALIGN = 16

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def max_threads():
    return numba.config.NUMBA_NUM_THREADS


@intrinsic
def _address(typingctx, addr):
    """An integer address as a void pointer, for numba.carray."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(addr), codegen


# --------------------------------------------------------------------------
# The loops: one set per (kernel, dtype, present buffers).
# --------------------------------------------------------------------------

@register_jitable
def _find(starts, nseg, x):
    lo, hi = 0, nseg - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if starts[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    return lo


@register_jitable
def _cut(starts, nseg, x, align):
    total = starts[nseg]
    if x >= total:
        return total
    s = _find(starts, nseg, x)
    local = x - starts[s]
    n = starts[s + 1] - starts[s]
    local = (local + align - 1) // align * align
    return starts[s] + min(local, n)


def _loops(coefs, element, dtype, h0, h1, h2):
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)
    dt = np.dtype(dtype).type

    @register_jitable
    def chunk(P, s, n, k, lo, hi):
        p = numba.carray(_address(P[s, 0]), n, dt)
        g = numba.carray(_address(P[s, 1]), n, dt)
        # an absent buffer's stand-in is p; h0..h2 are constants, so it is never used
        s0 = numba.carray(_address(P[s, 2 if h0 else 0]), n, dt)
        s1 = numba.carray(_address(P[s, 3 if h1 else 0]), n, dt)
        s2 = numba.carray(_address(P[s, 4 if h2 else 0]), n, dt)
        for i in range(np.uint64(lo), np.uint64(hi)):
            pi = p[i]
            a0 = s0[i] if h0 else pi
            a1 = s1[i] if h1 else pi
            a2 = s2[i] if h2 else pi
            pi, a0, a1, a2 = element(pi, g[i], a0, a1, a2, k, h0, h1, h2)
            p[i] = pi
            if h0:
                s0[i] = a0
            if h1:
                s1[i] = a1
            if h2:
                s2[i] = a2

    @register_jitable
    def part(P, starts, nseg, k, lo, hi):
        if lo >= hi:
            return
        s = _find(starts, nseg, lo)
        while lo < hi and s < nseg:
            end = min(starts[s + 1], hi)
            if end > lo:
                chunk(P, s, starts[s + 1] - starts[s], k, lo - starts[s], end - starts[s])
                lo = end
            s += 1

    @njit(cache=True, nogil=True, error_model="numpy")
    def serial(P, starts, c):
        digest  # noqa: B018 (kept in the closure on purpose)
        k = coefs(c, dt)
        nseg = P.shape[0]
        for s in range(nseg):
            n = starts[s + 1] - starts[s]
            if n > 0:
                chunk(P, s, n, k, 0, n)

    @njit(cache=True, nogil=True, parallel=True, error_model="numpy")
    def parallel(P, starts, c, nthreads):
        digest  # noqa: B018 (kept in the closure on purpose)
        k = coefs(c, dt)
        nseg = P.shape[0]
        total = starts[nseg]
        per = ((total + nthreads - 1) // nthreads + ALIGN - 1) // ALIGN * ALIGN
        nparts = (total + per - 1) // per
        for j in prange(nparts):
            part(P, starts, nseg, k, _cut(starts, nseg, j * per, ALIGN),
                 _cut(starts, nseg, (j + 1) * per, ALIGN))

    return serial, parallel


_LOOPS: dict = {}


def _loops_for(kernel, dtype, present):
    key = (kernel, dtype, present)
    loops = _LOOPS.get(key)
    if loops is None:
        coefs, element, _, _ = M.RULES[kernel]
        loops = _LOOPS[key] = _loops(coefs, element, dtype, *present)
    return loops


def _execute(kernel, dtype, present, P, starts, args, nthreads):
    serial, parallel = _loops_for(kernel, dtype, present)
    c = M.plan_of(kernel, args)
    nthreads = int(nthreads)
    if nthreads <= 1 or starts[-1] < PARALLEL_MIN:
        serial(P, starts, c)
        return
    nthreads = min(nthreads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != nthreads:
        numba.set_num_threads(nthreads)
    parallel(P, starts, c, nthreads)


# --------------------------------------------------------------------------
# Bound: checks in Python (fastopt/backends/_segments.py), then one compiled call.
# --------------------------------------------------------------------------

def _label(names, slot, seg, single, labels):
    if single:
        return names[slot]
    return f"{names[slot]}[{seg if labels is None else labels[seg]}]"


class Bound:
    """Arrays of one dtype and their state, bound once (as the compiled Bound):
    ``step(grads, args, nthreads)``, or ``prepare(grads)`` then ``run(args,
    nthreads)``. ``grads`` is one array (``single``) or one per param."""

    __slots__ = ("kernel", "names", "dtype", "present", "P", "starts", "sizes", "single",
                 "labels", "written", "arrays", "ready")

    def __init__(self, kernel, params, buffers, single=False, labels=None):
        _, _, rule, names = M.RULES[kernel]
        self.kernel, self.names, self.single, self.labels = kernel, names, single, labels
        lab = lambda slot, s: _label(names, slot, s, single, labels)  # noqa: E731
        params = list(params)
        first = params[0] if params else None
        if not isinstance(first, np.ndarray) or first.dtype not in _DTYPES:
            raise TypeError(f"{lab(0, 0)} must be a float32 or float64 NumPy array, got "
                            f"{type(first).__name__}")
        dt = self.dtype = first.dtype
        P = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        sizes, ranges, arrays = [], [], []
        for s, slot, a in S.slots(params, buffers, len(names) - 2):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{lab(slot, s)} must be a NumPy array, got "
                                f"{type(a).__name__}")
            if a.dtype != dt:
                raise TypeError(f"{lab(slot, s)} has dtype {a.dtype}, {lab(0, 0)} has "
                                f"dtype {dt}; they must match")
            if not a.flags.c_contiguous:
                raise ValueError(f"{lab(slot, s)} must be C-contiguous")
            if not a.flags.writeable:
                raise ValueError(f"{lab(slot, s)} is read-only; fastopt updates it in place")
            if slot == 0:
                sizes.append(a.size)
            elif a.size != sizes[s]:
                raise ValueError(f"{lab(slot, s)} has {a.size} elements, {lab(0, s)} "
                                 f"has {sizes[s]}")
            addr = a.__array_interface__["data"][0]
            P[s, slot] = addr
            ranges.append((addr, s * S.NSLOT + slot, addr + a.size * dt.itemsize,
                           lab(slot, s)))
            arrays.append(a)
        self.present = S.present_slots(P)
        self.written = S.Written(ranges)
        self.P, self.sizes, self.arrays = P, sizes, arrays
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.ready = False

    def _take(self, g, s):
        label = _label(self.names, 1, s, self.single, self.labels)
        if not isinstance(g, np.ndarray):
            raise TypeError(f"{label} must be a NumPy array, got {type(g).__name__}")
        if g.dtype != self.dtype:
            raise TypeError(f"{label} has dtype {g.dtype}, "
                            f"{_label(self.names, 0, s, self.single, self.labels)} has dtype "
                            f"{self.dtype}")
        if not g.flags.c_contiguous:
            raise ValueError(f"{label} must be C-contiguous, got strides {g.strides}")
        if g.size != self.sizes[s]:
            raise ValueError(f"{label} has {g.size} elements, "
                             f"{_label(self.names, 0, s, self.single, self.labels)} has "
                             f"{self.sizes[s]}")
        addr = g.__array_interface__["data"][0]
        self.written.check_read(addr, addr + g.size * self.dtype.itemsize, label)
        self.P[s, 1] = addr

    def prepare(self, grads):
        self.ready = False
        if self.single:
            self._take(grads, 0)
        else:
            S.check_grad_list(grads, len(self.sizes))
            for s, g in enumerate(grads):
                self._take(g, s)
        self.ready = True

    def run(self, args, nthreads):
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        self.ready = False
        _execute(self.kernel, self.dtype, self.present, self.P, self.starts, args, nthreads)

    def step(self, grads, args, nthreads):
        self.prepare(grads)
        self.run(args, nthreads)


def bind(kernel, param, buffers):
    return Bound(kernel, [param], [tuple(buffers)], True)


def bind_many(kernel, params, buffers, labels=None):
    return Bound(kernel, params, buffers, False, labels)


def run_segments(kernel, dtype, ptrs, lengths, args, nthreads, check=True):
    """The compiled backend's ``run_segments``: addresses the caller holds alive."""
    names = M.RULES[kernel][3]
    dtype = S.element_type(dtype, names, _DTYPES)
    table, starts, present = S.table_of(ptrs, lengths, names, dtype.itemsize, check)
    if starts[-1] > 0:
        _execute(kernel, dtype, present, table, starts, tuple(args), nthreads)


def _call(kernel, nbuf, param, grad, *rest):
    """``kernel(param, grad, *buffers, *plan_args, nthreads)``: one step."""
    buffers, args, nthreads = rest[:nbuf], rest[nbuf:-1], rest[-1]
    bind(kernel, param, buffers).step(grad, tuple(args), nthreads)


def _entry(kernel):
    nbuf = len(M.RULES[kernel][3]) - 2
    return lambda param, grad, *rest: _call(kernel, nbuf, param, grad, *rest)


# one entry per registry kernel: sgd, adam, ... (fastopt.rules.KERNELS)
globals().update({k: _entry(k) for k in KERNELS})
