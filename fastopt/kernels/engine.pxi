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
# Element types are per slot (Seg.ptr is untyped); today every slot of a call has
# the param's float32 or float64 type, and _run dispatches on that. A mixed
# signature (bf16 params with float32 state, 8-bit state) is a new branch there
# and a new chunk specialisation, not a new calling convention.
#
# Checks, before anything is written: every pointer's element count, type and
# layout (by the caller: Bound for NumPy arrays, fastopt.torch for tensors), and
# overlap: no buffer that is written (param, state) may share a byte with any other
# buffer of the call; gradients are only read and may share memory with each other.

cimport numpy as cnp
from libc.stdlib cimport malloc, free, qsort

cnp.import_array()

DEF NSLOT = 5          # param, grad and three state buffers (rules.MAX_BUFFERS)
DEF GRAD = 1           # the read-only slot
DEF ALIGN = 16         # cut parts at multiples of 16 elements (64 bytes of float32)


ctypedef struct Seg:
    char* ptr[NSLOT]
    Py_ssize_t n


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


# The element-type signatures the kernels are specialised for: every slot of a call
# (param, grad, state) float32, or every slot float64. A new signature (bf16 params
# with float32 state, 8-bit state) is a new entry here and a branch in _run.
cdef enum Spec:
    SPEC_NONE = -1
    SPEC_F32 = 0
    SPEC_F64 = 1


cdef Spec _spec_of(const int* types, int nslot) noexcept nogil:
    # types[slot]: the slot's NumPy type number, -1 for an absent slot
    cdef int slot, first = -1
    for slot in range(nslot):
        if types[slot] < 0:
            continue
        if first < 0:
            first = types[slot]
        elif types[slot] != first:
            return SPEC_NONE
    if first == cnp.NPY_FLOAT:
        return SPEC_F32
    if first == cnp.NPY_DOUBLE:
        return SPEC_F64
    return SPEC_NONE


cdef void _run(KernelId k, Spec spec, const Seg* segs, const Py_ssize_t* starts,
               Py_ssize_t nseg, const double* c, int nthreads) noexcept nogil:
    if spec == SPEC_F32:
        _run_typed(k, segs, starts, nseg, c, nthreads, ALIGN, <float*>NULL)
    elif spec == SPEC_F64:
        _run_typed(k, segs, starts, nseg, c, nthreads, ALIGN, <double*>NULL)


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


cdef Py_ssize_t _collect(const Seg* segs, Py_ssize_t nseg, Py_ssize_t itemsize,
                         bint with_grads, Span* out) noexcept nogil:
    cdef Py_ssize_t s, m = 0
    cdef int slot
    for s in range(nseg):
        if segs[s].n <= 0:
            continue
        for slot in range(NSLOT):
            if segs[s].ptr[slot] == NULL or (slot == GRAD and not with_grads):
                continue
            out[m].lo = <uintptr_t>segs[s].ptr[slot]
            out[m].hi = out[m].lo + <uintptr_t>(segs[s].n * itemsize)
            out[m].seg = s
            out[m].slot = slot
            m += 1
    return m


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


cdef class Bound:
    """``Bound(kernel, params, buffers, single)``: ``params`` a list of C-contiguous
    float32/float64 NumPy arrays of one dtype (any shapes), ``buffers`` one tuple per
    param of its state arrays in the rule's slot order (``None`` where absent, alike
    for every param). ``step(grads, args, nthreads)`` runs the kernel over all of
    them in one call: ``grads`` one array (``single``) or a list/tuple of one per
    param. Holds the arrays alive."""

    cdef KernelId kid
    cdef Spec spec
    cdef int nplan, typenum
    cdef Py_ssize_t itemsize, nseg, nwritten
    cdef Seg* segs
    cdef Py_ssize_t* starts
    cdef uintptr_t* wlo
    cdef uintptr_t* whi
    cdef Py_ssize_t* wseg
    cdef int* wslot
    cdef bint single, ready
    cdef object arrays, labels
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

    def __init__(self, str kernel, params, buffers, bint single=False, labels=None):
        cdef Py_ssize_t s, m, nbuf
        cdef int slot
        cdef cnp.ndarray a
        cdef Span* spans
        self.kid, self.nplan, self.names = _kernel_info(kernel)
        self.kernel, self.single, self.labels, self.ready = kernel, single, labels, False
        nbuf = len(self.names) - 2
        params, buffers = list(params), list(buffers)
        if len(buffers) != len(params):
            raise ValueError(f"{len(params)} params but {len(buffers)} buffer tuples")
        self.nseg = len(params)
        if self.nseg == 0:
            raise ValueError("no params to bind")
        self.segs = <Seg*>malloc(self.nseg * sizeof(Seg))
        if self.segs == NULL:
            raise MemoryError()
        first = params[0]
        if not isinstance(first, cnp.ndarray) or first.dtype.kind != "f" or \
                first.dtype.itemsize not in (4, 8):
            raise TypeError(f"{_slot_name(self.names, 0, 0, single, self.labels)} must be a float32 or "
                            f"float64 NumPy array, got {type(first).__name__}")
        self.typenum = cnp.NPY_FLOAT if first.dtype.itemsize == 4 else cnp.NPY_DOUBLE
        # every slot has the param's type (checked below): float32 or float64 throughout
        self.spec = SPEC_F32 if self.typenum == cnp.NPY_FLOAT else SPEC_F64
        self.itemsize = first.dtype.itemsize
        present = None
        arrays = []
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
            self.segs[s].ptr[GRAD] = NULL
            for slot in range(NSLOT):
                if slot == GRAD:
                    continue
                obj = params[s] if slot == 0 else (bufs[slot - 2] if slot - 2 < nbuf else None)
                if obj is None:
                    self.segs[s].ptr[slot] = NULL
                    continue
                name = _slot_name(self.names, s, slot, single, self.labels)
                if not isinstance(obj, cnp.ndarray):
                    raise TypeError(f"{name} must be a NumPy array, got {type(obj).__name__}")
                a = <cnp.ndarray>obj
                if cnp.PyArray_TYPE(a) != self.typenum or not cnp.PyArray_ISNOTSWAPPED(a):
                    raise TypeError(f"{name} has dtype {obj.dtype}, "
                                    f"{_slot_name(self.names, 0, 0, single, self.labels)} has dtype "
                                    f"{first.dtype}; they must match")
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
        self.arrays = arrays
        self.starts = _prefix(self.segs, self.nseg)
        # the written buffers' byte ranges, checked and kept sorted
        spans = <Span*>malloc(self.nseg * NSLOT * sizeof(Span))
        if spans == NULL:
            raise MemoryError()
        try:
            m = _collect(self.segs, self.nseg, self.itemsize, False, spans)
            _check_spans(spans, m, self.names, single, self.labels)
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
        if not _exact_float_array(g, self.typenum):
            name = _slot_name(self.names, s, GRAD, self.single, self.labels)
            if not isinstance(g, cnp.ndarray):
                raise TypeError(f"{name} must be a NumPy array, got {type(g).__name__}")
            if g.dtype.itemsize != self.itemsize or g.dtype.kind != "f" or \
                    not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>g):
                raise TypeError(f"{name} has dtype {g.dtype}, "
                                f"{_slot_name(self.names, s, 0, self.single, self.labels)} has dtype "
                                f"{'float32' if self.itemsize == 4 else 'float64'}")
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
        hi = lo + <uintptr_t>(self.segs[s].n * self.itemsize)
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
                             f"with {_slot_name(self.names, self.wseg[k], self.wslot[k], self.single, self.labels)}"
                             "; every buffer that is written must be distinct (pass a copy)")
        return 0

    def prepare(self, grads):
        """Take and check the gradients' addresses (nothing is written); ``run``
        then steps with them. ``step`` is both."""
        self._prepare(grads)

    cdef int _prepare(self, grads) except -1:
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
        self.ready = True
        return 0

    def run(self, tuple args, int nthreads):
        cdef double c[32]
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        _load_plan(c, args, self.nplan, self.kernel)
        self.ready = False
        with nogil:
            _run(self.kid, self.spec, self.segs, self.starts, self.nseg, c, nthreads)

    def step(self, grads, tuple args, int nthreads):
        cdef double c[32]
        _load_plan(c, args, self.nplan, self.kernel)
        self._prepare(grads)
        self.ready = False
        with nogil:
            _run(self.kid, self.spec, self.segs, self.starts, self.nseg, c, nthreads)


# --------------------------------------------------------------------------
# run_segments: a call over addresses the caller holds alive (fastopt.torch reads
# its tensors' data_ptr() each step). ptrs is (nseg, 2 + buffers) uintp, lengths
# (nseg,) intp; a column of zeros is an absent buffer.
# --------------------------------------------------------------------------

def run_segments(str kernel, dtype, ptrs, lengths, tuple args, int nthreads,
                 bint check=True):
    """One call over addresses: ``dtype`` is every slot's element type, or a tuple
    of one per column of ``ptrs`` (param, grad, state buffers)."""
    cdef KernelId kid
    cdef int nplan, slot
    cdef Spec spec
    cdef int types[NSLOT]
    cdef double c[32]
    cdef Py_ssize_t nseg, ncol, s, m, itemsize
    cdef const uintptr_t* P
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
    for slot in range(NSLOT):
        types[slot] = -1
        if slot < len(names):
            d = per_slot[slot]
            if not isinstance(d, cnp.dtype) or not d.isnative:
                raise TypeError(f"dtype of {names[slot]} must be a native numpy.dtype, "
                                f"got {d!r}")
            types[slot] = (<cnp.dtype>d).type_num
    spec = _spec_of(types, NSLOT)
    if spec == SPEC_NONE:
        raise TypeError("no kernel is specialised for the element types "
                        f"({', '.join(f'{n} {d}' for n, d in zip(names, per_slot))}); "
                        "every slot must be float32, or every slot float64")
    itemsize = 4 if spec == SPEC_F32 else 8
    # the tables through NumPy's C API: a memoryview costs more than a small call
    if not (type(ptrs) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>ptrs) == cnp.NPY_UINTP
            and cnp.PyArray_NDIM(<cnp.ndarray>ptrs) == 2
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>ptrs)):
        raise TypeError("ptrs must be a C-contiguous 2-D numpy.uintp array")
    if not (type(lengths) is cnp.ndarray
            and cnp.PyArray_TYPE(<cnp.ndarray>lengths) == cnp.NPY_INTP
            and cnp.PyArray_NDIM(<cnp.ndarray>lengths) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>lengths)):
        raise TypeError("lengths must be a C-contiguous 1-D numpy.intp array")
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
    if nseg == 0:
        return
    segs = <Seg*>malloc(nseg * sizeof(Seg))
    if segs == NULL:
        raise MemoryError()
    cdef Py_ssize_t lead = -1   # the first non-empty segment sets which buffers exist
    try:
        for s in range(nseg):
            if L[s] < 0:
                raise ValueError(f"lengths[{s}] is {L[s]}")
            segs[s].n = L[s]
            if L[s] > 0 and lead < 0:
                lead = s
            for slot in range(NSLOT):
                segs[s].ptr[slot] = <char*>P[s * ncol + slot] if slot < ncol else NULL
                if segs[s].n == 0 or slot >= ncol:
                    continue
                if slot <= GRAD and segs[s].ptr[slot] == NULL:
                    raise ValueError(f"{names[slot]}[{s}] is a null pointer")
                if (segs[s].ptr[slot] == NULL) != (P[lead * ncol + slot] == 0):
                    raise ValueError(f"{names[slot]} is present in some segments and "
                                     f"absent in others (segment {s})")
        starts = _prefix(segs, nseg)
        if check:
            spans = <Span*>malloc(nseg * NSLOT * sizeof(Span))
            if spans == NULL:
                raise MemoryError()
            m = _collect(segs, nseg, itemsize, True, spans)
            _check_spans(spans, m, names, False)
        with nogil:
            _run(kid, spec, segs, starts, nseg, c, nthreads)
    finally:
        free(segs)
        free(starts)
        free(spans)
