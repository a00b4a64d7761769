"""fastopt.torch with bf16 and fp16 parameters: float32 arithmetic, state in the
parameter's dtype, each stored value rounded once (to nearest even, or
stochastically with bf16_stochastic_round=True)."""

import copy

import pytest
import torch
from torch import nn

import fastopt
import fastopt.torch as fot
from fastopt.rules import RULES
from tests.cases import CUDA_CASES

HALF = {"bf16": torch.bfloat16, "f16": torch.float16}


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 97), nn.Tanh(), nn.Linear(97, 3)).to(dtype)


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name,kw", CUDA_CASES)
def test_each_step_is_float32_math_rounded_once(name, kw, half):
    """Bitwise: a half-precision step equals the float32 step of the same values
    (parameters, gradients, state widened exactly) rounded to the half type."""
    dtype = HALF[half]
    model = _model(dtype)
    opt = getattr(fot, name)(model.parameters(), **kw)
    hp = {**RULES[name].defaults, **kw}
    # a buffer that starts at a non-zero value (Rprop's step sizes = lr) starts
    # rounded to the half type: the float32 twin's first step starts elsewhere
    first = 0 if all(b.fill(hp) == 0 for b in RULES[name].buffers) else 1
    for step in range(4):
        _grads(model, step)
        wide = copy.deepcopy(model).float()
        wide_opt = getattr(fot, name)(wide.parameters(), **kw)
        for p, q in zip(model.parameters(), wide.parameters()):
            q.grad = p.grad.float()
        sd = opt.state_dict()
        sd["state"] = {k: {n: (v.float() if v.dim() else v.clone()) for n, v in s.items()}
                       for k, s in sd["state"].items()}
        wide_opt.load_state_dict(sd)
        opt.step()
        wide_opt.step()
        if step < first:
            continue
        for p, q in zip(model.parameters(), wide.parameters()):
            assert torch.equal(p.detach(), q.detach().to(dtype)), (name, step)
            for n, v in opt.state[p].items():
                if v.dim():
                    assert v.dtype == dtype, n
                    assert torch.equal(v, wide_opt.state[q][n].to(dtype)), (name, n, step)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_matches_torch_fused_within_one_ulp_per_step(name, half):
    dtype = HALF[half]
    ours, theirs = _model(dtype), _model(dtype)
    kw = dict(lr=1e-2, weight_decay=0.1)
    o1 = getattr(fot, name)(ours.parameters(), **kw)
    o2 = getattr(torch.optim, name)(theirs.parameters(), fused=True, **kw)
    mant = 7 if dtype == torch.bfloat16 else 10
    for step in range(10):
        _grads(theirs, step)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.grad = q.grad.clone()
        o1.step()
        o2.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            a, b = p.detach().float(), q.detach().float()
            big = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
            spacing = torch.exp2(torch.floor(torch.log2(big)) - mant)
            assert ((a - b).abs() <= spacing).all(), (name, step)
            p.data.copy_(q.data)  # one step at a time: start each from torch's
            for n, v in o2.state[q].items():
                if v.dim():
                    o1.state[p][n].copy_(v)


def _sr_run(nthreads, seed=0, steps=6):
    old = fastopt.get_num_threads()
    fastopt.set_num_threads(nthreads)
    try:
        torch.manual_seed(seed)
        p = nn.Parameter(torch.randn(70001).to(torch.bfloat16))
        opt = fot.AdamW([p], lr=1e-4, bf16_stochastic_round=True)
        for step in range(steps):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype)
            opt.step()
        return p.detach().clone(), opt
    finally:
        fastopt.set_num_threads(old)


def test_stochastic_rounding_is_reproducible_and_thread_independent():
    a, opt = _sr_run(1)
    b, _ = _sr_run(2)
    c, _ = _sr_run(2)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert "sr_seed" in opt.state_dict()["param_groups"][0]
    d, _ = _sr_run(2, seed=1)   # another seed draws another parameter vector and stream
    assert not torch.equal(a, d)


def test_stochastic_rounding_is_unbiased():
    """Updates far below one bf16 step: nearest rounding loses them all, stochastic
    rounding keeps their mean."""
    n, lr, steps = 200_000, 1e-4, 20
    start = torch.full((n,), 1.0, dtype=torch.bfloat16)   # spacing 2**-7 above 1
    results = {}
    for sr in (False, True):
        p = nn.Parameter(start.clone())
        opt = fot.SGD([p], lr=lr, bf16_stochastic_round=sr)
        for _ in range(steps):
            p.grad = torch.full((n,), -1.0, dtype=torch.bfloat16)   # each step +1e-4
            opt.step()
        results[sr] = p.detach().double().mean().item() - 1.0
    exact = steps * lr
    assert results[False] == 0.0
    assert abs(results[True] - exact) < 0.03 * exact, results


def test_stochastic_rounding_off_keeps_torchs_defaults():
    p = [nn.Parameter(torch.zeros(3))]
    assert fot.AdamW(p).defaults == torch.optim.AdamW(p).defaults
    assert fot.AdamW(p, bf16_stochastic_round=True).defaults["bf16_stochastic_round"]
    with pytest.raises(TypeError, match="bf16_stochastic_round"):
        fot.AdamW(p, bf16_stochastic_round="yes")


def test_mixed_precision_groups_and_dtype_change_mid_run():
    model = _model(torch.float32)
    opt = fot.AdamW(model.parameters(), lr=1e-3)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    for step in range(3):
        for m in (model, ref):
            _grads(m, step)
        opt.step()
        ref_opt.step()
    model.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    for states in (opt.state, ref_opt.state):   # state follows, as a user would
        for st in states.values():
            for k, v in st.items():
                if v.dim():
                    st[k] = v.to(torch.bfloat16)
    for step in range(3, 6):
        for m in (model, ref):
            _grads(m, step)
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, q, atol=0.02, rtol=0.02)
