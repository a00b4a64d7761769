# The engine: one kernel call runs over N >= 1 segments.
#
# A segment is one parameter tensor's worth of work: the addresses of its param,
# grad and state buffers (slot order: param, grad, then Rule.buffers; NULL for a
# buffer the hyperparameters leave out, in every segment alike) and its length. A
# flat buffer is one segment; a model of 132 tensors is 132 segments, run as one
# parallel region: the concatenated element range is cut into one part per thread,
# each cut moved up to a multiple of `align` elements within its segment (16:
# whole vectors for every thread but at segment ends; a quantisation block size
# for block-wise state), and each thread walks the segments its part covers.
#
# The per-element math does not depend on where an element sits, and no FMA is
# contracted, so a call gives the same bits whatever the segmentation, the thread
# count or the instruction set: a list step equals each array stepped alone.
#
# Element types are per slot (Seg.ptr is untyped). A call whose slots are all
# float32, or all float64, runs the chunk straight over the buffers. Any other
# signature (bf16 or f16 params, state or gradients; 8-bit block-wise state; a
# parameter copy written out) runs STAGED: blocks of 256 elements, counted from each
# segment's start, are widened into float32 on the stack, the same float32 chunk
# runs over them, and the written slots are narrowed back (csrc/fastopt_lowp.h;
# docs/rules.md "Storage types"). Parts are then cut at multiples of 256, so a block
# (an 8-bit block's absmax) always belongs to one thread.
#
# Checks, before anything is written: every pointer's element count, type and
# layout (by the caller: Bound for NumPy arrays, fastopt.torch for tensors), and
# overlap: no buffer that is written (param, state) may share a byte with any other
# buffer of the call; gradients are only read and may share memory with each other.

cimport numpy as cnp
from libc.stdlib cimport malloc, free, qsort
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "fastopt_lowp.h" nogil:
    uint32_t fo_mix32(uint32_t x)
    void fo_prefetch(const void* p, Py_ssize_t nbytes, int write)
    void fo_load_bf16(const uint16_t* src, float* dst, Py_ssize_t n)
    void fo_store_bf16(const float* src, uint16_t* dst, Py_ssize_t n)
    void fo_store_bf16_sr(const float* src, uint16_t* dst, Py_ssize_t n, uint32_t ks,
                          uint32_t i0)
    void fo_load_f16(const void* src, float* dst, Py_ssize_t n)
    void fo_store_f16(const float* src, void* dst, Py_ssize_t n)
    void fo_load_q8(const uint8_t* codes, const float* qmap, float absmax, float* dst,
                    Py_ssize_t n)
    float fo_store_q8(const float* src, uint8_t* codes, const float* bounds,
                      const uint8_t* table, Py_ssize_t n)

cnp.import_array()

DEF NSLOT = 5          # param, grad and three state buffers (rules.MAX_BUFFERS)
DEF GRAD = 1           # the read-only slot
DEF ALIGN = 16         # cut parts at multiples of 16 elements (64 bytes of float32)
DEF BLK = 256          # the staged path's block: an 8-bit state's quantisation block
DEF PREFETCH = 4       # the staged path asks for the block this many blocks ahead
DEF COPY = 2 * NSLOT   # the copy output's span id (NSLOT + slot: that slot's absmax)

# storage types of a slot
DEF TY_F32 = 0
DEF TY_F64 = 1
DEF TY_F16 = 2
DEF TY_BF16 = 3
DEF TY_Q8 = 4
_TYPE_CODES = {"float32": TY_F32, "float64": TY_F64, "float16": TY_F16,
               "bfloat16": TY_BF16, "q8": TY_Q8, "uint8": TY_Q8}
_TYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "q8")
cdef Py_ssize_t _ITEMSIZE[5]
_ITEMSIZE[:] = [4, 8, 2, 2, 1]


ctypedef struct Seg:
    char* ptr[NSLOT]
    float* absmax[NSLOT]   # per 256-block scales of a q8 slot, else NULL
    char* copy             # the parameter copy written out, or NULL
    Py_ssize_t n


ctypedef struct Stage:      # what a staged call knows besides the segments
    int ty[NSLOT]          # storage type per slot (-1: absent)
    int copy_ty
    const float* qmap[NSLOT]
    const float* bounds[NSLOT]
    const uint8_t* table[NSLOT]
    int sr                 # round a bf16 param stochastically
    uint32_t sr_key


ctypedef struct Span:   # the bytes of one buffer, for the overlap check
    uintptr_t lo
    uintptr_t hi
    Py_ssize_t seg
    int slot


# --------------------------------------------------------------------------
# The run: serial below PARALLEL_MIN elements or with one thread, else one
# parallel region over balanced parts.
# --------------------------------------------------------------------------

cdef inline Py_ssize_t _find(const Py_ssize_t* starts, Py_ssize_t nseg,
                             Py_ssize_t x) noexcept nogil:
    # the largest s with starts[s] <= x (for x < total: the segment holding x)
    cdef Py_ssize_t lo = 0, hi = nseg - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if starts[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef inline Py_ssize_t _cut(const Py_ssize_t* starts, Py_ssize_t nseg, Py_ssize_t x,
                            Py_ssize_t align) noexcept nogil:
    # global position x moved up to a multiple of align within its segment; both
    # threads that share a boundary compute it from the same x, so parts tile
    cdef Py_ssize_t s, local, n
    if x >= starts[nseg]:
        return starts[nseg]
    s = _find(starts, nseg, x)
    local = x - starts[s]
    n = starts[s + 1] - starts[s]
    local = (local + align - 1) // align * align
    if local > n:
        local = n
    return starts[s] + local


cdef inline void _seg_chunk(KernelId k, const Seg* seg, const double* c, Py_ssize_t lo,
                            Py_ssize_t hi, floating* kind) noexcept nogil:
    _chunk(k, <floating*>seg.ptr[0], <const floating*>seg.ptr[1],
           <floating*>seg.ptr[2], <floating*>seg.ptr[3], <floating*>seg.ptr[4], c, lo, hi)


cdef void _run_part(KernelId k, const Seg* segs, const Py_ssize_t* starts,
                    Py_ssize_t nseg, const double* c, Py_ssize_t lo, Py_ssize_t hi,
                    floating* kind) noexcept nogil:
    cdef Py_ssize_t s, end
    if lo >= hi:
        return
    s = _find(starts, nseg, lo)
    while lo < hi and s < nseg:
        end = starts[s + 1] if starts[s + 1] < hi else hi
        if end > lo:
            _seg_chunk(k, &segs[s], c, lo - starts[s], end - starts[s], kind)
            lo = end
        s += 1


cdef void _run_typed(KernelId k, const Seg* segs, const Py_ssize_t* starts,
                     Py_ssize_t nseg, const double* c, int nthreads, Py_ssize_t align,
                     floating* kind) noexcept nogil:
    cdef Py_ssize_t total = starts[nseg], per, nparts, part, s
    cdef int flush = _flush_denormals
    cdef unsigned int saved
    if nthreads <= 1 or total < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        saved = fastopt_fpu_enter(flush)
        for s in range(nseg):
            if segs[s].n > 0:
                _seg_chunk(k, &segs[s], c, 0, segs[s].n, kind)
        fastopt_fpu_leave(flush, saved)
        return
    per = ((total + nthreads - 1) // nthreads + align - 1) // align * align
    nparts = (total + per - 1) // per
    for part in prange(nparts, schedule="static", num_threads=nthreads):
        saved = fastopt_fpu_enter(flush)  # each worker has its own MXCSR
        _run_part(k, segs, starts, nseg, c, _cut(starts, nseg, part * per, align),
                  _cut(starts, nseg, (part + 1) * per, align), kind)
        fastopt_fpu_leave(flush, saved)


cdef void _stage_range(KernelId k, const Seg* seg, Py_ssize_t s, const double* c,
                       const Stage* st, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # elements [a, b) of segment s, a at a block start: per block, widen, run the
    # float32 chunk, narrow the written slots back, write the copy
    cdef float buf[NSLOT][BLK]
    cdef float* f[NSLOT]
    cdef Py_ssize_t n, q
    cdef int slot, t
    cdef char* ptr
    cdef uint32_t ks = 0
    if st.sr:
        ks = fo_mix32(st.sr_key ^ fo_mix32(<uint32_t>s + 0x9E3779B9u))
    while a < b:
        n = b - a if b - a < BLK else BLK
        q = a // BLK
        for slot in range(NSLOT):
            ptr = seg.ptr[slot]
            t = st.ty[slot]
            f[slot] = NULL
            if ptr == NULL:
                continue
            if a + PREFETCH * BLK < b:   # the block PREFETCH blocks ahead, this slot
                fo_prefetch(ptr + (a + PREFETCH * BLK) * _ITEMSIZE[t],
                            BLK * _ITEMSIZE[t], slot != GRAD)
            if t == TY_F32:
                f[slot] = (<float*>ptr) + a
                continue
            f[slot] = buf[slot]
            if t == TY_BF16:
                fo_load_bf16((<const uint16_t*>ptr) + a, buf[slot], n)
            elif t == TY_F16:
                fo_load_f16((<const uint16_t*>ptr) + a, buf[slot], n)
            else:
                fo_load_q8((<const uint8_t*>ptr) + a, st.qmap[slot], seg.absmax[slot][q],
                           buf[slot], n)
        _chunk(k, f[0], <const float*>f[1], f[2], f[3], f[4], c, 0, n)
        for slot in range(NSLOT):
            ptr = seg.ptr[slot]
            t = st.ty[slot]
            if slot == GRAD or ptr == NULL or t == TY_F32:
                continue
            if t == TY_BF16:
                if slot == 0 and st.sr:
                    fo_store_bf16_sr(buf[0], (<uint16_t*>ptr) + a, n, ks, <uint32_t>a)
                else:
                    fo_store_bf16(buf[slot], (<uint16_t*>ptr) + a, n)
            elif t == TY_F16:
                fo_store_f16(buf[slot], (<uint16_t*>ptr) + a, n)
            else:
                seg.absmax[slot][q] = fo_store_q8(buf[slot], (<uint8_t*>ptr) + a,
                                                  st.bounds[slot], st.table[slot], n)
        if seg.copy != NULL:
            if st.ty[0] == TY_BF16:   # the copy is of the param as stored
                fo_load_bf16((<const uint16_t*>seg.ptr[0]) + a, buf[0], n)
            elif st.ty[0] == TY_F16:
                fo_load_f16((<const uint16_t*>seg.ptr[0]) + a, buf[0], n)
            if st.copy_ty == TY_BF16:
                fo_store_bf16(f[0], (<uint16_t*>seg.copy) + a, n)
            elif st.copy_ty == TY_F16:
                fo_store_f16(f[0], (<uint16_t*>seg.copy) + a, n)
            else:
                memcpy((<float*>seg.copy) + a, f[0], n * sizeof(float))
        a += n


cdef void _run_part_staged(KernelId k, const Seg* segs, const Py_ssize_t* starts,
                           Py_ssize_t nseg, const double* c, const Stage* st,
                           Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t s, end
    if lo >= hi:
        return
    s = _find(starts, nseg, lo)
    while lo < hi and s < nseg:
        end = starts[s + 1] if starts[s + 1] < hi else hi
        if end > lo:
            _stage_range(k, &segs[s], s, c, st, lo - starts[s], end - starts[s])
            lo = end
        s += 1


cdef void _run_staged(KernelId k, const Seg* segs, const Py_ssize_t* starts,
                      Py_ssize_t nseg, const double* c, int nthreads,
                      const Stage* st) noexcept nogil:
    cdef Py_ssize_t total = starts[nseg], per, nparts, part
    cdef int flush = _flush_denormals
    cdef unsigned int saved
    if nthreads <= 1 or total < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        saved = fastopt_fpu_enter(flush)
        _run_part_staged(k, segs, starts, nseg, c, st, 0, total)
        fastopt_fpu_leave(flush, saved)
        return
    per = ((total + nthreads - 1) // nthreads + BLK - 1) // BLK * BLK
    nparts = (total + per - 1) // per
    for part in prange(nparts, schedule="static", num_threads=nthreads):
        saved = fastopt_fpu_enter(flush)
        _run_part_staged(k, segs, starts, nseg, c, st,
                         _cut(starts, nseg, part * per, BLK),
                         _cut(starts, nseg, (part + 1) * per, BLK))
        fastopt_fpu_leave(flush, saved)


# How a call runs, from its slots' storage types: float32 throughout or float64
# throughout straight over the buffers; any mix without float64 (or a copy out)
# staged through float32.
cdef enum Spec:
    SPEC_NONE = -1
    SPEC_F32 = 0
    SPEC_F64 = 1
    SPEC_STAGED = 2


cdef Spec _spec_of(const int* types, int nslot, bint copy) noexcept nogil:
    # types[slot]: the slot's storage type, -1 for an absent slot
    cdef int slot, n32 = 0, n64 = 0, n = 0
    for slot in range(nslot):
        if types[slot] < 0:
            continue
        n += 1
        n32 += types[slot] == TY_F32
        n64 += types[slot] == TY_F64
    if n64:
        return SPEC_F64 if n64 == n and not copy else SPEC_NONE
    if types[0] == TY_Q8 or types[GRAD] == TY_Q8:
        return SPEC_NONE
    return SPEC_F32 if n32 == n and not copy else SPEC_STAGED


cdef void _run(KernelId k, Spec spec, const Seg* segs, const Py_ssize_t* starts,
               Py_ssize_t nseg, const double* c, int nthreads,
               const Stage* st) noexcept nogil:
    if spec == SPEC_F32:
        _run_typed(k, segs, starts, nseg, c, nthreads, ALIGN, <float*>NULL)
    elif spec == SPEC_F64:
        _run_typed(k, segs, starts, nseg, c, nthreads, ALIGN, <double*>NULL)
    elif spec == SPEC_STAGED:
        _run_staged(k, segs, starts, nseg, c, nthreads, st)


def _type_code(d):
    """A storage type's code from a numpy dtype or its name ('q8' or uint8: 8-bit
    block-wise codes; 'bfloat16': ml_dtypes' or torch's bf16), or -1."""
    if type(d) is str:
        return _TYPE_CODES.get(d, -1)
    if isinstance(d, cnp.dtype) and (d.isnative or d.itemsize == 1):
        return _TYPE_CODES.get(d.name, -1)
    return -1


_Q8_TABLES = {}


def q8_tables(qmap):
    """(bounds, table) of a sorted 256-entry float32 map, cached by its bytes:
    bounds the 255 float32 midpoints plus +inf, table[u] the number of bounds below
    every float32 whose upper 16 bits are u (0 for NaN patterns). Raises ValueError
    when the map is not sorted or a bf16-wide bucket holds two bounds (the one
    comparison after the table would not be exact)."""
    import numpy as np
    q = np.ascontiguousarray(qmap, dtype=np.float32)
    key = q.tobytes()
    hit = _Q8_TABLES.get(key)
    if hit is not None:
        return hit
    if q.shape != (256,) or not np.all(np.abs(q) <= 1) or np.any(q[1:] < q[:255]):
        raise ValueError("an 8-bit map must be 256 float32 values in [-1, 1], in "
                         "ascending order")
    bounds = np.empty(256, np.float32)
    bounds[:255] = (q[:255] + q[1:]) / np.float32(2)
    bounds[255] = np.inf
    u = np.arange(65536, dtype=np.uint32)
    lo = (u << 16).view(np.float32)
    hi = ((u << 16) | 0xFFFF).view(np.float32)
    neg = (u & 0x8000) != 0
    vmin, vmax = np.where(neg, hi, lo), np.where(neg, lo, hi)
    table = np.searchsorted(bounds[:255], vmin, side="left")
    inside = np.searchsorted(bounds[:255], vmax, side="left") - table
    special = (u & 0x7F80) == 0x7F80        # inf and NaN patterns
    table[special] = 0
    if np.any(inside[~special] > 1):
        raise ValueError("this 8-bit map is too fine for the kernels' lookup "
                         "(two midpoints within one bf16 step)")
    hit = (bounds, table.astype(np.uint8))
    if len(_Q8_TABLES) < 64:
        _Q8_TABLES[key] = hit
    return hit


# --------------------------------------------------------------------------
# Overlap: sort the buffers' byte ranges once and sweep.
# --------------------------------------------------------------------------

cdef int _by_start(const void* a, const void* b) noexcept nogil:
    # by address, ties by (segment, slot): the same order, and so the same message,
    # as the Numba backend's sort
    cdef const Span* x = <const Span*>a
    cdef const Span* y = <const Span*>b
    if x.lo != y.lo:
        return -1 if x.lo < y.lo else 1
    if x.seg != y.seg:
        return -1 if x.seg < y.seg else 1
    return x.slot - y.slot


cdef inline bint _clash(const Span* a, const Span* b) noexcept nogil:
    return a.lo < b.hi and b.lo < a.hi and not (a.slot == GRAD and b.slot == GRAD)


cdef Py_ssize_t _first_clash(Span* spans, Py_ssize_t m) noexcept nogil:
    # sorts spans by start; returns i such that spans[i] clashes with an earlier
    # span, or -1. A written span clashes with anything it overlaps; a gradient
    # only with written ones.
    cdef Py_ssize_t i
    cdef uintptr_t reach_any = 0, reach_written = 0
    qsort(spans, m, sizeof(Span), _by_start)
    for i in range(m):
        if spans[i].lo < (reach_written if spans[i].slot == GRAD else reach_any):
            return i
        if spans[i].hi > reach_any:
            reach_any = spans[i].hi
        if spans[i].slot != GRAD and spans[i].hi > reach_written:
            reach_written = spans[i].hi
    return -1


cdef str _slot_name(names, Py_ssize_t seg, int slot, bint single, labels=None):
    if single:
        return names[slot]
    return f"{names[slot]}[{seg if labels is None else labels[seg]}]"


cdef int _check_spans(Span* spans, Py_ssize_t m, names, bint single,
                      labels=None) except -1:
    cdef Py_ssize_t i = _first_clash(spans, m), j
    if i < 0:
        return 0
    for j in range(i):
        if _clash(&spans[j], &spans[i]):
            break
    raise ValueError(f"{_slot_name(names, spans[i].seg, spans[i].slot, single, labels)} "
                     "shares memory with "
                     f"{_slot_name(names, spans[j].seg, spans[j].slot, single, labels)}; "
                     "every buffer that is written must be distinct (pass a copy)")


cdef Py_ssize_t _collect(const Seg* segs, Py_ssize_t nseg, const Py_ssize_t* isz,
                         Py_ssize_t copy_isz, bint with_grads, Span* out) noexcept nogil:
    # isz[slot]: the slot's element size; absmax arrays and the copy are written too
    cdef Py_ssize_t s, m = 0
    cdef int slot
    for s in range(nseg):
        if segs[s].n <= 0:
            continue
        for slot in range(NSLOT):
            if segs[s].ptr[slot] == NULL or (slot == GRAD and not with_grads):
                continue
            out[m].lo = <uintptr_t>segs[s].ptr[slot]
            out[m].hi = out[m].lo + <uintptr_t>(segs[s].n * isz[slot])
            out[m].seg = s
            out[m].slot = slot
            m += 1
            if segs[s].absmax[slot] != NULL:
                out[m].lo = <uintptr_t>segs[s].absmax[slot]
                out[m].hi = out[m].lo + <uintptr_t>((segs[s].n + BLK - 1) // BLK * 4)
                out[m].seg = s
                out[m].slot = NSLOT + slot
                m += 1
        if segs[s].copy != NULL:
            out[m].lo = <uintptr_t>segs[s].copy
            out[m].hi = out[m].lo + <uintptr_t>(segs[s].n * copy_isz)
            out[m].seg = s
            out[m].slot = COPY
            m += 1
    return m


cdef list _span_names(names):
    # a span's slot id -> its name: slots, then "absmax of" each slot, then the copy
    out = list(names) + [""] * (NSLOT - len(names))
    out += [f"absmax of {n}" for n in out[:NSLOT]]
    out.append("copy")
    return out


cdef Py_ssize_t* _prefix(const Seg* segs, Py_ssize_t nseg) except NULL:
    cdef Py_ssize_t* starts = <Py_ssize_t*>malloc((nseg + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t s
    if starts == NULL:
        raise MemoryError()
    starts[0] = 0
    for s in range(nseg):
        starts[s + 1] = starts[s] + segs[s].n
    return starts


def _kernel_info(str kernel):
    try:
        return KERNEL_TABLE[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; the compiled backend has "
                         f"{', '.join(KERNEL_TABLE)}") from None


cdef int _load_plan(double* c, tuple args, int nplan, str kernel) except -1:
    cdef Py_ssize_t k
    if len(args) != nplan:
        raise TypeError(f"{kernel} takes {nplan} per-step scalars, got {len(args)}")
    for k in range(nplan):
        c[k] = args[k]
    return 0


# --------------------------------------------------------------------------
# Bound: the NumPy classes' fast path. Params and state are checked once, at bind
# time (types, sizes, overlap; their byte ranges kept sorted); a step takes the
# gradients' addresses through NumPy's C API, checks each against the kept ranges
# by binary search, and runs.
# --------------------------------------------------------------------------

cdef inline bint _exact_float_array(object a, int typenum):
    return (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a))


cdef str _types_message(names, const int* ty, str copy=""):
    return ("no kernel runs the storage types ("
            + ", ".join(f"{names[k]} {_TYPE_NAMES[ty[k]]}" for k in range(len(names))
                        if ty[k] >= 0) + copy + "): float64 only with float64 throughout, "
            "8-bit codes only for state")


cdef int _q8_stage(Stage* st, int slot, qmap, str name, list keep) except -1:
    # the slot's map and its lookup tables into st; keep holds them alive
    import numpy as np
    if qmap is None:
        raise ValueError(f"{name} holds 8-bit codes but no map (qmap) was given")
    if not isinstance(qmap, np.ndarray) or qmap.dtype != np.float32 or qmap.shape != (256,) \
            or not qmap.flags.c_contiguous:
        raise TypeError(f"the map of {name} must be a C-contiguous float32 array of 256 "
                        f"values, got {getattr(qmap, 'dtype', type(qmap).__name__)} "
                        f"{getattr(qmap, 'shape', '')}")
    bounds, table = q8_tables(qmap)
    keep += [qmap, bounds, table]
    st.qmap[slot] = <const float*>cnp.PyArray_DATA(<cnp.ndarray>qmap)
    st.bounds[slot] = <const float*>cnp.PyArray_DATA(<cnp.ndarray>bounds)
    st.table[slot] = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>table)
    return 0


cdef class Bound:
    """``Bound(kernel, params, buffers, single, labels, grad_dtype, absmax, qmaps)``:
    ``params`` a list of C-contiguous NumPy arrays of one storage type (float32,
    float64, float16 or bfloat16; any shapes), ``buffers`` one tuple per param of its
    state arrays in the rule's slot order (``None`` where absent, alike for every
    param; one type per slot, uint8 for 8-bit block-wise codes), ``grad_dtype`` the
    gradients' dtype (default: the params'), ``absmax`` one tuple per param of the
    float32 block scales of its 8-bit buffers, ``qmaps`` one 256-entry float32 map
    per state slot. ``step(grads, args, nthreads, copies, sr_key)`` runs the kernel
    over all of them in one call: ``grads`` one array (``single``) or a list/tuple of
    one per param; ``copies`` arrays to write the new params into (float32, float16
    or bfloat16); ``sr_key`` a 32-bit key that makes bf16 params round
    stochastically. Holds the arrays alive."""

    cdef KernelId kid
    cdef Spec spec, run_spec
    cdef Stage st
    cdef int nplan, grad_typenum
    cdef Py_ssize_t isz[NSLOT]
    cdef Py_ssize_t nseg, nwritten
    cdef Seg* segs
    cdef Py_ssize_t* starts
    cdef uintptr_t* wlo
    cdef uintptr_t* whi
    cdef Py_ssize_t* wseg
    cdef int* wslot
    cdef bint single, ready
    cdef object arrays, labels, grad_dtype, span_names
    cdef readonly str kernel
    cdef readonly object names

    def __cinit__(self):
        self.segs = NULL
        self.starts = NULL
        self.wlo = self.whi = NULL
        self.wseg = NULL
        self.wslot = NULL

    def __dealloc__(self):
        free(self.segs)
        free(self.starts)
        free(self.wlo)
        free(self.whi)
        free(self.wseg)
        free(self.wslot)

    def __init__(self, str kernel, params, buffers, bint single=False, labels=None,
                 grad_dtype=None, absmax=None, qmaps=None):
        import numpy as np
        cdef Py_ssize_t s, m, nbuf, nblk
        cdef int slot, t
        cdef cnp.ndarray a
        cdef Span* spans
        self.kid, self.nplan, self.names = _kernel_info(kernel)
        self.span_names = _span_names(self.names)
        self.kernel, self.single, self.labels, self.ready = kernel, single, labels, False
        nbuf = len(self.names) - 2
        params, buffers = list(params), list(buffers)
        if len(buffers) != len(params):
            raise ValueError(f"{len(params)} params but {len(buffers)} buffer tuples")
        self.nseg = len(params)
        if self.nseg == 0:
            raise ValueError("no params to bind")
        if absmax is not None and len(absmax) != self.nseg:
            raise ValueError(f"absmax has {len(absmax)} tuples, param has {self.nseg}")
        self.segs = <Seg*>malloc(self.nseg * sizeof(Seg))
        if self.segs == NULL:
            raise MemoryError()
        memset_segs(self.segs, self.nseg)
        pname = _slot_name(self.names, 0, 0, single, self.labels)
        first = params[0]
        t = _type_code(first.dtype) if isinstance(first, cnp.ndarray) else -1
        if t < 0 or t == TY_Q8:
            raise TypeError(f"{pname} must be a float32, float64, float16 or bfloat16 "
                            f"NumPy array, got {getattr(first, 'dtype', type(first).__name__)}")
        gd = first.dtype if grad_dtype is None else np.dtype(grad_dtype)
        self.grad_dtype = gd
        self.grad_typenum = gd.num
        # each slot's type: the param's, the gradients', and each state buffer's in
        # the first param's tuple (every param's must match)
        first_bufs = tuple(buffers[0]) + (None,) * (nbuf - len(buffers[0]))
        for slot in range(NSLOT):
            self.st.ty[slot] = -1
            self.st.qmap[slot] = self.st.bounds[slot] = NULL
            self.st.table[slot] = NULL
        self.st.ty[0] = t
        self.st.ty[GRAD] = _type_code(gd)
        if self.st.ty[GRAD] < 0 or self.st.ty[GRAD] == TY_Q8:
            raise TypeError(f"grad_dtype must be float32, float64, float16 or bfloat16, got {gd}")
        for slot in range(2, 2 + nbuf):
            b = first_bufs[slot - 2] if slot - 2 < len(first_bufs) else None
            if b is not None:
                self.st.ty[slot] = _type_code(b.dtype) if isinstance(b, cnp.ndarray) else TY_F32
        self.st.copy_ty = -1
        self.st.sr = 0
        self.st.sr_key = 0
        self.spec = self.run_spec = _spec_of(self.st.ty, NSLOT, False)
        if self.spec == SPEC_NONE:
            raise TypeError(_types_message(self.names, self.st.ty))
        for slot in range(NSLOT):
            self.isz[slot] = _ITEMSIZE[self.st.ty[slot]] if self.st.ty[slot] >= 0 else 0
        arrays = []
        for slot in range(2, NSLOT):
            if self.st.ty[slot] == TY_Q8:
                _q8_stage(&self.st, slot, None if qmaps is None else qmaps[slot - 2],
                          self.names[slot], arrays)
        present = None
        for s in range(self.nseg):
            bufs = tuple(buffers[s]) + (None,) * (nbuf - len(buffers[s]))
            if len(bufs) != nbuf:
                raise ValueError(f"{kernel} has {nbuf} state buffers, got {len(bufs)}")
            pattern = tuple(b is not None for b in bufs)
            if present is None:
                present = pattern
            elif pattern != present:
                raise ValueError(f"param {s} has state buffers {pattern}, param 0 has "
                                 f"{present}; one call needs one set")
            for slot in range(NSLOT):
                if slot == GRAD:
                    continue
                obj = params[s] if slot == 0 else (bufs[slot - 2] if slot - 2 < nbuf else None)
                if obj is None:
                    continue
                name = _slot_name(self.names, s, slot, single, self.labels)
                if not isinstance(obj, cnp.ndarray):
                    raise TypeError(f"{name} must be a NumPy array, got {type(obj).__name__}")
                a = <cnp.ndarray>obj
                if _type_code(obj.dtype) != self.st.ty[slot]:
                    raise TypeError(f"{name} has dtype {obj.dtype}, "
                                    f"{_slot_name(self.names, 0, slot, single, self.labels)} has "
                                    f"{_TYPE_NAMES[self.st.ty[slot]]}; they must match")
                if not cnp.PyArray_IS_C_CONTIGUOUS(a):
                    raise ValueError(f"{name} must be C-contiguous")
                if not cnp.PyArray_ISWRITEABLE(a):
                    raise ValueError(f"{name} is read-only; fastopt updates it in place")
                m = cnp.PyArray_SIZE(a)
                if slot == 0:
                    self.segs[s].n = m
                elif m != self.segs[s].n:
                    raise ValueError(f"{name} has {m} elements, "
                                     f"{_slot_name(self.names, s, 0, single, self.labels)} has "
                                     f"{self.segs[s].n}")
                self.segs[s].ptr[slot] = <char*>cnp.PyArray_DATA(a)
                arrays.append(obj)
                if self.st.ty[slot] == TY_Q8:
                    nblk = (m + BLK - 1) // BLK
                    sc = None if absmax is None else tuple(absmax[s])[slot - 2]
                    if not (isinstance(sc, np.ndarray) and sc.dtype == np.float32
                            and sc.flags.c_contiguous and sc.flags.writeable
                            and sc.size == nblk):
                        raise ValueError(f"{name} holds 8-bit codes: its absmax must be a "
                                         f"writeable C-contiguous float32 array of {nblk} "
                                         f"entries (one per 256 elements), got "
                                         f"{getattr(sc, 'dtype', type(sc).__name__)} "
                                         f"{getattr(sc, 'shape', '')}")
                    self.segs[s].absmax[slot] = <float*>cnp.PyArray_DATA(<cnp.ndarray>sc)
                    arrays.append(sc)
        self.arrays = arrays
        self.starts = _prefix(self.segs, self.nseg)
        # the written buffers' byte ranges, checked and kept sorted
        spans = <Span*>malloc(self.nseg * (2 * NSLOT + 1) * sizeof(Span))
        if spans == NULL:
            raise MemoryError()
        try:
            m = _collect(self.segs, self.nseg, self.isz, 0, False, spans)
            _check_spans(spans, m, self.span_names, single, self.labels)
            self.nwritten = m
            self.wlo = <uintptr_t*>malloc((m + 1) * sizeof(uintptr_t))
            self.whi = <uintptr_t*>malloc((m + 1) * sizeof(uintptr_t))
            self.wseg = <Py_ssize_t*>malloc((m + 1) * sizeof(Py_ssize_t))
            self.wslot = <int*>malloc((m + 1) * sizeof(int))
            if self.wlo == NULL or self.whi == NULL or self.wseg == NULL or self.wslot == NULL:
                raise MemoryError()
            for s in range(m):
                self.wlo[s] = spans[s].lo
                self.whi[s] = spans[s].hi
                self.wseg[s] = spans[s].seg
                self.wslot[s] = spans[s].slot
        finally:
            free(spans)

    @property
    def size(self):
        """Elements in all segments."""
        return self.starts[self.nseg]

    cdef int _take_grad(self, object g, Py_ssize_t s) except -1:
        cdef cnp.ndarray a
        cdef uintptr_t lo, hi
        cdef Py_ssize_t k, top, mid
        if not _exact_float_array(g, self.grad_typenum):
            name = _slot_name(self.names, s, GRAD, self.single, self.labels)
            if not isinstance(g, cnp.ndarray):
                raise TypeError(f"{name} must be a NumPy array, got {type(g).__name__}")
            if _type_code(g.dtype) != self.st.ty[GRAD]:
                raise TypeError(f"{name} has dtype {g.dtype}, expected {self.grad_dtype} "
                                f"({_slot_name(self.names, s, 0, self.single, self.labels)} "
                                f"has {_TYPE_NAMES[self.st.ty[0]]})")
            if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>g):
                raise ValueError(f"{name} must be C-contiguous, got strides {g.strides}")
            a = <cnp.ndarray>g   # a subclass of ndarray (np.memmap, say): fine
        else:
            a = <cnp.ndarray>g
        if cnp.PyArray_SIZE(a) != self.segs[s].n:
            raise ValueError(f"{_slot_name(self.names, s, GRAD, self.single, self.labels)} has "
                             f"{cnp.PyArray_SIZE(a)} elements, "
                             f"{_slot_name(self.names, s, 0, self.single, self.labels)} has "
                             f"{self.segs[s].n}")
        self.segs[s].ptr[GRAD] = <char*>cnp.PyArray_DATA(a)
        if self.segs[s].n == 0 or self.nwritten == 0:
            return 0
        lo = <uintptr_t>self.segs[s].ptr[GRAD]
        hi = lo + <uintptr_t>(self.segs[s].n * self.isz[GRAD])
        # the last written range starting below hi is the only one that can overlap
        # (the written ranges are disjoint and sorted)
        k, top = 0, self.nwritten - 1
        if self.wlo[0] >= hi:
            return 0
        while k < top:
            mid = (k + top + 1) >> 1
            if self.wlo[mid] < hi:
                k = mid
            else:
                top = mid - 1
        if self.whi[k] > lo:
            raise ValueError(f"{_slot_name(self.names, s, GRAD, self.single, self.labels)} shares memory "
                             f"with {_slot_name(self.span_names, self.wseg[k], self.wslot[k], self.single, self.labels)}"
                             "; every buffer that is written must be distinct (pass a copy)")
        return 0

    cdef int _take_copies(self, copies) except -1:
        # the copy outputs (or none): types, sizes, then every span of the call
        # checked together; on any error no segment keeps a copy pointer
        cdef Py_ssize_t s, m
        cdef int t = -1
        cdef Span* spans
        for s in range(self.nseg):
            self.segs[s].copy = NULL
        self.run_spec = self.spec
        self.st.copy_ty = -1
        if copies is None:
            return 0
        items = [copies] if self.single else copies
        if not self.single and type(copies) is not list and type(copies) is not tuple:
            raise TypeError(f"copy_to must be a list of {self.nseg} arrays (one per "
                            f"param), got {type(copies).__name__}")
        if len(items) != self.nseg:
            raise ValueError(f"copy_to has {len(items)} arrays, param has {self.nseg}")
        try:
            for s in range(self.nseg):
                c = items[s]
                name = "copy_to" if self.single else f"copy_to[{s if self.labels is None else self.labels[s]}]"
                ct = _type_code(c.dtype) if isinstance(c, cnp.ndarray) else -1
                if ct not in (TY_F32, TY_F16, TY_BF16):
                    raise TypeError(f"{name} must be a float32, float16 or bfloat16 NumPy "
                                    f"array, got {getattr(c, 'dtype', type(c).__name__)}")
                if t >= 0 and ct != t:
                    raise TypeError(f"{name} has dtype {c.dtype}; every copy must have "
                                    f"the first one's {_TYPE_NAMES[t]}")
                t = ct
                if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>c) or \
                        not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>c):
                    raise ValueError(f"{name} must be a writeable C-contiguous array")
                if cnp.PyArray_SIZE(<cnp.ndarray>c) != self.segs[s].n:
                    raise ValueError(f"{name} has {cnp.PyArray_SIZE(<cnp.ndarray>c)} "
                                     f"elements, {_slot_name(self.names, s, 0, self.single, self.labels)} "
                                     f"has {self.segs[s].n}")
                self.segs[s].copy = <char*>cnp.PyArray_DATA(<cnp.ndarray>c)
            if self.spec == SPEC_F64:
                raise TypeError("copy_to needs float32, float16 or bfloat16 params, "
                                "not float64")
            spans = <Span*>malloc(self.nseg * (2 * NSLOT + 1) * sizeof(Span))
            if spans == NULL:
                raise MemoryError()
            try:
                m = _collect(self.segs, self.nseg, self.isz, _ITEMSIZE[t], True, spans)
                _check_spans(spans, m, self.span_names, self.single, self.labels)
            finally:
                free(spans)
        except BaseException:
            for s in range(self.nseg):
                self.segs[s].copy = NULL
            raise
        self.st.copy_ty = t
        self.run_spec = SPEC_STAGED
        return 0

    def prepare(self, grads, copies=None, sr_key=None):
        """Take and check the gradients' addresses (and the copies'; nothing is
        written); ``run`` then steps with them. ``step`` is both."""
        self._prepare(grads, copies, sr_key)

    cdef int _prepare(self, grads, copies, sr_key) except -1:
        cdef Py_ssize_t s
        self.ready = False
        if self.single:
            self._take_grad(grads, 0)
        else:
            if type(grads) is not list and type(grads) is not tuple:
                raise TypeError(f"grad must be a list of {self.nseg} arrays (one per "
                                f"param), got {type(grads).__name__}")
            if len(grads) != self.nseg:
                raise ValueError(f"grad has {len(grads)} arrays, param has {self.nseg}")
            for s in range(self.nseg):
                self._take_grad(grads[s], s)
        if copies is not None or self.st.copy_ty >= 0:
            self._take_copies(copies)
        self.st.sr = sr_key is not None and self.st.ty[0] == TY_BF16
        self.st.sr_key = <uint32_t>(int(sr_key) & 0xFFFFFFFF) if sr_key is not None else 0
        self.ready = True
        return 0

    def run(self, tuple args, int nthreads):
        cdef double c[32]
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        _load_plan(c, args, self.nplan, self.kernel)
        self.ready = False
        with nogil:
            _run(self.kid, self.run_spec, self.segs, self.starts, self.nseg, c, nthreads,
                 &self.st)

    def step(self, grads, tuple args, int nthreads, copies=None, sr_key=None):
        cdef double c[32]
        _load_plan(c, args, self.nplan, self.kernel)
        self._prepare(grads, copies, sr_key)
        self.ready = False
        with nogil:
            _run(self.kid, self.run_spec, self.segs, self.starts, self.nseg, c, nthreads,
                 &self.st)


cdef void memset_segs(Seg* segs, Py_ssize_t nseg) noexcept nogil:
    cdef Py_ssize_t s
    cdef int slot
    for s in range(nseg):
        segs[s].n = 0
        segs[s].copy = NULL
        for slot in range(NSLOT):
            segs[s].ptr[slot] = NULL
            segs[s].absmax[slot] = NULL


# --------------------------------------------------------------------------
# run_segments: a call over addresses the caller holds alive (fastopt.torch reads
# its tensors' data_ptr() each step). ptrs is (nseg, 2 + buffers) uintp, lengths
# (nseg,) intp; a column of zeros is an absent buffer.
# --------------------------------------------------------------------------

cdef int _check_table(object a, int typenum, int ndim, str what) except -1:
    # the tables through NumPy's C API: a memoryview costs more than a small call
    if not (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
        raise TypeError(f"{what} must be a C-contiguous {ndim}-D numpy."
                        f"{'uintp' if typenum == cnp.NPY_UINTP else 'intp'} array")
    return 0


def run_segments(str kernel, dtype, ptrs, lengths, tuple args, int nthreads,
                 bint check=True, absmax=None, qmaps=None, copy=None, copy_dtype=None,
                 sr_key=None):
    """One call over addresses: ``dtype`` is every slot's storage type, or a tuple
    of one per column of ``ptrs`` (param, grad, state buffers): a numpy dtype or
    'float32', 'float64', 'float16', 'bfloat16', 'q8'. An 8-bit column needs its
    block scales' addresses in ``absmax`` (uintp, the shape of ``ptrs``) and its map
    in ``qmaps`` (one entry per column, None elsewhere). ``copy`` (uintp, one per
    segment) receives the new params as ``copy_dtype``; ``sr_key`` (a 32-bit key)
    rounds bf16 params stochastically."""
    cdef KernelId kid
    cdef int nplan, slot
    cdef Spec spec
    cdef Stage st
    cdef Py_ssize_t isz[NSLOT]
    cdef double c[32]
    cdef Py_ssize_t nseg, ncol, s, m, copy_isz = 0
    cdef const uintptr_t* P
    cdef const uintptr_t* A = NULL
    cdef const uintptr_t* C = NULL
    cdef const Py_ssize_t* L
    cdef Seg* segs
    cdef Py_ssize_t* starts = NULL
    cdef Span* spans = NULL
    kid, nplan, names = _kernel_info(kernel)
    _load_plan(c, args, nplan, kernel)
    per_slot = dtype if type(dtype) is tuple else (dtype,) * len(names)
    if len(per_slot) != len(names):
        raise ValueError(f"dtype has {len(per_slot)} entries; {kernel} has {len(names)} "
                         f"slots ({', '.join(names)})")
    keep = []
    for slot in range(NSLOT):
        st.ty[slot] = -1
        st.qmap[slot] = st.bounds[slot] = NULL
        st.table[slot] = NULL
        isz[slot] = 0
        if slot < len(names):
            st.ty[slot] = _type_code(per_slot[slot])
            if st.ty[slot] < 0:
                raise TypeError(f"dtype of {names[slot]} must be a native float32, float64, "
                                f"float16 or bfloat16 numpy.dtype (or 'q8'), got "
                                f"{per_slot[slot]!r}")
            isz[slot] = _ITEMSIZE[st.ty[slot]]
    st.copy_ty = -1
    if copy is not None:
        st.copy_ty = _type_code(copy_dtype)
        if st.copy_ty not in (TY_F32, TY_F16, TY_BF16):
            raise TypeError(f"copy_dtype must be float32, float16 or bfloat16, got "
                            f"{copy_dtype!r}")
        copy_isz = _ITEMSIZE[st.copy_ty]
    spec = _spec_of(st.ty, NSLOT, copy is not None)
    if spec == SPEC_NONE:
        raise TypeError(_types_message(names, st.ty, ", a copy" if copy is not None else ""))
    st.sr = sr_key is not None and st.ty[0] == TY_BF16
    st.sr_key = <uint32_t>(int(sr_key) & 0xFFFFFFFF) if sr_key is not None else 0
    _check_table(ptrs, cnp.NPY_UINTP, 2, "ptrs")
    _check_table(lengths, cnp.NPY_INTP, 1, "lengths")
    nseg = cnp.PyArray_DIM(<cnp.ndarray>ptrs, 0)
    ncol = cnp.PyArray_DIM(<cnp.ndarray>ptrs, 1)
    P = <const uintptr_t*>cnp.PyArray_DATA(<cnp.ndarray>ptrs)
    L = <const Py_ssize_t*>cnp.PyArray_DATA(<cnp.ndarray>lengths)
    if ncol != len(names):
        raise ValueError(f"ptrs has {ncol} columns; {kernel} takes {len(names)} "
                         f"({', '.join(names)})")
    if cnp.PyArray_DIM(<cnp.ndarray>lengths, 0) != nseg:
        raise ValueError(f"lengths has {cnp.PyArray_DIM(<cnp.ndarray>lengths, 0)} entries, "
                         f"ptrs has {nseg} rows")
    for slot in range(NSLOT):
        if st.ty[slot] == TY_Q8:
            _q8_stage(&st, slot, None if qmaps is None else qmaps[slot], names[slot], keep)
            if absmax is None:
                raise ValueError(f"{names[slot]} holds 8-bit codes but no absmax table was given")
    if absmax is not None:
        _check_table(absmax, cnp.NPY_UINTP, 2, "absmax")
        if cnp.PyArray_DIM(<cnp.ndarray>absmax, 0) != nseg or \
                cnp.PyArray_DIM(<cnp.ndarray>absmax, 1) != ncol:
            raise ValueError(f"absmax must have the shape of ptrs ({nseg}, {ncol})")
        A = <const uintptr_t*>cnp.PyArray_DATA(<cnp.ndarray>absmax)
    if copy is not None:
        _check_table(copy, cnp.NPY_UINTP, 1, "copy")
        if cnp.PyArray_DIM(<cnp.ndarray>copy, 0) != nseg:
            raise ValueError(f"copy has {cnp.PyArray_DIM(<cnp.ndarray>copy, 0)} entries, "
                             f"ptrs has {nseg} rows")
        C = <const uintptr_t*>cnp.PyArray_DATA(<cnp.ndarray>copy)
    if nseg == 0:
        return
    segs = <Seg*>malloc(nseg * sizeof(Seg))
    if segs == NULL:
        raise MemoryError()
    memset_segs(segs, nseg)
    cdef Py_ssize_t lead = -1   # the first non-empty segment sets which buffers exist
    try:
        for s in range(nseg):
            if L[s] < 0:
                raise ValueError(f"lengths[{s}] is {L[s]}")
            segs[s].n = L[s]
            if L[s] > 0 and lead < 0:
                lead = s
            if C != NULL and L[s] > 0:
                if C[s] == 0:
                    raise ValueError(f"copy[{s}] is a null pointer")
                segs[s].copy = <char*>C[s]
            for slot in range(NSLOT):
                segs[s].ptr[slot] = <char*>P[s * ncol + slot] if slot < ncol else NULL
                if segs[s].n == 0 or slot >= ncol:
                    continue
                if slot <= GRAD and segs[s].ptr[slot] == NULL:
                    raise ValueError(f"{names[slot]}[{s}] is a null pointer")
                if (segs[s].ptr[slot] == NULL) != (P[lead * ncol + slot] == 0):
                    raise ValueError(f"{names[slot]} is present in some segments and "
                                     f"absent in others (segment {s})")
                if st.ty[slot] == TY_Q8 and segs[s].ptr[slot] != NULL:
                    if A[s * ncol + slot] == 0:
                        raise ValueError(f"absmax of {names[slot]}[{s}] is a null pointer")
                    segs[s].absmax[slot] = <float*>A[s * ncol + slot]
        starts = _prefix(segs, nseg)
        if check:
            spans = <Span*>malloc(nseg * (2 * NSLOT + 1) * sizeof(Span))
            if spans == NULL:
                raise MemoryError()
            m = _collect(segs, nseg, isz, copy_isz, True, spans)
            _check_spans(spans, m, _span_names(names), False)
        with nogil:
            _run(kid, spec, segs, starts, nseg, c, nthreads, &st)
    finally:
        free(segs)
        free(starts)
        free(spans)
