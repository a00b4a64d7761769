"""The NumPy-side scenarios beside the grid: per-call overhead on tiny buffers, a
multi-tensor model as one FlatParams call, a list of arrays stepped in one call,
thread scaling and subnormal state.

Each ``scenario_<name>(cfg, nthreads, roofs, rng)`` returns a JSON-able dict.
"""

from __future__ import annotations

import gc
import time

import numpy as np

import fastopt
from fastopt.bench import roof as roof_mod
from fastopt.bench.config import hyperparameters
from fastopt.bench.machine import prestep_threshold, set_threads, usable_cpus
from fastopt.bench.peers import (Missing, build_steps, make_multi_step, make_step,
                                 random_array, state_buffers, torch_optimizer)
from fastopt.bench.timing import merge_timings, speedups, time_interleaved
from fastopt.rules import get_rule

OVERHEAD_SIZES = (1, 100, 1000)


def _time(cfg, steps, nbytes, **kw):
    return time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                            target_sample_s=cfg.target_sample_s,
                            prestep_below_s=prestep_threshold(nbytes), **kw)


def _adam_bpe(itemsize=4):
    return get_rule("Adam").bytes_per_element(hyperparameters("Adam"), itemsize)


# ---------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------

def transformer_shapes(d=384, layers=8, vocab=4096, ctx=256, ff=4, scale=1.0):
    """A GPT-style decoder: token and position embeddings; per layer two LayerNorms,
    separate q/k/v/o projections with biases, a 4x MLP; a final LayerNorm
    (the LM head is tied to the embedding). 132 tensors, 15.9 M parameters.
    ``scale`` multiplies the width (d) and the vocabulary, not the tensor count."""
    if scale != 1.0:
        d = max(8, int(round(d * scale / 8)) * 8)
        vocab = max(16, int(vocab * scale))
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]
        for _ in range(4):
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,), (d, ff * d), (ff * d,), (ff * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


# the same 132-tensor decoder at three widths (tests shrink them)
TRANSFORMERS = {"1M": dict(d=96, vocab=1024, ctx=128), "16M": {},
                "20M": dict(d=432, vocab=4096, ctx=256)}


def resnet_shapes(width=56, blocks=(3, 4, 6, 3), classes=1000, scale=1.0):
    """A ResNet-34 layout (basic blocks [3, 4, 6, 3]) at 56/64 of the usual width:
    convolutions without bias, BatchNorm weight and bias, 1x1 projections where the
    shape changes, a classifier. 110 tensors, 16.7 M parameters. ``scale``
    multiplies the width."""
    if scale != 1.0:
        width = max(4, int(round(width * scale)))
    shapes = [(width, 3, 7, 7), (width,), (width,)]
    cin = width
    for stage, nblocks in enumerate(blocks):
        cout = width * 2 ** stage
        for b in range(nblocks):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if b == 0 and cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(classes, cin), (classes,)]
    return shapes


MODELS = {"transformer": transformer_shapes, "resnet": resnet_shapes}
MODEL_PEERS = ("fastopt", "fastopt_numba", "numpy", "torch_fused", "torch_foreach_false",
               "torch_default", "torch_fused_flat")


# ---------------------------------------------------------------------------
# Per-call overhead
# ---------------------------------------------------------------------------

def _loop_time(fn, inner=20000, repeats=5):
    """Median seconds per call of fn over ``repeats`` loops of ``inner`` calls."""
    ts = []
    fn()
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter_ns() - t0) / 1e9 / inner)
    return float(np.median(ts))


def overhead_breakdown(nthreads) -> dict:
    """Where the microseconds of one ``fastopt.Adam(...).step(g)`` on a 1-element
    float32 buffer go: the Python-level plan, the compiled entry point, the rest."""
    from fastopt.backends import compiled
    rule, hp = get_rule("Adam"), hyperparameters("Adam")
    p, m, v = (np.zeros(1, np.float32) for _ in range(3))
    g = np.full(1, 1e-3, np.float32)
    opt = fastopt.Adam(p.copy(), backend="cython")
    scalars = rule.initial_scalars(hp)
    args, _ = rule.plan(hp, 10, scalars, False)
    # opt.step goes through a bound kernel (param and state acquired once);
    # the generic entry point (every buffer acquired per call) is shown beside it
    bound = compiled.bind("adam", p, (m, v, None))
    out = {
        "empty_python_call_s": _loop_time(lambda: None),
        "plan_s": _loop_time(lambda: rule.plan(hp, 10, scalars, False)),
        "compiled_kernel_call_s": _loop_time(lambda: bound.step(g, args, nthreads)),
        "generic_entry_call_s": _loop_time(lambda: compiled.adam(p, g, m, v, None, *args,
                                                                 nthreads)),
        "opt_step_s": _loop_time(lambda: opt.step(g)),
    }
    out["python_layer_s"] = out["opt_step_s"] - out["compiled_kernel_call_s"]
    return out


def scenario_overhead(cfg, nthreads, roofs, rng):
    rows = []
    hp = hyperparameters("Adam", cfg.hypers.get("Adam"))
    for n in OVERHEAD_SIZES:
        param = random_array(n, "float32", rng)
        grad = random_array(n, "float32", rng, -1e-2, 1e-2)
        steps, holders, status = build_steps(
            list(cfg.peers) + ["fastopt_kernel"],
            lambda peer: make_step(peer, "Adam", hp, param, grad, nthreads))
        t = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                             target_sample_s=max(cfg.target_sample_s, 0.002))
        results = merge_timings(status, t, n)
        rows.append({"rule": "Adam", "dtype": "float32", "n": n, "results": results,
                     "speedup": speedups(results)})
    out = {"cases": rows}
    try:
        out["breakdown_adam_float32_n1"] = overhead_breakdown(nthreads)
    except Exception as exc:
        out["breakdown_adam_float32_n1"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ---------------------------------------------------------------------------
# Multi-tensor models (the CUDA run calls model_cases with its own device)
# ---------------------------------------------------------------------------

def model_cases(cfg, make_steps, time_steps):
    """One row per model of ``MODELS``: ``make_steps(shapes)`` gives (steps, holders,
    status) of every peer over the model, ``time_steps(steps, nbytes)`` gives
    (timings, roof GB/s, roof measured in the case or None)."""
    rows = []
    bpe = _adam_bpe()
    for model, shapes_fn in MODELS.items():
        shapes = shapes_fn(scale=cfg.model_scale)
        n = int(sum(np.prod(s) for s in shapes))
        steps, holders, status = make_steps(shapes)
        t, roof, in_case = time_steps(steps, bpe * n)
        results = merge_timings(status, t, n, bpe, roof)
        rows.append({"model": model, "rule": "Adam", "dtype": "float32",
                     "tensors": len(shapes), "n": n, "bytes_per_element": bpe,
                     "roof_gbps": roof, "roof_in_case": in_case,
                     "results": results, "speedup": speedups(results)})
        del steps, holders
        gc.collect()
    return {"cases": rows}


def scenario_model(cfg, nthreads, roofs, rng):
    hp = hyperparameters("Adam")
    peers = [p for p in MODEL_PEERS if p in cfg.peers or p == "torch_fused_flat"]
    if cfg.mode == "quick":
        # on CPU torch's default *is* foreach=False: the quick run times it once
        peers = [p for p in peers if p != "torch_default"]
    if "torch_fused" not in cfg.peers:
        peers = [p for p in peers if p != "torch_fused_flat"]

    def make_steps(shapes):
        flat = fastopt.FlatParams([(rng.random(s, dtype=np.float32) - 0.5) for s in shapes],
                                  dtype=np.float32)
        flat.grad[:] = random_array(flat.grad.shape[0], np.float32, rng, -1e-2, 1e-2)
        return build_steps(peers, lambda peer: make_multi_step(peer, "Adam", hp, flat,
                                                               nthreads))

    def time_steps(steps, nbytes):
        probe = roof_mod.probe("float32", nthreads, cfg.roof_bytes_per_array)
        t = time_interleaved({**steps, **probe.steps()}, repeats=cfg.repeats,
                             warmup=cfg.warmup, target_sample_s=cfg.target_sample_s,
                             prestep_below_s=0.0)
        in_case = probe.collect(t)
        return t, in_case["gbps"] if in_case else roofs.get((nthreads, "float32")), in_case
    return model_cases(cfg, make_steps, time_steps)


# ---------------------------------------------------------------------------
# A list of arrays in one call
# ---------------------------------------------------------------------------

LIST_PEERS = ("fastopt_list", "fastopt_flat", "fastopt", "torch_fused")


def _list_step(peer, hp, arrays, grads):
    """(step, its parameter arrays) of one peer over its own copy of ``arrays``."""
    ps, gs = [a.copy() for a in arrays], [g.copy() for g in grads]
    if peer == "fastopt_list":
        try:
            opt = fastopt.Adam(ps, **hp)
        except TypeError as exc:
            raise Missing(f"fastopt.Adam takes no list of arrays in this version: {exc}") \
                from None
        step = opt.step
        return (lambda: step(gs)), ps
    if peer == "fastopt_flat":
        flat = fastopt.FlatParams(ps)
        for view, g in zip(flat.grad_views, gs):
            view[...] = g
        step, g = fastopt.Adam(flat, **hp).step, flat.grad
        return (lambda: step(g)), flat.views
    if peer == "fastopt":
        if len(ps) != 1:
            raise ValueError("the single-array peer takes one array")
        return make_step("fastopt", "Adam", hp, ps[0], gs[0])[0], ps
    try:
        import torch
    except ImportError as exc:
        raise Missing(f"torch is not installed ({exc})") from None
    params = []
    for a, g in zip(ps, gs):
        t = torch.from_numpy(a)
        t.grad = torch.from_numpy(g)
        params.append(t)
    return torch_optimizer(peer, get_rule("Adam"), hp, params).step, ps


def scenario_lists(cfg, nthreads, roofs, rng):
    """Adam over the 132 float32 arrays of a transformer-like model: as a list in one
    call, as one FlatParams buffer, and torch fused over the same tensors; plus a
    single 1,000-element array (the list API's cost where a plain array was enough)."""
    hp = hyperparameters("Adam")
    cases = [(f"transformer {k}", transformer_shapes(**TRANSFORMERS[k], scale=cfg.model_scale))
             for k in ("1M", "16M")] + [("one array", [(1000,)])]
    rows = []
    for name, shapes in cases:
        arrays = [random_array(int(np.prod(s)), np.float32, rng).reshape(s) for s in shapes]
        grads = [random_array(a.size, np.float32, rng, -1e-2, 1e-2).reshape(a.shape)
                 for a in arrays]
        n = sum(a.size for a in arrays)
        peers = [p for p in LIST_PEERS if p != "fastopt" or len(shapes) == 1]
        steps, holders, status = build_steps(peers,
                                             lambda peer: _list_step(peer, hp, arrays, grads))
        del arrays, grads
        t = _time(cfg, steps, _adam_bpe() * n)
        results = merge_timings(status, t, n, _adam_bpe())
        rows.append({"case": name, "rule": "Adam", "dtype": "float32", "arrays": len(shapes),
                     "n": n, "results": results,
                     "speedup": speedups(results, base="fastopt_list")})
        del steps, holders
        gc.collect()
    return {"cases": rows}


# ---------------------------------------------------------------------------
# Thread scaling
# ---------------------------------------------------------------------------

def scenario_threads(cfg, nthreads, roofs, rng):
    maxt = max(nthreads, usable_cpus())
    counts = sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k <= maxt], maxt})
    sizes = [16_000_000] if cfg.mode == "quick" else [1_000_000, 16_000_000]
    sizes = [s for s in sizes if s <= max(cfg.sizes)] or [max(cfg.sizes)]
    peers = [p for p in ("fastopt", "fastopt_numba", "torch_fused", "torch_default")
             if p in cfg.peers]
    hp, bpe = hyperparameters("Adam"), _adam_bpe()
    rows, roof_rows = [], []
    try:
        for th in counts:
            set_threads(th)
            r = roof_mod.measure(th, "float32", repeats=5,
                                 bytes_per_array=cfg.roof_bytes_per_array)
            roof_rows.append(r)
            for n in sizes:
                param = random_array(n, np.float32, rng)
                grad = random_array(n, np.float32, rng, -1e-2, 1e-2)
                steps, holders, status = build_steps(
                    peers, lambda peer: make_step(peer, "Adam", hp, param, grad, th))
                probe = roof_mod.probe("float32", th, cfg.roof_bytes_per_array)
                t = _time(cfg, {**steps, **probe.steps()}, bpe * n)
                in_case = probe.collect(t)
                roof = max(r["gbps"], in_case["gbps"]) if in_case else r["gbps"]
                results = merge_timings(status, t, n, bpe, roof)
                rows.append({"rule": "Adam", "dtype": "float32", "n": n, "threads": th,
                             "roof_gbps": roof, "roof_in_case": in_case, "results": results,
                             "speedup": speedups(results)})
                del steps, holders, param, grad
                gc.collect()
    finally:
        set_threads(nthreads)
    scaling = []
    for n in sizes:
        base = {p: res["median_s"] for row in rows if row["n"] == n and row["threads"] == 1
                for p, res in row["results"].items() if res.get("status") == "ok"}
        scaling += [{"n": n, "threads": row["threads"], "speedup_vs_1_thread": {
            p: base[p] / res["median_s"] for p, res in row["results"].items()
            if res.get("status") == "ok" and p in base}} for row in rows if row["n"] == n]
    return {"counts": counts, "cases": rows, "scaling": scaling,
            "roof": [{"threads": r["threads"], "gbps": r["gbps"], "triad_gbps": r["triad"]["gbps"],
                      "axpy_gbps": r["axpy"]["gbps"]} for r in roof_rows],
            "roof_measurements": [{"threads": r["threads"], "dtype": r["dtype"],
                                   "gbps": r["gbps"]} for r in roof_rows]}


# ---------------------------------------------------------------------------
# Subnormal state
# ---------------------------------------------------------------------------

# Gradients log-uniform in magnitude over these decades: exp_avg_sq (about g^2)
# then holds subnormal values, g*g underflows for the smallest, exp_avg stays normal.
SUBNORMAL_GRAD_DECADES = {"float32": (-30.0, -19.5), "float64": (-170.0, -154.5)}
DENORMAL_PEERS = ("fastopt", "fastopt_numba", "numpy", "torch_fused", "torch_default")


def _subnormal_grad(n, dtype, rng):
    lo, hi = SUBNORMAL_GRAD_DECADES[dtype]
    g = random_array(n, dtype, rng)
    g[:] = np.where(rng.random(n) < 0.5, -1.0, 1.0) * 10.0 ** rng.uniform(lo, hi, n)
    return g


def subnormal_fraction(a) -> float:
    a = np.asarray(a)
    mag = np.abs(a)
    return float(np.count_nonzero((mag < np.finfo(a.dtype).tiny) & (mag > 0)) / max(1, a.size))


def scenario_denormal(cfg, nthreads, roofs, rng):
    if cfg.mode == "quick":
        combos = [("float32", 1_000_000)]
    else:
        combos = [(d, n) for d in cfg.dtypes for n in (1_000_000, 16_000_000)]
    combos = sorted({(d, min(n, max(cfg.sizes))) for d, n in combos})
    hp = hyperparameters("Adam")
    peers = [p for p in DENORMAL_PEERS if p in cfg.peers]
    rows = []
    for dtype, n in combos:
        bpe = _adam_bpe(np.dtype(dtype).itemsize)
        steps, holders, status = {}, {}, {}
        for kind in ("normal", "subnormal"):
            param = random_array(n, dtype, rng)
            grad = (random_array(n, dtype, rng, -1e-2, 1e-2) if kind == "normal"
                    else _subnormal_grad(n, dtype, rng))
            s, h, st = build_steps(
                peers, lambda peer: make_step(peer, "Adam", hp, param, grad, nthreads))
            status.update({f"{p}:{kind}": v for p, v in st.items()})
            steps.update({f"{p}:{kind}": v for p, v in s.items()})
            holders.update({f"{p}:{kind}": v for p, v in h.items()})
        t = time_interleaved(steps, repeats=cfg.repeats, warmup=max(cfg.warmup, 3),
                             target_sample_s=cfg.target_sample_s,
                             prestep_below_s=prestep_threshold(bpe * n))
        results = merge_timings(status, t, n, bpe, roofs.get((nthreads, dtype)))
        census = {}
        for key, h in holders.items():
            try:
                census[key] = {k: subnormal_fraction(v)
                               for k, v in state_buffers(key.split(":")[0], h).items()}
            except Exception as exc:
                census[key] = {"error": str(exc)}
        ratios = {}
        for peer in peers:
            a, b = results.get(f"{peer}:normal", {}), results.get(f"{peer}:subnormal", {})
            if a.get("status") == "ok" and b.get("status") == "ok":
                ratios[peer] = b["median_s"] / a["median_s"]
        rows.append({"rule": "Adam", "dtype": dtype, "n": n, "threads": nthreads,
                     "grad_log10_range": SUBNORMAL_GRAD_DECADES[dtype],
                     "results": results, "subnormal_fraction_of_state": census,
                     "slowdown": ratios})
        del steps, holders
        gc.collect()
    return {"cases": rows}
