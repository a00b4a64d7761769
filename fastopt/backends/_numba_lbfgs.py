"""L-BFGS's passes for the Numba CPU backend: ``fastopt/kernels/lbfgs.pxi`` again,
operation for operation, so that the two backends agree bit for bit.

Same blocks (LBFGS_BLOCK elements at fixed offsets), same LANES running sums per
block (lane = offset % LANES, the tail after the last whole group in lane 0,
combined by the same fixed tree), block results added in block order; float32 values are rounded to float32 exactly
where the C code rounds them (a float32 operand times a float32 coefficient), and
sums are kept in float64. No fastmath. The entry points take the compiled
module's arguments; ``fastopt.lbfgs`` calls them on buffers it has checked.
"""

import numba
import numpy as np
from numba import njit, prange

LBFGS_BLOCK = 4096
LANES = 16
PARALLEL_MIN = 32768  # as rules.pxi: smaller vectors run on the calling thread

NEG, AXPY, AXPY_SCALE, SCALE = 0, 1, 2, 3
COPY, CURVATURE, MOVE = 10, 11, 12

_jit = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_jit)
def _max(a, b):
    # NaN in either operand gives NaN (rules.pxi's _max)
    if (a > b) | (a != a):
        return a
    return b


@njit(**_jit)
def _val(op, x, a, c1, c2, i):
    if op == NEG:
        return -a[i]
    elif op == AXPY:
        return x[i] + c1 * a[i]
    elif op == AXPY_SCALE:
        return c2 * (x[i] + c1 * a[i])
    return c2 * x[i]


@njit(**_jit)
def _lanes_sum(acc):
    # lbfgs.pxi's fixed tree: lane j += lane j + 8, then j + 4, j + 2, j + 1
    w = LANES // 2
    while w > 0:
        for j in range(w):
            acc[j] = acc[j] + acc[j + w]
        w //= 2
    return acc[0]


@njit(**_jit)
def _lanes_max(acc):
    m = acc[0]
    for j in range(1, LANES):
        m = _max(m, acc[j])
    return m


@njit(**_jit)
def _update_dot_block(op, x, a, b, c1, c2, lo, hi, out):
    acc = np.zeros(LANES)
    i = lo
    while i + LANES <= hi:
        for j in range(LANES):
            v = _val(op, x, a, c1, c2, i + j)
            acc[j] = acc[j] + np.float64(b[i + j]) * np.float64(v)
            x[i + j] = v
        i += LANES
    while i < hi:
        v = _val(op, x, a, c1, c2, i)
        acc[0] = acc[0] + np.float64(b[i]) * np.float64(v)
        x[i] = v
        i += 1
    out[0] = _lanes_sum(acc)


@njit(**_jit)
def _copy_block(dst, src, b, has_b, lo, hi, out):
    asum = np.zeros(LANES)
    dot = np.zeros(LANES)
    mx = np.zeros(LANES)
    i = lo
    while i + LANES <= hi:
        for j in range(LANES):
            v = src[i + j]
            asum[j] = asum[j] + np.float64(abs(v))
            mx[j] = _max(mx[j], np.float64(abs(v)))
            if has_b:
                dot[j] = dot[j] + np.float64(v) * np.float64(b[i + j])
            dst[i + j] = v
        i += LANES
    while i < hi:
        v = src[i]
        asum[0] = asum[0] + np.float64(abs(v))
        mx[0] = _max(mx[0], np.float64(abs(v)))
        if has_b:
            dot[0] = dot[0] + np.float64(v) * np.float64(b[i])
        dst[i] = v
        i += 1
    out[0] = _lanes_sum(asum)
    out[1] = _lanes_sum(dot)
    out[2] = _lanes_max(mx)


@njit(**_jit)
def _curvature_block(g, gp, d, t, y, s, lo, hi, out):
    ys = np.zeros(LANES)
    yy = np.zeros(LANES)
    i = lo
    while i < hi:
        j = (i - lo) % LANES if i + (LANES - (i - lo) % LANES) <= hi else 0
        yv = g[i] - gp[i]
        sv = t * d[i]
        ys[j] = ys[j] + np.float64(yv) * np.float64(sv)
        yy[j] = yy[j] + np.float64(yv) * np.float64(yv)
        y[i] = yv
        s[i] = sv
        i += 1
    out[0] = _lanes_sum(ys)
    out[1] = _lanes_sum(yy)


@njit(**_jit)
def _move_block(p, x0, has_x0, d, t, lo, hi, out):
    mx = np.zeros(LANES)
    i = lo
    while i < hi:
        j = (i - lo) % LANES if i + (LANES - (i - lo) % LANES) <= hi else 0
        sd = t * d[i]
        if has_x0:
            p[i] = x0[i] + sd
        else:
            p[i] = p[i] + sd
        mx[j] = _max(mx[j], np.float64(abs(sd)))
        i += 1
    out[2] = _lanes_max(mx)


@njit(**_jit)
def _block(kind, op, x, x2, a, b, c, has_b, c1, c2, lo, hi, out):
    if kind == COPY:
        _copy_block(x, a, b, has_b, lo, hi, out)
    elif kind == CURVATURE:
        _curvature_block(a, b, c, c1, x, x2, lo, hi, out)
    elif kind == MOVE:
        _move_block(x, b, has_b, a, c1, lo, hi, out)
    else:
        _update_dot_block(op, x, a, b, c1, c2, lo, hi, out)


@njit(**_jit)
def _combine(part, nblk):
    r0 = r1 = r2 = 0.0
    for k in range(nblk):
        r0 = r0 + part[3 * k]
        r1 = r1 + part[3 * k + 1]
        r2 = _max(r2, part[3 * k + 2])
    return r0, r1, r2


@njit(**_jit)
def _serial(kind, op, x, x2, a, b, c, has_b, c1, c2, n, part):
    nblk = (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK
    f1 = x.dtype.type(c1)
    f2 = x.dtype.type(c2)
    for k in range(nblk):
        lo = k * LBFGS_BLOCK
        hi = min(lo + LBFGS_BLOCK, n)
        _block(kind, op, x, x2, a, b, c, has_b, f1, f2, lo, hi, part[3 * k:3 * k + 3])
    return _combine(part, nblk)


@njit(parallel=True, **_jit)
def _parallel(kind, op, x, x2, a, b, c, has_b, c1, c2, n, part):
    nblk = (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK
    f1 = x.dtype.type(c1)
    f2 = x.dtype.type(c2)
    for k in prange(nblk):
        lo = k * LBFGS_BLOCK
        hi = min(lo + LBFGS_BLOCK, n)
        _block(kind, op, x, x2, a, b, c, has_b, f1, f2, lo, hi, part[3 * k:3 * k + 3])
    return _combine(part, nblk)


def _pass(kind, op, x, x2, a, b, c, has_b, c1, c2, part, nthreads):
    n = x.shape[0]
    if n == 0:
        return 0.0, 0.0, 0.0
    if nthreads <= 1 or n < PARALLEL_MIN:
        return _serial(kind, op, x, x2, a, b, c, has_b, c1, c2, n, part)
    nthreads = min(int(nthreads), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != nthreads:
        numba.set_num_threads(nthreads)
    return _parallel(kind, op, x, x2, a, b, c, has_b, c1, c2, n, part)


# --------------------------------------------------------------------------
# Entry points, with lbfgs.pxi's signatures
# --------------------------------------------------------------------------

def lbfgs_blocks(n):
    return (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK


def _check_part(part, n):
    if part.shape[0] < 3 * lbfgs_blocks(n):
        raise ValueError(f"part has {part.shape[0]} elements; an {n}-element vector "
                         f"needs {3 * lbfgs_blocks(n)}")


def lbfgs_copy(dst, src, other, part, nthreads):
    n = dst.shape[0]
    if src.shape[0] != n or (other is not None and other.shape[0] != n):
        raise ValueError("lbfgs_copy: lengths differ")
    if src.dtype != dst.dtype or (other is not None and other.dtype != dst.dtype):
        raise TypeError("lbfgs_copy: dtypes differ")
    _check_part(part, n)
    b = dst if other is None else other
    return _pass(COPY, NEG, dst, dst, src, b, dst, other is not None, 0.0, 0.0, part,
                 nthreads)


def lbfgs_curvature(g, g_prev, d, t, y, s, part, nthreads):
    n = g.shape[0]
    if g_prev.shape[0] != n or d.shape[0] != n or y.shape[0] != n or s.shape[0] != n:
        raise ValueError("lbfgs_curvature: lengths differ")
    _check_part(part, n)
    r = _pass(CURVATURE, NEG, y, s, g, g_prev, d, False, float(t), 0.0, part, nthreads)
    return r[0], r[1]


def lbfgs_move(p, x0, d, t, part, nthreads):
    n = p.shape[0]
    if d.shape[0] != n or (x0 is not None and x0.shape[0] != n):
        raise ValueError("lbfgs_move: lengths differ")
    _check_part(part, n)
    b = p if x0 is None else x0
    return _pass(MOVE, NEG, p, p, d, b, d, x0 is not None, float(t), 0.0, part,
                 nthreads)[2]


def _update(op, x, a, b, c1, c2, part, nthreads):
    return _pass(-1, op, x, x, a, b, a, True, c1, c2, part, nthreads)[0]


def lbfgs_direction(g, d, S, Y, ro, alpha, start, count, H_diag, first, part, nthreads):
    """As lbfgs.pxi's: the direction into d (the two-loop recursion, or -g on the
    first iteration), returning g.d, in the same passes and order."""
    n, rows = g.shape[0], S.shape[0]
    if d.shape[0] != n or S.shape[1] != n or Y.shape != S.shape:
        raise ValueError("lbfgs_direction: shapes differ")
    if not (0 <= count <= rows and 0 <= start < max(rows, 1)):
        raise ValueError("lbfgs_direction: bad history bounds")
    _check_part(part, n)
    if n == 0:
        return 0.0
    if first or count == 0:
        dot = _update(NEG, d, g, g, 0.0, 0.0, part, nthreads)
        if not first:
            dot = _update(SCALE, d, g, g, 0.0, float(H_diag), part, nthreads)
        return dot
    k = (start + count - 1) % rows
    dot = _update(NEG, d, g, S[k], 0.0, 0.0, part, nthreads)
    for j in range(count - 1, -1, -1):
        k = (start + j) % rows
        alpha[k] = ro[k] * dot
        if j > 0:
            nxt = (start + j - 1) % rows
            dot = _update(AXPY, d, Y[k], S[nxt], -alpha[k], 0.0, part, nthreads)
        else:
            dot = _update(AXPY_SCALE, d, Y[k], Y[k], -alpha[k], float(H_diag), part,
                          nthreads)
    for j in range(count):
        k = (start + j) % rows
        beta = ro[k] * dot
        other = Y[(start + j + 1) % rows] if j + 1 < count else g
        dot = _update(AXPY, d, S[k], other, alpha[k] - beta, 0.0, part, nthreads)
    return dot
