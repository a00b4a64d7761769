"""Adafactor (Shazeer & Stern 2018) with ``torch.optim.Adafactor``'s (2.13) names,
defaults, checks and update, for NumPy arrays (``fastopt.Adafactor``); the torch
class (``fastopt.torch.Adafactor``) runs the same passes over its tensors.

Per tensor and step t (torch's version of the algorithm):

    β̂ = t^beta2_decay;  ρ = min(lr, 1/√t);  α = max(ε2, ‖θ‖/√N)·ρ
    θ ← θ·(1 − lr·λ)                                   (weight_decay λ)
    ≥ 2-D (the last two dimensions a matrix, the others a batch):
        r ← lerp(r, mean_j g², β̂)   (row_var)    c ← lerp(c, mean_i g², β̂)   (col_var)
        v_ij = (r_i·c_j)/max(mean(r), ε1)
    vectors: v ← lerp(v, g², β̂)  (variance)
    u = g/√max(v, ε1²);  θ ← θ − α/max(1, ‖u‖/(√N·d))·u

ε1 = None is the dtype's machine epsilon. A matrix takes three passes of the compiled
kernels (``fastopt/kernels/factored.pxi``): Σθ² with the row and column sums of g²;
‖u‖; then the update with the decay, u recomputed from r and c (no N-sized
temporary). torch makes about ten passes and three N-sized temporaries. Sums are in
float64 with a fixed order (the same bits for any thread count).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fastopt import backends

__all__ = ["Adafactor", "adafactor_step", "check_adafactor_hypers"]


def check_adafactor_hypers(lr, beta2_decay, eps, d, weight_decay, maximize):
    """torch.optim.Adafactor's checks and messages, each naming its argument."""
    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {v!r}")
        return float(v)
    if isinstance(eps, (str, bytes)) or not hasattr(eps, "__len__") or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else real("eps[0]", eps[0])
    eps2 = real("eps[1]", eps[1])
    lr, beta2_decay, d, weight_decay = (real("lr", lr), real("beta2_decay", beta2_decay),
                                        real("d", d), real("weight_decay", weight_decay))
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr} (argument 'lr')")
    if not 0.0 >= beta2_decay:
        raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay} "
                         "(argument 'beta2_decay')")
    if eps1 is not None and not 0.0 <= eps1:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps1} (argument 'eps')")
    if not 0.0 <= eps2:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps2} (argument 'eps')")
    if not 1.0 <= d:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d} (argument 'd')")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay} "
                         "(argument 'weight_decay')")
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {maximize!r}")
    return dict(lr=lr, beta2_decay=beta2_decay, eps=(eps1, eps2), d=d,
                weight_decay=weight_decay, maximize=bool(maximize))


def initial_state(shape, dtype) -> dict:
    """torch's state for a parameter of ``shape``: row_var/col_var for ≥ 2-D, else
    variance (zeros)."""
    if len(shape) > 1:
        row, col = list(shape), list(shape)
        row[-1] = 1
        col[-2] = 1
        return {"row_var": np.zeros(row, dtype), "col_var": np.zeros(col, dtype)}
    return {"variance": np.zeros(shape, dtype)}


def _lerp_(start, end, weight):
    """torch's lerp_ formulas, in place on ``start``."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1.0 - weight)


def _kernels():
    if backends.available("cython"):
        mod = backends.load("cython").module
        if hasattr(mod, "factored_stats"):
            return mod
    return None


def _np_stats(p, g, nthreads):
    g2 = g.astype(np.float64) ** 2
    return float(np.sum(p.astype(np.float64) ** 2)), g2.sum(axis=1), g2.sum(axis=0)


def _np_u(g, r, c, rm, eps1sq):
    v = (r[:, None] * c[None, :]) / g.dtype.type(rm)
    v = np.where((v > eps1sq) | np.isnan(v), v, g.dtype.type(eps1sq))
    return g * (1.0 / np.sqrt(v)).astype(g.dtype)


def adafactor_step(p, g, state, hp, t, nthreads=None):
    """One step of one parameter: ``p`` (C-contiguous), its gradient ``g`` (same shape
    and dtype, only read), ``state`` (``initial_state``'s arrays, updated in place),
    step t ≥ 1."""
    nthreads = backends.num_threads() if nthreads is None else nthreads
    dt = p.dtype.type
    eps1, eps2 = hp["eps"]
    if eps1 is None:
        eps1 = float(np.finfo(p.dtype).eps)
    eps1sq = eps1 * eps1
    lr = hp["lr"]
    beta2t = float(t) ** hp["beta2_decay"]
    rho = min(lr, 1.0 / (float(t) ** 0.5))
    n_all = p.size
    decay = 1.0 - lr * hp["weight_decay"]
    sign = -1.0 if hp["maximize"] else 1.0
    K = _kernels()
    if p.ndim > 1:
        m, n = p.shape[-2], p.shape[-1]
        P = p.reshape(-1, m, n)
        G = g.reshape(-1, m, n)
        R = state["row_var"].reshape(-1, m)
        C = state["col_var"].reshape(-1, n)
        psq, rows, cols = 0.0, [], []
        for b in range(P.shape[0]):
            s, rs, cs = (K.factored_stats(P[b], G[b], nthreads) if K is not None
                         else _np_stats(P[b], G[b], nthreads))
            psq += s
            rows.append(rs)
            cols.append(cs)
        alpha = max(eps2, math.sqrt(psq) / (n_all ** 0.5)) * rho
        rms = []
        for b in range(P.shape[0]):
            # torch: norm(g, dim)² / size, in the parameter's dtype
            row_mean = np.sqrt(rows[b]).astype(p.dtype) ** 2 / dt(n)
            col_mean = np.sqrt(cols[b]).astype(p.dtype) ** 2 / dt(m)
            _lerp_(R[b], row_mean, beta2t)
            _lerp_(C[b], col_mean, beta2t)
            rms.append(max(float(np.mean(R[b])), eps1))
        usq = 0.0
        for b in range(P.shape[0]):
            usq += (K.factored_norm_sq(G[b], R[b], C[b], rms[b], eps1sq, nthreads)
                    if K is not None else
                    float(np.sum(_np_u(G[b], R[b], C[b], rms[b], eps1sq).astype(np.float64) ** 2)))
        denom = max(1.0, math.sqrt(usq) / ((n_all ** 0.5) * hp["d"]))
        coef = sign * alpha / denom
        for b in range(P.shape[0]):
            if K is not None:
                K.factored_update(P[b], G[b], R[b], C[b], rms[b], eps1sq, decay, coef,
                                  nthreads)
            else:
                u = _np_u(G[b], R[b], C[b], rms[b], eps1sq)
                if decay != 1.0:
                    P[b] *= decay
                P[b] -= coef * u
        return
    # a vector (or a scalar): the full second moment
    v = state["variance"]
    alpha = max(eps2, float(np.sqrt(np.sum(p.astype(np.float64) ** 2))) / (n_all ** 0.5)) * rho
    _lerp_(v, g * g, beta2t)
    vv = np.where((v > eps1sq) | np.isnan(v), v, dt(eps1sq))
    u = g * (1.0 / np.sqrt(vv))
    denom = max(1.0, float(np.sqrt(np.sum(u.astype(np.float64) ** 2))) / ((n_all ** 0.5) * hp["d"]))
    if decay != 1.0:
        p *= decay
    p -= (sign * alpha / denom) * u


class Adafactor:
    """``torch.optim.Adafactor`` over NumPy arrays (one, or a list):
    ``opt.step(grad)`` / ``opt.step([g1, ...])``. State per array: ``row_var`` and
    ``col_var`` (≥ 2-D, torch's shapes) or ``variance``; ``step_count``."""

    def __init__(self, param, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False):
        self._many = isinstance(param, (list, tuple))
        params = list(param) if self._many else [param]
        if not params:
            raise ValueError("param is an empty list: give at least one array")
        for i, p in enumerate(params):
            where = f"param[{i}]" if self._many else "param"
            if not isinstance(p, np.ndarray):
                raise TypeError(f"{where} must be a NumPy array, got {type(p).__name__}")
            if p.dtype not in (np.float32, np.float64):
                raise TypeError(f"{where} has dtype {p.dtype}; Adafactor updates float32 "
                                "and float64 arrays")
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"{where} must be a writeable C-contiguous array")
        self._hp = check_adafactor_hypers(lr, beta2_decay, eps, d, weight_decay, maximize)
        self._params = params
        self._states = [initial_state(p.shape, p.dtype) for p in params]
        self.step_count = 0

    @property
    def param(self):
        return list(self._params) if self._many else self._params[0]

    @property
    def state(self):
        return self._states if self._many else self._states[0]

    @property
    def hyperparameters(self):
        return dict(self._hp)

    def step(self, grad):
        grads = list(grad) if self._many else [grad]
        if len(grads) != len(self._params):
            raise ValueError(f"grad has {len(grads)} arrays, param has {len(self._params)}")
        checked = []
        for i, (p, g) in enumerate(zip(self._params, grads)):
            where = f"grad[{i}]" if self._many else "grad"
            g = np.asarray(g)
            if g.dtype != p.dtype:
                raise TypeError(f"{where} has dtype {g.dtype}, param has dtype {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{where} has shape {g.shape}, param has shape {p.shape}")
            checked.append(np.ascontiguousarray(g).reshape(p.shape))
        t = self.step_count + 1
        for p, g, st in zip(self._params, checked, self._states):
            adafactor_step(p, g, st, self._hp, t)
        self.step_count = t
