"""The ``fastopt bench`` command line: options, the run, and where the outputs go."""

from __future__ import annotations

import argparse
import os
import sys

from fastopt.bench import accuracy, cuda, report
from fastopt.bench.config import (OPT_IN_SCENARIOS, PEERS, SCENARIOS, full_config,
                                  quick_config)
from fastopt.bench.grid import run
from fastopt.rules import RULES


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
                      help="a useful subset in a few minutes (the default): Adam, "
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
                   help=f"subset of {','.join(PEERS)}")
    p.add_argument("--scenarios", type=_name_list,
                   help=f"subset of {','.join(SCENARIOS)}, or 'none' (default: all of "
                        f"these); {','.join(OPT_IN_SCENARIOS)} runs only when named "
                        "(alone, it skips the grid and writes bench-accuracy.*)")
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
    acc = p.add_argument_group("accuracy scenario (real training; see "
                               "fastopt/bench/accuracy.py)")
    acc.add_argument("--steps", type=int, help="training steps per run (default 2000)")
    acc.add_argument("--seeds", type=int,
                     help="number of seeds, from --seed on (default 3)")
    acc.add_argument("--accuracy-models", type=_name_list,
                     help=f"subset of {','.join(accuracy.MODELS)}")
    acc.add_argument("--accuracy-variants", type=_name_list,
                     help=f"subset of {','.join(accuracy.VARIANTS)}")
    acc.add_argument("--no-bnb", action="store_true",
                     help="leave out bnb_adamw8bit (bitsandbytes is slow on CPU: about "
                          "4x the time of the other variants)")
    acc.add_argument("--jobs", type=int,
                     help="runs in parallel processes, one thread each (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: fastopt's CUDA backend against torch fused/foreach on the "
                        "GPU (Adam, AdamW, SGD, Adagrad; 1e3..2^28 elements, bounded by "
                        "free GPU memory; the model scenario), with the device copy "
                        "bandwidth as the roof")
    return p


def _known(what, given, allowed):
    """``given`` if every entry is in ``allowed``; else the CLI's error naming the rest."""
    bad = [x for x in given if x not in allowed]
    if bad:
        raise SystemExit(f"fastopt bench: unknown {what} {', '.join(map(str, bad))}; "
                         f"choose from {', '.join(allowed)}")
    return list(given)


def config_from_args(args):
    cfg = full_config() if args.full else quick_config()
    if args.rules == ["none"]:
        cfg.rules = []
    elif args.rules:
        cfg.rules = _known("rule(s)", args.rules, list(RULES))
    if args.dtypes:
        cfg.dtypes = _known("dtype(s)", args.dtypes, ["float32", "float64"])
    if args.sizes:
        cfg.sizes = args.sizes
    if args.threads:
        cfg.threads = args.threads
    if args.peers:
        cfg.peers = _known("peer(s)", args.peers, list(PEERS))
    if args.scenarios:
        cfg.scenarios = _known("scenario(s)", [] if args.scenarios == ["none"]
                               else args.scenarios, list(SCENARIOS + OPT_IN_SCENARIOS))
        if (cfg.scenarios == ["accuracy"] and not (args.quick or args.full)
                and not args.rules and not args.sizes):
            cfg.mode, cfg.rules = "accuracy", []   # the training alone
    if args.steps is not None:
        cfg.accuracy_steps = args.steps
    if args.seeds is not None:
        cfg.accuracy_seeds = args.seeds
    if args.steps is not None and args.steps < 1 or args.seeds is not None and args.seeds < 1:
        raise SystemExit("fastopt bench: --steps and --seeds must be at least 1")
    if args.accuracy_models:
        cfg.accuracy_models = _known("accuracy model(s)", args.accuracy_models,
                                     list(accuracy.MODELS))
    if args.accuracy_variants:
        cfg.accuracy_variants = _known("accuracy variant(s)", args.accuracy_variants,
                                       list(accuracy.VARIANTS))
    if args.no_bnb:
        cfg.accuracy_variants = [v for v in cfg.accuracy_variants or accuracy.VARIANTS
                                 if v != "bnb_adamw8bit"]
    if args.jobs is not None:
        cfg.accuracy_jobs = max(1, args.jobs)
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
    return {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png",
            "accuracy_png": stem + "-accuracy.png"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.device == "cuda":
        try:
            doc = cuda.run_from_args(cfg, args, argv)
        except cuda.NoDevice as exc:
            print(f"fastopt bench: {exc}", file=sys.stderr)
            return 1
        return write_outputs(doc, cfg, cfg.mode)
    return write_outputs(run(cfg, argv), cfg, cfg.mode)


def write_outputs(doc, cfg, mode) -> int:
    """The run's Markdown on stdout; JSON, Markdown and PNG under ``cfg.out``."""
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
        if doc["cases"] and doc.get("scenarios", {}).get("accuracy", {}).get("summary"):
            # the grid took the main PNG: the loss curves get their own
            msg = report.plot_accuracy(doc, paths["accuracy_png"])
            if msg:
                print(f"fastopt bench: {msg}", file=sys.stderr)
            else:
                written.append(paths["accuracy_png"])
    sys.stdout.write(md)
    sys.stdout.flush()
    print(f"fastopt bench: wrote {', '.join(written)} in {doc['elapsed_s']:.1f} s",
          file=sys.stderr)
    return 0
