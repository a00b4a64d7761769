"""Machinery of the idiom suite: run one idiom with torch.optim and with fastopt.torch,
turn the results into plain trees and compare them.

An idiom is a function ``fn(O)`` of everyday torch code around an optimizer; ``O``
builds the optimizer of one rule from one library (``O(params, **overrides)``) and
knows the run's dtype. It returns a tree (dicts, lists, tensors, numbers) or raises.
Both libraries run the same function from the same seed and data; the trees must
agree: float64 tensors within 1e-12 of the tensor's largest magnitude, float32
within 1e-5, exceptions of the same type (fastopt's may be a subclass of torch's).
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

import fastopt.torch as fot

# Normwise relative tolerance max|a-b|/max|b| per tensor dtype. fastopt rounds
# a + alpha*b twice where torch's CPU loops fuse it into one FMA: a few ulps per
# step, amplified mildly over a few steps of training.
RTOL = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.float16": 2e-3,
        "torch.bfloat16": 2e-2}

# How long a forked run may take before it counts as hung
CHILD_TIMEOUT_S = 60


class Lib:
    """One side of a comparison: ``O(params, **kw)`` builds ``rule`` from ``module``
    with the rule's representative hyperparameters, ``kw`` overriding them."""

    def __init__(self, module, rule: str, dtype: torch.dtype, hp: dict):
        self.module, self.rule, self.dtype, self.hp = module, rule, dtype, hp

    @property
    def is_torch(self) -> bool:
        return self.module is torch.optim

    def cls(self, name: str | None = None):
        return getattr(self.module, name or self.rule)

    def __call__(self, params, **kw):
        return self.cls()(params, **{**self.hp, **kw})

    def __repr__(self):
        return f"{self.module.__name__}.{self.rule}[{self.dtype}]"


# ---------------------------------------------------------------------------
# Plain trees: what a run returns, with tensors as NumPy arrays (a forked run sends
# them through a pipe, and torch's reductions would move tensors to shared memory)
# ---------------------------------------------------------------------------

@dataclass
class Arr:
    dtype: str
    array: np.ndarray


@dataclass
class Raised:
    """An exception: its class name and the names of its bases (a subclass of
    torch's type is accepted)."""

    name: str
    bases: tuple
    message: str


@dataclass
class Died:
    """A forked run that did not come back: a signal, an exit code or a timeout."""

    why: str


@dataclass
class AtMost:
    """A cost (a file's size): fastopt's may exceed torch's by ``rel`` at most."""

    value: float
    rel: float


def plain(x):
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return Arr(str(x.dtype), t.cpu().clone().resolve_conj().numpy())
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (Arr, AtMost, Raised, Died)) or x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, (int, float, np.integer, np.floating)):
        return float(x) if isinstance(x, (float, np.floating)) else int(x)
    if isinstance(x, torch.dtype):
        return str(x)
    raise TypeError(f"an idiom returned {type(x).__name__}, which the suite cannot compare")


def raised(exc: BaseException) -> Raised:
    return Raised(type(exc).__name__, tuple(c.__name__ for c in type(exc).__mro__),
                  str(exc).splitlines()[0][:200] if str(exc) else "")


def guarded(fn):
    """fn()'s plain tree, or the exception it raised as a leaf (so that one part of
    a result failing still lets the rest be compared)."""
    try:
        return plain(fn())
    except Exception as exc:  # noqa: BLE001 -- compared with torch's
        return raised(exc)


def run(fn, O) -> object:
    torch.manual_seed(0)
    return guarded(lambda: fn(O))


def _child(module, name, rule, dtype, side, conn):
    torch.set_num_threads(1)  # as in the test process, see the test module
    mod = importlib.import_module(module)
    fn = mod.IDIOMS[name][0]
    O = libs(rule, getattr(torch, dtype), mod.HP[rule])[side]
    try:
        conn.send(run(fn, O))
    finally:
        conn.close()


def run_forked(module: str, name: str, rule: str, dtype: torch.dtype, side: int,
               timeout=CHILD_TIMEOUT_S) -> object:
    """``run`` of idiom ``name`` of test module ``module`` in a child process, so that
    a crash (heap corruption, a segfault) is a result, not the end of the session.
    ``side`` 0 is torch, 1 fastopt. The child is forked from a fork server that has
    imported torch but computed nothing: a child forked from a process whose BLAS
    or OpenMP threads have run hangs in its first float64 matmul."""
    ctx = multiprocessing.get_context("forkserver")
    reader, writer = ctx.Pipe(duplex=False)
    # not a daemon: an idiom may start processes of its own (Hogwild workers)
    proc = ctx.Process(target=_child,
                       args=(module, name, rule, str(dtype)[6:], side, writer))
    proc.start()
    writer.close()
    result = None
    try:
        if reader.poll(timeout):
            result = reader.recv()
    except (EOFError, OSError):
        result = None
    finally:
        reader.close()
    proc.join(timeout=10)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        return Died(f"no result after {timeout} s (hung), killed")
    code = proc.exitcode
    if code is not None and code < 0:
        return Died(f"killed by {signal.Signals(-code).name}")
    if result is None:
        return Died(f"exited with code {code} without a result")
    return result


def preload_fork_server(*modules):
    """Have the fork server import torch, fastopt and the idioms before any child
    (torch.optim imports torch._dynamo at its first step: 3 s per child otherwise)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "fastopt.torch", __name__, *modules])


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------

@dataclass
class Report:
    problems: list        # (path, message)
    worst_rel: float      # largest normwise relative |Δ| over the compared tensors
    worst_abs: float      # largest |Δ|
    worst_at: str
    rtol: dict


def compare(ours, theirs, torch_may_raise=False, rtol=None) -> Report:
    """fastopt's result ``ours`` against torch's ``theirs``. Unless
    ``torch_may_raise``, an exception in torch's run is the idiom's own bug: it fails
    the comparison rather than letting two equal exceptions pass. ``rtol`` overrides
    tolerances per dtype."""
    rep = Report([], 0.0, 0.0, "", {**RTOL, **(rtol or {})})
    if not torch_may_raise:
        for path, r in _raised(theirs, "result"):
            rep.problems.append((path, f"the idiom fails with torch.optim: {r.name}: {r.message}"))
        if rep.problems:
            return rep
    _compare(ours, theirs, "result", rep)
    return rep


def _raised(tree, path):
    if isinstance(tree, (Raised, Died)):
        yield path, tree if isinstance(tree, Raised) else Raised("Died", (), tree.why)
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _raised(v, f"{path}[{k!r}]")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _raised(v, f"{path}[{i}]")


def _compare(a, b, path, rep):
    if isinstance(b, Died):
        rep.problems.append((path, f"the idiom's run with torch.optim died: {b.why}"))
        return
    if isinstance(b, Raised) or isinstance(a, Raised) or isinstance(a, Died):
        if isinstance(a, Died):
            rep.problems.append((path, f"fastopt's run died: {a.why}"))
        elif isinstance(b, Raised) and isinstance(a, Raised):
            if b.name not in a.bases:
                rep.problems.append((path, f"torch raises {b.name} ({b.message}), "
                                           f"fastopt {a.name} ({a.message})"))
        elif isinstance(b, Raised):
            rep.problems.append((path, f"torch raises {b.name} ({b.message}), fastopt does not"))
        else:
            rep.problems.append((path, f"fastopt raises {a.name} ({a.message}), torch does not"))
        return
    if isinstance(b, dict):
        if not isinstance(a, dict):
            rep.problems.append((path, f"torch gives a dict, fastopt {type(a).__name__}"))
            return
        if set(a) != set(b):
            rep.problems.append((path, f"keys differ: torch {sorted(map(str, b))}, "
                                       f"fastopt {sorted(map(str, a))}"))
        for k in b:
            if k in a:
                _compare(a[k], b[k], f"{path}[{k!r}]", rep)
        return
    if isinstance(b, list):
        if not isinstance(a, list) or len(a) != len(b):
            rep.problems.append((path, f"torch gives {len(b)} items, fastopt "
                                       f"{len(a) if isinstance(a, list) else type(a).__name__}"))
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]", rep)
        return
    if isinstance(b, Arr):
        if not isinstance(a, Arr):
            rep.problems.append((path, f"torch gives a tensor, fastopt {type(a).__name__}"))
            return
        if a.dtype != b.dtype and a.array.shape == b.array.shape == ():
            # a scalar kept in another dtype ('step', NAdam's mu_product): its value
            # is compared here, its dtype in the state_dict structure idiom
            rtol = max(rep.rtol.get(a.dtype, 0.0), rep.rtol.get(b.dtype, 0.0))
            _compare_arrays(a.array, b.array, rtol, path, rep)
            return
        if a.dtype != b.dtype or a.array.shape != b.array.shape:
            rep.problems.append((path, f"torch gives {b.dtype}{list(b.array.shape)}, "
                                       f"fastopt {a.dtype}{list(a.array.shape)}"))
            return
        _compare_arrays(a.array, b.array, rep.rtol.get(b.dtype, 0.0), path, rep)
        return
    if isinstance(b, AtMost):
        ok = isinstance(a, AtMost) and a.value <= b.value * (1 + b.rel)
        if not ok:
            rep.problems.append((path, f"torch {b.value}, fastopt "
                                       f"{a.value if isinstance(a, AtMost) else a} "
                                       f"(allowed: torch's + {b.rel:.0%})"))
        return
    # numbers by value: a hyperparameter given as 0 and kept as 0.0 is the same 0
    if isinstance(b, (int, float)) and isinstance(a, (int, float)) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        _compare_arrays(np.array([a], dtype=np.float64), np.array([b], dtype=np.float64),
                        rep.rtol["torch.float64"],
                        path, rep)
        return
    if a != b or type(a) is not type(b):
        rep.problems.append((path, f"torch {b!r}, fastopt {a!r}"))


def _compare_arrays(a, b, rtol, path, rep):
    if a.dtype.kind not in "fc":
        if not np.array_equal(a, b):
            n = int(np.sum(a != b))
            rep.problems.append((path, f"{n} of {a.size} elements differ"))
        return
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        rep.problems.append((path, f"NaN in {int(nan_a.sum())} elements against torch's "
                                   f"{int(nan_b.sum())}"))
        return
    fin = ~nan_b
    if not np.array_equal(np.isinf(a[fin]), np.isinf(b[fin])) or \
            not np.array_equal(a[fin][np.isinf(b[fin])], b[fin][np.isinf(b[fin])]):
        rep.problems.append((path, "infinities differ"))
        return
    fin &= ~np.isinf(b)
    if not fin.any():
        return
    d = float(np.max(np.abs(a[fin].astype(np.float64) - b[fin].astype(np.float64))))
    scale = float(np.max(np.abs(b[fin].astype(np.float64))))
    rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
    if rel > rep.worst_rel or (rel == rep.worst_rel and d > rep.worst_abs):
        rep.worst_rel, rep.worst_abs, rep.worst_at = rel, d, path
    if rel > rtol:
        rep.problems.append((path, f"max |Δ| = {d:.3g} (relative {rel:.2g}, allowed {rtol:g})"))


def describe(name: str, rep: Report) -> str:
    """The idiom's verdict, its largest Δ and its first difference on the first line
    (what ``pytest -rA`` shows), then up to 12 differences, one a line."""
    delta = f"max |Δ| {rep.worst_abs:.3g} (relative {rep.worst_rel:.2g})"
    if rep.worst_at:
        delta += f" at {rep.worst_at}"
    if not rep.problems:
        return f"{name}: as torch, {delta}"
    path, msg = rep.problems[0]
    lines = [f"{name}: {len(rep.problems)} difference(s) from torch.optim, {delta}; "
             f"first: {path}: {msg}"]
    lines += [f"  {path}: {msg}" for path, msg in rep.problems[1:12]]
    if len(rep.problems) > 12:
        lines.append(f"  ... and {len(rep.problems) - 12} more")
    return "\n".join(lines)


def libs(rule: str, dtype: torch.dtype, hp: dict):
    return Lib(torch.optim, rule, dtype, hp), Lib(fot, rule, dtype, hp)
