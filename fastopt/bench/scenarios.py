"""The benchmark's extra scenarios: per-call overhead on tiny buffers, a multi-tensor
model as one FlatParams call, thread scaling, subnormal state, and the cost of one
L-BFGS iteration (``fastopt/bench/lbfgs.py``).

Each ``scenario_<name>(cfg, nthreads, roofs, rng, bar)`` returns a JSON-able dict.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from fastopt.bench import peers as P
from fastopt.bench import roof as roof_mod
from fastopt.bench.runner import (build_steps, merge_timings, prestep_threshold, random_array,
                                  set_threads, speedups)
from fastopt.bench.timing import time_interleaved

OVERHEAD_SIZES = (1, 100, 1000)


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
    import fastopt
    from fastopt.backends import compiled
    from fastopt.rules import get_rule
    rule = get_rule("Adam")
    hp = P.hyperparameters("Adam")
    p = np.zeros(1, np.float32)
    g = np.full(1, 1e-3, np.float32)
    m = np.zeros(1, np.float32)
    v = np.zeros(1, np.float32)
    opt = fastopt.Adam(p.copy(), backend="cython")
    scalars = rule.initial_scalars(hp)
    args, _ = rule.plan(hp, 10, scalars, False)
    kern = compiled.adam
    # opt.step goes through a bound kernel (param and state acquired once);
    # the generic entry point (every buffer acquired per call) is shown beside it
    bound = compiled.bind("adam", p, (m, v, None))
    out = {
        "empty_python_call_s": _loop_time(lambda: None),
        "plan_s": _loop_time(lambda: rule.plan(hp, 10, scalars, False)),
        "compiled_kernel_call_s": _loop_time(lambda: bound.step(g, args, nthreads)),
        "generic_entry_call_s": _loop_time(lambda: kern(p, g, m, v, None, *args, nthreads)),
        "opt_step_s": _loop_time(lambda: opt.step(g)),
    }
    out["python_layer_s"] = out["opt_step_s"] - out["compiled_kernel_call_s"]
    return out


def scenario_overhead(cfg, nthreads, roofs, rng, bar=None):
    rows = []
    peers = list(cfg.peers) + ["fastopt_kernel"]
    for rule_name in ("Adam",):
        hp = P.hyperparameters(rule_name, cfg.hypers.get(rule_name))
        for n in OVERHEAD_SIZES:
            for dtype in ("float32",):
                param = random_array(n, dtype, rng)
                grad = random_array(n, dtype, rng, -1e-2, 1e-2)
                steps, holders, status = build_steps(
                    peers, lambda peer: P.make_step(peer, rule_name, hp, param, grad, nthreads))
                t = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                                     target_sample_s=max(cfg.target_sample_s, 0.002))
                results = merge_timings(status, t, n)
                rows.append({"rule": rule_name, "dtype": dtype, "n": n, "results": results,
                             "speedup": speedups(results)})
    out = {"cases": rows}
    try:
        out["breakdown_adam_float32_n1"] = overhead_breakdown(nthreads)
    except Exception as exc:
        out["breakdown_adam_float32_n1"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ---------------------------------------------------------------------------
# Multi-tensor models
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


def scenario_model(cfg, nthreads, roofs, rng, bar=None):
    import fastopt
    rows = []
    rule_name = "Adam"
    hp = P.hyperparameters(rule_name)
    from fastopt.rules import get_rule
    for model, shapes_fn in MODELS.items():
        shapes = shapes_fn(scale=cfg.model_scale)
        arrays = [(rng.random(s, dtype=np.float32) - 0.5) for s in shapes]
        flat = fastopt.FlatParams(arrays, dtype=np.float32)
        flat.grad[:] = random_array(flat.grad.shape[0], np.float32, rng, -1e-2, 1e-2)
        del arrays
        n = int(flat.data.shape[0])
        bpe = get_rule(rule_name).bytes_per_element(hp, 4)
        peers = [p for p in MODEL_PEERS if p in cfg.peers or p == "torch_fused_flat"]
        if cfg.mode == "quick":
            # on CPU torch's default *is* foreach=False (see benchmarks/README.md):
            # the quick run times it once, as foreach=False
            peers = [p for p in peers if p != "torch_default"]
        if "torch_fused" not in cfg.peers:
            peers = [p for p in peers if p != "torch_fused_flat"]
        steps, holders, status = build_steps(
            peers, lambda peer: P.make_multi_step(peer, rule_name, hp, flat, nthreads))
        probe = roof_mod.probe("float32", nthreads, cfg.roof_bytes_per_array)
        steps.update(probe.steps())
        t = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                             target_sample_s=cfg.target_sample_s, prestep_below_s=0.0)
        in_case = probe.collect(t)
        roof = in_case["gbps"] if in_case else roofs.get((nthreads, "float32"))
        results = merge_timings(status, t, n, bpe, roof)
        rows.append({"model": model, "rule": rule_name, "dtype": "float32",
                     "tensors": len(shapes), "n": n, "bytes_per_element": bpe,
                     "roof_gbps": roof, "roof_in_case": in_case,
                     "results": results, "speedup": speedups(results)})
        del steps, holders, flat
        gc.collect()
    return {"cases": rows}


# ---------------------------------------------------------------------------
# Thread scaling
# ---------------------------------------------------------------------------

def scenario_threads(cfg, nthreads, roofs, rng, bar=None):
    import os
    maxt = max(nthreads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))
    counts = sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k <= maxt], maxt})
    sizes = [16_000_000] if cfg.mode == "quick" else [1_000_000, 16_000_000]
    sizes = [s for s in sizes if s <= max(cfg.sizes)] or [max(cfg.sizes)]
    peers = [p for p in ("fastopt", "fastopt_numba", "torch_fused", "torch_default")
             if p in cfg.peers]
    from fastopt.rules import get_rule
    hp = P.hyperparameters("Adam")
    bpe = get_rule("Adam").bytes_per_element(hp, 4)
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
                    peers, lambda peer: P.make_step(peer, "Adam", hp, param, grad, th))
                probe = roof_mod.probe("float32", th, cfg.roof_bytes_per_array)
                steps.update(probe.steps())
                t = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                                     target_sample_s=cfg.target_sample_s,
                                     prestep_below_s=prestep_threshold(bpe * n))
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
    # scaling of each peer from 1 thread to each count
    scaling = []
    for n in sizes:
        base = {p: res["median_s"] for row in rows if row["n"] == n and row["threads"] == 1
                for p, res in row["results"].items() if res.get("status") == "ok"}
        for row in rows:
            if row["n"] != n:
                continue
            scaling.append({"n": n, "threads": row["threads"],
                            "speedup_vs_1_thread": {
                                p: base[p] / res["median_s"] for p, res in row["results"].items()
                                if res.get("status") == "ok" and p in base}})
    roof_scaling = [{"threads": r["threads"], "gbps": r["gbps"],
                     "triad_gbps": r["triad"]["gbps"], "axpy_gbps": r["axpy"]["gbps"]}
                    for r in roof_rows]
    return {"counts": counts, "cases": rows, "scaling": scaling, "roof": roof_scaling,
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
    from fastopt.backends._host import full
    g = full(n, dtype, 0)
    e = rng.uniform(lo, hi, n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    g[:] = sign * 10.0 ** e
    return g


def subnormal_fraction(a) -> float:
    a = np.asarray(a)
    tiny = np.finfo(a.dtype).tiny
    mag = np.abs(a)
    return float(np.count_nonzero((mag < tiny) & (mag > 0)) / max(1, a.size))


def scenario_denormal(cfg, nthreads, roofs, rng, bar=None):
    from fastopt.rules import get_rule
    if cfg.mode == "quick":
        combos = [("float32", 1_000_000)]
    else:
        combos = [(d, n) for d in cfg.dtypes for n in (1_000_000, 16_000_000)]
    top = max(cfg.sizes)
    combos = sorted({(d, min(n, top)) for d, n in combos})
    hp = P.hyperparameters("Adam")
    peers = [p for p in DENORMAL_PEERS if p in cfg.peers]
    rows = []
    for dtype, n in combos:
        bpe = get_rule("Adam").bytes_per_element(hp, np.dtype(dtype).itemsize)
        data = {}
        for kind in ("normal", "subnormal"):
            param = random_array(n, dtype, rng)
            grad = (random_array(n, dtype, rng, -1e-2, 1e-2) if kind == "normal"
                    else _subnormal_grad(n, dtype, rng))
            data[kind] = (param, grad)
        steps, holders, status = {}, {}, {}
        for kind, (param, grad) in data.items():
            s, h, st = build_steps(
                peers, lambda peer: P.make_step(peer, "Adam", hp, param, grad, nthreads))
            for peer in st:
                status[f"{peer}:{kind}"] = st[peer]
                if peer in s:
                    steps[f"{peer}:{kind}"] = s[peer]
                    holders[f"{peer}:{kind}"] = h[peer]
        t = time_interleaved(steps, repeats=cfg.repeats, warmup=max(cfg.warmup, 3),
                             target_sample_s=cfg.target_sample_s,
                             prestep_below_s=prestep_threshold(bpe * n))
        results = merge_timings(status, t, n, bpe, roofs.get((nthreads, dtype)))
        census = {}
        for key, h in holders.items():
            try:
                bufs = P.state_buffers(key.split(":")[0], h)
                census[key] = {k: subnormal_fraction(v) for k, v in bufs.items()}
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
        del steps, holders, data
        gc.collect()
    return {"cases": rows, "limit": 1.2}


# ---------------------------------------------------------------------------
# fastopt.torch on a whole model
# ---------------------------------------------------------------------------

# (label, width d, vocabulary, context): GPT-style decoders of 8 layers, 132 tensors
TORCH_MODELS = (("1M", 96, 1024, 128), ("20M", 432, 4096, 256))
TORCH_MODEL_PEERS = ("fastopt_torch", "fastopt_torch_gather", "grad_assign", "torch_fused",
                     "torch_default", "torch_foreach")
TORCH_MODEL_LABELS = {
    "fastopt_torch": "fastopt.torch",
    "fastopt_torch_gather": "fastopt.torch, fresh grads (gather)",
    "grad_assign": "p.grad = g only",
    "torch_fused": "torch fused",
    "torch_default": "torch default (foreach=None)",
    "torch_foreach": "torch foreach=True",
}


def torch_model_params(shapes, rng):
    """nn.Parameters of the given shapes with gradients set, as after backward()."""
    import torch
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.from_numpy(rng.random(s, dtype=np.float32) - 0.5))
        p.grad = torch.from_numpy((rng.random(s, dtype=np.float32) - 0.5) * 2e-2)
        params.append(p)
    return params


def _clone_params(params):
    import torch
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def make_torch_model_step(peer, params, hp):
    """(step, holder) for one peer over its own copy of ``params``."""
    import torch
    import fastopt.torch as fot
    ps = _clone_params(params)
    if peer == "grad_assign":
        fresh = [p.grad.clone() for p in ps]

        def assign():
            for p, g in zip(ps, fresh):
                p.grad = g
        return assign, ps
    if peer.startswith("fastopt_torch"):
        opt = fot.AdamW(ps, **hp)
        opt.step()  # the first step gathers the grads into the flat buffer
        if peer == "fastopt_torch":
            return opt.step, opt
        # after model.zero_grad() backward() leaves fresh tensors in p.grad: each step
        # copies them into the flat buffer (one gather) and re-points p.grad
        fresh = [p.grad.clone() for p in ps]

        def gather_step():
            for p, g in zip(ps, fresh):
                p.grad = g
            opt.step()
        return gather_step, opt
    kw = dict(hp)
    if peer == "torch_fused":
        kw["fused"] = True
    elif peer == "torch_foreach":
        kw["foreach"] = True
    elif peer != "torch_default":
        raise ValueError(f"unknown peer {peer!r}")
    opt = torch.optim.AdamW(ps, **kw)
    return opt.step, opt


def scenario_torch_model(cfg, nthreads, roofs, rng, bar=None):
    """A whole-model ``step()`` of fastopt.torch.AdamW against torch.optim.AdamW over
    the same transformer-like parameter list, float32; plus the step after the grads
    were replaced by fresh tensors (the gather path) and, for reference, the cost of
    only assigning those grads."""
    try:
        import torch  # noqa: F401
        import fastopt.torch  # noqa: F401
    except ImportError as exc:
        return {"cases": [], "skipped": f"torch is not installed ({exc})"}
    from fastopt.rules import get_rule
    models = TORCH_MODELS[:1] if cfg.mode == "quick" else TORCH_MODELS
    hp = {"lr": 1e-3, "weight_decay": 0.01}
    bpe = get_rule("AdamW").bytes_per_element(P.hyperparameters("AdamW", hp), 4)
    rows = []
    for label, d, vocab, ctx in models:
        shapes = transformer_shapes(d=d, vocab=vocab, ctx=ctx)
        params = torch_model_params(shapes, rng)
        n = sum(p.numel() for p in params)
        steps, holders, status = build_steps(
            TORCH_MODEL_PEERS, lambda peer: make_torch_model_step(peer, params, hp))
        del params
        t = time_interleaved(steps, repeats=cfg.repeats, warmup=max(cfg.warmup, 1),
                             target_sample_s=cfg.target_sample_s,
                             prestep_below_s=prestep_threshold(bpe * n))
        results = merge_timings(status, t, n, bpe)
        rows.append({"model": f"transformer {label}", "rule": "AdamW", "dtype": "float32",
                     "hyperparameters": hp, "tensors": len(shapes), "n": n,
                     "bytes_per_element": bpe, "results": results,
                     "speedup": speedups(results, base="fastopt_torch")})
        del steps, holders
        gc.collect()
    return {"cases": rows, "labels": dict(TORCH_MODEL_LABELS)}


# ---------------------------------------------------------------------------
# L-BFGS: one iteration, closure excluded (method in fastopt/bench/lbfgs.py)
# ---------------------------------------------------------------------------

def scenario_lbfgs(cfg, nthreads, roofs, rng, bar=None):
    from fastopt.bench import lbfgs as L
    from fastopt.bench.runner import available_memory
    cases = [tuple(c) for c in cfg.lbfgs_cases] or list(
        L.QUICK_CASES if cfg.mode == "quick" else L.DEFAULT_CASES)
    peers = ("fastopt", "torch", "scipy")
    itemsize = np.dtype(cfg.lbfgs_dtype).itemsize
    run, skipped = [], []
    for n, h in cases:
        need = L.mem_needed(n, h, itemsize, peers)
        avail = available_memory()
        if need > cfg.mem_fraction * avail:
            skipped.append({"n": n, "history": h, "reason": f"needs ~{need / 2**30:.1f} GiB, "
                            f"{avail / 2**30:.1f} GiB available"})
        else:
            run.append((n, h))
    set_threads(nthreads)
    out = L.scenario(cfg, nthreads, rng, cases=run, dtype=cfg.lbfgs_dtype, peers=peers)
    out["skipped"] = skipped
    return out
