# L-BFGS vector work (../shared/RULES.md, "Not element-wise: L-BFGS"): the
# passes of one iteration, fused so that each reads and writes every vector as
# few times as possible. Included after rules.pxi (it uses _max, _abs and
# PARALLEL_MIN from there) by _baseline.pyx and _avx2.pyx.
#
# Deterministic reductions. A vector is cut into blocks of LBFGS_BLOCK elements
# at fixed offsets. Inside a block four running sums take every fourth element
# (i = lo + 4j + lane; the tail goes to lane 0) and are combined as
# (s0 + s1) + (s2 + s3); the block sums are then added in block order on the
# calling thread. Threads only decide who computes which block, never how a
# block is summed, so a result is the same bit for bit for any thread count,
# and fastopt.backends._numba_lbfgs repeats the same order exactly.
# Sums are accumulated in float64 for both dtypes (RULES.md allows it): a
# product of two float32 values is exact in float64.
#
# The history is two (rows, n) arrays S and Y used as a ring: the pairs, oldest
# first, are rows (start + j) % rows for j < count.

DEF LBFGS_BLOCK = 4096

cdef enum LbfgsOp:
    L_NEG, L_AXPY, L_AXPY_SCALE, L_SCALE


cdef inline floating _lb_val(LbfgsOp op, const floating* x, const floating* a,
                             floating c1, floating c2, Py_ssize_t i) noexcept nogil:
    # the new value of x[i] in each fused update of the two-loop recursion
    if op == L_NEG:
        return -a[i]
    elif op == L_AXPY:
        return x[i] + c1 * a[i]
    elif op == L_AXPY_SCALE:
        return c2 * (x[i] + c1 * a[i])
    else:
        return c2 * x[i]


cdef void _lb_update_dot_block(LbfgsOp op, floating* x, const floating* a,
                               const floating* b, floating c1, floating c2, Py_ssize_t lo,
                               Py_ssize_t hi, double* out) noexcept nogil:
    # x[i] <- new value; out[0] = sum b[i] * x[i] over the block
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef floating v0, v1, v2, v3
    cdef Py_ssize_t i = lo
    while i + 4 <= hi:
        v0 = _lb_val(op, x, a, c1, c2, i)
        v1 = _lb_val(op, x, a, c1, c2, i + 1)
        v2 = _lb_val(op, x, a, c1, c2, i + 2)
        v3 = _lb_val(op, x, a, c1, c2, i + 3)
        x[i] = v0
        x[i + 1] = v1
        x[i + 2] = v2
        x[i + 3] = v3
        s0 = s0 + <double>b[i] * <double>v0
        s1 = s1 + <double>b[i + 1] * <double>v1
        s2 = s2 + <double>b[i + 2] * <double>v2
        s3 = s3 + <double>b[i + 3] * <double>v3
        i = i + 4
    while i < hi:
        v0 = _lb_val(op, x, a, c1, c2, i)
        x[i] = v0
        s0 = s0 + <double>b[i] * <double>v0
        i = i + 1
    out[0] = (s0 + s1) + (s2 + s3)


cdef void _lb_copy_block(floating* dst, const floating* src, const floating* b,
                         Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil:
    # dst <- src; out = [sum |src|, sum src*b (b may be NULL), max |src|]
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0
    cdef floating m = 0, v0, v1, v2, v3
    cdef Py_ssize_t i = lo
    while i + 4 <= hi:
        v0 = src[i]
        v1 = src[i + 1]
        v2 = src[i + 2]
        v3 = src[i + 3]
        dst[i] = v0
        dst[i + 1] = v1
        dst[i + 2] = v2
        dst[i + 3] = v3
        a0 = a0 + <double>_abs(v0)
        a1 = a1 + <double>_abs(v1)
        a2 = a2 + <double>_abs(v2)
        a3 = a3 + <double>_abs(v3)
        m = _max(_max(m, _abs(v0)), _max(_abs(v1), _max(_abs(v2), _abs(v3))))
        if b != NULL:
            d0 = d0 + <double>v0 * <double>b[i]
            d1 = d1 + <double>v1 * <double>b[i + 1]
            d2 = d2 + <double>v2 * <double>b[i + 2]
            d3 = d3 + <double>v3 * <double>b[i + 3]
        i = i + 4
    while i < hi:
        v0 = src[i]
        dst[i] = v0
        a0 = a0 + <double>_abs(v0)
        m = _max(m, _abs(v0))
        if b != NULL:
            d0 = d0 + <double>v0 * <double>b[i]
        i = i + 1
    out[0] = (a0 + a1) + (a2 + a3)
    out[1] = (d0 + d1) + (d2 + d3)
    out[2] = m


cdef void _lb_curvature_block(const floating* g, const floating* gp, const floating* d,
                              floating t, floating* y, floating* s, Py_ssize_t lo,
                              Py_ssize_t hi, double* out) noexcept nogil:
    # y <- g - g_prev, s <- t*d; out = [y.s, y.y]
    cdef double p0 = 0, p1 = 0, p2 = 0, p3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0
    cdef floating y0, y1, y2, y3, z0, z1, z2, z3
    cdef Py_ssize_t i = lo
    while i + 4 <= hi:
        y0 = g[i] - gp[i]
        y1 = g[i + 1] - gp[i + 1]
        y2 = g[i + 2] - gp[i + 2]
        y3 = g[i + 3] - gp[i + 3]
        z0 = t * d[i]
        z1 = t * d[i + 1]
        z2 = t * d[i + 2]
        z3 = t * d[i + 3]
        y[i] = y0
        y[i + 1] = y1
        y[i + 2] = y2
        y[i + 3] = y3
        s[i] = z0
        s[i + 1] = z1
        s[i + 2] = z2
        s[i + 3] = z3
        p0 = p0 + <double>y0 * <double>z0
        p1 = p1 + <double>y1 * <double>z1
        p2 = p2 + <double>y2 * <double>z2
        p3 = p3 + <double>y3 * <double>z3
        q0 = q0 + <double>y0 * <double>y0
        q1 = q1 + <double>y1 * <double>y1
        q2 = q2 + <double>y2 * <double>y2
        q3 = q3 + <double>y3 * <double>y3
        i = i + 4
    while i < hi:
        y0 = g[i] - gp[i]
        z0 = t * d[i]
        y[i] = y0
        s[i] = z0
        p0 = p0 + <double>y0 * <double>z0
        q0 = q0 + <double>y0 * <double>y0
        i = i + 1
    out[0] = (p0 + p1) + (p2 + p3)
    out[1] = (q0 + q1) + (q2 + q3)


cdef void _lb_move_block(floating* p, const floating* x0, const floating* d, floating t,
                         Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil:
    # p <- p + t*d, or p <- x0 + t*d (a line-search point) when x0 is given;
    # out[2] = max |t*d|, the step's size
    cdef floating m = 0, sd
    cdef Py_ssize_t i
    if x0 == NULL:
        for i in range(lo, hi):
            sd = t * d[i]
            p[i] = p[i] + sd
            m = _max(m, _abs(sd))
        out[2] = m
    else:
        for i in range(lo, hi):
            sd = t * d[i]
            p[i] = x0[i] + sd
            m = _max(m, _abs(sd))
        out[2] = m


cdef enum LbfgsPass:
    P_UPDATE_DOT, P_COPY, P_CURVATURE, P_MOVE


cdef inline void _lb_block(LbfgsPass kind, LbfgsOp op, floating* x, floating* x2,
                           const floating* a, const floating* b, const floating* c,
                           floating c1, floating c2, Py_ssize_t lo, Py_ssize_t hi,
                           double* out) noexcept nogil:
    if kind == P_UPDATE_DOT:
        _lb_update_dot_block(op, x, a, b, c1, c2, lo, hi, out)
    elif kind == P_COPY:
        _lb_copy_block(x, a, b, lo, hi, out)
    elif kind == P_CURVATURE:
        _lb_curvature_block(a, b, c, c1, x, x2, lo, hi, out)
    else:
        _lb_move_block(x, b, a, c1, lo, hi, out)


cdef void _lb_pass(LbfgsPass kind, LbfgsOp op, floating* x, floating* x2,
                   const floating* a, const floating* b, const floating* c, double c1,
                   double c2, Py_ssize_t n, int nthreads, double* part,
                   double* res) noexcept nogil:
    # One pass over n elements; res = [sum of out[0], sum of out[1], max of out[2]]
    # over the blocks, in block order.
    cdef Py_ssize_t nblk = (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK, k, lo, hi
    cdef floating fc1 = <floating>c1, fc2 = <floating>c2
    cdef double r0 = 0, r1 = 0, r2 = 0
    if nthreads <= 1 or n < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        for k in range(nblk):
            lo = k * LBFGS_BLOCK
            hi = lo + LBFGS_BLOCK
            if hi > n:
                hi = n
            _lb_block(kind, op, x, x2, a, b, c, fc1, fc2, lo, hi, &part[3 * k])
    else:
        for k in prange(nblk, schedule="static", num_threads=nthreads):
            lo = k * LBFGS_BLOCK
            hi = lo + LBFGS_BLOCK
            if hi > n:
                hi = n
            _lb_block(kind, op, x, x2, a, b, c, fc1, fc2, lo, hi, &part[3 * k])
    for k in range(nblk):
        r0 = r0 + part[3 * k]
        r1 = r1 + part[3 * k + 1]
        r2 = _max(r2, part[3 * k + 2])
    res[0] = r0
    res[1] = r1
    res[2] = r2


# --------------------------------------------------------------------------
# Entry points, called by fastopt.lbfgs.LBFGSCore on its own buffers (allocated
# once, checked there): every array is C-contiguous, of one dtype and length n.
# ``part`` is float64 scratch of at least 3 * lbfgs_blocks(n) elements.
# --------------------------------------------------------------------------

def lbfgs_blocks(Py_ssize_t n):
    """The number of reduction blocks of an n-element vector."""
    return (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK


cdef inline void _lb_check_part(double[::1] part, Py_ssize_t n) except *:
    if part.shape[0] < 3 * ((n + LBFGS_BLOCK - 1) // LBFGS_BLOCK):
        raise ValueError(f"part has {part.shape[0]} elements; an {n}-element vector "
                         f"needs {3 * ((n + LBFGS_BLOCK - 1) // LBFGS_BLOCK)}")


def lbfgs_copy(floating[::1] dst, const floating[::1] src, const floating[::1] other,
               double[::1] part, int nthreads):
    """dst <- src; returns (sum |src|, src . other (0 if other is None), max |src|).
    The max is NaN if src holds a NaN."""
    cdef Py_ssize_t n = dst.shape[0]
    cdef double res[3]
    cdef const floating* b = NULL
    if src.shape[0] != n or (other is not None and other.shape[0] != n):
        raise ValueError("lbfgs_copy: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0, 0.0, 0.0
    if other is not None:
        b = &other[0]
    with nogil:
        _lb_pass(P_COPY, L_NEG, &dst[0], NULL, &src[0], b, NULL, 0, 0, n, nthreads,
                 &part[0], res)
    return res[0], res[1], res[2]


def lbfgs_curvature(const floating[::1] g, const floating[::1] g_prev,
                    const floating[::1] d, double t, floating[::1] y, floating[::1] s,
                    double[::1] part, int nthreads):
    """y <- g - g_prev, s <- t*d (t rounded to the dtype); returns (y.s, y.y)."""
    cdef Py_ssize_t n = g.shape[0]
    cdef double res[3]
    if g_prev.shape[0] != n or d.shape[0] != n or y.shape[0] != n or s.shape[0] != n:
        raise ValueError("lbfgs_curvature: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0, 0.0
    with nogil:
        _lb_pass(P_CURVATURE, L_NEG, &y[0], &s[0], &g[0], &g_prev[0], &d[0], t, 0, n,
                 nthreads, &part[0], res)
    return res[0], res[1]


def lbfgs_move(floating[::1] p, const floating[::1] x0, const floating[::1] d, double t,
               double[::1] part, int nthreads):
    """p <- p + t*d (x0 None) or p <- x0 + t*d; returns max |t*d| (NaN if any
    t*d is NaN). t is rounded to the dtype first."""
    cdef Py_ssize_t n = p.shape[0]
    cdef double res[3]
    cdef const floating* b = NULL
    if d.shape[0] != n or (x0 is not None and x0.shape[0] != n):
        raise ValueError("lbfgs_move: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0
    if x0 is not None:
        b = &x0[0]
    with nogil:
        _lb_pass(P_MOVE, L_NEG, &p[0], NULL, &d[0], b, NULL, t, 0, n, nthreads, &part[0],
                 res)
    return res[2]


cdef double _lb_two_loop(const floating* g, floating* d, floating* S, floating* Y,
                         const double* ro, double* alpha, Py_ssize_t start,
                         Py_ssize_t count, Py_ssize_t rows, double H_diag, Py_ssize_t n,
                         int nthreads, double* part, double* res) noexcept nogil:
    cdef Py_ssize_t j, k, nxt
    cdef double dot, beta
    # q = -g, with s_newest . q
    k = (start + count - 1) % rows
    _lb_pass(P_UPDATE_DOT, L_NEG, d, NULL, g, S + k * n, NULL, 0, 0, n,
             nthreads, part, res)
    dot = res[0]
    j = count - 1
    while j >= 0:
        k = (start + j) % rows
        alpha[k] = ro[k] * dot
        if j > 0:
            # q <- q - a_j y_j, with s_{j-1} . q
            nxt = (start + j - 1) % rows
            _lb_pass(P_UPDATE_DOT, L_AXPY, d, NULL, Y + k * n, S + nxt * n, NULL,
                     -alpha[k], 0, n, nthreads, part, res)
        else:
            # r <- H_diag (q - a_0 y_0), with y_0 . r
            _lb_pass(P_UPDATE_DOT, L_AXPY_SCALE, d, NULL, Y + k * n, Y + k * n,
                     NULL, -alpha[k], H_diag, n, nthreads, part, res)
        dot = res[0]
        j = j - 1
    for j in range(count):
        k = (start + j) % rows
        beta = ro[k] * dot
        # r <- r + (a_j - b_j) s_j, with y_{j+1} . r (g . d after the newest)
        if j + 1 < count:
            nxt = (start + j + 1) % rows
            _lb_pass(P_UPDATE_DOT, L_AXPY, d, NULL, S + k * n, Y + nxt * n, NULL,
                     alpha[k] - beta, 0, n, nthreads, part, res)
        else:
            _lb_pass(P_UPDATE_DOT, L_AXPY, d, NULL, S + k * n, g, NULL,
                     alpha[k] - beta, 0, n, nthreads, part, res)
        dot = res[0]
    return dot


def lbfgs_direction(const floating[::1] g, floating[::1] d, floating[:, ::1] S,
                    floating[:, ::1] Y, const double[::1] ro, double[::1] alpha,
                    Py_ssize_t start, Py_ssize_t count, double H_diag, bint first,
                    double[::1] part, int nthreads):
    """The search direction into d, and returns g.d.

    first: d <- -g. Otherwise the two-loop recursion over the ``count`` pairs
    (rows (start + j) % rows of S and Y, oldest first, ro[j] = 1/(y.s) in the
    same row numbering): q <- -g; newest to oldest a_j = ro_j s_j.q,
    q <- q - a_j y_j; r <- H_diag q; oldest to newest b_j = ro_j y_j.r,
    r <- r + (a_j - b_j) s_j; d <- r. Every dot is fused into the pass that
    writes the vector it reads, so the recursion makes 2*count + 1 passes over
    n (2 when count is 0), each reading two vectors and updating d.
    """
    cdef Py_ssize_t n = g.shape[0], rows = S.shape[0]
    cdef double res[3]
    cdef double dot
    if d.shape[0] != n or S.shape[1] != n or Y.shape[1] != n or Y.shape[0] != rows:
        raise ValueError("lbfgs_direction: shapes differ")
    if not 0 <= count <= rows or not 0 <= start < max(rows, 1) or ro.shape[0] < rows \
            or alpha.shape[0] < rows:
        raise ValueError("lbfgs_direction: bad history bounds")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0
    with nogil:
        if first or count == 0:
            # d = -g; after the first iteration, with no pair kept, d = H_diag * -g
            _lb_pass(P_UPDATE_DOT, L_NEG, &d[0], NULL, &g[0], &g[0], NULL, 0, 0, n,
                     nthreads, &part[0], res)
            if not first:
                _lb_pass(P_UPDATE_DOT, L_SCALE, &d[0], NULL, &g[0], &g[0], NULL, 0,
                         H_diag, n, nthreads, &part[0], res)
            dot = res[0]
            count = 0
        else:
            dot = _lb_two_loop(&g[0], &d[0], &S[0, 0], &Y[0, 0], &ro[0], &alpha[0],
                               start, count, rows, H_diag, n, nthreads, &part[0], res)
    return dot

