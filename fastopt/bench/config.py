"""What a run measures (the Config, the quick and full presets) and the one table
of peer labels. The bottom layer of ``fastopt.bench``: it imports no other part of it.

The layers, each importing only those above it in this list:
config -> machine -> timing -> roof -> peers -> lbfgs -> scenarios -> torch_model
-> lowp -> accuracy -> optimizers -> grid -> cuda -> report -> cli.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastopt.rules import RULES, get_rule

SCHEMA = "fastopt-bench/1"

# log-spaced: half decades up to 1e6, then x4 up to 6.4e7
FULL_SIZES = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 4_000_000,
              16_000_000, 64_000_000)
QUICK_SIZES = (1_000, 100_000, 1_000_000, 16_000_000)
QUICK_RULES = ("Adam", "SGD", "Adagrad")
SCENARIOS = ("overhead", "model", "lists", "threads", "denormal", "torch_model", "lbfgs",
             "lowp", "schedulefree", "adafactor", "sparse")
# run only when named (--scenarios accuracy): minutes of training, not a timing;
# muon: torch.optim.Muon's bfloat16 Newton-Schulz takes ~10 s a layer on a CPU
# without bf16 units
OPT_IN_SCENARIOS = ("accuracy", "muon")

# the rule's defaults (torch's) except where the default leaves work out: SGD is
# benchmarked with momentum=0.9, the way it is used (plain SGD moves 12 bytes/element,
# with momentum 20)
BENCH_HYPERS = {"SGD": {"momentum": 0.9}, "SGDW": {"momentum": 0.9}}

# every peer of every scenario, in the order of the report's columns
LABELS = {
    "fastopt": "fastopt",
    "fastopt_list": "fastopt, list of arrays",
    "fastopt_flat": "fastopt, one FlatParams",
    "fastopt_numba": "fastopt numba",
    "fastopt_kernel": "fastopt kernel only",
    "fastopt_torch": "fastopt.torch",
    "fastopt_torch_fresh": "fastopt.torch, fresh p.grad each step",
    "grad_assign": "p.grad = g only",
    "numpy": "NumPy",
    "torch_default": "torch",
    "torch_foreach_false": "torch foreach=False",
    "torch_foreach": "torch foreach=True",
    "torch_fused": "torch fused",
    "torch_fused_flat": "torch fused, one flat tensor",
    "deepspeed": "DeepSpeedCPUAdam",
}
# the grid's peers (the others belong to scenarios)
PEERS = ("fastopt", "fastopt_numba", "numpy", "torch_default", "torch_foreach_false",
         "torch_fused", "deepspeed")


def label(peer: str) -> str:
    return LABELS.get(peer, peer)


@dataclass
class Config:
    mode: str = "custom"
    rules: list = field(default_factory=lambda: list(QUICK_RULES))
    dtypes: list = field(default_factory=lambda: ["float32"])
    sizes: list = field(default_factory=lambda: list(QUICK_SIZES))
    threads: list = field(default_factory=list)      # empty: fastopt's default
    peers: list = field(default_factory=lambda: list(PEERS))
    scenarios: list = field(default_factory=lambda: list(SCENARIOS))
    repeats: int = 5
    warmup: int = 2
    target_sample_s: float = 0.003
    mem_fraction: float = 0.7
    roof_bytes_per_array: int = 128 * 1024 * 1024
    model_scale: float = 1.0        # width multiplier of the model scenario's shapes
    lbfgs_cases: list = field(default_factory=list)  # (n, history); empty: by mode
    lbfgs_dtype: str = "float32"
    accuracy_steps: int = 2000      # training steps per run of the accuracy scenario
    accuracy_seeds: int = 3         # seeds cfg.seed, cfg.seed + 1, ...
    accuracy_models: list = field(default_factory=list)    # empty: all
    accuracy_variants: list = field(default_factory=list)  # empty: all
    accuracy_jobs: int = 1          # runs in parallel processes, one thread each
    out: str = "bench-out"
    plot: bool = True
    progress: bool | None = None
    seed: int = 0
    hypers: dict = field(default_factory=lambda: dict(BENCH_HYPERS))


def quick_config() -> Config:
    return Config(mode="quick", warmup=1)


def full_config() -> Config:
    return Config(mode="full", rules=list(RULES), dtypes=["float32", "float64"],
                  sizes=list(FULL_SIZES), repeats=7, warmup=2, target_sample_s=0.01)


def hyperparameters(rule_name, overrides=None) -> dict:
    """The full, validated hyperparameter dict the benchmark uses for a rule."""
    rule = get_rule(rule_name)
    return rule.check_hypers({**rule.defaults, **(overrides or {})})


def hp_json(hp) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}
