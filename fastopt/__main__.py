"""The ``fastopt`` console command. Subcommands:

    fastopt bench [--quick | --full] [--rules ...] [--sizes ...] [--threads ...] [--out DIR]
    fastopt demo --out DIR [--steps N] [--gif]
"""

from __future__ import annotations

import sys

USAGE = """usage: fastopt <command> [options]

commands:
  bench     time fastopt against NumPy, torch.optim and DeepSpeed
            (fastopt bench --help for the options)
  demo      draw every rule's path on the saddle, Rosenbrock and Beale
            surfaces (fastopt demo --out DIR [--steps N] [--gif])
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from fastopt.bench.cli import main as bench_main
        return bench_main(rest)
    if cmd == "demo":
        from fastopt.demo import main as demo_main
        return demo_main(rest)
    sys.stderr.write(f"fastopt: unknown command {cmd!r}\n" + USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
