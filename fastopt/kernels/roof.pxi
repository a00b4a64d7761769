# The memory-bandwidth roof `fastopt bench` divides by. Included after the rule
# kernels in _baseline.pyx and _avx2.pyx, so it is compiled with the same flags,
# the same OpenMP runtime and the same threading policy as the engine (contiguous
# chunks aligned to 16 elements, one per thread, no parallel region below
# PARALLEL_MIN elements or with one thread).
#
#   triad(a, b, c, s, nthreads):  a[i] = b[i] + s*c[i]      (STREAM "triad")
#   axpy(a, c, s, nthreads):      a[i] = a[i] + s*c[i]      (read-modify-write)
#
# What is counted. triad reads b and c and writes a. The stores are ordinary
# (not non-temporal), so the CPU first reads every line of a into cache (the
# write-allocate) and later writes it back: 4 streams of memory traffic per
# element, 4*itemsize bytes, although STREAM's convention counts 3. The
# benchmark counts 4, because the optimizer kernels' bytes/element (the registry's
# bytes_per_element) count real traffic too: every buffer they write they have
# also read (param and state are updated in place), so they pay no write-allocate. axpy, whose
# written buffer is also read, moves 3*itemsize bytes with no write-allocate;
# its GB/s checks that triad's 4-stream count is the right one.

cdef void _triad_chunk(floating* a, const floating* b, const floating* c, floating s,
                       Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(lo, hi):
        a[i] = b[i] + s * c[i]


cdef void _axpy_chunk(floating* a, const floating* c, floating s,
                      Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(lo, hi):
        a[i] = a[i] + s * c[i]


cdef void _roof_run(bint is_triad, floating* a, const floating* b, const floating* c,
                    floating s, Py_ssize_t n, int nthreads) noexcept nogil:
    cdef Py_ssize_t chunk, nchunks, k, lo, hi
    if nthreads <= 1 or n < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        if is_triad:
            _triad_chunk(a, b, c, s, 0, n)
        else:
            _axpy_chunk(a, c, s, 0, n)
        return
    chunk = ((n + nthreads - 1) // nthreads + 15) & ~(<Py_ssize_t>15)
    nchunks = (n + chunk - 1) // chunk
    for k in prange(nchunks, schedule="static", num_threads=nthreads):
        lo = k * chunk
        hi = lo + chunk
        if hi > n:
            hi = n
        if is_triad:
            _triad_chunk(a, b, c, s, lo, hi)
        else:
            _axpy_chunk(a, c, s, lo, hi)


def triad(floating[::1] a, floating[::1] b, floating[::1] c, double scalar,
          int nthreads):
    """a = b + scalar*c over 1-D contiguous float32/float64 arrays of one length,
    threaded like the rule kernels. Moves 4*itemsize bytes per element (b, c read;
    a write-allocated then written)."""
    cdef Py_ssize_t n = a.shape[0]
    if b.shape[0] != n or c.shape[0] != n:
        raise ValueError(f"triad: lengths differ ({n}, {b.shape[0]}, {c.shape[0]})")
    if n == 0:
        return
    with nogil:
        _roof_run(True, &a[0], &b[0], &c[0], <floating>scalar, n, nthreads)


def axpy(floating[::1] a, floating[::1] c, double scalar, int nthreads):
    """a += scalar*c in place, threaded like the rule kernels. Moves 3*itemsize
    bytes per element (a read and written, c read; no write-allocate)."""
    cdef Py_ssize_t n = a.shape[0]
    if c.shape[0] != n:
        raise ValueError(f"axpy: lengths differ ({n}, {c.shape[0]})")
    if n == 0:
        return
    with nogil:
        _roof_run(False, &a[0], &c[0], &c[0], <floating>scalar, n, nthreads)
