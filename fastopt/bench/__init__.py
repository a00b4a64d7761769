"""``fastopt bench``: fastopt against NumPy, torch.optim and DeepSpeed, side by side.

    fastopt bench --quick            # under a minute
    fastopt bench --full --out DIR   # every rule, both dtypes, 1e3..6.4e7 elements

See ``benchmarks/README.md`` for the method and the JSON schema.
"""

from fastopt.bench.runner import Config, full_config, main, quick_config, run

__all__ = ["Config", "quick_config", "full_config", "run", "main"]
