"""``fastopt bench``: the configuration, the main grid (rule x dtype x size) and the
command line. Scenarios are in ``scenarios.py``, output in ``report.py``."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from fastopt.bench import peers as P
from fastopt.bench import roof as roof_mod
from fastopt.bench.timing import Progress, time_interleaved

SCHEMA = "fastopt-bench/1"

# log-spaced: half decades up to 1e6, then x4 up to 6.4e7 (the goal sizes 1e3, 1e5,
# 1e6 and 1.6e7 are on the grid)
FULL_SIZES = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 4_000_000,
              16_000_000, 64_000_000)
QUICK_SIZES = (1_000, 100_000, 1_000_000, 16_000_000)
QUICK_RULES = ("Adam", "SGD", "Adagrad")
SCENARIOS = ("overhead", "model", "threads", "denormal", "torch_model", "lbfgs")

# How the benchmark sets hyperparameters: the rule's defaults (torch's) except where
# the default leaves work out. SGD is benchmarked with momentum=0.9, the way it is
# used in practice (plain SGD moves 12 bytes/element, with momentum 20).
BENCH_HYPERS = {"SGD": {"momentum": 0.9}, "SGDW": {"momentum": 0.9}}


@dataclass
class Config:
    mode: str = "custom"
    rules: list = field(default_factory=lambda: list(QUICK_RULES))
    dtypes: list = field(default_factory=lambda: ["float32"])
    sizes: list = field(default_factory=lambda: list(QUICK_SIZES))
    threads: list = field(default_factory=list)      # empty: fastopt's default
    peers: list = field(default_factory=lambda: list(P.PEERS))
    scenarios: list = field(default_factory=lambda: list(SCENARIOS))
    repeats: int = 5
    warmup: int = 2
    target_sample_s: float = 0.003
    mem_fraction: float = 0.7
    roof_bytes_per_array: int = roof_mod.ROOF_BYTES_PER_ARRAY
    model_scale: float = 1.0        # width multiplier of the model scenario's shapes
    lbfgs_cases: list = field(default_factory=list)  # (n, history); empty: by mode
    lbfgs_dtype: str = "float32"
    out: str = "bench-out"
    plot: bool = True
    progress: bool | None = None
    seed: int = 0
    hypers: dict = field(default_factory=lambda: dict(BENCH_HYPERS))


def quick_config() -> Config:
    return Config(mode="quick", warmup=1)


def full_config() -> Config:
    from fastopt.rules import RULES
    return Config(mode="full", rules=list(RULES), dtypes=["float32", "float64"],
                  sizes=list(FULL_SIZES), repeats=7, warmup=2, target_sample_s=0.01)


# ---------------------------------------------------------------------------
# Helpers shared with the scenarios
# ---------------------------------------------------------------------------

def available_memory() -> int:
    """Bytes of memory available now (os.sysconf; /proc/meminfo's MemAvailable
    where it exists, which counts reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def random_array(n, dtype, rng, lo=-1.0, hi=1.0):
    """A 64-byte-aligned array of uniform values in [lo, hi)."""
    from fastopt.backends._host import full
    a = full(n, dtype, 0)
    rng.random(out=a, dtype=a.dtype.type)
    a *= (hi - lo)
    a += lo
    return a


def set_threads(n: int) -> None:
    import fastopt
    fastopt.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def default_threads() -> int:
    import fastopt
    return fastopt.get_num_threads()


def l3_bytes() -> int:
    """The last-level cache size (sysfs), or 32 MiB when unknown."""
    text = _cache(3)
    if text:
        try:
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
            return int(text.rstrip("KMGkmg")) * mult
        except ValueError:
            pass
    return 32 << 20


def prestep_threshold(working_set_bytes: int) -> float:
    """Steps shorter than this get an untimed step before each sample (to bring the
    peer's own buffers into cache); 0 when the working set cannot fit in cache anyway."""
    return 0.02 if working_set_bytes <= 2 * l3_bytes() else 0.0


def build_steps(peers, factory):
    """{peer: step} for the peers that can run, and {peer: status} for all of them.
    ``factory(peer)`` returns (step, holder) or raises Missing/NotApplicable."""
    steps, holders, status = {}, {}, {}
    for peer in peers:
        try:
            steps[peer], holders[peer] = factory(peer)
            status[peer] = {"status": "ok"}
        except P.Missing as exc:
            status[peer] = {"status": "missing", "detail": str(exc)}
        except P.NotApplicable as exc:
            status[peer] = {"status": "n/a", "detail": str(exc)}
        except Exception as exc:
            status[peer] = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    return steps, holders, status


def merge_timings(status, timings, n=None, bytes_per_element=None, roof_gbps=None):
    """Per-peer result dicts: status, times and the derived throughput figures."""
    results = {}
    for peer, st in status.items():
        res = dict(st)
        if peer in timings:
            res.update(timings[peer])
        if res.get("status") == "ok" and n:
            med = res["median_s"]
            res["elements_per_s"] = n / med
            if bytes_per_element:
                res["gbps"] = bytes_per_element * n / med / 1e9
                if roof_gbps:
                    res["roof_fraction"] = res["gbps"] / roof_gbps
        results[peer] = res
    return results


def speedups(results, base="fastopt"):
    """base's speedup over every other peer: peer time / base time (>1: base faster)."""
    b = results.get(base, {})
    if b.get("status") != "ok":
        return {}
    return {peer: r["median_s"] / b["median_s"] for peer, r in results.items()
            if peer != base and r.get("status") == "ok"}


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"sse2", "avx", "avx2", "fma", "avx512f"})
    except OSError:
        pass
    return []


def _cache(level_index: int) -> str | None:
    path = f"/sys/devices/system/cpu/cpu0/cache/index{level_index}/size"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _version(mod_name):
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    import fastopt
    from fastopt import backends
    info = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "l2_cache": _cache(2), "l3_cache": _cache(3),
        "memory_total_bytes": total_memory(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"fastopt": fastopt.__version__, "numpy": np.__version__,
                     "torch": _version("torch"), "numba": _version("numba"),
                     "deepspeed": _version("deepspeed"),
                     "matplotlib": _version("matplotlib")},
        "fastopt_backend": fastopt.backend(),
        "fastopt_default_threads": fastopt.get_num_threads(),
    }
    try:
        from fastopt.backends import compiled
        info["fastopt_isa"] = compiled.ISA
        info["fastopt_openmp"] = bool(compiled.HAVE_OPENMP)
    except Exception as exc:
        info["fastopt_isa"] = f"unavailable ({exc})"
    info["numba_backend"] = backends.available("numba")
    try:
        import torch
        info["torch_threads_default"] = torch.get_num_threads()
        info["torch_parallel_info"] = torch.__config__.parallel_info().splitlines()[:6]
    except Exception:
        pass
    return info


# ---------------------------------------------------------------------------
# The main grid
# ---------------------------------------------------------------------------

def _state_buffers(rule, hp) -> int:
    return len(rule.needed_buffers(hp))


def case_memory(rule, hp, n, itemsize, npeers) -> int:
    """Bytes one grid case holds: shared param and grad, each peer's state, the
    NumPy peer's 4 scratch arrays and 2 arrays of torch temporaries."""
    return n * itemsize * (2 + npeers * _state_buffers(rule, hp) + 4 + 2) + (1 << 30)


def run_case(rule_name, dtype, n, nthreads, cfg: Config, roof_gbps, rng) -> dict:
    from fastopt.rules import get_rule
    rule = get_rule(rule_name)
    hp = P.hyperparameters(rule_name, cfg.hypers.get(rule_name))
    dt = np.dtype(dtype)
    bpe = rule.bytes_per_element(hp, dt.itemsize)
    case = {"rule": rule_name, "dtype": dt.name, "n": int(n), "threads": nthreads,
            "hyperparameters": hp, "bytes_per_element": bpe, "roof_gbps": roof_gbps}
    need = case_memory(rule, hp, n, dt.itemsize, len(cfg.peers))
    avail = available_memory()
    if need > cfg.mem_fraction * avail:
        case["skipped"] = (f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB "
                           f"available (cap {cfg.mem_fraction:.0%})")
        return case
    param = random_array(n, dt, rng)
    grad = random_array(n, dt, rng, -1e-2, 1e-2)
    steps, holders, status = build_steps(
        cfg.peers, lambda peer: P.make_step(peer, rule_name, hp, param, grad, nthreads))
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


def _refraction(results, roof):
    for res in results.values():
        if res.get("status") == "ok" and "gbps" in res:
            res["roof_fraction"] = res["gbps"] / roof


def apply_roof(doc, roofs) -> None:
    """Set roof_gbps and every roof_fraction from the final roofs."""
    for c in doc["cases"]:
        if c.get("roof_in_case"):
            continue   # measured at the same moment as the case: keep it
        roof = roofs.get((c["threads"], c["dtype"]))
        if roof:
            c["roof_gbps"] = roof
            if "results" in c:
                _refraction(c["results"], roof)
    th = max((t for t, _ in roofs), default=None)
    for row in doc["scenarios"].get("model", {}).get("cases", []) or []:
        if row.get("roof_in_case"):
            continue
        roof = roofs.get((th, row["dtype"]))
        if roof:
            row["roof_gbps"] = roof
            _refraction(row["results"], roof)
    for row in doc["scenarios"].get("denormal", {}).get("cases", []) or []:
        roof = roofs.get((row["threads"], row["dtype"]))
        if roof:
            _refraction(row["results"], roof)


def _hp_json(hp):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def run(cfg: Config, argv=None) -> dict:
    """Runs everything ``cfg`` selects and returns the result document (the JSON)."""
    import fastopt
    from fastopt.bench import scenarios as S

    t_start = time.monotonic()
    rng = np.random.default_rng(cfg.seed)
    threads = cfg.threads or [default_threads()]
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": ["fastopt", "bench"] + list(argv if argv is not None else []),
        "config": {k: v for k, v in asdict(cfg).items()},
        "machine": machine_info(),
        "peers": {},
        "roof": [],
        "cases": [],
        "scenarios": {},
    }
    doc["config"]["threads"] = threads
    doc["machine"]["loadavg_at_start"] = _loadavg()
    for peer in cfg.peers + list(P.EXTRA_PEERS):
        status, detail = P.peer_status(peer)
        doc["peers"][peer] = {"status": status, ("version" if status == "ok" else "detail"):
                              detail, "label": P.LABELS.get(peer, peer)}

    # work units for the progress bar: a case costs about its bytes, at least 1 MB
    from fastopt.rules import get_rule
    grid = [(r, d, n, th) for th in threads for d in cfg.dtypes for r in cfg.rules
            for n in cfg.sizes]

    def cost(r, d, n):
        rule = get_rule(r)
        hp = P.hyperparameters(r, cfg.hypers.get(r))
        return max(1e6, rule.bytes_per_element(hp, np.dtype(d).itemsize) * n) / 1e6

    scen_cost = {"overhead": 40, "model": 400, "threads": 600, "denormal": 400,
                 "torch_model": 300, "lbfgs": 600}
    total = (sum(cost(r, d, n) for r, d, n, _ in grid) + 50 * len(threads)
             + sum(scen_cost[s] for s in cfg.scenarios))
    bar = Progress(total, cfg.progress)

    saved_threads = fastopt.get_num_threads()
    try:
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

        measure_roofs("start")
        for (r, d, n, th) in grid:
            set_threads(th)
            bar.update(f"{r} {d} n={n:.0e} threads={th}")
            case = run_case(r, d, n, th, cfg, roofs.get((th, d)), rng)
            case["hyperparameters"] = _hp_json(case["hyperparameters"])
            doc["cases"].append(case)
            bar.update(f"{r} {d} n={n:.0e}", cost(r, d, n))
        for name in cfg.scenarios:
            set_threads(threads[-1])
            bar.update(f"scenario: {name}")
            fn = getattr(S, f"scenario_{name}")
            try:
                doc["scenarios"][name] = fn(cfg, threads[-1], roofs, rng, bar)
            except Exception as exc:  # report, keep the rest of the run
                doc["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            bar.update(f"scenario: {name}", scen_cost[name])
            gc.collect()
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
    apply_roof(doc, roofs)
    doc["elapsed_s"] = time.monotonic() - t_start
    doc["machine"]["loadavg_at_end"] = _loadavg()
    from fastopt.bench.report import evaluate_goals
    doc["goals"] = evaluate_goals(doc)
    return doc


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _int_list(text):
    out = []
    for tok in text.split(","):
        tok = tok.strip().replace("_", "")
        if tok:
            out.append(int(float(tok)))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _lbfgs_cases(text):
    out = []
    for tok in _name_list(text):
        n, sep, h = tok.partition(":")
        try:
            out.append((int(float(n.replace("_", ""))), int(h)))
        except ValueError:
            sep = ""
        if not sep or out[-1][0] < 1 or out[-1][1] < 1:
            raise argparse.ArgumentTypeError(f"expected n:history pairs, got {text!r}")
    return out


def _name_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastopt bench",
        description="Time fastopt against NumPy, torch.optim and DeepSpeed, side by side "
                    "and interleaved, with the memory-bandwidth roof measured in the same "
                    "run. Writes a Markdown table to stdout, and JSON + PNG to --out.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a useful subset in under a minute (the default): Adam, "
                           "SGD(momentum=0.9), Adagrad; float32; 1e3, 1e5, 1e6, 1.6e7; "
                           "all scenarios")
    mode.add_argument("--full", action="store_true",
                      help="every rule, float32 and float64, sizes 1e3..6.4e7 (capped by "
                           "memory), all scenarios")
    p.add_argument("--rules", type=_name_list,
                   help="comma-separated rule names (e.g. Adam,SGD), or 'none' for no grid")
    p.add_argument("--dtypes", type=_name_list, help="float32,float64")
    p.add_argument("--sizes", type=_int_list, help="comma-separated element counts (1e6 ok)")
    p.add_argument("--threads", type=_int_list,
                   help="thread counts for the grid (default: fastopt's default)")
    p.add_argument("--peers", type=_name_list,
                   help=f"subset of {','.join(P.PEERS)}")
    p.add_argument("--scenarios", type=_name_list,
                   help=f"subset of {','.join(SCENARIOS)}, or 'none'")
    p.add_argument("--repeats", type=int, help="timed samples per peer per case")
    p.add_argument("--warmup", type=int, help="untimed steps per peer before timing")
    p.add_argument("--sample-ms", type=float, help="target duration of one sample (ms)")
    p.add_argument("--out", default="bench-out",
                   help="output directory, or a path prefix ending in .json "
                        "(default: bench-out/)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show the progress bar (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--roof-mb", type=float, help="size of each roof array in MiB (default 128)")
    p.add_argument("--lbfgs-cases", type=_lbfgs_cases,
                   help="the lbfgs scenario's cases as n:history pairs (default "
                        "1e6:10 in --quick; 1e6:10,1e6:100,1e7:10 otherwise)")
    p.add_argument("--lbfgs-dtype", choices=("float32", "float64"),
                   help="dtype of the lbfgs scenario (default float32)")
    p.add_argument("--model-scale", type=float,
                   help="width multiplier of the model scenario (default 1: ~16 M parameters)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: fastopt's CUDA backend against torch fused/foreach on the "
                        "GPU (Adam, AdamW, SGD, Adagrad; 1e3..2^28 elements, bounded by "
                        "free GPU memory; the model scenario), with the device copy "
                        "bandwidth as the roof")
    return p


def config_from_args(args) -> Config:
    from fastopt.rules import RULES
    cfg = full_config() if args.full else quick_config()
    if args.rules == ["none"]:
        cfg.rules = []
    elif args.rules:
        unknown = [r for r in args.rules if r not in RULES]
        if unknown:
            raise SystemExit(f"fastopt bench: unknown rule(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(RULES)}")
        cfg.rules = args.rules
    if args.dtypes:
        bad = [d for d in args.dtypes if d not in ("float32", "float64")]
        if bad:
            raise SystemExit(f"fastopt bench: dtypes are float32, float64; got {bad}")
        cfg.dtypes = args.dtypes
    if args.sizes:
        cfg.sizes = args.sizes
    if args.threads:
        cfg.threads = args.threads
    if args.peers:
        bad = [x for x in args.peers if x not in P.PEERS]
        if bad:
            raise SystemExit(f"fastopt bench: unknown peer(s) {bad}; choose from "
                             f"{', '.join(P.PEERS)}")
        cfg.peers = args.peers
    if args.scenarios:
        sc = [] if args.scenarios == ["none"] else args.scenarios
        bad = [x for x in sc if x not in SCENARIOS]
        if bad:
            raise SystemExit(f"fastopt bench: unknown scenario(s) {bad}; choose from "
                             f"{', '.join(SCENARIOS)}")
        cfg.scenarios = sc
    if args.repeats:
        cfg.repeats = args.repeats
    if args.warmup is not None:
        cfg.warmup = args.warmup
    if args.sample_ms:
        cfg.target_sample_s = args.sample_ms / 1e3
    if not (args.quick or args.full) and (args.rules or args.sizes):
        cfg.mode = "custom"
    cfg.out = args.out
    cfg.plot = not args.no_plot
    cfg.progress = args.progress
    cfg.seed = args.seed
    if args.roof_mb:
        cfg.roof_bytes_per_array = int(args.roof_mb * 2**20)
    if args.model_scale:
        cfg.model_scale = args.model_scale
    if args.lbfgs_cases:
        cfg.lbfgs_cases = args.lbfgs_cases
    if args.lbfgs_dtype:
        cfg.lbfgs_dtype = args.lbfgs_dtype
    return cfg


def output_paths(out: str, mode: str) -> dict:
    if out.endswith(".json"):
        stem = out[:-5]
    else:
        stem = os.path.join(out, f"bench-{mode}")
    return {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.device == "cuda":
        from fastopt.bench import cuda as cuda_bench
        return cuda_bench.main(cfg, args, argv)
    return write_outputs(run(cfg, argv), cfg, cfg.mode)


def write_outputs(doc, cfg, mode) -> int:
    """The run's Markdown on stdout; JSON, Markdown and PNG under ``cfg.out``."""
    from fastopt.bench import report
    paths = output_paths(cfg.out, mode)
    os.makedirs(os.path.dirname(paths["json"]) or ".", exist_ok=True)
    md = report.markdown(doc)
    report.write_json(doc, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(md)
    written = [paths["json"], paths["md"]]
    if cfg.plot:
        msg = report.plot(doc, paths["png"])
        if msg:
            print(f"fastopt bench: {msg}", file=sys.stderr)
        else:
            written.append(paths["png"])
    sys.stdout.write(md)
    sys.stdout.flush()
    print(f"fastopt bench: wrote {', '.join(written)} in {doc['elapsed_s']:.1f} s",
          file=sys.stderr)
    return 0
