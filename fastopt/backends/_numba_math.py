"""The per-element math of every rule, written once for both Numba backends.

This file is ``fastopt/kernels/rules.pxi`` transcribed for Numba, in the same
order and with the same names, so the two can be read side by side:

* ``<rule>_coefs(c, dt)`` is the head of ``_<rule>_chunk`` in rules.pxi: it casts
  the per-step float64 scalars ``c`` (the ``plan`` tuple of ``fastopt.rules``)
  once per call to the buffers' type ``dt`` (``np.float32`` or ``np.float64``) and
  works out the flags from the float64 values, exactly as the pxi does;
* ``<rule>(p, g, a0, a1, a2, k, h0, h1, h2)`` is the body of the pxi loop for one
  element: ``p``/``g`` the parameter and gradient, ``a0..a2`` the element of each
  state buffer in ``Rule.buffers`` order (a dummy when ``h0..h2`` say the buffer
  is absent), ``k`` what ``<rule>_coefs`` returned. It returns the new
  ``(p, a0, a1, a2)``; the caller stores the ones whose buffer exists.

Every function is ``register_jitable``: compiled inline into the CPU loops of
``numba_cpu`` and the CUDA kernels of ``numba_cuda``, and plain Python under the
CUDA simulator (where the values are NumPy scalars, so float32 stays float32).

Bitwise agreement with the compiled backend rests on three things:

1. float32 buffers are computed in float32: every coefficient is cast once by
   ``_coefs`` and no float64 constant enters the arithmetic (Numba would promote
   float32 * float64 to float64, unlike C). ``_sqrt`` and ``abs`` keep float32;
2. the same operation order as rules.pxi (``a * b * c`` is ``(a * b) * c`` in
   both languages);
3. no FMA contraction and no fastmath: the Cython build uses
   ``-ffp-contract=off``, and Numba's CPU target does not contract without
   fastmath. NVVM (the CUDA compiler) does: it fuses a multiply feeding an add
   into an FMA by default, fastmath or not. So every product goes through
   ``_mul``: ``a * b`` on the CPU and in the simulator, and on the CUDA target
   libdevice's ``fmul_rn``/``dmul_rn`` (PTX ``mul.rn``), a multiply rounded on
   its own that NVVM never fuses (``use_rounded_device_products``, called by the
   CUDA backend). An add or a subtract alone cannot be fused, nor can a division
   or a square root (NVVM's defaults round them as IEEE 754 does), so the CUDA
   kernels round exactly like the CPU ones.
"""

import hashlib
import math

import numpy as np
from numba.extending import overload, register_jitable


def _digest():
    try:
        with open(__file__, "rb") as f:
            return int(hashlib.sha256(f.read()).hexdigest()[:15], 16)
    except OSError:
        return 0


# Numba's on-disk cache notices edits to the file of a jitted function, not to
# the functions it calls. The loops in numba_cpu capture this digest in their
# closure, which is part of the cache key, so editing this file recompiles them.
SOURCE_DIGEST = _digest()


# --------------------------------------------------------------------------
# Element helpers. NaN must survive every one of them, as it does in torch.
# Each has a pure-Python body (the CUDA simulator runs it on NumPy scalars)
# and, where that body would not type the same way in compiled code, an
# overload that does.
# --------------------------------------------------------------------------

def _sqrt(x):
    # np.sqrt keeps a NumPy float32 scalar float32; math.sqrt would return a
    # Python float (float64) under the simulator
    return np.sqrt(x)


@overload(_sqrt)
def _sqrt_jit(x):
    # compiled: math.sqrt is sqrtf for float32 on the CPU and in CUDA alike
    return lambda x: math.sqrt(x)


@register_jitable
def _max(a, b):
    # torch.maximum / amax: NaN in either operand gives NaN
    return a if (a > b or a != a) else b


def _mul(a, b):
    # a product rounded on its own: never contracted with an add (see point 3
    # of the module docstring). Both operands have the buffers' type.
    return a * b


@overload(_mul, target="cpu")
def _mul_cpu(a, b):
    return lambda a, b: a * b


_DEVICE_PRODUCTS = []


def use_rounded_device_products():
    """Register ``_mul`` for the CUDA target: libdevice's ``fmul_rn``/``dmul_rn``.
    Called once by ``numba_cuda`` after it imported ``numba.cuda`` (the CUDA target
    exists only then). Mixed or non-float operands find no implementation, so a
    float64 constant leaking into float32 math fails to compile instead of
    silently promoting."""
    if _DEVICE_PRODUCTS:
        return
    from numba import types
    from numba.cuda import libdevice

    @overload(_mul, target="cuda")
    def _mul_cuda(a, b):
        if a == types.float32 and b == types.float32:
            return lambda a, b: libdevice.fmul_rn(a, b)
        if a == types.float64 and b == types.float64:
            return lambda a, b: libdevice.dmul_rn(a, b)
        return None

    _DEVICE_PRODUCTS.append(_mul_cuda)


def _sign(x):
    # torch.sign: 1, -1, and 0 for ±0 and NaN (so Rprop skips a NaN gradient,
    # as torch does; Lion follows the same sign)
    one, zero = type(x)(1), type(x)(0)
    return one if x > 0 else (-one if x < 0 else zero)


@overload(_sign)
def _sign_jit(x):
    # the constants must have x's type: an integer 1 would make Numba unify the
    # branches to float64
    one, zero = np.dtype(str(x)).type(1), np.dtype(str(x)).type(0)

    def impl(x):
        return one if x > 0 else (-one if x < 0 else zero)
    return impl


# --------------------------------------------------------------------------
# Per-element math, one pair of functions per rule
# --------------------------------------------------------------------------

@register_jitable
def sgd_coefs(c, dt):
    # lr, wd, decay, mom, omd, nesterov, first, maximize, use_wd, use_decay
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]),
            c[5] != 0, c[6] != 0, c[7] != 0, c[1] != 0, c[2] != 1)


@register_jitable
def sgd(p, g, b, _a1, _a2, k, has_b, _h1, _h2):
    lr, wd, decay, mom, omd, nesterov, first, maximize, use_wd, use_decay = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    if use_wd:
        gi = gi + _mul(wd, p)
    if has_b:
        bi = gi if first else _mul(mom, b) + _mul(omd, gi)
        b = bi
        gi = gi + _mul(mom, bi) if nesterov else bi
    p = p - _mul(lr, gi)
    return p, b, _a1, _a2


@register_jitable
def adam_coefs(c, dt):
    # step_size, omb1, b2, omb2, inv_bc2s, eps, wd, decay, maximize, use_wd, use_decay
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), dt(c[5]), dt(c[6]),
            dt(c[7]), c[8] != 0, c[6] != 0, c[7] != 1)


@register_jitable
def adam(p, g, m, v, vmax, k, _h0, _h1, amsgrad):
    step_size, omb1, b2, omb2, inv_bc2s, eps, wd, decay, maximize, use_wd, use_decay = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    if use_wd:
        gi = gi + _mul(wd, p)
    mi = m + _mul(omb1, gi - m)
    vi = _mul(b2, v) + _mul(_mul(omb2, gi), gi)
    if amsgrad:
        vmax = _max(vmax, vi)
        p = p - _mul(step_size, mi) / (_mul(_sqrt(vmax), inv_bc2s) + eps)
    else:
        p = p - _mul(step_size, mi) / (_mul(_sqrt(vi), inv_bc2s) + eps)
    return p, mi, vi, vmax


@register_jitable
def adagrad_coefs(c, dt):
    # clr, eps, wd, maximize, use_wd
    return (dt(c[0]), dt(c[1]), dt(c[2]), c[3] != 0, c[2] != 0)


@register_jitable
def adagrad(p, g, s, _a1, _a2, k, _h0, _h1, _h2):
    clr, eps, wd, maximize, use_wd = k
    gi = -g if maximize else g
    if use_wd:
        gi = gi + _mul(wd, p)
    si = s + _mul(gi, gi)
    p = p - _mul(clr, gi) / (_sqrt(si) + eps)
    return p, si, _a1, _a2


@register_jitable
def rmsprop_coefs(c, dt):
    # lr, alpha, oma, eps, wd, mom, maximize, use_wd
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), dt(c[5]),
            c[6] != 0, c[4] != 0)


@register_jitable
def rmsprop(p, g, v, b, ga, k, _h0, has_b, centered):
    lr, alpha, oma, eps, wd, mom, maximize, use_wd = k
    gi = -g if maximize else g
    if use_wd:
        gi = gi + _mul(wd, p)
    vi = _mul(alpha, v) + _mul(_mul(oma, gi), gi)
    if centered:
        ga = ga + _mul(oma, gi - ga)
        avg = _sqrt(vi - _mul(ga, ga)) + eps
    else:
        avg = _sqrt(vi) + eps
    if has_b:
        b = _mul(mom, b) + gi / avg
        p = p - _mul(lr, b)
    else:
        p = p - _mul(lr, gi) / avg
    return p, vi, b, ga


@register_jitable
def adadelta_coefs(c, dt):
    # lr, rho, omr, eps, wd, maximize, use_wd
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), c[5] != 0, c[4] != 0)


@register_jitable
def adadelta(p, g, v, u, _a2, k, _h0, _h1, _h2):
    lr, rho, omr, eps, wd, maximize, use_wd = k
    gi = -g if maximize else g
    if use_wd:
        gi = gi + _mul(wd, p)
    vi = _mul(rho, v) + _mul(_mul(omr, gi), gi)
    delta = _mul(_sqrt(u + eps) / _sqrt(vi + eps), gi)
    u = _mul(rho, u) + _mul(_mul(omr, delta), delta)
    p = p - _mul(lr, delta)
    return p, vi, u, _a2


@register_jitable
def adamax_coefs(c, dt):
    # clr, omb1, b2, eps, wd, maximize, use_wd
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), c[5] != 0, c[4] != 0)


@register_jitable
def adamax(p, g, m, u, _a2, k, _h0, _h1, _h2):
    clr, omb1, b2, eps, wd, maximize, use_wd = k
    gi = -g if maximize else g
    if use_wd:
        gi = gi + _mul(wd, p)
    mi = m + _mul(omb1, gi - m)
    ui = _max(_mul(b2, u), abs(gi) + eps)
    p = p - _mul(clr, mi) / ui
    return p, mi, ui, _a2


@register_jitable
def nadam_coefs(c, dt):
    # gcoef, mcoef, omb1, b2, omb2, bc2, eps, wd, decay, maximize, use_wd, use_decay
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), dt(c[5]), dt(c[6]),
            dt(c[7]), dt(c[8]), c[9] != 0, c[7] != 0, c[8] != 1)


@register_jitable
def nadam(p, g, m, v, _a2, k, _h0, _h1, _h2):
    gcoef, mcoef, omb1, b2, omb2, bc2, eps, wd, decay, maximize, use_wd, use_decay = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    if use_wd:
        gi = gi + _mul(wd, p)
    mi = m + _mul(omb1, gi - m)
    vi = _mul(b2, v) + _mul(_mul(omb2, gi), gi)
    denom = _sqrt(vi / bc2) + eps
    pi = p - _mul(gcoef, gi) / denom
    p = pi - _mul(mcoef, mi) / denom
    return p, mi, vi, _a2


@register_jitable
def radam_coefs(c, dt):
    # lr, bc1, bc2s, rect, rectified, omb1, b2, omb2, eps, wd, decay,
    # maximize, use_wd, use_decay
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), c[4] != 0, dt(c[5]), dt(c[6]),
            dt(c[7]), dt(c[8]), dt(c[9]), dt(c[10]), c[11] != 0, c[9] != 0, c[10] != 1)


@register_jitable
def radam(p, g, m, v, _a2, k, _h0, _h1, _h2):
    (lr, bc1, bc2s, rect, rectified, omb1, b2, omb2, eps, wd, decay,
     maximize, use_wd, use_decay) = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    if use_wd:
        gi = gi + _mul(wd, p)
    mi = m + _mul(omb1, gi - m)
    vi = _mul(b2, v) + _mul(_mul(omb2, gi), gi)
    if rectified:
        p = p - _mul(_mul(_mul(mi / bc1, lr), bc2s / (_sqrt(vi) + eps)), rect)
    else:
        p = p - _mul(mi / bc1, lr)
    return p, mi, vi, _a2


@register_jitable
def asgd_coefs(c, dt):
    # eta, decay, mu, wd, maximize, use_wd, average
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), c[4] != 0, c[3] != 0, c[2] != 1)


@register_jitable
def asgd(p, g, ax, _a1, _a2, k, _h0, _h1, _h2):
    eta, decay, mu, wd, maximize, use_wd, average = k
    gi = -g if maximize else g
    if use_wd:
        gi = gi + _mul(wd, p)
    pi = _mul(p, decay)
    pi = pi - _mul(eta, gi)
    ax = ax + _mul(pi - ax, mu) if average else pi
    return pi, ax, _a1, _a2


@register_jitable
def rprop_coefs(c, dt):
    # etaminus, etaplus, smin, smax, one, zero, maximize
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(1), dt(0), c[4] != 0)


@register_jitable
def rprop(p, g, prev, step, _a2, k, _h0, _h1, _h2):
    etaminus, etaplus, smin, smax, one, zero, maximize = k
    gi = -g if maximize else g
    s = _mul(gi, prev)
    # torch: sign(s) with sign(NaN) = 0, so NaN takes the factor 1
    factor = etaplus if s > 0 else (etaminus if s < 0 else one)
    st = _mul(step, factor)
    st = smin if st < smin else (smax if st > smax else st)
    gi = zero if s < 0 else gi
    p = p - _mul(_sign(gi), st)
    return p, gi, st, _a2


@register_jitable
def lion_coefs(c, dt):
    # lr, b1, omb1, b2, omb2, decay, maximize, use_decay
    return (dt(c[0]), dt(c[1]), dt(c[2]), dt(c[3]), dt(c[4]), dt(c[5]),
            c[6] != 0, c[5] != 1)


@register_jitable
def lion(p, g, m, _a1, _a2, k, _h0, _h1, _h2):
    lr, b1, omb1, b2, omb2, decay, maximize, use_decay = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    ci = _mul(b1, m) + _mul(omb1, gi)
    p = p - _mul(lr, _sign(ci))
    m = _mul(b2, m) + _mul(omb2, gi)
    return p, m, _a1, _a2


# kernel name -> (coefs, element, names of the five arrays for messages,
# rule name for messages); the order of names is rules.pxi's.
RULES = {
    "sgd": (sgd_coefs, sgd, "SGD", ("param", "grad", "momentum_buffer", "", "")),
    "adam": (adam_coefs, adam, "Adam",
             ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "adagrad": (adagrad_coefs, adagrad, "Adagrad", ("param", "grad", "sum", "", "")),
    "rmsprop": (rmsprop_coefs, rmsprop, "RMSprop",
                ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")),
    "adadelta": (adadelta_coefs, adadelta, "Adadelta",
                 ("param", "grad", "square_avg", "acc_delta", "")),
    "adamax": (adamax_coefs, adamax, "Adamax", ("param", "grad", "exp_avg", "exp_inf", "")),
    "nadam": (nadam_coefs, nadam, "NAdam", ("param", "grad", "exp_avg", "exp_avg_sq", "")),
    "radam": (radam_coefs, radam, "RAdam", ("param", "grad", "exp_avg", "exp_avg_sq", "")),
    "asgd": (asgd_coefs, asgd, "ASGD", ("param", "grad", "ax", "", "")),
    "rprop": (rprop_coefs, rprop, "Rprop", ("param", "grad", "prev", "step_size", "")),
    "lion": (lion_coefs, lion, "Lion", ("param", "grad", "exp_avg", "", "")),
}


def entry_points(run):
    """The kernels with rules.pxi's signatures, each packing its per-step scalars
    into one tuple of floats (one compiled signature per dtype, whatever mix of
    ints, bools and floats the caller passes) and calling
    ``run(kernel, param, grad, s0, s1, s2, c, nthreads)``."""

    def sgd(param, grad, momentum_buffer, lr, weight_decay, decay, momentum,
            one_minus_dampening, nesterov, first, maximize, nthreads):
        c = (float(lr), float(weight_decay), float(decay), float(momentum),
             float(one_minus_dampening), float(nesterov), float(first), float(maximize))
        run("sgd", param, grad, momentum_buffer, None, None, c, nthreads)

    def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, one_minus_beta1,
             beta2, one_minus_beta2, inv_bias_correction2_sqrt, eps, weight_decay, decay,
             maximize, nthreads):
        c = (float(step_size), float(one_minus_beta1), float(beta2), float(one_minus_beta2),
             float(inv_bias_correction2_sqrt), float(eps), float(weight_decay), float(decay),
             float(maximize))
        run("adam", param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, nthreads)

    def adagrad(param, grad, sum, clr, eps, weight_decay, maximize, nthreads):
        c = (float(clr), float(eps), float(weight_decay), float(maximize))
        run("adagrad", param, grad, sum, None, None, c, nthreads)

    def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, lr, alpha,
                one_minus_alpha, eps, weight_decay, momentum, maximize, nthreads):
        c = (float(lr), float(alpha), float(one_minus_alpha), float(eps), float(weight_decay),
             float(momentum), float(maximize))
        run("rmsprop", param, grad, square_avg, momentum_buffer, grad_avg, c, nthreads)

    def adadelta(param, grad, square_avg, acc_delta, lr, rho, one_minus_rho, eps,
                 weight_decay, maximize, nthreads):
        c = (float(lr), float(rho), float(one_minus_rho), float(eps), float(weight_decay),
             float(maximize))
        run("adadelta", param, grad, square_avg, acc_delta, None, c, nthreads)

    def adamax(param, grad, exp_avg, exp_inf, clr, one_minus_beta1, beta2, eps,
               weight_decay, maximize, nthreads):
        c = (float(clr), float(one_minus_beta1), float(beta2), float(eps),
             float(weight_decay), float(maximize))
        run("adamax", param, grad, exp_avg, exp_inf, None, c, nthreads)

    def nadam(param, grad, exp_avg, exp_avg_sq, grad_coef, avg_coef, one_minus_beta1, beta2,
              one_minus_beta2, bias_correction2, eps, weight_decay, decay, maximize, nthreads):
        c = (float(grad_coef), float(avg_coef), float(one_minus_beta1), float(beta2),
             float(one_minus_beta2), float(bias_correction2), float(eps), float(weight_decay),
             float(decay), float(maximize))
        run("nadam", param, grad, exp_avg, exp_avg_sq, None, c, nthreads)

    def radam(param, grad, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2_sqrt,
              rect, rectified, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
              decay, maximize, nthreads):
        c = (float(lr), float(bias_correction1), float(bias_correction2_sqrt), float(rect),
             float(rectified), float(one_minus_beta1), float(beta2), float(one_minus_beta2),
             float(eps), float(weight_decay), float(decay), float(maximize))
        run("radam", param, grad, exp_avg, exp_avg_sq, None, c, nthreads)

    def asgd(param, grad, ax, eta, decay, mu, weight_decay, maximize, nthreads):
        c = (float(eta), float(decay), float(mu), float(weight_decay), float(maximize))
        run("asgd", param, grad, ax, None, None, c, nthreads)

    def rprop(param, grad, prev, step_size, etaminus, etaplus, step_size_min, step_size_max,
              maximize, nthreads):
        c = (float(etaminus), float(etaplus), float(step_size_min), float(step_size_max),
             float(maximize))
        run("rprop", param, grad, prev, step_size, None, c, nthreads)

    def lion(param, grad, exp_avg, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
             maximize, nthreads):
        c = (float(lr), float(beta1), float(one_minus_beta1), float(beta2),
             float(one_minus_beta2), float(decay), float(maximize))
        run("lion", param, grad, exp_avg, None, None, c, nthreads)

    return {"sgd": sgd, "adam": adam, "adagrad": adagrad, "rmsprop": rmsprop,
            "adadelta": adadelta, "adamax": adamax, "nadam": nadam, "radam": radam,
            "asgd": asgd, "rprop": rprop, "lion": lion}
