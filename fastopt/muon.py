"""Muon (Jordan et al. 2024): momentum, orthogonalised by a Newton–Schulz iteration,
for 2-D parameters, with ``torch.optim.Muon``'s (2.13) names, defaults and checks.

Per matrix and step:

    B ← lerp(B, G, 1 − μ)                       (momentum_buffer, zero at first)
    U = lerp(G, B, μ) if nesterov else B
    O = NS(U): X = U/max(‖U‖_F, eps) (transposed when taller than wide), then
         ns_steps times  A = XXᵀ;  X ← aX + (bA + cA²)X
    θ ← θ·(1 − γλ) − γ'·O        γ' = γ·√max(1, rows/cols) ('original', the default),
                                 0.2·γ·√max(rows, cols) ('match_rms_adamw')

The Newton–Schulz products are BLAS matrix products. torch runs them in bfloat16;
fastopt runs them in float32 by default (``ns_dtype``): on a CPU without bfloat16
matrix units (AVX2 here: no AVX512-BF16/AMX) a bfloat16 product is emulated through
float32 anyway, so float32 is both faster and about 3 decimal digits more exact.
``ns_dtype='bfloat16'`` (torch classes only) reproduces torch's rounding;
``'float64'`` for float64 work. The decay and the update are one fused pass (the
``sgd`` kernel: θ·(1 − γλ) − γ'·O).

This module has the NumPy class (``fastopt.Muon``, for 2-D arrays); the torch class is
``fastopt.torch.Muon``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fastopt import backends

__all__ = ["Muon", "adjust_lr", "check_muon_hypers", "newton_schulz"]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def check_muon_hypers(lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
                      ns_steps, adjust_lr_fn):
    """torch.optim.Muon's checks and messages, each naming its argument; plus types."""
    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {v!r}")
        return float(v)
    lr, weight_decay, momentum, eps = (real("lr", lr), real("weight_decay", weight_decay),
                                       real("momentum", momentum), real("eps", eps))
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr} (argument 'lr')")
    if not 0.0 <= momentum:
        raise ValueError(f"momentum should be >= 0 but is: {momentum} (argument 'momentum')")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay} "
                         "(argument 'weight_decay')")
    if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported "
                         "(argument 'adjust_lr_fn')")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    if isinstance(ns_coefficients, (str, bytes)) or not hasattr(ns_coefficients, "__len__") \
            or len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values "
                         "(argument 'ns_coefficients')")
    coefs = tuple(real(f"ns_coefficients[{i}]", c) for i, c in enumerate(ns_coefficients))
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral) or ns_steps < 0:
        raise TypeError(f"ns_steps must be a non-negative int, got {ns_steps!r}")
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational "
                         "efficiency (argument 'ns_steps')")
    return dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=bool(nesterov),
                ns_coefficients=coefs, eps=eps, ns_steps=int(ns_steps),
                adjust_lr_fn=adjust_lr_fn)


def adjust_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's γ' for a matrix of ``shape``."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, a / b))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(a, b))
    else:
        ratio = 1.0
    return lr * ratio


def _lerp(start, end, weight):
    """torch.lerp's two formulas (NumPy), as a new array."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def newton_schulz(u: np.ndarray, coefficients, steps, eps, dtype=np.float32):
    """The orthogonalised ``u`` (a new array of ``dtype``), torch's iteration."""
    a, b, c = coefficients
    x = np.array(u, dtype=dtype, copy=True)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x /= dtype(max(float(np.linalg.norm(x)), eps))
    for _ in range(steps):
        gram = x @ x.T
        update = b * gram + c * (gram @ gram)
        x = a * x + update @ x
    return x.T if tall else x


def fused_decay_update(param: np.ndarray, update: np.ndarray, lr: float, decay: float):
    """θ ← θ·decay − lr·O in one pass (the sgd kernel without momentum)."""
    flat = param.reshape(-1)
    o = np.ascontiguousarray(update, dtype=param.dtype).reshape(-1)
    ptrs = np.array([[flat.ctypes.data, o.ctypes.data, 0]], dtype=np.uintp)
    backends.DEFAULT.run_segments("sgd", param.dtype, ptrs,
                                  np.array([flat.shape[0]], dtype=np.intp),
                                  (lr, 0.0, decay, 0.0, 1.0, 0, 0, 0),
                                  backends.num_threads(), True)


class Muon:
    """``torch.optim.Muon`` for 2-D NumPy arrays (one, or a list):
    ``opt.step(grad)`` / ``opt.step([g1, g2, ...])``. ``ns_dtype``: 'float32' (the
    default) or 'float64' for the Newton–Schulz products. State per array:
    ``state['momentum_buffer']``."""

    def __init__(self, param, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                 *, ns_dtype="float32"):
        self._many = isinstance(param, (list, tuple))
        params = list(param) if self._many else [param]
        if not params:
            raise ValueError("param is an empty list: give at least one array")
        for i, p in enumerate(params):
            where = f"param[{i}]" if self._many else "param"
            if not isinstance(p, np.ndarray):
                raise TypeError(f"{where} must be a NumPy array, got {type(p).__name__}")
            if p.ndim != 2:
                raise ValueError(f"Muon only supports 2D parameters whereas we found a "
                                 f"parameter with size: {p.shape} ({where})")
            if p.dtype not in (np.float32, np.float64):
                raise TypeError(f"{where} has dtype {p.dtype}; Muon updates float32 and "
                                "float64 arrays")
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"{where} must be a writeable C-contiguous array")
        if ns_dtype not in ("float32", "float64"):
            raise ValueError(f"ns_dtype must be 'float32' or 'float64', got {ns_dtype!r} "
                             "(argument 'ns_dtype')")
        self._hp = check_muon_hypers(lr, weight_decay, momentum, nesterov, ns_coefficients,
                                     eps, ns_steps, adjust_lr_fn)
        self._ns_dtype = np.dtype(ns_dtype).type
        self._params = params
        self._states = [{} for _ in params]
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
            checked.append(g)
        hp = self._hp
        mu = hp["momentum"]
        for p, g, st in zip(self._params, checked, self._states):
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = np.zeros_like(p)
            buf[...] = _lerp(buf, g, 1.0 - mu)
            u = _lerp(g, buf, mu) if hp["nesterov"] else buf
            o = newton_schulz(u, hp["ns_coefficients"], hp["ns_steps"], hp["eps"],
                              self._ns_dtype)
            fused_decay_update(p, o, adjust_lr(hp["lr"], hp["adjust_lr_fn"], p.shape),
                               1.0 - hp["lr"] * hp["weight_decay"])
        self.step_count += 1
