"""The memory-bandwidth roof, measured in the same run as the optimizers.

``triad`` (a = b + s*c) and ``axpy`` (a += s*c) live in the compiled extension
(``fastopt/kernels/roof.pxi``) and run with the thread count the optimizers use.
Bytes counted per element: triad 4 x itemsize (b and c read, a write-allocated
and written back: what DRAM really moves; STREAM's convention would say 3),
axpy 3 x itemsize (a read and written, c read). The optimizers' bytes/element
(``Rule.bytes_per_element``) count the same way: everything they write they have
read, so no write-allocate. The roof is the higher of the two figures, so that it is a roof
(nothing simple and streaming beat it in this run); both are kept in the JSON.
"""

from __future__ import annotations

import numpy as np

from fastopt.bench.config import Config
from fastopt.bench.timing import time_interleaved

# Each array 4x the L3 of a large desktop/server part, so nothing is cached.
ROOF_BYTES_PER_ARRAY = Config.roof_bytes_per_array


def _module():
    from fastopt.backends import compiled
    mod = compiled.module
    if not hasattr(mod, "triad"):
        raise RuntimeError("the compiled extension has no triad kernel; rebuild fastopt")
    return mod


def measure(nthreads: int, dtype="float32", repeats: int = 9,
            bytes_per_array: int = ROOF_BYTES_PER_ARRAY) -> dict:
    """Median GB/s of triad and axpy over arrays of ``bytes_per_array`` each."""
    probe = Probe(dtype, nthreads, bytes_per_array)
    t = time_interleaved(probe.steps(), repeats=repeats, warmup=1, target_sample_s=0.0,
                         prestep_below_s=0.0)
    isz, n = probe.dt.itemsize, probe.n
    out = {"threads": nthreads, "dtype": probe.dt.name, "n": int(n)}
    for name, streams in (("triad", 4), ("axpy", 3)):
        res = t[f"roof:{name}"]
        out[name] = {"median_s": res["median_s"], "samples_s": res["samples_s"],
                     "preempted_retaken": res["preempted_retaken"],
                     "preempted_kept": res["preempted_kept"],
                     "bytes_per_element": streams * isz,
                     "gbps": streams * isz * n / res["median_s"] / 1e9}
    out["triad"]["gbps_stream_convention"] = 3 * isz * n / out["triad"]["median_s"] / 1e9
    out["gbps"] = max(out["triad"]["gbps"], out["axpy"]["gbps"])
    out["roof_kernel"] = "triad" if out["triad"]["gbps"] >= out["axpy"]["gbps"] else "axpy"
    return out


class Probe:
    """The roof kernels as two more callables to interleave with a case's peers, so
    that the roof is measured at the same moment as the optimizers (memory bandwidth
    on a shared host drifts with what the neighbours do)."""

    def __init__(self, dtype, nthreads, bytes_per_array=ROOF_BYTES_PER_ARRAY):
        self.mod = _module()
        self.dt = np.dtype(dtype)
        n = self.n = bytes_per_array // self.dt.itemsize
        self.a = np.ones(n, self.dt)
        self.b = np.full(n, 0.5, self.dt)
        self.c = np.full(n, 0.25, self.dt)
        self.nthreads = nthreads

    def steps(self) -> dict:
        mod, a, b, c, nt = self.mod, self.a, self.b, self.c, self.nthreads
        return {"roof:triad": lambda: mod.triad(a, b, c, 1.0, nt),
                "roof:axpy": lambda: mod.axpy(a, c, 1e-6, nt)}

    def collect(self, timings: dict) -> dict | None:
        """Removes the probe's entries from ``timings``; returns the roof they give."""
        tri, ax = timings.pop("roof:triad", None), timings.pop("roof:axpy", None)
        if not tri or not ax or tri.get("status") != "ok" or ax.get("status") != "ok":
            return None
        isz = self.dt.itemsize
        out = {"triad_gbps": 4 * isz * self.n / tri["median_s"] / 1e9,
               "axpy_gbps": 3 * isz * self.n / ax["median_s"] / 1e9,
               "preempted_kept": tri["preempted_kept"] + ax["preempted_kept"],
               "preempted_retaken": tri["preempted_retaken"] + ax["preempted_retaken"]}
        out["gbps"] = max(out["triad_gbps"], out["axpy_gbps"])
        return out


_probes: dict = {}


def probe(dtype, nthreads, bytes_per_array=ROOF_BYTES_PER_ARRAY) -> Probe:
    key = (np.dtype(dtype).name, nthreads, bytes_per_array)
    if key not in _probes:
        _probes[key] = Probe(dtype, nthreads, bytes_per_array)
    return _probes[key]


def release_probes() -> None:
    _probes.clear()
