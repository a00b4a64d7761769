"""The slow, obvious version: RULES.md transcribed into plain NumPy.

Independent of fastopt on purpose (it does not use fastopt.rules' per-step
scalars): each function recomputes its own bias corrections and schedules from
the formulas. It runs in the arrays' own dtype: float64 arrays give the float64
reference; float32 arrays give "the reference run in float32 arithmetic" (NumPy 2
keeps Python-float scalars weak, so float32 stays float32). Scalars are float64.

    step(name, param, grad, state, scalars, hp, t)

updates ``param`` and the arrays in ``state`` in place; ``scalars`` (NAdam's
mu_product, ASGD's eta and mu) is a dict updated in place; ``t`` is 1-based.
"""

import math

import numpy as np


def lerp(m, g, w):
    return m + w * (g - m)


def nan_max(a, b):
    # torch.maximum: NaN wins
    return np.where(np.isnan(a) | (a > b), a, b)


def sign(x):
    # torch.sign: ±1, and 0 for zeros and NaN
    return np.where(x > 0, 1, np.where(x < 0, -1, 0)).astype(x.dtype)


def _grad(param, grad, hp, decoupled):
    """maximize, then L2 (added to g) or decoupled (θ shrunk) weight decay."""
    g = -grad if hp.get("maximize", False) else grad.copy()
    wd = hp.get("weight_decay", 0.0)
    if wd != 0:
        if decoupled:
            param *= 1.0 - hp["lr"] * wd
        else:
            g = g + wd * param
    return g


def _moments(state, g, beta1, beta2):
    """Adam's first and second moments, shared by Adam, NAdam and RAdam:
    m ← lerp(m, g, 1 − β1), v ← β2·v + (1 − β2)·g², stored; returns (m, v)."""
    m = lerp(state["exp_avg"], g, 1.0 - beta1)
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
    state["exp_avg"][...] = m
    state["exp_avg_sq"][...] = v
    return m, v


def sgd(param, grad, state, scalars, hp, t, decoupled=False):
    g = _grad(param, grad, hp, decoupled)
    mu = hp["momentum"]
    if mu != 0:
        if t == 1:
            b = g.copy()
        else:
            b = mu * state["momentum_buffer"] + (1.0 - hp["dampening"]) * g
        state["momentum_buffer"][...] = b
        g = g + mu * b if hp["nesterov"] else b
    param[...] = param - hp["lr"] * g


def sgdw(param, grad, state, scalars, hp, t):
    sgd(param, grad, state, scalars, hp, t, decoupled=True)


def adam(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, hp["decoupled_weight_decay"])
    m, v = _moments(state, g, beta1, beta2)
    if hp["amsgrad"]:
        v = nan_max(state["max_exp_avg_sq"], v)
        state["max_exp_avg_sq"][...] = v
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    # ε after the bias correction, which is applied as a multiplier 1/√bc2
    # (computed once in float64; one division per element fewer than √v/√bc2)
    denom = np.sqrt(v) * (1.0 / math.sqrt(bc2)) + hp["eps"]
    param[...] = param - (hp["lr"] / bc1) * m / denom


adamw = adam


def adagrad(param, grad, state, scalars, hp, t):
    g = _grad(param, grad, hp, False)
    clr = hp["lr"] / (1.0 + (t - 1) * hp["lr_decay"])
    s = state["sum"] + g * g
    state["sum"][...] = s
    param[...] = param - clr * g / (np.sqrt(s) + hp["eps"])


def rmsprop(param, grad, state, scalars, hp, t):
    alpha = hp["alpha"]
    g = _grad(param, grad, hp, False)
    v = alpha * state["square_avg"] + (1.0 - alpha) * g * g
    state["square_avg"][...] = v
    if hp["centered"]:
        ga = lerp(state["grad_avg"], g, 1.0 - alpha)
        state["grad_avg"][...] = ga
        avg = np.sqrt(v - ga * ga) + hp["eps"]
    else:
        avg = np.sqrt(v) + hp["eps"]
    if hp["momentum"] > 0:
        b = hp["momentum"] * state["momentum_buffer"] + g / avg
        state["momentum_buffer"][...] = b
        param[...] = param - hp["lr"] * b
    else:
        param[...] = param - hp["lr"] * g / avg


def adadelta(param, grad, state, scalars, hp, t):
    rho, eps = hp["rho"], hp["eps"]
    g = _grad(param, grad, hp, False)
    v = rho * state["square_avg"] + (1.0 - rho) * g * g
    state["square_avg"][...] = v
    delta = np.sqrt(state["acc_delta"] + eps) / np.sqrt(v + eps) * g
    state["acc_delta"][...] = rho * state["acc_delta"] + (1.0 - rho) * delta * delta
    param[...] = param - hp["lr"] * delta


def adamax(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, False)
    m = lerp(state["exp_avg"], g, 1.0 - beta1)
    u = nan_max(beta2 * state["exp_inf"], np.abs(g) + hp["eps"])   # ε inside the max
    state["exp_avg"][...] = m
    state["exp_inf"][...] = u
    param[...] = param - (hp["lr"] / (1.0 - beta1 ** t)) * m / u


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
    param[...] = param - (lr * (1.0 - mu) / (1.0 - prod)) * g / denom
    param[...] = param - (lr * mu_next / (1.0 - prod * mu_next)) * m / denom


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
        param[...] = param - m / bc1 * hp["lr"] * (math.sqrt(bc2) / (np.sqrt(v) + hp["eps"])) * r
    else:
        param[...] = param - m / bc1 * hp["lr"]


def asgd(param, grad, state, scalars, hp, t):
    lr, lambd = hp["lr"], hp["lambd"]
    g = _grad(param, grad, hp, False)
    eta, mu = scalars["eta"], scalars["mu"]
    param[...] = param * (1.0 - lambd * eta)
    param[...] = param - eta * g
    if mu != 1:
        state["ax"][...] = state["ax"] + (param - state["ax"]) * mu
    else:
        state["ax"][...] = param
    scalars["eta"] = lr / (1.0 + lambd * lr * t) ** hp["alpha"]
    scalars["mu"] = 1.0 / max(1.0, t - hp["t0"])


def rprop(param, grad, state, scalars, hp, t):
    etaminus, etaplus = hp["etas"]
    lo, hi = hp["step_sizes"]
    g = -grad if hp["maximize"] else grad.copy()
    s = g * state["prev"]
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0))  # NaN: sign 0
    step = state["step_size"] * factor.astype(param.dtype)
    step = np.where(step < lo, lo, np.where(step > hi, hi, step)).astype(param.dtype)
    state["step_size"][...] = step
    g = np.where(s < 0, 0, g).astype(param.dtype)
    param[...] = param - sign(g) * step
    state["prev"][...] = g


def lion(param, grad, state, scalars, hp, t):
    beta1, beta2 = hp["betas"]
    g = _grad(param, grad, hp, True)
    c = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    param[...] = param - hp["lr"] * sign(c)
    state["exp_avg"][...] = beta2 * state["exp_avg"] + (1.0 - beta2) * g


# Initial state, as RULES.md states it
def initial_state(name, hp, n, dtype):
    zeros = lambda: np.zeros(n, dtype)
    if name in ("SGD", "SGDW"):
        return {"momentum_buffer": zeros()} if hp["momentum"] != 0 else {}
    if name in ("Adam", "AdamW"):
        st = {"exp_avg": zeros(), "exp_avg_sq": zeros()}
        if hp["amsgrad"]:
            st["max_exp_avg_sq"] = zeros()
        return st
    if name == "Adagrad":
        return {"sum": np.full(n, hp["initial_accumulator_value"], dtype)}
    if name == "RMSprop":
        st = {"square_avg": zeros()}
        if hp["momentum"] > 0:
            st["momentum_buffer"] = zeros()
        if hp["centered"]:
            st["grad_avg"] = zeros()
        return st
    if name == "Adadelta":
        return {"square_avg": zeros(), "acc_delta": zeros()}
    if name == "Adamax":
        return {"exp_avg": zeros(), "exp_inf": zeros()}
    if name in ("NAdam", "RAdam"):
        return {"exp_avg": zeros(), "exp_avg_sq": zeros()}
    if name == "ASGD":
        return {"ax": zeros()}
    if name == "Rprop":
        return {"prev": zeros(), "step_size": np.full(n, hp["lr"], dtype)}
    if name == "Lion":
        return {"exp_avg": zeros()}
    raise KeyError(name)


def initial_scalars(name, hp):
    if name == "NAdam":
        return {"mu_product": 1.0}
    if name == "ASGD":
        return {"eta": hp["lr"], "mu": 1.0}
    return {}


def step(name, param, grad, state, scalars, hp, t):
    globals()[name.lower()](param, grad, state, scalars, hp, t)
