"""``fastopt.torch.Muon``: ``torch.optim.Muon`` (2.13) with Newton–Schulz in float32.

Constructed like torch's (same positional order, names, defaults, checks and
messages; 2-D parameters only) plus a keyword-only ``ns_dtype``: ``torch.float32``
(the default; see ``fastopt.muon`` for why), ``torch.bfloat16`` (torch's rounding),
or ``torch.float64``. State is torch's (``momentum_buffer``): a ``state_dict`` moves
both ways. Per matrix: the momentum and Nesterov blend (torch's ``lerp``), the
Newton–Schulz iteration as BLAS products, then decay and update as one fused pass
of the ``sgd`` kernel (θ·(1 − γλ) − γ'·O) instead of torch's two.

Pair it with AdamW for the parameters that are not hidden matrices::

    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opts = [fastopt.torch.Muon(hidden, lr=0.02), fastopt.torch.AdamW(rest, lr=3e-4)]
"""

from __future__ import annotations

import numpy as np
import torch

from fastopt import backends
from fastopt.muon import NS_COEFFICIENTS, adjust_lr, check_muon_hypers
from fastopt.torch.optimizer import CheckedGroups, SparseGradientError
from fastopt.torch.optimizer import _plain as _value

__all__ = ["Muon", "zeropower_via_newtonschulz"]

_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_NS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_increment_version = torch._C._increment_version


def zeropower_via_newtonschulz(u, coefficients, steps, eps, dtype=torch.float32):
    """torch's Newton–Schulz iteration, with the products in ``dtype`` (a new tensor
    of ``dtype``, in ``u``'s shape)."""
    a, b, c = coefficients
    x = u.to(dtype, copy=True)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x



class Muon(CheckedGroups, torch.optim.Optimizer):
    """torch.optim.Muon on fastopt: Newton–Schulz in ``ns_dtype`` (float32 by
    default), decay and update fused."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                 *, ns_dtype=torch.float32):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_muon_hypers(_value(lr), weight_decay, momentum, nesterov, ns_coefficients,
                          eps, ns_steps, adjust_lr_fn)
        if ns_dtype not in _NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {_NS_DTYPES}, got {ns_dtype!r} "
                             "(argument 'ns_dtype')")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_params(group)

    @staticmethod
    def _check_params(group):
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError("Muon only supports 2D parameters whereas we found a "
                                 f"parameter with size: {p.size()}")
            if p.dtype not in _NP or p.device.type != "cpu":
                raise TypeError(f"fastopt.torch.Muon updates float32/float64 CPU tensors, "
                                f"got {p.dtype} on {p.device}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            hp = check_muon_hypers(_value(group["lr"]), group["weight_decay"],
                                   group["momentum"], group["nesterov"],
                                   _value(group["ns_coefficients"]), group["eps"],
                                   group["ns_steps"], group["adjust_lr_fn"])
            items = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param {pi} of group {gi}"
                if g.is_sparse:
                    raise SparseGradientError(f"Muon does not support sparse gradients "
                                              f"({where})")
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise ValueError(f"{where}: gradient of dtype {g.dtype}, shape "
                                     f"{tuple(g.shape)} for a parameter of dtype {p.dtype}, "
                                     f"shape {tuple(p.shape)}")
                items.append((p, g))
            work.append((hp, items))
        nthreads = backends.num_threads()
        for hp, items in work:
            mu = hp["momentum"]
            decay = 1.0 - hp["lr"] * hp["weight_decay"]
            for p, g in items:
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.zeros_like(
                        g, memory_format=torch.preserve_format)
                buf.lerp_(g, 1 - mu)
                u = g.lerp(buf, mu) if hp["nesterov"] else buf
                o = zeropower_via_newtonschulz(u, hp["ns_coefficients"], hp["ns_steps"],
                                               hp["eps"], self.ns_dtype)
                alr = adjust_lr(hp["lr"], hp["adjust_lr_fn"], p.shape)
                self._decay_update(p, o, alr, decay, nthreads)
            if items:
                _increment_version([p for p, _ in items])
        return loss

    @staticmethod
    def _decay_update(p, o, alr, decay, nthreads):
        """θ ← θ·decay − γ'·O, one pass (the sgd kernel without momentum)."""
        o = o.to(p.dtype)
        work = p if p.is_contiguous() else p.contiguous()
        o = o.contiguous() if o.stride() != work.stride() else o
        ptrs = np.array([[work.data_ptr(), o.data_ptr(), 0]], dtype=np.uintp)
        backends.DEFAULT.run_segments("sgd", _NP[p.dtype], ptrs,
                                      np.array([p.numel()], dtype=np.intp),
                                      (alr, 0.0, decay, 0.0, 1.0, 0, 0, 0), nthreads, True)
        if work is not p:
            p.copy_(work)
