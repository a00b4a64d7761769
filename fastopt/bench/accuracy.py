"""The accuracy scenario: does an optimizer that moves fewer bytes still train as well?

Real training on real data, not a timing: every variant of AdamW trains the same two
small models from the same initialisation on the same batches, for ``--steps`` steps
(default 2,000) and ``--seeds`` seeds (default 3), one thread per run.

Models and data (deterministic: no download, no file outside the interpreter's own)
-----------------------------------------------------------------------------------
* ``transformer``: a byte-level GPT (2 pre-LayerNorm blocks, d=64, 4 heads, context
  64, untied head; vocabulary 256) on the Python standard library's own source: the
  top-level ``*.py`` files of ``sysconfig.get_paths()['stdlib']`` in sorted order,
  concatenated; the last 10% of the bytes are held out. A batch is 4 windows at
  random offsets (the seed's generator).
* ``cnn``: two 3x3 convolutions (16, 32 channels), a 2x2 max-pool and two linear
  layers on scikit-learn's digits (8x8, 10 classes), pixels / 16; a stratified split
  with ``random_state=0`` holds out 20%. A batch is 32 training images drawn with
  replacement, each shifted by up to one pixel (zero fill) and with Gaussian noise of
  standard deviation 0.3 added to its pixels, so that the training loss stays well
  above zero (about 0.4 after 2,000 steps; without the augmentation it falls to 0.015,
  where a relative difference of 1% is noise). The held-out images are clean.

AdamW with lr 3e-3 (transformer) / 2e-3 (cnn), betas (0.9, 0.999), eps 1e-8, weight
decay 0.01; linear warm-up over the first 5% of the steps, then cosine decay to 10%.
The learning rate is written into ``param_groups`` before each step, so every
optimizer sees the same schedule.

Variants
--------
Each is a factory that builds the optimizer for a model; a feature this install lacks
(no such class, no such keyword, a dtype the optimizer refuses at its first step) is
reported as "not available", never as a failure. The bf16 variants store parameters,
gradients and optimizer state in bfloat16; the forward and backward passes compute in
float32 from the bf16 weights (``torch.func.functional_call`` over ``p.float()``):
CPUs without bf16 matrix units run bf16 matmuls several times slower, and this way the
difference to float32 is the optimizer's rounding alone.

Figures
-------
Final training loss: the mean over the last 100 steps (the last half for runs under
200 steps); held-out loss: the whole held-out set at the end. Per model and variant:
mean and sample standard deviation over seeds, and the relative difference of the
means to ``adamw_fp32``. Criteria: the 8-bit variants within 1%, ``bf16_sr`` within
2%; ``bf16`` and ``torch_adamw_fp32`` (the run-to-run noise of two float32
implementations) are reported without one.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field

import numpy as np

REFERENCE = "adamw_fp32"
HELD_OUT_FRACTION = 0.1
CURVE_POINTS = 200          # training-loss curve: at most this many block means per run
EVALS = 10                  # held-out loss evaluated up to this many times per run
FINAL_WINDOW = 100          # final loss: mean training loss over the last 100 steps


class Unavailable(Exception):
    """This install lacks the variant's feature (class, keyword or dtype)."""


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def stdlib_text():
    """(bytes as a uint8 array, description) of the standard library's source."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
    data = b"\n".join(chunks)
    if len(data) < 100_000:
        raise RuntimeError(f"the standard library's source at {root} has only "
                           f"{len(data)} bytes of top-level *.py files")
    return np.frombuffer(data, dtype=np.uint8), {
        "source": f"{root}/*.py (sorted, concatenated)", "files": len(files),
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16],
        "python": sys.version.split()[0]}


@functools.lru_cache(maxsize=1)
def digits():
    """(x_train, y_train, x_test, y_test, description): float32 8x8 images in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise Unavailable(f"scikit-learn is not installed ({exc})") from None
    import sklearn
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.2,
                                          random_state=0, stratify=d.target)
    return xtr, ytr, xte, yte, {"source": "sklearn.datasets.load_digits",
                                "train": len(ytr), "held_out": len(yte),
                                "split": "train_test_split(test_size=0.2, random_state=0, "
                                         "stratify=y)",
                                "scikit_learn": sklearn.__version__}


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

def _byte_gpt(torch, d=64, heads=4, layers=2, ctx=64):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, heads, D // heads).permute(
                2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class ByteGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, d)
            self.pos = nn.Parameter(0.02 * torch.randn(ctx, d))
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, 256)

        def forward(self, x):
            h = self.embed(x) + self.pos[: x.shape[1]]
            for b in self.blocks:
                h = b(h)
            return self.head(self.ln(h))
    return ByteGPT()


def _digits_cnn(torch):
    nn, F = torch.nn, torch.nn.functional

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            return self.fc2(F.relu(self.fc1(x.flatten(1))))
    return DigitsCNN()


class _TextTask:
    classes = 256

    def __init__(self, torch, ctx, batch, eval_windows=64):
        text, self.info = stdlib_text()
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        self.torch, self.ctx, self.batch = torch, ctx, batch
        self.train = torch.from_numpy(text[:cut].astype(np.int64))
        held = torch.from_numpy(text[cut:].astype(np.int64))
        # evenly spaced windows over the held-out bytes: the same for every run
        starts = torch.linspace(0, len(held) - ctx - 2, eval_windows).long()
        w = held[starts[:, None] + torch.arange(ctx + 1)]
        self.eval_set = (w[:, :-1], w[:, 1:])

    def batches(self, seed, steps):
        g = self.torch.Generator().manual_seed(10_000 + seed)
        starts = self.torch.randint(0, len(self.train) - self.ctx - 1, (steps, self.batch),
                                    generator=g)
        offs = self.torch.arange(self.ctx + 1)
        for t in range(steps):
            w = self.train[starts[t][:, None] + offs]
            yield w[:, :-1], w[:, 1:]


class _DigitsTask:
    classes = 10

    def __init__(self, torch, batch, shift=1, noise=0.0):
        xtr, ytr, xte, yte, self.info = digits()
        self.torch, self.batch, self.shift, self.noise = torch, batch, shift, noise
        s = shift
        self.padded = torch.nn.functional.pad(torch.from_numpy(xtr), (s, s, s, s))
        self.ytr = torch.from_numpy(ytr)
        self.eval_set = (torch.from_numpy(xte)[:, None], torch.from_numpy(yte))

    def batches(self, seed, steps):
        torch, B, s = self.torch, self.batch, self.shift
        g = torch.Generator().manual_seed(20_000 + seed)
        idx = torch.randint(0, len(self.ytr), (steps, B), generator=g)
        shifts = torch.randint(0, 2 * s + 1, (steps, B, 2), generator=g)
        noise = torch.randn((steps, B, 1, 8, 8), generator=g) * self.noise if self.noise \
            else None
        ar, rows = torch.arange(B)[:, None, None], torch.arange(8)
        for t in range(steps):
            r = (shifts[t, :, 0:1] + rows)[:, :, None]
            c = (shifts[t, :, 1:2] + rows)[:, None, :]
            x = self.padded[idx[t]][ar, r, c][:, None]
            yield (x if noise is None else x + noise[t]), self.ytr[idx[t]]


@dataclass
class ModelSpec:
    label: str
    build: object                     # (torch) -> nn.Module
    task: object                      # (torch) -> task with batches(seed, steps), eval_set
    hp: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)


TRANSFORMER = dict(d=64, heads=4, layers=2, ctx=64)
MODELS = {
    "transformer": ModelSpec(
        "byte-level transformer on the standard library's source",
        lambda torch: _byte_gpt(torch, **TRANSFORMER),
        lambda torch: _TextTask(torch, TRANSFORMER["ctx"], batch=4),
        hp=dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        shape=dict(TRANSFORMER, batch=4)),
    "cnn": ModelSpec(
        "CNN on scikit-learn's digits",
        _digits_cnn,
        lambda torch: _DigitsTask(torch, batch=32, shift=1, noise=0.3),
        hp=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        shape=dict(channels=(16, 32), hidden=64, batch=32, shift=1, noise=0.3)),
}


def lr_factor(t, steps):
    """Linear warm-up over the first 5% of the steps, then cosine decay to 0.1."""
    warm = max(1, int(0.05 * steps))
    if t < warm:
        return (t + 1) / warm
    frac = (t - warm) / max(1, steps - warm - 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------------------
# Variants: factories (params, hyperparameters) -> optimizer
# ---------------------------------------------------------------------------

def _fastopt_adamw(params, hp, **kw):
    import fastopt.torch as fot
    return fot.AdamW(params, **hp, **kw)


def _fastopt_adamw8bit(params, hp):
    import fastopt.torch as fot
    return fot.AdamW8bit(params, **hp)


def _torch_adamw(params, hp):
    import torch
    return torch.optim.AdamW(params, **hp, fused=True)


def _bnb_adamw8bit(params, hp):
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise Unavailable(f"bitsandbytes is not installed ({exc})") from None
    return bnb.optim.AdamW8bit(params, **hp)


@dataclass
class Variant:
    label: str
    make: object
    dtype: str = "float32"
    criterion: float | None = None   # the largest relative difference to REFERENCE allowed


VARIANTS = {
    "adamw_fp32": Variant("fastopt.torch.AdamW, float32", _fastopt_adamw),
    "torch_adamw_fp32": Variant("torch.optim.AdamW(fused=True), float32", _torch_adamw),
    "adamw8bit": Variant("fastopt.torch.AdamW8bit, float32 parameters, 8-bit state",
                         _fastopt_adamw8bit, criterion=0.01),
    "bnb_adamw8bit": Variant("bitsandbytes.optim.AdamW8bit, float32 parameters, 8-bit state",
                             _bnb_adamw8bit, criterion=0.01),
    "bf16_sr": Variant("fastopt.torch.AdamW, bf16 parameters and state, stochastic rounding",
                       functools.partial(_fastopt_adamw, bf16_stochastic_round=True),
                       dtype="bfloat16", criterion=0.02),
    "bf16": Variant("fastopt.torch.AdamW, bf16 parameters and state, round to nearest",
                    _fastopt_adamw, dtype="bfloat16"),
}


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def _final_window(steps):
    return FINAL_WINDOW if steps >= 2 * FINAL_WINDOW else max(1, steps // 2)


def _evaluate(torch, forward, task):
    x, y = task.eval_set
    with torch.no_grad():
        logits = forward(x).float()
        loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, task.classes),
                                                       y.reshape(-1)))
        acc = float((logits.argmax(-1) == y).float().mean())
    return loss, acc


def run_one(model_name, variant_name, seed, steps):
    """Trains one model with one variant for one seed; returns a JSON-able dict with
    status 'ok', 'not available' (the message says what is missing) or 'error'."""
    out = {"model": model_name, "variant": variant_name, "seed": seed, "steps": steps}
    try:
        import torch
    except ImportError as exc:
        return {**out, "status": "not available", "detail": f"torch is not installed ({exc})"}
    import fastopt
    spec, var = MODELS[model_name], VARIANTS[variant_name]
    saved_threads = torch.get_num_threads(), fastopt.get_num_threads()
    torch.set_num_threads(1)   # one thread per run: torch's and fastopt's
    fastopt.set_num_threads(1)
    try:
        return {**out, **_train(torch, spec, var, seed, steps)}
    except Unavailable as exc:
        return {**out, "status": "not available", "detail": str(exc)}
    except Exception as exc:  # reported in the table, the other runs go on
        return {**out, "status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.set_num_threads(saved_threads[0])
        fastopt.set_num_threads(saved_threads[1])


def _train(torch, spec, var, seed, steps):
    task = spec.task(torch)
    torch.manual_seed(seed)
    model = spec.build(torch)
    if var.dtype != "float32":
        model = model.to(getattr(torch, var.dtype))
        from torch.func import functional_call
        params = dict(model.named_parameters())

        def forward(x):   # float32 compute from the low-precision weights
            return functional_call(model, {k: p.float() for k, p in params.items()}, (x,))
    else:
        forward = model
    try:
        opt = var.make(model.parameters(), dict(spec.hp))
    except (AttributeError, TypeError, ImportError) as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from None
    lr0 = [g["lr"] for g in opt.param_groups]
    loss_fn = torch.nn.functional.cross_entropy
    losses = np.full(steps, np.nan)
    block = max(1, math.ceil(steps / CURVE_POINTS))
    n_evals = min(EVALS, max(1, steps // 100))   # a short run: the final one alone
    eval_at = {min(steps, round(steps * (k + 1) / n_evals)) for k in range(n_evals)}
    evals = []
    t_eval = 0.0
    t0 = time.perf_counter()
    for t, (x, y) in enumerate(task.batches(seed, steps)):
        for g, lr in zip(opt.param_groups, lr0):
            g["lr"] = lr * lr_factor(t, steps)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x).float().reshape(-1, task.classes), y.reshape(-1))
        loss.backward()
        if t == 0:
            try:
                opt.step()
            except (TypeError, NotImplementedError) as exc:
                raise Unavailable(f"first step: {type(exc).__name__}: {exc}") from None
        else:
            opt.step()
        losses[t] = loss.item()
        if not math.isfinite(losses[t]):
            break
        if t + 1 in eval_at:
            te = time.perf_counter()
            evals.append((t + 1, *_evaluate(torch, forward, task)))
            t_eval += time.perf_counter() - te
    total = time.perf_counter() - t0
    done = int(np.isfinite(losses).sum())
    w = _final_window(steps)
    nb = math.ceil(steps / block)
    padded = np.concatenate([losses, np.full(nb * block - steps, np.nan)])
    curve = np.nanmean(padded.reshape(nb, block), axis=1) if done else padded[:nb]
    res = {"status": "ok" if done == steps else "diverged",
           "final_train_loss": float(np.mean(losses[-w:])), "final_window": w,
           "heldout_loss": evals[-1][1] if evals and evals[-1][0] == steps else None,
           "heldout_accuracy": evals[-1][2] if evals and evals[-1][0] == steps else None,
           "curve_every": block, "train_curve": [float(v) for v in curve],
           "eval_steps": [e[0] for e in evals], "eval_loss": [e[1] for e in evals],
           "eval_accuracy": [e[2] for e in evals],
           "seconds": total, "train_seconds": total - t_eval,
           "seconds_per_step": (total - t_eval) / max(1, done)}
    if res["status"] == "diverged":
        res["detail"] = f"loss not finite at step {done + 1}"
    return res


# ---------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------

def model_info(name):
    """The model's size and its data's description (no training)."""
    import torch
    spec = MODELS[name]
    torch.manual_seed(0)
    m = spec.build(torch)
    sizes = [p.numel() for p in m.parameters()]
    task = spec.task(torch)
    return {"label": spec.label, "parameters": int(sum(sizes)), "tensors": len(sizes),
            # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
            "share_in_tensors_ge_4096": float(sum(s for s in sizes if s >= 4096) / sum(sizes)),
            "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.shape.items()},
            "hyperparameters": {k: list(v) if isinstance(v, tuple) else v
                                for k, v in spec.hp.items()},
            "schedule": "linear warm-up over 5% of the steps, cosine decay to 10%",
            "data": task.info}


def _stats(values):
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def summarize(runs, models, variants, seeds):
    """One row per (model, variant): mean ± std over seeds, the relative difference of
    the means to REFERENCE, the per-seed (paired) relative differences, the verdict."""
    rows = []
    for m in models:
        by_var = {v: [r for r in runs if r["model"] == m and r["variant"] == v]
                  for v in variants}
        ref = {r["seed"]: r for r in by_var.get(REFERENCE, []) if r["status"] == "ok"}
        ref_train, _ = _stats(r["final_train_loss"] for r in ref.values())
        ref_held, _ = _stats(r["heldout_loss"] for r in ref.values())
        for v in variants:
            rs = by_var[v]
            row = {"model": m, "variant": v, "label": VARIANTS[v].label,
                   "criterion": VARIANTS[v].criterion, "seeds": [r["seed"] for r in rs]}
            bad = [r for r in rs if r["status"] != "ok"]
            if not rs or len(bad) == len(rs) and bad[0]["status"] == "not available":
                row.update(status="not available",
                           detail=bad[0]["detail"] if bad else "not run")
                rows.append(row)
                continue
            if bad:
                row.update(status=bad[0]["status"], detail="; ".join(
                    f"seed {r['seed']}: {r.get('detail', r['status'])}" for r in bad))
                rows.append(row)
                continue
            ok = {r["seed"]: r for r in rs}
            row["status"] = "ok"
            row["train_mean"], row["train_std"] = _stats(r["final_train_loss"] for r in rs)
            row["heldout_mean"], row["heldout_std"] = _stats(r["heldout_loss"] for r in rs)
            row["heldout_accuracy_mean"], _ = _stats(r["heldout_accuracy"] for r in rs)
            row["seconds_per_run"] = float(np.mean([r["seconds"] for r in rs]))
            row["seconds_per_step"] = float(np.mean([r["seconds_per_step"] for r in rs]))
            if ref_train and v != REFERENCE:
                row["rel_diff_train"] = row["train_mean"] / ref_train - 1
                if ref_held and row["heldout_mean"] is not None:
                    row["rel_diff_heldout"] = row["heldout_mean"] / ref_held - 1
                paired = [ok[s]["final_train_loss"] / ref[s]["final_train_loss"] - 1
                          for s in ok if s in ref]
                row["paired_rel_diff_train_mean"], row["paired_rel_diff_train_std"] = \
                    _stats(paired)
                if row["criterion"] is not None:
                    row["pass"] = bool(abs(row["rel_diff_train"]) <= row["criterion"])
            rows.append(row)
    return rows


def selected(names, table, what):
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"unknown accuracy {what} {', '.join(bad)}; "
                         f"choose from {', '.join(table)}")
    return list(names) or list(table)


def scenario(cfg, nthreads=None, roofs=None, rng=None, log=None):
    """Every (model, variant, seed) of ``cfg`` for ``cfg.accuracy_steps`` steps, in
    ``cfg.accuracy_jobs`` processes (one thread each). A variant not available in this
    install is probed once (one step) and reported, not run for every seed."""
    t_start = time.monotonic()
    log = log or (lambda msg: None)
    models = selected(cfg.accuracy_models, MODELS, "model(s)")
    variants = selected(cfg.accuracy_variants, VARIANTS, "variant(s)")
    steps = int(cfg.accuracy_steps)
    seeds = [cfg.seed + i for i in range(int(cfg.accuracy_seeds))]
    if steps < 1 or not seeds:
        raise ValueError("the accuracy scenario needs at least one step and one seed")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"torch is not installed ({exc})"}
    info, runs, tasks = {}, [], []
    for m in models:
        try:
            info[m] = model_info(m)
        except Unavailable as exc:
            runs += [{"model": m, "variant": v, "seed": s, "steps": steps,
                      "status": "not available", "detail": str(exc)}
                     for v in variants for s in seeds]
            continue
        for v in variants:
            probe = run_one(m, v, seeds[0], 1)
            if probe["status"] != "ok":
                runs += [{**probe, "steps": steps, "seed": s} for s in seeds]
                log(f"accuracy: {m} {v}: {probe['status']}: {probe.get('detail', '')}")
                continue
            tasks += [(m, v, s, steps) for s in seeds]
    jobs = max(1, int(cfg.accuracy_jobs))
    done = []
    if jobs > 1 and len(tasks) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        try:
            with cf.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                                        mp_context=mp.get_context("spawn")) as ex:
                for fut in cf.as_completed([ex.submit(run_one, *t) for t in tasks]):
                    done.append(fut.result())
                    log(_progress_line(done[-1], len(done), len(tasks), t_start))
        except (cf.process.BrokenProcessPool, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if done:   # a worker died during a run (a crash): the unfinished runs say so
                finished = {(r["model"], r["variant"], r["seed"]) for r in done}
                done += [{"model": m, "variant": v, "seed": s, "steps": n, "status": "error",
                          "detail": f"its worker process died ({why})"}
                         for m, v, s, n in tasks if (m, v, s) not in finished]
            # else none started (a __main__ that a spawned process cannot import, as in
            # python - < script): the runs go on in this process
            log(f"accuracy: the worker processes failed ({why})"
                + ("" if len(done) == len(tasks) else "; the runs go on in this process"))
    finished = {(r["model"], r["variant"], r["seed"]) for r in done}
    for task in tasks:
        if task[:3] not in finished:
            done.append(run_one(*task))
            log(_progress_line(done[-1], len(done), len(tasks), t_start))
    runs += done
    order = {(m, v, s): i for i, (m, v, s) in enumerate(
        (m, v, s) for m in models for v in variants for s in seeds)}
    runs.sort(key=lambda r: order[(r["model"], r["variant"], r["seed"])])
    elapsed = time.monotonic() - t_start
    return {"steps": steps, "seeds": seeds, "jobs": jobs, "threads_per_run": 1,
            "versions": _versions("bnb_adamw8bit" in variants),
            "reference": REFERENCE, "models": info,
            "variants": {v: {"label": VARIANTS[v].label, "dtype": VARIANTS[v].dtype,
                             "criterion": VARIANTS[v].criterion} for v in variants},
            "final_window": _final_window(steps), "summary": summarize(
                runs, models, variants, seeds),
            "runs": runs, "elapsed_s": elapsed,
            "method": __doc__.split("Models and data", 1)[1].split("\n", 2)[2].strip()}


def _versions(bnb=True):
    from importlib import metadata
    out = {}
    for dist in ("torch", "scikit-learn") + (("bitsandbytes",) if bnb else ()):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _progress_line(r, i, n, t_start):
    what = (f"final loss {r['final_train_loss']:.4f} in {r['seconds']:.1f} s"
            if r["status"] == "ok" else f"{r['status']}: {r.get('detail', '')}")
    return (f"accuracy [{i}/{n}, {time.monotonic() - t_start:.0f} s]: {r['model']} "
            f"{r['variant']} seed {r['seed']}: {what}")
