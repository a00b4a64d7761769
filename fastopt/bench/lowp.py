"""Fewer bytes per step: low-precision parameters, 8-bit state, low-precision
gradients in and parameter copies out, against the peers that do the same work.

``scenario_lowp`` times, on one 16 M-element tensor and on the 132-tensor
transformer of the torch model scenario, every peer of every configuration
interleaved in one ``time_interleaved`` call per workload (one step per sample,
the peers in rotating order, the memory-bandwidth probe among them):

* AdamW with 8-bit block-wise state, float32 parameters: ``fastopt.torch.AdamW8bit``
  beside torch's fused float32 AdamW; bitsandbytes' ``AdamW8bit`` on the CPU is
  timed in a second, short interleaved call with the two (its CPU step is not fused:
  about a second at 16 M elements, so a few samples);
* bf16 parameters and bf16 state: ``fastopt.torch.AdamW`` and torch's fused AdamW
  on the same bf16 parameters;
* bf16 parameters with 8-bit state: ``fastopt.torch.AdamW8bit`` on a bf16 model;
* the CPU-offload step: float32 master parameters, a bf16 gradient in, a bf16 copy
  of the new parameters out, in one pass of the compiled engine (NumPy API); beside
  it DeepSpeed's ``DeepSpeedCPUAdam`` when it is installed, and torch's fused AdamW
  followed by the copy (with a float32 gradient, and with the bf16 gradient
  up-cast first).

Each peer's bytes per element are those of the step's inputs and outputs in their
storage formats (parameter read and written, gradient read, state read and
written, copy written; 8-bit state one byte per element plus two float32 block
scales per 256 elements, read and written), so GB/s compare with the roof. State
memory is measured: the bytes of the distinct tensors each optimizer holds as
state, per parameter. Beside the workloads, the host cost per tensor of the torch
adapters (a step over 132 tensors of 16 elements minus a step over one, / 131).
"""

from __future__ import annotations

import gc

import numpy as np

from fastopt.bench import roof as roof_mod
from fastopt.bench.config import LABELS
from fastopt.bench.peers import Missing, NotApplicable, build_steps
from fastopt.bench.scenarios import TRANSFORMERS, transformer_shapes
from fastopt.bench.timing import time_interleaved

HP = {"lr": 1e-3, "weight_decay": 0.01}
SIZE = 16_000_000                 # the single-tensor workload
MODEL = "20M"                     # TRANSFORMERS key of the 132-tensor workload
MIN_8BIT_SIZE = 4096              # bitsandbytes' default: smaller tensors keep float32 state
BNB_REPEATS = 2                   # bitsandbytes' CPU step is slow: two samples

# peer -> (parameter dtype, gradient dtype, state storage, copy dtype or None)
PEERS = {
    "fastopt_8bit": ("float32", "float32", "q8", None),
    "torch_fused": ("float32", "float32", "float32", None),
    "fastopt_bf16": ("bfloat16", "bfloat16", "bfloat16", None),
    "torch_fused_bf16": ("bfloat16", "bfloat16", "bfloat16", None),
    "fastopt_8bit_bf16": ("bfloat16", "bfloat16", "q8", None),
    "fastopt_offload": ("float32", "bfloat16", "float32", "bfloat16"),
    "deepspeed_offload": ("float32", "bfloat16", "float32", "bfloat16"),
    "torch_fused_copy": ("float32", "float32", "float32", "bfloat16"),
    "torch_fused_upcast_copy": ("float32", "bfloat16", "float32", "bfloat16"),
    "bnb_8bit": ("float32", "float32", "q8", None),
}
PEER_LABELS = {
    "fastopt_8bit": "fastopt.torch.AdamW8bit",
    "torch_fused": "torch fused AdamW, float32",
    "fastopt_bf16": "fastopt.torch.AdamW, bf16",
    "torch_fused_bf16": "torch fused AdamW, bf16",
    "fastopt_8bit_bf16": "fastopt.torch.AdamW8bit, bf16 params",
    "fastopt_offload": "fastopt, f32 master + bf16 grad in + bf16 copy out (one pass)",
    "deepspeed_offload": "DeepSpeedCPUAdam + bf16 copy",
    "torch_fused_copy": "torch fused AdamW (f32 grad) + p16.copy_(p)",
    "torch_fused_upcast_copy": "g32.copy_(g16) + torch fused AdamW + p16.copy_(p)",
    "bnb_8bit": "bitsandbytes AdamW8bit (CPU)",
}
# (configuration, fastopt's peer, the peers it is compared with)
COMPARISONS = (
    ("AdamW, 8-bit state, float32 params", "fastopt_8bit", ("torch_fused", "bnb_8bit")),
    ("AdamW, bf16 params, bf16 state", "fastopt_bf16", ("torch_fused_bf16",)),
    ("AdamW, bf16 params, 8-bit state", "fastopt_8bit_bf16", ("torch_fused",)),
    ("offload: f32 master, bf16 grad in, bf16 copy out", "fastopt_offload",
     ("deepspeed_offload", "torch_fused_copy", "torch_fused_upcast_copy")),
)
HOST_PEERS = ("fastopt_8bit", "fastopt_bf16", "torch_fused")

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def label(peer):
    return PEER_LABELS.get(peer, LABELS.get(peer, peer))


def op_bytes(peer, sizes, n_states=2, block=256):
    """Bytes one step of ``peer`` must move over tensors of ``sizes`` elements: the
    parameter read and written, the gradient read, each state buffer read and
    written (8-bit: one byte per element and a float32 scale per block of 256, for
    tensors of at least MIN_8BIT_SIZE elements; float32 below), the copy written."""
    pdt, gdt, state, copy = PEERS[peer]
    total = 0
    for n in sizes:
        b = 2 * _ITEMSIZE[pdt] * n + _ITEMSIZE[gdt] * n
        if state == "q8" and n >= MIN_8BIT_SIZE:
            b += n_states * (2 * n + 2 * 4 * -(-n // block))
        else:
            b += n_states * 2 * _ITEMSIZE["float32" if state == "q8" else state] * n
        if copy:
            b += _ITEMSIZE[copy] * n
        total += b
    return total


def state_bytes(opt) -> int:
    """Bytes of the distinct tensors (or arrays) an optimizer holds as state."""
    import torch
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
                nbytes = v.untyped_storage().nbytes()
            elif isinstance(v, np.ndarray):
                key, nbytes = (v.__array_interface__["data"][0], v.nbytes), v.nbytes
            else:
                continue
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


# ---------------------------------------------------------------------------
# The peers
# ---------------------------------------------------------------------------

def _torch():
    try:
        import torch
        import fastopt.torch  # noqa: F401
    except ImportError as exc:
        raise Missing(f"torch is not installed ({exc})") from None
    return torch


def _tensors(torch, base, dtype):
    """nn.Parameters of ``dtype`` with the base values and gradients."""
    ps = []
    for p, g in base:
        q = torch.nn.Parameter(p.to(dtype, copy=True))
        q.grad = g.to(dtype, copy=True)
        ps.append(q)
    return ps


class _Offload:
    """The CPU-offload step through the compiled engine: float32 master parameters
    and state, bf16 gradients, bf16 copies of the new parameters, one call."""

    def __init__(self, base, nthreads):
        import ml_dtypes
        from fastopt.backends import compiled
        from fastopt.rules import get_rule
        bf16 = np.dtype(ml_dtypes.bfloat16)
        self.rule = get_rule("AdamW")
        self.hp = self.rule.check_hypers({**self.rule.defaults, **HP})
        needed = self.rule.needed_buffers(self.hp)
        self.params = [p.numpy().ravel().copy() for p, _ in base]
        self.grads = [g.float().numpy().ravel().astype(bf16) for _, g in base]
        self.copies = [np.empty(p.shape, bf16) for p in self.params]
        self.state = {i: {b.name: np.zeros(p.shape, np.float32) for b in self.rule.buffers
                          if b.name in needed} for i, p in enumerate(self.params)}
        buffers = [tuple(st.get(b.name) for b in self.rule.buffers)
                   for st in self.state.values()]
        self.bound = compiled.bind_many(self.rule.kernel, self.params, buffers,
                                        grad_dtype=bf16)
        self.nthreads, self.t, self.scalars = nthreads, 0, self.rule.initial_scalars(self.hp)

    def __call__(self):
        self.t += 1
        args, self.scalars = self.rule.plan(self.hp, self.t, self.scalars, False)
        self.bound.step(self.grads, tuple(args), self.nthreads, copies=self.copies)


def _deepspeed_offload(torch, base):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # ImportError, or a failed build of its CPU op
        raise Missing(f"DeepSpeed's CPUAdam is not importable here ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:100]})") from None
    ps = _tensors(torch, base, torch.float32)
    g16 = [p.grad.to(torch.bfloat16) for p in ps]
    p16 = [p.detach().to(torch.bfloat16) for p in ps]
    opt = DeepSpeedCPUAdam(ps, lr=HP["lr"], weight_decay=HP["weight_decay"], adamw_mode=True)
    g32 = [p.grad for p in ps]

    def step():
        torch._foreach_copy_(g32, g16)
        opt.step()
        torch._foreach_copy_(p16, [p.detach() for p in ps])
    return step, opt


def make_peer(peer, base, nthreads, min_8bit_size=MIN_8BIT_SIZE):
    """(step, optimizer or holder) of ``peer`` over its own copy of ``base``, a list
    of (float32 parameter, float32 gradient) tensors."""
    torch = _torch()
    import fastopt.torch as fot
    if peer == "fastopt_offload":
        try:
            step = _Offload(base, nthreads)
        except ImportError as exc:
            raise Missing(f"ml_dtypes is not installed ({exc})") from None
        return step, step
    if peer == "deepspeed_offload":
        return _deepspeed_offload(torch, base)
    if peer == "bnb_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise Missing(f"bitsandbytes is not installed ({exc})") from None
        opt = bnb.optim.AdamW8bit(_tensors(torch, base, torch.float32), **HP,
                                  min_8bit_size=min_8bit_size)
        return opt.step, opt
    dtype = torch.bfloat16 if PEERS[peer][0] == "bfloat16" else torch.float32
    ps = _tensors(torch, base, dtype)
    if peer in ("fastopt_8bit", "fastopt_8bit_bf16"):
        opt = fot.AdamW8bit(ps, **HP, min_8bit_size=min_8bit_size)
        return opt.step, opt
    if peer == "fastopt_bf16":
        opt = fot.AdamW(ps, **HP)
        return opt.step, opt
    opt = torch.optim.AdamW(ps, **HP, fused=True)
    if peer in ("torch_fused", "torch_fused_bf16"):
        return opt.step, opt
    p16 = [p.detach().to(torch.bfloat16) for p in ps]
    views = [p.detach() for p in ps]
    if peer == "torch_fused_copy":
        def step():
            opt.step()
            torch._foreach_copy_(p16, views)
        return step, opt
    if peer == "torch_fused_upcast_copy":
        g16 = [p.grad.to(torch.bfloat16) for p in ps]
        g32 = [p.grad for p in ps]

        def step():
            torch._foreach_copy_(g32, g16)
            opt.step()
            torch._foreach_copy_(p16, views)
        return step, opt
    raise NotApplicable(f"unknown peer {peer!r}")


def _base(shapes, rng):
    import torch
    out = []
    for s in shapes:
        p = torch.from_numpy(rng.random(s, dtype=np.float32) - 0.5)
        g = torch.from_numpy((rng.random(s, dtype=np.float32) - 0.5) * 2e-2)
        out.append((p, g))
    return out


# ---------------------------------------------------------------------------
# One workload
# ---------------------------------------------------------------------------

def _results(status, t, sizes, roof):
    n = sum(sizes)
    out = {}
    for peer, st in status.items():
        res = {**st, **t.get(peer, {})}
        if res.get("status") == "ok":
            bpe = op_bytes(peer, sizes) / n
            res["bytes_per_element"] = bpe
            for kind in ("median", "min"):
                res[f"gbps_{kind}"] = bpe * n / res[f"{kind}_s"] / 1e9
            res["gbps"] = res["gbps_median"]
            if roof:
                res["roof_fraction"] = res["gbps_min"] / roof
        out[peer] = res
    return out


def _ratios(results, base, others):
    """t(other) / t(base), best of k (min over the samples) and median."""
    b = results.get(base, {})
    out = {}
    for o in others:
        r = results.get(o, {})
        if b.get("status") == "ok" and r.get("status") == "ok":
            out[o] = {"best": r["min_s"] / b["min_s"], "median": r["median_s"] / b["median_s"]}
    return out


def workload(name, shapes, cfg, nthreads, rng, bnb_repeats=BNB_REPEATS):
    """Every peer over its own copy of the same parameters, interleaved."""
    base = _base(shapes, rng)
    sizes = [int(np.prod(s)) for s in shapes]
    fast = [p for p in PEERS if p != "bnb_8bit"]
    steps, holders, status = build_steps(fast, lambda peer: make_peer(peer, base, nthreads))
    probe = roof_mod.probe("float32", nthreads, cfg.roof_bytes_per_array)
    repeats = max(3, cfg.repeats)
    t = time_interleaved({**steps, **probe.steps()}, repeats=repeats, warmup=max(cfg.warmup, 1),
                         target_sample_s=0.0, prestep_below_s=0.0)
    roof = probe.collect(t)
    roof_gbps = roof["gbps"] if roof else None
    results = _results(status, t, sizes, roof_gbps)
    memory = {}
    for peer, h in holders.items():
        try:
            memory[peer] = state_bytes(h) / sum(sizes)
        except (AttributeError, ImportError):
            pass
    # bitsandbytes' CPU step, in a short interleaved call of its own with the two
    # peers it is compared with (their figures there give the ratios)
    bnb_steps, bnb_holders, bnb_status = build_steps(
        ["bnb_8bit"], lambda peer: make_peer(peer, base, nthreads))
    side = {"repeats": bnb_repeats}
    if bnb_steps:
        pair = {f"{p}@bnb": steps[p] for p in ("fastopt_8bit", "torch_fused") if p in steps}
        tb = time_interleaved({**bnb_steps, **pair}, repeats=bnb_repeats, warmup=1,
                              target_sample_s=0.0, prestep_below_s=0.0)
        memory["bnb_8bit"] = state_bytes(bnb_holders["bnb_8bit"]) / sum(sizes)
        results.update(_results(bnb_status, tb, sizes, roof_gbps))
        side["results"] = {k: {kk: v[kk] for kk in ("status", "median_s", "min_s",
                                                      "samples_s", "error") if kk in v}
                           for k, v in tb.items()}
        fo, bn = tb.get("fastopt_8bit@bnb", {}), tb.get("bnb_8bit", {})
        if fo.get("status") == "ok" and bn.get("status") == "ok":
            side["ratios"] = {"bnb_8bit": {"best": bn["min_s"] / fo["min_s"],
                                           "median": bn["median_s"] / fo["median_s"]}}
    else:
        results.update(bnb_status)
    comparisons = []
    for title, ours, others in COMPARISONS:
        ratios = _ratios(results, ours, [o for o in others if o != "bnb_8bit"])
        if "bnb_8bit" in others and side.get("ratios", {}).get("bnb_8bit"):
            ratios["bnb_8bit"] = side["ratios"]["bnb_8bit"]
        comparisons.append({"configuration": title, "fastopt": ours, "ratios": ratios})
    row = {"workload": name, "tensors": len(shapes), "n": sum(sizes),
           "hyperparameters": HP, "repeats": repeats, "roof_gbps": roof_gbps,
           "roof_in_case": roof, "results": results, "state_bytes_per_param": memory,
           "bnb_call": side, "comparisons": comparisons}
    del steps, holders, base
    gc.collect()
    return row


def host_per_tensor(cfg, nthreads, rng, size=16):
    """Seconds per extra tensor of a step: (t(132 tensors) - t(1)) / 131, each tensor
    ``size`` elements, 8-bit state for AdamW8bit (min_8bit_size lowered to 1)."""
    many = _base([(size,)] * 132, rng)
    steps = {}
    for peer in HOST_PEERS:
        steps[(peer, 132)] = make_peer(peer, many, nthreads, min_8bit_size=1)[0]
        steps[(peer, 1)] = make_peer(peer, many[:1], nthreads, min_8bit_size=1)[0]
    t = time_interleaved(steps, repeats=max(5, cfg.repeats), warmup=max(cfg.warmup, 2),
                         target_sample_s=max(cfg.target_sample_s, 0.002))
    out = {}
    for peer in HOST_PEERS:
        a, b = t[(peer, 132)], t[(peer, 1)]
        if a["status"] == "ok" and b["status"] == "ok":
            out[peer] = {"per_tensor_s": (a["min_s"] - b["min_s"]) / 131,
                         "step_132_s": a["min_s"], "step_1_s": b["min_s"],
                         "tensor_elements": size}
        else:
            out[peer] = {"status": "error", "detail": a.get("error") or b.get("error")}
    return out


def scenario_lowp(cfg, nthreads, roofs, rng):
    try:
        _torch()
    except Missing as exc:
        return {"cases": [], "skipped": str(exc)}
    bnb_repeats = 1 if cfg.mode == "quick" else BNB_REPEATS
    rows = [workload(f"one tensor of {SIZE:,} elements", [(SIZE,)], cfg, nthreads, rng,
                     bnb_repeats),
            workload(f"transformer {MODEL}", transformer_shapes(**TRANSFORMERS[MODEL]),
                     cfg, nthreads, rng, bnb_repeats)]
    out = {"cases": rows, "host_per_tensor": host_per_tensor(cfg, nthreads, rng)}
    return out


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def _fmt_t(s):
    if s is None:
        return "–"
    return f"{s * 1e6:.3g} µs" if s < 1e-3 else (f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s")


def _ratio(r):
    return f"{r['best']:.2f}× ({r['median']:.2f}×)" if r else "–"


def markdown(sc) -> list:
    if not sc.get("cases"):
        return ["## Low precision", "", sc.get("skipped", "no cases"), ""]
    out = ["## Low precision: 8-bit state, bf16 parameters, the offload step", ""]
    for row in sc["cases"]:
        res = row["results"]
        roof = row.get("roof_gbps")
        out += [f"### {row['workload']} ({row['tensors']} tensors, {row['n']:,} parameters; "
                f"roof {roof:.1f} GB/s measured among the peers)" if roof else
                f"### {row['workload']} ({row['tensors']} tensors, {row['n']:,} parameters)", ""]
        lines = ["| peer | best step | median step | bytes/element | GB/s (best) | of roof "
                 "| state bytes/param |", "|---|---|---|---|---|---|---|"]
        for peer in PEERS:
            r = res.get(peer)
            if r is None:
                continue
            mem = row["state_bytes_per_param"].get(peer)
            if r.get("status") != "ok":
                why = (r.get("detail") or r.get("error") or r.get("status", "")).splitlines()[0]
                lines.append(f"| {label(peer)} | {r.get('status')}: {why[:90]} | | | | | |")
                continue
            frac = f"{100 * r['roof_fraction']:.0f}%" if "roof_fraction" in r else "–"
            lines.append(f"| {label(peer)} | {_fmt_t(r['min_s'])} | {_fmt_t(r['median_s'])} "
                         f"| {r['bytes_per_element']:.2f} | {r['gbps_min']:.1f} | {frac} | "
                         + (f"{mem:.3f}" if mem is not None else "–") + " |")
        out += lines + [""]
        lines = ["| configuration | fastopt | speedup over |", "|---|---|---|"]
        for c in row["comparisons"]:
            parts = [f"{label(o)} {_ratio(r)}" for o, r in c["ratios"].items()]
            lines.append(f"| {c['configuration']} | {label(c['fastopt'])} | "
                         + ("; ".join(parts) or "–") + " |")
        out += lines + [""]
        side = row.get("bnb_call", {})
        if side.get("results"):
            out += [f"bitsandbytes' CPU AdamW8bit was timed in a call of its own, "
                    f"{side['repeats']} samples interleaved with fastopt.torch.AdamW8bit "
                    "and torch fused (its step is not fused on the CPU: "
                    + ", ".join(f"{k.split('@')[0]} {_fmt_t(v.get('min_s'))}"
                                for k, v in side["results"].items() if v.get("min_s"))
                    + "); its ratio is from that call.", ""]
    host = sc.get("host_per_tensor") or {}
    ok = {p: h for p, h in host.items() if "per_tensor_s" in h}
    if ok:
        size = next(iter(ok.values()))["tensor_elements"]
        out += [f"Host cost per tensor (a step over 132 tensors of {size} elements minus a "
                "step over one, / 131, best of k): " + "; ".join(
                    f"{label(p)} {_fmt_t(h['per_tensor_s'])}" for p, h in ok.items()) + ".", ""]
    out += ["Speedups are t(peer) / t(fastopt) from the same interleaved samples: best of k, "
            "median in parentheses. Bytes per element: the step's inputs and outputs in their "
            "storage formats, each read or written once (8-bit state: a byte per element and "
            "two float32 scales per block of 256; tensors under 4,096 elements keep float32 "
            "state, as in bitsandbytes); a peer that makes more passes moves more than that. "
            "State bytes/param: the distinct state tensors each optimizer holds.", ""]
    return out
