"""Learning-rate schedules: cheap callables of the step count for NumPy training loops.

    sched = fastopt.schedules.StepDecay(lr=0.1, step_size=30, gamma=0.1)
    for step in range(n_steps):
        opt.lr = sched(step)          # a float; the optimizer validates it as usual
        opt.step(grad(...))

``sched(t)`` is the learning rate after ``t`` calls of the torch scheduler of the same
name (``t = 0`` is the starting rate), in closed form: each call is a few float
operations and does not depend on earlier calls, so a loop can start anywhere (a
resumed checkpoint passes its ``step_count``). torch's schedulers update the rate
recursively (``lr ← lr·γ`` each epoch), which drifts from the closed form by a few ulps
over thousands of steps; the values here equal torch's ``_get_closed_form_lr``.

The forms of Stanford's CS231n notes (section "annealing the learning rate"):

* step decay: multiply by γ every ``step_size`` steps (:class:`StepDecay`, torch's StepLR);
* exponential decay ``α = α0·e^(−kt)``: :class:`ExponentialDecay` with ``gamma = e^(−k)``
  (torch's ExponentialLR writes it ``α0·γ^t``);
* 1/t decay ``α = α0 / (1 + kt)``: :class:`InverseTimeDecay` (no torch twin).

Also cosine annealing (:class:`CosineAnnealing`, torch's CosineAnnealingLR), linear
warm-up (:class:`LinearWarmup`, torch's LinearLR) and :class:`Sequential` (torch's
SequentialLR) to run one after another, e.g. warm-up then cosine::

    sched = Sequential([LinearWarmup(lr=1e-3, total_iters=100, start_factor=0.01),
                        CosineAnnealing(lr=1e-3, T_max=900)], milestones=[100])
"""

from __future__ import annotations

import bisect
import math
import numbers

__all__ = ["Schedule", "StepDecay", "ExponentialDecay", "InverseTimeDecay",
           "CosineAnnealing", "LinearWarmup", "Sequential"]

# Python ints are unbounded; a step count this large is a corrupted counter, and
# float(step) would overflow further up
_MAX_STEP = 2 ** 63


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _int(name, value, lowest):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not lowest <= value < _MAX_STEP:
        raise ValueError(f"{name} must be an int in [{lowest}, 2**63), got {value}")
    return value


def _lr(value, name="lr"):
    value = _real(name, value)
    if not value >= 0.0:
        raise ValueError(f"Invalid learning rate: {value} (argument '{name}')")
    return value


class Schedule:
    """Base: ``sched(step)`` checks ``step`` (an int ≥ 0) and returns ``value(step)``."""

    def __call__(self, step) -> float:
        if type(step) is not int:  # the common case costs one type check
            step = _int("step", step, 0)
        elif not 0 <= step < _MAX_STEP:
            raise ValueError(f"step must be an int in [0, 2**63), got {step}")
        return self.value(step)

    def value(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class StepDecay(Schedule):
    r"""Multiply the rate by ``gamma`` every ``step_size`` steps (torch's StepLR).

    .. math:: \alpha_t = \alpha_0 \, \gamma^{\lfloor t / s \rfloor}

    with α0 = ``lr``, γ = ``gamma`` in (0, 1], s = ``step_size`` ≥ 1.
    """

    def __init__(self, lr, step_size, gamma=0.1):
        self.lr = _lr(lr)
        self.step_size = _int("step_size", step_size, 1)
        self.gamma = _real("gamma", gamma)
        # γ ≤ 1 keeps γ^k from overflowing at any step (it underflows to 0 instead)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (a decay factor), got {self.gamma}")

    def value(self, t):
        return self.lr * self.gamma ** (t // self.step_size)


class ExponentialDecay(Schedule):
    r"""Multiply the rate by ``gamma`` every step (torch's ExponentialLR).

    .. math:: \alpha_t = \alpha_0 \, \gamma^t

    CS231n writes it α0·e^(−kt): pass ``gamma = math.exp(-k)``. γ in (0, 1].
    """

    def __init__(self, lr, gamma):
        self.lr = _lr(lr)
        self.gamma = _real("gamma", gamma)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (a decay factor), got {self.gamma}")

    def value(self, t):
        return self.lr * self.gamma ** t


class InverseTimeDecay(Schedule):
    r"""1/t decay of the CS231n notes (no torch scheduler has it).

    .. math:: \alpha_t = \frac{\alpha_0}{1 + k t}

    with α0 = ``lr`` and k = ``k`` ≥ 0.
    """

    def __init__(self, lr, k):
        self.lr = _lr(lr)
        self.k = _real("k", k)
        if not self.k >= 0.0:
            raise ValueError(f"k must be >= 0, got {self.k}")

    def value(self, t):
        # k·t may round to inf for a huge k: α0/inf = 0, the limit
        return self.lr / (1.0 + self.k * t)


class CosineAnnealing(Schedule):
    r"""Cosine annealing from ``lr`` to ``eta_min`` over ``T_max`` steps
    (torch's CosineAnnealingLR, closed form).

    .. math:: \alpha_t = \eta_{min} + \tfrac12(\alpha_0 - \eta_{min})
              \left(1 + \cos\frac{\pi t}{T_{max}}\right)

    Past ``T_max`` the cosine goes on, so the rate climbs back to ``lr`` at 2·T_max, as
    torch's does; stop calling it (or use :class:`Sequential`) to hold ``eta_min``.
    """

    def __init__(self, lr, T_max, eta_min=0.0):
        self.lr = _lr(lr)
        self.T_max = _int("T_max", T_max, 1)
        self.eta_min = _real("eta_min", eta_min)
        if not self.eta_min >= 0.0:
            raise ValueError(f"eta_min must be >= 0, got {self.eta_min}")

    def value(self, t):
        # torch's operation order, so that the bits agree with its closed form
        return (self.eta_min + (self.lr - self.eta_min)
                * (1 + math.cos(math.pi * t / self.T_max)) / 2)


class LinearWarmup(Schedule):
    r"""Linear ramp of the factor from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then constant (torch's LinearLR, same defaults).

    .. math:: \alpha_t = \alpha_0 \left(f_0 + (f_1 - f_0)
              \frac{\min(t, T)}{T}\right)

    f0 = ``start_factor`` in (0, 1], f1 = ``end_factor`` in [0, 1], T = ``total_iters``.
    """

    def __init__(self, lr, total_iters=5, start_factor=1.0 / 3, end_factor=1.0):
        self.lr = _lr(lr)
        self.total_iters = _int("total_iters", total_iters, 1)
        self.start_factor = _real("start_factor", start_factor)
        self.end_factor = _real("end_factor", end_factor)
        # torch's bounds (a zero start factor would divide by zero in its recursion)
        if not 0.0 < self.start_factor <= 1.0:
            raise ValueError(f"start_factor must be in (0, 1], got {self.start_factor}")
        if not 0.0 <= self.end_factor <= 1.0:
            raise ValueError(f"end_factor must be in [0, 1], got {self.end_factor}")

    def value(self, t):
        return self.lr * (self.start_factor + (self.end_factor - self.start_factor)
                          * min(self.total_iters, t) / self.total_iters)


class Sequential(Schedule):
    """Run ``schedules[i]`` from ``milestones[i-1]`` on, each restarted at its own
    step 0 (torch's SequentialLR): ``sched(t) = schedules[i](t − milestones[i−1])``
    with i the number of milestones ≤ t.
    """

    def __init__(self, schedules, milestones):
        if isinstance(schedules, Schedule) or not isinstance(schedules, (list, tuple)):
            raise TypeError(f"schedules must be a list of schedules, got {schedules!r}")
        if not schedules:
            raise ValueError("schedules must not be empty")
        for i, s in enumerate(schedules):
            if not isinstance(s, Schedule):
                raise TypeError(f"schedules[{i}] must be a fastopt.schedules.Schedule, "
                                f"got {s!r}")
        if not isinstance(milestones, (list, tuple)):
            raise TypeError(f"milestones must be a list of ints, got {milestones!r}")
        milestones = [_int(f"milestones[{i}]", m, 1) for i, m in enumerate(milestones)]
        if len(milestones) != len(schedules) - 1:
            raise ValueError(f"milestones must have len(schedules) - 1 = "
                             f"{len(schedules) - 1} entries, got {milestones}")
        if any(a >= b for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        self.schedules = tuple(schedules)
        self.milestones = tuple(milestones)

    def value(self, t):
        i = bisect.bisect_right(self.milestones, t)
        return self.schedules[i].value(t - self.milestones[i - 1] if i else t)
