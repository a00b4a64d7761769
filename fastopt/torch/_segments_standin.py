"""A pure-Python stand-in for a backend's segment engine (``backend.run_segments``:
same table, same checks, same results), for a backend that has none.

    run_segments(backend, kernel, dtype, ptrs, lengths, args, nthreads, check=True)

``ptrs`` is an (nseg, 2 + nbuf) ``np.uintp`` table: param, grad, then one column per
state buffer of the rule (a column of zeros: that buffer is absent); ``lengths`` the
elements per segment. Each segment is one call of the backend's per-array kernel on
views made from the addresses. ``check`` refuses a table where a written buffer
(param, state) overlaps any other buffer of the call, before anything is written.
"""

from __future__ import annotations

import ctypes

import numpy as np

_CTYPE = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_TYPESTR = {np.dtype(np.float32): "<f4", np.dtype(np.float64): "<f8"}


class _DeviceView:
    """A 1-D device array at a raw address, for the CUDA backend."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr, n, dtype):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": _TYPESTR[dtype],
                                         "data": (ptr, False), "version": 3,
                                         "strides": None}


def check_segments(ptrs: np.ndarray, lengths: np.ndarray, itemsize: int) -> None:
    """ValueError naming the first segment and slot whose written range overlaps
    another buffer of the call; grads (column 1) may overlap each other."""
    nseg, ncol = ptrs.shape
    present = ptrs.any(axis=0)
    cols = [c for c in range(ncol) if present[c]]
    if not cols or nseg == 0:
        return
    start = ptrs[:, cols].astype(np.uint64).T.reshape(-1)
    size = np.repeat(lengths.astype(np.uint64)[None, :] * np.uint64(itemsize),
                     len(cols), axis=0).reshape(-1)
    col = np.repeat(np.array(cols), nseg)
    seg = np.tile(np.arange(nseg), len(cols))
    keep = size > 0
    start, size, col, seg = start[keep], size[keep], col[keep], seg[keep]
    if start.size == 0:
        return
    order = np.argsort(start, kind="stable")
    start, end, col, seg = start[order], start[order] + size[order], col[order], seg[order]
    written = col != 1
    # the furthest end of any earlier range, and of any earlier written range
    end_all = np.maximum.accumulate(end)
    end_w = np.maximum.accumulate(np.where(written, end, np.uint64(0)))
    prev_all = np.concatenate(([np.uint64(0)], end_all[:-1]))
    prev_w = np.concatenate(([np.uint64(0)], end_w[:-1]))
    bad = np.where(written, prev_all > start, prev_w > start)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"segment {int(seg[k])}: slot {int(col[k])} overlaps another "
                         "buffer of the call (a written buffer must not share memory "
                         "with any other); nothing was written")


def run_segments(backend, kernel, dtype, ptrs, lengths, args, nthreads, check=True):
    dtype = np.dtype(dtype)
    if dtype not in _CTYPE:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    ptrs = np.asarray(ptrs)
    lengths = np.asarray(lengths)
    if ptrs.ndim != 2 or ptrs.shape[1] < 2 or lengths.shape != (ptrs.shape[0],):
        raise ValueError(f"ptrs must be (nseg, 2 + buffers) and lengths (nseg,), got "
                         f"{ptrs.shape} and {lengths.shape}")
    if check:
        check_segments(ptrs, lengths, dtype.itemsize)
    fn = getattr(backend, kernel)
    present = ptrs.any(axis=0)
    cuda = getattr(backend, "NAME", "") == "cuda"
    ctype = _CTYPE[dtype]
    for row, n in zip(ptrs.tolist(), lengths.tolist()):
        if n == 0:
            continue
        if cuda:
            views = [_DeviceView(a, n, dtype) if on else None
                     for a, on in zip(row, present)]
        else:
            views = [np.ctypeslib.as_array((ctype * n).from_address(a)) if on else None
                     for a, on in zip(row, present)]
        fn(*views, *args, nthreads)
