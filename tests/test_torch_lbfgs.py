"""fastopt.torch.LBFGS side by side with torch.optim.LBFGS, as users run it: a
closure that zeroes, evaluates and calls backward; several steps; checkpoints both
ways; changed hyperparameters; bad input."""

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from conftest import record  # noqa: E402

# float32: torch takes its dot products in float32, fastopt accumulates them in
# float64 (docs/rules.md, L-BFGS: a float32 product is exact there); over 28
# iterations on Rosenbrock the iterates part
# by ~1e-3 relative (measured 1.1e-3 with the fixed step, less with strong Wolfe)
TOL = {torch.float64: 1e-10, torch.float32: 5e-3}


def rosenbrock(v):
    return (100 * (v[1:] - v[:-1] ** 2) ** 2 + (1 - v[:-1]) ** 2).sum()


def make(impl, dtype, ls, frozen=False, **kw):
    """Two parameters (a vector and a matrix: the flat layout spans both) and a third,
    gradient-less one when ``frozen``."""
    x = torch.nn.Parameter(torch.full((20,), -1.2, dtype=dtype))
    y = torch.nn.Parameter(torch.linspace(-0.5, 1.5, 12, dtype=dtype).reshape(3, 4))
    params = [x, y]
    if frozen:
        params.append(torch.nn.Parameter(torch.ones(5, dtype=dtype)))
    kw = {"lr": 1 if ls else 0.25, "history_size": 5, "max_iter": 7,
          "line_search_fn": ls, **kw}
    opt = impl.LBFGS(params, **kw)

    def closure():
        opt.zero_grad()
        loss = rosenbrock(torch.cat([x, y.reshape(-1)]))
        loss.backward()
        return loss
    return params, opt, closure


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ls", [None, "strong_wolfe"])
def test_iterates_match_torch(dtype, ls):
    runs = {}
    for impl in (torch.optim, ft):
        params, opt, closure = make(impl, dtype, ls, frozen=True)
        losses = [float(opt.step(closure).detach()) for _ in range(4)]
        runs[impl.__name__] = (flat(params), losses, opt.state_dict()["state"][0])
    (a, la, sa), (b, lb, sb) = runs["torch.optim"], runs["fastopt.torch"]
    rel = record("torch.LBFGS", "cython", f"rosen32-{ls}", dtype.__repr__()[6:], b.numpy(),
                 a.numpy())
    assert rel < TOL[dtype], rel
    np.testing.assert_allclose(lb, la, rtol=TOL[dtype])
    assert not torch.equal(b, flat(make(ft, dtype, ls, frozen=True)[0]))  # it moved
    if dtype == torch.float64:
        assert (sb["n_iter"], sb["func_evals"]) == (sa["n_iter"], sa["func_evals"])


@pytest.mark.parametrize("ls", [None, "strong_wolfe"])
def test_checkpoints_move_both_ways(ls):
    dtype = torch.float64

    def run(impl, steps, sd=None, start=None):
        params, opt, closure = make(impl, dtype, ls)
        if start is not None:
            with torch.no_grad():
                for p, v in zip(params, start):
                    p.copy_(v)
        if sd is not None:
            opt.load_state_dict(copy.deepcopy(sd))
        for _ in range(steps):
            opt.step(closure)
        return params, opt

    def saved(opt):
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    whole_f = flat(run(ft, 4)[0])
    whole_t = flat(run(torch.optim, 4)[0])
    params, opt = run(ft, 2)
    mid, sd = [p.detach().clone() for p in params], saved(opt)
    # fastopt -> fastopt: the same bits as the uninterrupted run
    assert torch.equal(flat(run(ft, 2, sd, mid)[0]), whole_f)
    # fastopt -> torch continues like fastopt (both are L-BFGS to rounding)
    torch.testing.assert_close(flat(run(torch.optim, 2, sd, mid)[0]), whole_f,
                               rtol=1e-10, atol=1e-10)
    # torch -> fastopt continues like torch
    params, opt = run(torch.optim, 2)
    mid, sd = [p.detach().clone() for p in params], saved(opt)
    torch.testing.assert_close(flat(run(ft, 2, sd, mid)[0]), whole_t, rtol=1e-10, atol=1e-10)


def test_fresh_gradients_and_views_give_the_same_bits():
    """A closure that sets grads to None (model.zero_grad()) makes fastopt gather; the
    result is the one of a closure that zeroes the views."""
    out = []
    for set_to_none in (False, True):
        params, opt, _ = make(ft, torch.float64, "strong_wolfe")
        x, y = params

        def closure():
            opt.zero_grad(set_to_none=set_to_none)
            loss = rosenbrock(torch.cat([x, y.reshape(-1)]))
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        out.append(flat(params))
    assert torch.equal(out[0], out[1])


def test_hyperparameters_are_read_from_the_group_each_step():
    runs = []
    for impl in (torch.optim, ft):
        params, opt, closure = make(impl, torch.float64, None)
        opt.step(closure)
        opt.param_groups[0]["lr"] = 0.05
        opt.param_groups[0]["max_iter"] = 3
        opt.step(closure)
        runs.append(flat(params))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-12)
    params, opt, closure = make(ft, torch.float64, None)
    opt.param_groups[0]["lr"] = -1.0
    before = flat(params)
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.step(closure)
    assert torch.equal(flat(params), before)


def test_state_has_torchs_keys():
    params, opt, closure = make(ft, torch.float64, None)
    opt.step(closure)
    st = opt.state[params[0]]
    for key in ("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
                "prev_flat_grad", "prev_loss"):
        assert key in st
    assert st["n_iter"] == 7 and len(st["old_dirs"]) == 5
    assert list(opt.state) == [params[0]]


def test_bad_input():
    x = torch.nn.Parameter(torch.ones(3))
    y = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="parameter groups"):
        ft.LBFGS([{"params": [x]}, {"params": [y]}])
    with pytest.raises(TypeError, match="float16"):
        ft.LBFGS([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))])
    with pytest.raises(TypeError, match="meta"):
        ft.LBFGS([torch.nn.Parameter(torch.ones(3, device="meta"))])
    with pytest.raises(TypeError, match="one dtype"):
        ft.LBFGS([x, torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ft.LBFGS([x], lr=-1)
    opt = ft.LBFGS([x])
    before = x.detach().clone()
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)

    def vector_loss():
        opt.zero_grad()
        loss = x * 2
        loss.sum().backward()
        return loss
    with pytest.raises(ValueError, match="scalar"):
        opt.step(vector_loss)

    assert torch.equal(x.detach(), before)
    # a sparse gradient counts as its dense self, as in torch.optim.LBFGS
    pair = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for p, sparse in zip(pair, (True, False)):
        def closure(p=p, sparse=sparse):
            g = p.detach() * 2
            p.grad = g.to_sparse() if sparse else g
            return (p.detach() ** 2).sum()
        ft.LBFGS([p], max_iter=2).step(closure)
    assert torch.equal(pair[0].detach(), pair[1].detach())
    assert not torch.equal(pair[0].detach(), torch.ones(3))
    adam = ft.Adam([torch.nn.Parameter(torch.ones(3))])
    adam.param_groups[0]["params"][0].grad = torch.ones(3)
    adam.step()
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(adam.state_dict())
    assert torch.equal(x.detach(), before) and opt.state[x]["n_iter"] == 0
