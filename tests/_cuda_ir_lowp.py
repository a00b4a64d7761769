"""Lower the staged (low-precision) CUDA kernel of every rule to LLVM IR for sm_90
without a GPU and print, per kernel, its bare multiplies, its libdevice calls and
its barriers as JSON lines (test_lowp_numba.py runs it in a subprocess, without
NUMBA_ENABLE_CUDASIM, as test_cuda_backend.py runs _cuda_ir.py)."""

import json
import re
import sys

import numba
import numba.cuda.dispatcher as _dispatcher
import numpy as np
from numba import types


class _Device:  # what the CUDA dispatcher asks of the current device
    compute_capability = (9, 0)


_dispatcher.get_current_device = lambda: _Device()

from fastopt.backends import _numba_math as M  # noqa: E402
from fastopt.backends import numba_cuda as C  # noqa: E402
from numba.cuda.compiler import compile_cuda  # noqa: E402

kernels = sys.argv[1:] or list(M.RULES)
u64_2d = types.Array(types.uint64, 2, "C")
f32_2d = types.Array(types.float32, 2, "C")
u64_1d = types.Array(types.uint64, 1, "C")
i64_1d = types.Array(types.int64, 1, "C")
for kernel in kernels:
    plan = M.plan_of(kernel, [0.5] * len(M.PLANS[kernel]._fields))
    k = M.RULES[kernel][0](plan, np.float32)
    disp = C.staged_kernel_for(kernel, (True, True, True), 256)
    sig = (u64_2d, u64_2d, f32_2d, f32_2d, u64_1d, i64_1d, i64_1d,
           types.UniTuple(types.int64, 5), types.int64, types.boolean, types.int64,
           numba.typeof(k))
    cres = compile_cuda(disp.py_func, types.void, sig, cc=(9, 0))
    ir = cres.library.get_llvm_str()
    print(json.dumps({"kernel": kernel,
                      "fmul": len(re.findall(r"= fmul ", ir)),
                      "mul_rn": sorted(set(re.findall(r"__nv_[fd]mul_rn", ir))),
                      "barrier": "barrier0" in ir or "llvm.nvvm.barrier" in ir,
                      "double": len(re.findall(r"= f(?:add|sub|div|mul) double", ir))}))
