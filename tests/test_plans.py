"""The per-step plans (fastopt.rules, ``Rule.plan``) under extreme but accepted inputs.

Every rule's hyperparameters are drawn from a table of extremes (0, the smallest
subnormal, 1 − 2⁻⁵³, 1e300, the largest double, inf, …), one at a time and in random
combinations; every combination the checks accept is run from several step counts
(1, 2³¹, 2⁶² loaded from a state_dict) and scalar states, through the class and
through the functional call. A step may raise TypeError/ValueError only, and the two
APIs must agree bit for bit (NaN where NaN). Python's float ``**`` raises
OverflowError and ``/ 0.0`` ZeroDivisionError: this is where such a plan shows up.
"""

import itertools
import math
import random

import numpy as np
import pytest

import fastopt
from fastopt.rules import RULES

REALS = [0.0, 5e-324, 1e-300, 1e-8, 0.5, 1.0 - 2.0 ** -53, 1.0, 2.0, 1e6, 1e300,
         1.7976931348623157e308, math.inf]
PAIR_VALUES = [0.0, 5e-324, 0.5, 0.9, 1.0 - 2.0 ** -53, 1.0, 1.2, 50.0, 1e300, math.inf]
START_STEPS = [0, 1, 2 ** 31, 2 ** 62]
SCALARS = {"mu_product": [1.0, 0.0, 5e-324, 0.5, 1.0 - 2.0 ** -53],
           "eta": [0.0, 5e-324, 1e-2, 1e300, 1.7976931348623157e308],
           "mu": [1.0, 0.0, 5e-324, 0.5],
           "weight_sum": [0.0, 5e-324, 1.0, 1e300, 1.7976931348623157e308],
           "lr_max": [-1.0, 0.0, 1e-3, 1e300, 1.7976931348623157e308]}
N = 4


def _candidates(hyper):
    if hyper.kind == "flag":
        return [False, True]
    if hyper.kind == "pair":
        return list(itertools.product(PAIR_VALUES, repeat=2))
    return REALS


def _accepted(rule, overrides):
    try:
        return rule.check_hypers({**rule.defaults, **overrides})
    except (TypeError, ValueError):
        return None


def _hyperparameter_sets(rule, n_random=40, seed=0):
    """Defaults with one hyperparameter at an extreme, then random combinations."""
    out = []
    for h in rule.hypers:
        for v in _candidates(h):
            hp = _accepted(rule, {h.name: v})
            if hp is not None:
                out.append(hp)
    rng = random.Random(f"{rule.name}-{seed}")
    for _ in range(n_random):
        hp = _accepted(rule, {h.name: rng.choice(_candidates(h)) for h in rule.hypers})
        if hp is not None:
            out.append(hp)
    return out


def _outcome(fn):
    """(None, None) when fn() ran; (type, message) for TypeError/ValueError; anything
    else propagates and fails the test."""
    try:
        fn()
        return None, None
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)


def _run_both(rule, hp, start, scalars, grad):
    """Two steps from step count ``start`` through the class and the functional call;
    returns both outcomes and both final (param, buffers)."""
    cls = fastopt.OPTIMIZERS[rule.name]
    fn = getattr(fastopt.functional, rule.name.lower())
    p0 = np.linspace(-1.5, 2.0, N)
    opt = cls(p0.copy(), **hp)
    if start:
        sd = opt.state_dict()
        sd["step"], sd["scalars"] = start, dict(scalars)
        opt.load_state_dict(sd)
    bufs = {b.name: (opt.state[b.name].copy() if b.name in opt.state else None)
            for b in rule.buffers}

    def run_class():
        opt.step(grad)
        opt.step(-grad)

    param = p0.copy()
    state = {"scalars": dict(scalars) if start else {}}

    def run_functional():
        for k, g in enumerate((grad, -grad)):
            state["scalars"] = fn(param, g, **bufs, step=start + 1 + k, **hp,
                                  **state["scalars"])

    return (_outcome(run_class), _outcome(run_functional),
            (opt.param, opt.state), (param, bufs))


@pytest.mark.parametrize("name", list(RULES))
def test_every_plan_survives_extreme_accepted_inputs(name):
    rule = RULES[name]
    grad = np.array([1.0, -1e300, 0.0, 3.0])
    ran = 0
    for hp in _hyperparameter_sets(rule):
        for start in START_STEPS:
            scalar_sets = [dict(zip([n for n, _ in rule.scalars], vs)) for vs in
                           zip(*[SCALARS[n] for n, _ in rule.scalars])] or [{}]
            for scalars in (scalar_sets if start else [{}]):
                got_cls, got_fn, (p_cls, s_cls), (p_fn, s_fn) = _run_both(
                    rule, hp, start, scalars, grad)
                assert got_cls == got_fn, (hp, start, scalars, got_cls, got_fn)
                assert got_cls == (None, None), (hp, start, scalars, got_cls)
                np.testing.assert_array_equal(p_cls, p_fn, err_msg=f"{hp} {start}")
                for b, buf in s_fn.items():
                    if buf is not None:
                        np.testing.assert_array_equal(s_cls[b], buf, err_msg=b)
                ran += 1
    assert ran >= 4 * len(rule.hypers)  # the table really was run


def test_asgd_huge_alpha_matches_torch_tensor_arithmetic():
    # (1 + λγt)^α overflows: torch's foreach (tensor) path gives η = γ/inf = 0 after
    # the first step; its single-tensor path raises OverflowError (not copied)
    torch = pytest.importorskip("torch")
    p_t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    # eta, mu live in tensors of the default dtype: float64 to compare bits
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        topt = torch.optim.ASGD([p_t], lr=0.01, alpha=1e300, foreach=True)
        p = np.ones(3)
        opt = fastopt.ASGD(p, lr=0.01, alpha=1e300)
        for k in range(3):
            g = np.array([1.0, -2.0, 0.5]) * (k + 1)
            p_t.grad = torch.from_numpy(g.copy())
            topt.step()
            opt.step(g)
            # torch fuses a + αb into one FMA, fastopt does not: 1 ulp (README)
            np.testing.assert_allclose(p, p_t.detach().numpy(), rtol=1e-15, atol=0)
            assert opt.state_dict()["scalars"]["eta"] == topt.state[p_t]["eta"].item() == 0.0
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("rule,scalars,word", [
    ("NAdam", {"mu_product": 1.5}, "mu_product"),
    ("NAdam", {"mu_product": -0.1}, "mu_product"),
    ("NAdam", {"mu_product": math.inf}, "mu_product"),
    ("ASGD", {"eta": -1.0, "mu": 1.0}, "eta"),
    ("ASGD", {"eta": math.inf, "mu": 1.0}, "eta"),
    ("ASGD", {"eta": 0.01, "mu": 2.0}, "mu"),
])
def test_unreachable_scalar_state_is_refused(rule, scalars, word):
    cls = fastopt.OPTIMIZERS[rule]
    p = np.zeros(N)
    opt = cls(p)
    opt.step(np.ones(N))
    sd = opt.state_dict()
    before = (p.copy(), opt.state_dict())
    sd["scalars"] = {**sd["scalars"], **scalars}
    with pytest.raises(ValueError, match=word):
        opt.load_state_dict(sd)
    np.testing.assert_array_equal(p, before[0])
    assert opt.state_dict()["scalars"] == before[1]["scalars"]
    fn = getattr(fastopt.functional, rule.lower())
    bufs = [np.zeros(N) for b in RULES[rule].buffers if b.needed(RULES[rule].defaults)]
    with pytest.raises(ValueError, match=word):
        fn(p, np.ones(N), *bufs, step=2, **sd["scalars"])
    np.testing.assert_array_equal(p, before[0])


@pytest.mark.parametrize("hp,name", [({"lr": math.inf}, "lr"), ({"lambd": math.inf}, "lambd")])
def test_asgd_refuses_inputs_whose_eta_would_be_nan(hp, name):
    # γ = inf: η = inf/inf; λ = inf with γ = 0: λγt = inf·0 (torch: NaN parameters)
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        fastopt.ASGD(np.zeros(N), **hp)
    opt = fastopt.ASGD(np.zeros(N))
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        setattr(opt, name, math.inf)
    assert opt.hyperparameters[name] != math.inf


def test_step_counts_beyond_2_63_are_refused():
    p = np.zeros(N)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        fastopt.functional.adam(p, np.ones(N), np.zeros(N), np.zeros(N), step=2 ** 63)
    opt = fastopt.Adam(p)
    opt.step(np.ones(N))
    sd = opt.state_dict()
    sd["step"] = 10 ** 400  # float(10**400) would overflow in the plan
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    assert opt.step_count == 1
