"""``fastopt.torch.AdamWScheduleFree`` and ``SGDScheduleFree``: the ``schedulefree``
package's (1.4.1) optimizers on fastopt's fused kernel.

Same constructor (positional order, names, defaults), same ``train()``/``eval()``
protocol (the parameters hold y in train mode, x in eval mode; ``step`` in eval
mode is an error), same param-group keys (``k``, ``train_mode``, ``weight_sum``,
``lr_max``, ``scheduled_lr``, ...) and per-parameter state (``z``, and AdamW's
``exp_avg_sq``): a ``state_dict`` moves both ways between these classes and the
package's. One step is one pass of the ``schedulefree`` kernel over every tensor of
a (group, dtype): y, z and v read and written once, the gradient read once (the
package also divides the gradient in place; fastopt leaves it as it was).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from fastopt import backends
from fastopt.rules import RULES
from fastopt.schedulefree import ScheduleFreeModeError
from fastopt.torch.optimizer import _plain as _value

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "ScheduleFreeModeError"]

_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_increment_version = torch._C._increment_version



class _ScheduleFree(torch.optim.Optimizer):
    _row: str            # the registry rule of the train-mode step
    _beta1_key: str      # 'betas' (AdamW: β1 = betas[0]) or 'momentum' (SGD)

    def __init__(self, params, defaults):
        self._rule = RULES[self._row]
        self._hypers_of(defaults)  # the registry's checks, naming the argument
        super().__init__(params, defaults)
        for group in self.param_groups:
            for k, p in enumerate(group["params"]):
                self._check_param(p, f"param {k} of the group")

    # -- checks ------------------------------------------------------------------
    def _hypers_of(self, group) -> dict:
        rule = self._rule
        return rule.check_hypers({h.name: _value(group[h.name]) for h in rule.hypers})

    @staticmethod
    def _check_param(p, where):
        if p.dtype not in _NP:
            raise TypeError(f"{where} has dtype {p.dtype}; fastopt.torch updates float32 "
                            "and float64 parameters")
        if p.layout != torch.strided:
            raise TypeError(f"{where} is a {p.layout} tensor; fastopt updates dense "
                            "parameters")
        if p.device.type != "cpu":
            raise ValueError(f"{where} is on device {p.device}; fastopt.torch's "
                             "schedule-free optimizers run on CPU tensors")

    def add_param_group(self, param_group):
        explicit = isinstance(param_group, dict) and "train_mode" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not explicit and len(self.param_groups) > 1:
            # its parameters have no z yet: the mode is a flag, the optimizer's mode
            # (the package leaves it False, and steps it anyway as it checks group 0)
            group["train_mode"] = self.param_groups[0]["train_mode"]
        try:
            self._hypers_of(group)
            for k, p in enumerate(group["params"]):
                self._check_param(p, f"param {k} of the group")
        except Exception:
            self.param_groups.pop()
            raise

    def _beta1(self, group) -> float:
        v = _value(group[self._beta1_key])
        return float(v[0] if isinstance(v, tuple) else v)

    # -- the protocol ----------------------------------------------------------------
    @torch.no_grad()
    def eval(self):
        """Parameters to x, the average (evaluate and checkpoint there)."""
        for group in self.param_groups:
            if group["train_mode"]:
                w = 1.0 - 1.0 / self._beta1(group)
                for p in group["params"]:
                    z = self.state.get(p, {}).get("z")
                    if z is not None:
                        p.lerp_(end=z.to(p.device), weight=w)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        """Parameters to y, where the gradient is taken."""
        for group in self.param_groups:
            if not group["train_mode"]:
                w = 1.0 - self._beta1(group)
                for p in group["params"]:
                    z = self.state.get(p, {}).get("z")
                    if z is not None:
                        p.lerp_(end=z.to(p.device), weight=w)
                group["train_mode"] = True

    # -- the step --------------------------------------------------------------------
    def _patch_step_function(self) -> None:
        # torch wraps step() for its hooks and profiler label at ~10 us a call;
        # step() goes through that wrapper only when one is in use
        self._zero_grad_profile_name = (
            f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad")

    def step(self, closure=None):
        """One training step (train mode only); returns the closure's loss."""
        if (_GLOBAL_PRE or _GLOBAL_POST or self._optimizer_step_pre_hooks or
                self._optimizer_step_post_hooks or torch.autograd._profiler_enabled()):
            return _hooked_step(self, closure)
        return self._step(closure)

    def _hypers_cached(self, group) -> dict:
        raw = tuple(group[h.name] for h in self._rule.hypers)
        cache = self.__dict__.setdefault("_hp_cache", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] is group and hit[1] == raw:
            return hit[2]
        hp = self._hypers_of(group)
        if not any(isinstance(v, (torch.Tensor, list)) for v in raw):
            cache[id(group)] = (group, raw, hp)
        return hp

    @torch.no_grad()
    def _step(self, closure=None):
        for gi, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise ScheduleFreeModeError(
                    f"{type(self).__name__}.step() with param group {gi} in eval mode: "
                    "call opt.train() before training steps (and opt.eval() before "
                    "evaluating or saving)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # check every group before writing anything
        work = []
        for gi, group in enumerate(self.param_groups):
            hp = self._hypers_cached(group)
            k = int(group["k"])
            args, new = self._rule.plan(hp, k + 1, {"weight_sum": float(group["weight_sum"]),
                                                     "lr_max": float(group["lr_max"])}, False)
            args = args[:-1] + (0,)  # z exists (a copy of y made with the state)
            members = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param {pi} of group {gi}"
                self._check_param(p, where)
                if g.layout != torch.strided:
                    raise TypeError(f"{where} has a {g.layout} gradient; "
                                    f"{type(self).__name__} takes dense gradients")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"{where}: gradient of dtype {g.dtype}, shape "
                                     f"{tuple(g.shape)} on {g.device} for a parameter of "
                                     f"dtype {p.dtype}, shape {tuple(p.shape)}")
                members.append(p)
            work.append((group, hp, k, args, new, members))
        nthreads = backends.num_threads()
        be = backends.DEFAULT
        adam = self._row == "ScheduleFreeAdamW"
        for group, hp, k, args, new, members in work:
            lr = hp["lr"] * ((k + 1) / hp["warmup_steps"] if k < hp["warmup_steps"] else 1.0)
            by_dtype: dict = {}
            post = []
            for p in members:
                st = self.state[p]
                if "z" not in st:
                    st["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
                    if adam:
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs = [st["z"]] + ([st["exp_avg_sq"]] if adam else [])
                tensors = [p, p.grad] + bufs
                if not all(t.is_contiguous() for t in tensors):
                    # the kernel walks memory in order: step contiguous copies
                    work_t = [t.contiguous() for t in tensors]
                    post += [(t, w) for t, w in zip(tensors, work_t)
                             if w is not t and t is not p.grad]
                    tensors = work_t
                for b in bufs:
                    if b.dtype != p.dtype or b.shape != p.shape:
                        raise ValueError(f"state of a parameter of shape {tuple(p.shape)}, "
                                         f"dtype {p.dtype} holds {tuple(b.shape)}, {b.dtype}")
                row = [t.data_ptr() for t in tensors] + [0] * (4 - len(tensors))
                if p.numel():
                    by_dtype.setdefault(p.dtype, ([], [], []))
                    by_dtype[p.dtype][0].append(row)
                    by_dtype[p.dtype][1].append(p.numel())
                    by_dtype[p.dtype][2].append(tensors)
            for dtype, (rows, lengths, keep) in by_dtype.items():
                be.run_segments("schedulefree", _NP[dtype], np.array(rows, dtype=np.uintp),
                                np.array(lengths, dtype=np.intp), args, nthreads, True)
            for dst, src in post:
                dst.copy_(src)
            if members:
                _increment_version(members)
            group["k"] = k + 1
            group["scheduled_lr"] = lr
            group["weight_sum"] = new["weight_sum"]
            group["lr_max"] = new["lr_max"]
        return loss


_GLOBAL_PRE = _torch_optimizer._global_optimizer_pre_hooks
_GLOBAL_POST = _torch_optimizer._global_optimizer_post_hooks
_hooked_step = torch.optim.Optimizer.profile_hook_step(_ScheduleFree._step)


class AdamWScheduleFree(_ScheduleFree):
    """Schedule-free AdamW (``schedulefree.AdamWScheduleFree``) on fastopt's fused
    kernel. Call ``train()`` before training steps and ``eval()`` before evaluating
    or saving."""

    _row = "ScheduleFreeAdamW"
    _beta1_key = "betas"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0,
                 foreach=hasattr(torch, "_foreach_mul_")):
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps,
                        train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                        foreach=foreach)
        super().__init__(params, defaults)


class SGDScheduleFree(_ScheduleFree):
    """Schedule-free SGD (``schedulefree.SGDScheduleFree``) on fastopt's fused
    kernel. Call ``train()`` before training steps and ``eval()`` before evaluating
    or saving."""

    _row = "ScheduleFreeSGD"
    _beta1_key = "momentum"

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0,
                 r=0.0, weight_lr_power=2, foreach=hasattr(torch, "_foreach_mul_")):
        defaults = dict(lr=lr, momentum=momentum, r=r, k=0, warmup_steps=warmup_steps,
                        train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                        foreach=foreach)
        super().__init__(params, defaults)
