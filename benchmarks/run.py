"""Run the benchmark from a checkout and keep the results beside this file:

    python benchmarks/run.py --quick
    python benchmarks/run.py --full --rules Adam,SGD,Adagrad

Everything after the script name is passed to ``fastopt bench`` (see
``fastopt bench --help``); ``--out`` defaults to ``benchmarks/results/``.
"""

import os
import sys

from fastopt.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    sys.exit(main(argv))
