"""Shared fixtures: every correctness test runs on every backend.

The CUDA backend runs under Numba's simulator unless a GPU is present
(NUMBA_ENABLE_CUDASIM must be set before numba is imported, hence here).
"""

import os
import sys

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastopt  # noqa: E402
from fastopt import backends  # noqa: E402

BACKENDS = ("cython", "numba", "cuda")
SIMULATED_CUDA = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


class Backend:
    """How a test makes and reads arrays for one backend."""

    def __init__(self, name):
        self.name = name
        self.module = backends.load(name)  # fails the test loudly if unavailable
        if name == "cuda":
            from numba import cuda
            self._cuda = cuda
            # small blocks, and few of them, so that small inputs span several
            # blocks and the grid-stride loop goes round more than once
            self.module.BLOCK_SIZE = 32
            self.module.MAX_BLOCKS = 2

    @property
    def is_cuda(self):
        return self.name == "cuda"

    def asarray(self, a):
        a = np.ascontiguousarray(a)
        return self._cuda.to_device(a) if self.is_cuda else a

    def numpy(self, a):
        return a.copy_to_host() if self.is_cuda else np.asarray(a)

    def kw(self):
        """Constructor keywords that select this backend."""
        return {} if self.is_cuda else {"backend": self.name}

    # The simulator runs each CUDA thread as a Python thread: keep its problems
    # small (97 elements = 2 blocks of 32, each thread striding twice)
    def lengths(self, lengths):
        if self.is_cuda and SIMULATED_CUDA:
            return (7, 97)
        return lengths

    def steps(self, steps):
        return min(steps, 12) if self.is_cuda and SIMULATED_CUDA else steps


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    return Backend(request.param)


# Largest deviations seen, printed at the end of the run (for the closing notes)
DEVIATIONS = {}


def record(suite, backend_name, rule, dtype, actual, expected):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(e) & np.isfinite(a)
    if not finite.any():
        return 0.0
    # normwise: the largest difference relative to the largest magnitude, so an
    # element that cancels to near zero does not dominate the figure
    diff = float(np.max(np.abs(a[finite] - e[finite])))
    rel = diff / max(float(np.max(np.abs(e[finite]))), 1e-300)
    key = (suite, backend_name, rule, np.dtype(dtype).name)
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), rel)
    return rel


def pytest_terminal_summary(terminalreporter):
    if not DEVIATIONS:
        return
    tr = terminalreporter
    tr.section("largest normwise deviation max|a-e|/max|e| (suite, backend, rule, dtype)")
    for key in sorted(DEVIATIONS):
        tr.write_line(f"{' '.join(key):60s} {DEVIATIONS[key]:.3e}")
