"""FlatParams: many tensors in one contiguous buffer, so one kernel call updates a
whole model."""

from __future__ import annotations

import numpy as np

from fastopt._checks import FLOAT_DTYPES
from fastopt.backends._host import full


class FlatParams:
    """Packs arrays of any shapes into one contiguous 1-D buffer.

    ``data`` and ``grad`` are 1-D and share one layout; ``views[i]`` and
    ``grad_views[i]`` are arrays of the i-th original shape that are views into
    them. Write a model's gradients into ``grad_views`` (or ``grad`` directly) and
    call ``opt.step(flat.grad)`` once per step::

        flat = fastopt.FlatParams([w1, b1, w2, b2])
        opt = fastopt.Adam(flat, lr=1e-3)
        ...
        opt.step(flat.grad)

    The arrays given are copied in; from then on ``views`` are the parameters
    (``copy_to`` writes them back into arrays of the original shapes).
    """

    __slots__ = ("data", "grad", "views", "grad_views", "shapes", "offsets")

    def __init__(self, arrays, dtype=None):
        if isinstance(arrays, np.ndarray) or not hasattr(arrays, "__iter__"):
            raise TypeError(f"arrays must be a list of arrays, got {type(arrays).__name__}")
        arrays = [np.asarray(a) for a in arrays]
        if not arrays:
            raise ValueError("arrays is empty: FlatParams needs at least one array")
        if dtype is None:
            dtype = np.result_type(*arrays)
            if dtype.kind in "iub":
                dtype = np.dtype(np.float32)
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        for i, a in enumerate(arrays):
            if a.dtype.kind not in "fiub":
                raise TypeError(f"arrays[{i}] has dtype {a.dtype}; expected real numbers")
        self.shapes = tuple(a.shape for a in arrays)
        sizes = [int(a.size) for a in arrays]
        self.offsets = tuple(int(o) for o in np.concatenate(([0], np.cumsum(sizes))))
        n = self.offsets[-1]
        self.data = full(n, dtype, 0)
        self.grad = full(n, dtype, 0)
        self.views = self._split(self.data)
        self.grad_views = self._split(self.grad)
        for view, a in zip(self.views, arrays):
            view[...] = a

    def _split(self, buf):
        return [buf[lo:hi].reshape(shape)
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def __len__(self):
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def dtype(self):
        return self.data.dtype

    def zero_grad(self) -> None:
        self.grad.fill(0)

    def copy_to(self, arrays) -> None:
        """Write the packed values back into ``arrays`` (same shapes, in order)."""
        if len(arrays) != len(self.shapes):
            raise ValueError(f"arrays has {len(arrays)} entries, FlatParams has "
                             f"{len(self.shapes)}")
        for i, (dst, view) in enumerate(zip(arrays, self.views)):
            if np.shape(dst) != view.shape:
                raise ValueError(f"arrays[{i}] has shape {np.shape(dst)}, expected "
                                 f"{view.shape}")
            np.copyto(dst, view, casting="same_kind")

    def __repr__(self):
        return (f"FlatParams({len(self.shapes)} arrays, {self.numel} x "
                f"{self.data.dtype.name})")
