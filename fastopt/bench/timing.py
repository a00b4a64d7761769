"""Interleaved timing of several step callables, the figures derived from the
times, and the progress bar."""

from __future__ import annotations

import math
import sys
import time

try:
    import resource

    def _preemptions() -> int:
        """Involuntary context switches of this process so far (all its threads)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
except ImportError:  # not on Windows
    def _preemptions() -> int:
        return 0

_now = time.perf_counter_ns

MAX_INNER = 200_000


def _calibrate(fn) -> float:
    """Seconds per call, from one call (or more when a call is very short)."""
    t0 = _now()
    fn()
    dt = (_now() - t0) / 1e9
    if dt < 1e-4:
        k = max(1, int(1e-3 / max(dt, 1e-7)))
        t0 = _now()
        for _ in range(k):
            fn()
        dt = (_now() - t0) / 1e9 / k
    return dt


def time_interleaved(steps: dict, *, repeats: int, warmup: int, target_sample_s: float,
                     prestep_below_s: float = 0.02, retries: int | None = None) -> dict:
    """Time every callable in ``steps`` side by side.

    Each callable gets ``warmup`` untimed calls, then one calibration that fixes
    ``inner``, the number of back-to-back calls in one sample (a sample lasts
    about ``target_sample_s``, so timer resolution and loop cost do not matter).
    Then ``repeats`` rounds: in each round every callable takes one sample, in an
    order rotated by one each round so that no peer always runs right after the
    same other one. When a step is shorter than ``prestep_below_s`` an untimed
    call precedes each sample, so every peer starts its sample with its own
    buffers in cache (as a training loop calling step() back to back has them)
    whatever ran before it.

    A sample during which the process was descheduled by the kernel (an
    involuntary context switch: another process wanted the core) is retaken, up to
    ``retries`` times per key in all (default: 2 x repeats; samples longer than
    50 ms are not retaken), so that a benchmark on a
    shared machine measures the code, not the neighbours; ``preempted_retaken``
    counts them, ``preempted_kept`` the preempted samples kept once the budget was
    spent. Returns, per key, the per-step seconds of every sample, their median,
    and ``inner``; or ``error`` when the callable raised.
    """
    if retries is None:
        retries = 2 * repeats
    retake_below_s = 0.05   # a longer sample is not retaken: it would rarely come clean
    out = {}
    live = {}
    for key, fn in steps.items():
        try:
            for _ in range(warmup):
                fn()
            per = _calibrate(fn)
        except Exception as exc:  # a peer failing must not stop the others
            out[key] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            continue
        inner = int(min(MAX_INNER, max(1, math.ceil(target_sample_s / max(per, 1e-9)))))
        live[key] = (fn, inner, per < prestep_below_s)
        out[key] = {"status": "ok", "inner": inner, "samples_s": [], "preempted_retaken": 0,
                    "preempted_kept": 0}
    keys = list(live)
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        for key in order:
            fn, inner, pre = live[key]
            if out[key]["status"] != "ok":
                continue
            res = out[key]
            while True:
                try:
                    if pre:
                        fn()
                    c0 = _preemptions()
                    t0 = _now()
                    for _ in range(inner):
                        fn()
                    t1 = _now()
                    c1 = _preemptions()
                except Exception as exc:
                    res = out[key] = {"status": "error",
                                      "error": f"{type(exc).__name__}: {exc}"}
                    break
                if c1 == c0:
                    break
                if (t1 - t0) / 1e9 > retake_below_s:
                    res["preempted_kept"] += 1
                    break
                if res["preempted_retaken"] >= retries:
                    res["preempted_kept"] += 1
                    break
                res["preempted_retaken"] += 1
            if res["status"] == "ok":
                res["samples_s"].append((t1 - t0) / 1e9 / inner)
    for key, res in out.items():
        if res["status"] == "ok":
            s = sorted(res["samples_s"])
            res["median_s"] = _median(s)
            res["min_s"] = s[0]
            res["iqr_s"] = _quantile(s, 0.75) - _quantile(s, 0.25)
    return out


def _median(s):
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _quantile(s, q):
    if len(s) == 1:
        return s[0]
    x = q * (len(s) - 1)
    lo = int(math.floor(x))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def merge_timings(status, timings, n=None, bytes_per_element=None, roof_gbps=None):
    """Per-peer result dicts: status, times and the derived throughput figures."""
    results = {}
    for peer, st in status.items():
        res = {**st, **timings.get(peer, {})}
        if res.get("status") == "ok" and n:
            res["elements_per_s"] = n / res["median_s"]
            if bytes_per_element:
                res["gbps"] = bytes_per_element * n / res["median_s"] / 1e9
                if roof_gbps:
                    res["roof_fraction"] = res["gbps"] / roof_gbps
        results[peer] = res
    return results


def speedups(results, base="fastopt"):
    """base's speedup over every other peer: peer time / base time (>1: base faster)."""
    b = results.get(base, {})
    if b.get("status") != "ok":
        return {}
    return {peer: r["median_s"] / b["median_s"] for peer, r in results.items()
            if peer != base and r.get("status") == "ok"}


class Progress:
    """A one-line progress bar on stderr (only when enabled: by default when
    stderr is a terminal). Work is counted in arbitrary units (``total``)."""

    def __init__(self, total: float, enabled: bool | None = None, width: int = 28,
                 stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.width = width
        self.t0 = time.monotonic()
        self._last_len = 0

    def update(self, label: str, advance: float = 0.0) -> None:
        self.done = min(self.total, self.done + advance)
        if not self.enabled:
            return
        frac = self.done / self.total
        fill = int(round(frac * self.width))
        elapsed = time.monotonic() - self.t0
        eta = elapsed / frac - elapsed if frac > 0.02 else float("nan")
        eta_s = f"{eta:4.0f}s" if eta == eta else "   ?"
        line = (f"\r[{'#' * fill}{'.' * (self.width - fill)}] {100 * frac:3.0f}% "
                f"{elapsed:4.0f}s eta {eta_s}  {label}")[:160]
        pad = max(0, self._last_len - len(line))
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self._last_len = len(line)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
