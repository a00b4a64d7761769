# The per-element math of every rule: one chunk function per kernel, float32 and
# float64 from one body (`floating`). This is the only place a rule's arithmetic is
# written for the compiled backend; engine.pxi runs the chunks over segments and
# _registry.pxi (generated from fastopt/rules.py) dispatches to them.
#
# A chunk updates elements [lo, hi) of one segment: p the parameter, g the gradient,
# s0..s2 the state buffers in the rule's Buffer order (NULL when absent), c the
# per-step scalars under the registry's plan field names (Rule.plan_fields).
# The math follows docs/rules.md term by term, in the operation order of the NumPy
# reference (fastopt/reference.py), so the two agree bit for bit. No FMA
# contraction (-ffp-contract=off): every element rounds the same way whichever
# thread, SIMD lane or scalar tail computes it, so results do not depend on the
# thread count, the segmentation or the instruction set.
#
# Adding a rule: a row in fastopt/rules.py (with plan_fields), a <kernel>_chunk
# here, its twin in fastopt/backends/_numba_math.py, its NumPy reference, its
# section in docs/rules.md; then `python -m fastopt.kernels.generate`.


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
# Per-element math, one chunk function per kernel
# --------------------------------------------------------------------------

cdef void sgd_chunk(floating* p, const floating* g, floating* b, floating* unused1,
                    floating* unused2, const SgdPlan* c, Py_ssize_t lo,
                    Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, wd = <floating>c.weight_decay
    cdef floating decay = <floating>c.decay, mom = <floating>c.momentum
    cdef floating omd = <floating>c.one_minus_dampening
    cdef bint nesterov = c.nesterov != 0, first = c.first != 0
    cdef bint maximize = c.maximize != 0
    cdef bint use_wd = c.weight_decay != 0, use_decay = c.decay != 1
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


cdef void adam_chunk(floating* p, const floating* g, floating* m, floating* v,
                     floating* vmax, const AdamPlan* c, Py_ssize_t lo,
                     Py_ssize_t hi) noexcept nogil:
    cdef floating step_size = <floating>c.step_size, omb1 = <floating>c.one_minus_beta1
    cdef floating b2 = <floating>c.beta2, omb2 = <floating>c.one_minus_beta2
    cdef floating inv_bc2s = <floating>c.inv_bias_correction2_sqrt
    cdef floating eps = <floating>c.eps, wd = <floating>c.weight_decay
    cdef floating decay = <floating>c.decay
    cdef bint maximize = c.maximize != 0
    cdef bint use_wd = c.weight_decay != 0, use_decay = c.decay != 1
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


cdef void adagrad_chunk(floating* p, const floating* g, floating* s, floating* unused1,
                        floating* unused2, const AdagradPlan* c, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    cdef floating clr = <floating>c.clr, eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay
    cdef bint maximize = c.maximize != 0, use_wd = c.weight_decay != 0
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


cdef void rmsprop_chunk(floating* p, const floating* g, floating* v, floating* b,
                        floating* ga, const RmspropPlan* c, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, alpha = <floating>c.alpha
    cdef floating oma = <floating>c.one_minus_alpha, eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay, mom = <floating>c.momentum
    cdef bint maximize = c.maximize != 0, use_wd = c.weight_decay != 0
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


cdef void adadelta_chunk(floating* p, const floating* g, floating* v, floating* u,
                         floating* unused, const AdadeltaPlan* c, Py_ssize_t lo,
                         Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, rho = <floating>c.rho
    cdef floating omr = <floating>c.one_minus_rho, eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay
    cdef bint maximize = c.maximize != 0, use_wd = c.weight_decay != 0
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


cdef void adamax_chunk(floating* p, const floating* g, floating* m, floating* u,
                       floating* unused, const AdamaxPlan* c, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef floating clr = <floating>c.clr, omb1 = <floating>c.one_minus_beta1
    cdef floating b2 = <floating>c.beta2, eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay
    cdef bint maximize = c.maximize != 0, use_wd = c.weight_decay != 0
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


cdef void nadam_chunk(floating* p, const floating* g, floating* m, floating* v,
                      floating* unused, const NadamPlan* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating gcoef = <floating>c.grad_coef, mcoef = <floating>c.avg_coef
    cdef floating omb1 = <floating>c.one_minus_beta1, b2 = <floating>c.beta2
    cdef floating omb2 = <floating>c.one_minus_beta2, bc2 = <floating>c.bias_correction2
    cdef floating eps = <floating>c.eps, wd = <floating>c.weight_decay
    cdef floating decay = <floating>c.decay
    cdef bint maximize = c.maximize != 0
    cdef bint use_wd = c.weight_decay != 0, use_decay = c.decay != 1
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


cdef void radam_chunk(floating* p, const floating* g, floating* m, floating* v,
                      floating* unused, const RadamPlan* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, bc1 = <floating>c.bias_correction1
    cdef floating bc2s = <floating>c.bias_correction2_sqrt, rect = <floating>c.rect
    cdef bint rectified = c.rectified != 0
    cdef floating omb1 = <floating>c.one_minus_beta1, b2 = <floating>c.beta2
    cdef floating omb2 = <floating>c.one_minus_beta2, eps = <floating>c.eps
    cdef floating wd = <floating>c.weight_decay, decay = <floating>c.decay
    cdef bint maximize = c.maximize != 0
    cdef bint use_wd = c.weight_decay != 0, use_decay = c.decay != 1
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


cdef void asgd_chunk(floating* p, const floating* g, floating* ax, floating* unused1,
                     floating* unused2, const AsgdPlan* c, Py_ssize_t lo,
                     Py_ssize_t hi) noexcept nogil:
    cdef floating eta = <floating>c.eta, decay = <floating>c.decay, mu = <floating>c.mu
    cdef floating wd = <floating>c.weight_decay
    cdef bint maximize = c.maximize != 0, use_wd = c.weight_decay != 0
    cdef bint average = c.mu != 1
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


cdef void rprop_chunk(floating* p, const floating* g, floating* prev, floating* step,
                      floating* unused, const RpropPlan* c, Py_ssize_t lo,
                      Py_ssize_t hi) noexcept nogil:
    cdef floating etaminus = <floating>c.etaminus, etaplus = <floating>c.etaplus
    cdef floating smin = <floating>c.step_size_min, smax = <floating>c.step_size_max
    cdef floating one = 1, zero = 0
    cdef bint maximize = c.maximize != 0
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


cdef void lion_chunk(floating* p, const floating* g, floating* m, floating* unused1,
                     floating* unused2, const LionPlan* c, Py_ssize_t lo,
                     Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, b1 = <floating>c.beta1
    cdef floating omb1 = <floating>c.one_minus_beta1, b2 = <floating>c.beta2
    cdef floating omb2 = <floating>c.one_minus_beta2, decay = <floating>c.decay
    cdef bint maximize = c.maximize != 0, use_decay = c.decay != 1
    cdef Py_ssize_t i
    cdef floating gi, ci
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_decay:
            p[i] = p[i] * decay
        ci = b1 * m[i] + omb1 * gi
        p[i] = p[i] - lr * _sign(ci)
        m[i] = b2 * m[i] + omb2 * gi


cdef void signum_chunk(floating* p, const floating* g, floating* m, floating* unused1,
                       floating* unused2, const SignumPlan* c, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef floating lr = <floating>c.lr, beta = <floating>c.momentum
    cdef floating omb = <floating>c.one_minus_momentum, decay = <floating>c.decay
    cdef bint maximize = c.maximize != 0, use_decay = c.decay != 1
    cdef Py_ssize_t i
    cdef floating gi, mi
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if use_decay:
            p[i] = p[i] * decay
        mi = beta * m[i] + omb * gi
        m[i] = mi
        p[i] = p[i] - lr * _sign(mi)


cdef inline void _schedulefree_loop(floating* y, const floating* g, floating* z,
                                    floating* v, floating lr, floating ckp1,
                                    floating ycoef, floating b2, floating omb2,
                                    floating inv_bc2s, floating eps, floating wd,
                                    bint first, bint use_wd, bint adam, Py_ssize_t lo,
                                    Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, yi, zi, vi
    for i in range(lo, hi):
        yi = y[i]
        gi = g[i]
        if adam:
            vi = b2 * v[i] + omb2 * gi * gi
            v[i] = vi
            gi = gi / (_sqrt(vi) * inv_bc2s + eps)
        if use_wd:
            gi = gi + wd * yi
        zi = yi if first else z[i]
        yi = yi + ckp1 * (zi - yi)
        y[i] = yi + ycoef * gi
        z[i] = zi - lr * gi


cdef void schedulefree_chunk(floating* y, const floating* g, floating* z, floating* v,
                             floating* unused, const SchedulefreePlan* c, Py_ssize_t lo,
                             Py_ssize_t hi) noexcept nogil:
    # y is the parameter (the gradient's point); z starts as a copy of y (first)
    cdef floating lr = <floating>c.lr, ckp1 = <floating>c.ckp1
    cdef floating ycoef = <floating>c.y_coef, b2 = <floating>c.beta2
    cdef floating omb2 = <floating>c.one_minus_beta2
    cdef floating inv_bc2s = <floating>c.inv_bias_correction2_sqrt
    cdef floating eps = <floating>c.eps, wd = <floating>c.weight_decay
    cdef bint first = c.first != 0, use_wd = c.weight_decay != 0
    # one loop per variant, the flags constant inside each: every variant vectorises
    if v == NULL:
        if first:
            _schedulefree_loop(y, g, z, v, lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd,
                               True, use_wd, False, lo, hi)
        else:
            _schedulefree_loop(y, g, z, v, lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd,
                               False, use_wd, False, lo, hi)
    elif first:
        _schedulefree_loop(y, g, z, v, lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd,
                           True, use_wd, True, lo, hi)
    else:
        _schedulefree_loop(y, g, z, v, lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd,
                           False, use_wd, True, lo, hi)
