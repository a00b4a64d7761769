"""fastopt.torch's 8-bit optimizers: against the exact (float64) update of the
dequantized state, against bitsandbytes' CPU implementation, and for
bitsandbytes' state layout, argument checks and bad input.

The 8-bit codes are held to "the nearest code of the exact update" (at least 99.9%
of them, the rest one code away: the float32 step sits within rounding of a
bound). bitsandbytes' CPU quantiser is not nearest (tests/test_quant.py measures
it), so against bitsandbytes the dequantized state is compared within one code of
ours plus that quantiser's resolution.
"""

import inspect
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt import quant as Q  # noqa: E402
from fastopt.torch import bnb8  # noqa: E402

F32 = np.float32
N = 2 * 4096 + 77          # 8-bit state (>= min_8bit_size), a short last block
NAMES = ("Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "RMSprop8bit", "Adagrad8bit")
KWARGS = {
    "Adam8bit": dict(lr=1e-2, weight_decay=0.1),
    "AdamW8bit": dict(lr=1e-2),
    "Lion8bit": dict(lr=1e-3, weight_decay=0.1),
    "SGD8bit": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "RMSprop8bit": dict(lr=0.01, weight_decay=0.01),
    "Adagrad8bit": dict(lr=0.05, weight_decay=0.01),
}
# bitsandbytes stores the moments that cannot be negative with the signed map too,
# except Adam's second: which states hold values >= 0
NONNEG = {"Adam8bit": (False, True), "AdamW8bit": (False, True), "Lion8bit": (False,),
          "SGD8bit": (False,), "RMSprop8bit": (True,), "Adagrad8bit": (True,)}


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _hp(opt):
    """bitsandbytes' rule name and hyperparameters for quant.step8."""
    g = opt.param_groups[0]
    name = opt.optimizer_name
    if name == "momentum":
        return name, dict(lr=g["lr"], momentum=g["betas"][0], weight_decay=g["weight_decay"])
    if name == "rmsprop":
        return name, dict(lr=g["lr"], alpha=g["betas"][0], eps=g["eps"],
                          weight_decay=g["weight_decay"])
    if name == "adagrad":
        return name, dict(lr=g["lr"], eps=g["eps"], weight_decay=g["weight_decay"])
    return name, dict(lr=g["lr"], betas=g["betas"], eps=g["eps"],
                      weight_decay=g["weight_decay"])


def _seed_state(opt, p, t0, rng):
    """Make ``p``'s state (one step) and replace it with random 8-bit state at step
    ``t0``: moments of a realistic spread, quantized by the reference."""
    p.grad = torch.zeros_like(p)
    saved = p.detach().clone()
    opt.step()
    with torch.no_grad():
        p.copy_(saved)
    st = opt.state[p]
    st["step"] = t0
    for k, nonneg in enumerate(NONNEG[type(opt).__name__], 1):
        x = rng.standard_normal(p.numel()) * np.exp(rng.uniform(-3, 0, p.numel()))
        x = (x * x if nonneg else 0.1 * x).astype(F32)
        codes, am = Q.quantize_blocks(x, st[f"qmap{k}"].numpy())
        st[f"state{k}"].copy_(torch.from_numpy(codes).view(p.shape))
        st[f"absmax{k}"].copy_(torch.from_numpy(am))


def _state_arrays(st, n_states):
    return ([st[f"state{k}"].numpy().reshape(-1).copy() for k in range(1, n_states + 1)],
            [st[f"absmax{k}"].numpy().copy() for k in range(1, n_states + 1)],
            [st[f"qmap{k}"].numpy() for k in range(1, n_states + 1)])


def _dequant(st, k):
    return Q.dequantize_blocks(st[f"state{k}"].numpy().reshape(-1), st[f"absmax{k}"].numpy(),
                               st[f"qmap{k}"].numpy())


# ---------------------------------------------------------------------------
# The class: bitsandbytes' signatures and groups
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_signature_and_groups_are_bitsandbytes(name):
    bnb = _bnb()
    ours, theirs = getattr(ft, name), getattr(bnb.optim, name)
    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    kw = {"lr": 0.1, "momentum": 0.9} if name == "SGD8bit" else {}
    a = ours([torch.nn.Parameter(torch.zeros(3))], **kw)
    b = theirs([torch.nn.Parameter(torch.zeros(3))], **kw)
    ga, gb = a.param_groups[0], b.param_groups[0]
    assert {k: v for k, v in ga.items() if k != "params"} == \
        {k: v for k, v in gb.items() if k != "params"}
    assert isinstance(a, torch.optim.Optimizer) and a.optimizer_name == b.optimizer_name


# ---------------------------------------------------------------------------
# One step: the nearest codes of the exact update
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in NAMES] +
                         [("AdamW8bit", torch.bfloat16), ("SGD8bit", torch.float16)])
def test_one_step_gives_the_nearest_codes_of_the_exact_update(name, dtype):
    rng = np.random.default_rng(1)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(N).astype(F32)).to(dtype))
    opt = getattr(ft, name)([p], **KWARGS[name])
    _seed_state(opt, p, 4, rng)
    p_before = p.detach().float().numpy().copy()
    g = torch.from_numpy(rng.standard_normal(N).astype(F32)).to(dtype)
    p.grad = g.clone()
    rule, hp = _hp(opt)
    codes, absmax, qmaps = _state_arrays(opt.state[p], opt.n_states)
    p64, want_codes, want_absmax, _ = Q.step8(rule, p_before, g.float().numpy(), codes,
                                              absmax, qmaps, hp, 5)
    opt.step()
    st = opt.state[p]
    assert st["step"] == 5
    for k in range(opt.n_states):
        got = st[f"state{k + 1}"].numpy().reshape(-1).astype(int)
        dist = np.abs(got - want_codes[k].astype(int))
        assert (dist == 0).mean() >= 0.999, (k, (dist > 0).sum())
        assert dist.max() <= 1
        np.testing.assert_allclose(st[f"absmax{k + 1}"].numpy(), want_absmax[k], rtol=1e-6)
    new = p.detach().float().numpy().astype(np.float64)
    if dtype == torch.float32:
        np.testing.assert_allclose(new, p64, rtol=2e-6, atol=1e-7)
    else:   # the float32 result rounded once to the parameter's type
        ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert np.all(np.abs(new - p64) <= ulp * np.abs(p64) + 1e-6)


# ---------------------------------------------------------------------------
# Against bitsandbytes' CPU implementation
# ---------------------------------------------------------------------------

# the resolution of bitsandbytes' CPU quantiser (tests/test_quant.py measures it)
BNB_RESOLUTION = {True: 0.9 / 64, False: 0.9 / 128}   # signed map, unsigned map


def _gap(qmap, codes):
    """The larger distance from each code's value to its neighbours' (one code)."""
    q = qmap.astype(np.float64)
    up = q[np.minimum(codes.astype(int) + 1, 255)] - q[codes]
    down = q[codes] - q[np.maximum(codes.astype(int) - 1, 0)]
    return np.maximum(up, down)


def _close_to_bnb_state(sa, sb, n_states):
    for k in range(1, n_states + 1):
        qmap = sa[f"qmap{k}"].numpy()
        signed = bool(qmap[0] < 0)
        da, db = _dequant(sa, k), _dequant(sb, k)
        am = np.repeat(np.maximum(sa[f"absmax{k}"].numpy(), sb[f"absmax{k}"].numpy()),
                       256)[:da.shape[0]].astype(np.float64)
        tol = am * (_gap(qmap, sa[f"state{k}"].numpy().reshape(-1)) + BNB_RESOLUTION[signed])
        assert np.all(np.abs(da.astype(np.float64) - db) <= tol * (1 + 1e-6)), k
        np.testing.assert_allclose(sa[f"absmax{k}"].numpy(), sb[f"absmax{k}"].numpy(),
                                   rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_matches_bitsandbytes_cpu(name):
    bnb = _bnb()
    rng = np.random.default_rng(2)
    p0 = torch.from_numpy(rng.standard_normal(N).astype(F32))
    b = torch.nn.Parameter(p0.clone())
    theirs = getattr(bnb.optim, name)([b], **KWARGS[name])
    a = torch.nn.Parameter(p0.clone())
    ours = getattr(ft, name)([a], **KWARGS[name])
    _seed_state(ours, a, 4, rng)
    b.grad = torch.zeros_like(b)
    saved = b.detach().clone()
    theirs.step()
    with torch.no_grad():
        b.copy_(saved)
    theirs.load_state_dict(ours.state_dict())
    g = torch.from_numpy(rng.standard_normal(N).astype(F32))
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    assert ours.state[a]["step"] == theirs.state[b]["step"] == 5
    # the same dequantized start: the parameters differ by float32 rounding only
    # (Lion: a sign may flip where β1·m + (1−β1)·g rounds to either side of 0)
    diff = np.abs(a.detach().numpy() - b.detach().numpy())
    tol = 1e-6 + 1e-6 * np.abs(b.detach().numpy())
    assert (diff > tol).mean() <= (1e-3 if name == "Lion8bit" else 0)
    _close_to_bnb_state(ours.state[a], theirs.state[b], ours.n_states)


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    params = params if isinstance(params, (list, tuple)) else [params]
    for _ in range(steps):
        # a noisy quadratic: the gradient pulls towards 0
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.3 * p.detach().float()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_many_steps_stay_close_to_bitsandbytes(name):
    bnb = _bnb()
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    _train(getattr(ft, name)([a], **KWARGS[name]), a, 15, 4)
    _train(getattr(bnb.optim, name)([b], **KWARGS[name]), b, 15, 4)
    moved = (b - p0).norm().item()
    assert moved > 0
    # measured with 50 steps: 0.1% (Adagrad) to 1.8% (SGD) of the distance moved
    assert (a - b).norm().item() <= 0.05 * moved


def test_a_non_contiguous_parameter_steps_in_logical_order():
    """bitsandbytes makes a parameter contiguous before its step, so its blocks
    run over the elements in logical order: a transposed parameter steps as its
    contiguous copy does, and keeps its own layout here."""
    x = torch.randn(64, 129, generator=torch.Generator().manual_seed(15))
    a = torch.nn.Parameter(x.t())           # 129 x 64, not contiguous
    b = torch.nn.Parameter(x.t().contiguous())
    oa, ob = ft.AdamW8bit([a], lr=1e-2), ft.AdamW8bit([b], lr=1e-2)
    _train(oa, a, 3, 16)
    _train(ob, b, 3, 16)
    assert not a.is_contiguous() and torch.equal(a, b)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(oa.state[a][key], ob.state[b][key])


# ---------------------------------------------------------------------------
# State dicts, both ways
# ---------------------------------------------------------------------------

def _same_state(sa, sb):
    assert list(sa) == list(sb)
    for k, v in sa.items():
        w = sb[k]
        if isinstance(v, torch.Tensor):
            assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), k
        else:
            assert v == w, k


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_both_ways(name):
    bnb = _bnb()
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(5))
    small0 = torch.randn(10, 10, generator=torch.Generator().manual_seed(6))
    # bitsandbytes -> fastopt
    b, bs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(small0.clone())
    theirs = getattr(bnb.optim, name)([b, bs], **KWARGS[name])
    _train(theirs, [b, bs], 3, 7)
    sd = theirs.state_dict()
    a, as_ = torch.nn.Parameter(b.detach().clone()), torch.nn.Parameter(bs.detach().clone())
    ours = getattr(ft, name)([a, as_], **KWARGS[name])
    ours.load_state_dict(sd)
    _same_state(ours.state[a], theirs.state[b])
    _same_state(ours.state[as_], theirs.state[bs])
    assert ours.state[as_]["state1"].dtype == torch.float32
    # fastopt -> bitsandbytes: the same layout (quantisation entries nested)
    mine = ours.state_dict()
    assert list(mine["state"][0]) == list(sd["state"][0])
    assert set(mine["state"][0][bnb8.NESTED]) == set(sd["state"][0][bnb8.NESTED])
    c, cs = torch.nn.Parameter(b.detach().clone()), torch.nn.Parameter(bs.detach().clone())
    back = getattr(bnb.optim, name)([c, cs], **KWARGS[name])
    back.load_state_dict(mine)
    _same_state(back.state[c], ours.state[a])
    # and every copy continues the same way
    for opt, ps in ((ours, [a, as_]), (theirs, [b, bs]), (back, [c, cs])):
        _train(opt, ps, 2, 8)
    assert ours.state[a]["step"] == theirs.state[b]["step"] == back.state[c]["step"] == 5
    assert torch.equal(b, c)
    moved = (b - p0).norm().item()
    assert (a - b).norm().item() <= 0.05 * moved


# ---------------------------------------------------------------------------
# Small tensors keep float32 state: fastopt's float32 rule, bit for bit
# ---------------------------------------------------------------------------

_TWIN = {"Adam8bit": ("AdamW", ("exp_avg", "exp_avg_sq")),
         "AdamW8bit": ("AdamW", ("exp_avg", "exp_avg_sq")),
         "Lion8bit": ("Lion", ("exp_avg",)), "SGD8bit": ("SGD", ("momentum_buffer",)),
         "RMSprop8bit": ("RMSprop", ("square_avg",)), "Adagrad8bit": ("Adagrad", ("sum",))}


def _twin_kwargs(name, opt):
    rule, hp = _hp(opt)
    hp = dict(hp)
    if name == "Lion8bit":
        hp.pop("eps")
    return hp


@pytest.mark.parametrize("name", NAMES)
def test_small_tensors_keep_float32_state(name):
    x0 = torch.randn(50, 40, generator=torch.Generator().manual_seed(9))   # 2000 < 4096
    a, b = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    ours = getattr(ft, name)([a], **KWARGS[name])
    twin_name, keys = _TWIN[name]
    twin = getattr(ft, twin_name)([b], **_twin_kwargs(name, ours))
    _train(ours, a, 3, 10)
    _train(twin, b, 3, 10)
    st = ours.state[a]
    assert set(st) == {"step"} | {f"state{k}" for k in range(1, len(keys) + 1)}
    assert all(st[f"state{k}"].dtype == torch.float32 for k in range(1, len(keys) + 1))
    assert torch.equal(a, b)
    for k, key in enumerate(keys, 1):
        assert torch.equal(st[f"state{k}"], twin.state[b][key])
    # a smaller min_8bit_size makes the same tensor 8-bit
    c = torch.nn.Parameter(x0.clone())
    eight = getattr(ft, name)([c], **KWARGS[name], min_8bit_size=100)
    _train(eight, c, 1, 10)
    assert eight.state[c]["state1"].dtype == torch.uint8


# ---------------------------------------------------------------------------
# Bad input: a TypeError/ValueError naming the argument, nothing written
# ---------------------------------------------------------------------------

def _snapshot(opt):
    return {id(p): (p.detach().clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                         for k, v in opt.state.get(p, {}).items()})
            for g in opt.param_groups for p in g["params"]}


def _unchanged(opt, snap):
    for g in opt.param_groups:
        for p in g["params"]:
            p_old, st_old = snap[id(p)]
            assert torch.equal(p.detach(), p_old)
            st = opt.state.get(p, {})
            assert set(st) == set(st_old)
            for k, v in st_old.items():
                assert torch.equal(st[k], v) if isinstance(v, torch.Tensor) else st[k] == v


def _two_params(name):
    good = torch.nn.Parameter(torch.randn(N))
    bad = torch.nn.Parameter(torch.randn(N))
    opt = getattr(ft, name)([good, bad], **KWARGS[name])
    _train(opt, good, 1, 11)
    good.grad = torch.randn(N)
    return opt, good, bad


@pytest.mark.parametrize("name", NAMES)
def test_bad_gradient_is_refused_before_anything_is_written(name):
    opt, good, bad = _two_params(name)
    snap = _snapshot(opt)
    bad.grad_dtype = None   # torch refuses a gradient of another dtype unless told
    bad.grad = torch.randn(N, dtype=torch.float64)
    with pytest.raises(TypeError, match="param 1 of group 0 has a torch.float64 gradient.*'grad'"):
        opt.step()
    _unchanged(opt, snap)
    bad.grad = torch.randn(N).to_sparse()
    with pytest.raises(TypeError, match="param 1 of group 0 has a torch.sparse_coo gradient"):
        opt.step()
    _unchanged(opt, snap)
    bad.grad = None
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    _unchanged(opt, snap)


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.randn(N))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch warns about the duplicate
        opt = ft.Lion8bit([p, p])
    p.grad = torch.randn(N)
    with pytest.raises(ValueError, match="param 1 of group 0 is listed twice"):
        opt.step()
    assert not opt.state


def test_bad_loaded_state_is_refused():
    opt, good, bad = _two_params("AdamW8bit")
    sd = opt.state_dict()
    snap = _snapshot(opt)
    for t in (-1, 1.5, float("inf"), float("nan"), "3"):
        sd["state"][0]["step"] = t
        with pytest.raises(ValueError, match="'step' must be a count"):
            opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"][0][bnb8.NESTED]["absmax1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="absmax1.*33 elements"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"][0][bnb8.NESTED]["state2"] = torch.zeros(N, dtype=torch.int16)
    with pytest.raises(TypeError, match="state2.*int16"):
        opt.load_state_dict(sd)
    _unchanged(opt, snap)


def test_bad_parameters_are_refused():
    with pytest.raises(TypeError, match="float64"):
        ft.AdamW8bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(TypeError, match="float64"):
        ft.AdamW8bit([torch.nn.Parameter(torch.zeros(3))]).add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})


# (class, keyword arguments, the exception bitsandbytes raises, fastopt's match)
REFUSED = [
    ("AdamW8bit", dict(lr=-1.0), ValueError, "learning rate.*'lr'"),
    ("Adam8bit", dict(eps=-1.0), ValueError, "epsilon.*'eps'"),
    ("AdamW8bit", dict(betas=(1.0, 0.9)), ValueError, "index 0.*'betas'"),
    ("Lion8bit", dict(betas=(0.9, -0.1)), ValueError, "index 1.*'betas'"),
    ("Adam8bit", dict(weight_decay=-0.1), ValueError, "weight_decay.*'weight_decay'"),
    ("Adam8bit", dict(amsgrad=True), ValueError, "amsgrad"),
    ("AdamW8bit", dict(optim_bits=8), ValueError, "optim_bits"),
    ("SGD8bit", dict(lr=0.1), NotImplementedError, "momentum"),
    ("RMSprop8bit", dict(centered=True), NotImplementedError, "centered"),
    ("RMSprop8bit", dict(alpha=0.0), NotImplementedError, "alpha"),
    ("Adagrad8bit", dict(lr_decay=0.1), ValueError, "lr_decay"),
    ("Adagrad8bit", dict(initial_accumulator_value=0.1), ValueError,
     "initial_accumulator_value"),
    ("Adagrad8bit", dict(optim_bits=32), ValueError, "optim_bits"),
]


@pytest.mark.parametrize("name,kw,exc,match", REFUSED)
def test_refused_as_bitsandbytes_refuses(name, kw, exc, match):
    bnb = _bnb()
    with pytest.raises(exc):
        getattr(bnb.optim, name)([torch.nn.Parameter(torch.zeros(3))], **kw)
    with pytest.raises(exc, match=match):
        getattr(ft, name)([torch.nn.Parameter(torch.zeros(3))], **kw)


@pytest.mark.parametrize("name,kw,match", [
    ("SGD8bit", dict(lr=0.1, momentum=0.9, dampening=0.1), "'dampening'"),
    ("SGD8bit", dict(lr=0.1, momentum=0.9, nesterov=True), "'nesterov'"),
    ("RMSprop8bit", dict(momentum=0.9), "'momentum'"),
    ("AdamW8bit", dict(args=bnb8._Args(8, 4096, max_unorm=1.0)), "'args.max_unorm'"),
    ("AdamW8bit", dict(args=bnb8._Args(8, 4096, skip_zeros=True)), "'args.skip_zeros'"),
    ("AdamW8bit", dict(lr="fast"), "'lr'"),
])
def test_options_bitsandbytes_ignores_are_refused(name, kw, match):
    """bitsandbytes accepts these and computes without them; refused here."""
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(ft, name)([torch.nn.Parameter(torch.zeros(3))], **kw)


def test_args_object_replaces_the_options():
    p = torch.nn.Parameter(torch.randn(N))
    opt = ft.AdamW8bit([p], args=bnb8._Args(32, 4096))     # 32-bit state, as bitsandbytes
    _train(opt, p, 1, 12)
    assert opt.state[p]["state1"].dtype == torch.float32


def test_paged_state_warns_on_cpu_like_bitsandbytes():
    bnb = _bnb()
    for cls in (bnb.optim.AdamW8bit, ft.AdamW8bit):
        p = torch.nn.Parameter(torch.randn(N))
        opt = cls([p], is_paged=True)
        with pytest.warns(UserWarning, match="(?i)paged"):
            _train(opt, p, 1, 13)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train(opt, p, 1, 14)       # once per optimizer
