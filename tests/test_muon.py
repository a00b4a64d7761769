"""Muon (fastopt.torch and NumPy) against torch.optim.Muon in the same process, with
torch's Newton–Schulz run in the same precision as fastopt's (patched), and as it
ships (bfloat16) against ns_dtype=torch.bfloat16."""

import contextlib
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_muon = pytest.importorskip("torch.optim._muon")

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@contextlib.contextmanager
def torch_ns_in(dtype):
    """torch.optim.Muon with its Newton–Schulz products in ``dtype``."""
    orig = _muon._zeropower_via_newtonschulz

    def patched(grad, coefficients, steps, eps):
        a, b, c = coefficients
        x = grad.to(dtype, copy=True)
        if grad.size(0) > grad.size(1):
            x = x.T
        x.div_(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if grad.size(0) > grad.size(1) else x

    _muon._zeropower_via_newtonschulz = patched
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = orig


SHAPES = [(24, 16), (12, 30), (8, 8)]
CASES = [dict(lr=0.02), dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False),
         dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3, eps=1e-5)]


def _run(cls, dtype, hp, steps=5, state=None, seed=1):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": hp["lr"] / 2}], **hp)
    if state is not None:
        opt.load_state_dict(state)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("hp", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_torch_in_the_same_precision(dtype, hp):
    with torch_ns_in(dtype):
        theirs, b = _run(torch.optim.Muon, dtype, hp)
    ours, a = _run(lambda *x, **k: fot.Muon(*x, ns_dtype=dtype, **k), dtype, hp)
    worst = max(_rel(p, q) for p, q in zip(ours, theirs))
    for p, q in zip(a.state.values(), b.state.values()):
        worst = max(worst, _rel(p["momentum_buffer"], q["momentum_buffer"]))
    assert worst <= TOL[dtype], worst


def test_bfloat16_option_matches_torch_as_shipped():
    theirs, _ = _run(torch.optim.Muon, torch.float32, CASES[0])
    ours, _ = _run(lambda *x, **k: fot.Muon(*x, ns_dtype=torch.bfloat16, **k),
                   torch.float32, CASES[0])
    assert max(_rel(p, q) for p, q in zip(ours, theirs)) <= 1e-6


def test_float32_default_is_closer_to_exact_than_bfloat16():
    with torch_ns_in(torch.float64):
        exact, _ = _run(torch.optim.Muon, torch.float64, CASES[0])
    f32, _ = _run(fot.Muon, torch.float32, CASES[0])
    bf16, _ = _run(torch.optim.Muon, torch.float32, CASES[0])
    e32 = max(_rel(p.double(), q) for p, q in zip(f32, exact))
    e16 = max(_rel(p.double(), q) for p, q in zip(bf16, exact))
    assert e32 < e16 / 10, (e32, e16)


def test_state_dict_both_ways():
    hp, dtype = CASES[0], torch.float64
    for src, dst in ((fot.Muon, torch.optim.Muon), (torch.optim.Muon, fot.Muon)):
        with torch_ns_in(dtype):
            _, o = _run(src, dtype, hp, steps=2)
            sd = copy.deepcopy(o.state_dict())
            a, _ = _run(dst, dtype, hp, steps=2, state=copy.deepcopy(sd), seed=2)
            b, _ = _run(src, dtype, hp, steps=2, state=copy.deepcopy(sd), seed=2)
        # fastopt's NS is float32 by default: compare the two float64 runs loosely
        assert max(_rel(p, q) for p, q in zip(a, b)) <= 1e-5


def test_errors_write_nothing():
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        fot.Muon([torch.zeros(5)])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        fastopt.Muon(np.zeros(5))
    with pytest.raises(ValueError, match="Learning rate should be >= 0"):
        fot.Muon([torch.zeros(2, 2)], lr=-1.0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        fot.Muon([torch.zeros(2, 2)], adjust_lr_fn="bogus")
    p, q = torch.randn(4, 3), torch.randn(3, 3)
    opt = fot.Muon([{"params": [p]}, {"params": [q]}])
    before = p.clone()
    p.grad = torch.randn(4, 3)
    q.grad = torch.randn(3, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and not opt.state
    w = np.ones((3, 2))
    nopt = fastopt.Muon(w)
    with pytest.raises(ValueError, match="shape"):
        nopt.step(np.ones((2, 3)))
    assert np.all(w == 1) and nopt.step_count == 0


@pytest.mark.parametrize("hp", CASES)
def test_numpy_class_matches_torch(hp):
    dtype = torch.float64
    with torch_ns_in(dtype):
        torch.manual_seed(0)
        ps = [torch.randn(s, dtype=dtype) for s in SHAPES]
        arrays = [p.numpy().copy() for p in ps]
        topt = torch.optim.Muon(ps, **hp)
        nopt = fastopt.Muon(arrays, ns_dtype="float64", **hp)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in ps]
            for p, gr in zip(ps, grads):
                p.grad = gr
            topt.step()
            nopt.step([gr.numpy() for gr in grads])
    assert max(_rel(a, p) for a, p in zip(arrays, ps)) <= 1e-12
