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
