"""``fastopt bench``: fastopt against NumPy, torch.optim and DeepSpeed, side by side.

    fastopt bench --quick            # a few minutes
    fastopt bench --full --out DIR   # every rule, both dtypes, 1e3..6.4e7 elements

See ``benchmarks/README.md`` for the method and the JSON schema, and
``fastopt/bench/config.py`` for the modules' layers.
"""

from fastopt.bench.cli import main
from fastopt.bench.config import Config, full_config, quick_config
from fastopt.bench.grid import run

__all__ = ["Config", "quick_config", "full_config", "run", "main"]
