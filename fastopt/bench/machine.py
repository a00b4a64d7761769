"""The machine: caches, memory, threads, and its description in the result document."""

from __future__ import annotations

import os
import platform

import numpy as np

import fastopt
from fastopt import backends


def _read(path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpuinfo(key) -> str | None:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def cache_size(level_index: int) -> str | None:
    text = _read(f"/sys/devices/system/cpu/cpu0/cache/index{level_index}/size")
    return text.strip() if text else None


def l3_bytes() -> int:
    """The last-level cache size (sysfs), or 32 MiB when unknown."""
    text = cache_size(3) or "32M"
    try:
        return int(text.rstrip("KMGkmg")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(
            text[-1].upper(), 1)
    except ValueError:
        return 32 << 20


def prestep_threshold(working_set_bytes: int) -> float:
    """Steps shorter than this get an untimed step before each sample (to bring the
    peer's own buffers into cache); 0 when the working set cannot fit in cache anyway."""
    return 0.02 if working_set_bytes <= 2 * l3_bytes() else 0.0


def available_memory() -> int:
    """Bytes available now (/proc/meminfo's MemAvailable, which counts reclaimable
    page cache; else os.sysconf)."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def too_big(need: int, fraction: float, available: int | None = None,
            where: str = "") -> str | None:
    """Why ``need`` bytes do not fit in ``fraction`` of the available memory, or None."""
    avail = available_memory() if available is None else available
    if need <= fraction * avail:
        return None
    return f"needs ~{need / 2**30:.1f} GiB{where}, {avail / 2**30:.1f} GiB available"


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(n: int) -> None:
    fastopt.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _version(mod_name):
    try:
        return getattr(__import__(mod_name), "__version__", "?")
    except Exception:
        return None


def machine_info() -> dict:
    flags = set((_cpuinfo("flags") or "").split())
    info = {
        "cpu_model": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpu_flags": sorted(flags & {"sse2", "avx", "avx2", "fma", "avx512f"}),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "l2_cache": cache_size(2), "l3_cache": cache_size(3),
        "memory_total_bytes": total_memory(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"fastopt": fastopt.__version__, "numpy": np.__version__,
                     **{m: _version(m) for m in ("torch", "numba", "deepspeed",
                                                 "matplotlib")}},
        "fastopt_backend": fastopt.backend(),
        "fastopt_default_threads": fastopt.get_num_threads(),
        "numba_backend": backends.available("numba"),
        "loadavg_at_start": loadavg(),
    }
    try:
        from fastopt.backends import compiled
        info["fastopt_isa"] = compiled.ISA
        info["fastopt_openmp"] = bool(compiled.HAVE_OPENMP)
    except Exception as exc:
        info["fastopt_isa"] = f"unavailable ({exc})"
    try:
        import torch
        info["torch_threads_default"] = torch.get_num_threads()
        info["torch_parallel_info"] = torch.__config__.parallel_info().splitlines()[:6]
    except Exception:
        pass
    return info
