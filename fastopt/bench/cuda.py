"""``fastopt bench --device cuda``: fastopt's CUDA backend against torch.optim on
the GPU, with the device's copy bandwidth measured in the same run as the roof.

Peers (torch CUDA tensors, shared param and grad, each peer its own state):

* ``fastopt``        ``fastopt.<Rule>(param).step(grad)``: one launch on torch's
                     current stream;
* ``torch_fused``    ``torch.optim.<Rule>(fused=True)`` (Adam, AdamW, SGD, Adagrad);
* ``torch_foreach``  ``torch.optim.<Rule>(foreach=True)``.

Timing: CUDA events around a burst of steps (enough for ``--sample-ms``), the
peers interleaved, the median of ``--repeats`` bursts. The host cost of a step
(the wall time to issue it, without waiting for the GPU) is reported beside it:
at small sizes it is what a step costs. The roof is a device-to-device copy
(read + write) at the start and end of the run; the higher is used. The
document has the CPU benchmark's layout, so ``report`` writes its Markdown,
JSON and PNG.

Without a GPU (or under Numba's simulator) the command exits with status 1
and one line on stderr.
"""

from __future__ import annotations

import datetime as _dt
import gc
import statistics
import sys
import time

import numpy as np

from fastopt.bench import peers as P
from fastopt.bench.runner import (BENCH_HYPERS, _hp_json, build_steps, machine_info,
                                  merge_timings, speedups, write_outputs)

GPU_SIZES = (1_000, 10_000, 100_000, 1_000_000, 2 ** 24, 2 ** 26, 2 ** 28)
GPU_RULES = ("Adam", "AdamW", "SGD", "Adagrad")
GPU_PEERS = ("fastopt", "torch_fused", "torch_foreach")
ROOF_BYTES = 1 << 30  # each of the copy's two buffers (less when memory is short)


class NoDevice(Exception):
    """No GPU to benchmark on; the message is the one line printed."""


def find_device():
    """torch, after checking that a real GPU is there for Numba and torch."""
    import numba
    if numba.config.ENABLE_CUDASIM:
        raise NoDevice("no CUDA device found (NUMBA_ENABLE_CUDASIM=1 selects Numba's "
                       "simulator, which cannot be benchmarked)")
    try:
        from numba import cuda
        found = cuda.is_available()
    except Exception:  # a broken driver or numba-cuda install
        found = False
    if not found:
        raise NoDevice("no CUDA device found")
    try:
        import torch
    except ImportError:
        raise NoDevice("the GPU benchmark needs torch with CUDA for its peers and "
                       "timing: pip install torch") from None
    if not torch.cuda.is_available():
        raise NoDevice("no CUDA device found by torch (a CPU-only torch build?)")
    return torch


class Device:
    """Where the run's tensors live and how it is timed: ``"cuda"`` (CUDA events,
    torch's memory figures), or ``"cpu"``, which runs the same code on CPU tensors
    with wall-clock "events" so that the tests can exercise the harness on a
    machine without a GPU (its figures mean nothing for a GPU)."""

    def __init__(self, torch, kind="cuda"):
        self.torch, self.kind = torch, kind

    def sync(self):
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def event(self):
        if self.kind == "cuda":
            return self.torch.cuda.Event(enable_timing=True)
        return _WallEvent()

    def free_bytes(self):
        if self.kind == "cuda":
            return self.torch.cuda.mem_get_info()[0]
        from fastopt.bench.runner import available_memory
        return available_memory()

    def release(self):
        gc.collect()
        if self.kind == "cuda":
            self.torch.cuda.empty_cache()


class _WallEvent:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event's
        return (end.t - self.t) * 1e3


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def time_gpu(dev, steps: dict, *, repeats: int, warmup: int, target_sample_s: float):
    """{peer: timing}: per-step GPU time (CUDA events, median over bursts) and the
    host cost of issuing a step, the peers interleaved."""
    sync = dev.sync
    iters = {}
    for peer, step in steps.items():
        for _ in range(max(1, warmup)):
            step()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        one = max(time.perf_counter() - t0, 1e-6)
        iters[peer] = int(min(10_000, max(3, target_sample_s / one)))
    gpu = {p: [] for p in steps}
    host = {p: [] for p in steps}
    start, end = dev.event(), dev.event()
    for _ in range(repeats):
        for peer, step in steps.items():
            k = iters[peer]
            sync()
            start.record()
            h0 = time.perf_counter()
            for _ in range(k):
                step()
            h1 = time.perf_counter()
            end.record()
            end.synchronize()
            gpu[peer].append(start.elapsed_time(end) / 1e3 / k)
            host[peer].append((h1 - h0) / k)
    return {p: {"median_s": statistics.median(gpu[p]), "samples_s": gpu[p],
                "host_s": statistics.median(host[p]), "iters": iters[p]} for p in steps}


def measure_copy(dev, nbytes: int, repeats: int = 7) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    n = max(1, nbytes // 4)
    src = dev.torch.rand(n, device=dev.kind)
    dst = dev.torch.empty_like(src)
    steps = {"copy": lambda: dst.copy_(src)}
    t = time_gpu(dev, steps, repeats=repeats, warmup=3, target_sample_s=0.02)["copy"]
    del src, dst
    return {"kind": "copy", "bytes_per_array": n * 4, "median_s": t["median_s"],
            "gbps": 2 * n * 4 / t["median_s"] / 1e9}


# ---------------------------------------------------------------------------
# Peers on the GPU
# ---------------------------------------------------------------------------

def _torch_opt(torch, peer, rule, hp, params):
    if not rule.in_torch or not hasattr(torch.optim, rule.name):
        raise P.NotApplicable(f"torch.optim has no {rule.name}")
    cls = getattr(torch.optim, rule.name)
    kw = P._torch_kwargs(cls, hp)
    kw["fused" if peer == "torch_fused" else "foreach"] = True
    try:
        return cls(params, **kw)
    except (RuntimeError, ValueError) as exc:
        raise P.NotApplicable(f"torch.optim.{rule.name}({peer[6:]}=True): {exc}") from None


def make_gpu_step(torch, peer, rule, hp, param, grad):
    """(step, holder) for one peer on torch CUDA tensors ``param``/``grad``."""
    if peer == "fastopt":
        import fastopt
        opt = getattr(fastopt, rule.name)(param, **hp)
        step = opt.step
        return (lambda: step(grad)), opt
    if peer in ("torch_fused", "torch_foreach"):
        param.grad = grad
        opt = _torch_opt(torch, peer, rule, hp, [param])
        return opt.step, opt
    raise ValueError(f"unknown peer {peer!r}")


def make_gpu_model_step(dev, peer, rule, hp, shapes, gen):
    """A whole model: fastopt on one FlatParams buffer (one launch), torch over the
    list of tensors (as a model holds them)."""
    torch = dev.torch
    tensors = [torch.rand(s, generator=gen, device=dev.kind) - 0.5 for s in shapes]
    if peer == "fastopt":
        import fastopt
        flat = fastopt.FlatParams(tensors)
        torch.as_tensor(flat.grad).uniform_(-1e-2, 1e-2, generator=gen)  # in place
        opt = getattr(fastopt, rule.name)(flat, **hp)
        step, g = opt.step, flat.grad
        return (lambda: step(g)), (opt, flat)
    for t in tensors:
        t.grad = (torch.rand(t.shape, generator=gen, device=dev.kind) - 0.5) * 2e-2
    opt = _torch_opt(torch, peer, rule, hp, tensors)
    return opt.step, opt


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def gpu_info(torch) -> dict:
    if not torch.cuda.is_available():
        return {}
    from numba import cuda
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info()
    info = {"gpu_name": props.name, "gpu_sms": props.multi_processor_count,
            "gpu_memory_bytes": total, "gpu_free_bytes_at_start": free,
            "cuda_torch": torch.version.cuda}
    try:
        info["numba_cuda"] = getattr(cuda, "implementation", "?")
        from importlib.metadata import version
        info["numba_cuda_version"] = version("numba-cuda")
    except Exception:
        pass
    return info


def run_gpu(dev, cfg, argv) -> dict:
    from fastopt.bench import scenarios as S
    from fastopt.rules import get_rule
    torch = dev.torch
    t_start = time.monotonic()
    gen = torch.Generator(device=dev.kind)
    gen.manual_seed(cfg.seed)
    doc = {"schema": "fastopt-bench/1", "device": dev.kind,
           "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": ["fastopt", "bench"] + list(argv),
           "config": {"mode": cfg.mode, "rules": cfg.rules, "dtypes": cfg.dtypes,
                      "sizes": cfg.sizes, "peers": list(GPU_PEERS), "repeats": cfg.repeats,
                      "warmup": cfg.warmup, "target_sample_s": cfg.target_sample_s},
           "machine": {**machine_info(), **gpu_info(torch)},
           "peers": {p: {"status": "ok", "version": torch.__version__,
                         "label": GPU_LABELS[p]} for p in GPU_PEERS},
           "roof": [], "cases": [], "scenarios": {}}

    def roof(phase):
        r = measure_copy(dev, min(cfg.roof_bytes_per_array, dev.free_bytes() // 4))
        r["phase"] = phase
        doc["roof"].append(r)
        return r["gbps"]

    best = roof("start")
    for d in cfg.dtypes:
        dt = getattr(torch, d)
        itemsize = np.dtype(d).itemsize
        for r in cfg.rules:
            rule = get_rule(r)
            hp = P.hyperparameters(r, cfg.hypers.get(r))
            bpe = rule.bytes_per_element(hp, itemsize)
            for n in cfg.sizes:
                case = {"rule": r, "dtype": d, "n": int(n), "threads": 1,
                        "hyperparameters": _hp_json(hp), "bytes_per_element": bpe}
                need = n * itemsize * (2 + len(GPU_PEERS) * len(rule.needed_buffers(hp)) + 2)
                free = dev.free_bytes()
                if need > 0.9 * free:
                    case["skipped"] = (f"needs ~{need / 2**30:.1f} GiB of GPU memory, "
                                       f"{free / 2**30:.1f} GiB free")
                    doc["cases"].append(case)
                    continue
                if cfg.progress is not False:
                    print(f"fastopt bench: {r} {d} n={n}", file=sys.stderr)
                param = (torch.rand(n, generator=gen, device=dev.kind, dtype=dt) - 0.5)
                grad = (torch.rand(n, generator=gen, device=dev.kind, dtype=dt) - 0.5) * 2e-2
                steps, holders, status = build_steps(
                    GPU_PEERS, lambda peer: make_gpu_step(torch, peer, rule, hp, param, grad))
                t = time_gpu(dev, steps, repeats=cfg.repeats, warmup=cfg.warmup,
                             target_sample_s=cfg.target_sample_s)
                case["results"] = merge_timings(status, t, n, bpe, best)
                case["speedup"] = speedups(case["results"])
                doc["cases"].append(case)
                del steps, holders, param, grad
                dev.release()
    if "model" in cfg.scenarios:
        rows = []
        rule, hp = get_rule("Adam"), P.hyperparameters("Adam")
        for model, shapes_fn in S.MODELS.items():
            shapes = shapes_fn(scale=cfg.model_scale)
            n = int(sum(np.prod(s) for s in shapes))
            bpe = rule.bytes_per_element(hp, 4)
            steps, holders, status = build_steps(
                GPU_PEERS, lambda peer: make_gpu_model_step(dev, peer, rule, hp, shapes, gen))
            t = time_gpu(dev, steps, repeats=cfg.repeats, warmup=cfg.warmup,
                         target_sample_s=cfg.target_sample_s)
            results = merge_timings(status, t, n, bpe, best)
            rows.append({"model": model, "rule": "Adam", "dtype": "float32",
                         "tensors": len(shapes), "n": n, "bytes_per_element": bpe,
                         "roof_gbps": best, "results": results, "speedup": speedups(results)})
            del steps, holders
            dev.release()
        doc["scenarios"]["model"] = {"cases": rows}
    best = max(best, roof("end"))
    doc["roof_gbps"] = [{"threads": 1, "dtype": d, "gbps": best} for d in cfg.dtypes]
    for c in doc["cases"]:
        if "results" in c:
            c["roof_gbps"] = best
            for res in c["results"].values():
                if res.get("status") == "ok" and "gbps" in res:
                    res["roof_fraction"] = res["gbps"] / best
    doc["elapsed_s"] = time.monotonic() - t_start
    from fastopt.bench.report import evaluate_goals
    doc["goals"] = evaluate_goals(doc)
    return doc


GPU_LABELS = {"fastopt": "fastopt (CUDA)", "torch_fused": "torch fused",
              "torch_foreach": "torch foreach"}


def gpu_config(cfg, args):
    """The CPU run's Config turned into the GPU run's: its own sizes, rules and
    peers unless the command line named them."""
    if not args.sizes:
        cfg.sizes = list(GPU_SIZES) if cfg.mode == "full" else list(GPU_SIZES[::2])
    if not args.rules:
        cfg.rules = list(GPU_RULES)
    if not args.scenarios:
        cfg.scenarios = ["model"]
    if not args.roof_mb:
        cfg.roof_bytes_per_array = ROOF_BYTES
    cfg.hypers = dict(BENCH_HYPERS)
    return cfg


def main(cfg, args, argv) -> int:
    try:
        torch = find_device()
    except NoDevice as exc:
        print(f"fastopt bench: {exc}", file=sys.stderr)
        return 1
    cfg = gpu_config(cfg, args)
    return write_outputs(run_gpu(Device(torch), cfg, argv), cfg, f"cuda-{cfg.mode}")
