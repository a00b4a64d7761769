"""Array handling shared by the CPU backends (NumPy arrays in host memory)."""

import numpy as np

_ALIGN = 64  # one cache line; whole AVX2/AVX-512 vectors from element 0


def full(n, dtype, value, like=None):
    """A new 64-byte-aligned 1-D array of ``n`` elements filled with ``value``."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    out = raw[start:start + n * dtype.itemsize].view(dtype)
    out.fill(value)
    return out


def to_host(buf):
    return np.array(buf, copy=True)


def copy_from_host(dst, host):
    np.copyto(dst, host, casting="no")


def as_array(obj):
    """``obj`` as an ndarray sharing its memory, or TypeError."""
    if isinstance(obj, np.ndarray):
        return obj
    if obj is None or isinstance(obj, (list, tuple, str, bytes, int, float, complex, dict)):
        raise TypeError(f"expected an array, got {type(obj).__name__}")
    mod = type(obj).__module__ or ""
    if mod.startswith("torch") and hasattr(obj, "detach"):
        if obj.device.type != "cpu":
            raise TypeError(f"expected a CPU tensor, got one on {obj.device}")
        return obj.detach().numpy()  # shares storage
    if hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    try:
        memoryview(obj)
    except TypeError:
        raise TypeError(f"expected an array, got {type(obj).__name__}") from None
    return np.asarray(obj)
