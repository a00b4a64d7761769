"""Argument checks with messages that name the argument and its value.

The hot path does not call these: the kernels check lengths and overlap in C and
the typed-buffer acquisition checks dtype, layout and writability. Only when a
kernel refuses its arguments does the Python layer come here, to find the first
problem and say it in words (nothing has been written at that point).
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# what the optimizer classes step (by dtype name: bfloat16 is ml_dtypes' NumPy type):
# float16/bfloat16 parameters and gradients run on the compiled engine's staged path
PARAM_DTYPES = ("float32", "float64", "float16", "bfloat16")
# the dtypes a parameter copy (``step(grad, copy_to=...)``) may have
COPY_DTYPES = ("float32", "float16", "bfloat16")


def _dtype_list(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

# The largest step count accepted from outside (+1): the per-step plans convert t to
# float64, which a Python int beyond ~1.8e308 would overflow
MAX_STEP = 2 ** 63

# NumPy 2 moved byte_bounds to numpy.lib.array_utils
try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # NumPy < 2
    _byte_bounds = np.byte_bounds


def _describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        return f"array(shape={obj.shape}, dtype={obj.dtype})"
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(name: str, obj, backend):
    """``obj`` as the backend's 1-D array type without a copy; TypeError naming ``name``.

    A host array of any shape becomes its flat view (``reshape(-1)`` of a C-contiguous
    array shares its memory); a non-contiguous one has no such view: ValueError.
    """
    if obj is None:
        raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 array, "
                        "got None")
    if isinstance(obj, (list, tuple)):
        raise TypeError(f"{name} must be one array, got a {type(obj).__name__} of "
                        f"{len(obj)} items; an optimizer built from one array (or a "
                        "FlatParams) takes one gradient; build it from a list of arrays "
                        "to step several")
    obj = _bf16_tensor_view(obj)
    try:
        arr = backend.as_array(obj)
    except TypeError as exc:
        raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 array "
                        f"(NumPy array of any shape, buffer, or CPU tensor), got "
                        f"{_describe(obj)}: {exc}") from None
    if isinstance(arr, np.ndarray) and arr.ndim != 1:
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (fastopt works on its flat "
                             f"view, without a copy), got shape {arr.shape} with strides "
                             f"{arr.strides}")
        arr = arr.reshape(-1)  # a view: C-contiguous arrays reshape without a copy
    return arr


def _bf16_tensor_view(obj):
    """A CPU torch bfloat16 tensor as an ml_dtypes bfloat16 array sharing its memory
    (torch's ``.numpy()`` has no bfloat16); anything else unchanged."""
    if not (type(obj).__module__ or "").startswith("torch") or \
            str(getattr(obj, "dtype", "")) != "torch.bfloat16":
        return obj
    try:
        import ml_dtypes
        import torch
    except ImportError:
        return obj
    if obj.device.type != "cpu":
        return obj
    return obj.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def check_array(name: str, arr, *, writable: bool = True, dtypes=None):
    """dtype, dimensionality, layout and writability of one array. ``dtypes``: the
    accepted dtype names (default float32 and float64)."""
    dtype = np.dtype(arr.dtype)
    if dtypes is None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")
    elif dtype.name not in dtypes or not (dtype.isnative or dtype.itemsize == 1):
        raise TypeError(f"{name} must have dtype {_dtype_list(dtypes)}, got {dtype}")
    shape = tuple(arr.shape)
    if len(shape) != 1:
        # host arrays arrive flat (coerce); device arrays are taken as they are
        raise ValueError(f"{name} must be 1-D, got shape {shape} (a device array is not "
                         "flattened for you: pass its contiguous .reshape(-1))")
    if isinstance(arr, np.ndarray):
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous, got strides {arr.strides}")
        if writable and not arr.flags.writeable:
            raise ValueError(f"{name} is read-only (writeable=False); fastopt updates it "
                             "in place")
    else:
        strides = getattr(arr, "strides", None)
        if strides not in (None, (dtype.itemsize,)) and shape[0] > 1:
            raise ValueError(f"{name} must be C-contiguous, got strides {strides}")


def _byte_range(arr):
    if isinstance(arr, np.ndarray):
        return _byte_bounds(arr)
    # device arrays; Numba's simulator arrays carry only the host interface
    iface = (getattr(arr, "__cuda_array_interface__", None)
             or getattr(arr, "__array_interface__", None))
    ptr = iface["data"][0]
    return ptr, ptr + arr.shape[0] * np.dtype(arr.dtype).itemsize


def check_buffers(names, arrays, dtypes=None):
    """Check ``arrays`` (param first, then grad and state; ``None`` = absent) as one
    set: each array alone, then dtype and length against param, then overlap.
    ``dtypes``: the accepted dtype names (default float32 and float64); a float32
    param may then take a float16 or bfloat16 gradient."""
    param = arrays[0]
    for k, (name, arr) in enumerate(zip(names, arrays)):
        if arr is None:
            continue
        check_array(name, arr, writable=(name != "grad"), dtypes=dtypes)
        if k == 0:
            continue
        if dtypes is not None and name == "grad" and np.dtype(param.dtype) == np.float32 \
                and np.dtype(arr.dtype).name in ("float16", "bfloat16"):
            pass   # a narrower gradient for a float32 master
        elif np.dtype(arr.dtype) != np.dtype(param.dtype):
            raise TypeError(f"{name} has dtype {np.dtype(arr.dtype)}, param has dtype "
                            f"{np.dtype(param.dtype)}; they must match")
        if arr.shape[0] != param.shape[0]:
            raise ValueError(f"{name} has length {arr.shape[0]}, param has length "
                             f"{param.shape[0]}")
    present = [(n, a) for n, a in zip(names, arrays) if a is not None and a.shape[0] > 0]
    for i, (na, a) in enumerate(present):
        alo, ahi = _byte_range(a)
        for nb, b in present[i + 1:]:
            blo, bhi = _byte_range(b)
            if alo < bhi and blo < ahi:
                raise ValueError(f"{nb} shares memory with {na}; every buffer must be "
                                 "distinct (pass a copy)")


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int (the 1-based step count t), got {step!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (t is incremented before use), got {step}")
    if step >= MAX_STEP:
        raise ValueError(f"step must be < 2**63, got {step}")
    return int(step)
