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


# --------------------------------------------------------------------------
# Low-precision storage (docs/rules.md "Storage types"): the element
# conversions of the staged path. Everything is integer bit manipulation over
# the float32's bits, so the CPU loops, the CUDA kernels and the simulator (plain
# Python on NumPy scalars) round alike; the rules' float32 math is unchanged.
# Integers are worked in int64 (Python ints under the simulator) and masked to
# 32 bits after every product, so no unsigned-overflow or signedness question
# arises on any target.
# --------------------------------------------------------------------------

BLK = 256            # elements per block of the staged path (and per q8 absmax)

# type codes of a slot, constants of the compiled loops
T_F32, T_F64, T_F16, T_BF16, T_Q8 = 0, 1, 2, 3, 4
TYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "q8")


def f32_bits(x):
    """The bits of a float32 as a non-negative integer."""
    return int(np.float32(x).view(np.uint32))


def bits_f32(u):
    """The float32 whose bits are the integer ``u`` (0 <= u < 2**32)."""
    return np.uint32(u).view(np.float32)


@overload(f32_bits, target="cpu")
def _f32_bits_cpu(x):
    return lambda x: _bitcast_i32(x) & 0xFFFFFFFF


@overload(bits_f32, target="cpu")
def _bits_f32_cpu(u):
    return lambda u: _bitcast_f32(np.int32(np.uint32(u)))


def _make_bitcasts():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def bitcast_i32(typingctx, x):
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.sext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
        return types.int64(x), codegen

    @intrinsic
    def bitcast_f32(typingctx, u):
        if u != types.int32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(u), codegen
    return bitcast_i32, bitcast_f32


_bitcast_i32, _bitcast_f32 = _make_bitcasts()
_DEVICE_BITCASTS = []


def use_device_bitcasts():
    """Register ``f32_bits``/``bits_f32`` for the CUDA target (libdevice's
    ``float_as_int``/``int_as_float``); called by ``numba_cuda`` as
    ``use_rounded_device_products`` is."""
    if _DEVICE_BITCASTS:
        return
    from numba import types
    from numba.cuda import libdevice

    @overload(f32_bits, target="cuda")
    def _f32_bits_cuda(x):
        if x == types.float32:
            return lambda x: np.int64(libdevice.float_as_int(x)) & 0xFFFFFFFF
        return None

    @overload(bits_f32, target="cuda")
    def _bits_f32_cuda(u):
        if isinstance(u, types.Integer):
            return lambda u: libdevice.int_as_float(np.int32(np.uint32(u)))
        return None

    _DEVICE_BITCASTS.extend((_f32_bits_cuda, _bits_f32_cuda))


@register_jitable
def bf16_to_f32(h):
    return bits_f32((int(h) & 0xFFFF) << 16)


@register_jitable
def f32_to_bf16(x):
    # torch's c10::BFloat16 round-to-nearest-even; NaN -> 0x7FC0
    if x != x:
        return np.uint16(0x7FC0)
    u = f32_bits(x)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@register_jitable
def f32_to_bf16_sr(x, r):
    # stochastic rounding with 16 random bits r; NaN -> 0x7FC0
    if x != x:
        return np.uint16(0x7FC0)
    return np.uint16((f32_bits(x) + r) >> 16)


@register_jitable
def f16_to_f32(h):
    # exact widening of IEEE binary16 (subnormals, inf; a NaN keeps its payload and
    # is quiet, as F16C's vcvtph2ps and C's (float) of a _Float16 make it)
    h = int(h) & 0xFFFF
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        if m != 0:
            return bits_f32(sign | 0x7FC00000 | (m << 13))
        return bits_f32(sign | 0x7F800000)
    if e == 0:
        if m == 0:
            return bits_f32(sign)
        e = 113                     # 127 - 14: the exponent of 2**-14, before normalising
        while (m & 0x400) == 0:
            m <<= 1
            e -= 1
        return bits_f32(sign | (e << 23) | ((m & 0x3FF) << 13))
    return bits_f32(sign | ((e + 112) << 23) | (m << 13))


@register_jitable
def f32_to_f16(x):
    # IEEE round-to-nearest-even (C _Float16, NumPy's astype(float16)); a NaN keeps
    # the top of its payload and is quiet
    u = f32_bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return np.uint16(sign | 0x7E00 | ((a & 0x7FFFFF) >> 13))
    if a >= 0x477FF000:             # 65520 and up (ties to even: 65536) -> inf
        return np.uint16(sign | 0x7C00)
    if a >= 0x38800000:             # normal: 2**-14 and up
        return np.uint16(sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13))
    if a <= 0x33000000:             # 2**-25 and below: ties to even -> 0
        return np.uint16(sign)
    shift = 126 - (a >> 23)         # 14..24
    m = (a & 0x7FFFFF) | 0x800000
    return np.uint16(sign | ((m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift))


@register_jitable
def mix32(x):
    x = int(x) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


@register_jitable
def sr_segment_key(key, s):
    """The per-segment key of stochastic rounding: mix32(key ^ mix32(s + 0x9E3779B9))."""
    return mix32(int(key) ^ mix32(int(s) + 0x9E3779B9))


@register_jitable
def sr_bits(ks, i):
    """The 16 random bits of element i of the segment with key ks."""
    return mix32(int(ks) ^ ((int(i) * 0x85EBCA6B) & 0xFFFFFFFF)) & 0xFFFF


def sr_call_key(seed, step):
    """A call's key from a seed and a step (both taken mod 2**32)."""
    return mix32(int(seed) ^ mix32((int(step) * 0x27D4EB2F) & 0xFFFFFFFF))


@register_jitable
def q8_code(y, bounds):
    """The code of y in [-1, 1]: how many of the 255 sorted float32 midpoints are
    below y (torch.bucketize: nearest code, ties to the lower one). NaN -> 0, not
    reached: q8_clamp sends a NaN to 1."""
    if y != y:
        return np.uint8(0)
    lo, hi = 0, 255                 # the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < y:
            lo = mid + 1
        else:
            hi = mid
    return np.uint8(lo)


@register_jitable
def q8_scale(am):
    """1 / absmax, or 0 where absmax is 0 or NaN."""
    one, zero = np.float32(1), np.float32(0)
    return one / am if am > zero else zero


@register_jitable
def q8_clamp(y):
    # y clamped to [-1, 1], a NaN to 1 (the compiled engine's minss/maxss; a block
    # holding a NaN has absmax NaN and decodes to NaN whatever its codes)
    one = np.float32(1)
    if y != y:
        return one
    return one if y > one else (-one if y < -one else y)


def q8_bounds(qmap):
    """The 255 float32 midpoints of a sorted 256-entry map: (q[j] + q[j+1]) / 2,
    the sum rounded to float32, then halved."""
    q = np.asarray(qmap, dtype=np.float32)
    return ((q[:-1] + q[1:]) / np.float32(2)).astype(np.float32)


@register_jitable
def abs_bits(x):
    """|x|'s bits: they order as |x| does, and a NaN's are above every number's."""
    return f32_bits(x) & 0x7FFFFFFF
