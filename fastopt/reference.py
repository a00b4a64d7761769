"""Every element-wise rule in plain NumPy: the slow, obvious version.

The tests compare every backend against it, and ``fastopt bench`` times it as
its NumPy peer. It is independent of ``fastopt.rules`` on purpose: each function
recomputes its own bias corrections and schedules from the formulas, so a wrong
per-step scalar in the registry cannot hide behind the same wrong scalar here.
The compiled kernels evaluate each element in the order written here.

It runs in the arrays' own dtype: float64 arrays give the float64 reference,
float32 arrays "the reference run in float32 arithmetic" (NumPy 2 keeps
Python-float scalars weak, so float32 stays float32). Scalars are float64.

    state = initial_state(name, hp, n, dtype)
    scalars = initial_scalars(name, hp)
    step(name, param, grad, state, scalars, hp, t)      # t is 1-based

``step`` updates ``param`` and the arrays in ``state`` in place; ``scalars``
(NAdam's mu_product, ASGD's eta and mu) is a dict updated in place. ``grad`` is
never written.

A new rule is one function here, registered with ``@rule(name, state=...,
scalars=...)``: ``state(hp)`` maps each state buffer to its initial value.
"""

import math

import numpy as np

_RULES = {}   # name -> (step function, initial state, initial scalars)


def rule(*names, state=lambda hp: {}, scalars=lambda hp: {}):
    def register(fn):
        for name in names:
            _RULES[name] = (fn, state, scalars)
        return fn
    return register


def initial_state(name, hp, n, dtype):
    return {key: np.full(n, value, dtype) for key, value in _RULES[name][1](hp).items()}


def initial_scalars(name, hp):
    return dict(_RULES[name][2](hp))


def step(name, param, grad, state, scalars, hp, t):
    _RULES[name][0](param, grad, state, scalars, hp, t)


def names():
    return tuple(_RULES)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------

def nan_max(a, b):
    # torch.maximum: NaN wins
    return np.where(np.isnan(a) | (a > b), a, b)


def sign(x):
    # torch.sign: ±1, and 0 for zeros and NaN
    return np.where(x > 0, 1, np.where(x < 0, -1, 0)).astype(x.dtype)


def _grad(param, grad, hp, decoupled):
    """maximize, then L2 (added to g) or decoupled (θ shrunk) weight decay.
    Returns ``grad`` itself when neither applies: callers never write g."""
    g = -grad if hp.get("maximize", False) else grad
    wd = hp.get("weight_decay", 0.0)
    if wd != 0:
        if decoupled:
            param *= 1.0 - hp["lr"] * wd
        else:
            g = g + wd * param
    return g


def _moments(state, g, beta1, beta2):
    """Adam's moments, shared by Adam, NAdam and RAdam:
    m ← lerp(m, g, 1 − β1), v ← β2·v + (1 − β2)·g²; returns (m, v)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += (1.0 - beta1) * (g - m)
    v *= beta2
    v += (1.0 - beta2) * g * g
    return m, v


def _adam_state(hp):
    st = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    if hp.get("amsgrad"):
        st["max_exp_avg_sq"] = 0.0
    return st


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------

def _momentum_state(hp):
    return {"momentum_buffer": 0.0} if hp["momentum"] != 0 else {}


@rule("SGD", state=_momentum_state)
def sgd(param, grad, state, scalars, hp, t, decoupled=False):
    g = _grad(param, grad, hp, decoupled)
    mu = hp["momentum"]
    if mu != 0:
        b = state["momentum_buffer"]
        if t == 1:
            b[...] = g
        else:
            b *= mu
            b += (1.0 - hp["dampening"]) * g
        g = g + mu * b if hp["nesterov"] else b
    param -= hp["lr"] * g


@rule("SGDW", state=_momentum_state)
def sgdw(param, grad, state, scalars, hp, t):
    sgd(param, grad, state, scalars, hp, t, decoupled=True)


@rule("Adam", "AdamW", state=_adam_state)
def adam(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, hp["decoupled_weight_decay"])
    m, v = _moments(state, g, beta1, beta2)
    if hp["amsgrad"]:
        vmax = state["max_exp_avg_sq"]
        vmax[...] = nan_max(vmax, v)
        v = vmax
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    # ε after the bias correction, which is applied as a multiplier 1/√bc2
    # (computed once in float64; one division per element fewer than √v/√bc2)
    denom = np.sqrt(v) * (1.0 / math.sqrt(bc2)) + hp["eps"]
    param -= (hp["lr"] / bc1) * m / denom


@rule("Adagrad", state=lambda hp: {"sum": hp["initial_accumulator_value"]})
def adagrad(param, grad, state, scalars, hp, t):
    g = _grad(param, grad, hp, False)
    clr = hp["lr"] / (1.0 + (t - 1) * hp["lr_decay"])
    s = state["sum"]
    s += g * g
    param -= clr * g / (np.sqrt(s) + hp["eps"])


def _rmsprop_state(hp):
    st = {"square_avg": 0.0}
    if hp["momentum"] > 0:
        st["momentum_buffer"] = 0.0
    if hp["centered"]:
        st["grad_avg"] = 0.0
    return st


@rule("RMSprop", state=_rmsprop_state)
def rmsprop(param, grad, state, scalars, hp, t):
    alpha = hp["alpha"]
    g = _grad(param, grad, hp, False)
    v = state["square_avg"]
    v *= alpha
    v += (1.0 - alpha) * g * g
    if hp["centered"]:
        ga = state["grad_avg"]
        ga += (1.0 - alpha) * (g - ga)
        avg = np.sqrt(v - ga * ga) + hp["eps"]
    else:
        avg = np.sqrt(v) + hp["eps"]
    if hp["momentum"] > 0:
        b = state["momentum_buffer"]
        b *= hp["momentum"]
        b += g / avg
        param -= hp["lr"] * b
    else:
        param -= hp["lr"] * g / avg


@rule("Adadelta", state=lambda hp: {"square_avg": 0.0, "acc_delta": 0.0})
def adadelta(param, grad, state, scalars, hp, t):
    rho, eps = hp["rho"], hp["eps"]
    g = _grad(param, grad, hp, False)
    v, u = state["square_avg"], state["acc_delta"]
    v *= rho
    v += (1.0 - rho) * g * g
    delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
    u *= rho
    u += (1.0 - rho) * delta * delta
    param -= hp["lr"] * delta


@rule("Adamax", state=lambda hp: {"exp_avg": 0.0, "exp_inf": 0.0})
def adamax(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, False)
    m, u = state["exp_avg"], state["exp_inf"]
    m += (1.0 - beta1) * (g - m)
    u[...] = nan_max(beta2 * u, np.abs(g) + hp["eps"])   # ε inside the max
    param -= (hp["lr"] / (1.0 - beta1 ** t)) * m / u


@rule("NAdam", state=_adam_state, scalars=lambda hp: {"mu_product": 1.0})
def nadam(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    lr, psi = hp["lr"], hp["momentum_decay"]
    g = _grad(param, grad, hp, hp["decoupled_weight_decay"])
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    scalars["mu_product"] *= mu
    prod = scalars["mu_product"]
    m, v = _moments(state, g, beta1, beta2)
    denom = np.sqrt(v / (1.0 - beta2 ** t)) + hp["eps"]
    param -= (lr * (1.0 - mu) / (1.0 - prod)) * g / denom
    param -= (lr * mu_next / (1.0 - prod * mu_next)) * m / denom


@rule("RAdam", state=_adam_state)
def radam(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, hp["decoupled_weight_decay"])
    m, v = _moments(state, g, beta1, beta2)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2 ** t / bc2
    if rho_t > 5.0:
        r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                      / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        # ε added before the bias correction, unlike Adam
        param -= m / bc1 * hp["lr"] * (math.sqrt(bc2) / (np.sqrt(v) + hp["eps"])) * r
    else:
        param -= m / bc1 * hp["lr"]


@rule("ASGD", state=lambda hp: {"ax": 0.0}, scalars=lambda hp: {"eta": hp["lr"], "mu": 1.0})
def asgd(param, grad, state, scalars, hp, t):
    lr, lambd = hp["lr"], hp["lambd"]
    g = _grad(param, grad, hp, False)
    eta, mu = scalars["eta"], scalars["mu"]
    param *= 1.0 - lambd * eta
    param -= eta * g
    ax = state["ax"]
    if mu != 1:
        ax += (param - ax) * mu
    else:
        ax[...] = param
    scalars["eta"] = lr / (1.0 + lambd * lr * t) ** hp["alpha"]
    scalars["mu"] = 1.0 / max(1.0, t - hp["t0"])


@rule("Rprop", state=lambda hp: {"prev": 0.0, "step_size": hp["lr"]})
def rprop(param, grad, state, scalars, hp, t):
    etaminus, etaplus = hp["etas"]
    lo, hi = hp["step_sizes"]
    g = -grad if hp["maximize"] else grad
    s = g * state["prev"]
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0))  # NaN: sign 0
    step = state["step_size"] * factor.astype(param.dtype)
    state["step_size"][...] = np.where(step < lo, lo, np.where(step > hi, hi, step))
    g = np.where(s < 0, 0, g).astype(param.dtype)
    param -= sign(g) * state["step_size"]
    state["prev"][...] = g


@rule("Lion", state=lambda hp: {"exp_avg": 0.0})
def lion(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, True)
    m = state["exp_avg"]
    param -= hp["lr"] * sign(beta1 * m + (1.0 - beta1) * g)
    m *= beta2
    m += (1.0 - beta2) * g


@rule("Signum", state=lambda hp: {"momentum_buffer": 0.0})
def signum(param, grad, state, scalars, hp, t):
    beta = hp["momentum"]
    g = _grad(param, grad, hp, True)
    m = state["momentum_buffer"]
    m *= beta
    m += (1.0 - beta) * g
    param -= hp["lr"] * sign(m)


def _sf_state(hp):
    st = {"z": 0.0}
    if "betas" in hp:
        st["exp_avg_sq"] = 0.0
    return st


@rule("ScheduleFreeAdamW", "ScheduleFreeSGD", state=_sf_state,
      scalars=lambda hp: {"weight_sum": 0.0, "lr_max": -1.0})
def schedulefree(param, grad, state, scalars, hp, t):
    # the schedulefree package's train-mode step, y = param
    warmup = hp["warmup_steps"]
    lr = hp["lr"] * (t / warmup if t - 1 < warmup else 1.0)
    scalars["lr_max"] = max(lr, scalars["lr_max"])
    weight = float(t) ** hp["r"] * scalars["lr_max"] ** hp["weight_lr_power"]
    scalars["weight_sum"] += weight
    c = weight / scalars["weight_sum"] if scalars["weight_sum"] != 0 else 0.0
    z = state["z"]
    if t == 1:
        z[...] = param
    g = grad
    if "betas" in hp:
        beta1, beta2 = hp["betas"]
        v = state["exp_avg_sq"]
        v *= beta2
        v += (1.0 - beta2) * g * g
        g = g / (np.sqrt(v) * (1.0 / math.sqrt(1.0 - beta2 ** t)) + hp["eps"])
    else:
        beta1 = hp["momentum"]
    if hp["weight_decay"] != 0:
        g = g + hp["weight_decay"] * param
    param += c * (z - param)
    param += lr * (beta1 * (1.0 - c) - 1.0) * g
    z -= lr * g
