"""SparseAdam for embedding tables: only the rows a gradient touches are read and
written, with ``torch.optim.SparseAdam``'s math and names.

A sparse gradient is ``(row_indices, rows)``: ``rows[k]`` is the gradient of row
``row_indices[k]`` of a 2-D parameter (more dimensions: the first is the row, the
rest one row). Duplicate indices are summed first, as torch's ``coalesce()`` does
(the update is not linear in g). The touched rows then go through the segment engine
as segments, consecutive rows merged into one: Adam's kernel (``adam`` in
``fastopt/kernels/rules.pxi``) with SparseAdam's scalars, so m, v and θ of each
touched row are read and written once, and no other row is read.

torch's SparseAdam puts ε outside a bias-corrected step size:
θ ← θ − γ·√bc2/bc1 · m/(√v + ε); Adam's kernel computes
θ ← θ − s·m/(√v·k + ε), so s = γ·√bc2/bc1 and k = 1 give it (v as β2·v + (1 − β2)·g², where torch
writes v + (1 − β2)(g² − v): a few ulps apart). The step count is per parameter
and advances at every step with a gradient, empty or not, as torch's does.
"""

from __future__ import annotations

import math

import numpy as np

from fastopt import backends
from fastopt.rules import RULES

__all__ = ["SparseAdam", "coalesce_rows", "row_segments", "sparse_adam_plan"]

_ADAM = RULES["Adam"]


def check_sparse_adam_hypers(lr, betas, eps, maximize):
    """torch.optim.SparseAdam's checks and messages (lr > 0, eps > 0: stricter than
    Adam's), each naming its argument."""
    hp = _ADAM.check_hypers({**_ADAM.defaults, "lr": lr, "betas": betas, "eps": eps,
                             "maximize": maximize})
    if not 0.0 < hp["lr"]:
        raise ValueError(f"Invalid learning rate: {hp['lr']} (argument 'lr')")
    if not 0.0 < hp["eps"]:
        raise ValueError(f"Invalid epsilon value: {hp['eps']} (argument 'eps')")
    return hp


def sparse_adam_plan(hp, t):
    """The adam kernel's scalars for SparseAdam's step t (1-based)."""
    beta1, beta2 = hp["betas"]
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    return (hp["lr"] * math.sqrt(bc2) / bc1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0,
            hp["eps"], 0.0, 1.0, int(hp["maximize"]))


def coalesce_rows(index: np.ndarray, rows: np.ndarray, n_rows: int, where="grad"):
    """(sorted unique row indices, their summed rows): duplicates summed in order of
    appearance. ValueError naming ``where`` for an index out of [0, n_rows)."""
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"{where}: row indices must be a 1-D integer array, got "
                        f"{index.dtype} of shape {index.shape}")
    if rows.shape[0] != index.shape[0]:
        raise ValueError(f"{where}: {index.shape[0]} row indices for {rows.shape[0]} rows")
    if index.size:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n_rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: row index {bad} is out of range for a parameter "
                             f"of {n_rows} rows")
    index = index.astype(np.int64, copy=False)
    if index.size < 2 or bool(np.all(index[1:] > index[:-1])):
        return index, rows  # sorted and unique already (a coalesced gradient)
    order = np.argsort(index, kind="stable")
    s = index[order]
    first = np.concatenate(([True], s[1:] != s[:-1]))
    starts = np.flatnonzero(first)
    # each row's first occurrence gathered, then the few repeats added in order of
    # appearance (a reduceat over every row costs ~10x more when repeats are rare)
    out = rows[order[starts]]
    rest = np.flatnonzero(~first)
    if rest.size:
        group = np.cumsum(first) - 1
        np.add.at(out, group[rest], rows[order[rest]])
    return s[starts], out


def row_segments(rows_idx: np.ndarray, param_base: int, value_base: int, state_bases,
                 row_bytes: int):
    """The segment table of touched rows ``rows_idx`` (sorted, unique): one segment
    per run of consecutive rows, in kernel slot order: the parameter's rows (row 0 at
    ``param_base``), the gradient's (packed in ``rows_idx`` order from
    ``value_base``), then each state buffer's (row 0 at its base; 0 for an absent
    slot). Returns (ptrs, rows per segment)."""
    n = rows_idx.shape[0]
    breaks = np.flatnonzero(np.diff(rows_idx) != 1) + 1
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [n])))
    rb = np.uint64(row_bytes)
    first = rows_idx[starts].astype(np.uint64) * rb
    cols = [np.uint64(param_base) + first,
            np.uint64(value_base) + starts.astype(np.uint64) * rb]
    for base in state_bases:
        cols.append(np.uint64(base) + first if base else np.zeros(len(starts), np.uint64))
    return np.stack(cols, axis=1).astype(np.uintp), counts


class SparseAdam:
    """``torch.optim.SparseAdam`` over a NumPy array of ≥ 1 dimension (its first
    dimension the rows): ``opt.step((row_indices, rows))``.

        table = np.zeros((1_000_000, 64), np.float32)
        opt = fastopt.SparseAdam(table, lr=1e-3)
        opt.step((idx, g_rows))     # idx: (k,) ints, g_rows: (k, 64); duplicates summed

    State: ``state['exp_avg']``, ``state['exp_avg_sq']`` (the parameter's shape) and
    ``step_count``. A bad gradient (wrong dtype or row width, an index out of range)
    raises TypeError/ValueError and writes nothing.
    """

    def __init__(self, param, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        if not isinstance(param, np.ndarray):
            raise TypeError(f"param must be a NumPy array, got {type(param).__name__}")
        if param.dtype not in (np.float32, np.float64):
            raise TypeError(f"param has dtype {param.dtype}; SparseAdam updates float32 "
                            "and float64 arrays")
        if param.ndim < 1 or not param.flags.c_contiguous or not param.flags.writeable:
            raise ValueError("param must be a writeable C-contiguous array of at least one "
                             "dimension (its first dimension the rows)")
        self._hp = check_sparse_adam_hypers(lr, betas, eps, maximize)
        self.param = param
        self.state = {"exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}
        self.step_count = 0

    @property
    def hyperparameters(self):
        return {k: self._hp[k] for k in ("lr", "betas", "eps", "maximize")}

    def step(self, grad):
        if not (isinstance(grad, tuple) and len(grad) == 2):
            raise TypeError("grad must be a pair (row_indices, rows); for a dense gradient "
                            "use fastopt.Adam")
        index, rows = grad
        p = self.param
        rows = np.asarray(rows)
        if rows.dtype != p.dtype:
            raise TypeError(f"grad rows have dtype {rows.dtype}, param has dtype {p.dtype}")
        if rows.ndim != p.ndim or rows.shape[1:] != p.shape[1:]:
            raise ValueError(f"grad rows have shape {rows.shape}; rows of param are "
                             f"{p.shape[1:]}")
        idx, summed = coalesce_rows(index, rows, p.shape[0], "grad")
        t = self.step_count + 1
        if idx.size and p[0].size:
            summed = np.ascontiguousarray(summed)
            width = p[0].size
            st = self.state
            ptrs, counts = row_segments(
                idx, p.ctypes.data, summed.ctypes.data,
                (st["exp_avg"].ctypes.data, st["exp_avg_sq"].ctypes.data, 0),
                width * p.itemsize)
            backends.DEFAULT.run_segments("adam", p.dtype, ptrs,
                                          (counts * width).astype(np.intp),
                                          sparse_adam_plan(self._hp, t),
                                          backends.num_threads(), True)
        self.step_count = t
