# Adafactor's passes over a matrix with factored second moments (the algorithm:
# fastopt/adafactor.py): one pass for the statistics (Σθ², and Σg² per row and per
# column), one for the update's norm, one for the update itself. Included after
# rules.pxi by _baseline.pyx and _avx2.pyx.
#
# Rows are cut into blocks of FACTORED_BLOCK rows at fixed offsets; each block sums
# into its own slots (four running sums per row for Σg² and Σθ², one column vector
# per block), and the blocks are combined in block order on the calling thread, so
# every sum is the same bit for bit for any thread count. Sums are float64 for both
# dtypes. The per-element update is computed in the parameter's dtype in torch's
# operation order: v = (r_i·c_j)/r̄, v = max(v, ε1²), u = g·(1/√v).

DEF FACTORED_BLOCK = 32

import numpy as np


cdef inline double _sum4(double a, double b, double c, double d) noexcept nogil:
    return (a + b) + (c + d)


cdef void _stats_rows(const floating* p, const floating* g, Py_ssize_t lo, Py_ssize_t hi,
                      Py_ssize_t n, double* rowsq, double* col, double* psq) noexcept nogil:
    cdef Py_ssize_t i, j, n4 = n - n % 4
    cdef double s0, s1, s2, s3, q0, q1, q2, q3, gv0, gv1, gv2, gv3, pv
    cdef const floating* gr
    cdef const floating* pr
    q0 = q1 = q2 = q3 = 0.0
    for i in range(lo, hi):
        gr = g + i * n
        pr = p + i * n
        s0 = s1 = s2 = s3 = 0.0
        for j in range(0, n4, 4):
            gv0 = gr[j] * <double>gr[j]
            gv1 = gr[j + 1] * <double>gr[j + 1]
            gv2 = gr[j + 2] * <double>gr[j + 2]
            gv3 = gr[j + 3] * <double>gr[j + 3]
            s0 = s0 + gv0
            s1 = s1 + gv1
            s2 = s2 + gv2
            s3 = s3 + gv3
            col[j] = col[j] + gv0
            col[j + 1] = col[j + 1] + gv1
            col[j + 2] = col[j + 2] + gv2
            col[j + 3] = col[j + 3] + gv3
            q0 = q0 + pr[j] * <double>pr[j]
            q1 = q1 + pr[j + 1] * <double>pr[j + 1]
            q2 = q2 + pr[j + 2] * <double>pr[j + 2]
            q3 = q3 + pr[j + 3] * <double>pr[j + 3]
        for j in range(n4, n):
            gv0 = gr[j] * <double>gr[j]
            s0 = s0 + gv0
            col[j] = col[j] + gv0
            q0 = q0 + pr[j] * <double>pr[j]
        rowsq[i] = _sum4(s0, s1, s2, s3)
    psq[0] = _sum4(q0, q1, q2, q3)


cdef inline floating _inv_root(floating r, floating c, floating rm, floating eps1sq) noexcept nogil:
    cdef floating v = r * c / rm
    cdef bint keep = (v > eps1sq) | (v != v)   # torch's clamp_(min): NaN stays NaN
    v = v if keep else eps1sq
    if floating is float:
        return 1.0 / sqrtf(v)
    else:
        return 1.0 / sqrt(v)


cdef void _norm_rows(const floating* g, const floating* r, const floating* c, floating rm,
                     floating eps1sq, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n,
                     double* out) noexcept nogil:
    cdef Py_ssize_t i, j, n4 = n - n % 4
    cdef double s0, s1, s2, s3
    cdef floating ri, u0, u1, u2, u3
    cdef const floating* gr
    s0 = s1 = s2 = s3 = 0.0
    for i in range(lo, hi):
        gr = g + i * n
        ri = r[i]
        for j in range(0, n4, 4):
            u0 = gr[j] * _inv_root(ri, c[j], rm, eps1sq)
            u1 = gr[j + 1] * _inv_root(ri, c[j + 1], rm, eps1sq)
            u2 = gr[j + 2] * _inv_root(ri, c[j + 2], rm, eps1sq)
            u3 = gr[j + 3] * _inv_root(ri, c[j + 3], rm, eps1sq)
            s0 = s0 + u0 * <double>u0
            s1 = s1 + u1 * <double>u1
            s2 = s2 + u2 * <double>u2
            s3 = s3 + u3 * <double>u3
        for j in range(n4, n):
            u0 = gr[j] * _inv_root(ri, c[j], rm, eps1sq)
            s0 = s0 + u0 * <double>u0
    out[0] = _sum4(s0, s1, s2, s3)


cdef void _update_rows(floating* p, const floating* g, const floating* r, const floating* c,
                       floating rm, floating eps1sq, floating decay, floating coef,
                       bint use_decay, Py_ssize_t lo, Py_ssize_t hi,
                       Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef floating ri, u, pv
    cdef floating* pr
    cdef const floating* gr
    for i in range(lo, hi):
        pr = p + i * n
        gr = g + i * n
        ri = r[i]
        for j in range(n):
            u = gr[j] * _inv_root(ri, c[j], rm, eps1sq)
            pv = pr[j]
            if use_decay:
                pv = pv * decay
            pr[j] = pv - coef * u


cdef inline Py_ssize_t _nblocks(Py_ssize_t m) noexcept nogil:
    return (m + FACTORED_BLOCK - 1) // FACTORED_BLOCK


def factored_stats(floating[:, ::1] p, floating[:, ::1] g, int nthreads):
    """(Σθ², Σg² per row, Σg² per column) of a matrix, float64, deterministic."""
    cdef Py_ssize_t m = p.shape[0], n = p.shape[1], nb = _nblocks(m), b, lo, hi, j
    if g.shape[0] != m or g.shape[1] != n:
        raise ValueError("p and g must have the same shape")
    rowsq = np.zeros(m, dtype=np.float64)
    cols = np.zeros((nb, n), dtype=np.float64)
    psq = np.zeros(nb, dtype=np.float64)
    cdef double[::1] R = rowsq
    cdef double[:, ::1] C = cols
    cdef double[::1] Q = psq
    cdef int nt = nthreads if m * n >= PARALLEL_MIN else 1
    if m == 0 or n == 0:
        return 0.0, rowsq, np.zeros(n, dtype=np.float64)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            lo = b * FACTORED_BLOCK
            hi = lo + FACTORED_BLOCK
            if hi > m:
                hi = m
            _stats_rows(&p[0, 0], &g[0, 0], lo, hi, n, &R[0], &C[b, 0], &Q[b])
    colsq = cols[0].copy()
    for b in range(1, nb):
        colsq += cols[b]
    total = 0.0
    for b in range(nb):
        total += psq[b]
    return total, rowsq, colsq


def factored_norm_sq(floating[:, ::1] g, floating[::1] r, floating[::1] c, double rm,
                     double eps1sq, int nthreads):
    """Σ u² with u = g·(1/√max((r_i·c_j)/rm, ε1²)), float64, deterministic."""
    cdef Py_ssize_t m = g.shape[0], n = g.shape[1], nb = _nblocks(m), b, lo, hi
    if r.shape[0] != m or c.shape[0] != n:
        raise ValueError("row/col factors do not match the matrix")
    if m == 0 or n == 0:
        return 0.0
    parts = np.zeros(nb, dtype=np.float64)
    cdef double[::1] P = parts
    cdef int nt = nthreads if m * n >= PARALLEL_MIN else 1
    cdef floating frm = <floating>rm, feps = <floating>eps1sq
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            lo = b * FACTORED_BLOCK
            hi = lo + FACTORED_BLOCK
            if hi > m:
                hi = m
            _norm_rows(&g[0, 0], &r[0], &c[0], frm, feps, lo, hi, n, &P[b])
    total = 0.0
    for b in range(nb):
        total += parts[b]
    return total


def factored_update(floating[:, ::1] p, floating[:, ::1] g, floating[::1] r,
                    floating[::1] c, double rm, double eps1sq, double decay, double coef,
                    int nthreads):
    """θ ← θ·decay − coef·u, u as in factored_norm_sq (decay skipped when 1)."""
    cdef Py_ssize_t m = p.shape[0], n = p.shape[1], nb = _nblocks(m), b, lo, hi
    if g.shape[0] != m or g.shape[1] != n or r.shape[0] != m or c.shape[0] != n:
        raise ValueError("shapes do not match")
    if m == 0 or n == 0:
        return
    cdef int nt = nthreads if m * n >= PARALLEL_MIN else 1
    cdef floating frm = <floating>rm, feps = <floating>eps1sq
    cdef floating fdecay = <floating>decay, fcoef = <floating>coef
    cdef bint use_decay = decay != 1.0
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            lo = b * FACTORED_BLOCK
            hi = lo + FACTORED_BLOCK
            if hi > m:
                hi = m
            _update_rows(&p[0, 0], &g[0, 0], &r[0], &c[0], frm, feps, fdecay, fcoef,
                         use_decay, lo, hi, n)
