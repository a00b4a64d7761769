"""The memory-bandwidth roof, measured in the same run as the optimizers.

``triad`` (a = b + s*c) and ``axpy`` (a += s*c) live in the compiled extension
(``fastopt/kernels/roof.pxi``) and run with the thread count the optimizers use.
Bytes counted per element: triad 4 x itemsize (b and c read, a write-allocated
and written back: what DRAM really moves; STREAM's convention would say 3),
axpy 3 x itemsize (a read and written, c read). The optimizer's bytes/element in
RULES.md count the same way: everything they write they have read, so no
write-allocate. The roof is the higher of the two figures, so that it is a roof
(nothing simple and streaming beat it in this run); both are kept in the JSON.
"""

from __future__ import annotations

import numpy as np

# Each array 4x the L3 of a large desktop/server part, so nothing is cached.
ROOF_BYTES_PER_ARRAY = 128 * 1024 * 1024


def _module():
    from fastopt.backends import compiled
    mod = compiled.module
    if not hasattr(mod, "triad"):
        raise RuntimeError("the compiled extension has no triad kernel; rebuild fastopt")
    return mod


def measure(nthreads: int, dtype="float32", repeats: int = 9,
            bytes_per_array: int = ROOF_BYTES_PER_ARRAY) -> dict:
    """Median GB/s of triad and axpy over arrays of ``bytes_per_array`` each."""
    mod = _module()
    dt = np.dtype(dtype)
    n = bytes_per_array // dt.itemsize
    a = np.ones(n, dt)     # pages touched before timing
    b = np.full(n, 0.5, dt)
    c = np.full(n, 0.25, dt)
    out = {"threads": nthreads, "dtype": dt.name, "n": int(n)}
    from fastopt.bench.timing import time_interleaved
    kernels = {"triad": (lambda: mod.triad(a, b, c, 1.0, nthreads), 4),
               "axpy": (lambda: mod.axpy(a, c, 1e-6, nthreads), 3)}
    t = time_interleaved({k: v[0] for k, v in kernels.items()}, repeats=repeats, warmup=1,
                         target_sample_s=0.0, prestep_below_s=0.0)
    for name, (_, streams) in kernels.items():
        res = t[name]
        med = res["median_s"]
        nbytes = streams * dt.itemsize * n
        out[name] = {"median_s": med, "samples_s": res["samples_s"],
                     "preempted_retaken": res["preempted_retaken"],
                     "preempted_kept": res["preempted_kept"],
                     "bytes_per_element": streams * dt.itemsize, "gbps": nbytes / med / 1e9}
    out["triad"]["gbps_stream_convention"] = 3 * dt.itemsize * n / out["triad"]["median_s"] / 1e9
    out["gbps"] = max(out["triad"]["gbps"], out["axpy"]["gbps"])
    out["roof_kernel"] = "triad" if out["triad"]["gbps"] >= out["axpy"]["gbps"] else "axpy"
    del a, b, c
    return out
