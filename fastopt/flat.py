"""FlatParams: many tensors in one contiguous buffer, so one kernel call updates a
whole model. On the host (NumPy) or on a GPU: CuPy arrays, torch CUDA tensors
and Numba device arrays are packed into one device buffer of the same library."""

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

    Device arrays (CuPy arrays, torch CUDA tensors, Numba device arrays; all of
    one library, on one GPU) give a device ``data``/``grad`` of that library, on
    that GPU, with device ``views``/``grad_views``; the optimizer classes then
    update the whole model with one CUDA launch per step.
    """

    __slots__ = ("data", "grad", "views", "grad_views", "shapes", "offsets", "_ops")

    def __init__(self, arrays, dtype=None):
        if isinstance(arrays, np.ndarray) or not hasattr(arrays, "__iter__"):
            raise TypeError(f"arrays must be a list of arrays, got {type(arrays).__name__}")
        arrays = list(arrays)
        if not arrays:
            raise ValueError("arrays is empty: FlatParams needs at least one array")
        ops = _ops_for(arrays)
        arrays = ops.prepare(arrays)
        dtypes = [ops.dtype(a) for a in arrays]
        for i, dt in enumerate(dtypes):
            if dt.kind not in "fiub":
                raise TypeError(f"arrays[{i}] has dtype {dt}; expected real numbers")
        if dtype is None:
            dtype = np.result_type(*dtypes)
            if dtype.kind in "iub":
                dtype = np.dtype(np.float32)
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self._ops = ops
        self.shapes = tuple(tuple(a.shape) for a in arrays)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = tuple(int(o) for o in np.concatenate(([0], np.cumsum(sizes))))
        n = self.offsets[-1]
        self.data = ops.zeros(n, dtype)
        self.grad = ops.zeros(n, dtype)
        self.views = self._split(self.data)
        self.grad_views = self._split(self.grad)
        for view, a in zip(self.views, arrays):
            ops.assign(view, a)

    def _split(self, buf):
        return [self._ops.view(buf, lo, hi, shape)
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def __len__(self):
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def dtype(self):
        """The NumPy dtype of the buffers (whatever their library)."""
        return self._ops.dtype(self.data)

    @property
    def device(self) -> str:
        """"cpu", or "cuda:<ordinal>" for device buffers."""
        return self._ops.device

    def zero_grad(self) -> None:
        self._ops.zero(self.grad)

    def copy_to(self, arrays) -> None:
        """Write the packed values back into ``arrays`` (same shapes, in order;
        of this FlatParams' library: NumPy arrays for host buffers)."""
        if len(arrays) != len(self.shapes):
            raise ValueError(f"arrays has {len(arrays)} entries, FlatParams has "
                             f"{len(self.shapes)}")
        for i, (dst, view) in enumerate(zip(arrays, self.views)):
            if tuple(np.shape(dst) if isinstance(dst, np.ndarray) else dst.shape) != \
                    tuple(view.shape):
                raise ValueError(f"arrays[{i}] has shape {tuple(dst.shape)}, expected "
                                 f"{tuple(view.shape)}")
            self._ops.copy_back(dst, view)

    def __repr__(self):
        where = "" if self.device == "cpu" else f" on {self.device}"
        return (f"FlatParams({len(self.shapes)} arrays, {self.numel} x "
                f"{self.dtype.name}{where})")


# --------------------------------------------------------------------------
# One small class per array library: how to allocate, view, copy and zero.
# --------------------------------------------------------------------------

def _library(a) -> str:
    mod = (type(a).__module__ or "").split(".")[0]
    if mod == "numpy" or isinstance(a, (list, tuple, int, float)):
        return "numpy"
    if mod == "torch" and getattr(getattr(a, "device", None), "type", "cpu") == "cpu":
        return "numpy"  # a CPU tensor: packed on the host, as before
    if mod in ("torch", "cupy"):
        return mod
    from fastopt import backends
    if backends._is_device_array(a):
        return "numba"
    return "numpy"


def _ops_for(arrays):
    libs = [_library(a) for a in arrays]
    first = libs[0]
    for i, lib in enumerate(libs):
        if lib != first:
            raise TypeError(f"arrays[{i}] is a {lib} array, arrays[0] a {first} array: "
                            "FlatParams packs arrays of one library (host or one GPU "
                            "library), copy them first")
    return {"numpy": _Host, "torch": _Torch, "cupy": _CuPy, "numba": _Numba}[first]()


class _Host:
    device = "cpu"

    def prepare(self, arrays):
        out = []
        for a in arrays:
            if (type(a).__module__ or "").startswith("torch"):
                a = a.detach().numpy()
            out.append(np.asarray(a))
        return out

    def dtype(self, a):
        return np.dtype(a.dtype)

    def zeros(self, n, dtype):
        return full(n, dtype, 0)

    def view(self, buf, lo, hi, shape):
        return buf[lo:hi].reshape(shape)

    def assign(self, view, a):
        view[...] = a

    def zero(self, buf):
        buf.fill(0)

    def copy_back(self, dst, view):
        np.copyto(dst, view, casting="same_kind")


def _same_device(arrays, device_of):
    devs = [device_of(a) for a in arrays]
    for i, d in enumerate(devs):
        if d != devs[0]:
            raise ValueError(f"arrays[{i}] is on GPU {d}, arrays[0] on GPU {devs[0]}: "
                             "FlatParams packs arrays of one device")
    return devs[0]


class _Torch:
    def prepare(self, arrays):
        import torch
        self.torch = torch
        arrays = [a.detach() for a in arrays]
        self.dev = arrays[0].device
        _same_device(arrays, lambda a: a.device.index)
        self.device = str(self.dev)
        return arrays

    def dtype(self, a):
        try:
            return np.dtype(str(a.dtype).replace("torch.", ""))
        except TypeError:  # bfloat16 and friends: NumPy has no such type
            raise TypeError(f"a tensor has dtype {a.dtype}; FlatParams packs float32 or "
                            "float64 (pass dtype=..., or convert the tensors)") from None

    def zeros(self, n, dtype):
        return self.torch.zeros(n, dtype=getattr(self.torch, np.dtype(dtype).name),
                                device=self.dev)

    def view(self, buf, lo, hi, shape):
        return buf[lo:hi].view(shape)

    def assign(self, view, a):
        view.copy_(a)

    def zero(self, buf):
        buf.zero_()

    def copy_back(self, dst, view):
        with self.torch.no_grad():
            dst.copy_(view)


class _CuPy(_Host):
    """CuPy arrays behave as NumPy's; only allocation and copying back differ."""

    def prepare(self, arrays):
        import cupy
        self.cupy = cupy
        self.dev = arrays[0].device
        _same_device(arrays, lambda a: a.device.id)
        self.device = f"cuda:{self.dev.id}"
        return arrays

    def zeros(self, n, dtype):
        with self.dev:
            return self.cupy.zeros(n, dtype=dtype)

    def copy_back(self, dst, view):
        dst[...] = view


class _Numba:
    """Numba device arrays (or anything with ``__cuda_array_interface__`` that is
    neither torch nor CuPy, viewed as one), and the simulator's arrays."""

    def prepare(self, arrays):
        from fastopt import backends
        self.cuda = backends.load("cuda")
        out = [self.cuda.as_array(a) for a in arrays]
        dev = _same_device(out, lambda a: self.cuda._device_of(
            a, self.cuda._interface(a)["data"][0]))
        self.device = f"cuda:{dev}"
        for i, a in enumerate(out):
            if a.size > 1 and not a.is_c_contiguous():
                raise ValueError(f"arrays[{i}] must be C-contiguous, got strides "
                                 f"{a.strides}")
        return out

    def dtype(self, a):
        return np.dtype(a.dtype)

    def zeros(self, n, dtype):
        return self.cuda.full(n, dtype, 0)

    def view(self, buf, lo, hi, shape):
        return buf[lo:hi].reshape(shape)

    def assign(self, view, a):
        if a.size == 0:
            return
        flat_view, flat_a = view.reshape(a.size), a.reshape(a.size)
        if np.dtype(a.dtype) == np.dtype(view.dtype):
            flat_view.copy_to_device(flat_a)
        else:
            self.cuda.copy_cast(flat_view, flat_a)

    def zero(self, buf):
        self.cuda.fill(buf, 0)

    def copy_back(self, dst, view):
        if np.dtype(dst.dtype) != np.dtype(view.dtype):
            raise TypeError(f"cannot copy {np.dtype(view.dtype)} values into a "
                            f"{np.dtype(dst.dtype)} device array")
        self.cuda.as_array(dst).copy_to_device(view)
