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
JSON and PNG; the document, the roof and the model scenario are the CPU run's.

Without a GPU (or under Numba's simulator) the command exits with status 1
and one line on stderr.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import numpy as np

import fastopt
from fastopt.bench.config import BENCH_HYPERS, hp_json, hyperparameters
from fastopt.bench.grid import apply_roof, finish_document, new_document
from fastopt.bench.machine import available_memory, machine_info, too_big
from fastopt.bench.peers import build_steps, torch_optimizer
from fastopt.bench.scenarios import model_cases
from fastopt.bench.timing import merge_timings, speedups
from fastopt.rules import get_rule

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

def make_gpu_step(torch, peer, rule, hp, param, grad):
    """(step, holder) for one peer on torch CUDA tensors ``param``/``grad``."""
    if peer == "fastopt":
        opt = getattr(fastopt, rule.name)(param, **hp)
        step = opt.step
        return (lambda: step(grad)), opt
    param.grad = grad
    opt = torch_optimizer(peer, rule, hp, [param])
    return opt.step, opt


def make_gpu_model_step(dev, peer, rule, hp, shapes, gen):
    """A whole model: fastopt on one FlatParams buffer (one launch), torch over the
    list of tensors (as a model holds them)."""
    torch = dev.torch
    tensors = [torch.rand(s, generator=gen, device=dev.kind) - 0.5 for s in shapes]
    if peer == "fastopt":
        flat = fastopt.FlatParams(tensors)
        torch.as_tensor(flat.grad).uniform_(-1e-2, 1e-2, generator=gen)  # in place
        opt = getattr(fastopt, rule.name)(flat, **hp)
        step, g = opt.step, flat.grad
        return (lambda: step(g)), (opt, flat)
    for t in tensors:
        t.grad = (torch.rand(t.shape, generator=gen, device=dev.kind) - 0.5) * 2e-2
    opt = torch_optimizer(peer, rule, hp, tensors)
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
    torch = dev.torch
    t_start = time.monotonic()
    gen = torch.Generator(device=dev.kind)
    gen.manual_seed(cfg.seed)
    doc = new_document(cfg, argv, GPU_PEERS, {**machine_info(), **gpu_info(torch)},
                       device=dev.kind)

    def roof(phase):
        r = measure_copy(dev, min(cfg.roof_bytes_per_array, dev.free_bytes() // 4))
        r["phase"] = phase
        doc["roof"].append(r)
        return r["gbps"]

    def timed(steps):
        return time_gpu(dev, steps, repeats=cfg.repeats, warmup=cfg.warmup,
                        target_sample_s=cfg.target_sample_s)

    best = roof("start")
    for d in cfg.dtypes:
        dt, itemsize = getattr(torch, d), np.dtype(d).itemsize
        for r in cfg.rules:
            rule = get_rule(r)
            hp = hyperparameters(r, cfg.hypers.get(r))
            bpe = rule.bytes_per_element(hp, itemsize)
            for n in cfg.sizes:
                case = {"rule": r, "dtype": d, "n": int(n), "threads": 1,
                        "hyperparameters": hp_json(hp), "bytes_per_element": bpe}
                need = n * itemsize * (2 + len(GPU_PEERS) * len(rule.needed_buffers(hp)) + 2)
                why = too_big(need, 0.9, dev.free_bytes(), " of GPU memory")
                if why:
                    case["skipped"] = why
                    doc["cases"].append(case)
                    continue
                if cfg.progress is not False:
                    print(f"fastopt bench: {r} {d} n={n}", file=sys.stderr)
                param = (torch.rand(n, generator=gen, device=dev.kind, dtype=dt) - 0.5)
                grad = (torch.rand(n, generator=gen, device=dev.kind, dtype=dt) - 0.5) * 2e-2
                steps, holders, status = build_steps(
                    GPU_PEERS, lambda peer: make_gpu_step(torch, peer, rule, hp, param, grad))
                case["results"] = merge_timings(status, timed(steps), n, bpe, best)
                case["speedup"] = speedups(case["results"])
                doc["cases"].append(case)
                del steps, holders, param, grad
                dev.release()
    if "model" in cfg.scenarios:
        rule, hp = get_rule("Adam"), hyperparameters("Adam")

        def make_steps(shapes):
            return build_steps(GPU_PEERS, lambda peer: make_gpu_model_step(
                dev, peer, rule, hp, shapes, gen))
        doc["scenarios"]["model"] = model_cases(
            cfg, make_steps, lambda steps, nbytes: (timed(steps), best, None))
        dev.release()
    best = max(best, roof("end"))
    doc["roof_gbps"] = [{"threads": 1, "dtype": d, "gbps": best} for d in cfg.dtypes]
    apply_roof(doc, lambda row: best)
    return finish_document(doc, t_start)


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
    cfg.mode = f"cuda-{cfg.mode}"
    return cfg


def run_from_args(cfg, args, argv) -> dict:
    """The GPU run's document; raises NoDevice without a usable GPU."""
    return run_gpu(Device(find_device()), gpu_config(cfg, args), argv)
