"""fastopt.torch against torch.optim on whole models, through the public API only.

* ``scenario_torch_model``: a whole-model ``step()`` of fastopt.torch.AdamW and
  torch.optim.AdamW (fused, default, foreach) over the 132 tensors of a
  transformer-like model. The peers' single steps are interleaved, so every step
  starts with the caches as another optimizer left them (as after a backward
  pass), not warm from its own previous step. Beside it, the host cost per tensor:
  a step over 132 tiny tensors against a step over one, divided by 131.
* and whole training iterations (zero_grad, forward, backward,
  step) of a small real transformer on the Python standard library's source as
  bytes, one model copy per optimizer, iterations interleaved.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np

from fastopt.bench.config import hyperparameters
from fastopt.bench.peers import build_steps, torch_optimizer
from fastopt.bench.scenarios import TRANSFORMERS, transformer_shapes
from fastopt.bench.timing import merge_timings, speedups, time_interleaved
from fastopt.rules import get_rule

TORCH_MODELS = ("1M", "20M")
TORCH_MODEL_PEERS = ("fastopt_torch", "fastopt_torch_fresh", "grad_assign", "torch_fused",
                     "torch_default", "torch_foreach")
HOST_PEERS = ("fastopt_torch", "torch_fused", "torch_default", "torch_foreach")
TRAINING_PEERS = ("fastopt_torch", "torch_fused", "torch_default")
# d_model, heads, layers, context, batch: about 3.2 M parameters, 52 tensors
TRAINING_MODEL = dict(d=256, heads=4, layers=4, ctx=64, batch=8)
HP = {"lr": 1e-3, "weight_decay": 0.01}


def _need_torch():
    import torch
    import fastopt.torch  # noqa: F401
    return torch


def torch_model_params(shapes, rng):
    """nn.Parameters of the given shapes with gradients set, as after backward()."""
    import torch
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.from_numpy(rng.random(s, dtype=np.float32) - 0.5))
        p.grad = torch.from_numpy((rng.random(s, dtype=np.float32) - 0.5) * 2e-2)
        params.append(p)
    return params


def make_torch_model_step(peer, params, hp=HP):
    """(step, optimizer or params) of one peer over its own copy of ``params``."""
    import torch
    import fastopt.torch as fot
    ps = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        ps.append(q)
    fresh = [p.grad.clone() for p in ps]

    def assign():
        for p, g in zip(ps, fresh):
            p.grad = g
    if peer == "grad_assign":
        return assign, ps
    if peer.startswith("fastopt_torch"):
        opt = fot.AdamW(ps, **hp)
        if peer == "fastopt_torch":
            return opt.step, opt

        def fresh_step():     # backward() after zero_grad() leaves new grad tensors
            assign()
            opt.step()
        return fresh_step, opt
    opt = torch_optimizer(peer, get_rule("AdamW"), hyperparameters("AdamW", hp), ps)
    return opt.step, opt


def _host_per_tensor(cfg, rng):
    """Seconds per extra tensor of each peer's step: (t(132 tiny tensors) - t(1)) / 131."""
    many = torch_model_params([(4,)] * 132, rng)
    one = many[:1]
    steps = {}
    for peer in HOST_PEERS:
        steps[(peer, 132)] = make_torch_model_step(peer, many)[0]
        steps[(peer, 1)] = make_torch_model_step(peer, one)[0]
    t = time_interleaved(steps, repeats=cfg.repeats, warmup=max(cfg.warmup, 1),
                         target_sample_s=max(cfg.target_sample_s, 0.002))
    out = {}
    for peer in HOST_PEERS:
        a, b = t[(peer, 132)], t[(peer, 1)]
        if a["status"] == "ok" and b["status"] == "ok":
            out[peer] = {"per_tensor_s": (a["median_s"] - b["median_s"]) / 131,
                         "step_132_s": a["median_s"], "step_1_s": b["median_s"]}
        else:
            out[peer] = {"status": "error", "detail": a.get("error") or b.get("error")}
    return out


def scenario_torch_model(cfg, nthreads, roofs, rng):
    try:
        _need_torch()
    except ImportError as exc:
        return {"cases": [], "skipped": f"torch is not installed ({exc})"}
    bpe = get_rule("AdamW").bytes_per_element(hyperparameters("AdamW", HP), 4)
    rows = []
    for label in TORCH_MODELS[:1] if cfg.mode == "quick" else TORCH_MODELS:
        shapes = transformer_shapes(**TRANSFORMERS[label])
        params = torch_model_params(shapes, rng)
        n = sum(p.numel() for p in params)
        steps, holders, status = build_steps(
            TORCH_MODEL_PEERS, lambda peer: make_torch_model_step(peer, params))
        del params
        # one step per sample, the peers in rotating order: no peer finds its own
        # buffers in cache
        t = time_interleaved(steps, repeats=10 * cfg.repeats, warmup=max(cfg.warmup, 1),
                             target_sample_s=0.0, prestep_below_s=0.0)
        results = merge_timings(status, t, n, bpe)
        rows.append({"model": f"transformer {label}", "rule": "AdamW", "dtype": "float32",
                     "hyperparameters": HP, "tensors": len(shapes), "n": n,
                     "bytes_per_element": bpe, "results": results,
                     "speedup": speedups(results, base="fastopt_torch")})
        del steps, holders
        gc.collect()
    out = {"cases": rows, "host_per_tensor": _host_per_tensor(cfg, rng)}
    try:
        out["training"] = training(cfg, rng)
    except Exception as exc:  # report, keep the step figures
        out["training"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ---------------------------------------------------------------------------
# A whole training iteration
# ---------------------------------------------------------------------------

def _text_bytes():
    """The standard library's own source as training text (bytes: vocabulary 256)."""
    here = os.path.dirname(os.__file__)
    data = b""
    for name in ("os.py", "inspect.py", "argparse.py", "typing.py"):
        try:
            with open(os.path.join(here, name), "rb") as f:
                data += f.read()
        except OSError:
            pass
    return np.frombuffer(data or bytes(range(256)) * 64, dtype=np.uint8)


def _make_model(torch, d, heads, layers, ctx, **_):
    nn = torch.nn

    class ByteTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, d)
            self.pos = nn.Parameter(torch.zeros(ctx, d))
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, 256)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

        def forward(self, x):
            h = self.embed(x) + self.pos[: x.shape[1]]
            return self.head(self.encoder(h, mask=self.mask, is_causal=True))
    return ByteTransformer()


def training(cfg, rng):
    torch = _need_torch()
    import fastopt.torch as fot
    spec = dict(TRAINING_MODEL)
    ctx, batch = spec["ctx"], spec["batch"]
    text = torch.from_numpy(_text_bytes().astype(np.int64))
    torch.manual_seed(cfg.seed)
    base = _make_model(torch, **spec)
    starts = rng.integers(0, len(text) - ctx - 1, size=(64, batch))
    batches = [(torch.stack([text[s:s + ctx] for s in row]),
                torch.stack([text[s + 1:s + ctx + 1] for s in row])) for row in starts]
    runs = {}
    for peer in TRAINING_PEERS:
        model = _make_model(torch, **spec)
        model.load_state_dict(base.state_dict())
        if peer == "fastopt_torch":
            opt = fot.AdamW(model.parameters(), **HP)
        else:
            opt = torch_optimizer(peer, get_rule("AdamW"), hyperparameters("AdamW", HP),
                                  list(model.parameters()))
        runs[peer] = {"model": model, "opt": opt, "i": 0, "iter_s": [], "step_s": [],
                      "loss": None}
    loss_fn = torch.nn.functional.cross_entropy

    def iteration(r, timed):
        x, y = batches[r["i"] % len(batches)]
        r["i"] += 1
        t0 = time.perf_counter()
        r["opt"].zero_grad()
        loss = loss_fn(r["model"](x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        r["opt"].step()
        t2 = time.perf_counter()
        r["loss"] = float(loss.detach())
        if timed:
            r["iter_s"].append(t2 - t0)
            r["step_s"].append(t2 - t1)
    rounds = max(3, cfg.repeats)
    for k in range(max(1, cfg.warmup) + rounds):
        order = list(runs)[k % len(runs):] + list(runs)[:k % len(runs)]
        for peer in order:
            iteration(runs[peer], timed=k >= max(1, cfg.warmup))
    n = sum(p.numel() for p in base.parameters())
    results = {}
    for peer, r in runs.items():
        it, st = float(np.median(r["iter_s"])), float(np.median(r["step_s"]))
        results[peer] = {"status": "ok", "median_s": it, "samples_s": r["iter_s"],
                         "step_median_s": st, "step_share": st / it, "final_loss": r["loss"],
                         "iterations": r["i"]}
    return {"model": f"byte-level transformer ({spec['layers']} layers, d={spec['d']})",
            "tensors": len(list(base.parameters())), "n": n, "batch": batch, "context": ctx,
            "hyperparameters": HP, "results": results,
            "speedup": speedups(results, base="fastopt_torch")}
