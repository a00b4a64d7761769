"""The per-element math of every rule, written once for both Numba backends.

This file is ``fastopt/kernels/rules.pxi`` transcribed for Numba, in the same
order and with the same names, so the two can be read side by side:

* ``<rule>_coefs(c, dt)`` is the head of ``<rule>_chunk`` in rules.pxi: it casts
  the per-step float64 scalars ``c`` (the kernel's plan namedtuple, whose field
  names are the registry's ``Rule.plan_fields``) once per call to the buffers'
  type ``dt`` (``np.float32`` or ``np.float64``) and works out the flags from the
  float64 values, exactly as the pxi does;
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
    return (dt(c.lr), dt(c.weight_decay), dt(c.decay), dt(c.momentum),
            dt(c.one_minus_dampening), c.nesterov != 0, c.first != 0, c.maximize != 0,
            c.weight_decay != 0, c.decay != 1)


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
    return (dt(c.step_size), dt(c.one_minus_beta1), dt(c.beta2), dt(c.one_minus_beta2),
            dt(c.inv_bias_correction2_sqrt), dt(c.eps), dt(c.weight_decay), dt(c.decay),
            c.maximize != 0, c.weight_decay != 0, c.decay != 1)


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
    return (dt(c.clr), dt(c.eps), dt(c.weight_decay), c.maximize != 0, c.weight_decay != 0)


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
    return (dt(c.lr), dt(c.alpha), dt(c.one_minus_alpha), dt(c.eps), dt(c.weight_decay),
            dt(c.momentum), c.maximize != 0, c.weight_decay != 0)


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
    return (dt(c.lr), dt(c.rho), dt(c.one_minus_rho), dt(c.eps), dt(c.weight_decay), c.maximize
            != 0, c.weight_decay != 0)


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
    return (dt(c.clr), dt(c.one_minus_beta1), dt(c.beta2), dt(c.eps), dt(c.weight_decay),
            c.maximize != 0, c.weight_decay != 0)


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
    return (dt(c.grad_coef), dt(c.avg_coef), dt(c.one_minus_beta1), dt(c.beta2),
            dt(c.one_minus_beta2), dt(c.bias_correction2), dt(c.eps), dt(c.weight_decay),
            dt(c.decay), c.maximize != 0, c.weight_decay != 0, c.decay != 1)


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
    return (dt(c.lr), dt(c.bias_correction1), dt(c.bias_correction2_sqrt), dt(c.rect),
            c.rectified != 0, dt(c.one_minus_beta1), dt(c.beta2), dt(c.one_minus_beta2),
            dt(c.eps), dt(c.weight_decay), dt(c.decay), c.maximize != 0, c.weight_decay != 0,
            c.decay != 1)


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
    return (dt(c.eta), dt(c.decay), dt(c.mu), dt(c.weight_decay), c.maximize != 0,
            c.weight_decay != 0, c.mu != 1)


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
    return (dt(c.etaminus), dt(c.etaplus), dt(c.step_size_min), dt(c.step_size_max), dt(1),
            dt(0), c.maximize != 0)


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
    return (dt(c.lr), dt(c.beta1), dt(c.one_minus_beta1), dt(c.beta2), dt(c.one_minus_beta2),
            dt(c.decay), c.maximize != 0, c.decay != 1)


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


@register_jitable
def signum_coefs(c, dt):
    # lr, beta, omb, decay, maximize, use_decay
    return (dt(c.lr), dt(c.momentum), dt(c.one_minus_momentum), dt(c.decay),
            c.maximize != 0, c.decay != 1)


@register_jitable
def signum(p, g, m, _a1, _a2, k, _h0, _h1, _h2):
    lr, beta, omb, decay, maximize, use_decay = k
    gi = -g if maximize else g
    if use_decay:
        p = _mul(p, decay)
    m = _mul(beta, m) + _mul(omb, gi)
    p = p - _mul(lr, _sign(m))
    return p, m, _a1, _a2


@register_jitable
def schedulefree_coefs(c, dt):
    # lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd, first, use_wd
    return (dt(c.lr), dt(c.ckp1), dt(c.y_coef), dt(c.beta2), dt(c.one_minus_beta2),
            dt(c.inv_bias_correction2_sqrt), dt(c.eps), dt(c.weight_decay), c.first != 0,
            c.weight_decay != 0)


@register_jitable
def schedulefree(p, g, z, v, _a2, k, _h0, h1, _h2):
    lr, ckp1, ycoef, b2, omb2, inv_bc2s, eps, wd, first, use_wd = k
    gi = g
    if h1:
        v = _mul(b2, v) + _mul(_mul(omb2, gi), gi)
        gi = gi / (_mul(_sqrt(v), inv_bc2s) + eps)
    if use_wd:
        gi = gi + _mul(wd, p)
    zi = p if first else z
    p = p + _mul(ckp1, zi - p)
    p = p + _mul(ycoef, gi)
    z = zi - _mul(lr, gi)
    return p, z, v, _a2


# --------------------------------------------------------------------------
# The tables, from the registry: kernel name -> (coefs, element, rule name for
# messages, names of the slots), and one namedtuple class per kernel whose fields
# are the plan's names (Rule.plan_fields): the backends pass the per-step scalars
# as one, so the coefs functions above read them by name.
# --------------------------------------------------------------------------

def _tables():
    from collections import namedtuple

    from fastopt.rules import KERNELS, kernel_rule
    rules, plans = {}, {}
    module = globals()
    for kernel in KERNELS:
        rule = kernel_rule(kernel)
        name = f"{kernel.capitalize()}Plan"
        cls = namedtuple(name, [f.rstrip("?") for f in rule.plan_fields])
        cls.__module__ = __name__  # picklable by reference: Numba's disk cache keys on it
        module[name] = plans[kernel] = cls
        rules[kernel] = (module[f"{kernel}_coefs"], module[kernel], rule.name,
                         ("param", "grad") + tuple(b.name for b in rule.buffers))
    return rules, plans


RULES, PLANS = _tables()


def plan_of(kernel, args):
    """The per-step scalars as the kernel's plan namedtuple of floats (one compiled
    signature per dtype, whatever mix of ints, bools and floats the plan returns)."""
    return PLANS[kernel](*[float(a) for a in args])
