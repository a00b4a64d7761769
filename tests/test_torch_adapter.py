"""fastopt.torch the way users run it: a real model trained side by side with torch.optim.

The model is a small conv net with a LayerNorm on scikit-learn's bundled digits
(8x8 images, 10 classes), trained on fixed mini-batches. Every test drives
fastopt.torch.X and torch.optim.X through the same unmodified torch code (param
groups, LR schedulers, GradScaler, closures, checkpoints) and compares the results,
or checks exact bits where nothing may change.

Why tolerances and not bitwise equality against torch: per element, fastopt rounds
a + alpha*b twice where torch's CPU kernels fuse it into one FMA, so the two differ
in the last bit per step; training then amplifies that (a different last bit in a
weight changes the next forward pass). TOL below is the measured amplification over
the run with a margin, see its comment. Comparisons that involve one implementation
only (a checkpoint round trip, zero_grad variants, skipped steps) are bitwise.
"""

import contextlib
import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
datasets = pytest.importorskip("sklearn.datasets", reason="the model tests train on sklearn's digits")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402
from cases import AXES, kernel_paths  # noqa: E402
from fastopt import reference  # noqa: E402
from conftest import record  # noqa: E402
from fastopt.rules import RULES  # noqa: E402

TORCH_RULES = [name for name, rule in RULES.items() if rule.in_torch]
EXTRA_RULES = [name for name, rule in RULES.items() if not rule.in_torch]
DTYPES = {"f32": torch.float32, "f64": torch.float64}

# Normwise relative deviation max|a-b|/max|b| allowed between fastopt.torch and
# torch.optim (or, for a rule torch lacks, the NumPy reference) over a whole training run.
# Measured on this model and machine (the record() summary at the end of a run),
# largest over all rules, losses and final parameters: float32 7.2e-7 (RMSprop),
# float64 9.4e-16 (SGD): a few ulps, the training amplifies the per-step last-bit
# differences only mildly over 60 steps. Rprop and Lion (sign-based) come out
# bitwise equal. The margins (x28 in float32, x100 in float64) leave room for other
# CPUs' conv kernels; a wrong term in any update (a missed bias correction, decay on
# the wrong group, a stale learning rate) moves the result by >1e-4.
TOL = {torch.float32: 2e-5, torch.float64: 1e-13}

# Representative hyperparameters per rule: every buffer in use, the flags that change
# the math switched on, learning rates from tests/cases.py.
HP = {
    "SGD": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "SGDW": dict(momentum=0.9, dampening=0.1, weight_decay=0.05),
    "Adam": dict(amsgrad=True, weight_decay=0.01),
    "AdamW": dict(weight_decay=0.1),
    "Adagrad": dict(lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
    "Adadelta": dict(weight_decay=0.01),
    "Adamax": dict(weight_decay=0.01),
    "NAdam": dict(weight_decay=0.01, decoupled_weight_decay=True),
    "RAdam": dict(weight_decay=0.01),
    "ASGD": dict(t0=10.0, lambd=1e-3, weight_decay=0.01),  # averaging starts within the run
    "Rprop": dict(etas=(0.3, 1.5), step_sizes=(1e-5, 0.05)),
    "Lion": dict(lr=3e-4, weight_decay=0.1),
}
# a rule without an entry runs its fullest kernel path from the registry's probes
for _name in RULES:
    HP.setdefault(_name, {k: v for k, v in kernel_paths(_name)[0].items()
                          if v != RULES[_name].defaults[k] and k not in ("lr", "maximize")})
for _name, _hp in HP.items():
    _hp.setdefault("lr", AXES[_name]["lr"][0])


# ---------------------------------------------------------------------------
# Data, model, references
# ---------------------------------------------------------------------------

_DIGITS = {}


def digits(dtype):
    if dtype not in _DIGITS:
        d = datasets.load_digits()
        x = torch.tensor(d.images / 16.0, dtype=dtype).unsqueeze(1)
        _DIGITS[dtype] = (x, torch.tensor(d.target, dtype=torch.long))
    return _DIGITS[dtype]


def batches(steps, size=64, seed=0):
    """Fixed mini-batch indices: a permutation of the 1797 images, cycled."""
    perm = np.random.default_rng(seed).permutation(1797)
    return torch.from_numpy(np.resize(perm, steps * size).reshape(steps, size))


class Net(nn.Module):
    def __init__(self, width=16, unused=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, width, 3)
        self.norm = nn.LayerNorm(width * 16)
        self.head = nn.Linear(width * 16, 10)
        if unused:
            self.unused = nn.Linear(3, 3)  # never in forward(): its grads stay None

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.norm(x.flatten(1)))


def make_net(dtype, seed=0, **kw):
    """The same initial weights whatever the default dtype is (drawn in float32)."""
    with default_dtype(torch.float32):
        torch.manual_seed(seed)
        return Net(**kw).to(dtype)


def twins(dtype, **kw):
    """Two identical models: one for fastopt, one for torch."""
    a = make_net(dtype, **kw)
    return a, copy.deepcopy(a)


def loss_on(model, idx):
    x, y = digits(next(model.parameters()).dtype)
    return F.cross_entropy(model(x[idx]), y[idx])


def grouped(model, name, hp):
    """Two param groups: matrices/kernels with weight decay, biases and norm without
    (Rprop has no weight decay: its second group gets half the learning rate)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    if "weight_decay" in RULES[name].defaults:
        return [{"params": decay, "weight_decay": hp.get("weight_decay", 0.0)},
                {"params": rest, "weight_decay": 0.0}]
    return [{"params": decay}, {"params": rest, "lr": hp["lr"] * 0.5}]


class ReferenceOptimizer(torch.optim.Optimizer):
    """A rule torch lacks (SGDW, Lion, ...) as the slow obvious version: the NumPy
    reference (fastopt.reference) one tensor at a time, on NumPy views of the
    tensors, with torch's protocol around it (groups, state per parameter)."""

    def __init__(self, params, rule_name, **hp):
        self.rule_name = rule_name
        super().__init__(params, {**RULES[rule_name].defaults, **hp})

    @torch.no_grad()
    def step(self, closure=None):
        name = self.rule_name
        for group in self.param_groups:
            hp = {k: group[k] for k in RULES[name].defaults}
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"] = 0
                    st["arrays"] = reference.initial_state(name, hp, p.numel(),
                                                           p.detach().numpy().dtype)
                    st["scalars"] = reference.initial_scalars(name, hp)
                st["t"] += 1
                reference.step(name, p.detach().view(-1).numpy(),
                               p.grad.detach().reshape(-1).numpy(), st["arrays"],
                               st["scalars"], hp, st["t"])


def reference_class(name):
    if RULES[name].in_torch:
        return getattr(torch.optim, name)
    return lambda params, **hp: ReferenceOptimizer(params, name, **hp)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch keeps some per-step scalars (NAdam's mu_product, ASGD's eta/mu, `step`)
    in the default dtype: float64 runs set it so that torch computes them in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: one thread each, and torch's conv results cannot depend on
    # how the threads split the work
    old_t, old_f = torch.get_num_threads(), fastopt.get_num_threads()
    torch.set_num_threads(1)
    fastopt.set_num_threads(1)
    yield
    torch.set_num_threads(old_t)
    fastopt.set_num_threads(old_f)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def normwise(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_close_run(ours, theirs, dtype, what, rule="", suite="torch.model"):
    rel = normwise(ours, theirs)
    if rule:
        record(suite, what, rule, str(dtype).replace("torch.", ""), np.asarray(ours),
               np.asarray(theirs))
    assert np.all(np.isfinite(np.asarray(theirs))), f"{what}: the reference run diverged"
    assert rel <= TOL[dtype], f"{what}: normwise deviation {rel:.3e} > {TOL[dtype]:.1e}"


def bits(t):
    """A tensor's exact bytes (NaN-safe bitwise comparison)."""
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().to_dense()
    return t.clone().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), f"{what}: not bit-for-bit equal"


def train(model, opt, steps, sched=None, zero="alternate", on_step=None, seed=0):
    """The training loop users write; returns the loss of every step."""
    losses = []
    for i, idx in enumerate(batches(steps, seed=seed)):
        if zero == "alternate":
            if i % 2 == 0:
                opt.zero_grad(set_to_none=False)
            else:
                model.zero_grad()
        elif zero == "model":
            model.zero_grad()
        else:
            opt.zero_grad(set_to_none=(zero == "none"))
        loss = loss_on(model, idx)
        loss.backward()
        if on_step is not None:
            on_step(i)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return np.array(losses)


def side_by_side(name, dtype, steps, groups=grouped, sched=None, zero="alternate",
                 on_step=None, model_kw=None, hp=None):
    hp = dict(HP[name] if hp is None else hp)
    with default_dtype(dtype):
        m_fo, m_t = twins(dtype, **(model_kw or {}))
        o_fo = getattr(fot, name)(groups(m_fo, name, hp), **hp)
        o_t = reference_class(name)(groups(m_t, name, hp), **hp)
        s_fo = sched(o_fo) if sched else None
        s_t = sched(o_t) if sched else None
        l_fo = train(m_fo, o_fo, steps, s_fo, zero, on_step and (lambda i: on_step(i, m_fo)))
        l_t = train(m_t, o_t, steps, s_t, zero, on_step and (lambda i: on_step(i, m_t)))
    return (m_fo, o_fo, l_fo), (m_t, o_t, l_t)


def plain(model, name, hp):
    return model.parameters()


# ---------------------------------------------------------------------------
# The classes
# ---------------------------------------------------------------------------

def test_every_registry_rule_is_a_torch_optimizer():
    for name, rule in RULES.items():
        cls = getattr(fot, name)
        assert issubclass(cls, torch.optim.Optimizer), name
        assert hasattr(torch.optim, name) == rule.in_torch, name


@pytest.mark.parametrize("name", TORCH_RULES)
def test_defaults_and_validation_messages_are_torchs(name):
    p = [nn.Parameter(torch.zeros(3))]
    assert getattr(fot, name)(p).defaults == getattr(torch.optim, name)(p).defaults
    bad = {"lr": -1.0, "eps": -1.0, "weight_decay": -1.0, "momentum": -1.0,
           "betas": (1.0, 0.999), "rho": 1.5, "etas": (1.5, 1.2),
           "lr_decay": -1.0, "initial_accumulator_value": -1.0}
    for key, value in bad.items():
        if key not in RULES[name].defaults:
            continue
        with pytest.raises(ValueError) as theirs:
            getattr(torch.optim, name)(p, **{key: value})
        with pytest.raises(ValueError) as ours:
            getattr(fot, name)(p, **{key: value})
        assert str(theirs.value) in str(ours.value), (key, str(ours.value))


# ---------------------------------------------------------------------------
# Parity on the digits model
# ---------------------------------------------------------------------------

STEPS = 60


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", list(RULES))
def test_trains_like_torch(name, dt):
    """60 steps, two param groups with different weight decay, StepLR, zero_grad
    alternating between the optimizer's (set_to_none=False) and the model's."""
    dtype = DTYPES[dt]
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    (m_fo, o_fo, l_fo), (m_t, o_t, l_t) = side_by_side(name, dtype, STEPS, sched=sched)
    assert l_t[-1] < l_t[0], "the reference did not train: the test would prove little"
    assert o_fo.param_groups[0]["lr"] == o_t.param_groups[0]["lr"] == HP[name]["lr"] / 8
    assert_close_run(l_fo, l_t, dtype, "loss", name)
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param", name)
    if name in TORCH_RULES:
        for p_fo, p_t in zip(m_fo.parameters(), m_t.parameters()):
            for key, v in o_t.state[p_t].items():
                if torch.is_tensor(v) and v.numel() > 1:
                    assert_close_run(o_fo.state[p_fo][key], v, dtype, f"state {key}")
                else:
                    assert float(o_fo.state[p_fo][key]) == pytest.approx(float(v), rel=1e-6), key


@pytest.mark.parametrize("name", list(RULES))
def test_frozen_and_gradless_params_are_untouched(name):
    """A frozen parameter and one of a module outside forward() are in the optimizer:
    no decay, no state, no step count, grads stay None: as in torch."""
    dtype = torch.float64

    def frozen(model, name, hp):
        model.conv1.bias.requires_grad_(False)
        return model.parameters()

    (m_fo, o_fo, _), (m_t, o_t, _) = side_by_side(
        name, dtype, 8, groups=frozen, model_kw={"unused": True})
    init = make_net(dtype, unused=True)
    for p_fo, p_t, (pname, p0) in zip(m_fo.parameters(), m_t.parameters(),
                                      init.named_parameters()):
        st_fo, st_t = o_fo.state.get(p_fo, {}), o_t.state.get(p_t, {})
        untouched = pname.startswith("unused") or pname == "conv1.bias"
        if untouched:
            assert_bitwise(p_fo, p0, pname)
            assert p_fo.grad is None, pname
        if name not in TORCH_RULES:
            if untouched:  # at most state as created, never stepped
                assert all(not torch.as_tensor(v).any() for v in st_fo.values()), pname
            continue
        # torch creates no state for them, except Adagrad's eager (step 0, sum)
        assert set(st_fo) == set(st_t), pname
        for key, v in st_t.items():
            if untouched:
                assert_bitwise(torch.as_tensor(st_fo[key]).to(v.dtype).reshape(v.shape), v,
                               f"{pname} state {key}")
            elif v.numel() == 1:
                assert float(st_fo[key]) == pytest.approx(float(v), rel=1e-12), key
        if "step" in st_t:
            assert float(st_t["step"]) == (0 if untouched else 8)
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")
    if name in TORCH_RULES:
        assert sorted(o_fo.state_dict()["state"]) == sorted(o_t.state_dict()["state"])


@pytest.mark.parametrize("name", ["Adam", "NAdam", "RAdam", "Adamax", "ASGD", "Adagrad"])
def test_step_counts_differ_within_a_group(name):
    """Params whose grad is None are skipped for some steps: each keeps its own step
    count (bias corrections, NAdam's mu_product, ASGD's eta/mu) as in torch."""
    dtype = torch.float64

    def drop(i, model):
        if i < 3:
            model.conv1.weight.grad = None   # starts late
        if i == 5 or i == 6:
            model.head.bias.grad = None      # a hole in the middle
        if i >= 8:
            model.norm.weight.grad = None    # stops early

    (m_fo, o_fo, l_fo), (m_t, o_t, l_t) = side_by_side(name, dtype, 12, groups=plain,
                                                       on_step=drop, zero="model")
    counts_t = [float(o_t.state[p]["step"]) for p in m_t.parameters()]
    counts_fo = [float(o_fo.state[p]["step"]) for p in m_fo.parameters()]
    assert counts_fo == counts_t
    assert len(set(counts_t)) == 4  # 12, 9, 10, 8: the test exercises what it says
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")
    for p_fo, p_t in zip(m_fo.parameters(), m_t.parameters()):
        for key, v in o_t.state[p_t].items():
            if torch.is_tensor(v) and v.numel() > 1:
                assert_close_run(o_fo.state[p_fo][key], v, dtype, f"state {key}")
            else:
                assert float(o_fo.state[p_fo][key]) == pytest.approx(float(v), rel=1e-9), key


@pytest.mark.parametrize("name", ["Adam", "SGD", "NAdam"])
def test_add_param_group_mid_training(name):
    dtype = torch.float64
    hp = HP[name]
    results = []
    with default_dtype(dtype):
        for cls in (getattr(fot, name), getattr(torch.optim, name)):
            model = make_net(dtype)
            body = [p for n, p in model.named_parameters() if not n.startswith("head")]
            opt = cls(body, **hp)
            train(model, opt, 5, zero="model")
            head0 = [p.detach().clone() for p in model.head.parameters()]
            opt.add_param_group({"params": list(model.head.parameters()), "lr": hp["lr"] / 2,
                                 "tag": "head"})
            for p, p0 in zip(model.head.parameters(), head0):
                assert_bitwise(p, p0, "head changed by add_param_group")
            train(model, opt, 5, zero="model", seed=1)
            results.append((model, opt))
    (m_fo, o_fo), (m_t, o_t) = results
    assert o_fo.param_groups[1]["tag"] == "head"
    assert o_fo.param_groups[1]["lr"] == hp["lr"] / 2
    for key in o_t.param_groups[1]:
        if key != "params":
            assert o_fo.param_groups[1][key] == o_t.param_groups[1][key], key
    for p_fo, p_t in zip(m_fo.parameters(), m_t.parameters()):
        if "step" in o_t.state[p_t]:
            assert float(o_fo.state[p_fo]["step"]) == float(o_t.state[p_t]["step"])
    assert float(o_fo.state[m_fo.head.weight].get("step", 5)) == 5
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_one_cycle_moves_momentum_as_in_torch(name):
    dtype = torch.float64
    sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=HP[name]["lr"],
                                                           total_steps=30)
    (m_fo, o_fo, l_fo), (m_t, o_t, l_t) = side_by_side(name, dtype, 30, sched=sched)
    key = "betas" if name == "Adam" else "momentum"
    for g_fo, g_t in zip(o_fo.param_groups, o_t.param_groups):
        assert g_fo[key] == g_t[key] and g_fo["lr"] == g_t["lr"]
    assert_close_run(l_fo, l_t, dtype, "loss")
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")


def test_reduce_lr_on_plateau_as_in_torch():
    dtype = torch.float64
    hp = dict(HP["Adam"], lr=0.05)
    runs = []
    with default_dtype(dtype):
        for cls in (fot.Adam, torch.optim.Adam):
            model = make_net(dtype)
            opt = cls(model.parameters(), **hp)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            lrs = []
            for i, idx in enumerate(batches(30)):
                opt.zero_grad()
                loss = loss_on(model, idx)
                loss.backward()
                opt.step()
                sched.step(loss.item())
                lrs.append(opt.param_groups[0]["lr"])
            runs.append((model, lrs))
    (m_fo, lr_fo), (m_t, lr_t) = runs
    assert lr_t[-1] < hp["lr"], "the plateau never came: the test would prove little"
    assert lr_fo == lr_t
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_grad_scaler_skips_an_overflow_step(name):
    """GradScaler("cpu"): an inf in one grad skips the step (params, state and step
    count exactly as before) and halves the scale, for fastopt as for torch."""
    dtype = torch.float32
    hp = HP[name]
    runs = []
    for cls in (getattr(fot, name), getattr(torch.optim, name)):
        model = make_net(dtype)
        opt = cls(model.parameters(), **hp)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
        scales = []
        for i, idx in enumerate(batches(8)):
            opt.zero_grad()
            scaler.scale(loss_on(model, idx)).backward()
            if i == 4:
                model.conv2.weight.grad[0, 0, 0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
                state = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            if i == 4:
                for p, p0 in zip(model.parameters(), before):
                    assert_bitwise(p, p0, f"{cls.__module__}: param changed on the skipped step")
                for k, v in state.items():
                    assert_bitwise(opt.state[model.head.weight][k], v, f"state {k}")
        runs.append((model, opt, scales))
    (m_fo, o_fo, s_fo), (m_t, o_t, s_t) = runs
    assert s_fo == s_t and s_t[4] == s_t[3] / 2
    if name == "Adam":
        assert float(o_fo.state[m_fo.head.weight]["step"]) == 7
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Rprop"])
def test_step_with_closure(name):
    """step(closure) evaluates the closure with grad enabled (even under no_grad)
    and returns its loss."""
    dtype = torch.float64
    runs = []
    with default_dtype(dtype):
        for cls in (getattr(fot, name), getattr(torch.optim, name)):
            model = make_net(dtype)
            opt = cls(model.parameters(), **HP[name])
            losses = []
            for idx in batches(6):
                def closure():
                    opt.zero_grad()
                    loss = loss_on(model, idx)
                    loss.backward()
                    return loss
                with torch.no_grad():
                    loss = opt.step(closure)
                assert torch.is_tensor(loss) and loss.requires_grad
                losses.append(loss.item())
            runs.append((model, losses))
    (m_fo, l_fo), (m_t, l_t) = runs
    assert_close_run(l_fo, l_t, dtype, "loss")
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True),
                                   dict(fused=False, foreach=None)], ids=str)
def test_dispatch_flags_are_accepted_and_change_nothing(flags):
    dtype = torch.float64
    out = []
    for kw in ({}, flags):
        model = make_net(dtype)
        opt = fot.AdamW(model.parameters(), **HP["AdamW"], **kw)
        train(model, opt, 5)
        out.append(flat(model))
    assert_bitwise(out[0], out[1], f"{flags} changed the result")


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def through_disk(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resume(cls, ckpt, dtype, name):
    """A fresh model and optimizer from a checkpoint, as a user's script does."""
    model = make_net(dtype, seed=123)
    model.load_state_dict(ckpt["model"])
    opt = cls(grouped(model, name, HP[name]), **HP[name])
    opt.load_state_dict(ckpt["opt"])
    return model, opt


def checkpoint(model, opt):
    return through_disk({"model": model.state_dict(), "opt": opt.state_dict()})


K, M = 6, 6


def run_from(cls, name, dtype, steps, model=None, opt=None, seed=0):
    if model is None:
        model = make_net(dtype)
        opt = cls(grouped(model, name, HP[name]), **HP[name])
    train(model, opt, steps, seed=seed)
    return model, opt


@pytest.mark.parametrize("name", TORCH_RULES)
def test_checkpoint_round_trip_through_torch_is_bitwise(name):
    """fastopt -> torch.save -> torch.optim -> torch.save -> fastopt, then continue:
    bit-for-bit the uninterrupted fastopt run (float64)."""
    dtype = torch.float64
    fo, to = getattr(fot, name), getattr(torch.optim, name)
    with default_dtype(dtype):
        m_a, o_a = run_from(fo, name, dtype, K)
        ck = checkpoint(m_a, o_a)
        m_t, o_t = resume(to, ck, dtype, name)
        m_b, o_b = resume(fo, checkpoint(m_t, o_t), dtype, name)
        run_from(fo, name, dtype, M, m_a, o_a, seed=1)
        run_from(fo, name, dtype, M, m_b, o_b, seed=1)
    assert_bitwise(flat(m_b), flat(m_a), "params after the round trip")
    for p_a, p_b in zip(m_a.parameters(), m_b.parameters()):
        assert set(o_a.state[p_a]) == set(o_b.state[p_b])
        for key, v in o_a.state[p_a].items():
            if torch.is_tensor(v):
                assert_bitwise(o_b.state[p_b][key].reshape(v.shape), v, key)
            else:
                assert o_b.state[p_b][key] == v, key


@pytest.mark.parametrize("direction", ["fastopt->torch", "torch->fastopt"])
@pytest.mark.parametrize("name", TORCH_RULES)
def test_checkpoint_continues_in_the_other_library(name, direction):
    dtype = torch.float64
    fo, to = getattr(fot, name), getattr(torch.optim, name)
    first, then = (fo, to) if direction == "fastopt->torch" else (to, fo)
    with default_dtype(dtype):
        m1, o1 = run_from(first, name, dtype, K)
        m2, o2 = resume(then, checkpoint(m1, o1), dtype, name)
        run_from(then, name, dtype, M, m2, o2, seed=1)
        ref, ref_opt = run_from(to, name, dtype, K)
        run_from(to, name, dtype, M, ref, ref_opt, seed=1)
    assert_close_run(flat(m2), flat(ref), dtype, "param")


@pytest.mark.parametrize("name", TORCH_RULES)
def test_state_dict_has_torchs_structure(name):
    """Same run, same structure: state indices and keys, value kinds, shapes and
    dtypes, param_groups keys and values."""
    dtype = torch.float32

    def groups(model, name, hp):
        model.conv1.bias.requires_grad_(False)
        g = grouped(model, name, hp)
        g[0]["name"] = "decay"  # an extra key: kept, as torch keeps it
        return g

    (m_fo, o_fo, _), (m_t, o_t, _) = side_by_side(name, dtype, 3, groups=groups,
                                                  model_kw={"unused": True})
    sd_fo, sd_t = o_fo.state_dict(), o_t.state_dict()
    problems = []
    if set(sd_fo) != set(sd_t):
        problems.append(f"top-level keys {sorted(sd_fo)} vs torch {sorted(sd_t)}")
    if sorted(sd_fo["state"]) != sorted(sd_t["state"]):
        problems.append(f"state indices {sorted(sd_fo['state'])} vs {sorted(sd_t['state'])}")
    for i, st in sd_t["state"].items():
        ours = sd_fo["state"].get(i, {})
        if set(ours) != set(st):
            problems.append(f"state[{i}] keys {sorted(ours)} vs torch {sorted(st)}")
        for k, v in st.items():
            if k not in ours:
                continue
            o = ours[k]
            if torch.is_tensor(v) != torch.is_tensor(o):
                problems.append(f"state[{i}][{k!r}] is {type(o).__name__}, torch {type(v).__name__}")
            elif torch.is_tensor(v) and o.shape == v.shape == () and k != "step" and \
                    (o.dtype, v.dtype) == (torch.float64, torch.float32):
                pass  # fastopt keeps per-step scalars (mu_product, eta, mu) in float64
            elif torch.is_tensor(v) and (o.shape, o.dtype) != (v.shape, v.dtype):
                problems.append(f"state[{i}][{k!r}] {tuple(o.shape)} {o.dtype} vs torch "
                                f"{tuple(v.shape)} {v.dtype}")
    for j, (g_fo, g_t) in enumerate(zip(sd_fo["param_groups"], sd_t["param_groups"])):
        if set(g_fo) != set(g_t):
            problems.append(f"param_groups[{j}] extra {sorted(set(g_fo) - set(g_t))}, "
                            f"missing {sorted(set(g_t) - set(g_fo))}")
        for k in set(g_fo) & set(g_t):
            if g_fo[k] != g_t[k]:
                problems.append(f"param_groups[{j}][{k!r}] = {g_fo[k]!r}, torch {g_t[k]!r}")
    # a state tensor that is a view of a flat buffer would save the whole buffer
    size = {}
    for who, sd in (("fastopt", sd_fo), ("torch", sd_t)):
        buf = io.BytesIO()
        torch.save(sd, buf)
        size[who] = buf.tell()
    if size["fastopt"] > 1.1 * size["torch"]:
        problems.append(f"torch.save writes {size['fastopt']} bytes, torch {size['torch']}")
    assert not problems, "; ".join(problems)
    through_disk(sd_fo)  # loadable with weights_only=True


def test_named_parameters_as_in_torch():
    model = make_net(torch.float32)
    twin = copy.deepcopy(model)
    o_fo = fot.AdamW(model.named_parameters(), lr=3e-4, weight_decay=0.1)
    o_t = torch.optim.AdamW(twin.named_parameters(), lr=3e-4, weight_decay=0.1)
    assert o_fo.param_groups[0]["param_names"] == o_t.param_groups[0]["param_names"]
    train(model, o_fo, 2)
    train(twin, o_t, 2)
    assert o_fo.state_dict()["param_groups"] == o_t.state_dict()["param_groups"]
    o_t.load_state_dict(through_disk(o_fo.state_dict()))


# ---------------------------------------------------------------------------
# In place: the model's tensors stay where they are
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
def test_params_grads_and_state_stay_where_they_are(dt):
    """Building the optimizer and stepping move nothing: each parameter keeps its
    storage, each gradient stays the tensor backward made, the state is the
    tensors the optimizer made at the first step, and zero_grad() is torch's
    (set_to_none=True)."""
    dtype = DTYPES[dt]
    model = make_net(dtype, unused=True)
    model.conv1.bias.requires_grad_(False)
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    opt = fot.Adam(grouped(model, "Adam", HP["Adam"]), **HP["Adam"])
    for n, p in model.named_parameters():
        assert p is before[n][0] and p.data_ptr() == before[n][1], n
        assert_bitwise(p, before[n][2], f"building the optimizer changed {n}")
    state_ptrs = None
    for i, idx in enumerate(batches(3)):
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        loss_on(model, idx).backward()
        grads = {n: (p.grad, p.grad.data_ptr()) for n, p in model.named_parameters()
                 if p.grad is not None}
        opt.step()
        for n, p in model.named_parameters():
            assert p.data_ptr() == before[n][1], f"{n} was re-pointed"
            if n in grads:
                assert p.grad is grads[n][0] and p.grad.data_ptr() == grads[n][1], n
        ptrs = {n: {k: v.data_ptr() for k, v in opt.state[p].items()}
                for n, p in model.named_parameters() if p in opt.state}
        assert state_ptrs is None or ptrs == state_ptrs, "state tensors were replaced"
        state_ptrs = ptrs
    assert model.conv1.bias.grad is None and model.conv1.bias not in opt.state
    assert all(p.grad is None for p in model.unused.parameters())
    assert all(p not in opt.state for p in model.unused.parameters())


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_model_zero_grad_gives_the_same_numbers(name, dt):
    """Gradients set to None (torch's default), zeroed in place by the optimizer or
    by the model: bit-for-bit the same run."""
    dtype = DTYPES[dt]
    runs = {}
    for zero in ("model", "optimizer", "none", "alternate"):
        model = make_net(dtype, unused=True)
        opt = getattr(fot, name)(grouped(model, name, HP[name]), **HP[name])
        losses = train(model, opt, 6, zero=zero)
        runs[zero] = (flat(model), torch.tensor(losses))
    for zero, (p, l) in runs.items():
        assert_bitwise(p, runs["model"][0], f"params, zero_grad via {zero}")
        assert_bitwise(l, runs["model"][1], f"losses, zero_grad via {zero}")


# ---------------------------------------------------------------------------
# Bad input: the stated exception, a message naming the problem, nothing changed
# ---------------------------------------------------------------------------

def snapshot(model, opt):
    params = list(model.parameters())
    return {
        "data": [bits(p) for p in params],
        "ptr": [p.data_ptr() for p in params],
        "grad": [None if p.grad is None else bits(p.grad) for p in params],
        "state": [{k: bits(v) if torch.is_tensor(v) else v
                   for k, v in (opt.state.get(p, {}) if opt else {}).items()} for p in params],
        "groups": [{k: v for k, v in g.items() if k != "params"}
                   for g in (opt.param_groups if opt else [])],
    }


def assert_unchanged(before, after):
    assert before["ptr"] == after["ptr"], "params re-pointed"
    for a, b in zip(before["data"], after["data"]):
        assert torch.equal(a, b), "a param changed"
    for a, b in zip(before["grad"], after["grad"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), "a grad changed"
    for sa, sb in zip(before["state"], after["state"]):
        assert set(sa) == set(sb), "state keys changed"
        for k in sa:
            same = torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
            assert same, f"state {k} changed"
    assert before["groups"] == after["groups"], "param_groups changed"


def test_non_tensor_params_raise_type_error():
    with pytest.raises(TypeError, match="Tensors.*float"):
        fot.Adam([1.0, 2.0])
    with pytest.raises(TypeError, match="Tensors.*ndarray"):
        fot.Adam([{"params": [np.zeros(3)]}])
    with pytest.raises(TypeError, match="iterable"):
        fot.Adam(torch.zeros(3, requires_grad=True))  # a tensor, not an iterable of them
    ok = nn.Parameter(torch.randn(4))
    before = snapshot(nn.ParameterList([ok]), None)
    with pytest.raises(TypeError, match="Tensors.*float"):
        fot.Adam([ok, 1.0])  # the tensor before it is neither packed nor changed
    assert_unchanged(before, snapshot(nn.ParameterList([ok]), None))


def test_non_float_params_raise_type_error():
    ok = nn.Parameter(torch.randn(4))
    cplx = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    before = snapshot(nn.ParameterList([ok]), None)
    with pytest.raises(TypeError, match="complex64"):
        fot.AdamW([ok, cplx])
    assert_unchanged(before, snapshot(nn.ParameterList([ok]), None))


def test_mixed_devices_in_a_group_raise_value_error():
    cpu = nn.Parameter(torch.randn(4))
    other = nn.Parameter(torch.empty(4, device="cuda" if torch.cuda.is_available() else "meta"))
    before = snapshot(nn.ParameterList([cpu]), None)
    with pytest.raises(ValueError, match="(?i)device"):
        fot.SGD([cpu, other], lr=0.1)
    assert_unchanged(before, snapshot(nn.ParameterList([cpu]), None))


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_raise_value_error(flag):
    p = nn.Parameter(torch.randn(4))
    before = snapshot(nn.ParameterList([p]), None)
    with pytest.raises(ValueError, match=flag):
        fot.Adam([p], **{flag: True})
    assert_unchanged(before, snapshot(nn.ParameterList([p]), None))
    fot.Adam([p], **{flag: False})


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.emb = nn.Embedding(10, 4, sparse=True)


def test_sparse_gradient_raises_type_error_and_changes_nothing():
    torch.manual_seed(0)
    model = WithEmbedding()
    opt = fot.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    x = torch.randn(5, 4)
    for _ in range(2):  # state for the dense layer; the embedding has no grad yet
        opt.zero_grad()
        model.lin(x).square().sum().backward()
        opt.step()
    opt.zero_grad()
    model.lin(model.emb(torch.tensor([1, 3])) + x[:2]).square().sum().backward()
    assert model.emb.weight.grad.is_sparse
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="(?i)sparse"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


def _trained(cls, model=None, steps=2, **hp):
    model = model or make_net(torch.float32)
    opt = cls(model.parameters(), **hp)
    train(model, opt, steps, zero="optimizer")
    return model, opt


@pytest.mark.parametrize("source", ["fastopt", "torch"])
def test_state_dict_of_another_optimizer_raises_value_error(source):
    model, opt = _trained(fot.Adam, lr=0.01)
    lib = fot if source == "fastopt" else torch.optim
    _, other = _trained(lib.SGD, lr=0.1, momentum=0.9)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="(?i)exp_avg|momentum_buffer|SGD|Adam|state"):
        opt.load_state_dict(through_disk(other.state_dict()))
    assert_unchanged(before, snapshot(model, opt))


def test_state_dict_of_other_shapes_raises_value_error():
    model, opt = _trained(fot.Adam, lr=0.01)
    _, other = _trained(torch.optim.Adam, model=make_net(torch.float32, width=12), lr=0.01)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="(?i)shape|size"):
        opt.load_state_dict(through_disk(other.state_dict()))
    assert_unchanged(before, snapshot(model, opt))


def test_state_dict_of_other_groups_raises_value_error():
    model, opt = _trained(fot.Adam, lr=0.01)
    twin = make_net(torch.float32)
    other = torch.optim.Adam(grouped(twin, "Adam", {}), lr=0.01)
    train(twin, other, 2)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="(?i)group"):
        opt.load_state_dict(through_disk(other.state_dict()))
    assert_unchanged(before, snapshot(model, opt))
    # same group count, a different number of params in a group
    sd = through_disk(opt.state_dict())
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="(?i)group|size|param"):
        opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(model, opt))


# ---------------------------------------------------------------------------
# The segment tables the adapter hands to the kernel engine
# ---------------------------------------------------------------------------

import fastopt.torch.optimizer as fot_optimizer  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Every run_segments call: (kernel, a copy of its table, lengths, check)."""
    seen = []
    real = fot_optimizer.run_segments

    def recording(backend, kernel, dtype, ptrs, lengths, args, nthreads, check=True,
                  **storage):
        seen.append((kernel, ptrs.copy(), lengths.copy(), check))
        return real(backend, kernel, dtype, ptrs, lengths, args, nthreads, check=check,
                    **storage)

    monkeypatch.setattr(fot_optimizer, "run_segments", recording)
    return seen


def assert_unchecked_tables_were_checked(calls):
    """check=False only for a table identical to one checked before."""
    checked = []
    for kernel, ptrs, lengths, check in calls:
        if check:
            checked.append((ptrs, lengths))
        else:
            assert any(np.array_equal(ptrs, a) and np.array_equal(lengths, b)
                       for a, b in checked), "an unchecked table was never checked"


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_rows_are_segments(name, calls):
    """Each run of consecutive touched rows of a sparse gradient is one segment:
    param rows, gradient values, state rows; untouched rows are not read or
    written, and the result is torch's."""
    hp = dict(lr=0.1)
    runs = []
    for lib in (fot, torch.optim):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 3, sparse=True).double()
        opt = getattr(lib, name)(emb.parameters(), **hp)
        for idx in ([1, 2, 3, 7, 3], [0, 9]):
            opt.zero_grad()
            emb(torch.tensor(idx)).square().sum().backward()
            opt.step()
        runs.append((emb, opt))
    (e_fo, o_fo), (e_t, o_t) = runs
    assert_close_run(e_fo.weight.detach(), e_t.weight.detach(), torch.float64, "param")
    if name == "Adagrad":
        assert_close_run(o_fo.state[e_fo.weight]["sum"], o_t.state[e_t.weight]["sum"],
                         torch.float64, "sum")
        untouched = [4, 5, 6, 8]
        assert not o_fo.state[e_fo.weight]["sum"][untouched].any()
    base = e_fo.weight.data_ptr()
    row = 3 * 8
    (k1, t1, l1, c1), (k2, t2, l2, c2) = calls
    # the overlap check of sparse rows runs on the whole tensors, before the call
    assert not c1 and not c2
    assert list(l1) == [9, 3] and list(t1[:, 0]) == [base + 1 * row, base + 7 * row]
    assert list(l2) == [3, 3] and list(t2[:, 0]) == [base, base + 9 * row]
    if name == "Adagrad":
        s = o_fo.state[e_fo.weight]["sum"].data_ptr()
        assert list(t1[:, 2]) == [s + 1 * row, s + 7 * row]


def test_tables_follow_replaced_state_and_moved_params(calls):
    """A replaced state tensor, a param re-pointed with .data, new gradients: the
    next table holds the new addresses, checked; an unchanged table is reused
    unchecked; the run is torch's."""
    dtype = torch.float64
    runs = []
    for lib in (fot, torch.optim):
        model = make_net(dtype)
        opt = lib.Adam(model.parameters(), lr=0.01)
        for i, idx in enumerate(batches(8)):
            if i == 3:  # replaced state: a copy, scaled
                st = opt.state[model.head.weight]
                st["exp_avg"] = st["exp_avg"] * 0.5
            if i == 5:  # p.data re-pointed at a copy
                model.conv2.weight.data = model.conv2.weight.data.clone()
            opt.zero_grad()
            loss_on(model, idx).backward()
            opt.step()
        runs.append(model)
    assert_close_run(flat(runs[0]), flat(runs[1]), dtype, "param")
    assert_unchecked_tables_were_checked(calls)
    assert len(calls) == 8  # one call per step: one group, one device, one dtype
    model = runs[0]
    # the last table names the model's tensors as they are now
    last = calls[-1][1]
    ptrs = {int(a) for a in last[:, 0]}
    assert {p.data_ptr() for p in model.parameters()} == ptrs


def test_gradients_at_the_same_address_reuse_the_checked_table(calls):
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    g = torch.randn(5, dtype=torch.float64)
    opt = fot.AdamW([p])
    for _ in range(3):
        p.grad = g
        opt.step()
    assert [c for *_, c in calls] == [True, False, False]
    assert_unchecked_tables_were_checked(calls)


def test_overlapping_params_raise_value_error_and_change_nothing():
    base = torch.zeros(10, dtype=torch.float64)
    a, b = nn.Parameter(base[0:6]), nn.Parameter(base[4:10])
    opt = fot.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(overlap|shares memory).*param group 0"):
        opt.step()
    assert not base.any()


# ---------------------------------------------------------------------------
# What torch's own loop tolerates, fastopt.torch does the same way
# ---------------------------------------------------------------------------

def _side_by_side_loop(name, hp, build, mutate=None, steps=4):
    dtype = torch.float64
    out = []
    with default_dtype(dtype):
        for lib in (fot, torch.optim):
            model = make_net(dtype)
            opt = build(lib, model)
            for i, idx in enumerate(batches(steps)):
                opt.zero_grad()
                loss_on(model, idx).backward()
                if mutate is not None:
                    mutate(model)
                opt.step()
            out.append((model, opt))
    (m_fo, _), (m_t, _) = out
    assert_close_run(flat(m_fo), flat(m_t), dtype, "param")
    return out


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_gradients_with_other_strides(name):
    """A transposed gradient and a broadcast (stride 0) one step through copies in
    the parameter's layout."""
    def mutate(model):
        w, b = model.head.weight, model.head.bias
        w.grad = w.grad.t().contiguous().t()
        b.grad = b.grad.mean().reshape(1).expand_as(b)
    _side_by_side_loop(name, HP[name], lambda lib, m: getattr(lib, name)(m.parameters(),
                                                                       **HP[name]), mutate)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_a_parameter_listed_twice_is_stepped_twice(name):
    import warnings

    def build(lib, model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicate
            return getattr(lib, name)(list(model.parameters()) + [model.head.weight],
                                      **HP[name])
    (_, o_fo), (_, o_t) = _side_by_side_loop(name, HP[name], build)
    if name == "Adam":
        assert [float(s["step"]) for s in o_fo.state.values()] == \
            [float(s["step"]) for s in o_t.state.values()]


def test_a_checkpoint_without_newer_keys_loads_with_defaults():
    model, opt = _trained(fot.Adam, lr=0.01)
    sd = through_disk(opt.state_dict())
    for g in sd["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            del g[key]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False
    train(model, opt, 1)


def test_sparse_rows_refuse_state_that_aliases_the_parameter():
    """The whole-tensor overlap check of a sparse step: Adagrad's 'sum' made the
    parameter itself is a ValueError naming both, and nothing is written."""
    emb = nn.Embedding(10, 3, sparse=True)
    opt = fot.Adagrad(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    opt.state[emb.weight]["sum"] = emb.weight.data   # the same memory
    before = emb.weight.detach().clone()
    opt.zero_grad()
    emb(torch.tensor([3])).sum().backward()
    with pytest.raises(ValueError, match=r"shares memory with .*param group 0"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
