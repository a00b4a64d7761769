"""fastopt.schedules against torch's LR schedulers of the same name, step by step.

torch updates its rates recursively (lr ← lr·γ, the cosine ratio), fastopt evaluates
the closed form. Each value is compared twice: bit for bit with torch's own closed form
(``_get_closed_form_lr``, evaluated at the scheduler's ``last_epoch``), and with the
rate torch's recursive ``step()`` actually set, to a relative 1e-12 (the recursion's
accumulated rounding over the steps below stays under 1e-13).
"""

import math

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

torch = pytest.importorskip("torch")
sched_mod = torch.optim.lr_scheduler

STEPS = 400


def _drive(make_torch, ours, steps=STEPS, closed=True, lr=None):
    lr = ours.lr if lr is None else lr
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ts = make_torch(opt)
    for t in range(steps):
        lr_torch = opt.param_groups[0]["lr"]
        mine = ours(t)
        assert ts.last_epoch == t
        if closed:
            assert mine == ts._get_closed_form_lr()[0], (t, mine)
        assert math.isclose(mine, lr_torch, rel_tol=1e-12, abs_tol=1e-300), (t, mine, lr_torch)
        opt.step()
        ts.step()


@pytest.mark.parametrize("lr,step_size,gamma", [(0.1, 30, 0.1), (1.0, 1, 0.5), (3e-4, 7, 0.9)])
def test_step_decay_is_steplr(lr, step_size, gamma):
    _drive(lambda o: sched_mod.StepLR(o, step_size=step_size, gamma=gamma),
           S.StepDecay(lr=lr, step_size=step_size, gamma=gamma))


@pytest.mark.parametrize("gamma", [0.99, 0.9, 1.0, math.exp(-0.01)])
def test_exponential_decay_is_exponentiallr(gamma):
    _drive(lambda o: sched_mod.ExponentialLR(o, gamma=gamma), S.ExponentialDecay(0.1, gamma))


@pytest.mark.parametrize("T_max,eta_min", [(100, 0.0), (37, 1e-3), (1, 0.0), (250, 0.05)])
def test_cosine_annealing_is_cosineannealinglr(T_max, eta_min):
    # past T_max too: both climb back along the cosine
    _drive(lambda o: sched_mod.CosineAnnealingLR(o, T_max=T_max, eta_min=eta_min),
           S.CosineAnnealing(lr=0.1, T_max=T_max, eta_min=eta_min))


@pytest.mark.parametrize("total,start,end", [(5, 1 / 3, 1.0), (50, 0.01, 1.0), (20, 1.0, 0.1)])
def test_linear_warmup_is_linearlr(total, start, end):
    _drive(lambda o: sched_mod.LinearLR(o, start_factor=start, end_factor=end,
                                        total_iters=total),
           S.LinearWarmup(lr=0.2, total_iters=total, start_factor=start, end_factor=end))


def test_warmup_then_cosine_is_sequentiallr():
    ours = S.Sequential([S.LinearWarmup(0.1, total_iters=10, start_factor=0.01),
                         S.CosineAnnealing(0.1, T_max=90, eta_min=1e-4)], milestones=[10])

    def make(o):
        warm = sched_mod.LinearLR(o, start_factor=0.01, total_iters=10)
        cos = sched_mod.CosineAnnealingLR(o, T_max=90, eta_min=1e-4)
        return sched_mod.SequentialLR(o, [warm, cos], milestones=[10])
    _drive(make, ours, steps=150, closed=False, lr=0.1)  # SequentialLR has no closed form
    assert ours(10) == 0.1 and ours(100) == pytest.approx(1e-4)


def test_inverse_time_decay_is_the_textbook_one_over_t_form():
    sched = S.InverseTimeDecay(lr=0.5, k=0.1)
    assert [sched(t) for t in (0, 10, 90)] == [0.5, 0.5 / 2.0, 0.5 / 10.0]
    assert S.InverseTimeDecay(1.0, 1e308)(2 ** 62) == 0.0  # k·t overflows: the limit


def test_huge_steps_underflow_instead_of_raising():
    assert S.ExponentialDecay(0.1, 0.5)(2 ** 63 - 1) == 0.0
    assert S.StepDecay(0.1, 1, 1e-300)(10 ** 6) == 0.0
    assert 0.0 <= S.CosineAnnealing(0.1, 7)(2 ** 62) <= 0.1


def test_drives_an_optimizer_and_accepts_numpy_ints():
    p = np.zeros(3)
    opt = fastopt.SGD(p, lr=1.0)
    sched = S.StepDecay(lr=1.0, step_size=2, gamma=0.5)
    for t in np.arange(4):
        opt.lr = sched(t)
        opt.step(np.ones(3))
    assert p.tolist() == [-(1 + 1 + 0.5 + 0.5)] * 3


@pytest.mark.parametrize("make,exc,words", [
    (lambda: S.StepDecay(lr=-0.1, step_size=3), ValueError, ["lr", "-0.1"]),
    (lambda: S.StepDecay(lr=0.1, step_size=0), ValueError, ["step_size", "0"]),
    (lambda: S.StepDecay(lr=0.1, step_size=2.5), TypeError, ["step_size", "2.5"]),
    (lambda: S.StepDecay(lr=0.1, step_size=3, gamma=1.5), ValueError, ["gamma", "1.5"]),
    (lambda: S.StepDecay(lr="0.1", step_size=3), TypeError, ["lr", "'0.1'"]),
    (lambda: S.ExponentialDecay(0.1, gamma=0.0), ValueError, ["gamma", "0.0"]),
    (lambda: S.ExponentialDecay(0.1, gamma=float("nan")), ValueError, ["gamma", "nan"]),
    (lambda: S.ExponentialDecay(float("inf"), gamma=0.9), ValueError, ["lr", "inf"]),
    (lambda: S.InverseTimeDecay(0.1, k=-1), ValueError, ["k", "-1"]),
    (lambda: S.CosineAnnealing(0.1, T_max=0), ValueError, ["T_max", "0"]),
    (lambda: S.CosineAnnealing(0.1, T_max=True), TypeError, ["T_max", "True"]),
    (lambda: S.CosineAnnealing(0.1, T_max=10, eta_min=-1e-3), ValueError, ["eta_min", "-0.001"]),
    (lambda: S.LinearWarmup(0.1, start_factor=0.0), ValueError, ["start_factor", "0.0"]),
    (lambda: S.LinearWarmup(0.1, end_factor=2), ValueError, ["end_factor", "2"]),
    (lambda: S.LinearWarmup(0.1, total_iters=-3), ValueError, ["total_iters", "-3"]),
    (lambda: S.Sequential([S.ExponentialDecay(0.1, 0.9)], [5]), ValueError, ["milestones"]),
    (lambda: S.Sequential([], []), ValueError, ["schedules"]),
    (lambda: S.Sequential([S.ExponentialDecay(0.1, 0.9), 0.1], [5]), TypeError,
     ["schedules[1]", "0.1"]),
    (lambda: S.Sequential([S.ExponentialDecay(0.1, 0.9)] * 3, [5, 5]), ValueError,
     ["milestones", "[5, 5]"]),
    (lambda: S.ExponentialDecay(0.1, 0.9)(-1), ValueError, ["step", "-1"]),
    (lambda: S.ExponentialDecay(0.1, 0.9)(1.0), TypeError, ["step", "1.0"]),
    (lambda: S.ExponentialDecay(0.1, 0.9)(2 ** 70), ValueError, ["step", str(2 ** 70)]),
])
def test_bad_arguments_name_the_argument_and_value(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value)
