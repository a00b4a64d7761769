"""Output of ``fastopt bench``: the Markdown report, the JSON document, the PNG plot."""

from __future__ import annotations

import json
import math

import numpy as np

from fastopt.bench import lowp
from fastopt.bench.config import LABELS, label
from fastopt.bench.scenarios import LIST_PEERS
from fastopt.bench.torch_model import TORCH_MODEL_PEERS, TRAINING_PEERS

PEER_ORDER = tuple(LABELS)   # the order of peer columns in every table


def fmt_time(s):
    if s is None or not math.isfinite(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_n(n):
    if n < 1000:
        return str(n)
    exp = int(math.floor(math.log10(n)))
    mant = n / 10 ** exp
    return f"{mant:.3g}e{exp}" if mant != 1 else f"1e{exp}"


def fmt_ratio(x):
    if x is None:
        return "–"
    return f"{x:.3g}×" if x < 100 else f"{x:.0f}×"


def _cell(results, peer, base="fastopt", show_ratio=True):
    r = results.get(peer)
    if r is None:
        return ""
    st = r.get("status")
    if st == "ok":
        txt = fmt_time(r["median_s"])
        b = results.get(base, {})
        if show_ratio and peer != base and b.get("status") == "ok":
            txt += f" ({fmt_ratio(r['median_s'] / b['median_s'])})"
        return txt
    if st == "n/a":
        return "n/a"
    if st == "missing":
        return "missing"
    return "error"


def _peers_present(rows, candidates=PEER_ORDER, drop_missing=True):
    """Peers that appear in any row's results (missing everywhere: left out of the
    columns, listed under the table instead)."""
    out = []
    for p in candidates:
        sts = [row["results"][p]["status"] for row in rows if p in row.get("results", {})]
        if not sts:
            continue
        if drop_missing and all(s == "missing" for s in sts):
            continue
        out.append(p)
    return out


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def machine_line(doc):
    m = doc["machine"]
    v = m["versions"]
    bits = [f"{m['cpu_model']}", f"{m['usable_cpus']} cores",
            f"{m.get('memory_total_bytes', 0) / 2**30:.0f} GiB RAM"]
    if m.get("l3_cache"):
        bits.append(f"L3 {m['l3_cache']}")
    bits.append(f"ISA {m.get('fastopt_isa')}")
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    if m.get("gpu_name"):
        bits.insert(0, f"{m['gpu_name']} ({m.get('gpu_sms')} SMs, "
                       f"{m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB)")
        vers += f", CUDA {m.get('cuda_torch')}, numba-cuda {m.get('numba_cuda_version', '?')}"
    return f"{doc['created']} · " + ", ".join(bits) + f" · Python {m['python']}, {vers}"


def markdown(doc) -> str:
    out = [f"# fastopt bench ({doc['config']['mode']})", "", machine_line(doc), ""]
    load = doc["machine"].get("loadavg_at_start")
    if load and load[0] > 0.5:
        out += [f"**Warning:** the 1-minute load average was {load[0]:.2f} when this run "
                "started: other processes were using the CPU, so times (multi-threaded "
                "ones especially) may be inflated.", ""]
    untimed = not doc["cases"] and set(doc.get("scenarios") or {}) <= {"accuracy"}
    missing = {p: d.get("detail", "") for p, d in doc["peers"].items()
               if d["status"] == "missing" and not untimed}
    if missing:
        out.append("Missing peers (not installed, not failures): " + "; ".join(
            f"{label(p)}: {why.splitlines()[0][:120]}" for p, why in missing.items()))
        out.append("")

    gpu = doc.get("device") == "cuda"
    if doc["roof"] and gpu:
        out += ["## Device copy bandwidth: the roof (measured in this run)", ""]
        out.append(_table(["when", "bytes per buffer", "GB/s (read + write)"],
                          [[r["phase"], fmt_n(r["bytes_per_array"]), f"{r['gbps']:.1f}"]
                           for r in doc["roof"]]))
        out += ["", "A device-to-device copy at the start and the end of the run; the higher "
                "is every case's roof.",
                ""]
    elif doc["roof"]:
        out += ["## Memory-bandwidth roof (measured in this run)", ""]
        rows = []
        for r in doc["roof"]:
            rows.append([r.get("phase", ""), r["threads"], r["dtype"], f"{r['triad']['gbps']:.1f}",
                         f"{r['triad']['gbps_stream_convention']:.1f}",
                         f"{r['axpy']['gbps']:.1f}", f"**{r['gbps']:.1f}**"])
        out.append(_table(["when", "threads", "dtype", "triad GB/s (4 streams)",
                           "triad GB/s (STREAM's 3)", "axpy GB/s (3 streams)", "max GB/s"],
                          rows))
        final = ", ".join(f"{r['threads']} thread(s) {r['dtype']}: **{r['gbps']:.1f} GB/s**"
                          for r in doc.get("roof_gbps", []))
        out += ["", "Per kernel: the higher of triad (counting the write-allocate) and axpy. "
                "Cases out of cache (working set > 2 × L3) and the model scenario time the "
                "roof kernels interleaved with their peers and use that roof (bandwidth on "
                "a shared host drifts); other cases use the highest measurement of the run "
                f"({final}). Optimizer GB/s count each rule's bytes/element (read + written, "
                "no write-allocate).", ""]

    cases = [c for c in doc["cases"] if "results" in c]
    if cases:
        out += ["## Time per step (fastopt's speedup over each peer in parentheses)", ""]
        peers = _peers_present(cases)
        header = (["rule", "dtype", "n", "host/step" if gpu else "threads"]
                  + [label(p) for p in peers]
                  + ["fastopt Gelem/s", "fastopt GB/s", "roof GB/s", "% of roof"])
        rows = []
        for c in cases:
            f = c["results"].get("fastopt", {})
            ok = f.get("status") == "ok"
            rows.append([c["rule"], c["dtype"], fmt_n(c["n"]),
                         (fmt_time(f.get("host_s")) if ok else "–") if gpu else c["threads"]]
                        + [_cell(c["results"], p) for p in peers]
                        + [f"{f['elements_per_s'] / 1e9:.2f}" if ok else "–",
                           f"{f['gbps']:.1f}" if ok else "–",
                           (f"{c['roof_gbps']:.1f}" + ("" if c.get("roof_in_case") else "*"))
                           if c.get("roof_gbps") else "–",
                           f"{100 * f['roof_fraction']:.0f}%" if ok and "roof_fraction" in f
                           else "–"])
        out.append(_table(header, rows))
        out.append("")
        out += (["GPU time per step from CUDA events over bursts of steps; host/step: "
                 "fastopt's wall time to issue one step (not waiting for the GPU). Roof "
                 "GB/s: the run's device copy bandwidth.", ""] if gpu else
                ["Roof GB/s: measured interleaved with the case; * the run's roof (the case "
                 "fits in cache, so its fraction of the DRAM roof can exceed 100%).", ""])
        hyper = {c["rule"]: c["hyperparameters"] for c in cases}
        nondefault = {"SGD": "momentum=0.9"} if "SGD" in hyper else {}
        if nondefault:
            out += ["Hyperparameters: torch's defaults, except " + ", ".join(
                f"{k}({v})" for k, v in nondefault.items()) + ".", ""]
    skipped = [c for c in doc["cases"] if "skipped" in c]
    if skipped:
        out += ["Skipped for memory: " + "; ".join(
            f"{c['rule']} {c['dtype']} n={fmt_n(c['n'])} ({c['skipped']})" for c in skipped), ""]

    for name, (title, section) in SECTIONS.items():
        sc = doc.get("scenarios", {}).get(name)
        if sc is not None:
            out += [f"## {title}", "", f"error: {sc['error']}", ""] if "error" in sc \
                else section(sc)
    if untimed:
        out += [f"Elapsed: {doc.get('elapsed_s', 0):.1f} s.", ""]
        return "\n".join(out)
    if gpu:
        out.append(f"Elapsed: {doc.get('elapsed_s', 0):.1f} s. Median of "
                   f"{doc['config']['repeats']} interleaved bursts per peer after warm-up.")
        out.append("")
        return "\n".join(out)
    retaken, kept = preemption_counts(doc)
    out.append(f"Elapsed: {doc.get('elapsed_s', 0):.1f} s. Median of {doc['config']['repeats']} "
               "interleaved samples per peer after warm-up. Samples during which another "
               f"process took the CPU were retaken ({retaken} retaken"
               + (f"; **{kept} kept after the retry budget ran out: those figures are "
                  "inflated**" if kept else "; none kept") + ").")
    out.append("")
    return "\n".join(out)


def preemption_counts(doc):
    """(samples retaken, preempted samples kept) over every timing in the document."""
    retaken = kept = 0

    def walk(x):
        nonlocal retaken, kept
        if isinstance(x, dict):
            retaken += x.get("preempted_retaken", 0) if isinstance(
                x.get("preempted_retaken"), int) else 0
            kept += x.get("preempted_kept", 0) if isinstance(x.get("preempted_kept"), int) else 0
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk({k: doc.get(k) for k in ("roof", "cases", "scenarios")})
    return retaken, kept


def _overhead_md(sc):
    rows = sc["cases"]
    peers = _peers_present(rows)
    out = ["## Per-call overhead on tiny buffers (time per step)", ""]
    out.append(_table(["rule", "dtype", "n"] + [label(p) for p in peers],
                      [[r["rule"], r["dtype"], r["n"]] + [_cell(r["results"], p) for p in peers]
                       for r in rows]))
    b = sc.get("breakdown_adam_float32_n1", {})
    if "opt_step_s" in b:
        out += ["", "Where one `fastopt.Adam(...).step(g)` on 1 float32 element spends its "
                f"time: `opt.step` {fmt_time(b['opt_step_s'])} = bound compiled kernel "
                f"{fmt_time(b['compiled_kernel_call_s'])} + Python layer "
                f"{fmt_time(b['python_layer_s'])} (of which `Rule.plan` "
                f"{fmt_time(b['plan_s'])}); the generic entry point, which acquires every "
                f"buffer per call, costs {fmt_time(b.get('generic_entry_call_s', float('nan')))}; "
                f"an empty Python call {fmt_time(b['empty_python_call_s'])}."]
    out.append("")
    return out


def _model_md(sc):
    rows = sc["cases"]
    peers = _peers_present(rows)
    out = ["## Multi-tensor model: one FlatParams call vs torch.optim over the tensors "
           "(Adam, float32)", ""]
    out.append(_table(["model", "tensors", "parameters"] + [label(p) for p in peers]
                      + ["fastopt GB/s"],
                      [[r["model"], r["tensors"], fmt_n(r["n"])]
                       + [_cell(r["results"], p) for p in peers]
                       + [f"{r['results']['fastopt']['gbps']:.1f}"
                          if r["results"].get("fastopt", {}).get("status") == "ok" else "–"]
                       for r in rows]))
    out.append("")
    return out


def _torch_model_md(sc):
    if not sc.get("cases"):
        return ["## torch model", "", sc.get("skipped", "no cases"), ""]
    rows = sc["cases"]
    peers = _peers_present(rows, candidates=TORCH_MODEL_PEERS)
    out = ["## torch model: a whole-model step() of fastopt.torch.AdamW vs torch.optim.AdamW "
           "(float32; fastopt.torch's speedup over each peer in parentheses)", ""]
    out.append(_table(
        ["model", "tensors", "parameters"] + [label(p) for p in peers] + ["fastopt.torch GB/s"],
        [[r["model"], r["tensors"], fmt_n(r["n"])]
         + [_cell(r["results"], p, base="fastopt_torch", show_ratio=p != "grad_assign")
            for p in peers]
         + [f"{r['results']['fastopt_torch']['gbps']:.1f}"
            if r["results"].get("fastopt_torch", {}).get("status") == "ok" else "–"]
         for r in rows]))
    out += ["", "Every peer steps its own copy of the same parameters (separate tensors, as a "
            "model has them). One step per sample, the peers in turn, so each step starts "
            "with the caches as another optimizer left them, as after a backward pass. "
            "\"fresh p.grad each step\": before each step every `p.grad` is replaced by a new "
            "tensor, as `zero_grad()` + `backward()` leave them; \"p.grad = g only\" is the "
            "cost of that assignment loop alone.", ""]
    host = sc.get("host_per_tensor") or {}
    ok = {p: h for p, h in host.items() if "per_tensor_s" in h}
    if ok:
        out += ["Host cost per tensor (a step over 132 tensors of 4 elements minus a step over "
                "one, divided by 131): " + "; ".join(
                    f"{label(p)} {fmt_time(h['per_tensor_s'])}" for p, h in ok.items()) + ".", ""]
    out += _training_md(sc.get("training"))
    return out


def _training_md(tr):
    if not tr:
        return []
    if "error" in tr:
        return ["### One training iteration", "", f"error: {tr['error']}", ""]
    res = tr["results"]
    out = [f"### One training iteration of a {tr['model']} ({fmt_n(tr['n'])} parameters, "
           f"{tr['tensors']} tensors; batch {tr['batch']} × {tr['context']} bytes of the Python "
           "standard library's source)", ""]
    out.append(_table(["optimizer", "iteration (zero_grad, forward, backward, step)",
                       "of which step()", "step share", "loss after the run"],
                      [[label(p), _cell(res, p, base="fastopt_torch"),
                        fmt_time(res[p]["step_median_s"]), f"{100 * res[p]['step_share']:.1f}%",
                        f"{res[p]['final_loss']:.4f}"]
                       for p in TRAINING_PEERS if res.get(p, {}).get("status") == "ok"]))
    out += ["", "Each optimizer trains its own copy of the same model on the same batches; "
            "the iterations are interleaved. Median times; in parentheses fastopt.torch's "
            "speedup over each peer on the whole iteration.", ""]
    return out


def _lists_md(sc):
    rows = sc["cases"]
    peers = _peers_present(rows, candidates=LIST_PEERS, drop_missing=False)
    out = ["## A list of arrays in one call: `fastopt.Adam([w1, b1, ...])` "
           "(float32; the list's speedup over each peer in parentheses)", ""]
    out.append(_table(["case", "arrays", "parameters"] + [label(p) for p in peers],
                      [[r["case"], r["arrays"], fmt_n(r["n"])]
                       + [_cell(r["results"], p, base="fastopt_list") for p in peers]
                       for r in rows]))
    missing = [r["results"]["fastopt_list"].get("detail") for r in rows
               if r["results"].get("fastopt_list", {}).get("status") == "missing"]
    if missing:
        out += ["", f"Not available: {missing[0]}"]
    out.append("")
    return out


def _threads_md(sc):
    rows = sc["cases"]
    peers = _peers_present(rows)
    out = ["## Thread scaling (Adam, float32)", ""]
    sp = {(s["n"], s["threads"]): s["speedup_vs_1_thread"] for s in sc["scaling"]}
    table = []
    for r in rows:
        f = r["results"].get("fastopt", {})
        s = sp.get((r["n"], r["threads"]), {})
        table.append([fmt_n(r["n"]), r["threads"], f"{r['roof_gbps']:.1f}"]
                     + [_cell(r["results"], p) for p in peers]
                     + [f"{100 * f['roof_fraction']:.0f}%" if "roof_fraction" in f else "–",
                        ", ".join(f"{label(p)} {v:.2f}×" for p, v in s.items())])
    out.append(_table(["n", "threads", "roof GB/s"] + [label(p) for p in peers]
                      + ["fastopt % roof", "speedup vs 1 thread"], table))
    out.append("")
    return out


def _denormal_md(sc):
    out = ["## Subnormal state (Adam): time per step with normal vs subnormal values", ""]
    table = []
    for r in sc["cases"]:
        peers = sorted({k.split(":")[0] for k in r["results"]},
                       key=lambda p: PEER_ORDER.index(p) if p in PEER_ORDER else 99)
        for p in peers:
            a, b = r["results"].get(f"{p}:normal", {}), r["results"].get(f"{p}:subnormal", {})
            if a.get("status") != "ok" or b.get("status") != "ok":
                table.append([r["dtype"], fmt_n(r["n"]), label(p), a.get("status"), "", "", ""])
                continue
            cen = r["subnormal_fraction_of_state"].get(f"{p}:subnormal", {})
            frac = max((v for v in cen.values() if isinstance(v, float)), default=None)
            table.append([r["dtype"], fmt_n(r["n"]), label(p), fmt_time(a["median_s"]),
                          fmt_time(b["median_s"]), f"{r['slowdown'][p]:.2f}×",
                          f"{100 * frac:.0f}%" if frac is not None else "–"])
    out.append(_table(["dtype", "n", "peer", "normal", "subnormal", "slowdown",
                       "subnormal share of state"], table))
    out.append("")
    return out


def _lbfgs_md(sc):
    names = {"fastopt": "fastopt.LBFGS", "torch": "torch.optim.LBFGS",
             "scipy": "SciPy L-BFGS-B (mean, float64)"}
    out = ["## L-BFGS: time per iteration, closure excluded "
           "(fastopt's speedup over each peer in parentheses)", ""]
    rows = []
    for r in sc["cases"]:
        cells = []
        for p in ("fastopt", "torch", "scipy"):
            res = r["results"].get(p, {})
            if res.get("status") != "ok":
                cells.append(res.get("status", ""))
                continue
            txt = fmt_time(res["per_iteration_s"])
            if p in r["speedup"]:
                txt += f" ({fmt_ratio(r['speedup'][p])})"
            cells.append(txt)
        f = r["results"].get("fastopt", {})
        gbps = (f"{r['fastopt_bytes_per_iteration'] / f['per_iteration_s'] / 1e9:.1f}"
                if f.get("status") == "ok" and f["per_iteration_s"] > 0 else "–")
        rows.append([fmt_n(r["n"]), r["history"], r["dtype"], r["threads"]] + cells
                    + [fmt_time(r["closure_s"]), gbps])
    out.append(_table(["n", "history", "dtype", "threads"] + [names[p] for p in
                                                              ("fastopt", "torch", "scipy")]
                      + ["closure", "fastopt GB/s"], rows))
    out += ["", "Method: " + " ".join(sc.get("method", "").split()), ""]
    if sc.get("skipped"):
        out += ["Skipped for memory: " + "; ".join(
            f"n={fmt_n(s['n'])} history={s['history']} ({s['reason']})"
            for s in sc["skipped"]), ""]
    return out


def _pm(mean, std, digits=4):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def _pct(x, std=None):
    if x is None:
        return "–"
    return f"{100 * x:+.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def _accuracy_md(sc):
    title = "## Accuracy: AdamW variants training real models (final loss vs float32 AdamW)"
    if "skipped" in sc:
        return [title, "", sc["skipped"], ""]
    seeds = sc["seeds"]
    out = [title, "", f"**What ran:** {sc['steps']:,} steps per run, {len(seeds)} seed(s) "
           f"({', '.join(map(str, seeds))}), every model × variant × seed from the same "
           f"initialisation and batches per seed; one thread per run, {sc['jobs']} run(s) "
           f"at a time; {sc['elapsed_s']:.0f} s in all. Machine: the line at the top. "
           + ", ".join(f"{k} {v}" for k, v in sc.get("versions", {}).items() if v) + ".", ""]
    for name, m in sc["models"].items():
        d = m["data"]
        data = (f"{d['files']} files, {d['bytes']:,} bytes of Python {d['python']}'s "
                f"standard library (sha256 {d['sha256']}), last 10% held out"
                if "files" in d else f"{d['source']}: {d['train']} training, "
                f"{d['held_out']} held-out images ({d['split']})")
        shape = ", ".join(f"{k} {v}" for k, v in m["shape"].items())
        hp = m["hyperparameters"]
        out.append(f"- **{name}**: {m['label']}; {m['parameters']:,} parameters in "
                   f"{m['tensors']} tensors ({100 * m['share_in_tensors_ge_4096']:.0f}% in "
                   f"tensors of ≥ 4,096 elements, which get 8-bit state); {shape}; lr "
                   f"{hp['lr']:g}, weight decay {hp['weight_decay']:g}, {m['schedule']}. "
                   f"Data: {data}.")
    out.append("")
    rows = []
    for r in sc["summary"]:
        crit = f"≤ {100 * r['criterion']:g}%" if r.get("criterion") is not None else "–"
        if r["status"] != "ok":
            why = " ".join(str(r.get("detail", "")).split())[:160]
            rows.append([r["model"], f"`{r['variant']}`", "–", "–", "–", "–", "–", "–", crit,
                         f"{r['status']}: {why}", "–"])
            continue
        verdict = ("reference" if r["variant"] == sc["reference"] else
                   "–" if "pass" not in r else "pass" if r["pass"] else "**fail**")
        acc = r.get("heldout_accuracy_mean")
        rows.append([r["model"], f"`{r['variant']}`", _pm(r["train_mean"], r["train_std"]),
                     _pct(r.get("rel_diff_train")),
                     _pct(r.get("paired_rel_diff_train_mean"),
                          r.get("paired_rel_diff_train_std"))
                     if "paired_rel_diff_train_mean" in r else "–",
                     _pm(r["heldout_mean"], r["heldout_std"]), _pct(r.get("rel_diff_heldout")),
                     f"{100 * acc:.1f}%" if acc is not None else "–", crit, verdict,
                     f"{r['seconds_per_run']:.1f} s"])
    out.append(_table(["model", "variant", "final train loss (mean ± std)", "vs fp32",
                       "per seed (mean ± std)", "held-out loss", "vs fp32",
                       "held-out accuracy", "criterion", "result", "time per run"], rows))
    out += ["", f"Final train loss: the mean training loss over the last "
            f"{sc['final_window']} steps of a run; held-out loss and accuracy (next byte, "
            "digit class): the held-out set after the last step. Mean ± sample standard "
            "deviation over the seeds. \"vs fp32\": the relative difference of the means to "
            f"`{sc['reference']}`; \"per seed\": the same difference taken seed by seed "
            "(same initialisation and batches), its mean ± std. The criterion applies to the "
            "final train loss: |vs fp32| within it. `torch_adamw_fp32` shows how far two "
            "float32 implementations drift apart; `bf16` (round to nearest) is reported "
            "without a criterion. The bf16 variants keep parameters, gradients and state "
            "in bfloat16 and compute the forward and backward passes in float32 from the "
            "bf16 weights, so their difference is the optimizer's rounding. Time per run "
            "includes the held-out evaluations.", ""]
    for v, info in sc["variants"].items():
        out.append(f"- `{v}`: {info['label']}")
    out.append("")
    return out


SECTIONS = {"overhead": ("Per-call overhead", _overhead_md),
            "model": ("Multi-tensor model", _model_md),
            "threads": ("Thread scaling", _threads_md),
            "denormal": ("Subnormal state", _denormal_md),
            "lists": ("A list of arrays", _lists_md),
            "torch_model": ("torch model", _torch_model_md),
            "lbfgs": ("L-BFGS: one iteration", _lbfgs_md),
            "lowp": ("Low precision", lowp.markdown),
            "accuracy": ("Accuracy", _accuracy_md)}


def _peer_md(title, what):
    """A section for one of the optimizer scenarios (schedule-free, Adafactor, sparse,
    Muon): per case, each peer's time per
    step and its time over fastopt.torch's."""
    def section(sc):
        out = [f"## {title}", ""]
        if sc.get("skipped"):
            return out + [f"skipped: {sc['skipped']}", ""]
        rows = []
        for c in sc.get("cases", []):
            peers = [p for p in c["results"] if p != "fastopt_torch"]
            rows.append([c["rule"], what(c), _cell(c["results"], "fastopt_torch",
                                                    base="fastopt_torch")]
                        + [f"{label(p)}: {_cell(c['results'], p, base='fastopt_torch')}"
                           for p in peers])
        width = max((len(r) for r in rows), default=3)
        out.append(_table(["rule", "case", "fastopt.torch"] +
                          ["peer (time over fastopt.torch's)"] * (width - 3),
                          [r + [""] * (width - len(r)) for r in rows]))
        return out + [""]
    return section


SECTIONS.update({
    "schedulefree": ("Schedule-free AdamW/SGD", _peer_md(
        "Schedule-free AdamW/SGD vs the schedulefree package", lambda c: fmt_n(c["n"]))),
    "adafactor": ("Adafactor", _peer_md(
        "Adafactor vs torch.optim.Adafactor", lambda c: "×".join(map(str, c["shape"])))),
    "sparse": ("Sparse embedding", _peer_md(
        "Sparse gradients: embedding table", lambda c: f"{fmt_n(c['rows'])} × {c['width']}, "
        f"{c['touched_fraction']:.2%} rows touched, {c['lookups']} lookups")),
    "muon": ("Muon", _peer_md(
        "Muon (float32 Newton–Schulz) vs torch.optim.Muon (bfloat16)",
        lambda c: f"{c['layers']} layer(s) × 6 matrices, d={c['d']}, {fmt_n(c['n'])}")),
})


# ---------------------------------------------------------------------------
# JSON and PNG
# ---------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(doc, path):
    with open(path, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
        f.write("\n")


def plot(doc, path):
    """Writes the PNG; returns None, or a message saying why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: plot skipped "
                "(pip install matplotlib, or pip install 'fastopt[bench]')")
    cases = [c for c in doc["cases"] if "results" in c]
    torch_rows = doc.get("scenarios", {}).get("torch_model", {}).get("cases") or []
    if not cases and doc.get("scenarios", {}).get("accuracy", {}).get("summary"):
        return plot_accuracy(doc, path)
    if not cases and torch_rows:
        _plot_torch_model(plt, doc, torch_rows, path)
        return None
    if not cases:
        return "no grid cases to plot"
    threads = max(c["threads"] for c in cases)
    groups = {}
    for c in cases:
        if c["threads"] == threads:
            groups.setdefault((c["rule"], c["dtype"]), []).append(c)
    keys = sorted(groups)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    peers = _peers_present(cases)
    for ax, key in zip(axes.flat, keys):
        rows = sorted(groups[key], key=lambda c: c["n"])
        for p in peers:
            xs = [c["n"] for c in rows if c["results"].get(p, {}).get("status") == "ok"]
            ys = [c["results"][p]["gbps"] for c in rows
                  if c["results"].get(p, {}).get("status") == "ok"]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if p == "fastopt" else 1.2,
                        label=label(p))
        roof = rows[0].get("roof_gbps")
        if roof:
            ax.axhline(roof, color="k", ls="--", lw=1, label=f"roof {roof:.0f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]} ({rows[0]['bytes_per_element']} B/elem)")
        ax.set_xlabel("elements")
        ax.set_ylabel("effective GB/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    where = (doc["machine"].get("gpu_name", "GPU") if doc.get("device") == "cuda"
             else f"{threads} thread(s) — {doc['machine']['cpu_model']}")
    fig.suptitle(f"fastopt bench: throughput vs size, {where}, {doc['created'][:10]}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_torch_model(plt, doc, rows, path):
    """The torch model scenario alone: time per step of each peer, per model."""
    peers = _peers_present(rows, candidates=TORCH_MODEL_PEERS)
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        names, times = [], []
        for p in peers:
            r = row["results"].get(p, {})
            if r.get("status") == "ok":
                names.append(label(p))
                times.append(r["median_s"] * 1e3)
        bars = ax.barh(range(len(names)), times,
                       color=["C0" if n.startswith("fastopt") else "C1" if "only" in n
                              else "C7" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median)")
        ax.set_title(f"{row['model']}: {row['tensors']} tensors, {fmt_n(row['n'])} params",
                     fontsize=9)
        for bar, t in zip(bars, times):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {t:.3g}",
                    va="center", fontsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"fastopt.torch.AdamW vs torch.optim.AdamW, float32 — "
                 f"{doc['machine']['cpu_model']}, {doc['created'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


ACCURACY_COLORS = {"adamw_fp32": "k", "torch_adamw_fp32": "0.6", "adamw8bit": "C0",
                   "bnb_adamw8bit": "C9", "bf16_sr": "C3", "bf16": "C1"}


def _smooth(y, k=5):
    """A centred moving average over k points (shorter at the ends), NaN-aware."""
    y = np.asarray(y, float)
    out = np.empty_like(y)
    for i in range(len(y)):
        w = y[max(0, i - k // 2): i + k // 2 + 1]
        w = w[np.isfinite(w)]
        out[i] = w.mean() if len(w) else np.nan
    return out


def plot_accuracy(doc, path):
    """The accuracy scenario's loss curves: per model, the training loss (block means,
    mean over seeds, smoothed) of every variant, and below it each variant's relative
    difference to the reference with the 1% and 2% bands."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: plot skipped "
                "(pip install matplotlib, or pip install 'fastopt[bench]')")
    sc = doc["scenarios"]["accuracy"]
    models = list(sc["models"])
    if not models:
        return "no accuracy runs to plot"
    fig, axes = plt.subplots(2, len(models), figsize=(max(8.0, 6.2 * len(models)), 7.2),
                             squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for j, m in enumerate(models):
        top, bottom = axes[0, j], axes[1, j]
        curves = {}
        for v in sc["variants"]:
            rs = [r for r in sc["runs"] if r["model"] == m and r["variant"] == v
                  and r["status"] == "ok"]
            if not rs:
                continue
            every = rs[0]["curve_every"]
            mean = np.nanmean(np.array([r["train_curve"] for r in rs]), axis=0)
            x = (np.arange(len(mean)) + 0.5) * every
            curves[v] = (x, _smooth(mean))
            top.plot(x, curves[v][1], color=ACCURACY_COLORS.get(v), lw=1.1,
                     label=f"{v} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        if curves:   # the first tenth of the steps (the steep start) above the frame
            lo = min(np.nanmin(y) for _, y in curves.values())
            hi = max(y[len(y) // 10] for _, y in curves.values())
            if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                top.set_ylim(lo - 0.05 * (hi - lo), hi)
        top.set_title(f"{m}: {sc['models'][m]['label']}", fontsize=9)
        top.set_ylabel("training loss (mean over seeds, smoothed)")
        top.grid(True, alpha=0.3)
        top.legend(fontsize=7)
        ref = curves.get(sc["reference"])
        if ref is not None:
            start = len(ref[0]) // 10
            for v, (x, y) in curves.items():
                if v != sc["reference"]:
                    bottom.plot(x[start:], 100 * (y[start:] / ref[1][start:] - 1),
                                color=ACCURACY_COLORS.get(v), lw=1.1, label=v)
            bottom.axhspan(-2, 2, color="C3", alpha=0.07, lw=0)
            bottom.axhspan(-1, 1, color="C0", alpha=0.1, lw=0)
            bottom.axhline(0, color="k", lw=0.8)
        bottom.set_xlabel("step")
        bottom.set_ylabel(f"% vs {sc['reference']} (bands: ±1%, ±2%)")
        bottom.grid(True, alpha=0.3)
    fig.suptitle(f"fastopt bench accuracy: {sc['steps']:,} steps × {len(sc['seeds'])} "
                 f"seed(s), one thread per run — {doc['machine']['cpu_model']}, "
                 f"{doc['created'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
