"""fastopt.LBFGS: iterates against torch.optim.LBFGS, the optimum against SciPy's
L-BFGS-B, stopping rules, bad input, checkpoints, and bitwise agreement between
backends and thread counts."""

import numpy as np
import pytest
import torch
from conftest import record

import fastopt
from fastopt import backends

LS = (None, "strong_wolfe")


def rosen(x):
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def rosen_grad(x):
    g = np.zeros_like(x)
    g[:-1] = -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return g


def rosen_start(n, dtype, seed=0):
    if n == 2:
        return np.array([-1.2, 1.0], dtype)
    return np.random.default_rng(seed).uniform(-1.5, 1.5, n).astype(dtype)


def torch_rosen_run(x0, steps, **hp):
    tx = torch.tensor(x0.copy(), requires_grad=True)
    opt = torch.optim.LBFGS([tx], **hp)

    def closure():
        opt.zero_grad()
        f = torch.sum(100.0 * (tx[1:] - tx[:-1] ** 2) ** 2 + (1.0 - tx[:-1]) ** 2)
        f.backward()
        return f

    iterates, losses = [], []
    for _ in range(steps):
        losses.append(opt.step(closure).item())
        iterates.append(tx.detach().numpy().copy())
    return iterates, losses, opt.state[tx]


def fastopt_rosen_run(x0, steps, backend=None, **hp):
    x = x0.copy()
    opt = fastopt.LBFGS(x, backend=backend, **hp)
    iterates, losses = [], []
    for _ in range(steps):
        losses.append(opt.step(lambda: (rosen(x), rosen_grad(x))))
        iterates.append(x.copy())
    return iterates, losses, opt


# float64: rounding differences (dot products summed in another order) grow
# through 15 iterations of an ill-conditioned problem from ~1e-16 to ~1e-13;
# float32 from ~1e-7 to ~1e-4 (measured; the bounds leave a margin of ~10x)
BOUND = {"float64": 1e-10, "float32": 5e-4}


@pytest.mark.parametrize("ls", LS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [2, 100])
def test_iterates_match_torch_on_rosenbrock(n, dtype, ls):
    x0 = rosen_start(n, dtype)
    hp = dict(max_iter=5, line_search_fn=ls)
    steps = 3 if n == 100 else 4
    mine, my_losses, opt = fastopt_rosen_run(x0, steps, **hp)
    theirs, their_losses, st = torch_rosen_run(x0, steps, **hp)
    for a, e in zip(mine, theirs):
        rel = record("lbfgs", fastopt.backend(), f"LBFGS-rosen{n}-{ls or 'fixed'}", dtype, a, e)
        assert rel <= BOUND[dtype], (rel, a, e)
    np.testing.assert_allclose(my_losses, their_losses, rtol=BOUND[dtype] * 10)
    assert rosen(mine[-1]) < rosen(x0)
    if dtype == "float64":
        # the same control flow: evaluations and iterations counted alike
        assert opt.state["func_evals"] == st["func_evals"]
        assert opt.state["n_iter"] == st["n_iter"]
        assert len(opt.state["old_dirs"]) == len(st["old_dirs"])
        assert opt.state["t"] == pytest.approx(float(st["t"]), rel=1e-8)
        assert opt.state["H_diag"] == pytest.approx(float(st["H_diag"]), rel=1e-8)
        np.testing.assert_allclose(opt.state["d"], st["d"].numpy(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("ls", LS)
def test_a_full_history_wraps_around_like_torch(ls):
    # history_size 3 over 20 iterations: the ring drops its oldest pair many times
    x0 = rosen_start(100, "float64", seed=2)
    hp = dict(max_iter=20, history_size=3, max_eval=30, line_search_fn=ls)
    mine, _, opt = fastopt_rosen_run(x0, 1, **hp)
    theirs, _, st = torch_rosen_run(x0, 1, **hp)
    rel = record("lbfgs", fastopt.backend(), f"LBFGS-rosen100-h3-{ls or 'fixed'}", "float64",
                 mine[0], theirs[0])
    assert rel <= BOUND["float64"]
    assert opt.state["n_iter"] == st["n_iter"] and opt.state["func_evals"] == st["func_evals"]
    assert len(opt.state["old_dirs"]) == len(st["old_dirs"]) == 3
    for a, e in zip(opt.state["old_stps"], st["old_stps"]):
        np.testing.assert_allclose(a, e.numpy(), rtol=1e-6, atol=1e-12)


def test_state_has_torch_keys():
    x = rosen_start(2, "float64")
    opt = fastopt.LBFGS(x, max_iter=3)
    assert opt.state == {"func_evals": 0, "n_iter": 0}
    opt.step(lambda: (rosen(x), rosen_grad(x)))
    assert set(opt.state) == {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro",
                              "H_diag", "prev_flat_grad", "prev_loss"}
    assert len(opt.state["old_dirs"]) == len(opt.state["old_stps"]) == len(opt.state["ro"])


# ---------------------------------------------------------------------------
# The optimum of a real problem against SciPy's L-BFGS-B
# ---------------------------------------------------------------------------

def _digits_problem():
    sklearn = pytest.importorskip("sklearn.datasets")
    X, y = sklearn.load_digits(return_X_y=True)
    X = X / 16.0
    X = np.hstack([X, np.ones((X.shape[0], 1))])       # intercept column
    Y = np.eye(10)[y]
    lam = 1e-3
    n, f = X.shape

    def loss_grad(w):
        W = w.reshape(f, 10)
        Z = X @ W
        Z -= Z.max(axis=1, keepdims=True)
        logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
        loss = -np.sum(Y * logp) / n + 0.5 * lam * np.dot(w, w)
        G = X.T @ (np.exp(logp) - Y) / n + lam * W
        return float(loss), G.reshape(-1)

    return loss_grad, f * 10


def test_digits_logistic_regression_optimum_matches_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    loss_grad, dim = _digits_problem()
    ref = scipy_opt.minimize(loss_grad, np.zeros(dim), jac=True, method="L-BFGS-B",
                             options=dict(maxiter=5000, ftol=1e-15, gtol=1e-10, maxcor=20))
    w = np.zeros(dim)
    opt = fastopt.LBFGS(w, max_iter=100, history_size=20, line_search_fn="strong_wolfe",
                        tolerance_grad=1e-10, tolerance_change=1e-14)
    for _ in range(20):
        opt.step(lambda: loss_grad(w))
        if np.max(np.abs(loss_grad(w)[1])) <= 1e-9:
            break
    f_mine, f_ref = loss_grad(w)[0], ref.fun
    gap_f = abs(f_mine - f_ref) / abs(f_ref)
    gap_w = np.max(np.abs(w - ref.x)) / np.max(np.abs(ref.x))
    record("lbfgs-vs-scipy", fastopt.backend(), "LBFGS-digits-loss", "float64",
           [f_mine], [f_ref])
    record("lbfgs-vs-scipy", fastopt.backend(), "LBFGS-digits-w", "float64", w, ref.x)
    assert gap_f < 1e-9, (f_mine, f_ref)
    assert gap_w < 1e-4, gap_w
    assert f_mine <= f_ref + 1e-12


# ---------------------------------------------------------------------------
# Stopping rules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ls", LS)
def test_stops_at_once_at_a_minimum(ls):
    x = np.ones(5)
    before = x.copy()
    calls = []

    def closure():
        calls.append(1)
        return rosen(x), rosen_grad(x)

    opt = fastopt.LBFGS(x, line_search_fn=ls)
    assert opt.step(closure) == 0.0
    assert len(calls) == 1
    assert opt.state == {"func_evals": 1, "n_iter": 0}
    assert np.array_equal(x, before)


def test_max_eval_defaults_to_five_quarters_of_max_iter():
    x = np.zeros(3)
    assert fastopt.LBFGS(x, max_iter=9).max_eval == 11
    assert fastopt.LBFGS(x).max_eval == 25


def test_any_shape_and_flatparams():
    x = rosen_start(100, "float64").reshape(10, 10)
    opt = fastopt.LBFGS(x, max_iter=5)
    opt.step(lambda: (rosen(x.reshape(-1)), rosen_grad(x.reshape(-1)).reshape(10, 10)))
    flat_run, _, _ = fastopt_rosen_run(rosen_start(100, "float64"), 1, max_iter=5)
    assert np.array_equal(x.reshape(-1), flat_run[0])
    fp = fastopt.FlatParams([rosen_start(100, "float64")[:40], rosen_start(100, "float64")[40:]])
    opt = fastopt.LBFGS(fp, max_iter=5)
    opt.step(lambda: (rosen(fp.data), rosen_grad(fp.data)))
    assert np.array_equal(fp.data, flat_run[0])


# ---------------------------------------------------------------------------
# Bad input: the right exception, nothing touched
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(lr="1"), TypeError, "lr must be a real number"),
    (dict(lr=10 ** 400), ValueError, "lr"),
    (dict(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an int, got 2.5"),
    (dict(max_eval=0), ValueError, "max_eval must be >= 1, got 0"),
    (dict(history_size=0), ValueError, "history_size must be >= 1, got 0"),
    (dict(history_size=True), TypeError, "history_size must be an int"),
    (dict(tolerance_grad=float("nan")), ValueError, "tolerance_grad must not be NaN"),
    (dict(tolerance_change=None), TypeError, "tolerance_change must be a real number"),
    (dict(line_search_fn="armijo"), ValueError, "only 'strong_wolfe' is supported.*armijo"),
])
def test_bad_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastopt.LBFGS(np.zeros(3), **kw)


@pytest.mark.parametrize("param, exc", [
    (np.zeros(3, np.int64), TypeError),
    (np.zeros((4, 4))[:, ::2], ValueError),
    ([1.0, 2.0], TypeError),
    (None, TypeError),
])
def test_bad_param(param, exc):
    with pytest.raises(exc, match="param"):
        fastopt.LBFGS(param)


def _bad_closures(x):
    g = rosen_grad(x)
    return {
        "not a pair": (lambda: rosen(x), TypeError, "pair"),
        "a triple": (lambda: (rosen(x), g, 1), TypeError, "pair"),
        "grad None": (lambda: (rosen(x), None), TypeError, "grad"),
        "grad list": (lambda: (rosen(x), list(g)), TypeError, "grad"),
        "grad too short": (lambda: (rosen(x), g[:-1]), ValueError, "shape"),
        "grad 2-D": (lambda: (rosen(x), np.stack([g, g])), ValueError, "shape"),
        "grad float32": (lambda: (rosen(x), g.astype(np.float32)), TypeError, "dtype"),
        "loss NaN": (lambda: (float("nan"), g), ValueError, "non-finite"),
        "loss inf": (lambda: (np.inf, g), ValueError, "non-finite"),
        "loss huge int": (lambda: (10 ** 400, g), ValueError, "non-finite"),
        "loss complex": (lambda: (1 + 2j, g), TypeError, "real"),
        "loss str": (lambda: ("1.0", g), TypeError, "real"),
        "loss vector": (lambda: (np.ones(3), g), TypeError, "one real number"),
        "loss bool": (lambda: (True, g), TypeError, "bool"),
    }


@pytest.mark.parametrize("ls", LS)
@pytest.mark.parametrize("case", list(_bad_closures(np.zeros(4))))
def test_bad_closure_leaves_param_and_state_untouched(case, ls):
    x = rosen_start(4, "float64")
    opt = fastopt.LBFGS(x, max_iter=3, line_search_fn=ls)
    opt.step(lambda: (rosen(x), rosen_grad(x)))
    x_before, sd_before = x.copy(), opt.state_dict()
    closure, exc, match = _bad_closures(x)[case]
    with pytest.raises(exc, match=match):
        opt.step(closure)
    assert np.array_equal(x, x_before)
    sd = opt.state_dict()
    assert sd["scalars"] == sd_before["scalars"]
    for k, v in sd_before["state"].items():
        assert np.array_equal(sd["state"][k], v), k


@pytest.mark.parametrize("ls", LS)
def test_closure_failing_mid_step_leaves_a_usable_state(ls):
    x = rosen_start(10, "float64")
    opt = fastopt.LBFGS(x, max_iter=10, line_search_fn=ls)
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 4:
            return float("nan"), rosen_grad(x)
        return rosen(x), rosen_grad(x)

    with pytest.raises(ValueError, match="non-finite"):
        opt.step(flaky)
    assert np.all(np.isfinite(x))
    f0 = rosen(x)
    opt.step(flaky)
    assert rosen(x) < f0


def test_huge_lr_never_overflows():
    # t*d overflows to inf like float arithmetic; the next loss is then refused
    x = rosen_start(4, "float64")
    opt = fastopt.LBFGS(x, lr=1e308, max_iter=3)
    with pytest.raises(ValueError, match="non-finite"):
        with np.errstate(all="ignore"):
            opt.step(lambda: (rosen(x), rosen_grad(x)))
    y = rosen_start(4, "float32")
    opt = fastopt.LBFGS(y, lr=1e300, max_iter=3)   # inf once rounded to float32
    with pytest.raises(ValueError, match="non-finite"):
        with np.errstate(all="ignore"):
            opt.step(lambda: (rosen(y), rosen_grad(y)))


def test_closure_must_be_callable():
    with pytest.raises(TypeError, match="closure must be callable"):
        fastopt.LBFGS(np.zeros(3)).step(None)


def test_torch_tensor_loss_and_grad_are_accepted():
    x = rosen_start(6, "float64")
    opt = fastopt.LBFGS(x, max_iter=4)
    opt.step(lambda: (torch.tensor(rosen(x)), torch.from_numpy(rosen_grad(x))))
    ref, _, _ = fastopt_rosen_run(rosen_start(6, "float64"), 1, max_iter=4)
    assert np.array_equal(x, ref[0])


# ---------------------------------------------------------------------------
# Checkpoints and bitwise agreement
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ls", LS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpoint_resume_is_bitwise(tmp_path, dtype, ls):
    hp = dict(max_iter=4, history_size=3, line_search_fn=ls)
    x0 = rosen_start(50, dtype, seed=1)
    straight, straight_losses, _ = fastopt_rosen_run(x0, 6, **hp)

    x = x0.copy()
    opt = fastopt.LBFGS(x, **hp)
    for _ in range(3):
        opt.step(lambda: (rosen(x), rosen_grad(x)))
    fastopt.save(opt.state_dict(), tmp_path / "lbfgs.npz")
    y = x.copy()
    del opt, x
    resumed = fastopt.LBFGS(y, max_iter=4, history_size=3, line_search_fn=ls)
    resumed.load_state_dict(fastopt.load(tmp_path / "lbfgs.npz"))
    losses = [resumed.step(lambda: (rosen(y), rosen_grad(y))) for _ in range(3)]
    assert np.array_equal(y, straight[-1])
    assert losses == straight_losses[3:]


def test_load_state_dict_checks_before_changing():
    x = rosen_start(8, "float64")
    opt = fastopt.LBFGS(x, max_iter=3)
    opt.step(lambda: (rosen(x), rosen_grad(x)))
    sd = opt.state_dict()
    other = fastopt.LBFGS(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        other.load_state_dict(sd)
    bad = dict(sd, state=dict(sd["state"], d=np.zeros(7)))
    fresh = fastopt.LBFGS(x.copy(), max_iter=3)
    with pytest.raises(ValueError, match="'d'"):
        fresh.load_state_dict(bad)
    assert fresh.state == {"func_evals": 0, "n_iter": 0}
    with pytest.raises(ValueError, match="rule"):
        fresh.load_state_dict(dict(sd, rule="Adam"))
    # the state's names: one check for this format and torch's
    with pytest.raises(ValueError, match="'exp_avg'.*another optimizer"):
        fresh.load_state_dict(dict(sd, state=dict(sd["state"], exp_avg=np.zeros(8))))
    no_d = {k: v for k, v in sd["state"].items() if k != "d"}
    with pytest.raises(ValueError, match=r"lacks \['d'\] after an iteration"):
        fresh.load_state_dict(dict(sd, state=no_d))
    assert fresh.state == {"func_evals": 0, "n_iter": 0}


def _quadratic_run(n, dtype, ls, backend, steps=3):
    """A well-conditioned problem of any size: f = sum(a (x - 1)^2) / 2 + sum(cos x)."""
    rng = np.random.default_rng(7)
    a = rng.uniform(1.0, 10.0, n).astype(dtype)
    x = rng.uniform(-2, 2, n).astype(dtype)
    opt = fastopt.LBFGS(x, max_iter=6, history_size=4, line_search_fn=ls, backend=backend)

    def closure():
        r = x - 1
        return float(np.dot(a * r, r) / 2 + np.sum(np.cos(x))), a * r - np.sin(x)

    out = []
    for _ in range(steps):
        out.append(opt.step(closure))
    return x, out, opt.state_dict()


@pytest.mark.parametrize("ls", LS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_and_numba_agree_bitwise(dtype, ls):
    if not (backends.available("cython") and backends.available("numba")):
        pytest.skip("needs both CPU backends")
    for n in (1001, 40_000):   # serial, and parallel (above PARALLEL_MIN) with a tail block
        xc, lc, sc = _quadratic_run(n, dtype, ls, "cython")
        xn, ln, sn = _quadratic_run(n, dtype, ls, "numba")
        assert np.array_equal(xc, xn)
        assert lc == ln
        assert sc["scalars"] == sn["scalars"]
        for k in sc["state"]:
            assert np.array_equal(sc["state"][k], sn["state"][k]), k


@pytest.mark.parametrize("backend_name", ["cython", "numba"])
def test_one_and_two_threads_agree_bitwise(backend_name):
    if not backends.available(backend_name):
        pytest.skip(f"{backend_name} unavailable")
    saved = fastopt.get_num_threads()
    runs = []
    try:
        for th in (1, 2):
            fastopt.set_num_threads(th)
            runs.append(_quadratic_run(100_003, "float32", "strong_wolfe", backend_name,
                                       steps=2))
    finally:
        fastopt.set_num_threads(saved)
    (x1, l1, s1), (x2, l2, s2) = runs
    assert np.array_equal(x1, x2)
    assert l1 == l2
    assert s1["scalars"] == s2["scalars"]


def test_kernel_reductions_are_exact_sums_of_blocks():
    # the compiled dot equals a float64 sum taken in the documented order
    if not backends.available("cython"):
        pytest.skip("compiled kernels unavailable")
    from fastopt.backends import compiled
    rng = np.random.default_rng(3)
    n = 3 * 4096 + 7
    src = rng.standard_normal(n).astype(np.float32)
    other = rng.standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    part = np.zeros(3 * compiled.lbfgs_blocks(n))
    abssum, dot, mx = compiled.lbfgs_copy(dst, src, other, part, 1)
    assert np.array_equal(dst, src)
    assert mx == np.max(np.abs(src))
    prod = src.astype(np.float64) * other.astype(np.float64)
    expected = 0.0
    for lo in range(0, n, 4096):            # blocks, added in order
        blk = prod[lo:lo + 4096]
        whole = len(blk) // 16 * 16
        lanes = [0.0] * 16                   # lane = offset % 16, the tail in lane 0
        for i in range(whole):
            lanes[i % 16] += blk[i]
        for i in range(whole, len(blk)):
            lanes[0] += blk[i]
        w = 8
        while w:                             # the fixed tree: j += j + 8, j + 4, ...
            for j in range(w):
                lanes[j] += lanes[j + w]
            w //= 2
        expected += lanes[0]
    assert dot == expected
    assert abssum == pytest.approx(np.sum(np.abs(src.astype(np.float64))), rel=1e-12)
