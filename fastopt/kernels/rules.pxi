# The compiled kernels: one fused single-pass loop per rule, float32 and float64
# from one body (`floating`). Included by _baseline.pyx and _avx2.pyx, which are
# the same source compiled for two instruction sets; fastopt.backends.compiled
# picks one at import time.
#
# Layout of each rule:
#   _<rule>_chunk   the per-element math over [lo, hi), coefficients from c[]
#   <rule>          the Python entry: checks the buffers, casts the per-step
#                   scalars once, releases the GIL and runs the chunks
# The math mirrors ../shared/RULES.md term by term, in the operation order the
# tests' NumPy reference uses, so the two agree bit for bit. No FMA contraction
# (-ffp-contract=off): every element then rounds the same way whichever thread,
# SIMD lane or scalar tail computes it, so results do not depend on the thread
# count or the instruction set.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, fabs, fabsf
from libc.stdint cimport uintptr_t

cdef extern from "fastopt_runtime.h" nogil:
    int FASTOPT_HAVE_OPENMP
    const char* FASTOPT_ISA
    int fastopt_max_threads()
    int fastopt_cpu_has_avx2_fma()
    unsigned int fastopt_fpu_enter(int flush)
    void fastopt_fpu_leave(int flush, unsigned int saved)

# Below this many elements a call runs on the calling thread: starting a
# parallel region costs more than the work.
DEF PARALLEL_MIN = 32768

cdef enum RuleId:
    R_SGD, R_ADAM, R_ADAGRAD, R_RMSPROP, R_ADADELTA, R_ADAMAX, R_NADAM, R_RADAM,
    R_ASGD, R_RPROP, R_LION

HAVE_OPENMP = bool(FASTOPT_HAVE_OPENMP)
ISA = FASTOPT_ISA.decode()


# Subnormal inputs and results flush to zero inside the kernels (FTZ|DAZ on each
# thread, restored afterwards) unless switched off: the IEEE result then differs
# only where a value is below the normal range (< 1.2e-38 in float32).
cdef int _flush_denormals = 1


def set_flush_denormals(bint on):
    global _flush_denormals
    _flush_denormals = on


def get_flush_denormals():
    return bool(_flush_denormals)


def cpu_has_avx2_fma():
    return bool(fastopt_cpu_has_avx2_fma())


def max_threads():
    return fastopt_max_threads()


# --------------------------------------------------------------------------
# Element helpers. NaN must survive every one of them, as it does in torch.
# --------------------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _abs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline floating _max(floating a, floating b) noexcept nogil:
    # torch.maximum / amax: NaN in either operand gives NaN. Bitwise | (not `or`):
    # no short-circuit branch, so the loops around it vectorise (compare + blend)
    cdef bint take_a = (a > b) | (a != a)
    return a if take_a else b


cdef inline floating _sign(floating x) noexcept nogil:
    # torch.sign: 1, -1, and 0 for ±0 and NaN (so Rprop skips a NaN gradient,
    # as torch does; Lion follows the same sign)
    cdef floating one = 1, zero = 0
    return one if x > 0 else (-one if x < 0 else zero)


# --------------------------------------------------------------------------
# Per-element math, one chunk function per rule
# --------------------------------------------------------------------------

cdef void _sgd_chunk(floating* p, const floating* g, floating* b, floating* unused1,
                     floating* unused2, const double* c, Py_ssize_t lo,
                     Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c[0], wd = <floating>c[1], decay = <floating>c[2]
    cdef floating mom = <floating>c[3], omd = <floating>c[4]
    cdef bint nesterov = c[5] != 0, first = c[6] != 0, maximize = c[7] != 0
    cdef bint use_wd = c[1] != 0, use_decay = c[2] != 1
    cdef Py_ssize_t i
    cdef floating gi, bi
    if b == NULL:
        for i in range(lo, hi):
            gi = -g[i] if maximize else g[i]
            if use_decay:
                p[i] = p[i] * decay
            if use_wd:
                gi = gi + wd * p[i]
            p[i] = p[i] - lr * gi
    else:
        for i in range(lo, hi):
            gi = -g[i] if maximize else g[i]
            if use_decay:
                p[i] = p[i] * decay
            if use_wd:
                gi = gi + wd * p[i]
            bi = gi if first else mom * b[i] + omd * gi
            b[i] = bi
            gi = gi + mom * bi if nesterov else bi
            p[i] = p[i] - lr * gi


cdef void _adam_chunk(floating* p, const floating* g, floating* m, floating* v,
                      floating* vmax, const double* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating step_size = <floating>c[0], omb1 = <floating>c[1]
    cdef floating b2 = <floating>c[2], omb2 = <floating>c[3], inv_bc2s = <floating>c[4]
    cdef floating eps = <floating>c[5], wd = <floating>c[6], decay = <floating>c[7]
    cdef bint maximize = c[8] != 0, use_wd = c[6] != 0, use_decay = c[7] != 1
    cdef Py_ssize_t i
    cdef floating gi, mi, vi, vm
    # 1/√bc2 is a multiplier, computed once in float64: one division per element
    # fewer than √v/√bc2 (the divider, not memory, bounds Adam in cache: 1.5x)
    if vmax == NULL:
        for i in range(lo, hi):
            gi = -g[i] if maximize else g[i]
            if use_decay:
                p[i] = p[i] * decay
            if use_wd:
                gi = gi + wd * p[i]
            mi = m[i] + omb1 * (gi - m[i])
            vi = b2 * v[i] + omb2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - step_size * mi / (_sqrt(vi) * inv_bc2s + eps)
    else:
        for i in range(lo, hi):
            gi = -g[i] if maximize else g[i]
            if use_decay:
                p[i] = p[i] * decay
            if use_wd:
                gi = gi + wd * p[i]
            mi = m[i] + omb1 * (gi - m[i])
            vi = b2 * v[i] + omb2 * gi * gi
            vm = _max(vmax[i], vi)
            m[i] = mi
            v[i] = vi
            vmax[i] = vm
            p[i] = p[i] - step_size * mi / (_sqrt(vm) * inv_bc2s + eps)


cdef void _adagrad_chunk(floating* p, const floating* g, floating* s, floating* unused1,
                         floating* unused2, const double* c, Py_ssize_t lo,
                         Py_ssize_t hi) noexcept nogil:
    cdef floating clr = <floating>c[0], eps = <floating>c[1], wd = <floating>c[2]
    cdef bint maximize = c[3] != 0, use_wd = c[2] != 0
    cdef Py_ssize_t i
    cdef floating gi, si
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_wd:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s[i] = si
        p[i] = p[i] - clr * gi / (_sqrt(si) + eps)


cdef inline void _rmsprop_loop(floating* p, const floating* g, floating* v, floating* b,
                               floating* ga, floating lr, floating alpha, floating oma,
                               floating eps, floating wd, floating mom, bint maximize,
                               bint use_wd, bint has_b, bint has_ga, Py_ssize_t lo,
                               Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, vi, gai, avg, bi
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_wd:
            gi = gi + wd * p[i]
        vi = alpha * v[i] + oma * gi * gi
        v[i] = vi
        if has_ga:
            gai = ga[i] + oma * (gi - ga[i])
            ga[i] = gai
            avg = _sqrt(vi - gai * gai) + eps
        else:
            avg = _sqrt(vi) + eps
        if has_b:
            bi = mom * b[i] + gi / avg
            b[i] = bi
            p[i] = p[i] - lr * bi
        else:
            p[i] = p[i] - lr * gi / avg


cdef void _rmsprop_chunk(floating* p, const floating* g, floating* v, floating* b,
                         floating* ga, const double* c, Py_ssize_t lo,
                         Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c[0], alpha = <floating>c[1], oma = <floating>c[2]
    cdef floating eps = <floating>c[3], wd = <floating>c[4], mom = <floating>c[5]
    cdef bint maximize = c[6] != 0, use_wd = c[4] != 0
    # one loop per buffer set, the flags constant inside each: every variant vectorises
    if b == NULL and ga == NULL:
        _rmsprop_loop(p, g, v, b, ga, lr, alpha, oma, eps, wd, mom, maximize, use_wd,
                      False, False, lo, hi)
    elif ga == NULL:
        _rmsprop_loop(p, g, v, b, ga, lr, alpha, oma, eps, wd, mom, maximize, use_wd,
                      True, False, lo, hi)
    elif b == NULL:
        _rmsprop_loop(p, g, v, b, ga, lr, alpha, oma, eps, wd, mom, maximize, use_wd,
                      False, True, lo, hi)
    else:
        _rmsprop_loop(p, g, v, b, ga, lr, alpha, oma, eps, wd, mom, maximize, use_wd,
                      True, True, lo, hi)


cdef void _adadelta_chunk(floating* p, const floating* g, floating* v, floating* u,
                          floating* unused, const double* c, Py_ssize_t lo,
                          Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c[0], rho = <floating>c[1], omr = <floating>c[2]
    cdef floating eps = <floating>c[3], wd = <floating>c[4]
    cdef bint maximize = c[5] != 0, use_wd = c[4] != 0
    cdef Py_ssize_t i
    cdef floating gi, vi, delta
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_wd:
            gi = gi + wd * p[i]
        vi = rho * v[i] + omr * gi * gi
        v[i] = vi
        delta = _sqrt(u[i] + eps) / _sqrt(vi + eps) * gi
        u[i] = rho * u[i] + omr * delta * delta
        p[i] = p[i] - lr * delta


cdef void _adamax_chunk(floating* p, const floating* g, floating* m, floating* u,
                        floating* unused, const double* c, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    cdef floating clr = <floating>c[0], omb1 = <floating>c[1], b2 = <floating>c[2]
    cdef floating eps = <floating>c[3], wd = <floating>c[4]
    cdef bint maximize = c[5] != 0, use_wd = c[4] != 0
    cdef Py_ssize_t i
    cdef floating gi, mi, ui
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_wd:
            gi = gi + wd * p[i]
        mi = m[i] + omb1 * (gi - m[i])
        ui = _max(b2 * u[i], _abs(gi) + eps)
        m[i] = mi
        u[i] = ui
        p[i] = p[i] - clr * mi / ui


cdef void _nadam_chunk(floating* p, const floating* g, floating* m, floating* v,
                       floating* unused, const double* c, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef floating gcoef = <floating>c[0], mcoef = <floating>c[1], omb1 = <floating>c[2]
    cdef floating b2 = <floating>c[3], omb2 = <floating>c[4], bc2 = <floating>c[5]
    cdef floating eps = <floating>c[6], wd = <floating>c[7], decay = <floating>c[8]
    cdef bint maximize = c[9] != 0, use_wd = c[7] != 0, use_decay = c[8] != 1
    cdef Py_ssize_t i
    cdef floating gi, mi, vi, denom, pi
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_decay:
            p[i] = p[i] * decay
        if use_wd:
            gi = gi + wd * p[i]
        mi = m[i] + omb1 * (gi - m[i])
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        denom = _sqrt(vi / bc2) + eps
        pi = p[i] - gcoef * gi / denom
        p[i] = pi - mcoef * mi / denom


cdef void _radam_chunk(floating* p, const floating* g, floating* m, floating* v,
                       floating* unused, const double* c, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c[0], bc1 = <floating>c[1], bc2s = <floating>c[2]
    cdef floating rect = <floating>c[3]
    cdef bint rectified = c[4] != 0
    cdef floating omb1 = <floating>c[5], b2 = <floating>c[6], omb2 = <floating>c[7]
    cdef floating eps = <floating>c[8], wd = <floating>c[9], decay = <floating>c[10]
    cdef bint maximize = c[11] != 0, use_wd = c[9] != 0, use_decay = c[10] != 1
    cdef Py_ssize_t i
    cdef floating gi, mi, vi
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_decay:
            p[i] = p[i] * decay
        if use_wd:
            gi = gi + wd * p[i]
        mi = m[i] + omb1 * (gi - m[i])
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        if rectified:
            p[i] = p[i] - mi / bc1 * lr * (bc2s / (_sqrt(vi) + eps)) * rect
        else:
            p[i] = p[i] - mi / bc1 * lr


cdef void _asgd_chunk(floating* p, const floating* g, floating* ax, floating* unused1,
                      floating* unused2, const double* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating eta = <floating>c[0], decay = <floating>c[1], mu = <floating>c[2]
    cdef floating wd = <floating>c[3]
    cdef bint maximize = c[4] != 0, use_wd = c[3] != 0, average = c[2] != 1
    cdef Py_ssize_t i
    cdef floating gi, pi
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_wd:
            gi = gi + wd * p[i]
        pi = p[i] * decay
        pi = pi - eta * gi
        p[i] = pi
        ax[i] = ax[i] + (pi - ax[i]) * mu if average else pi


cdef void _rprop_chunk(floating* p, const floating* g, floating* prev, floating* step,
                       floating* unused, const double* c, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef floating etaminus = <floating>c[0], etaplus = <floating>c[1]
    cdef floating smin = <floating>c[2], smax = <floating>c[3], one = 1, zero = 0
    cdef bint maximize = c[4] != 0
    cdef Py_ssize_t i
    cdef floating gi, s, factor, st
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        s = gi * prev[i]
        # torch: sign(s) with sign(NaN) = 0, so NaN takes the factor 1
        factor = etaplus if s > 0 else (etaminus if s < 0 else one)
        st = step[i] * factor
        st = smin if st < smin else (smax if st > smax else st)
        step[i] = st
        gi = zero if s < 0 else gi
        p[i] = p[i] - _sign(gi) * st
        prev[i] = gi


cdef void _lion_chunk(floating* p, const floating* g, floating* m, floating* unused1,
                      floating* unused2, const double* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c[0], b1 = <floating>c[1], omb1 = <floating>c[2]
    cdef floating b2 = <floating>c[3], omb2 = <floating>c[4], decay = <floating>c[5]
    cdef bint maximize = c[6] != 0, use_decay = c[5] != 1
    cdef Py_ssize_t i
    cdef floating gi, ci
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_decay:
            p[i] = p[i] * decay
        ci = b1 * m[i] + omb1 * gi
        p[i] = p[i] - lr * _sign(ci)
        m[i] = b2 * m[i] + omb2 * gi


# --------------------------------------------------------------------------
# The one threading policy: contiguous chunks, one per thread, aligned to 16
# elements (64 bytes of float32) so every thread but the last runs whole
# vectors; below PARALLEL_MIN or with one thread, no parallel region at all.
# --------------------------------------------------------------------------

cdef inline void _chunk(RuleId rule, floating* p, const floating* g, floating* s0,
                        floating* s1, floating* s2, const double* c, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    if rule == R_SGD:
        _sgd_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_ADAM:
        _adam_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_ADAGRAD:
        _adagrad_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_RMSPROP:
        _rmsprop_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_ADADELTA:
        _adadelta_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_ADAMAX:
        _adamax_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_NADAM:
        _nadam_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_RADAM:
        _radam_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_ASGD:
        _asgd_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_RPROP:
        _rprop_chunk(p, g, s0, s1, s2, c, lo, hi)
    elif rule == R_LION:
        _lion_chunk(p, g, s0, s1, s2, c, lo, hi)


cdef void _run(RuleId rule, floating* p, const floating* g, floating* s0, floating* s1,
               floating* s2, const double* c, Py_ssize_t n, int nthreads) noexcept nogil:
    cdef Py_ssize_t chunk, nchunks, k, lo, hi
    cdef int flush = _flush_denormals
    cdef unsigned int saved
    if nthreads <= 1 or n < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        saved = fastopt_fpu_enter(flush)
        _chunk(rule, p, g, s0, s1, s2, c, 0, n)
        fastopt_fpu_leave(flush, saved)
        return
    chunk = ((n + nthreads - 1) // nthreads + 15) & ~(<Py_ssize_t>15)
    nchunks = (n + chunk - 1) // chunk
    for k in prange(nchunks, schedule="static", num_threads=nthreads):
        lo = k * chunk
        hi = lo + chunk
        if hi > n:
            hi = n
        saved = fastopt_fpu_enter(flush)  # each worker has its own MXCSR
        _chunk(rule, p, g, s0, s1, s2, c, lo, hi)
        fastopt_fpu_leave(flush, saved)


# --------------------------------------------------------------------------
# Buffer checks, done before anything is written. The Python layer turns a
# failure here into a message that names the argument and its value.
# --------------------------------------------------------------------------

cdef inline bint _overlap(const char* a, const char* b, Py_ssize_t nbytes) noexcept nogil:
    return a != NULL and b != NULL and a < b + nbytes and b < a + nbytes


cdef inline floating* _ptr(floating[::1] a) noexcept:
    return &a[0] if a is not None and a.shape[0] > 0 else NULL


cdef inline Py_ssize_t _len(const floating[::1] a) noexcept:
    return a.shape[0] if a is not None else -1


cdef inline const floating* _cptr(const floating[::1] a) noexcept:
    return &a[0] if a is not None and a.shape[0] > 0 else NULL


cdef int _launch(RuleId rule, str name, names, floating[::1] p, const floating[::1] g,
                 floating[::1] s0, floating[::1] s1, floating[::1] s2, double* c,
                 int nthreads) except -1:
    cdef Py_ssize_t n = p.shape[0], k, j, nbytes, m
    cdef Py_ssize_t lens[5]
    cdef const floating* ptrs[5]
    lens[0] = n; lens[1] = _len(g); lens[2] = _len(s0); lens[3] = _len(s1)
    lens[4] = _len(s2)
    ptrs[0] = _ptr(p); ptrs[1] = _cptr(g); ptrs[2] = _ptr(s0); ptrs[3] = _ptr(s1)
    ptrs[4] = _ptr(s2)
    if lens[1] < 0:
        raise TypeError(f"{name}: grad must be an array, got None")
    for k in range(1, 5):
        m = lens[k]
        if m >= 0 and m != n:
            raise ValueError(f"{name}: {names[k]} has length {m}, param has length {n}")
    if n == 0:
        return 0
    nbytes = n * <Py_ssize_t>sizeof(floating)
    for k in range(5):
        for j in range(k + 1, 5):
            if _overlap(<const char*>ptrs[k], <const char*>ptrs[j], nbytes):
                raise ValueError(f"{name}: {names[j]} shares memory with {names[k]}; "
                                 "every buffer must be distinct")
    with nogil:
        _run(rule, <floating*>ptrs[0], ptrs[1], <floating*>ptrs[2], <floating*>ptrs[3],
             <floating*>ptrs[4], c, n, nthreads)
    return 0


# --------------------------------------------------------------------------
# Entry points: kernel(param, grad, *buffers, *plan args, nthreads), as
# fastopt.rules documents. Buffers a rule does not use are None.
# --------------------------------------------------------------------------

_SGD = ("param", "grad", "momentum_buffer", "", "")
_ADAM = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ADAGRAD = ("param", "grad", "sum", "", "")
_RMSPROP = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")
_ADADELTA = ("param", "grad", "square_avg", "acc_delta", "")
_ADAMAX = ("param", "grad", "exp_avg", "exp_inf", "")
_MV = ("param", "grad", "exp_avg", "exp_avg_sq", "")
_ASGD = ("param", "grad", "ax", "", "")
_RPROP = ("param", "grad", "prev", "step_size", "")
_LION = ("param", "grad", "exp_avg", "", "")


def sgd(floating[::1] param, const floating[::1] grad, floating[::1] momentum_buffer,
        double lr, double weight_decay, double decay, double momentum,
        double one_minus_dampening, bint nesterov, bint first, bint maximize,
        int nthreads):
    cdef double c[8]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [lr, weight_decay, decay, momentum, one_minus_dampening, nesterov, first,
            maximize]
    _launch(R_SGD, "SGD", _SGD, param, grad, momentum_buffer, absent, absent, c, nthreads)


def adam(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
         floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq, double step_size,
         double one_minus_beta1, double beta2, double one_minus_beta2,
         double inv_bias_correction2_sqrt, double eps, double weight_decay, double decay,
         bint maximize, int nthreads):
    cdef double c[9]
    c[:] = [step_size, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction2_sqrt,
            eps, weight_decay, decay, maximize]
    _launch(R_ADAM, "Adam", _ADAM, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c,
            nthreads)


def adagrad(floating[::1] param, const floating[::1] grad, floating[::1] sum, double clr,
            double eps, double weight_decay, bint maximize, int nthreads):
    cdef double c[4]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [clr, eps, weight_decay, maximize]
    _launch(R_ADAGRAD, "Adagrad", _ADAGRAD, param, grad, sum, absent, absent, c, nthreads)


def rmsprop(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
            floating[::1] momentum_buffer, floating[::1] grad_avg, double lr,
            double alpha, double one_minus_alpha, double eps, double weight_decay,
            double momentum, bint maximize, int nthreads):
    cdef double c[7]
    c[:] = [lr, alpha, one_minus_alpha, eps, weight_decay, momentum, maximize]
    _launch(R_RMSPROP, "RMSprop", _RMSPROP, param, grad, square_avg, momentum_buffer,
            grad_avg, c, nthreads)


def adadelta(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
             floating[::1] acc_delta, double lr, double rho, double one_minus_rho,
             double eps, double weight_decay, bint maximize, int nthreads):
    cdef double c[6]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [lr, rho, one_minus_rho, eps, weight_decay, maximize]
    _launch(R_ADADELTA, "Adadelta", _ADADELTA, param, grad, square_avg, acc_delta, absent,
            c, nthreads)


def adamax(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
           floating[::1] exp_inf, double clr, double one_minus_beta1, double beta2,
           double eps, double weight_decay, bint maximize, int nthreads):
    cdef double c[6]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [clr, one_minus_beta1, beta2, eps, weight_decay, maximize]
    _launch(R_ADAMAX, "Adamax", _ADAMAX, param, grad, exp_avg, exp_inf, absent, c,
            nthreads)


def nadam(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
          floating[::1] exp_avg_sq, double grad_coef, double avg_coef,
          double one_minus_beta1, double beta2, double one_minus_beta2,
          double bias_correction2, double eps, double weight_decay, double decay,
          bint maximize, int nthreads):
    cdef double c[10]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [grad_coef, avg_coef, one_minus_beta1, beta2, one_minus_beta2,
            bias_correction2, eps, weight_decay, decay, maximize]
    _launch(R_NADAM, "NAdam", _MV, param, grad, exp_avg, exp_avg_sq, absent, c, nthreads)


def radam(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
          floating[::1] exp_avg_sq, double lr, double bias_correction1,
          double bias_correction2_sqrt, double rect, bint rectified,
          double one_minus_beta1, double beta2, double one_minus_beta2, double eps,
          double weight_decay, double decay, bint maximize, int nthreads):
    cdef double c[12]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [lr, bias_correction1, bias_correction2_sqrt, rect, rectified,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, maximize]
    _launch(R_RADAM, "RAdam", _MV, param, grad, exp_avg, exp_avg_sq, absent, c, nthreads)


def asgd(floating[::1] param, const floating[::1] grad, floating[::1] ax, double eta,
         double decay, double mu, double weight_decay, bint maximize, int nthreads):
    cdef double c[5]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [eta, decay, mu, weight_decay, maximize]
    _launch(R_ASGD, "ASGD", _ASGD, param, grad, ax, absent, absent, c, nthreads)


def rprop(floating[::1] param, const floating[::1] grad, floating[::1] prev,
          floating[::1] step_size, double etaminus, double etaplus, double step_size_min,
          double step_size_max, bint maximize, int nthreads):
    cdef double c[5]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [etaminus, etaplus, step_size_min, step_size_max, maximize]
    _launch(R_RPROP, "Rprop", _RPROP, param, grad, prev, step_size, absent, c, nthreads)


def lion(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg, double lr,
         double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
         double decay, bint maximize, int nthreads):
    cdef double c[7]
    cdef floating[::1] absent = None  # a buffer this rule does not have
    c[:] = [lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, maximize]
    _launch(R_LION, "Lion", _LION, param, grad, exp_avg, absent, absent, c, nthreads)


# --------------------------------------------------------------------------
# Bound kernels: the optimizer classes' fast path. Param and state buffers are
# acquired and checked once, at bind time; a step acquires only the gradient,
# checks its length and overlap, and runs. Per-step scalars arrive as the
# tuple Rule.plan returns, in the entry points' order.
# --------------------------------------------------------------------------

_RULE_IDS = {"sgd": (R_SGD, 8, _SGD), "adam": (R_ADAM, 9, _ADAM),
             "adagrad": (R_ADAGRAD, 4, _ADAGRAD), "rmsprop": (R_RMSPROP, 7, _RMSPROP),
             "adadelta": (R_ADADELTA, 6, _ADADELTA), "adamax": (R_ADAMAX, 6, _ADAMAX),
             "nadam": (R_NADAM, 10, _MV), "radam": (R_RADAM, 12, _MV),
             "asgd": (R_ASGD, 5, _ASGD), "rprop": (R_RPROP, 5, _RPROP),
             "lion": (R_LION, 7, _LION)}


cdef class Bound:
    """``bind(kernel, param, buffers)``: ``step(grad, args, nthreads)`` runs the
    kernel on the bound buffers. Holds the buffers (and their exports) alive."""

    cdef RuleId rule
    cdef int nargs
    cdef bint is_double
    cdef Py_ssize_t n
    cdef char* ptrs[4]
    cdef object views
    cdef readonly str kernel
    cdef object names

    def __init__(self, str kernel, param, buffers):
        cdef float[::1] f
        cdef double[::1] d
        cdef int k
        if kernel not in _RULE_IDS:
            raise ValueError(f"unknown kernel {kernel!r}")
        self.rule, self.nargs, self.names = _RULE_IDS[kernel]
        self.kernel = kernel
        buffers = tuple(buffers) + (None,) * (3 - len(buffers))
        self.is_double = param.dtype.itemsize == 8
        views = []
        for k, obj in enumerate((param,) + buffers):
            if obj is None:
                self.ptrs[k] = NULL
                continue
            if self.is_double:
                d = obj
                views.append(d)
                self.ptrs[k] = <char*>&d[0] if d.shape[0] > 0 else NULL
                m = d.shape[0]
            else:
                f = obj
                views.append(f)
                self.ptrs[k] = <char*>&f[0] if f.shape[0] > 0 else NULL
                m = f.shape[0]
            if k == 0:
                self.n = m
            elif m != self.n:
                raise ValueError(f"{self.names[k + 1]} has length {m}, param has "
                                 f"length {self.n}")
        self.views = views

    def step(self, grad, tuple args, int nthreads):
        cdef double c[16]
        cdef Py_ssize_t k, nbytes
        cdef const float[::1] gf
        cdef const double[::1] gd
        cdef const char* gp
        if len(args) != self.nargs:
            raise TypeError(f"{self.kernel} takes {self.nargs} per-step scalars, "
                            f"got {len(args)}")
        for k in range(self.nargs):
            c[k] = args[k]
        if self.is_double:
            gd = grad
            if gd.shape[0] != self.n:
                raise ValueError(f"grad has length {gd.shape[0]}, param has length {self.n}")
            gp = <const char*>&gd[0] if self.n > 0 else NULL
            nbytes = self.n * 8
        else:
            gf = grad
            if gf.shape[0] != self.n:
                raise ValueError(f"grad has length {gf.shape[0]}, param has length {self.n}")
            gp = <const char*>&gf[0] if self.n > 0 else NULL
            nbytes = self.n * 4
        if self.n == 0:
            return
        for k in range(4):
            if _overlap(gp, self.ptrs[k], nbytes):
                raise ValueError(f"grad shares memory with {self.names[0 if k == 0 else k + 1]}; "
                                 "every buffer must be distinct")
        with nogil:
            if self.is_double:
                _run[double](self.rule, <double*>self.ptrs[0], <const double*>gp,
                             <double*>self.ptrs[1], <double*>self.ptrs[2],
                             <double*>self.ptrs[3], c, self.n, nthreads)
            else:
                _run[float](self.rule, <float*>self.ptrs[0], <const float*>gp,
                            <float*>self.ptrs[1], <float*>self.ptrs[2],
                            <float*>self.ptrs[3], c, self.n, nthreads)
