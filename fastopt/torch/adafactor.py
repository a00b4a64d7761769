"""``fastopt.torch.Adafactor``: ``torch.optim.Adafactor`` (2.13) on fastopt's factored
passes (``fastopt.adafactor``): the same constructor (``foreach`` and ``maximize``
keyword-only), checks, messages and state (``step`` a 0-dim tensor as torch keeps it,
``row_var``/``col_var`` of torch's shapes, or ``variance``), so a ``state_dict``
moves both ways. Three passes per matrix instead of about ten."""

from __future__ import annotations

import numpy as np
import torch

from fastopt import backends
from fastopt.adafactor import adafactor_step, check_adafactor_hypers
from fastopt.torch.optimizer import CheckedGroups, SparseGradientError, _scalar_dtype
from fastopt.torch.optimizer import _plain as _value

__all__ = ["Adafactor"]

_FLOAT = (torch.float32, torch.float64)
_increment_version = torch._C._increment_version




class Adafactor(CheckedGroups, torch.optim.Optimizer):
    """torch.optim.Adafactor on fastopt's factored passes."""

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_adafactor_hypers(_value(lr), beta2_decay, eps, d, weight_decay, maximize)
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, foreach=foreach,
                                      maximize=maximize))
        for group in self.param_groups:
            self._check_params(group)

    @staticmethod
    def _check_params(group):
        for p in group["params"]:
            if p.dtype not in _FLOAT or p.device.type != "cpu":
                raise TypeError(f"fastopt.torch.Adafactor updates float32/float64 CPU "
                                f"tensors, got {p.dtype} on {p.device}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            hp = check_adafactor_hypers(_value(group["lr"]), group["beta2_decay"],
                                        _value(group["eps"]), group["d"],
                                        group["weight_decay"], group.get("maximize", False))
            items = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param {pi} of group {gi}"
                if g.is_sparse:
                    raise SparseGradientError(f"Adafactor does not support sparse "
                                              f"gradients ({where})")
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise ValueError(f"{where}: gradient of dtype {g.dtype}, shape "
                                     f"{tuple(g.shape)} for a parameter of dtype {p.dtype}, "
                                     f"shape {tuple(p.shape)}")
                st = self.state.get(p)
                if st:
                    for k in ("row_var", "col_var", "variance"):
                        v = st.get(k)
                        if v is not None and (v.dtype != p.dtype or not v.is_contiguous()):
                            raise ValueError(f"{where}: state {k!r} must be a contiguous "
                                             f"{p.dtype} tensor")
                items.append((p, g))
            work.append((hp, items))
        nthreads = backends.num_threads()
        for hp, items in work:
            for p, g in items:
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    if g.dim() > 1:
                        row, col = list(g.shape), list(g.shape)
                        row[-1] = 1
                        col[-2] = 1
                        st["row_var"] = g.new_zeros(row)
                        st["col_var"] = g.new_zeros(col)
                    else:
                        st["variance"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                st["step"] += 1
                t = st["step"].item()
                work_p = p if p.is_contiguous() else p.contiguous()
                arrays = {k: st[k].numpy() for k in ("row_var", "col_var", "variance")
                          if k in st}
                adafactor_step(work_p.numpy(), g.contiguous().numpy(), arrays, hp, t,
                               nthreads)
                if work_p is not p:
                    p.copy_(work_p)
            if items:
                _increment_version([p for p, _ in items])
        return loss
