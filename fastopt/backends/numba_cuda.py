"""The Numba CUDA backend: the same kernels on arrays in GPU memory.

Any array that exposes ``__cuda_array_interface__`` works (Numba device arrays,
CuPy arrays, torch CUDA tensors) and is used in place: no host copy, no
synchronisation beyond the launch itself. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before Numba is imported) the simulator's
device arrays stand in for real ones.

**Bound steps.** ``bind(kernel, param, buffers)`` describes and checks the
parameter and its state once (pointers, lengths, dtype, device ordinal,
overlap, grid size, kernel variant, stream policy) and returns a ``Bound``
whose ``step(grad, args, nthreads)`` checks only the gradient and launches. A
gradient seen before (the same Numba/simulator array, or a torch tensor whose
pointer, length and dtype have not changed) reuses the Numba view made of it
the first time, so a step makes no driver query and imports nothing. On a real
GPU, with ``FASTOPT_CUDA_DIRECT_LAUNCH=1``, the compiled kernel is looked up
once (``dispatcher.compile``) and launched directly (``kernel.launch``), skipping
Numba's per-call argument typing and overload resolution. It is off by default:
it was written against numba-cuda 0.30.4's source without a GPU, and stays
opt-in until the GPU lane's ``test_gpu_direct_launch_equals_dispatcher_launch``
has passed on one; the default launches through Numba's dispatcher. Numba still converts the six arguments to C values at each
launch; packing them once and changing only the gradient pointer and the
scalars would go below Numba's API (driver-level launch) and is left for a GPU
profile to justify.
The plain kernel entry points (``adam(param, grad, ...)``) bind and step once.

**Streams.** A torch gradient's launch goes on torch's current stream of the
parameter's device, read at each step (torch's interface names no stream). Any
other array's launch goes on the stream its ``__cuda_array_interface__`` names
(CuPy's current stream, a Numba array's stream), else on the default stream.

**Kernels.** A grid-stride loop around the same per-element functions as the
CPU backend (``_numba_math``), so one thread computes what one iteration of the
CPU loop computes, in float32 for float32 buffers. One kernel is compiled per
rule and pattern of present state buffers: the presence flags are constants of
the kernel, so an absent buffer is never read or written (the parameter is
passed in its slot because a CUDA kernel cannot take ``None``). The grid is
``SMs x (threads per SM / BLOCK_SIZE)`` blocks, worked out once per device,
and no more blocks than the buffer needs.

**Rounding.** NVVM contracts a multiply feeding an add into an FMA by default,
even without fastmath, which would make the GPU round differently from the
CPU. ``_numba_math`` writes every product as ``_mul(a, b)``, which this module
maps to libdevice's ``fmul_rn``/``dmul_rn`` (PTX ``mul.rn``: rounded on its
own, never fused); adds, divisions and square roots are IEEE-rounded by NVVM's
defaults (no fastmath, so ``-prec-div=1 -prec-sqrt=1 -ftz=0``). So the CUDA
kernels should compute the CPU kernels' results bit for bit. The simulator
cannot show contraction: tests/test_cuda_backend.py checks that the kernels'
LLVM IR has no bare multiply left, and the GPU lane (tests/test_cuda_gpu.py)
checks the bits on a real GPU (not yet run: no GPU was available).

**Not done: 16-byte vector loads.** Numba CUDA has no way to load a ``float4``
from a ``float32`` array, and whether NVVM's load/store vectoriser merges four
scalar loads cannot be seen under the simulator. The loop uses coalesced scalar
loads. The plan, to be measured on a GPU: pass each buffer also as a
``(n // 4, 4)`` view when all five pointers are 16-byte aligned, let each
thread handle one row with the four element calls unrolled, check the PTX for
``ld.global.v4.f32`` (``dispatcher.inspect_asm``), and handle the ``n % 4``
tail with the scalar loop.

``BLOCK_SIZE`` (threads per block) and ``MAX_BLOCKS`` (a cap on the grid;
``None``: sized to the device) are module variables read when a step is bound:
tests set them small so that small inputs span several blocks and the stride
loop runs more than once.
"""

import os

import numba
import numpy as np
from numba import cuda

from fastopt.backends import _numba_math as M
from fastopt.backends import _segments as S
from fastopt.rules import KERNELS

NAME = "cuda"
BLOCK_SIZE = 256
MAX_BLOCKS = None

_SIM = bool(numba.config.ENABLE_CUDASIM)
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

if not _SIM:
    from numba.cuda.cudadrv import driver as _drv
    from numba.cuda.cudadrv import enums as _enums
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _NumbaArray
    M.use_rounded_device_products()
    M.use_device_bitcasts()
else:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _NumbaArray


def max_threads():
    return 1


# --------------------------------------------------------------------------
# Device arrays: what counts as one, and what its interface says.
# --------------------------------------------------------------------------

def _is_torch(x):
    return (type(x).__module__ or "").startswith("torch")


def _plain(x):
    """``x`` without autograd: torch refuses the CUDA array interface of a tensor
    that requires grad, and fastopt writes parameters in place anyway."""
    if _is_torch(x) and getattr(x, "requires_grad", False):
        return x.detach()
    return x


if _SIM:
    def _is_device(x):
        return isinstance(x, _NumbaArray)

    def _interface(x):
        return x.__array_interface__  # the simulator forwards to its host array

    def _as_device(x):
        return x

else:
    def _is_device(x):
        if _is_torch(x) and hasattr(x, "is_cuda"):
            # torch's interface raises RuntimeError for a tensor that requires grad
            return bool(x.is_cuda)
        return hasattr(x, "__cuda_array_interface__")

    def _interface(x):
        return x.__cuda_array_interface__

    def _as_device(x):
        if isinstance(x, _NumbaArray):
            return x
        # sync=False: ordering comes from launching on the array's stream
        return cuda.as_cuda_array(_plain(x), sync=False)


def _pointer_device(ptr):
    """The ordinal of the GPU that owns ``ptr`` (a driver query: called when an
    array is first seen, never per step), or None when it cannot be told."""
    if _SIM or ptr == 0:
        return 0
    try:
        if _drv.USE_NV_BINDING:
            attr = _drv.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
            return int(_drv.driver.cuPointerGetAttribute(attr, _drv.binding.CUdeviceptr(ptr)))
        import ctypes
        out = ctypes.c_int()
        _drv.driver.cuPointerGetAttribute(ctypes.byref(out),
                                          _enums.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
        return out.value
    except Exception:
        return None


def _device_of(x, ptr):
    if _SIM:
        return 0
    dev = getattr(x, "device", None)
    idx = getattr(dev, "index", None)  # torch.device
    if idx is None:
        idx = getattr(dev, "id", None)  # cupy.cuda.Device
    if isinstance(idx, int):
        return idx
    return _pointer_device(ptr)


_streams: dict = {}


def _external_stream(handle):
    s = _streams.get(handle)
    if s is None:
        s = _streams[handle] = cuda.external_stream(handle)
    return s


def _stream_of(desc):
    """The stream an interface names, else 0 (the default stream)."""
    handle = desc.get("stream") if not _SIM else None
    return _external_stream(handle) if handle else 0


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


@cuda.jit
def _copy(out, src):
    # a cast where the dtypes differ (FlatParams packing Numba arrays)
    start = cuda.grid(1)
    for i in range(start, out.shape[0], cuda.gridsize(1)):
        out[i] = src[i]


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
    fill(out, value)
    return out


def fill(buf, value):
    """Set every element of the 1-D Numba device array ``buf`` to ``value``."""
    n = buf.shape[0]
    if n:
        _fill[_blocks(n, 0), BLOCK_SIZE](buf, np.dtype(buf.dtype).type(value))


def copy_cast(dst, src):
    """``dst[:] = src`` between Numba device arrays of one length, casting."""
    n = dst.shape[0]
    if n:
        _copy[_blocks(n, 0), BLOCK_SIZE](dst, src)


def to_host(buf):
    if _SIM:
        return np.array(buf.copy_to_host(), copy=True)
    # sync=True: the copy must see the work queued on the buffer's stream
    return cuda.as_cuda_array(_plain(buf), sync=True).copy_to_host()


def copy_from_host(dst, host):
    host = np.asarray(host)
    dst = as_array(dst)
    if host.dtype != dst.dtype or host.shape != dst.shape:
        raise TypeError(f"cannot copy a {host.dtype} array of shape {host.shape} into a "
                        f"{dst.dtype} device array of shape {dst.shape}")
    dst.copy_to_device(np.ascontiguousarray(host))


# --------------------------------------------------------------------------
# Grid size: SMs x resident blocks per SM, worked out once per device.
# --------------------------------------------------------------------------

_grid_caps: dict = {}


def _device_blocks(dev):
    cap = _grid_caps.get((dev, BLOCK_SIZE))
    if cap is None:
        sms, per_sm = 1, 2048
        if not _SIM:
            with cuda.gpus[dev or 0]:
                d = cuda.get_current_device()
                sms = int(getattr(d, "MULTIPROCESSOR_COUNT", 1))
                per_sm = int(getattr(d, "MAX_THREADS_PER_MULTI_PROCESSOR", 2048))
        cap = _grid_caps[(dev, BLOCK_SIZE)] = max(1, sms * max(1, per_sm // BLOCK_SIZE))
    return cap


def _blocks(n, dev):
    cap = _device_blocks(dev)
    if MAX_BLOCKS is not None:
        cap = min(cap, MAX_BLOCKS) if not _SIM else MAX_BLOCKS
    return max(1, min((n + BLOCK_SIZE - 1) // BLOCK_SIZE, cap))


# --------------------------------------------------------------------------
# The kernels: one grid-stride loop per rule and pattern of present buffers.
# --------------------------------------------------------------------------

def _make_kernel(element, h0, h1, h2):
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)

    @cuda.jit(cache=not _SIM)
    def kernel(p, g, s0, s1, s2, k):
        digest  # noqa: B018 (kept in the closure on purpose)
        start = cuda.grid(1)
        for i in range(start, p.shape[0], cuda.gridsize(1)):
            pi = p[i]
            # h0..h2 are constants: an absent buffer's load is compiled out (the
            # element function ignores the stand-in value)
            a0 = s0[i] if h0 else pi
            a1 = s1[i] if h1 else pi
            a2 = s2[i] if h2 else pi
            pi, a0, a1, a2 = element(pi, g[i], a0, a1, a2, k, h0, h1, h2)
            p[i] = pi
            if h0:
                s0[i] = a0
            if h1:
                s1[i] = a1
            if h2:
                s2[i] = a2
    return kernel


# --------------------------------------------------------------------------
# Segments: one launch over many arrays. The segment table (one row of addresses
# per array: param, grad, state buffers) and the prefix sums of the lengths live
# on the device; each thread finds the segment of its element by binary search
# and reads and writes through the addresses (_load/_store: an inttoptr and one
# access on the GPU; under the simulator, whose "device" memory is host memory,
# the same access through ctypes).
# --------------------------------------------------------------------------

if _SIM:
    import ctypes

    def _element(addr, i, t):
        """Element i of the array of type t at host address addr, as a 1-element view."""
        size = np.dtype(t).itemsize
        raw = (ctypes.c_char * size).from_address(int(addr) + int(i) * size)
        return np.frombuffer(raw, dtype=t)

    def _load(addr, i, like):
        return _element(addr, i, type(like))[0]

    def _store(addr, i, value):
        _element(addr, i, type(value))[0] = value

else:
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    def _addressing(addr, i, value):
        # the signatures both accessors accept: an integer address and index, a float
        # (integers: the staged path's bf16/f16 bits and q8 codes)
        return (isinstance(addr, _types.Integer) and isinstance(i, _types.Integer)
                and isinstance(value, (_types.Float, _types.Integer)))

    def _element_pointer(context, builder, sig, args, ty):
        index = context.cast(builder, args[1], sig.args[1], _types.int64)
        ptr = builder.inttoptr(args[0], context.get_value_type(ty).as_pointer())
        return builder.gep(ptr, [index])

    @_intrinsic
    def _load(typingctx, addr, i, like):
        if not _addressing(addr, i, like):
            return None

        def codegen(context, builder, sig, args):
            return builder.load(_element_pointer(context, builder, sig, args, like))
        return like(addr, i, like), codegen

    @_intrinsic
    def _store(typingctx, addr, i, value):
        if not _addressing(addr, i, value):
            return None

        def codegen(context, builder, sig, args):
            builder.store(args[2], _element_pointer(context, builder, sig, args, value))
            return context.get_dummy_value()
        return _types.void(addr, i, value), codegen


def _make_segment_kernel(element, h0, h1, h2):
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)

    @cuda.jit(cache=not _SIM)
    def kernel(P, starts, k):
        digest  # noqa: B018 (kept in the closure on purpose)
        nseg = P.shape[0]
        like = k[0]  # a value of the buffers' type (every plan starts with a real)
        for i in range(cuda.grid(1), starts[nseg], cuda.gridsize(1)):
            lo, hi = 0, nseg - 1
            while lo < hi:  # the segment holding element i
                mid = (lo + hi + 1) >> 1
                if starts[mid] <= i:
                    lo = mid
                else:
                    hi = mid - 1
            j = i - starts[lo]
            pi = _load(P[lo, 0], j, like)
            a0 = _load(P[lo, 2], j, like) if h0 else pi
            a1 = _load(P[lo, 3], j, like) if h1 else pi
            a2 = _load(P[lo, 4], j, like) if h2 else pi
            pi, a0, a1, a2 = element(pi, _load(P[lo, 1], j, like), a0, a1, a2, k,
                                     h0, h1, h2)
            _store(P[lo, 0], j, pi)
            if h0:
                _store(P[lo, 2], j, a0)
            if h1:
                _store(P[lo, 3], j, a1)
            if h2:
                _store(P[lo, 4], j, a2)
    return kernel


_SEGMENT_KERNELS: dict = {}


def segment_kernel_for(kernel, present):
    key = (kernel, tuple(bool(h) for h in present))
    k = _SEGMENT_KERNELS.get(key)
    if k is None:
        k = _SEGMENT_KERNELS[key] = _make_segment_kernel(M.RULES[kernel][1], *key[1])
    return k


_KERNELS: dict = {}


def kernel_for(kernel, present):
    """The compiled-on-first-use kernel of rule ``kernel`` for the presence flags
    ``present`` (three bools)."""
    key = (kernel, tuple(bool(h) for h in present))
    k = _KERNELS.get(key)
    if k is None:
        element = M.RULES[kernel][1]
        k = _KERNELS[key] = _make_kernel(element, *key[1])
    return k


# --------------------------------------------------------------------------
# Binding: everything but the gradient, once.
# --------------------------------------------------------------------------

def _describe(rule, name, x, writable):
    """(array, pointer, length, dtype, interface) of a device array, after checking
    it is one, 1-D, contiguous and (for buffers written) writable."""
    if x is None:
        raise TypeError(f"{rule}: {name} must be an array, got None")
    if not _is_device(x):
        raise TypeError(f"{rule}: {name} must be a CUDA array (__cuda_array_interface__), "
                        f"got {type(x).__name__}")
    x = _plain(x)
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
    return x, ptr, shape[0], dtype, desc


_TORCH_DTYPES: dict = {}


def _torch_dtype(t):
    """The NumPy dtype of a tensor, or None (bfloat16, say: NumPy has none)."""
    try:
        return _TORCH_DTYPES[t.dtype]
    except KeyError:
        try:
            dt = np.dtype(str(t.dtype).replace("torch.", ""))
        except TypeError:
            dt = None
        _TORCH_DTYPES[t.dtype] = dt
        return dt


class Bound:
    """One parameter and its state, bound to one kernel. ``step(grad, args,
    nthreads)`` checks ``grad`` (type, dtype, length, device, overlap) and
    launches; nothing is written when the check fails."""

    __slots__ = ("kernel", "rule", "names", "n", "dtype", "device", "coefs", "arrays",
                 "ranges",
                 "grid", "block", "dispatcher", "direct", "argtypes", "multi_gpu",
                 "torch_stream",
                 "g_obj", "g_key", "g_dev", "g_type", "g_stream")

    def __init__(self, kernel, param, buffers):
        coefs, _, rule, names = M.RULES[kernel]
        buffers = tuple(buffers) + (None,) * (3 - len(buffers))
        self.kernel, self.rule, self.names, self.coefs = kernel, rule, names, coefs
        p, pptr, n, dt, _ = _describe(rule, names[0], param, True)
        if dt not in _DTYPES:
            raise TypeError(f"{rule}: param must be float32 or float64, got {dt}")
        infos = [None if b is None else _describe(rule, names[2 + k], b, True)
                 for k, b in enumerate(buffers)]
        for k, info in enumerate(infos):
            if info is None:
                continue
            if info[3] != dt:
                raise TypeError(f"{rule}: {names[2 + k]} has dtype {info[3]}, "
                                f"param has dtype {dt}")
            if info[2] != n:
                raise ValueError(f"{rule}: {names[2 + k]} has {info[2]} elements, "
                                 f"param has {n}")
        dev = _device_of(p, pptr) if n else 0
        for k, info in enumerate(infos):
            if info is not None and n:
                d = _device_of(info[0], info[1])
                if d != dev:
                    raise ValueError(f"{rule}: {names[2 + k]} is on GPU {d}, param is on "
                                     f"GPU {dev}; every buffer must be on the parameter's "
                                     "device")
        nbytes = n * dt.itemsize
        # (name, lo, hi) of every present buffer, param first: the overlap check
        ranges = [(names[0], pptr, pptr + nbytes)]
        for k, info in enumerate(infos):
            if info is not None:
                ranges.append((names[2 + k], info[1], info[1] + nbytes))
        if n:
            for i, (na, alo, ahi) in enumerate(ranges):
                for nb, blo, bhi in ranges[i + 1:]:
                    if alo < bhi and blo < ahi:
                        raise ValueError(f"{rule}: {nb} shares memory with {na}; every "
                                         "buffer must be distinct")
        self.n, self.dtype, self.device, self.ranges = n, dt, dev, tuple(ranges)
        pd = _as_device(p)
        self.arrays = (pd,) + tuple(pd if info is None else _as_device(info[0])
                                    for info in infos)
        self.grid, self.block = (_blocks(n, dev) if n else 1), BLOCK_SIZE
        self.dispatcher = kernel_for(kernel, [info is not None for info in infos])
        self.direct = self.argtypes = None
        self.multi_gpu = (not _SIM) and len(cuda.gpus) > 1
        self.torch_stream = None
        if _is_torch(param):
            import torch  # binding is not the hot path
            self.torch_stream = torch.cuda.current_stream
        self.g_obj = self.g_key = self.g_dev = self.g_type = None
        self.g_stream = 0

    # -- the gradient ---------------------------------------------------------
    def _grad(self, grad):
        """The Numba view of ``grad`` and the stream to launch on. The view made
        of a gradient is kept for the next step while its (pointer, length,
        dtype) stay the same, and a Numba array seen last step is not looked at
        again: its pointer and shape cannot change."""
        if grad is self.g_obj:
            return self.g_dev, self.g_stream
        if _is_torch(grad):
            if grad.device.type != "cuda":
                raise TypeError(f"{self.rule}: grad must be a CUDA tensor, got one on "
                                f"{grad.device}")
            if grad.dim() != 1 or not grad.is_contiguous():
                raise ValueError(f"{self.rule}: grad must be a C-contiguous 1-D array, got "
                                 f"shape {tuple(grad.shape)} with strides {grad.stride()}")
            dt = _torch_dtype(grad)
            if dt is None:
                raise TypeError(f"{self.rule}: grad has dtype {grad.dtype}, param has dtype "
                                f"{self.dtype}")
            key = (grad.data_ptr(), grad.shape[0], dt)
            if self.torch_stream is None:
                import torch  # once per Bound, at the first torch gradient
                self.torch_stream = torch.cuda.current_stream
            handle = self.torch_stream(self.device).cuda_stream
            stream = _external_stream(handle) if handle else 0
        else:
            if grad is None or not _is_device(grad):
                raise TypeError(f"{self.rule}: grad must be a CUDA array "
                                f"(__cuda_array_interface__), got {type(grad).__name__}")
            _, ptr, n, dt, desc = _describe(self.rule, "grad", grad, False)
            key = (ptr, n, dt)
            stream = _stream_of(desc)
        if key != self.g_key:
            self._check_grad(*key, grad)
            self.g_key, self.g_dev, self.g_type = key, _as_device(grad), None
        self.g_obj = grad if isinstance(grad, _NumbaArray) else None
        self.g_stream = stream
        return self.g_dev, stream

    def _check_grad(self, ptr, n, dt, grad):
        rule = self.rule
        if dt != self.dtype:
            raise TypeError(f"{rule}: grad has dtype {dt}, param has dtype {self.dtype}")
        if n != self.n:
            raise ValueError(f"{rule}: grad has {n} elements, param has {self.n}")
        if n == 0:
            return
        d = _device_of(grad, ptr)
        if d != self.device:
            raise ValueError(f"{rule}: grad is on GPU {d}, param is on GPU {self.device}; "
                             "every buffer must be on the parameter's device")
        hi = ptr + n * self.dtype.itemsize
        for name, lo, top in self.ranges:
            if ptr < top and lo < hi:
                raise ValueError(f"{rule}: grad shares memory with {name}; every buffer "
                                 "must be distinct")

    # -- the step ---------------------------------------------------------------
    def step(self, grad, args, nthreads, copies=None, sr_key=None):
        if copies is not None:
            # a copy out: the staged path over the same arrays (no bf16 param here)
            p = self.arrays[0]
            bufs = tuple(None if a is p else a for a in self.arrays[1:])
            SingleStaged(StagedSegmentBound(self.kernel, [p], [bufs])).step(
                grad, args, nthreads, copies, sr_key)
            return
        self.step_c(grad, M.plan_of(self.kernel, args))

    def check_grad(self, grad):
        """Check ``grad`` as ``step`` would, writing nothing (bind_many's prepare)."""
        self._grad(grad)

    def step_c(self, grad, c):
        g, stream = self._grad(grad)
        if self.n == 0:
            return
        p, s0, s1, s2 = self.arrays
        launch_args = (p, g, s0, s1, s2, self.coefs(c, self.dtype.type))
        if self.multi_gpu:
            with cuda.gpus[self.device]:
                self._launch(launch_args, stream)
        else:
            self._launch(launch_args, stream)

    def _launch(self, args, stream):
        if self.direct is None:
            self._prepare_direct(args)
        if self.direct is False:
            self.dispatcher[self.grid, self.block, stream](*args)
            return
        if self.g_type is None:
            self.g_type = numba.typeof(args[1])
        if self.g_type != self.argtypes[1]:
            # a gradient Numba types differently (a read-only view, say): let the
            # dispatcher compile for it
            self.dispatcher[self.grid, self.block, stream](*args)
            return
        self.direct.launch(args, (self.grid, 1, 1), (self.block, 1, 1),
                           _direct_stream(stream), 0)

    def _prepare_direct(self, args):
        """Compile (or load from the disk cache) once and keep the kernel, so
        that later steps skip Numba's per-call typing and overload lookup. False
        (the dispatcher every step) under the simulator, when switched off, or
        when this Numba's kernels lack the methods used."""
        self.direct = False
        if _SIM or not DIRECT_LAUNCH:
            return
        d = self.dispatcher
        try:
            argtypes = tuple(d.typeof_pyval(a) for a in args)
            kern = d.compile(argtypes)
        except Exception:
            return  # the dispatcher call reports the compile error itself
        if callable(getattr(kern, "launch", None)):
            self.argtypes, self.direct = argtypes, kern


# Launch the compiled kernel directly (see Bound._launch) with
# FASTOPT_CUDA_DIRECT_LAUNCH=1; by default every step goes through Numba's
# dispatcher, until the direct path has been checked on a GPU (module docstring).
DIRECT_LAUNCH = os.environ.get("FASTOPT_CUDA_DIRECT_LAUNCH", "0") == "1"

# numba-cuda >= 0.2x's kernels take a cuda.core stream (its dispatcher converts);
# Numba's built-in CUDA target takes its own Stream or 0.
_to_core_stream = None if _SIM else getattr(_drv, "_to_core_stream", None)
_direct_streams: dict = {}


def _direct_stream(stream):
    if _to_core_stream is None:
        return stream
    hit = _direct_streams.get(id(stream))
    if hit is None:
        # keep the stream itself in the entry, so that its id stays its own
        hit = _direct_streams[id(stream)] = (stream, _to_core_stream(stream))
    return hit[1]


class SegmentBound:
    """Arrays of one dtype on one GPU and their state, one launch per step over a
    segment table on the device (``bind_many``). ``prepare(grads)`` checks every
    gradient (type, dtype, size, device, overlap) and writes nothing; ``run`` then
    launches; ``step`` is both."""

    __slots__ = ("kernel", "rule", "names", "dtype", "device", "coefs", "present", "sizes",
                 "table", "d_table", "d_starts", "written", "labels", "arrays", "grid",
                 "dispatcher", "grads", "stream", "torch_stream", "ready", "source", "twin",
                 "deleg", "held")

    def __init__(self, kernel, params, buffers, labels=None):
        coefs, _, rule, names = M.RULES[kernel]
        self.kernel, self.rule, self.names, self.coefs = kernel, rule, names, coefs
        params = list(params)
        self.labels = list(range(len(params))) if labels is None else list(labels)
        lab = lambda slot, s: f"{names[slot]}[{self.labels[s]}]"  # noqa: E731
        table = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        sizes, ranges, keep, dt, dev = [], [], [], None, None
        for s, slot, a in S.slots(params, buffers, len(names) - 2):
            x, ptr, n, adt, _ = _describe(rule, lab(slot, s), a, True)
            if dt is None:
                if adt not in _DTYPES:
                    raise TypeError(f"{rule}: {lab(slot, s)} must be float32 or float64, "
                                    f"got {adt}")
                dt = adt
            elif adt != dt:
                raise TypeError(f"{rule}: {lab(slot, s)} has dtype {adt}, {lab(0, 0)} has "
                                f"dtype {dt}; they must match")
            if slot == 0:
                sizes.append(n)
            elif n != sizes[s]:
                raise ValueError(f"{rule}: {lab(slot, s)} has {n} elements, {lab(0, s)} "
                                 f"has {sizes[s]}")
            if n:
                d = _device_of(x, ptr)
                if dev is None:
                    dev = d
                elif d != dev:
                    raise ValueError(f"{rule}: {lab(slot, s)} is on GPU {d}, {lab(0, 0)} "
                                     f"is on GPU {dev}")
                ranges.append((ptr, s * S.NSLOT + slot, ptr + n * adt.itemsize,
                               lab(slot, s)))
            table[s, slot] = ptr
            keep.append(x)
        try:
            self.written = S.Written(ranges)
        except ValueError as exc:
            raise ValueError(f"{rule}: {exc}") from None
        self.dtype, self.device, self.present = dt, dev or 0, S.present_slots(table)
        self.sizes, self.table, self.arrays = sizes, table, keep
        starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.d_starts = cuda.to_device(starts)
        self.d_table = None
        self.grid = _blocks(int(starts[-1]), self.device) if starts[-1] else 1
        self.dispatcher = segment_kernel_for(kernel, self.present)
        self.source = (params, [tuple(b) for b in buffers], labels)
        self.twin = self.deleg = self.held = None
        self.grads = None
        self.stream = 0
        self.torch_stream = None
        self.ready = False

    def prepare(self, grads, copies=None, sr_key=None):
        self.ready = False
        self.deleg = None
        if copies is not None:
            # a copy out: the staged path over the same arrays (its twin, kept; no
            # bf16 param here, so sr_key changes nothing)
            if self.twin is None:
                self.twin = StagedSegmentBound(self.kernel, *self.source)
            self.twin.prepare(grads, copies, sr_key)
            self.deleg, self.ready = self.twin, True
            return
        S.check_grad_list(grads, len(self.sizes), f"{self.rule}: ")
        ptrs = []
        stream = 0
        for s, g in enumerate(grads):
            label = f"grad[{self.labels[s]}]"
            x, ptr, n, dt, desc = _describe(self.rule, label, g, False)
            if dt != self.dtype:
                raise TypeError(f"{self.rule}: {label} has dtype {dt}, param has dtype "
                                f"{self.dtype}")
            if n != self.sizes[s]:
                raise ValueError(f"{self.rule}: {label} has {n} elements, param has "
                                 f"{self.sizes[s]}")
            try:
                self.written.check_read(ptr, ptr + n * dt.itemsize, label)
            except ValueError as exc:
                raise ValueError(f"{self.rule}: {exc}") from None
            ptrs.append(ptr)
            if s == 0 and not _is_torch(g):
                stream = _stream_of(desc)
        if grads and _is_torch(grads[0]):
            if self.torch_stream is None:
                import torch
                self.torch_stream = torch.cuda.current_stream
            handle = self.torch_stream(self.device).cuda_stream
            stream = _external_stream(handle) if handle else 0
        self.grads, self.stream, self.ready = ptrs, stream, True
        self.held = grads   # alive until run: the table will hold their addresses

    def run(self, args, nthreads):
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        self.ready = False
        if self.deleg is not None:
            deleg, self.deleg = self.deleg, None
            deleg.run(args, nthreads)
            return
        held, self.held = self.held, None  # noqa: F841 (alive through the launch)
        ptrs = np.asarray(self.grads, dtype=np.uint64)
        if self.d_table is None or not np.array_equal(self.table[:, 1], ptrs):
            self.table[:, 1] = ptrs
            self.d_table = cuda.to_device(self.table)  # grads moved: a new table
        if not self.sizes or sum(self.sizes) == 0:
            return
        k = self.coefs(M.plan_of(self.kernel, args), self.dtype.type)
        self.dispatcher[self.grid, BLOCK_SIZE, self.stream](self.d_table, self.d_starts, k)

    def step(self, grads, args, nthreads, copies=None, sr_key=None):
        self.prepare(grads, copies, sr_key)
        self.run(args, nthreads)


def bind_many(kernel, params, buffers, labels=None):
    """Arrays of one dtype on one GPU: one launch per step over a device segment
    table (see SegmentBound)."""
    return SegmentBound(kernel, params, buffers, labels)


def run_segments(kernel, dtype, ptrs, lengths, args, nthreads=1, check=True):
    """The CPU backends' ``run_segments`` for device addresses: the table is copied
    to the device and one kernel is launched on the default stream."""
    coefs, _, rule, names = M.RULES[kernel]
    dtype = S.element_type(dtype, names, _DTYPES)
    table, starts, present = S.table_of(ptrs, lengths, names, dtype.itemsize, check)
    if starts[-1] == 0:
        return
    k = coefs(M.plan_of(kernel, args), dtype.type)
    segment_kernel_for(kernel, present)[_blocks(int(starts[-1]), 0), BLOCK_SIZE](
        cuda.to_device(table), cuda.to_device(starts), k)


def bind(kernel, param, buffers, *, grad_dtype=None, absmax=None, qmaps=None):
    """The optimizer classes' fast path (see the module docstring); storage types
    other than float32/float64 throughout (the keywords: ``bind_many``'s, ``absmax``
    one tuple per state buffer) bind the staged path over one segment."""
    plain = grad_dtype is None and absmax is None and qmaps is None
    if plain:
        try:
            plain = _describe_lowp(M.RULES[kernel][2], "param", param, False)[3] in (
                S.T_F32, S.T_F64)
        except (TypeError, ValueError):
            pass  # Bound words the error
    if plain:
        return Bound(kernel, param, buffers)
    return SingleStaged(StagedSegmentBound(
        kernel, [param], [tuple(buffers)], None, grad_dtype,
        None if absmax is None else [tuple(absmax)], qmaps))


class SingleStaged:
    """One array's StagedSegmentBound with the one-array protocol: ``step(grad,
    args, nthreads, copies=None, sr_key=None)`` with one gradient (and one copy)."""

    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def prepare(self, grad, copies=None, sr_key=None):
        self.inner.prepare([grad], None if copies is None else [copies], sr_key)

    def run(self, args, nthreads):
        self.inner.run(args, nthreads)

    def step(self, grad, args, nthreads, copies=None, sr_key=None):
        self.prepare(grad, copies, sr_key)
        self.run(args, nthreads)


def _call(kernel, nbuf, param, grad, *rest):
    """``kernel(param, grad, *buffers, *plan_args, nthreads)``: bind and step once
    (nthreads is accepted and ignored)."""
    buffers, args = rest[:nbuf], rest[nbuf:-1]
    Bound(kernel, param, buffers).step_c(grad, M.plan_of(kernel, args))


def _entry(kernel):
    nbuf = len(M.RULES[kernel][3]) - 2
    return lambda param, grad, *rest: _call(kernel, nbuf, param, grad, *rest)


# one entry per registry kernel: sgd, adam, ... (fastopt.rules.KERNELS)
globals().update({k: _entry(k) for k in KERNELS})


# --------------------------------------------------------------------------
# Low-precision storage (the staged path; the CPU twin is in numba_cpu).
# One thread block per block of M.BLK elements of a segment (grid-stride over the
# blocks of every segment, found by binary search in the prefix sums of the
# segments' block counts): each thread loads its elements' slots to float32, runs
# the rule's float32 element function and stores the written slots back to their
# types; a q8 column's new values wait in shared memory, the block's absmax is a
# shared-memory reduction (max is exact in any order; a NaN absmax is stored as
# one NaN, 0x7FC00000, as on the CPU), then every thread stores its codes. The
# slots' type codes, the copy's and the SR flag are kernel arguments (one compile
# per rule, present buffers and threads per block).
# --------------------------------------------------------------------------

_F32 = np.float32(0)
_U16 = np.uint16(0)
_U8 = np.uint8(0)


@cuda.jit(device=True)
def _ld(t, addr, i, Q, col, am):
    if t == M.T_BF16:
        return M.bf16_to_f32(_load(addr, i, _U16))
    if t == M.T_F16:
        return M.f16_to_f32(_load(addr, i, _U16))
    if t == M.T_Q8:
        return M._mul(Q[col, _load(addr, i, _U8)], am)
    return _load(addr, i, _F32)


@cuda.jit(device=True)
def _st(t, addr, i, x):
    if t == M.T_BF16:
        _store(addr, i, M.f32_to_bf16(x))
    elif t == M.T_F16:
        _store(addr, i, M.f32_to_f16(x))
    else:
        _store(addr, i, x)


def _make_staged_kernel(element, h0, h1, h2, NT):
    digest = M.SOURCE_DIGEST  # in the closure, hence in the cache key (see _numba_math)
    BLK = M.BLK
    Q8 = M.T_Q8
    f32 = numba.float32

    @cuda.jit(device=True)
    def q8_block(addr, aaddr, blk, base, sh, c, m, B, col, red, tid):
        # max |x| as the maximum of |x|'s bits (the compiled engine's: exact in any
        # order, and a NaN's bits are above every number's)
        part = 0
        for t in range(tid, m, NT):
            a = M.abs_bits(sh[c, t])
            part = a if a > part else part
        red[tid] = part
        cuda.syncthreads()
        step = 1
        while step < NT:
            if tid % (2 * step) == 0 and tid + step < NT:
                a = red[tid + step]
                if a > red[tid]:
                    red[tid] = a
            cuda.syncthreads()
            step *= 2
        am = M.bits_f32(red[0])
        inv = M.q8_scale(am)
        for t in range(tid, m, NT):
            _store(addr, base + t, M.q8_code(M.q8_clamp(M._mul(sh[c, t], inv)), B[col]))
        if tid == 0:
            _store(aaddr, blk, am)
        cuda.syncthreads()   # red and sh are reused by the next column or block

    @cuda.jit(cache=not _SIM)
    def kernel(P, A, Q, B, C, starts, bstarts, tp, ct, sr, key, k):
        digest  # noqa: B018 (kept in the closure on purpose)
        sh = cuda.shared.array((3, BLK), dtype=f32)
        red = cuda.shared.array(NT, dtype=numba.int64)
        tid = cuda.threadIdx.x
        nseg = P.shape[0]
        t0, t1, t2, t3, t4 = tp[0], tp[1], tp[2], tp[3], tp[4]
        q0, q1, q2 = h0 and t2 == Q8, h1 and t3 == Q8, h2 and t4 == Q8
        for b in range(cuda.blockIdx.x, bstarts[nseg], cuda.gridDim.x):
            lo, hi = 0, nseg - 1
            while lo < hi:  # the segment holding block b
                mid = (lo + hi + 1) >> 1
                if bstarts[mid] <= b:
                    lo = mid
                else:
                    hi = mid - 1
            s = lo
            blk = b - bstarts[s]
            base = blk * BLK
            m = starts[s + 1] - starts[s] - base
            m = BLK if m > BLK else m  # (builtin min does not type here on CUDA)
            m0 = _load(A[s, 2], blk, _F32) if q0 else _F32
            m1 = _load(A[s, 3], blk, _F32) if q1 else _F32
            m2 = _load(A[s, 4], blk, _F32) if q2 else _F32
            ks = M.sr_segment_key(key, s) if sr else 0
            for t in range(tid, m, NT):
                i = base + t
                pi = _ld(t0, P[s, 0], i, Q, 0, _F32)
                gi = _ld(t1, P[s, 1], i, Q, 1, _F32)
                a0 = _ld(t2, P[s, 2], i, Q, 2, m0) if h0 else pi
                a1 = _ld(t3, P[s, 3], i, Q, 3, m1) if h1 else pi
                a2 = _ld(t4, P[s, 4], i, Q, 4, m2) if h2 else pi
                pi, a0, a1, a2 = element(pi, gi, a0, a1, a2, k, h0, h1, h2)
                # the param as stored (what a copy out is made of: the compiled
                # engine's)
                if t0 == M.T_BF16:
                    h = M.f32_to_bf16_sr(pi, M.sr_bits(ks, i)) if sr else M.f32_to_bf16(pi)
                    _store(P[s, 0], i, h)
                    cv = M.bf16_to_f32(h)
                elif t0 == M.T_F16:
                    h = M.f32_to_f16(pi)
                    _store(P[s, 0], i, h)
                    cv = M.f16_to_f32(h)
                else:
                    _store(P[s, 0], i, pi)
                    cv = pi
                if ct >= 0:
                    _st(ct, C[s], i, cv)
                if q0:
                    sh[0, t] = a0
                elif h0:
                    _st(t2, P[s, 2], i, a0)
                if q1:
                    sh[1, t] = a1
                elif h1:
                    _st(t3, P[s, 3], i, a1)
                if q2:
                    sh[2, t] = a2
                elif h2:
                    _st(t4, P[s, 4], i, a2)
            if q0 or q1 or q2:
                cuda.syncthreads()
                if q0:
                    q8_block(P[s, 2], A[s, 2], blk, base, sh, 0, m, B, 2, red, tid)
                if q1:
                    q8_block(P[s, 3], A[s, 3], blk, base, sh, 1, m, B, 3, red, tid)
                if q2:
                    q8_block(P[s, 4], A[s, 4], blk, base, sh, 2, m, B, 4, red, tid)
    return kernel


_STAGED_KERNELS: dict = {}


def staged_kernel_for(kernel, present, threads=None):
    """The staged kernel of rule ``kernel`` for the presence flags ``present`` and
    ``threads`` threads per block (BLOCK_SIZE when None)."""
    threads = int(BLOCK_SIZE if threads is None else threads)
    key = (kernel, tuple(bool(h) for h in present), threads)
    k = _STAGED_KERNELS.get(key)
    if k is None:
        k = _STAGED_KERNELS[key] = _make_staged_kernel(M.RULES[kernel][1], *key[1], threads)
    return k


def _staged_launch(kernel, codes, ct, sr, key, present, table, am, Q, B, cp, starts, args,
                   stream=0, dev=0):
    """One staged launch over host-side tables (copied to the device here)."""
    coefs = M.RULES[kernel][0]
    lengths = np.diff(starts)
    nblk = (lengths + M.BLK - 1) // M.BLK
    bstarts = np.concatenate(([0], np.cumsum(nblk))).astype(np.int64)
    total = int(bstarts[-1])
    if total == 0:
        return
    cap = _device_blocks(dev)
    if MAX_BLOCKS is not None:
        cap = min(cap, MAX_BLOCKS) if not _SIM else MAX_BLOCKS
    grid = max(1, min(total, cap))
    k = coefs(M.plan_of(kernel, args), np.float32)
    d = cuda.to_device
    staged_kernel_for(kernel, present)[grid, BLOCK_SIZE, stream](
        d(table), d(am), d(Q), d(B), d(cp), d(starts), d(bstarts),
        tuple(int(t) for t in codes), int(ct), bool(sr), int(key) & 0xFFFFFFFF, k)


_run_segments_plain = run_segments


def run_segments(kernel, dtype, ptrs, lengths, args, nthreads=1, check=True, *,
                 absmax=None, qmaps=None, copy=None, copy_dtype=None, sr_key=None):
    """The CPU backends' ``run_segments`` for device addresses (see numba_cpu's for
    the low-precision arguments): the tables are copied to the device and one kernel
    is launched on the default stream."""
    names = M.RULES[kernel][3]
    codes = S.slot_codes(dtype, names)
    ct = None if copy is None else S.type_code(
        np.float32 if copy_dtype is None else copy_dtype, "copy_dtype")
    sr = sr_key is not None and codes[0] == S.T_BF16   # as numba_cpu.run_segments
    present = S.table_of(ptrs, lengths, names, 1, False)[2]
    S.check_codes(codes, present, names, ct, sr, "copy_dtype")
    if S.is_uniform(codes, present, ct, sr):
        dt = np.float32 if codes[0] == S.T_F32 else np.float64
        _run_segments_plain(kernel, np.dtype(dt), ptrs, lengths, args, nthreads, check)
        return
    table, starts, present, am, cp = S.staged_table(ptrs, lengths, names, codes, absmax,
                                                    copy, ct, check)
    Q, B = S.qmap_tables(qmaps, codes, present, names)
    _staged_launch(kernel, S.effective_codes(codes, present), -1 if ct is None else ct, sr,
                   sr_key or 0, present, table, am, Q, B, cp, starts, args)


_TORCH_CODES = {"torch.float32": S.T_F32, "torch.float64": S.T_F64,
                "torch.float16": S.T_F16, "torch.bfloat16": S.T_BF16, "torch.uint8": S.T_Q8}
_TYPESTR_CODES = {"<f4": S.T_F32, "<f8": S.T_F64, "<f2": S.T_F16, "<V2": S.T_BF16,
                  "|u1": S.T_Q8, "<u1": S.T_Q8}


def _describe_lowp(rule, name, x, writable):
    """(array, pointer, length, type code, interface or None) of a device array of
    any storage type (a torch tensor's read directly: torch gives no interface for
    bfloat16)."""
    if x is None:
        raise TypeError(f"{rule}: {name} must be an array, got None")
    if _is_torch(x) and getattr(x, "is_cuda", False):
        x = _plain(x)
        code = _TORCH_CODES.get(str(x.dtype))
        if code is None:
            raise TypeError(f"{rule}: {name} has dtype {x.dtype}, not a storage type")
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"{rule}: {name} must be a C-contiguous 1-D array")
        return x, x.data_ptr(), x.shape[0], code, None
    if not _is_device(x):
        raise TypeError(f"{rule}: {name} must be a CUDA array (__cuda_array_interface__), "
                        f"got {type(x).__name__}")
    desc = _interface(_plain(x))
    dt = getattr(x, "dtype", None)
    try:
        code = S.type_code(dt, name) if isinstance(dt, np.dtype) else None
    except TypeError:
        code = None
    if code is None:
        code = _TYPESTR_CODES.get(desc["typestr"])
    if code is None:
        raise TypeError(f"{rule}: {name} has typestr {desc['typestr']}, not a storage type")
    shape, strides = tuple(desc["shape"]), desc.get("strides")
    isz = S.ITEMSIZE[code]
    if len(shape) != 1 or (strides is not None and shape[0] > 1 and tuple(strides) != (isz,)):
        raise ValueError(f"{rule}: {name} must be a C-contiguous 1-D array, got shape "
                         f"{shape} with strides {strides}")
    ptr, readonly = desc["data"]
    if writable and readonly:
        raise ValueError(f"{rule}: {name} is read-only")
    return x, ptr, shape[0], code, desc


class StagedSegmentBound:
    """numba_cpu.StagedBound for device arrays: per-column storage types, q8 state
    with its block maxima and maps, ``step(grads, args, nthreads, copies=None,
    sr_key=None)``; one staged launch per step (all-float32/float64 without copy or
    SR: the plain segment kernel)."""

    def __init__(self, kernel, params, buffers, labels=None, grad_dtype=None, absmax=None,
                 qmaps=None):
        coefs, _, rule, names = M.RULES[kernel]
        self.kernel, self.rule, self.names = kernel, rule, names
        params, buffers = list(params), [tuple(b) for b in buffers]
        self.labels = list(range(len(params))) if labels is None else list(labels)
        lab = lambda slot, s: f"{names[slot]}[{self.labels[s]}]"  # noqa: E731
        codes = [None] * len(names)
        table = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        am = np.zeros((len(params), S.NSLOT), dtype=np.uint64)
        sizes, ranges, keep = [], [], []
        for s, slot, a in S.slots(params, buffers, len(names) - 2):
            x, ptr, n, code, _ = _describe_lowp(rule, lab(slot, s), a, True)
            if codes[slot] is None:
                codes[slot] = code
            elif code != codes[slot]:
                raise TypeError(f"{rule}: {lab(slot, s)} has dtype {S.TYPE_NAMES[code]}, "
                                f"{lab(slot, 0)} has dtype {S.TYPE_NAMES[codes[slot]]}; "
                                "one column has one type")
            if slot == 0:
                sizes.append(n)
            elif n != sizes[s]:
                raise ValueError(f"{rule}: {lab(slot, s)} has {n} elements, {lab(0, s)} "
                                 f"has {sizes[s]}")
            table[s, slot] = ptr
            ranges.append((ptr, s * S.NSLOT + slot, ptr + n * S.ITEMSIZE[code],
                           lab(slot, s)))
            keep.append(x)
            if code == S.T_Q8:
                m = None
                try:
                    m = absmax[s][slot - 2]
                except (TypeError, IndexError, KeyError):
                    pass
                if m is None:
                    raise ValueError(f"{rule}: {lab(slot, s)} is q8 and has no absmax array")
                mx, mptr, mn, mcode, _ = _describe_lowp(rule, f"absmax of {lab(slot, s)}",
                                                        m, True)
                if mcode != S.T_F32:
                    raise TypeError(f"{rule}: the absmax of {lab(slot, s)} must be float32")
                nblk = (n + M.BLK - 1) // M.BLK
                if mn != nblk:
                    raise ValueError(f"{rule}: the absmax of {lab(slot, s)} has {mn} "
                                     f"entries; {n} elements make {nblk} blocks of {M.BLK}")
                am[s, slot] = mptr
                ranges.append((mptr, s * S.NSLOT + slot, mptr + 4 * mn,
                               f"absmax of {lab(slot, s)}"))
                keep.append(mx)
        self.present = S.present_slots(table)
        codes[1] = codes[0] if grad_dtype is None else S.type_code(grad_dtype, "grad_dtype")
        self.codes = tuple(c if c is not None else S.T_F32 for c in codes)
        S.check_codes(self.codes, self.present, names)
        self.Q, self.B = S.qmap_tables(qmaps, self.codes, self.present, names)
        self.ranges = [r for r in ranges if r[2] > r[0]]
        try:
            self.written = S.Written(self.ranges)
        except ValueError as exc:
            raise ValueError(f"{rule}: {exc}") from None
        self.table, self.am, self.sizes, self.arrays = table, am, sizes, keep
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.copy = np.zeros(len(params), dtype=np.uint64)
        self.copy_code = None
        self.stream = 0
        self.sr_key = self.held = None
        self.ready = False

    def prepare(self, grads, copies=None, sr_key=None):
        """Check the gradients and the copies (nothing is written); ``run`` launches."""
        self.ready = False
        rule = self.rule
        S.check_grad_list(grads, len(self.sizes), f"{rule}: ")
        written, ct = self.written, None
        if copies is not None:
            if not isinstance(copies, (list, tuple)) or len(copies) != len(self.sizes):
                raise ValueError(f"{rule}: copy_to must be a list of {len(self.sizes)} "
                                 "arrays (one per param)")
            extra = []
            for s, c in enumerate(copies):
                label = f"copy_to[{self.labels[s]}]"
                _, ptr, n, code, _ = _describe_lowp(rule, label, c, True)
                if ct is None:
                    ct = code
                elif code != ct:
                    raise TypeError(f"{rule}: {label} has dtype {S.TYPE_NAMES[code]}; "
                                    f"every copy must have the first one's "
                                    f"{S.TYPE_NAMES[ct]}")
                if n != self.sizes[s]:
                    raise ValueError(f"{rule}: {label} has {n} elements, param has "
                                     f"{self.sizes[s]}")
                extra.append((ptr, s * S.NSLOT + S.NSLOT, ptr + n * S.ITEMSIZE[code], label))
                self.copy[s] = ptr
            S.check_codes(self.codes, self.present, self.names, ct)
            try:
                written = S.Written(self.ranges + [r for r in extra if r[2] > r[0]])
            except ValueError as exc:
                raise ValueError(f"{rule}: {exc}") from None
        stream = 0
        for s, g in enumerate(grads):
            label = f"grad[{self.labels[s]}]"
            _, ptr, n, code, desc = _describe_lowp(rule, label, g, False)
            if code != self.codes[1]:
                raise TypeError(f"{rule}: {label} has dtype {S.TYPE_NAMES[code]}, the call "
                                f"expects {S.TYPE_NAMES[self.codes[1]]} gradients")
            if n != self.sizes[s]:
                raise ValueError(f"{rule}: {label} has {n} elements, param has "
                                 f"{self.sizes[s]}")
            try:
                written.check_read(ptr, ptr + n * S.ITEMSIZE[code], label)
            except ValueError as exc:
                raise ValueError(f"{rule}: {exc}") from None
            self.table[s, 1] = ptr
            if s == 0 and desc is not None:
                stream = _stream_of(desc)
        if grads and _is_torch(grads[0]):
            import torch
            handle = torch.cuda.current_stream(grads[0].device).cuda_stream
            stream = _external_stream(handle) if handle else 0
        self.copy_code, self.stream, self.sr_key, self.ready = ct, stream, sr_key, True
        self.held = (grads, copies)   # alive until run: the table holds their addresses

    def run(self, args, nthreads):
        if not self.ready:
            raise RuntimeError("run() without a successful prepare()")
        self.ready = False
        sr_key = self.sr_key
        sr = sr_key is not None and self.codes[0] == S.T_BF16
        ct = self.copy_code
        held, self.held = self.held, None  # noqa: F841 (alive through the launch)
        if S.is_uniform(self.codes, self.present, ct, sr):
            dt = np.dtype(np.float32 if self.codes[0] == S.T_F32 else np.float64)
            table, starts = cuda.to_device(self.table), cuda.to_device(self.starts)
            if self.starts[-1]:
                k = M.RULES[self.kernel][0](M.plan_of(self.kernel, args), dt.type)
                segment_kernel_for(self.kernel, self.present)[
                    _blocks(int(self.starts[-1]), 0), BLOCK_SIZE, self.stream](table, starts,
                                                                                k)
            return
        _staged_launch(self.kernel, S.effective_codes(self.codes, self.present),
                       -1 if ct is None else ct, sr, sr_key or 0, self.present, self.table,
                       self.am, self.Q, self.B, self.copy, self.starts, args, self.stream)

    def step(self, grads, args, nthreads, copies=None, sr_key=None):
        self.prepare(grads, copies, sr_key)
        self.run(args, nthreads)


_bind_many_plain = bind_many


def bind_many(kernel, params, buffers, labels=None, *, grad_dtype=None, absmax=None,
              qmaps=None):
    """Arrays on one GPU: float32 or float64 throughout binds SegmentBound; other
    storage types (float16, bfloat16, q8 state with ``absmax``/``qmaps``, a
    ``grad_dtype`` of its own) bind StagedSegmentBound."""
    params = list(params)
    rule, names = M.RULES[kernel][2], M.RULES[kernel][3]
    plain = grad_dtype is None and absmax is None and qmaps is None
    if plain:
        for s, slot, a in S.slots(params, buffers, len(names) - 2):
            try:
                code = _describe_lowp(rule, names[slot], a, False)[3]
            except (TypeError, ValueError):
                break  # SegmentBound words the error
            if code not in (S.T_F32, S.T_F64):
                plain = False
                break
    if plain:
        return _bind_many_plain(kernel, params, buffers, labels)
    return StagedSegmentBound(kernel, params, buffers, labels, grad_dtype, absmax, qmaps)
