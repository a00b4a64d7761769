"""fastopt: fused, single-pass optimizer update rules over float32/float64 arrays,
and float16/bfloat16 arrays or 8-bit block-wise state on the compiled backend.

    import fastopt
    opt = fastopt.Adam(param, lr=1e-3)   # param: C-contiguous float32/float64 array, any shape
    opt.step(grad)                       # one fused kernel call, in place
    opt = fastopt.Adam([w1, b1, w2, b2]) # or a list of arrays: one call over all of them
    opt.step([g1, g2, g3, g4])
    opt = fastopt.AdamW(w_bf16, bf16_stochastic_round=True)  # ml_dtypes.bfloat16 params
    opt = fastopt.AdamW8bit(w)           # bitsandbytes' 8-bit state (2.03 bytes/param)
    opt.step(g_bf16, copy_to=w_bf16)     # low-precision gradient in, param copy out

Layers, top to bottom: ``fastopt.rules`` (the registry: math, names, defaults,
checks, the kernels' calling convention) → ``fastopt.optimizers`` /
``fastopt.functional`` / ``fastopt.torch`` (the API) → ``fastopt.backends``
(compiled, Numba CPU, Numba CUDA) → ``fastopt.kernels`` (the segment engine).
"""

from fastopt import backends as _backends
from fastopt import functional, schedules
from fastopt.checkpoint import load, save
from fastopt.flat import FlatParams
from fastopt.lbfgs import LBFGS
from fastopt.optimizers import OPTIMIZERS, OPTIMIZERS_8BIT, Optimizer, Optimizer8bit
from fastopt.optimizers import *  # noqa: F401,F403  (Adam, SGD, ... from the registry)
from fastopt.rules import RULES
from fastopt.schedulefree import AdamWScheduleFree, SGDScheduleFree
from fastopt.sparse import SparseAdam
from fastopt.muon import Muon
from fastopt.adafactor import Adafactor

__version__ = "0.1.0"

set_num_threads = _backends.set_num_threads
get_num_threads = _backends.num_threads


def set_flush_denormals(on: bool) -> None:
    """Flush subnormal numbers to zero inside the compiled kernels (the default).

    Subnormal state (e.g. exp_avg_sq decaying below 1.2e-38 in float32) makes
    this CPU family 2-3x slower per step; flushing keeps full speed and changes
    only values below the normal range. ``False`` gives IEEE results on
    subnormals. The caller's floating-point state is never changed. The Numba
    backends do not flush.
    """
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {on!r}")
    if _backends.available("cython"):
        _backends.load("cython").set_flush_denormals(on)


def get_flush_denormals() -> bool:
    return _backends.available("cython") and _backends.load("cython").get_flush_denormals()


def __getattr__(name):
    # fastopt.torch needs torch: imported on first use, not with fastopt
    if name == "torch":
        import importlib
        return importlib.import_module("fastopt.torch")
    raise AttributeError(f"module 'fastopt' has no attribute {name!r}")


def backend() -> str:
    """The backend a default call on a host array uses: 'cython' or 'numba'."""
    return _backends.DEFAULT.NAME


__all__ = ["Optimizer", "LBFGS", "FlatParams", "functional", "schedules", "save", "load",
           "RULES", "set_num_threads", "get_num_threads", "set_flush_denormals",
           "get_flush_denormals", "backend", "Optimizer8bit", *OPTIMIZERS, *OPTIMIZERS_8BIT,
           "AdamWScheduleFree", "SGDScheduleFree", "SparseAdam", "Muon", "Adafactor"]
