"""Low-precision storage in plain NumPy: the reference every backend's 8-bit and
bfloat16 state is held to.

* ``dynamic_map(signed)``: the 256 float32 values of the 8-bit dynamic code
  (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning"), equal
  bit for bit to the map bitsandbytes' 8-bit optimizers store as ``qmap1`` (signed)
  and ``qmap2`` (unsigned).
* ``quantize_blocks`` / ``dequantize_blocks``: block-wise 8-bit state. Each block of
  256 elements keeps its largest magnitude (``absmax``) in float32 and each element
  the code of the map value nearest to ``x / absmax`` (ties to the lower code).
* ``bounds`` and ``bucket_table``: the 255 decision bounds between neighbouring codes,
  and a 65,536-entry table that finds a code with one lookup and one comparison.
* ``bf16_round`` / ``bf16_stochastic``: float32 to bfloat16 bits, round to nearest
  even or stochastically with a counter-based hash of (key, segment, index).
* ``step8``: one step of an 8-bit rule (Adam, SGD with momentum, RMSprop, Adagrad,
  Lion as bitsandbytes defines them) in float64 from the dequantized state, and the
  nearest codes of the result: what a kernel's float32 step is measured against.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BLOCK", "dynamic_map", "bounds", "bucket_table", "codes_by_table",
           "quantize_blocks", "dequantize_blocks", "nearest_codes",
           "bf16_round", "bf16_stochastic", "bf16_to_float", "mix32", "sr_key",
           "sr_bits", "step8", "STEP8_RULES"]

BLOCK = 256
_F32 = np.float32


# ---------------------------------------------------------------------------
# The dynamic map
# ---------------------------------------------------------------------------

def _spaced(n: int) -> np.ndarray:
    """n float32 values evenly spaced over [0.1, 1], the float32 way torch.linspace
    makes them: step = (1 − 0.1f)/(n − 1) in float32, then the first half counted up
    from 0.1f and the second half down from 1, each as one fused multiply-add (one
    rounding of the exact value). The exact value has at most 31 significant bits
    here, so float64 holds it and the single rounding is the cast to float32."""
    lo, hi = _F32(0.1), _F32(1.0)
    step = np.float64(_F32((hi - lo) / _F32(n - 1)))
    k = np.arange(n, dtype=np.float64)
    up = np.float64(lo) + step * k
    down = np.float64(hi) - step * (n - 1 - k)
    return np.where(k < n // 2, up, down).astype(_F32)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 8-bit dynamic code: float32[256], sorted ascending.

    One decade per exponent e = 0..6, scaled by 10^(e−6): in decade e, the midpoints
    of 2^e + 1 (signed) or 2^(e+1) + 1 (unsigned: the sign bit is spent on the
    fraction) evenly spaced points of [0.1, 1]; the signed code mirrors them below
    zero. Then 0 and 1. The signed code has 127 + 127 + 2 = 256 values, the unsigned
    254 + 2. Arithmetic as the original: midpoints in float32, the decade's scale
    rounded to float32 and multiplied in float32."""
    values = []
    for e in range(7):
        n = (2 ** e if signed else 2 ** (e + 1)) + 1
        pts = _spaced(n)
        mids = (pts[:-1] + pts[1:]) / _F32(2.0)
        scaled = _F32(10.0 ** (e - 6)) * mids
        values.append(scaled)
        if signed:
            values.append(-scaled)
    values.append(np.array([0.0, 1.0], dtype=_F32))
    out = np.sort(np.concatenate(values).astype(_F32))
    assert out.shape == (256,)
    return out


# ---------------------------------------------------------------------------
# Nearest code: bounds, and the bf16-bucket table
# ---------------------------------------------------------------------------

def _check_qmap(qmap) -> np.ndarray:
    q = np.asarray(qmap)
    if q.dtype != _F32 or q.shape != (256,):
        raise ValueError(f"qmap must be float32[256], got {q.dtype}{list(q.shape)}")
    if not np.all(q[1:] >= q[:-1]):
        raise ValueError("qmap must be sorted ascending")
    return q


def bounds(qmap) -> np.ndarray:
    """The 255 decision bounds b_j = (q_j + q_{j+1}) / 2, the sum rounded to float32,
    then halved: code(y) = #{j : b_j < y} is the nearest code, ties to the lower."""
    q = _check_qmap(qmap)
    return (q[:-1] + q[1:]) / _F32(2.0)


def nearest_codes(y, qmap) -> np.ndarray:
    """Codes of the values ``y`` (float32, already scaled into [−1, 1]): the number of
    bounds below each (torch.bucketize(y, bounds)); NaN is clamped to 1 as the kernels
    clamp it (the top code, where bucketize puts NaN too)."""
    y = np.asarray(y, dtype=_F32)
    y = np.where(np.isnan(y), _F32(1.0), y)
    c = np.searchsorted(bounds(qmap), y, side="left")
    return c.astype(np.uint8)


def _bucket_ranges():
    """The smallest and largest float32 whose upper 16 bits are u, for every u (NaN
    for buckets that hold only NaNs)."""
    u = np.arange(65536, dtype=np.uint32)
    lo_bits = (u << 16).view(_F32)
    hi_bits = ((u << 16) | np.uint32(0xFFFF)).view(_F32)
    neg = (u & 0x8000) != 0
    lo = np.where(neg, hi_bits, lo_bits)   # negative: more low bits, more negative
    hi = np.where(neg, lo_bits, hi_bits)
    return lo, hi


def bucket_table(qmap):
    """(T, exact): T is uint8[65536], indexed by the upper 16 bits u of a float32 y,
    with code(y) = T[u] + (B[T[u]] < y), B the bounds padded with +inf to 256.

    T[u] counts the bounds below every value of bucket u, so the one comparison
    adds the bound inside the bucket, if any. ``exact`` says whether every bucket of
    finite values holds at most one bound (then the formula equals ``nearest_codes``
    for every y in [−1, 1] and NaN). Buckets holding NaNs map to 0, as NaN does (the
    two that also hold ±inf: the clamp to [−1, 1] keeps infinities out)."""
    b = bounds(qmap)
    lo, hi = _bucket_ranges()
    with np.errstate(invalid="ignore"):
        below = np.searchsorted(b, lo, side="left")    # bounds < lo
        upto = np.searchsorted(b, hi, side="right")    # bounds <= hi
    u = np.arange(65536)
    nanish = (u & 0x7F80) == 0x7F80    # exponent all ones: NaNs (and ±inf)
    inside = np.where(nanish, 0, upto - below)
    table = np.where(nanish, 0, below).astype(np.uint8)
    return table, bool(inside.max() <= 1)


def padded_bounds(qmap) -> np.ndarray:
    return np.concatenate([bounds(qmap), np.array([np.inf], dtype=_F32)])


def codes_by_table(y, table, qmap) -> np.ndarray:
    """``T[u] + (B[T[u]] < y)``: the table method, as a kernel evaluates it (after
    clamping y to [−1, 1], NaN to 1)."""
    y = np.ascontiguousarray(y, dtype=_F32)
    y = np.where(np.isnan(y), _F32(1.0), np.clip(y, _F32(-1.0), _F32(1.0))).astype(_F32)
    t = table[y.view(np.uint32) >> 16]
    return (t + (padded_bounds(qmap)[t] < y)).astype(np.uint8)


# ---------------------------------------------------------------------------
# Block-wise quantisation
# ---------------------------------------------------------------------------

def quantize_blocks(x, qmap, block: int = BLOCK):
    """(codes uint8[n], absmax float32[ceil(n/block)]) of float32 ``x``, per block:
    am = max|x| (NaN if any is NaN), inv = 1/am in float32 (0 when am is not > 0),
    y = clamp(x·inv, −1, 1), code = nearest_codes(y)."""
    x = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    n = x.shape[0]
    nb = -(-n // block)
    pad = np.zeros(nb * block, dtype=_F32)
    pad[:n] = x
    blocks = pad.reshape(nb, block)
    am = np.abs(blocks).max(axis=1)     # padding zeros never raise a max
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(am > 0, _F32(1.0) / am, _F32(0.0)).astype(_F32)
        y = np.clip(blocks * inv[:, None], _F32(-1.0), _F32(1.0)).reshape(-1)[:n]
    return nearest_codes(y, qmap), am.astype(_F32)


def dequantize_blocks(codes, absmax, qmap, block: int = BLOCK) -> np.ndarray:
    """float32[n]: qmap[code] · absmax[block], one float32 multiply."""
    q = _check_qmap(qmap)
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    absmax = np.asarray(absmax, dtype=_F32).reshape(-1)
    n = codes.shape[0]
    if absmax.shape[0] != -(-n // block):
        raise ValueError(f"absmax has {absmax.shape[0]} entries; {n} codes in blocks of "
                         f"{block} need {-(-n // block)}")
    with np.errstate(invalid="ignore"):     # NaN or inf absmax times a zero code
        return q[codes] * np.repeat(absmax, block)[:n]


# ---------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------

_U32 = np.uint32


def bf16_round(x) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round to nearest even; NaN → 0x7FC0."""
    x = np.ascontiguousarray(x, dtype=_F32)
    u = x.view(_U32)
    r = (u + _U32(0x7FFF) + ((u >> _U32(16)) & _U32(1))) >> _U32(16)
    return np.where(np.isnan(x), _U32(0x7FC0), r).astype(np.uint16)


def bf16_to_float(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(_U32) << _U32(16)).view(_F32)


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply, wrapping)."""
    x = np.asarray(x, dtype=_U32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U32(16))
        x = x * _U32(0x7FEB352D)
        x = x ^ (x >> _U32(15))
        x = x * _U32(0x846CA68B)
        x = x ^ (x >> _U32(16))
    return x


def sr_key(seed: int, step: int) -> int:
    """The per-call key from a seed and a step count (both taken modulo 2^32)."""
    with np.errstate(over="ignore"):
        s = _U32(step % 2**32) * _U32(0x27D4EB2F)
    return int(mix32(_U32(seed % 2**32) ^ mix32(s)))


def sr_bits(key: int, segment: int, n: int, start: int = 0) -> np.ndarray:
    """The 16 random bits of elements start..start+n−1 of a segment."""
    with np.errstate(over="ignore"):
        ks = mix32(_U32(key % 2**32) ^ mix32(_U32((segment + 0x9E3779B9) % 2**32)))
        i = np.arange(start, start + n, dtype=np.uint64).astype(_U32)
        return mix32(ks ^ (i * _U32(0x85EBCA6B))) & _U32(0xFFFF)


def bf16_stochastic(x, key: int, segment: int = 0, start: int = 0) -> np.ndarray:
    """float32 → bfloat16 bits, rounded up with probability equal to the dropped
    fraction: (u + r) >> 16 with r the element's 16 random bits; NaN → 0x7FC0."""
    x = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    u = x.view(_U32)
    r = sr_bits(key, segment, x.shape[0], start)
    out = (u + r) >> _U32(16)
    return np.where(np.isnan(x), _U32(0x7FC0), out).astype(np.uint16)


# ---------------------------------------------------------------------------
# One 8-bit optimizer step, exactly (float64)
# ---------------------------------------------------------------------------

def _adam8(p, g, s, hp, t):
    m, v = s
    b1, b2 = hp["betas"]
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    if wd > 0:   # decoupled, as AdamW (bitsandbytes' Adam8bit decays the same way)
        p = p * (1.0 - lr * wd)
    denom = np.sqrt(v) / math.sqrt(1.0 - b2 ** t) + hp["eps"]
    return p - lr / (1.0 - b1 ** t) * m / denom, (m, v)


def _momentum8(p, g, s, hp, t):
    (b,) = s
    g = g + hp.get("weight_decay", 0.0) * p
    b = g if t == 1 else hp["momentum"] * b + g   # no dampening
    return p - hp["lr"] * b, (b,)


def _rmsprop8(p, g, s, hp, t):
    (v,) = s
    a = hp["alpha"]
    g = g + hp.get("weight_decay", 0.0) * p
    v = a * v + (1.0 - a) * g * g
    return p - hp["lr"] * g / (np.sqrt(v) + hp["eps"]), (v,)


def _adagrad8(p, g, s, hp, t):
    (v,) = s
    g = g + hp.get("weight_decay", 0.0) * p
    v = v + g * g
    return p - hp["lr"] * g / (np.sqrt(v) + hp["eps"]), (v,)


def _lion8(p, g, s, hp, t):
    (m,) = s
    b1, b2 = hp["betas"]
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    if wd > 0:
        p = p * (1.0 - lr * wd)
    p = p - lr * np.sign(b1 * m + (1.0 - b1) * g)
    return p, (b2 * m + (1.0 - b2) * g,)


# bitsandbytes' names of its rules (optimizer_name) -> the float64 step
STEP8_RULES = {"adam": _adam8, "momentum": _momentum8, "rmsprop": _rmsprop8,
               "adagrad": _adagrad8, "lion": _lion8}


def _nearest64(x, qmap, block):
    """Nearest codes of float64 values with float64 block maxima (ties to the
    lower code): the exact requantisation the kernels approximate in float32."""
    q = np.asarray(qmap, dtype=np.float64)
    mid = (q[:-1] + q[1:]) / 2.0
    n = x.shape[0]
    nb = -(-n // block)
    pad = np.zeros(nb * block)
    pad[:n] = x
    am = np.abs(pad.reshape(nb, block)).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(am[:, None] > 0, pad.reshape(nb, block) / am[:, None], 0.0)
    y = np.clip(y.reshape(-1)[:n], -1.0, 1.0)
    y = np.where(np.isnan(y), 1.0, y)
    c = np.searchsorted(mid, y, side="left")
    return c.astype(np.uint8), am


def step8(name, param, grad, codes, absmax, qmaps, hp, t, block: int = BLOCK):
    """One step of bitsandbytes' 8-bit rule ``name`` ('adam', 'momentum', 'rmsprop',
    'adagrad', 'lion') in float64.

    The state is dequantized as stored (float32 ``qmap[code]·absmax``), the update
    runs in float64 from float64 copies of ``param`` and ``grad``, and the new state
    is requantized to the nearest codes with float64 block maxima. Returns
    (new param float64, new codes, new absmax float64, new state float64), the last
    three one entry per state buffer. Nothing passed in is written."""
    p = np.asarray(param, dtype=np.float64).reshape(-1)
    g = np.asarray(grad, dtype=np.float64).reshape(-1)
    state = tuple(dequantize_blocks(c, a, q, block).astype(np.float64)
                  for c, a, q in zip(codes, absmax, qmaps))
    p, state = STEP8_RULES[name](p, g, state, hp, t)
    new_codes, new_absmax = [], []
    for s, q in zip(state, qmaps):
        c, a = _nearest64(s, q, block)
        new_codes.append(c)
        new_absmax.append(a)
    return p, new_codes, new_absmax, state
