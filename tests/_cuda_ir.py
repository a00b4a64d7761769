"""Compile every CUDA kernel to LLVM IR for sm_90 without a GPU and print, per
kernel, its bare multiplies and its libdevice calls as JSON lines. Run without
NUMBA_ENABLE_CUDASIM (test_cuda_backend.py runs it in a subprocess): Numba
lowers a kernel to IR with llvmlite alone; only the PTX step needs NVVM."""

import json
import re

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

for kernel in M.RULES:
    for dt in ("float32", "float64"):
        arr = types.Array(getattr(types, dt), 1, "C")
        plan = M.plan_of(kernel, [0.5] * len(M.PLANS[kernel]._fields))
        k = M.RULES[kernel][0](plan, getattr(np, dt))
        disp = C.kernel_for(kernel, (True, True, True))
        cres = compile_cuda(disp.py_func, types.void, (arr,) * 5 + (numba.typeof(k),),
                            cc=(9, 0))
        ir = cres.library.get_llvm_str()
        print(json.dumps({"kernel": kernel, "dtype": dt,
                          "fmul": len(re.findall(r"= fmul ", ir)),
                          "mul_rn": sorted(set(re.findall(r"__nv_[fd]mul_rn", ir)))}))
        # the segment-table kernel of the same rule (bind_many, run_segments)
        seg = C.segment_kernel_for(kernel, (True, True, True))
        table = types.Array(types.uint64, 2, "C")
        starts = types.Array(types.int64, 1, "C")
        cres = compile_cuda(seg.py_func, types.void, (table, starts, numba.typeof(k)),
                            cc=(9, 0))
        ir = cres.library.get_llvm_str()
        print(json.dumps({"kernel": kernel, "segments": True, "dtype": dt,
                          "fmul": len(re.findall(r"= fmul ", ir)),
                          "mul_rn": sorted(set(re.findall(r"__nv_[fd]mul_rn", ir))),
                          "loads": len(re.findall(r"= load ", ir))}))

# the control: the same lowering keeps a bare multiply where the source has one,
# so a count of 0 above means the kernels have none (not that none is ever seen)
from numba import cuda  # noqa: E402


def _control(p, g):
    i = cuda.grid(1)
    p[i] = p[i] * g[i] + g[i]


arr = types.Array(types.float32, 1, "C")
ir = compile_cuda(_control, types.void, (arr, arr), cc=(9, 0)).library.get_llvm_str()
print(json.dumps({"kernel": "control", "dtype": "float32",
                  "fmul": len(re.findall(r"= fmul ", ir)), "mul_rn": []}))
