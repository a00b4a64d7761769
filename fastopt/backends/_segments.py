"""The segment table's Python-side rules, shared by the Numba CPU and CUDA backends
(the compiled backend does the same in C, in kernels/engine.pxi).

A call's buffers are given per segment in slot order: param (0), grad (1), then the
rule's state buffers (2, 3, 4). Every segment has the same set of state buffers. No
buffer that is written (every slot but the gradient) may share a byte with another
buffer of the call; gradients are only read and may share memory with each other.
"""

from __future__ import annotations

import bisect

import numpy as np

NSLOT = 5   # param, grad and three state buffers (rules.MAX_BUFFERS)
GRAD = 1


def clash_message(a: str, b: str) -> str:
    return (f"{a} shares memory with {b}; every buffer that is written must be distinct "
            "(pass a copy)")


def slots(params, buffers, nbuf):
    """Yield (segment, slot, array) for every param and present state buffer, after
    checking that every segment has the same state buffers; returns nothing else."""
    params, buffers = list(params), [tuple(b) for b in buffers]
    if not params or len(buffers) != len(params):
        raise ValueError(f"{len(params)} params and {len(buffers)} buffer tuples")
    present = None
    for s, (p, bufs) in enumerate(zip(params, buffers)):
        bufs = bufs + (None,) * (nbuf - len(bufs))
        pattern = tuple(b is not None for b in bufs)
        if present is None:
            present = pattern
        elif pattern != present:
            raise ValueError(f"param {s} has state buffers {pattern}, param 0 has "
                             f"{present}; one call needs one set")
        yield s, 0, p
        for j, b in enumerate(bufs):
            if b is not None:
                yield s, 2 + j, b


def check_grad_list(grads, n, prefix=""):
    """A list step's gradients: a list or tuple of one array per param."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{prefix}grad must be a list of {n} arrays (one per param), got "
                        f"{type(grads).__name__}")
    if len(grads) != n:
        raise ValueError(f"{prefix}grad has {len(grads)} arrays, param has {n}")


def present_slots(table) -> tuple:
    """Which of the three state slots a bound table uses (a constant of the loop)."""
    return tuple(bool(table[0, slot]) for slot in range(2, NSLOT))


class Written:
    """The byte ranges of the buffers a call writes, sorted and checked distinct;
    a gradient is checked against them by bisection."""

    __slots__ = ("ranges", "starts")

    def __init__(self, ranges):
        # (lo, segment * NSLOT + slot, hi, label): ties sort as the compiled engine's
        ranges = sorted(r for r in ranges if r[2] > r[0])
        for (alo, _, ahi, na), (blo, _, bhi, nb) in zip(ranges, ranges[1:]):
            if blo < ahi:
                raise ValueError(clash_message(nb, na))
        self.ranges = [(lo, hi, label) for lo, _, hi, label in ranges]
        self.starts = [r[0] for r in self.ranges]

    def check_read(self, lo, hi, label):
        k = bisect.bisect_left(self.starts, hi) - 1
        if k >= 0 and hi > lo and self.ranges[k][1] > lo:
            raise ValueError(clash_message(label, self.ranges[k][2]))


def element_type(dtype, names, allowed):
    """``run_segments``' ``dtype`` (one for every slot, or a tuple of one per slot) as
    the one element type the kernels are specialised for, or TypeError."""
    per_slot = dtype if isinstance(dtype, tuple) else (dtype,) * len(names)
    if len(per_slot) != len(names):
        raise ValueError(f"dtype has {len(per_slot)} entries; the kernel has {len(names)} "
                         f"slots ({', '.join(names)})")
    try:
        dts = [np.dtype(d) for d in per_slot]
    except TypeError as exc:
        raise TypeError(f"dtype must be NumPy dtypes, got {dtype!r}: {exc}") from None
    if len(set(dts)) != 1 or dts[0] not in allowed:
        raise TypeError("no kernel is specialised for the element types "
                        f"({', '.join(f'{n} {d}' for n, d in zip(names, dts))}); every "
                        "slot must be float32, or every slot float64")
    return dts[0]


def table_of(ptrs, lengths, names, itemsize, check=True):
    """``run_segments``' arguments as a (nseg, NSLOT) uint64 table, the lengths'
    prefix sums and the present state slots, after the checks (nothing written)."""
    ptrs = np.asarray(ptrs)
    lengths = np.asarray(lengths, dtype=np.int64)
    nseg = ptrs.shape[0] if ptrs.ndim == 2 else -1
    if ptrs.ndim != 2 or ptrs.shape[1] != len(names):
        raise ValueError(f"ptrs must have {len(names)} columns ({', '.join(names)}), got "
                         f"shape {ptrs.shape}")
    if lengths.shape != (nseg,):
        raise ValueError(f"lengths has {lengths.shape[0]} entries, ptrs has {nseg} rows")
    if (lengths < 0).any():
        raise ValueError(f"lengths[{int(np.argmax(lengths < 0))}] is negative")
    live = lengths > 0
    table = np.zeros((nseg, NSLOT), dtype=np.uint64)
    table[:, :ptrs.shape[1]] = ptrs
    present = []
    for slot in range(2, NSLOT):
        col = table[live, slot] != 0
        if col.any() != col.all():
            raise ValueError(f"{names[slot]} is present in some segments and absent in "
                             "others")
        present.append(bool(live.any() and col.all()))
    for slot in (0, GRAD):
        if (table[live, slot] == 0).any():
            raise ValueError(f"{names[slot]} has a null pointer")
    if check:
        written, reads = [], []
        for s in np.nonzero(live)[0]:
            nbytes = int(lengths[s]) * itemsize
            for slot in range(len(names)):
                lo = int(table[s, slot])
                if not lo:
                    continue
                label = f"{names[slot]}[{s}]"
                if slot == GRAD:
                    reads.append((lo, lo + nbytes, label))
                else:
                    written.append((lo, int(s) * NSLOT + slot, lo + nbytes, label))
        kept = Written(written)
        for lo, hi, label in reads:
            kept.check_read(lo, hi, label)
    starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return table, starts, tuple(present)


# --------------------------------------------------------------------------
# Low-precision storage: the staged path's per-slot types and q8 inputs.
# Type codes as in _numba_math: 0 float32, 1 float64, 2 float16, 3 bfloat16, 4 q8.
# --------------------------------------------------------------------------

T_F32, T_F64, T_F16, T_BF16, T_Q8 = 0, 1, 2, 3, 4
TYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "q8")
ITEMSIZE = (4, 8, 2, 2, 1)
BLK = 256
_BY_NAME = {name: code for code, name in enumerate(TYPE_NAMES)}


def type_code(d, what="dtype"):
    """A slot's element type (a NumPy dtype, ml_dtypes.bfloat16, or one of the names
    'float32', 'float64', 'float16', 'bfloat16', 'q8'; uint8 is q8) as its code."""
    if isinstance(d, str) and d in _BY_NAME:
        return _BY_NAME[d]
    try:
        dt = np.dtype(d)
    except TypeError:
        raise TypeError(f"{what} must be a NumPy dtype or one of {', '.join(TYPE_NAMES)}, "
                        f"got {d!r}") from None
    if dt == np.float32:
        return T_F32
    if dt == np.float64:
        return T_F64
    if dt == np.float16:
        return T_F16
    if dt == np.uint8:
        return T_Q8
    if dt.name == "bfloat16":
        return T_BF16
    raise TypeError(f"{what} {dt} is not an element type fastopt stores (float32, float64, "
                    "float16, bfloat16, uint8 codes of q8)")


def slot_codes(dtype, names):
    """``run_segments``' ``dtype`` (one for all slots or one per slot) as type codes."""
    per_slot = dtype if isinstance(dtype, (tuple, list)) else (dtype,) * len(names)
    if len(per_slot) != len(names):
        raise ValueError(f"dtype has {len(per_slot)} entries; the kernel has {len(names)} "
                         f"slots ({', '.join(names)})")
    return tuple(type_code(d, f"{names[k]}'s dtype") for k, d in enumerate(per_slot))


def check_codes(codes, present, names, copy_code=None, sr=False, copy_label="copy_to"):
    """Refuse (TypeError, naming the slot) a signature no engine runs: float64 with any
    other type, q8 outside the state buffers, a copy that is not float32/float16/
    bfloat16, stochastic rounding of a param that is not bfloat16. ``present``: the
    three state slots' presence (absent slots do not count)."""
    if copy_code is not None and copy_code not in (T_F32, T_F16, T_BF16):
        raise TypeError(f"{copy_label} must be float32, float16 or bfloat16, got "
                        f"{TYPE_NAMES[copy_code]}")
    live = [k for k in range(len(codes)) if k < 2 or present[k - 2]]
    types = {codes[k] for k in live}
    if copy_code is not None:
        types.add(copy_code)
    if T_F64 in types and len(types) > 1:
        desc = ", ".join(f"{names[k]} {TYPE_NAMES[codes[k]]}" for k in live)
        if copy_code is not None:
            desc += f", copy {TYPE_NAMES[copy_code]}"
        bad = next((names[k] for k in live if codes[k] != T_F64), copy_label)
        if codes[0] != T_F64:
            bad = next(names[k] for k in live if codes[k] == T_F64)
        raise TypeError(f"{bad}: float64 runs only with every slot float64 ({desc})")
    for k in (0, GRAD):
        if codes[k] == T_Q8:
            raise TypeError(f"{names[k]} cannot be q8: 8-bit block-wise storage is for "
                            "state buffers")
    if sr and codes[0] != T_BF16:
        raise TypeError(f"stochastic rounding (sr_key) is for a bfloat16 param, "
                        f"{names[0]} is {TYPE_NAMES[codes[0]]}")


def is_uniform(codes, present, copy_code=None, sr=False):
    """Whether a call runs the plain loops (every live slot float32, or every one
    float64, no copy, no stochastic rounding) rather than the staged path."""
    live = {codes[k] for k in range(len(codes)) if k < 2 or present[k - 2]}
    return copy_code is None and not sr and len(live) == 1 and live <= {T_F32, T_F64}


def effective_codes(codes, present):
    """The five slots' codes for the staged loops: absent slots as float32."""
    out = [T_F32] * NSLOT
    for k, c in enumerate(codes):
        if k < 2 or present[k - 2]:
            out[k] = c
    return tuple(out)


def qmap_tables(qmaps, codes, present, names):
    """The (NSLOT, 256) float32 maps and (NSLOT, 255) float32 midpoints of the q8
    columns (zeros elsewhere), after checking each map: C-contiguous float32, 256
    finite values, sorted. ``qmaps``: None, or one entry (None or a map) per column."""
    maps = np.zeros((NSLOT, 256), dtype=np.float32)
    bounds = np.zeros((NSLOT, 255), dtype=np.float32)
    q8 = [k for k in range(2, len(codes)) if codes[k] == T_Q8 and present[k - 2]]
    if not q8:
        return maps, bounds
    if qmaps is None:
        raise ValueError(f"{names[q8[0]]} is q8 and no qmaps were given")
    qmaps = tuple(qmaps)
    if len(qmaps) == len(codes) - 2:     # one per state buffer
        qmaps = (None, None) + qmaps
    if len(qmaps) != len(codes):
        raise ValueError(f"qmaps has {len(qmaps)} entries; the kernel has {len(codes)} "
                         f"slots ({', '.join(names)})")
    for k in q8:
        q = qmaps[k]
        if q is None:
            raise ValueError(f"{names[k]} is q8 and qmaps[{k}] is None")
        if not isinstance(q, np.ndarray) or q.dtype != np.float32 or q.shape != (256,):
            raise TypeError(f"qmaps[{k}] ({names[k]}) must be a float32 NumPy array of 256 "
                            f"values, got {getattr(q, 'dtype', type(q).__name__)} "
                            f"{getattr(q, 'shape', '')}")
        if not (np.abs(q) <= 1).all() or (np.diff(q) < 0).any():
            raise ValueError(f"qmaps[{k}] ({names[k]}): an 8-bit map must be 256 float32 "
                             "values in [-1, 1], sorted ascending")
        maps[k] = q
        bounds[k] = _q8_bounds_checked(q, f"qmaps[{k}] ({names[k]})")
    return maps, bounds


_Q8_CHECKED: dict = {}


def _q8_bounds_checked(q, label):
    """The map's 255 midpoints, after the compiled engine's check that no bf16-wide
    bucket of float32 values holds two of them (its lookup table would not be exact
    there, so every backend refuses such a map alike)."""
    key = q.tobytes()
    hit = _Q8_CHECKED.get(key)
    if hit is not None:
        return hit
    bounds = ((q[:-1] + q[1:]) / np.float32(2)).astype(np.float32)
    u = np.arange(65536, dtype=np.uint32)
    lo, hi = (u << 16).view(np.float32), ((u << 16) | 0xFFFF).view(np.float32)
    neg = (u & 0x8000) != 0
    vmin, vmax = np.where(neg, hi, lo), np.where(neg, lo, hi)
    inside = (np.searchsorted(bounds, vmax, side="left")
              - np.searchsorted(bounds, vmin, side="left"))
    special = (u & 0x7F80) == 0x7F80
    if np.any(inside[~special] > 1):
        raise ValueError(f"{label}: this 8-bit map is too fine for the kernels' lookup "
                         "(two midpoints within one bf16 step)")
    if len(_Q8_CHECKED) < 64:
        _Q8_CHECKED[key] = bounds
    return bounds


def staged_table(ptrs, lengths, names, codes, absmax, copy, copy_code, check=True):
    """``run_segments``' staged arguments: (table, starts, present, absmax table (nseg,
    NSLOT) uint64, copy addresses (nseg,) uint64), after the checks of table_of and
    of the q8 and copy inputs, and the overlap check over every buffer written
    (param, state, absmax, copy) with per-slot element sizes. Nothing is written."""
    table, starts, present = table_of(ptrs, lengths, names, 1, False)
    nseg = table.shape[0]
    lengths = np.diff(starts)
    live = lengths > 0
    q8 = [k for k in range(2, len(names)) if codes[k] == T_Q8 and present[k - 2]]
    am = np.zeros((nseg, NSLOT), dtype=np.uint64)
    if absmax is not None:
        absmax = np.asarray(absmax)
        if absmax.shape != (nseg, len(names)):
            raise ValueError(f"absmax must have shape ({nseg}, {len(names)}), got "
                             f"{absmax.shape}")
        am[:, :len(names)] = absmax
    for k in q8:
        if absmax is None:
            raise ValueError(f"{names[k]} is q8 and no absmax was given")
        if (am[live, k] == 0).any():
            s = int(np.nonzero(live & (am[:, k] == 0))[0][0])
            raise ValueError(f"absmax[{s}] of {names[k]} is a null pointer")
    cp = np.zeros(nseg, dtype=np.uint64)
    if copy is not None:
        copy = np.asarray(copy)
        if copy.shape != (nseg,):
            raise ValueError(f"copy must have shape ({nseg},), got {copy.shape}")
        cp[:] = copy
        if (cp[live] == 0).any():
            raise ValueError(f"copy[{int(np.nonzero(live & (cp == 0))[0][0])}] is a null "
                             "pointer")
    if check:
        written, reads = [], []
        for s in np.nonzero(live)[0]:
            n = int(lengths[s])
            for slot in range(len(names)):
                lo = int(table[s, slot])
                if not lo:
                    continue
                label = f"{names[slot]}[{s}]"
                hi = lo + n * ITEMSIZE[codes[slot]]
                if slot == GRAD:
                    reads.append((lo, hi, label))
                else:
                    written.append((lo, int(s) * NSLOT + slot, hi, label))
            for k in q8:
                lo = int(am[s, k])
                written.append((lo, int(s) * NSLOT + k, lo + 4 * ((n + BLK - 1) // BLK),
                                f"absmax of {names[k]}[{s}]"))
            if copy is not None:
                lo = int(cp[s])
                written.append((lo, int(s) * NSLOT + NSLOT, lo + n * ITEMSIZE[copy_code],
                                f"copy[{s}]"))
        kept = Written(written)
        for lo, hi, label in reads:
            kept.check_read(lo, hi, label)
    return table, starts, present, am, cp
