"""The run: the result document (shared with the CUDA run), the main grid
(rule x dtype x size x threads) with its roof, and the scenarios after it."""

from __future__ import annotations

import datetime as _dt
import gc
import sys
import time
from dataclasses import asdict

import numpy as np

import fastopt
from fastopt.bench import accuracy, lbfgs, lowp, optimizers
from fastopt.bench import roof as roof_mod
from fastopt.bench import scenarios as S
from fastopt.bench import torch_model
from fastopt.bench.config import SCHEMA, Config, hp_json, hyperparameters
from fastopt.bench.machine import (l3_bytes, loadavg, machine_info, prestep_threshold,
                                   set_threads, too_big)
from fastopt.bench.peers import build_steps, make_step, peer_table, random_array
from fastopt.bench.timing import Progress, merge_timings, speedups, time_interleaved
from fastopt.rules import get_rule

SCENARIO_RUNS = {"overhead": S.scenario_overhead, "model": S.scenario_model,
                 "lists": S.scenario_lists, "threads": S.scenario_threads,
                 "denormal": S.scenario_denormal,
                 "torch_model": torch_model.scenario_torch_model, "lbfgs": lbfgs.scenario,
                 "lowp": lowp.scenario_lowp, "accuracy": accuracy.scenario}
# progress-bar work units of each scenario (a grid case costs its MB)
SCENARIO_COST = {"overhead": 40, "model": 400, "lists": 300, "threads": 600, "denormal": 400,
                 "torch_model": 500, "lbfgs": 600, "lowp": 800, "accuracy": 2000}
# scenarios that time nothing: a run of these alone measures no roof
UNTIMED_SCENARIOS = ("accuracy",)
SCENARIO_RUNS.update(optimizers.SCENARIO_RUNS)   # schedulefree, adafactor, sparse, muon
SCENARIO_COST.update(optimizers.SCENARIO_COST)


def new_document(cfg: Config, argv, peers, machine, device="cpu") -> dict:
    return {"schema": SCHEMA, "device": device,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": ["fastopt", "bench"] + list(argv or []),
            "config": {**asdict(cfg), "peers": list(peers)},
            "machine": machine, "peers": peer_table(peers),
            "roof": [], "cases": [], "scenarios": {}}


def apply_roof(doc, roof_for) -> None:
    """Set roof_gbps and every roof_fraction from ``roof_for(row)`` (GB/s or None),
    except in rows whose roof was measured interleaved with their own peers."""
    rows = doc["cases"] + [r for name in ("model", "denormal")
                           for r in doc["scenarios"].get(name, {}).get("cases", []) or []]
    for row in rows:
        roof = None if row.get("roof_in_case") else roof_for(row)
        if not roof:
            continue
        row["roof_gbps"] = roof
        for res in row.get("results", {}).values():
            if res.get("status") == "ok" and "gbps" in res:
                res["roof_fraction"] = res["gbps"] / roof


def finish_document(doc, t_start) -> dict:
    doc["elapsed_s"] = time.monotonic() - t_start
    doc["machine"]["loadavg_at_end"] = loadavg()
    return doc


def case_memory(rule, hp, n, itemsize, npeers) -> int:
    """Bytes one grid case holds: shared param and grad, each peer's state, the NumPy
    peer's temporaries and torch's."""
    return n * itemsize * (2 + npeers * len(rule.needed_buffers(hp)) + 6) + (1 << 30)


def run_case(rule_name, dtype, n, nthreads, cfg: Config, roof_gbps, rng) -> dict:
    rule = get_rule(rule_name)
    hp = hyperparameters(rule_name, cfg.hypers.get(rule_name))
    dt = np.dtype(dtype)
    bpe = rule.bytes_per_element(hp, dt.itemsize)
    case = {"rule": rule_name, "dtype": dt.name, "n": int(n), "threads": nthreads,
            "hyperparameters": hp_json(hp), "bytes_per_element": bpe, "roof_gbps": roof_gbps}
    why = too_big(case_memory(rule, hp, n, dt.itemsize, len(cfg.peers)), cfg.mem_fraction)
    if why:
        case["skipped"] = why
        return case
    param = random_array(n, dt, rng)
    grad = random_array(n, dt, rng, -1e-2, 1e-2)
    steps, holders, status = build_steps(
        cfg.peers, lambda peer: make_step(peer, rule_name, hp, param, grad, nthreads))
    probe = None
    if bpe * n > 2 * l3_bytes():
        # out of cache: the roof is measured interleaved with the peers
        probe = roof_mod.probe(dt, nthreads, cfg.roof_bytes_per_array)
        steps.update(probe.steps())
    timings = time_interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup,
                               target_sample_s=cfg.target_sample_s,
                               prestep_below_s=prestep_threshold(bpe * n))
    if probe is not None:
        case["roof_in_case"] = probe.collect(timings)
        if case["roof_in_case"]:
            roof_gbps = case["roof_gbps"] = case["roof_in_case"]["gbps"]
    case["results"] = merge_timings(status, timings, n, bpe, roof_gbps)
    case["speedup"] = speedups(case["results"])
    del steps, holders, param, grad
    gc.collect()
    return case


def run(cfg: Config, argv=None) -> dict:
    """Runs everything ``cfg`` selects and returns the result document (the JSON)."""
    t_start = time.monotonic()
    rng = np.random.default_rng(cfg.seed)
    threads = cfg.threads or [fastopt.get_num_threads()]
    doc = new_document(cfg, argv, list(cfg.peers) + ["fastopt_kernel"], machine_info())
    doc["config"].update(peers=list(cfg.peers), threads=threads)
    grid = [(r, d, n, th) for th in threads for d in cfg.dtypes for r in cfg.rules
            for n in cfg.sizes]

    def cost(r, d, n):
        bpe = get_rule(r).bytes_per_element(hyperparameters(r, cfg.hypers.get(r)),
                                            np.dtype(d).itemsize)
        return max(1e6, bpe * n) / 1e6

    bar = Progress(sum(cost(r, d, n) for r, d, n, _ in grid) + 50 * len(threads)
                   + sum(SCENARIO_COST[s] for s in cfg.scenarios), cfg.progress)
    saved_threads = fastopt.get_num_threads()
    roofs = {}

    def measure_roofs(phase):
        for th in sorted(set(threads)):
            set_threads(th)
            for d in cfg.dtypes:
                bar.update(f"roof ({phase}): {th} thread(s), {d}")
                r = roof_mod.measure(th, d, bytes_per_array=cfg.roof_bytes_per_array)
                r["phase"] = phase
                doc["roof"].append(r)
                roofs[(th, d)] = max(roofs.get((th, d), 0.0), r["gbps"])
            bar.update("", 25)

    def log(msg):   # the accuracy scenario's one line per training run
        if bar.enabled:
            bar.update(msg)
        elif cfg.progress is None:
            print(msg, file=sys.stderr, flush=True)
    timed = bool(grid) or any(s not in UNTIMED_SCENARIOS for s in cfg.scenarios)
    try:
        if timed:
            measure_roofs("start")
        for (r, d, n, th) in grid:
            set_threads(th)
            bar.update(f"{r} {d} n={n:.0e} threads={th}")
            doc["cases"].append(run_case(r, d, n, th, cfg, roofs.get((th, d)), rng))
            bar.update(f"{r} {d} n={n:.0e}", cost(r, d, n))
        for name in cfg.scenarios:
            set_threads(threads[-1])
            bar.update(f"scenario: {name}")
            try:
                kw = {"log": log} if name == "accuracy" else {}
                doc["scenarios"][name] = SCENARIO_RUNS[name](cfg, threads[-1], roofs, rng, **kw)
            except Exception as exc:  # report, keep the rest of the run
                doc["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            bar.update(f"scenario: {name}", SCENARIO_COST[name])
            gc.collect()
        if timed:
            measure_roofs("end")
    finally:
        set_threads(saved_threads)
        roof_mod.release_probes()
        bar.close()
    # A roof is an upper bound, and a neighbour can only lower a measurement: the roof
    # of a (threads, dtype) is the highest of its measurements in this run (start,
    # end, and the thread-scaling scenario's at that count).
    for r in doc["scenarios"].get("threads", {}).get("roof_measurements", []):
        key = (r["threads"], r["dtype"])
        if key in roofs:
            roofs[key] = max(roofs[key], r["gbps"])
    doc["roof_gbps"] = [{"threads": th, "dtype": d, "gbps": g} for (th, d), g in roofs.items()]
    apply_roof(doc, lambda row: roofs.get((row.get("threads", max(threads)), row["dtype"])))
    return finish_document(doc, t_start)
