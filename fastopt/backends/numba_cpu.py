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
                 "labels", "written", "arrays", "ready", "twin", "deleg")

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
        self.twin = self.deleg = None

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

    def prepare(self, grads, copies=None, sr_key=None):
        self.ready = False
        self.deleg = None
        if copies is not None:
            # a copy out: the staged path over the same arrays (its twin, kept; no
            # bf16 param here, so sr_key changes nothing)
            if self.twin is None:
                self.twin = StagedBound(self.kernel, self._params(), self._buffers(),
                                        self.single, self.labels)
            self.twin.prepare(grads, copies, sr_key)
            self.deleg, self.ready = self.twin, True
            return
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
        if self.deleg is not None:
            deleg, self.deleg = self.deleg, None
            deleg.run(args, nthreads)
            return
        _execute(self.kernel, self.dtype, self.present, self.P, self.starts, args, nthreads)

    def step(self, grads, args, nthreads, copies=None, sr_key=None):
        self.prepare(grads, copies, sr_key)
        self.run(args, nthreads)

    def _params(self):
        per = 1 + sum(self.present)
        return [self.arrays[s * per] for s in range(len(self.sizes))]

    def _buffers(self):
        per, out = 1 + sum(self.present), []
        for s in range(len(self.sizes)):
            it = iter(self.arrays[s * per + 1:(s + 1) * per])
            out.append(tuple(next(it) if h else None for h in self.present))
        return out


def _narrow(a):
    """Whether ``a`` is stored in a type only the staged path runs (float16,
    bfloat16, uint8 codes); anything else that is not float32/float64 is worded by
    Bound's checks as before."""
    return isinstance(a, np.ndarray) and (a.dtype in (np.float16, np.uint8)
                                          or a.dtype.name == "bfloat16")


def bind(kernel, param, buffers, *, grad_dtype=None, absmax=None, qmaps=None):
    """One array and its state (the keywords: ``bind_many``'s, ``absmax`` one tuple
    per state buffer): ``step(grad, args, nthreads, copies=None, sr_key=None)``."""
    if (grad_dtype is None and absmax is None and qmaps is None
            and not any(_narrow(a) for a in (param, *buffers))):
        return Bound(kernel, [param], [tuple(buffers)], True)
    return StagedBound(kernel, [param], [tuple(buffers)], True, None, grad_dtype,
                       None if absmax is None else [tuple(absmax)], qmaps)


def bind_many(kernel, params, buffers, labels=None, *, grad_dtype=None, absmax=None,
              qmaps=None):
    """A list of arrays and their state, one call per step. float32 or float64
    throughout binds the plain loops; float16 / bfloat16 params or state, uint8 (q8)
    state (``absmax``: per param a tuple per state buffer of float32 block maxima or
    None; ``qmaps``: a 256-value float32 map per state buffer or per column) or
    ``grad_dtype`` other than the params' bind the staged path (StagedBound)."""
    params = list(params)
    plain = (grad_dtype is None and absmax is None and qmaps is None
             and not any(_narrow(a) for _, _, a in
                         S.slots(params, buffers, len(M.RULES[kernel][3]) - 2)))
    if plain:
        return Bound(kernel, params, buffers, False, labels)
    return StagedBound(kernel, params, buffers, False, labels, grad_dtype, absmax, qmaps)


def run_segments(kernel, dtype, ptrs, lengths, args, nthreads, check=True, *,
                 absmax=None, qmaps=None, copy=None, copy_dtype=None, sr_key=None):
    """The compiled backend's ``run_segments``: addresses the caller holds alive.

    ``dtype``: one type for every slot or one per slot (float32, float64, float16,
    bfloat16, q8: see _segments.type_code). Any signature but all-float32 or
    all-float64 without ``copy``/``sr_key`` runs the staged path (module section
    "Low-precision storage"): ``absmax`` (nseg, ncol) addresses of each q8 column's
    float32 block maxima, ``qmaps`` one 256-value float32 map per q8 column,
    ``copy`` (nseg,) addresses where the new param is also written as
    ``copy_dtype``, ``sr_key`` a uint32 key for stochastic rounding of a bf16 param."""
    names = M.RULES[kernel][3]
    codes = S.slot_codes(dtype, names)
    ct = None if copy is None else S.type_code(
        np.float32 if copy_dtype is None else copy_dtype, "copy_dtype")
    # as the compiled engine: sr_key rounds a bf16 param, is ignored otherwise, and is
    # taken mod 2**32
    sr = sr_key is not None and codes[0] == S.T_BF16
    present = S.table_of(ptrs, lengths, names, 1, False)[2]
    S.check_codes(codes, present, names, ct, sr, "copy_dtype")
    if S.is_uniform(codes, present, ct, sr):
        dt = _DTYPES[0] if codes[0] == S.T_F32 else _DTYPES[1]
        table, starts, present = S.table_of(ptrs, lengths, names, dt.itemsize, check)
        if starts[-1] > 0:
            _execute(kernel, dt, present, table, starts, tuple(args), nthreads)
        return
    table, starts, present, am, cp = S.staged_table(ptrs, lengths, names, codes, absmax,
                                                    copy, ct, check)
    Q, B = S.qmap_tables(qmaps, codes, present, names)
    if starts[-1] > 0:
        _execute_staged(kernel, S.effective_codes(codes, present),
                        -1 if ct is None else ct, sr, present, table, am, Q, B, cp, starts,
                        tuple(args), nthreads, int(sr_key or 0) & 0xFFFFFFFF)


def _call(kernel, nbuf, param, grad, *rest):
    """``kernel(param, grad, *buffers, *plan_args, nthreads)``: one step."""
    buffers, args, nthreads = rest[:nbuf], rest[nbuf:-1], rest[-1]
    bind(kernel, param, buffers).step(grad, tuple(args), nthreads)


def _entry(kernel):
    nbuf = len(M.RULES[kernel][3]) - 2
    return lambda param, grad, *rest: _call(kernel, nbuf, param, grad, *rest)


# one entry per registry kernel: sgd, adam, ... (fastopt.rules.KERNELS)
globals().update({k: _entry(k) for k in KERNELS})


# --------------------------------------------------------------------------
# Low-precision storage (the staged path): per segment, blocks of
# M.BLK elements from the segment's start; each element's slots are loaded to
# float32 (bf16, f16, q8 through its block's absmax), the rule's float32 element
# function runs unchanged, and the written slots are stored back to their types;
# a q8 column's new values wait in a block buffer until the block's absmax is
# known. Parallel cuts are multiples of M.BLK within a segment, so a thread owns
# whole blocks and any thread count gives the same bits.
# --------------------------------------------------------------------------

def _accessible(addr, i, value):
    return (isinstance(addr, types.Integer) and isinstance(i, types.Integer)
            and isinstance(value, (types.Float, types.Integer)))


def _element_pointer(context, builder, sig, args, ty):
    index = context.cast(builder, args[1], sig.args[1], types.int64)
    ptr = builder.inttoptr(args[0], context.get_value_type(ty).as_pointer())
    return builder.gep(ptr, [index])


@intrinsic
def _load(typingctx, addr, i, like):
    """Element i of the array of like's type at the integer address addr."""
    if not _accessible(addr, i, like):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_element_pointer(context, builder, sig, args, like))
    return like(addr, i, like), codegen


@intrinsic
def _store(typingctx, addr, i, value):
    if not _accessible(addr, i, value):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _element_pointer(context, builder, sig, args, value))
        return context.get_dummy_value()
    return types.void(addr, i, value), codegen


_F32 = np.float32(0)
_U16 = np.uint16(0)
_U8 = np.uint8(0)


@register_jitable
def _ld(t, addr, i, qmap, am):
    """Element i of a slot of type code t as float32 (q8: qmap[code] * am)."""
    if t == M.T_BF16:
        return M.bf16_to_f32(_load(addr, i, _U16))
    if t == M.T_F16:
        return M.f16_to_f32(_load(addr, i, _U16))
    if t == M.T_Q8:
        return M._mul(qmap[_load(addr, i, _U8)], am)
    return _load(addr, i, _F32)


@register_jitable
def _st(t, addr, i, x):
    """Store the float32 x as type code t (not q8: a block's codes are stored by
    _q8_store)."""
    if t == M.T_BF16:
        _store(addr, i, M.f32_to_bf16(x))
    elif t == M.T_F16:
        _store(addr, i, M.f32_to_f16(x))
    else:
        _store(addr, i, x)


@register_jitable
def _q8_store(addr, aaddr, blk, base, x, m, bounds):
    """The block's new values x[0..m) as q8 codes at addr[base..base+m) and its absmax
    at aaddr[blk]."""
    top = 0
    for t in range(m):
        top = max(top, M.abs_bits(x[t]))
    am = M.bits_f32(top)   # max |x| (the compiled engine's: a NaN's bits are above all)
    inv = M.q8_scale(am)
    for t in range(m):
        _store(addr, base + t, M.q8_code(M.q8_clamp(M._mul(x[t], inv)), bounds))
    _store(aaddr, blk, am)


def _staged_loops(coefs, element, h0, h1, h2):
    """The staged loops of one rule and set of present buffers. The slots' type
    codes ``tp`` (five), the copy's ``ct`` (-1: none) and ``sr`` are arguments, not
    constants: one compile serves every signature (a branch per element that always
    goes the same way)."""
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)
    BLK = M.BLK
    Q8 = M.T_Q8

    @register_jitable
    def block(P, A, Q, B, C, tp, ct, sr, ks, s, k, b0, b1, buf):
        t0, t1, t2, t3, t4 = tp[0], tp[1], tp[2], tp[3], tp[4]
        q0, q1, q2 = h0 and t2 == Q8, h1 and t3 == Q8, h2 and t4 == Q8
        blk = b0 // BLK
        m0 = _load(A[s, 2], blk, _F32) if q0 else _F32
        m1 = _load(A[s, 3], blk, _F32) if q1 else _F32
        m2 = _load(A[s, 4], blk, _F32) if q2 else _F32
        for i in range(b0, b1):
            pi = _ld(t0, P[s, 0], i, Q[0], _F32)
            gi = _ld(t1, P[s, 1], i, Q[1], _F32)
            a0 = _ld(t2, P[s, 2], i, Q[2], m0) if h0 else pi
            a1 = _ld(t3, P[s, 3], i, Q[3], m1) if h1 else pi
            a2 = _ld(t4, P[s, 4], i, Q[4], m2) if h2 else pi
            pi, a0, a1, a2 = element(pi, gi, a0, a1, a2, k, h0, h1, h2)
            # the param as stored (what a copy out is made of: the compiled engine's)
            if t0 == M.T_BF16:
                h = M.f32_to_bf16_sr(pi, M.sr_bits(ks, i)) if sr else M.f32_to_bf16(pi)
                _store(P[s, 0], i, h)
                cv = M.bf16_to_f32(h)
            elif t0 == M.T_F16:
                h = M.f32_to_f16(pi)
                _store(P[s, 0], i, h)
                cv = M.f16_to_f32(h)
            else:
                _store(P[s, 0], i, pi)
                cv = pi
            if ct >= 0:
                _st(ct, C[s], i, cv)
            if q0:
                buf[0, i - b0] = a0
            elif h0:
                _st(t2, P[s, 2], i, a0)
            if q1:
                buf[1, i - b0] = a1
            elif h1:
                _st(t3, P[s, 3], i, a1)
            if q2:
                buf[2, i - b0] = a2
            elif h2:
                _st(t4, P[s, 4], i, a2)
        if q0:
            _q8_store(P[s, 2], A[s, 2], blk, b0, buf[0], b1 - b0, B[2])
        if q1:
            _q8_store(P[s, 3], A[s, 3], blk, b0, buf[1], b1 - b0, B[3])
        if q2:
            _q8_store(P[s, 4], A[s, 4], blk, b0, buf[2], b1 - b0, B[4])

    @register_jitable
    def segment(P, A, Q, B, C, tp, ct, sr, key, s, k, lo, hi, buf):
        ks = M.sr_segment_key(key, s) if sr else 0
        for b0 in range(lo, hi, BLK):
            block(P, A, Q, B, C, tp, ct, sr, ks, s, k, b0, min(b0 + BLK, hi), buf)

    @register_jitable
    def part(P, A, Q, B, C, tp, ct, sr, key, starts, nseg, k, lo, hi, buf):
        if lo >= hi:
            return
        s = _find(starts, nseg, lo)
        while lo < hi and s < nseg:
            end = min(starts[s + 1], hi)
            if end > lo:
                segment(P, A, Q, B, C, tp, ct, sr, key, s, k, lo - starts[s],
                        end - starts[s], buf)
                lo = end
            s += 1

    @njit(cache=True, nogil=True, error_model="numpy")
    def serial(P, A, Q, B, C, tp, ct, sr, starts, c, key):
        digest  # noqa: B018 (kept in the closure on purpose)
        k = coefs(c, np.float32)
        nseg = P.shape[0]
        buf = np.empty((3, BLK), dtype=np.float32)
        for s in range(nseg):
            n = starts[s + 1] - starts[s]
            if n > 0:
                segment(P, A, Q, B, C, tp, ct, sr, key, s, k, 0, n, buf)

    @njit(cache=True, nogil=True, parallel=True, error_model="numpy")
    def parallel(P, A, Q, B, C, tp, ct, sr, starts, c, key, nthreads):
        digest  # noqa: B018 (kept in the closure on purpose)
        k = coefs(c, np.float32)
        nseg = P.shape[0]
        total = starts[nseg]
        per = ((total + nthreads - 1) // nthreads + BLK - 1) // BLK * BLK
        nparts = (total + per - 1) // per
        for j in prange(nparts):
            buf = np.empty((3, BLK), dtype=np.float32)
            part(P, A, Q, B, C, tp, ct, sr, key, starts, nseg, k,
                 _cut(starts, nseg, j * per, BLK), _cut(starts, nseg, (j + 1) * per, BLK),
                 buf)

    return serial, parallel


_STAGED: dict = {}


def _execute_staged(kernel, codes, ct, sr, present, P, A, Q, B, C, starts, args, nthreads,
                    key):
    """One staged call. ``codes``: the five slots' type codes (absent ones float32),
    ``ct``: the copy's code or -1, ``sr``: stochastic rounding of the bf16 param."""
    lkey = (kernel, present)
    loops = _STAGED.get(lkey)
    if loops is None:
        coefs, element, _, _ = M.RULES[kernel]
        loops = _STAGED[lkey] = _staged_loops(coefs, element, *present)
    serial, parallel = loops
    c = M.plan_of(kernel, args)
    key = int(key) & 0xFFFFFFFF
    tp = tuple(int(t) for t in codes)
    ct, sr = int(ct), bool(sr)
    nthreads = int(nthreads)
    if nthreads <= 1 or starts[-1] < PARALLEL_MIN:
        serial(P, A, Q, B, C, tp, ct, sr, starts, c, key)
        return
    nthreads = min(nthreads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != nthreads:
        numba.set_num_threads(nthreads)
    parallel(P, A, Q, B, C, tp, ct, sr, starts, c, key, nthreads)


class StagedBound:
    """Arrays and their state with per-column element types (float32, float16,
    bfloat16 params and state, q8 state; float64 only throughout), bound once:
    ``step(grads, args, nthreads, copies=None, sr_key=None)``. Every segment's
    column has the type of segment 0's; a q8 buffer needs its float32 block maxima
    (ceil(n / 256) of them) and its column's map. ``copies``: one array per param
    (one dtype: float32, float16 or bfloat16) that receives the new param;
    ``sr_key``: stochastic rounding of bf16 params with that uint32 key."""

    __slots__ = ("kernel", "names", "codes", "present", "P", "A", "Q", "B", "starts",
                 "sizes", "single", "labels", "ranges", "written", "arrays", "ready",
                 "copy", "copy_code", "uniform", "sr_key", "held")

    def __init__(self, kernel, params, buffers, single=False, labels=None, grad_dtype=None,
                 absmax=None, qmaps=None):
        _, _, rule, names = M.RULES[kernel]
        self.kernel, self.names, self.single, self.labels = kernel, names, single, labels
        lab = lambda slot, s: _label(names, slot, s, single, labels)  # noqa: E731
        params, buffers = list(params), [tuple(b) for b in buffers]
        nbuf = len(names) - 2
        codes = [None] * len(names)
        P = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        A = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        sizes, ranges, arrays = [], [], []
        for s, slot, a in S.slots(params, buffers, nbuf):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{lab(slot, s)} must be a NumPy array, got "
                                f"{type(a).__name__}")
            code = S.type_code(a.dtype, f"{lab(slot, s)}'s dtype")
            if codes[slot] is None:
                codes[slot] = code
            elif code != codes[slot]:
                raise TypeError(f"{lab(slot, s)} has dtype {S.TYPE_NAMES[code]}, "
                                f"{lab(slot, 0)} has dtype {S.TYPE_NAMES[codes[slot]]}; "
                                "one column has one type")
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
            ranges.append((addr, s * S.NSLOT + slot, addr + a.nbytes, lab(slot, s)))
            arrays.append(a)
            if code == S.T_Q8:
                am = None
                try:
                    am = absmax[s][slot - 2]
                except (TypeError, IndexError, KeyError):
                    pass
                if am is None:
                    raise ValueError(f"{lab(slot, s)} is q8 and has no absmax array")
                nblk = (a.size + S.BLK - 1) // S.BLK
                if (not isinstance(am, np.ndarray) or am.dtype != np.float32
                        or not am.flags.c_contiguous or not am.flags.writeable):
                    raise TypeError(f"the absmax of {lab(slot, s)} must be a writable "
                                    "C-contiguous float32 NumPy array")
                if am.size != nblk:
                    raise ValueError(f"the absmax of {lab(slot, s)} has {am.size} entries; "
                                     f"{a.size} elements make {nblk} blocks of {S.BLK}")
                aaddr = am.__array_interface__["data"][0]
                A[s, slot] = aaddr
                ranges.append((aaddr, s * S.NSLOT + slot, aaddr + am.nbytes,
                               f"absmax of {lab(slot, s)}"))
                arrays.append(am)
        self.present = S.present_slots(P)
        codes[1] = codes[0] if grad_dtype is None else S.type_code(grad_dtype, "grad_dtype")
        codes = tuple(T if T is not None else S.T_F32 for T in codes)
        S.check_codes(codes, self.present, names)
        self.codes = codes
        self.Q, self.B = S.qmap_tables(qmaps, codes, self.present, names)
        self.ranges = ranges
        self.written = S.Written(ranges)
        self.P, self.A, self.sizes, self.arrays = P, A, sizes, arrays
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.copy = np.zeros(len(params), dtype=np.uint64)
        self.copy_code = None
        self.uniform = S.is_uniform(codes, self.present)
        self.sr_key = self.held = None
        self.ready = False

    def _lab(self, slot, s):
        return _label(self.names, slot, s, self.single, self.labels)

    def prepare(self, grads, copies=None, sr_key=None):
        """Check the gradients and the copies (nothing is written); ``run`` steps."""
        self.ready = False
        grads = [grads] if self.single else grads
        if not self.single:
            S.check_grad_list(grads, len(self.sizes))
        written = self.written
        ct = None
        if copies is not None:
            copies = [copies] if self.single else copies
            if not isinstance(copies, (list, tuple)) or len(copies) != len(self.sizes):
                raise ValueError(f"copy_to must be a list of {len(self.sizes)} arrays (one "
                                 "per param)")
            extra = []
            for s, c in enumerate(copies):
                label = "copy_to" if self.single else (
                    f"copy_to[{s if self.labels is None else self.labels[s]}]")
                if not isinstance(c, np.ndarray):
                    raise TypeError(f"{label} must be a NumPy array, got "
                                    f"{type(c).__name__}")
                code = S.type_code(c.dtype, f"{label}'s dtype")
                if ct is None:
                    ct = code
                elif code != ct:
                    raise TypeError(f"{label} has dtype {S.TYPE_NAMES[code]}; every copy "
                                    f"must have the first one's {S.TYPE_NAMES[ct]}")
                if not c.flags.c_contiguous or not c.flags.writeable:
                    raise ValueError(f"{label} must be writable and C-contiguous")
                if c.size != self.sizes[s]:
                    raise ValueError(f"{label} has {c.size} elements, {self._lab(0, s)} "
                                     f"has {self.sizes[s]}")
                addr = c.__array_interface__["data"][0]
                extra.append((addr, s * S.NSLOT + S.NSLOT, addr + c.nbytes, label))
                self.copy[s] = addr
            S.check_codes(self.codes, self.present, self.names, ct)
            written = S.Written(self.ranges + extra)
        for s, g in enumerate(grads):
            label = self._lab(1, s)
            if not isinstance(g, np.ndarray):
                raise TypeError(f"{label} must be a NumPy array, got {type(g).__name__}")
            try:
                code = S.type_code(g.dtype, f"{label}'s dtype")
            except TypeError:
                code = None
            if code != self.codes[1]:
                raise TypeError(f"{label} has dtype {g.dtype}, the call expects "
                                f"{S.TYPE_NAMES[self.codes[1]]} gradients")
            if not g.flags.c_contiguous:
                raise ValueError(f"{label} must be C-contiguous, got strides {g.strides}")
            if g.size != self.sizes[s]:
                raise ValueError(f"{label} has {g.size} elements, {self._lab(0, s)} has "
                                 f"{self.sizes[s]}")
            addr = g.__array_interface__["data"][0]
            written.check_read(addr, addr + g.nbytes, label)
            self.P[s, 1] = addr
        self.copy_code = ct
        self.sr_key = sr_key
        self.held = (grads, copies)   # alive until run: the table holds their addresses
        self.ready = True

    def run(self, args, nthreads):
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        self.ready = False
        sr_key = self.sr_key
        sr = sr_key is not None and self.codes[0] == S.T_BF16
        ct = self.copy_code
        held, self.held = self.held, None  # noqa: F841 (alive through the call)
        if self.starts[-1] == 0:
            return
        if self.uniform and ct is None and not sr:
            dt = _DTYPES[0] if self.codes[0] == S.T_F32 else _DTYPES[1]
            _execute(self.kernel, dt, self.present, self.P, self.starts, args, nthreads)
            return
        _execute_staged(self.kernel, S.effective_codes(self.codes, self.present),
                        -1 if ct is None else ct, sr, self.present, self.P, self.A, self.Q,
                        self.B, self.copy, self.starts, tuple(args), nthreads,
                        int(sr_key or 0) & 0xFFFFFFFF)

    def step(self, grads, args, nthreads, copies=None, sr_key=None):
        self.prepare(grads, copies, sr_key)
        self.run(args, nthreads)
