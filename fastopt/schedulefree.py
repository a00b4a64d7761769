"""Schedule-free AdamW and SGD (Defazio et al. 2024, The Road Less Scheduled) for
NumPy arrays, with the ``schedulefree`` package's names, defaults and
``train()``/``eval()`` protocol.

Schedule-free keeps two sequences: z (the plain AdamW/SGD iterate) and x (a running
average of z, the point to evaluate and checkpoint). The gradient is taken at
y = lerp(x, z, 1 − β1). The parameter array holds y in train mode and x in eval
mode; z is stored (``state['z']``), x is never stored: ``eval()`` turns y into x and
``train()`` turns x back into y, each one pass over the arrays. ``step`` is the
registry rule ``ScheduleFreeAdamW``/``ScheduleFreeSGD`` (one fused kernel pass over
y, z and AdamW's v), and it refuses to run in eval mode, as the package does.

    opt = fastopt.AdamWScheduleFree(params, lr=2.5e-3, warmup_steps=100)
    opt.train()
    for ...:
        opt.step(grads)
    opt.eval()            # params now hold x: evaluate, save
"""

from __future__ import annotations

import numpy as np

from fastopt.optimizers import OPTIMIZERS

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "ScheduleFreeModeError"]


class ScheduleFreeModeError(RuntimeError, ValueError):
    """``step()`` in eval mode: the arrays hold x, the gradient must be taken at y.
    (The schedulefree package raises a plain Exception; this is also a RuntimeError
    and a ValueError.)"""


class _Protocol:
    """train()/eval() over a registry class whose step is the train-mode update."""

    _beta1_name: str

    def _init_mode(self):
        self.__dict__["train_mode"] = False

    def _beta1(self) -> float:
        v = self._hp[self._beta1_name]
        return v[0] if isinstance(v, tuple) else v

    def _lerp_all(self, weight):
        if self.step_count == 0:
            return  # z does not exist yet (it starts as a copy of y at step 1)
        for p, st in zip(self._params, self._states):
            z = st["z"]
            if not isinstance(p, np.ndarray):
                raise TypeError(f"{type(self).__name__}.train()/eval() run on host arrays")
            # torch.lerp's two formulas, so that x and y match the package's bits
            if abs(weight) < 0.5:
                p += weight * (z - p)
            else:
                p[...] = z - (z - p) * (1.0 - weight)

    def train(self):
        """Parameters to y (where the gradient is taken). No-op in train mode."""
        if not self.train_mode:
            self._lerp_all(1.0 - self._beta1())
            self.__dict__["train_mode"] = True
        return self

    def eval(self):
        """Parameters to x (the average: evaluate and checkpoint here). No-op in
        eval mode."""
        if self.train_mode:
            self._lerp_all(1.0 - 1.0 / self._beta1())
            self.__dict__["train_mode"] = False
        return self

    def step(self, grad):
        if not self.train_mode:
            raise ScheduleFreeModeError(
                f"{type(self).__name__}.step() in eval mode: call opt.train() before "
                "training steps (and opt.eval() before evaluating or saving)")
        super().step(grad)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["train_mode"] = bool(self.train_mode)
        return sd

    def load_state_dict(self, state_dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        mode = sd.pop("train_mode", False)
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"state_dict['train_mode'] must be a bool, got {mode!r}")
        super().load_state_dict(sd)
        self.__dict__["train_mode"] = bool(mode)


class AdamWScheduleFree(_Protocol, OPTIMIZERS["ScheduleFreeAdamW"]):
    """Schedule-free AdamW: ``schedulefree.AdamWScheduleFree``'s signature and
    defaults over NumPy arrays (one array, a list, or FlatParams). Starts in eval
    mode: call ``train()`` before stepping."""

    _beta1_name = "betas"

    def __init__(self, param, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, *, backend=None):
        super().__init__(param, backend=backend, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                         weight_lr_power=weight_lr_power)
        self._init_mode()


class SGDScheduleFree(_Protocol, OPTIMIZERS["ScheduleFreeSGD"]):
    """Schedule-free SGD: ``schedulefree.SGDScheduleFree``'s signature and defaults
    over NumPy arrays. Starts in eval mode: call ``train()`` before stepping."""

    _beta1_name = "momentum"

    def __init__(self, param, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0,
                 r=0.0, weight_lr_power=2, *, backend=None):
        super().__init__(param, backend=backend, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                         weight_lr_power=weight_lr_power)
        self._init_mode()
