"""The Numba CUDA backend: the same kernels on arrays in GPU memory.

Any array that exposes ``__cuda_array_interface__`` works (Numba device arrays,
CuPy arrays, torch CUDA tensors) and is used in place: no host copy, no
synchronisation beyond the launch itself, which goes on the stream the
parameter's interface names (torch's current stream, say) so it is ordered
after the work that produced the gradient. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before Numba is imported) the simulator's
device arrays stand in for real ones.

Each kernel is a grid-stride loop around the same per-element functions as the
CPU backend (``_numba_math``), so one thread computes what one iteration of the
CPU loop computes, in float32 for float32 buffers. An absent state buffer is
passed as the parameter itself (read, never written) with a flag saying so: a
CUDA kernel cannot take ``None``.

``BLOCK_SIZE`` (threads per block) and ``MAX_BLOCKS`` (grid size cap; beyond it
threads loop) are module variables: tests set them small so that small inputs
span several blocks and the stride loop runs more than once.
"""

import numba
import numpy as np
from numba import cuda

from fastopt.backends import _numba_math as M
from fastopt.rules import KERNELS

NAME = "cuda"
BLOCK_SIZE = 256
MAX_BLOCKS = 4096

_SIM = bool(numba.config.ENABLE_CUDASIM)
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def max_threads():
    return 1


# --------------------------------------------------------------------------
# Device arrays: what counts as one, and what its interface says.
# --------------------------------------------------------------------------

if _SIM:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _SimArray

    def _is_device(x):
        return isinstance(x, _SimArray)

    def _interface(x):
        return x.__array_interface__  # the simulator forwards to its host array

    def _as_device(x):
        return x

else:
    def _is_device(x):
        return hasattr(x, "__cuda_array_interface__")

    def _interface(x):
        return x.__cuda_array_interface__

    def _as_device(x):
        if isinstance(x, cuda.devicearray.DeviceNDArray):
            return x
        # sync=False: ordering comes from launching on the array's stream
        return cuda.as_cuda_array(x, sync=False)


def _pointer_device(ptr):
    """The ordinal of the GPU that owns ``ptr``, or None when it cannot be told."""
    if _SIM or ptr == 0:
        return 0
    try:
        from numba.cuda.cudadrv import driver as drv
        from numba.cuda.cudadrv import enums
        if drv.USE_NV_BINDING:
            attr = drv.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
            return int(drv.driver.cuPointerGetAttribute(attr, drv.binding.CUdeviceptr(ptr)))
        import ctypes
        out = ctypes.c_int()
        drv.driver.cuPointerGetAttribute(ctypes.byref(out),
                                         enums.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
        return out.value
    except Exception:
        return None


def _device_of(x, ptr):
    dev = getattr(x, "device", None)
    idx = getattr(dev, "index", None)  # torch.device
    if idx is None:
        idx = getattr(dev, "id", None)  # cupy.cuda.Device
    if isinstance(idx, int):
        return idx
    return _pointer_device(ptr)


_streams: dict = {}


def _stream_of(desc):
    """The stream to launch on: the one the parameter's interface names, else 0."""
    handle = desc.get("stream") if not _SIM else None
    if not handle:
        return 0
    s = _streams.get(handle)
    if s is None:
        s = _streams[handle] = cuda.external_stream(handle)
    return s


# --------------------------------------------------------------------------
# The array helpers of the backend protocol.
# --------------------------------------------------------------------------

def is_device_array(obj):
    """Whether ``obj`` is an array this backend updates. Under the simulator its
    arrays have no ``__cuda_array_interface__`` (and do have
    ``__array_interface__``), so a caller routing arrays should ask this."""
    return _is_device(obj)


def as_array(obj):
    """``obj`` as a Numba device array sharing its memory, or TypeError."""
    if not _is_device(obj):
        raise TypeError(f"expected a CUDA array (__cuda_array_interface__), "
                        f"got {type(obj).__name__}")
    return _as_device(obj)


@cuda.jit
def _fill(out, value):
    start = cuda.grid(1)
    for i in range(start, out.shape[0], cuda.gridsize(1)):
        out[i] = value


def full(n, dtype, value, like=None):
    """A new device buffer of ``n`` elements filled with ``value``, on ``like``'s
    GPU (and of like's array library when that is torch or CuPy)."""
    dtype = np.dtype(dtype)
    mod = (type(like).__module__ or "") if like is not None else ""
    if mod.startswith("torch"):
        import torch
        return torch.full((n,), value, dtype=getattr(torch, dtype.name), device=like.device)
    if mod.startswith("cupy"):
        import cupy
        with like.device:
            return cupy.full(n, value, dtype=dtype)
    dev = None
    if like is not None and not _SIM:
        dev = _device_of(like, _interface(like)["data"][0])
    if dev is not None and dev != cuda.get_current_device().id:
        with cuda.gpus[dev]:
            return _full_here(n, dtype, value)
    return _full_here(n, dtype, value)


def _full_here(n, dtype, value):
    out = cuda.device_array(n, dtype=dtype)
    if n:
        _fill[_blocks(n), BLOCK_SIZE](out, dtype.type(value))
    return out


def to_host(buf):
    if _SIM:
        return np.array(buf.copy_to_host(), copy=True)
    # sync=True: the copy must see the work queued on the buffer's stream
    return cuda.as_cuda_array(buf, sync=True).copy_to_host()


def copy_from_host(dst, host):
    host = np.asarray(host)
    dst = as_array(dst)
    if host.dtype != dst.dtype or host.shape != dst.shape:
        raise TypeError(f"cannot copy a {host.dtype} array of shape {host.shape} into a "
                        f"{dst.dtype} device array of shape {dst.shape}")
    dst.copy_to_device(np.ascontiguousarray(host))


# --------------------------------------------------------------------------
# The kernels: one grid-stride loop per rule around its _numba_math pair.
# --------------------------------------------------------------------------

def _blocks(n):
    return max(1, min((n + BLOCK_SIZE - 1) // BLOCK_SIZE, MAX_BLOCKS))


def _kernel(element):
    @cuda.jit(cache=not _SIM)
    def kernel(p, g, s0, s1, s2, k, h0, h1, h2):
        start = cuda.grid(1)
        for i in range(start, p.shape[0], cuda.gridsize(1)):
            pi, a0, a1, a2 = element(p[i], g[i], s0[i], s1[i], s2[i], k, h0, h1, h2)
            p[i] = pi
            if h0:
                s0[i] = a0
            if h1:
                s1[i] = a1
            if h2:
                s2[i] = a2
    return kernel


_KERNELS = {kernel: _kernel(element) for kernel, (_, element, _, _) in M.RULES.items()}


def _describe(rule, name, x, writable):
    """(pointer, length, dtype, interface) of a device array, after checking it is
    one, 1-D, contiguous and (for buffers written) writable."""
    if x is None:
        raise TypeError(f"{rule}: {name} must be an array, got None")
    if not _is_device(x):
        raise TypeError(f"{rule}: {name} must be a CUDA array (__cuda_array_interface__), "
                        f"got {type(x).__name__}")
    desc = _interface(x)
    shape = tuple(desc["shape"])
    dtype = np.dtype(desc["typestr"])
    strides = desc.get("strides")
    if len(shape) != 1 or (strides is not None and shape[0] > 1
                           and tuple(strides) != (dtype.itemsize,)):
        raise ValueError(f"{rule}: {name} must be a C-contiguous 1-D array, "
                         f"got shape {shape} with strides {strides}")
    ptr, readonly = desc["data"]
    if writable and readonly:
        raise ValueError(f"{rule}: {name} is read-only")
    return ptr, shape[0], dtype, desc


def _run(kernel, param, grad, s0, s1, s2, c, nthreads):
    coefs, _, rule, names = M.RULES[kernel]
    arrays = (param, grad, s0, s1, s2)
    infos = []
    for k, x in enumerate(arrays):
        if x is None and k >= 2:
            infos.append(None)
            continue
        infos.append(_describe(rule, names[k], x, k != 1))
    dt = infos[0][2]
    if dt not in _DTYPES:
        raise TypeError(f"{rule}: param must be float32 or float64, got {dt}")
    n = infos[0][1]
    for k in range(1, 5):
        if infos[k] is not None and infos[k][2] != dt:
            raise TypeError(f"{rule}: {names[k]} has dtype {infos[k][2]}, param has dtype {dt}")
    for k in range(1, 5):
        if infos[k] is not None and infos[k][1] != n:
            raise ValueError(f"{rule}: {names[k]} has length {infos[k][1]}, "
                             f"param has length {n}")
    if n == 0:
        return
    dev = _device_of(param, infos[0][0])
    for k in range(1, 5):
        if infos[k] is not None:
            d = _device_of(arrays[k], infos[k][0])
            if d != dev:
                raise ValueError(f"{rule}: {names[k]} is on GPU {d}, param is on GPU {dev}; "
                                 "every buffer must be on the parameter's device")
    nbytes = n * dt.itemsize
    for k in range(5):
        for j in range(k + 1, 5):
            if infos[k] is None or infos[j] is None:
                continue
            a, b = infos[k][0], infos[j][0]
            if a < b + nbytes and b < a + nbytes:
                raise ValueError(f"{rule}: {names[j]} shares memory with {names[k]}; "
                                 "every buffer must be distinct")
    # the per-step scalars, cast once on the host to the buffers' type
    kc = coefs(c, dt.type)
    dev_arrays = [None if x is None else _as_device(x) for x in arrays]
    p = dev_arrays[0]
    s = [p if x is None else x for x in dev_arrays[2:]]
    launch = _KERNELS[kernel][_blocks(n), BLOCK_SIZE, _stream_of(infos[0][3])]
    if not _SIM and dev is not None and dev != cuda.get_current_device().id:
        with cuda.gpus[dev]:
            launch(p, dev_arrays[1], s[0], s[1], s[2], kc,
                   s0 is not None, s1 is not None, s2 is not None)
    else:
        launch(p, dev_arrays[1], s[0], s[1], s[2], kc,
               s0 is not None, s1 is not None, s2 is not None)


# --------------------------------------------------------------------------
# Entry points, with rules.pxi's signatures (nthreads is accepted and ignored).
# --------------------------------------------------------------------------

# one kernel per registry name: sgd, adam, ... (fastopt.rules.KERNELS)
_entry = M.entry_points(_run)
globals().update({name: _entry[name] for name in KERNELS})
