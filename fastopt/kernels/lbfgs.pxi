# L-BFGS vector work (../shared/RULES.md, "Not element-wise: L-BFGS"): the
# passes of one iteration, fused so that each reads and writes every vector as
# few times as possible. Included after rules.pxi (it uses _max, _abs and
# PARALLEL_MIN from there) by _baseline.pyx and _avx2.pyx.
#
# Deterministic reductions. A vector is cut into blocks of LBFGS_BLOCK elements
# at fixed offsets. Inside a block LANES running sums take every LANES-th element
# (lane = (i - lo) % LANES; the tail after the last whole group goes to lane 0)
# and are combined as a fixed tree (lane j += lane j + 8, then j + 4, j + 2,
# j + 1); the block sums are then added in block order on the calling thread.
# Sixteen lanes are four AVX2 vectors of doubles: enough independent additions
# to hide the adder's latency, so a pass runs at memory speed. Threads only decide who computes which block, never how a
# block is summed, so a result is the same bit for bit for any thread count,
# and fastopt.backends._numba_lbfgs repeats the same order exactly.
# Sums are accumulated in float64 for both dtypes (RULES.md allows it): a
# product of two float32 values is exact in float64.
#
# The history is two (rows, n) arrays S and Y used as a ring: the pairs, oldest
# first, are rows (start + j) % rows for j < count.

DEF LBFGS_BLOCK = 4096
DEF LANES = 16

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


cdef inline void _lb_zero(double* acc) noexcept nogil:
    cdef int j
    for j in range(LANES):
        acc[j] = 0


cdef inline double _lb_sum(double* acc) noexcept nogil:
    # the lanes added as a fixed tree: (0+8, 1+9, ...), then (0+4, ...), (0+2, 1+3), 0+1
    cdef int j, w = LANES // 2
    while w > 0:
        for j in range(w):
            acc[j] = acc[j] + acc[j + w]
        w = w // 2
    return acc[0]


cdef inline double _lb_maxlanes(double* acc) noexcept nogil:
    cdef int j
    cdef double m = acc[0]
    for j in range(1, LANES):
        m = _max(m, acc[j])
    return m


cdef inline void _lb_update_dot_loop(LbfgsOp op, floating* x, const floating* a,
                                     const floating* b, floating c1, floating c2,
                                     Py_ssize_t lo, Py_ssize_t hi,
                                     double* out) noexcept nogil:
    # x[i] <- new value; out[0] = sum b[i] * x[i] over the block (lane i % LANES)
    cdef double acc[LANES]
    cdef floating vs[LANES]
    cdef double vd[LANES]
    cdef double bd[LANES]
    cdef floating v
    cdef Py_ssize_t i = lo
    cdef int j
    _lb_zero(acc)
    while i + LANES <= hi:
        # all loads, then all stores: the compiler cannot know that x, a and b
        # never overlap, and would otherwise keep each load after the last store.
        # One short loop per op (the branch is taken once per LANES elements), so
        # that each vectorises.
        if op == L_NEG:
            for j in range(LANES):
                vs[j] = -a[i + j]
        elif op == L_AXPY:
            for j in range(LANES):
                vs[j] = x[i + j] + c1 * a[i + j]
        elif op == L_AXPY_SCALE:
            for j in range(LANES):
                vs[j] = c2 * (x[i + j] + c1 * a[i + j])
        else:
            for j in range(LANES):
                vs[j] = c2 * x[i + j]
        for j in range(LANES):
            x[i + j] = vs[j]
        for j in range(LANES):
            vd[j] = vs[j]
        for j in range(LANES):
            bd[j] = b[i + j]
        for j in range(LANES):
            acc[j] = acc[j] + bd[j] * vd[j]
        i = i + LANES
    while i < hi:
        v = _lb_val(op, x, a, c1, c2, i)
        x[i] = v
        acc[0] = acc[0] + <double>b[i] * <double>v
        i = i + 1
    out[0] = _lb_sum(acc)


cdef void _lb_update_dot_block(LbfgsOp op, floating* x, const floating* a,
                               const floating* b, floating c1, floating c2, Py_ssize_t lo,
                               Py_ssize_t hi, double* out) noexcept nogil:
    # one loop per op, so that no branch is left inside a loop
    if op == L_NEG:
        _lb_update_dot_loop(L_NEG, x, a, b, c1, c2, lo, hi, out)
    elif op == L_AXPY:
        _lb_update_dot_loop(L_AXPY, x, a, b, c1, c2, lo, hi, out)
    elif op == L_AXPY_SCALE:
        _lb_update_dot_loop(L_AXPY_SCALE, x, a, b, c1, c2, lo, hi, out)
    else:
        _lb_update_dot_loop(L_SCALE, x, a, b, c1, c2, lo, hi, out)


cdef inline void _lb_copy_loop(bint has_b, floating* dst, const floating* src,
                               const floating* b, Py_ssize_t lo, Py_ssize_t hi,
                               double* out) noexcept nogil:
    cdef double asum[LANES]
    cdef double dot[LANES]
    cdef double mx[LANES]
    cdef floating v
    cdef Py_ssize_t i = lo
    cdef int j
    _lb_zero(asum)
    _lb_zero(dot)
    _lb_zero(mx)
    while i + LANES <= hi:
        for j in range(LANES):
            v = src[i + j]
            asum[j] = asum[j] + <double>_abs(v)
            mx[j] = _max(mx[j], <double>_abs(v))
            if has_b:
                dot[j] = dot[j] + <double>v * <double>b[i + j]
        for j in range(LANES):
            dst[i + j] = src[i + j]
        i = i + LANES
    while i < hi:
        v = src[i]
        dst[i] = v
        asum[0] = asum[0] + <double>_abs(v)
        mx[0] = _max(mx[0], <double>_abs(v))
        if has_b:
            dot[0] = dot[0] + <double>v * <double>b[i]
        i = i + 1
    out[0] = _lb_sum(asum)
    out[1] = _lb_sum(dot)
    out[2] = _lb_maxlanes(mx)


cdef void _lb_copy_block(floating* dst, const floating* src, const floating* b,
                         Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil:
    # dst <- src; out = [sum |src|, sum src*b (0 if b is NULL), max |src|]
    if b != NULL:
        _lb_copy_loop(True, dst, src, b, lo, hi, out)
    else:
        _lb_copy_loop(False, dst, src, b, lo, hi, out)


cdef void _lb_curvature_block(const floating* g, const floating* gp, const floating* d,
                              floating t, floating* y, floating* s, Py_ssize_t lo,
                              Py_ssize_t hi, double* out) noexcept nogil:
    # y <- g - g_prev, s <- t*d; out = [y.s, y.y]
    cdef double ys[LANES]
    cdef double yy[LANES]
    cdef floating yvs[LANES]
    cdef floating svs[LANES]
    cdef floating yv, sv
    cdef Py_ssize_t i = lo
    cdef int j
    _lb_zero(ys)
    _lb_zero(yy)
    while i + LANES <= hi:
        for j in range(LANES):
            yvs[j] = g[i + j] - gp[i + j]
            svs[j] = t * d[i + j]
        for j in range(LANES):
            ys[j] = ys[j] + <double>yvs[j] * <double>svs[j]
            yy[j] = yy[j] + <double>yvs[j] * <double>yvs[j]
        for j in range(LANES):
            y[i + j] = yvs[j]
            s[i + j] = svs[j]
        i = i + LANES
    while i < hi:
        yv = g[i] - gp[i]
        sv = t * d[i]
        y[i] = yv
        s[i] = sv
        ys[0] = ys[0] + <double>yv * <double>sv
        yy[0] = yy[0] + <double>yv * <double>yv
        i = i + 1
    out[0] = _lb_sum(ys)
    out[1] = _lb_sum(yy)


cdef void _lb_move_block(floating* p, const floating* x0, const floating* d, floating t,
                         Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil:
    # p <- p + t*d, or p <- x0 + t*d (a line-search point) when x0 is given;
    # out[2] = max |t*d|, the step's size
    cdef double mx[LANES]
    cdef floating sds[LANES]
    cdef floating ps[LANES]
    cdef floating sd
    cdef Py_ssize_t i = lo
    cdef int j
    _lb_zero(mx)
    if x0 == NULL:
        x0 = p
    while i + LANES <= hi:
        for j in range(LANES):
            sds[j] = t * d[i + j]
            ps[j] = x0[i + j] + sds[j]
            mx[j] = _max(mx[j], <double>_abs(sds[j]))
        for j in range(LANES):
            p[i + j] = ps[j]
        i = i + LANES
    while i < hi:
        sd = t * d[i]
        p[i] = x0[i] + sd
        mx[0] = _max(mx[0], <double>_abs(sd))
        i = i + 1
    out[2] = _lb_maxlanes(mx)


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

