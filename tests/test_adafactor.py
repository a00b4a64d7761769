"""Adafactor (fastopt.torch and NumPy) against torch.optim.Adafactor in the same
process: matrices (factored), a batch of matrices, vectors; state dicts both ways;
errors."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
SHAPES = [(40, 33), (17,), (3, 8, 5), (1, 70), ()]
CASES = [dict(), dict(lr=0.05, weight_decay=0.1, maximize=True, d=1.5, eps=(1e-3, 1e-3)),
         dict(lr=0.2, beta2_decay=-0.5, eps=(None, 1e-2))]


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _run(cls, dtype, hp, steps=6, state=None, seed=1):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    opt = cls([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.003}], **hp)
    if state is not None:
        opt.load_state_dict(state)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for k, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            if k == 0:
                p.grad[3] = 0.0     # a zero row: the ε1 clamp
        opt.step()
    return ps, opt


@pytest.mark.parametrize("hp", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_torch(dtype, hp):
    ours, a = _run(fot.Adafactor, dtype, hp)
    theirs, b = _run(torch.optim.Adafactor, dtype, hp)
    worst = max(_rel(p, q) for p, q in zip(ours, theirs))
    for p, q in zip(a.state.values(), b.state.values()):
        assert set(p) == set(q)
        for k in q:
            assert p[k].shape == q[k].shape and p[k].dtype == q[k].dtype
            worst = max(worst, _rel(p[k], q[k]))
    assert worst <= TOL[dtype], worst


def test_state_dict_both_ways():
    dtype = torch.float64
    for src, dst in ((fot.Adafactor, torch.optim.Adafactor),
                     (torch.optim.Adafactor, fot.Adafactor)):
        _, o = _run(src, dtype, CASES[0], steps=3)
        sd = copy.deepcopy(o.state_dict())
        a, _ = _run(dst, dtype, CASES[0], steps=2, state=copy.deepcopy(sd), seed=2)
        b, _ = _run(src, dtype, CASES[0], steps=2, state=copy.deepcopy(sd), seed=2)
        assert max(_rel(p, q) for p, q in zip(a, b)) <= 1e-12


def test_numpy_class_matches_torch():
    dtype = torch.float64
    theirs, _ = _run(torch.optim.Adafactor, dtype, CASES[1])
    torch.manual_seed(0)
    arrays = [torch.randn(s, dtype=torch.float64).numpy() for s in SHAPES]
    opts = [fastopt.Adafactor(arrays[:3], **CASES[1]),
            fastopt.Adafactor(arrays[3:], **{**CASES[1], "lr": 0.003})]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = []
        for k, a in enumerate(arrays):
            gr = torch.randn(a.shape, generator=g, dtype=torch.float64).numpy()
            if k == 0:
                gr[3] = 0.0
            grads.append(gr)
        opts[0].step(grads[:3])
        opts[1].step(grads[3:])
    assert max(_rel(a, q) for a, q in zip(arrays, theirs)) <= 1e-12


def test_errors_write_nothing():
    with pytest.raises(ValueError, match="beta2_decay should be <= 0"):
        fot.Adafactor([torch.zeros(2, 2)], beta2_decay=0.5)
    with pytest.raises(ValueError, match="Clipping threshold d"):
        fastopt.Adafactor(np.zeros((2, 2)), d=0.5)
    with pytest.raises(ValueError, match="epsilon2"):
        fot.Adafactor([torch.zeros(2, 2)], eps=(None, -1.0))
    p, q = torch.randn(4, 3), torch.randn(3)
    opt = fot.Adafactor([{"params": [p]}, {"params": [q]}])
    before = p.clone()
    p.grad = torch.randn(4, 3)
    q.grad = torch.randn(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and not opt.state
    w = np.ones((3, 2))
    nopt = fastopt.Adafactor(w)
    with pytest.raises(ValueError, match="shape"):
        nopt.step(np.ones((2, 3)))
    assert np.all(w == 1) and nopt.step_count == 0


def test_thread_count_does_not_change_bits():
    from fastopt.adafactor import adafactor_step, check_adafactor_hypers, initial_state
    rng = np.random.default_rng(0)
    hp = check_adafactor_hypers(0.01, -0.8, (None, 1e-3), 1.0, 0.0, False)
    out = []
    for nt in (1, 2):
        p = rng.standard_normal((300, 257)).astype(np.float32) if not out else out[0][1].copy()
        if not out:
            start = p.copy()
        p = start.copy()
        st = initial_state(p.shape, p.dtype)
        g = np.random.default_rng(1).standard_normal(p.shape).astype(np.float32)
        for t in (1, 2, 3):
            adafactor_step(p, g, st, hp, t, nthreads=nt)
        out.append((nt, p))
    assert np.array_equal(out[0][1], out[1][1])


def test_numpy_fallback_matches_the_compiled_passes(monkeypatch):
    """Without the compiled kernels (a Numba-only install) the passes run in NumPy."""
    from fastopt import adafactor as A
    hp = A.check_adafactor_hypers(0.05, -0.8, (None, 1e-3), 1.0, 0.1, True)
    rng = np.random.default_rng(0)
    p0, g = rng.standard_normal((3, 40, 33)), rng.standard_normal((3, 40, 33))
    g[0, 3] = 0.0
    outs = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(A, "_kernels", lambda: None)
        p = p0.copy()
        st = A.initial_state(p.shape, p.dtype)
        for t in (1, 2, 3):
            A.adafactor_step(p, g, st, hp, t, 1)
        outs.append(p)
    assert _rel(outs[1], outs[0]) <= 1e-12
