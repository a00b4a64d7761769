"""Scenarios for the optimizers outside the element-wise grid, each against its
torch peer through the public API, steps interleaved (``time_interleaved``):

* ``schedulefree``: fastopt.torch.AdamWScheduleFree/SGDScheduleFree against the
  ``schedulefree`` package (foreach), one tensor of 1M and 16M elements;
* ``adafactor``: fastopt.torch.Adafactor against torch.optim.Adafactor, one matrix
  of 1M (1024²) and 16M (4096²) elements;
* ``sparse``: fastopt.torch.SparseAdam and Adagrad against torch's on an embedding
  table of 1M rows × 64 with about 1% of the rows touched per step (10,000 draws
  and 2,000 repeats of them: duplicates included), an uncoalesced COO gradient as
  ``nn.Embedding(sparse=True)`` makes;
* ``muon``: fastopt.torch.Muon (float32 Newton–Schulz) against torch.optim.Muon
  (bfloat16) on the matrices of a 12-layer transformer (d = 384: four d×d and two
  d×4d per layer, 21 M parameters); quick mode times one layer (the per-step ratio
  is the same: the model is 12 copies of it).

Each returns ``{"cases": [...]}`` with per-peer results and ``speedup`` (peer time /
fastopt time).
"""

from __future__ import annotations

import gc

import numpy as np

from fastopt.bench.peers import build_steps
from fastopt.bench.timing import merge_timings, speedups, time_interleaved

SIZES = (1 << 20, 1 << 24)                 # 1M and 16M elements
TABLE = (1_000_000, 64, 10_000, 2_000)     # rows, width, draws, repeats of draws
MUON_D, MUON_LAYERS = 384, 12


def _torch():
    import torch
    import fastopt.torch  # noqa: F401
    return torch


def _skip(exc):
    return {"cases": [], "skipped": f"needs torch (and schedulefree): {exc}"}


def _run(cfg, make, peers, n, base="fastopt_torch", sample_s=0.0, repeats=None):
    steps, holders, status = build_steps(peers, make)
    t = time_interleaved(steps, repeats=repeats or 3 * cfg.repeats,
                         warmup=max(cfg.warmup, 1), target_sample_s=sample_s,
                         prestep_below_s=0.0)
    results = merge_timings(status, t, n)
    del steps, holders
    gc.collect()
    return results, speedups(results, base=base)


def _dense_maker(torch, shape, classes, hp, train=False):
    def make(peer):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * 1e-2
        opt = classes[peer]([p], **hp)
        if train:
            opt.train()
        return opt.step, (p, opt)
    return make


def scenario_schedulefree(cfg, nthreads, roofs, rng):
    try:
        torch = _torch()
        import schedulefree
        import fastopt.torch as fot
    except ImportError as exc:
        return _skip(exc)
    rows = []
    for name, hp in (("AdamWScheduleFree", {"lr": 1e-3, "weight_decay": 0.01}),
                     ("SGDScheduleFree", {"lr": 1e-2})):
        classes = {"fastopt_torch": getattr(fot, name),
                   "schedulefree": getattr(schedulefree, name)}
        for n in SIZES:
            results, sp = _run(cfg, _dense_maker(torch, (n,), classes, hp, train=True),
                               tuple(classes), n, sample_s=cfg.target_sample_s)
            rows.append({"rule": name, "n": n, "dtype": "float32", "hyperparameters": hp,
                         "results": results, "speedup": sp})
    return {"cases": rows}


def scenario_adafactor(cfg, nthreads, roofs, rng):
    try:
        torch = _torch()
        import fastopt.torch as fot
    except ImportError as exc:
        return _skip(exc)
    classes = {"fastopt_torch": fot.Adafactor, "torch_default": torch.optim.Adafactor}
    rows = []
    for n in SIZES:
        side = int(round(n ** 0.5))
        results, sp = _run(cfg, _dense_maker(torch, (side, side), classes, {}),
                           tuple(classes), side * side, sample_s=cfg.target_sample_s)
        rows.append({"rule": "Adafactor", "n": side * side, "shape": [side, side],
                     "dtype": "float32", "results": results, "speedup": sp})
    return {"cases": rows}


def scenario_sparse(cfg, nthreads, roofs, rng):
    try:
        torch = _torch()
        import fastopt.torch as fot
    except ImportError as exc:
        return _skip(exc)
    rows_n, width, draws, repeats = TABLE
    g = torch.Generator().manual_seed(cfg.seed)
    grads = []
    for _ in range(4):
        idx = torch.randint(0, rows_n, (draws,), generator=g)
        idx = torch.cat([idx, idx[:repeats]])
        vals = torch.randn((idx.shape[0], width), generator=g)
        grads.append(torch.sparse_coo_tensor(idx[None], vals, (rows_n, width),
                                             check_invariants=False))
    touched = float(np.mean([len(np.unique(x._indices().numpy())) for x in grads])) / rows_n
    out = []
    for name, classes, hp in (
            ("SparseAdam", {"fastopt_torch": fot.SparseAdam,
                            "torch_default": torch.optim.SparseAdam}, {"lr": 1e-3}),
            ("Adagrad", {"fastopt_torch": fot.Adagrad, "torch_default": torch.optim.Adagrad},
             {"lr": 1e-2})):
        def make(peer, classes=classes, hp=hp):
            p = torch.nn.Parameter(torch.zeros(rows_n, width))
            p.data.add_(0)  # fault the pages in: no first-touch cost in the timings
            opt = classes[peer]([p], **hp)
            k = [0]

            def step():
                p.grad = grads[k[0] % len(grads)]
                k[0] += 1
                opt.step()
            step()
            for v in opt.state[p].values():
                if torch.is_tensor(v) and v.dim():
                    v.add_(0)
            return step, (p, opt)
        results, sp = _run(cfg, make, tuple(classes), rows_n * width)
        out.append({"rule": name, "rows": rows_n, "width": width,
                    "lookups": draws + repeats, "touched_fraction": touched,
                    "dtype": "float32", "hyperparameters": hp, "results": results,
                    "speedup": sp})
    return {"cases": out}


def muon_shapes(d=MUON_D, layers=MUON_LAYERS):
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    return shapes


def scenario_muon(cfg, nthreads, roofs, rng):
    try:
        torch = _torch()
        import fastopt.torch as fot
    except ImportError as exc:
        return _skip(exc)
    layers = MUON_LAYERS if cfg.mode == "full" else 1
    shapes = muon_shapes(MUON_D, layers)
    classes = {"fastopt_torch": fot.Muon, "torch_default": torch.optim.Muon}

    def make(peer):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt = classes[peer](ps, lr=0.02)
        return opt.step, (ps, opt)
    n = sum(a * b for a, b in shapes)
    results, sp = _run(cfg, make, tuple(classes), n, repeats=2 if layers > 1 else cfg.repeats)
    return {"cases": [{"rule": "Muon", "layers": layers, "d": MUON_D, "matrices": len(shapes),
                       "n": n, "model_n": sum(a * b for a, b in muon_shapes()),
                       "dtype": "float32", "ns_dtype": {"fastopt_torch": "float32",
                                                        "torch_default": "bfloat16"},
                       "results": results, "speedup": sp}]}


SCENARIO_RUNS = {"schedulefree": scenario_schedulefree, "adafactor": scenario_adafactor,
                 "sparse": scenario_sparse, "muon": scenario_muon}
SCENARIO_COST = {"schedulefree": 300, "adafactor": 300, "sparse": 300, "muon": 600}
