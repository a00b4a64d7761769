"""L-BFGS's passes for the Numba CPU backend: ``fastopt/kernels/lbfgs.pxi`` again,
operation for operation, so that the two backends agree bit for bit.

Same blocks (LBFGS_BLOCK elements at fixed offsets), same four running sums per
block (lane = offset % 4, the tail in lane 0, combined as (s0 + s1) + (s2 + s3)),
block results added in block order; float32 values are rounded to float32 exactly
where the C code rounds them (a float32 operand times a float32 coefficient), and
sums are kept in float64. No fastmath. The entry points take the compiled
module's arguments; ``fastopt.lbfgs`` calls them on buffers it has checked.
"""

import numba
import numpy as np
from numba import njit, prange

LBFGS_BLOCK = 4096
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
def _update_dot_block(op, x, a, b, c1, c2, lo, hi, out):
    s0 = s1 = s2 = s3 = 0.0
    i = lo
    while i + 4 <= hi:
        v0 = _val(op, x, a, c1, c2, i)
        v1 = _val(op, x, a, c1, c2, i + 1)
        v2 = _val(op, x, a, c1, c2, i + 2)
        v3 = _val(op, x, a, c1, c2, i + 3)
        x[i] = v0
        x[i + 1] = v1
        x[i + 2] = v2
        x[i + 3] = v3
        s0 = s0 + np.float64(b[i]) * np.float64(v0)
        s1 = s1 + np.float64(b[i + 1]) * np.float64(v1)
        s2 = s2 + np.float64(b[i + 2]) * np.float64(v2)
        s3 = s3 + np.float64(b[i + 3]) * np.float64(v3)
        i += 4
    while i < hi:
        v0 = _val(op, x, a, c1, c2, i)
        x[i] = v0
        s0 = s0 + np.float64(b[i]) * np.float64(v0)
        i += 1
    out[0] = (s0 + s1) + (s2 + s3)


@njit(**_jit)
def _copy_block(dst, src, b, has_b, lo, hi, out):
    a0 = a1 = a2 = a3 = 0.0
    d0 = d1 = d2 = d3 = 0.0
    m = dst.dtype.type(0)
    i = lo
    while i + 4 <= hi:
        v0 = src[i]
        v1 = src[i + 1]
        v2 = src[i + 2]
        v3 = src[i + 3]
        dst[i] = v0
        dst[i + 1] = v1
        dst[i + 2] = v2
        dst[i + 3] = v3
        a0 = a0 + np.float64(abs(v0))
        a1 = a1 + np.float64(abs(v1))
        a2 = a2 + np.float64(abs(v2))
        a3 = a3 + np.float64(abs(v3))
        m = _max(_max(m, abs(v0)), _max(abs(v1), _max(abs(v2), abs(v3))))
        if has_b:
            d0 = d0 + np.float64(v0) * np.float64(b[i])
            d1 = d1 + np.float64(v1) * np.float64(b[i + 1])
            d2 = d2 + np.float64(v2) * np.float64(b[i + 2])
            d3 = d3 + np.float64(v3) * np.float64(b[i + 3])
        i += 4
    while i < hi:
        v0 = src[i]
        dst[i] = v0
        a0 = a0 + np.float64(abs(v0))
        m = _max(m, abs(v0))
        if has_b:
            d0 = d0 + np.float64(v0) * np.float64(b[i])
        i += 1
    out[0] = (a0 + a1) + (a2 + a3)
    out[1] = (d0 + d1) + (d2 + d3)
    out[2] = np.float64(m)


@njit(**_jit)
def _curvature_block(g, gp, d, t, y, s, lo, hi, out):
    p0 = p1 = p2 = p3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    i = lo
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
        p0 = p0 + np.float64(y0) * np.float64(z0)
        p1 = p1 + np.float64(y1) * np.float64(z1)
        p2 = p2 + np.float64(y2) * np.float64(z2)
        p3 = p3 + np.float64(y3) * np.float64(z3)
        q0 = q0 + np.float64(y0) * np.float64(y0)
        q1 = q1 + np.float64(y1) * np.float64(y1)
        q2 = q2 + np.float64(y2) * np.float64(y2)
        q3 = q3 + np.float64(y3) * np.float64(y3)
        i += 4
    while i < hi:
        y0 = g[i] - gp[i]
        z0 = t * d[i]
        y[i] = y0
        s[i] = z0
        p0 = p0 + np.float64(y0) * np.float64(z0)
        q0 = q0 + np.float64(y0) * np.float64(y0)
        i += 1
    out[0] = (p0 + p1) + (p2 + p3)
    out[1] = (q0 + q1) + (q2 + q3)


@njit(**_jit)
def _move_block(p, x0, has_x0, d, t, lo, hi, out):
    m = p.dtype.type(0)
    for i in range(lo, hi):
        sd = t * d[i]
        if has_x0:
            p[i] = x0[i] + sd
        else:
            p[i] = p[i] + sd
        m = _max(m, abs(sd))
    out[2] = np.float64(m)


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
