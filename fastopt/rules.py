"""The rule registry: one row per update rule, read by every other layer.

A row says everything the rest of fastopt needs to know about a rule:

* its hyperparameters (torch.optim's names, defaults and validation messages),
* its state buffers (torch's key names, when each exists, what it starts at) and
  its scalar state (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``),
* ``plan``: the per-step scalars, computed once per call in float64, that the
  kernel of every backend takes after the buffers,
* the bytes per element it moves (the benchmark's denominator) and its paper.

Each kernel's calling convention is named here and nowhere else: its buffer slots
are param, grad, then ``Rule.buffers`` in order (``None``/absent for a buffer the
hyperparameters do not use), and its per-step arguments are ``Rule.plan_fields``,
the names of the tuple ``plan`` returns. ``fastopt/kernels/generate.py`` turns them
into the compiled backend's tables, the Numba backends build theirs from them at
import, and each backend runs a call over one or many segments (arrays). Every
backend also exposes one entry per ``Rule.kernel`` name,

    kernel(param, grad, *buffers, *plan_args, nthreads)

which steps one array. The per-element math behind each kernel is written out in
``docs/rules.md``; the NumPy reference the tests compare with transcribes it.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Hyper", "Buffer", "Rule", "RULES", "KERNELS", "get_rule", "kernel_rule",
           "StoredScalars"]

# State buffer slots of the kernels' calling convention (param and grad come first)
MAX_BUFFERS = 3
# Per-step scalars a kernel may take: the engines hold a plan in a double[32]
MAX_PLAN_FIELDS = 32


# ---------------------------------------------------------------------------
# Hyperparameter checks. One check per line with the bad value in the message,
# torch's wording first so that code matching torch's messages keeps working,
# then the argument's name (torch's messages do not always say it).
# ---------------------------------------------------------------------------

def _real(name: str, value: Any) -> float:
    if type(value) is float:  # the common case, without the ABC check below
        return value
    # bool is an int subclass; a flag passed as a rate is almost certainly a bug
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64's range (10**400)
        raise ValueError(f"{name} = {value!r} does not fit in a float") from None


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # numpy.bool_ and 0/1 ints are accepted; anything else is a mistake
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _pair(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair of real numbers, got {value!r}")
    return (_real(f"{name}[0]", value[0]), _real(f"{name}[1]", value[1]))


def _fail(message: str, name: str) -> None:
    raise ValueError(f"{message} (argument '{name}')")


def _lr(name, v, hp):
    if not 0.0 <= v:
        _fail(f"Invalid learning rate: {v}", name)


def _eps(name, v, hp):
    if not 0.0 <= v:
        _fail(f"Invalid epsilon value: {v}", name)


def _weight_decay(name, v, hp):
    if not 0.0 <= v:
        _fail(f"Invalid weight_decay value: {v}", name)


def _momentum(name, v, hp):
    if not 0.0 <= v:
        _fail(f"Invalid momentum value: {v}", name)


def _betas(name, v, hp):
    for i, b in enumerate(v):
        if not 0.0 <= b < 1.0:
            _fail(f"Invalid beta parameter at index {i}: {b}", name)


def _nonneg(label):
    def check(name, v, hp):
        if not 0.0 <= v:
            _fail(f"Invalid {label} value: {v}", name)
    return check


def _unit_interval(label):
    def check(name, v, hp):
        if not 0.0 <= v <= 1.0:
            _fail(f"Invalid {label} value: {v}", name)
    return check


def _finite(label):
    def check(name, v, hp):
        if not math.isfinite(v):
            _fail(f"Invalid {label} value: {v}", name)
    return check


def _finite_lr(name, v, hp):
    # ASGD: η = γ/(1 + λγt)^α is inf/inf = NaN for γ = inf (torch accepts it and
    # turns the parameter into NaN); refused here instead
    _lr(name, v, hp)
    if v == math.inf:
        _fail(f"Invalid learning rate: {v} (ASGD's η = lr/(1 + lambd·lr·t)^alpha "
              "would be inf/inf)", name)


def _finite_nonneg(label):
    # ASGD's λ: λ = inf makes λγt = 0·inf = NaN at γ = 0 (torch: a NaN parameter)
    def check(name, v, hp):
        if not 0.0 <= v < math.inf:
            _fail(f"Invalid {label} value: {v}", name)
    return check


def _etas(name, v, hp):
    if not 0.0 < v[0] < 1.0 < v[1]:
        _fail(f"Invalid eta values: {v[0]}, {v[1]}", name)


def _step_sizes(name, v, hp):
    if not 0.0 <= v[0] <= v[1]:
        _fail(f"Invalid step size values: {v[0]}, {v[1]}", name)


def _no_check(name, v, hp):
    pass


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: ``kind`` is 'real', 'flag' or 'pair'."""

    name: str
    default: Any
    kind: str = "real"
    check: Callable[[str, Any, Mapping[str, Any]], None] = _no_check
    doc: str = ""
    # the values the tests cross with every other hyperparameter's (every flag is
    # crossed with False and True): together they reach every term of the update
    probe: tuple = ()

    def coerce(self, value: Any) -> Any:
        """Type-check and normalise ``value`` (TypeError names the argument)."""
        if self.kind == "flag":
            return _flag(self.name, value)
        if self.kind == "pair":
            return _pair(self.name, value)
        return _real(self.name, value)


@dataclass(frozen=True)
class Buffer:
    """A state buffer of the parameter's dtype and length.

    ``needed(hp)`` says whether the current hyperparameters use it; ``fill(hp)``
    is its starting value.
    """

    name: str
    needed: Callable[[Mapping[str, Any]], bool] = lambda hp: True
    fill: Callable[[Mapping[str, Any]], float] = lambda hp: 0.0


@dataclass(frozen=True)
class Rule:
    name: str                       # the class name, as in torch.optim
    kernel: str                     # the kernel every backend implements
    hypers: tuple[Hyper, ...]
    buffers: tuple[Buffer, ...]
    plan: Callable[..., tuple]      # plan(hp, t, scalars, fresh) -> (kernel args, new scalars)
    bytes_per_element: Callable[[Mapping[str, Any], int], int]
    paper: str
    update: str                     # the update in one line, for docs
    # the names of plan's kernel arguments, in order; a trailing "?" marks a flag
    # (passed as 0.0/1.0). The generated kernel tables (fastopt/kernels/generate.py)
    # give each rule's body these names, so no backend indexes the tuple by hand.
    plan_fields: tuple[str, ...]
    scalars: tuple[tuple[str, Callable[[Mapping[str, Any]], float]], ...] = ()
    validate: Callable[[Mapping[str, Any]], None] = lambda hp: None
    # ValueError for scalar state no run can reach (a corrupt checkpoint, a bad
    # functional argument): checked where scalars come in from outside
    validate_scalars: Callable[[Mapping[str, float]], None] = lambda scalars: None
    in_torch: bool = True
    # torch keeps a per-parameter 'step' in this rule's state (its SGD does not)
    step_in_state: bool = True
    # torch makes this rule's state for every parameter at construction (Adagrad)
    state_at_init: bool = False
    defaults: dict = field(init=False, repr=False, compare=False)
    arg_names: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "defaults", {h.name: h.default for h in self.hypers})
        # the kernel's array arguments, in order: for messages that name them
        object.__setattr__(self, "arg_names",
                           ("param", "grad") + tuple(b.name for b in self.buffers))

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise TypeError(f"{self.name} has no hyperparameter {name!r}; "
                        f"it has {', '.join(h.name for h in self.hypers)}")

    def with_hyper(self, hp: Mapping[str, Any], name: str, value: Any) -> dict:
        """``hp`` (already checked) with ``name`` set to ``value``, checked: only the
        new value is coerced, every check runs (a check may read other values)."""
        new = dict(hp)
        new[name] = self.hyper(name).coerce(value)
        for h in self.hypers:
            h.check(h.name, new[h.name], new)
        self.validate(new)
        return new

    def check_hypers(self, values: Mapping[str, Any]) -> dict:
        """Coerce and validate a full set of hyperparameters; returns the clean dict."""
        hp = {}
        for h in self.hypers:
            hp[h.name] = h.coerce(values[h.name])
        for h in self.hypers:
            h.check(h.name, hp[h.name], hp)
        self.validate(hp)
        return hp

    def initial_scalars(self, hp: Mapping[str, Any]) -> dict:
        return {name: float(init(hp)) for name, init in self.scalars}

    def needed_buffers(self, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(b.name for b in self.buffers if b.needed(hp))


# ---------------------------------------------------------------------------
# Shared pieces of the rows
# ---------------------------------------------------------------------------

def _weight_decay_split(hp, decoupled: bool):
    """(L2 coefficient, decoupled decay factor) as the kernels take them.

    L2 adds λθ to the gradient; decoupled multiplies θ by (1 − γλ) first. The kernel
    skips the multiply when the factor is exactly 1 and the add when λ is 0.
    """
    wd = hp["weight_decay"]
    if decoupled:
        return 0.0, (1.0 - hp["lr"] * wd) if wd != 0.0 else 1.0
    return wd, 1.0


def _bytes(n_read_write: int, n_read_only: int = 1):
    """bytes/element for `n_read_write` buffers read and written plus read-only ones."""
    return lambda hp, itemsize: itemsize * (2 * n_read_write + n_read_only)


LR = lambda default, probe: Hyper("lr", default, check=_lr, doc="learning rate γ",
                                 probe=(probe,))
EPS = lambda default: Hyper("eps", default, check=_eps, doc="ε, for numerical stability")
WD = lambda default=0.0, probe=0.01: Hyper("weight_decay", default, check=_weight_decay,
                                           doc="weight decay λ", probe=(0.0, probe))
BETAS = lambda default: Hyper("betas", default, kind="pair", check=_betas, doc="(β1, β2)")
MAXIMIZE = Hyper("maximize", False, kind="flag", doc="ascend instead of descend")


def _decoupled(default: bool) -> Hyper:
    return Hyper("decoupled_weight_decay", default, kind="flag",
                 doc="θ ← θ(1 − γλ) instead of adding λθ to the gradient")


# ---------------------------------------------------------------------------
# Per-step scalars, one function per kernel. Everything here is float64 Python
# arithmetic done once per call; the kernels only see the results.
#
# Overflow: Python's float `*`, `/`, `+` give inf as IEEE (and torch's tensors) do,
# but `**` raises OverflowError and `/ 0.0` raises ZeroDivisionError. Every `**` below
# has a base in [0, 1) (β^t, 0.96^(tψ): they underflow to 0, never overflow) except
# ASGD's, which goes through _pow_up. No divisor can be zero for accepted
# hyperparameters and scalar state (each division says why); t is below 2**63
# (check_step, load_state_dict), so int → float never overflows either.
# ---------------------------------------------------------------------------

def _pow_up(base: float, exponent: float) -> float:
    """``base ** exponent`` for base ≥ 0, exponent ≥ 0: inf where float64 overflows,
    as torch's tensor pow gives (Python's float pow raises OverflowError)."""
    try:
        return base ** exponent
    except OverflowError:
        return math.inf


def _plan_sgd(hp, t, scalars, fresh, decoupled=False):
    wd, decay = _weight_decay_split(hp, decoupled)
    # torch starts the buffer at g (no dampening) the first time it exists
    first = 1 if (t == 1 or fresh) else 0
    return (hp["lr"], wd, decay, hp["momentum"], 1.0 - hp["dampening"],
            int(hp["nesterov"]), first, int(hp["maximize"])), scalars


def _sgd_validate(hp):
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                         f"(argument 'nesterov'; momentum={hp['momentum']}, "
                         f"dampening={hp['dampening']})")


def _plan_adam(hp, t, scalars, fresh):
    beta1, beta2 = hp["betas"]
    wd, decay = _weight_decay_split(hp, hp["decoupled_weight_decay"])
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    return (hp["lr"] / bc1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 / math.sqrt(bc2),
            hp["eps"], wd, decay, int(hp["maximize"])), scalars


def _plan_adagrad(hp, t, scalars, fresh):
    clr = hp["lr"] / (1.0 + (t - 1) * hp["lr_decay"])
    return (clr, hp["eps"], hp["weight_decay"], int(hp["maximize"])), scalars


def _plan_rmsprop(hp, t, scalars, fresh):
    alpha = hp["alpha"]
    return (hp["lr"], alpha, 1.0 - alpha, hp["eps"], hp["weight_decay"],
            hp["momentum"], int(hp["maximize"])), scalars


def _plan_adadelta(hp, t, scalars, fresh):
    rho = hp["rho"]
    return (hp["lr"], rho, 1.0 - rho, hp["eps"], hp["weight_decay"],
            int(hp["maximize"])), scalars


def _plan_adamax(hp, t, scalars, fresh):
    beta1, beta2 = hp["betas"]
    clr = hp["lr"] / (1.0 - beta1 ** t)
    return (clr, 1.0 - beta1, beta2, hp["eps"], hp["weight_decay"],
            int(hp["maximize"])), scalars


class StoredScalars(dict):
    """Scalar state that its owner stores in a narrower float than float64: torch
    keeps NAdam's ``mu_product`` in a float32 tensor unless the default dtype is
    float64, and multiplies it there, each factor rounded to float32. A plan given
    this mapping updates such state exactly as that storage does (``_scalar_product``);
    given a plain dict, it keeps float64 throughout."""

    def __init__(self, values, dtype):
        super().__init__(values)
        self.round = np.dtype(dtype).type


def _scalar_product(scalars, name, factor):
    rnd = getattr(scalars, "round", None)
    if rnd is None:
        return scalars[name] * factor
    return float(rnd(rnd(scalars[name]) * rnd(factor)))


def _nadam_mu(beta1, psi, t):
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))


def _plan_nadam(hp, t, scalars, fresh):
    beta1, beta2 = hp["betas"]
    lr, psi = hp["lr"], hp["momentum_decay"]
    wd, decay = _weight_decay_split(hp, hp["decoupled_weight_decay"])
    mu = _nadam_mu(beta1, psi, t)
    mu_next = _nadam_mu(beta1, psi, t + 1)
    mu_product = _scalar_product(scalars, "mu_product", mu)
    # Π ∈ [0, 1] (validate_scalars) and μ_t, μ_{t+1} < β1 < 1: both divisors are > 0
    grad_coef = lr * (1.0 - mu) / (1.0 - mu_product)
    avg_coef = lr * mu_next / (1.0 - mu_product * mu_next)
    bc2 = 1.0 - beta2 ** t
    return (grad_coef, avg_coef, 1.0 - beta1, beta2, 1.0 - beta2, bc2, hp["eps"],
            wd, decay, int(hp["maximize"])), {"mu_product": mu_product}


def _plan_radam(hp, t, scalars, fresh):
    beta1, beta2 = hp["betas"]
    wd, decay = _weight_decay_split(hp, hp["decoupled_weight_decay"])
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0  # β2 < 1; bc1, bc2 > 0 as β^t < 1
    rho_t = rho_inf - 2.0 * t * (beta2 ** t) / bc2
    if rho_t > 5.0:  # then ρ∞ ≥ ρ_t > 5: every factor under the root is > 0
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                         / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        rectified = 1
    else:
        rect, rectified = 0.0, 0
    return (hp["lr"], bc1, math.sqrt(bc2), rect, rectified, 1.0 - beta1, beta2,
            1.0 - beta2, hp["eps"], wd, decay, int(hp["maximize"])), scalars


def _plan_asgd(hp, t, scalars, fresh):
    eta, mu = scalars["eta"], scalars["mu"]
    lr, lambd = hp["lr"], hp["lambd"]
    args = (eta, 1.0 - lambd * eta, mu, hp["weight_decay"], int(hp["maximize"]))
    # (1 + λγt)^α overflows for a large α or λγt: η → γ/inf = 0 from the next step
    # on, which is what torch's tensor (foreach) path computes; its single-tensor path
    # raises OverflowError, a torch bug fastopt does not copy
    new = {"eta": lr / _pow_up(1.0 + lambd * lr * t, hp["alpha"]),
           "mu": 1.0 / max(1.0, t - hp["t0"])}
    return args, new


def _in_range(name, value, lo, hi):
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value} (scalar state "
                         "no run produces: a corrupt checkpoint or a wrong argument)")


def _nadam_scalars(s):
    # a product of factors μ_t ∈ [0, β1): 1 at t = 0, then in [0, 1). torch divides by
    # 1 − Π and raises ZeroDivisionError for Π = 1 at the next step
    _in_range("mu_product", s["mu_product"], 0.0, 1.0)


def _asgd_scalars(s):
    _in_range("eta", s["eta"], 0.0, sys.float_info.max)  # γ/(1 + λγt)^α ∈ [0, γ]
    _in_range("mu", s["mu"], 0.0, 1.0)          # 1/max(1, t − t0)


def _plan_rprop(hp, t, scalars, fresh):
    etaminus, etaplus = hp["etas"]
    step_min, step_max = hp["step_sizes"]
    return (etaminus, etaplus, step_min, step_max, int(hp["maximize"])), scalars


def _plan_lion(hp, t, scalars, fresh):
    beta1, beta2 = hp["betas"]
    _, decay = _weight_decay_split(hp, True)
    return (hp["lr"], beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay,
            int(hp["maximize"])), scalars


# ---------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------

def _sgd_hypers():
    hs = [LR(1e-3, 0.05),
          Hyper("momentum", 0.0, check=_momentum, doc="momentum μ", probe=(0.0, 0.9)),
          Hyper("dampening", 0.0, check=_finite("dampening"), doc="dampening τ",
                probe=(0.0, 0.3)),
          WD(), Hyper("nesterov", False, kind="flag", doc="Nesterov momentum"), MAXIMIZE]
    return tuple(hs)


_has_momentum = lambda hp: hp["momentum"] != 0.0

_SGD_BYTES = lambda hp, isz: isz * (5 if hp["momentum"] != 0.0 else 3)

_ADAM_HYPERS = lambda lr, wd, decoupled: (
    LR(lr, 0.01), BETAS((0.9, 0.999)), EPS(1e-8), WD(wd),
    Hyper("amsgrad", False, kind="flag", doc="AMSGrad: use the running maximum of v"),
    MAXIMIZE, _decoupled(decoupled))

_ADAM_BUFFERS = (Buffer("exp_avg"), Buffer("exp_avg_sq"),
                 Buffer("max_exp_avg_sq", needed=lambda hp: hp["amsgrad"]))

_ADAM_BYTES = lambda hp, isz: isz * (9 if hp["amsgrad"] else 7)

_ADAM_UPDATE = ("m ← lerp(m, g, 1−β1); v ← β2v + (1−β2)g²; "
                "θ ← θ − (γ/bc1)·m/(√v/√bc2 + ε)")



# The kernels' per-step arguments, by name, in the order each plan returns them
_SGD_FIELDS = ("lr", "weight_decay", "decay", "momentum", "one_minus_dampening",
               "nesterov?", "first?", "maximize?")
_ADAM_FIELDS = ("step_size", "one_minus_beta1", "beta2", "one_minus_beta2",
                "inv_bias_correction2_sqrt", "eps", "weight_decay", "decay", "maximize?")


RULES: dict[str, Rule] = {}


def _add(rule: Rule) -> None:
    RULES[rule.name] = rule


_add(Rule(
    "SGD", "sgd", _sgd_hypers(),
    (Buffer("momentum_buffer", needed=_has_momentum),),
    _plan_sgd, _SGD_BYTES,
    paper="Robbins & Monro 1951; momentum: Polyak 1964; Nesterov: Sutskever et al. 2013",
    update="b ← μb + (1−τ)g; g ← g + μb (nesterov) or b; θ ← θ − γg",
    validate=_sgd_validate, step_in_state=False,
    plan_fields=_SGD_FIELDS))

_add(Rule(
    "SGDW", "sgd", _sgd_hypers(),
    (Buffer("momentum_buffer", needed=_has_momentum),),
    lambda hp, t, s, f: _plan_sgd(hp, t, s, f, decoupled=True), _SGD_BYTES,
    paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization",
    update="θ ← θ(1 − γλ); then SGD with momentum",
    validate=_sgd_validate, in_torch=False, step_in_state=False,
    plan_fields=_SGD_FIELDS))

_add(Rule(
    "Adam", "adam", _ADAM_HYPERS(1e-3, 0.0, False), _ADAM_BUFFERS, _plan_adam, _ADAM_BYTES,
    paper="Kingma & Ba 2015, Adam; AMSGrad: Reddi et al. 2018",
    update=_ADAM_UPDATE,
    plan_fields=_ADAM_FIELDS))

_add(Rule(
    "AdamW", "adam", _ADAM_HYPERS(1e-3, 1e-2, True), _ADAM_BUFFERS, _plan_adam, _ADAM_BYTES,
    paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization",
    update="θ ← θ(1 − γλ); then Adam",
    plan_fields=_ADAM_FIELDS))

_add(Rule(
    "Adagrad", "adagrad",
    (LR(1e-2, 0.05), Hyper("lr_decay", 0.0, check=_nonneg("lr_decay"),
                           doc="learning-rate decay", probe=(0.0, 0.01)),
     WD(), Hyper("initial_accumulator_value", 0.0, probe=(0.0, 0.1),
                 check=_nonneg("initial_accumulator_value"), doc="starting value of sum"),
     EPS(1e-10), MAXIMIZE),
    (Buffer("sum", fill=lambda hp: hp["initial_accumulator_value"]),),
    _plan_adagrad, _bytes(2), state_at_init=True,
    paper="Duchi, Hazan & Singer 2011, Adaptive Subgradient Methods",
    update="s ← s + g²; θ ← θ − γ/(1 + (t−1)·lr_decay) · g/(√s + ε)",
    plan_fields=("clr", "eps", "weight_decay", "maximize?")))

_add(Rule(
    "RMSprop", "rmsprop",
    (LR(1e-2, 0.01), Hyper("alpha", 0.99, check=_nonneg("alpha"), doc="smoothing constant α"),
     EPS(1e-8), WD(),
     Hyper("momentum", 0.0, check=_momentum, doc="momentum μ", probe=(0.0, 0.9)),
     Hyper("centered", False, kind="flag", doc="normalise by the variance estimate"),
     MAXIMIZE),
    (Buffer("square_avg"), Buffer("momentum_buffer", needed=lambda hp: hp["momentum"] > 0),
     Buffer("grad_avg", needed=lambda hp: hp["centered"])),
    _plan_rmsprop,
    lambda hp, isz: isz * (5 + 2 * (hp["momentum"] > 0) + 2 * hp["centered"]),
    paper="Hinton, Lecture 6e of Neural Networks for Machine Learning, 2012",
    update="v ← αv + (1−α)g²; θ ← θ − γ·g/(√v + ε)",
    plan_fields=("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum",
                 "maximize?")))

_add(Rule(
    "Adadelta", "adadelta",
    (LR(1.0, 1.0), Hyper("rho", 0.9, check=_unit_interval("rho"), doc="decay ρ"),
     EPS(1e-6), WD(), MAXIMIZE),
    (Buffer("square_avg"), Buffer("acc_delta")),
    _plan_adadelta, _bytes(3),
    paper="Zeiler 2012, ADADELTA: An Adaptive Learning Rate Method",
    update="v ← ρv + (1−ρ)g²; Δ = √(u+ε)/√(v+ε)·g; u ← ρu + (1−ρ)Δ²; θ ← θ − γΔ",
    plan_fields=("lr", "rho", "one_minus_rho", "eps", "weight_decay", "maximize?")))

_add(Rule(
    "Adamax", "adamax",
    (LR(2e-3, 0.01), BETAS((0.9, 0.999)), EPS(1e-8), WD(), MAXIMIZE),
    (Buffer("exp_avg"), Buffer("exp_inf")),
    _plan_adamax, _bytes(3),
    paper="Kingma & Ba 2015, Adam, section 7",
    update="m ← lerp(m, g, 1−β1); u ← max(β2u, |g| + ε); θ ← θ − (γ/bc1)·m/u",
    plan_fields=("clr", "one_minus_beta1", "beta2", "eps", "weight_decay", "maximize?")))

_add(Rule(
    "NAdam", "nadam",
    (LR(2e-3, 0.01), BETAS((0.9, 0.999)), EPS(1e-8), WD(),
     Hyper("momentum_decay", 4e-3, check=_nonneg("momentum_decay"), doc="ψ"),
     _decoupled(False), MAXIMIZE),
    (Buffer("exp_avg"), Buffer("exp_avg_sq")),
    _plan_nadam, _bytes(3),
    paper="Dozat 2016, Incorporating Nesterov Momentum into Adam",
    update="μ_t = β1(1 − ½·0.96^(tψ)); θ ← θ − γ(1−μ_t)/(1−Π)·g/d − γμ_{t+1}/(1−Πμ_{t+1})·m/d",
    scalars=(("mu_product", lambda hp: 1.0),), validate_scalars=_nadam_scalars,
    plan_fields=("grad_coef", "avg_coef", "one_minus_beta1", "beta2", "one_minus_beta2",
                 "bias_correction2", "eps", "weight_decay", "decay", "maximize?")))

_add(Rule(
    "RAdam", "radam",
    (LR(1e-3, 0.01), BETAS((0.9, 0.999)), EPS(1e-8), WD(), _decoupled(False), MAXIMIZE),
    (Buffer("exp_avg"), Buffer("exp_avg_sq")),
    _plan_radam, _bytes(3),
    paper="Liu et al. 2020, On the Variance of the Adaptive Learning Rate and Beyond",
    update="θ ← θ − γ·(m/bc1)·r·√bc2/(√v + ε) when ρ_t > 5, else θ − γ·m/bc1",
    plan_fields=("lr", "bias_correction1", "bias_correction2_sqrt", "rect", "rectified?",
                 "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay",
                 "decay", "maximize?")))

_add(Rule(
    "ASGD", "asgd",
    (Hyper("lr", 1e-2, check=_finite_lr, doc="learning rate γ", probe=(0.01,)),
     Hyper("lambd", 1e-4, check=_finite_nonneg("lambd"), doc="decay term λ",
           probe=(1e-4, 0.01)),
     Hyper("alpha", 0.75, check=_nonneg("alpha"), doc="power for η update"),
     # t0 = 10: averaging (μ ≠ 1) starts within a short test run
     Hyper("t0", 1e6, check=_finite("t0"), doc="point at which to start averaging",
           probe=(1e6, 10.0)),
     WD(), MAXIMIZE),
    (Buffer("ax"),),
    _plan_asgd, _bytes(2),
    paper="Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by Averaging",
    update="θ ← θ(1 − λη) − ηg; ax ← ax + μ(θ − ax)",
    scalars=(("eta", lambda hp: hp["lr"]), ("mu", lambda hp: 1.0)),
    validate_scalars=_asgd_scalars,
    plan_fields=("eta", "decay", "mu", "weight_decay", "maximize?")))

_add(Rule(
    "Rprop", "rprop",
    (LR(1e-2, 0.01), Hyper("etas", (0.5, 1.2), kind="pair", check=_etas, doc="(η−, η+)",
                           probe=((0.5, 1.2), (0.3, 1.5))),
     Hyper("step_sizes", (1e-6, 50.0), kind="pair", check=_step_sizes,
           probe=((1e-6, 50.0), (1e-3, 0.02)),
           doc="(minimal, maximal) step size"),
     MAXIMIZE),
    (Buffer("prev"), Buffer("step_size", fill=lambda hp: hp["lr"])),
    _plan_rprop, _bytes(3),
    paper="Riedmiller & Braun 1993, RPROP",
    update="s = sign(g·prev); step ← clamp(step·η±); θ ← θ − sign(g)·step; prev ← g",
    plan_fields=("etaminus", "etaplus", "step_size_min", "step_size_max", "maximize?")))

_add(Rule(
    "Lion", "lion",
    (LR(1e-4, 1e-3), BETAS((0.9, 0.99)), WD(probe=0.1), MAXIMIZE),
    (Buffer("exp_avg"),),
    _plan_lion, _bytes(2),
    paper="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms",
    update="θ ← θ(1 − γλ); θ ← θ − γ·sign(β1m + (1−β1)g); m ← β2m + (1−β2)g",
    in_torch=False,
    plan_fields=("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay",
                 "maximize?")))


def _plan_signum(hp, t, scalars, fresh):
    beta = hp["momentum"]
    _, decay = _weight_decay_split(hp, True)
    return (hp["lr"], beta, 1.0 - beta, decay, int(hp["maximize"])), scalars


_add(Rule(
    "Signum", "signum",
    (LR(1e-4, 1e-3),
     Hyper("momentum", 0.9, check=_unit_interval("momentum"), doc="momentum β",
           probe=(0.0, 0.9)),
     WD(probe=0.1), MAXIMIZE),
    (Buffer("momentum_buffer"),),
    _plan_signum, _bytes(2),
    paper="Bernstein et al. 2018, signSGD: Compressed Optimisation for Non-Convex Problems",
    update="m ← βm + (1−β)g; θ ← θ(1 − γλ) − γ·sign(m)",
    in_torch=False,
    plan_fields=("lr", "momentum", "one_minus_momentum", "decay", "maximize?")))


# ---------------------------------------------------------------------------
# Schedule-free AdamW and SGD (Defazio et al. 2024), the training-mode step of the
# `schedulefree` package (1.4.1): θ is y, the point the gradient is taken at; z is
# the SGD/Adam sequence; x (the average, the evaluation point) is not stored, it is
# recovered from y and z (fastopt.schedulefree adds the train()/eval() protocol).
# The averaging weight c = w_t/Σw, with w_t = t^r·lr_max^p, needs the running sum
# of weights and the largest learning rate so far: scalar state.
# ---------------------------------------------------------------------------

def _sf_check_warmup(name, v, hp):
    if not (0.0 <= v < math.inf):
        _fail(f"Invalid warmup_steps value: {v}", name)


def _sf_momentum(name, v, hp):
    # the schedulefree package's message
    if not 0.0 < v < 1.0:
        _fail(f"Momentum must be between 0 and 1 exclusive: {v}", name)


def _sf_scalars(s):
    _in_range("weight_sum", s["weight_sum"], 0.0, math.inf)
    _in_range("lr_max", s["lr_max"], -1.0, math.inf)


def _sf_pow(base, exponent):
    # base ≥ 0, any finite exponent: 0^−p is inf (Python raises ZeroDivisionError)
    try:
        return base ** exponent
    except OverflowError:
        return math.inf
    except ZeroDivisionError:
        return math.inf


def schedulefree_weights(hp, t, weight_sum, lr_max):
    """(lr_t, c_t, new weight_sum, new lr_max) for step t (1-based), as the
    schedulefree package computes them: linear warmup over ``warmup_steps``,
    lr_max the largest lr so far, w_t = t^r·lr_max^p, c_t = w_t/Σw (0 while Σw = 0)."""
    warmup = hp["warmup_steps"]
    lr = hp["lr"] * (t / warmup if t - 1 < warmup else 1.0)
    lr_max = max(lr, lr_max)
    if lr_max < 0:
        raise ValueError(f"a negative learning rate ({lr}) has no averaging weight")
    lr_weight = _sf_pow(lr_max, hp["weight_lr_power"])
    # 0 when γ is 0, even where t^r overflows (inf·0 would make Σw NaN for good)
    weight = _sf_pow(float(t), hp["r"]) * lr_weight if lr_weight != 0 else 0.0
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return lr, ckp1, weight_sum, lr_max


def _plan_schedulefree(hp, t, scalars, fresh):
    lr, ckp1, weight_sum, lr_max = schedulefree_weights(
        hp, t, scalars["weight_sum"], scalars["lr_max"])
    if "betas" in hp:
        beta1, beta2 = hp["betas"]
        inv_bc2s = 1.0 / math.sqrt(1.0 - beta2 ** t)
        adam = (beta2, 1.0 - beta2, inv_bc2s, hp["eps"])
    else:
        beta1 = hp["momentum"]
        adam = (0.0, 0.0, 1.0, 0.0)
    y_coef = lr * (beta1 * (1.0 - ckp1) - 1.0)
    first = 1 if (t == 1 or fresh) else 0
    return ((lr, ckp1, y_coef) + adam + (hp["weight_decay"], first),
            {"weight_sum": weight_sum, "lr_max": lr_max})


_SF_FIELDS = ("lr", "ckp1", "y_coef", "beta2", "one_minus_beta2",
              "inv_bias_correction2_sqrt", "eps", "weight_decay", "first?")
_SF_BUFFERS = (Buffer("z"), Buffer("exp_avg_sq", needed=lambda hp: "betas" in hp))
_SF_SCALARS = (("weight_sum", lambda hp: 0.0), ("lr_max", lambda hp: -1.0))
_SF_TAIL = lambda: (
    WD(),
    Hyper("warmup_steps", 0, check=_sf_check_warmup, doc="linear warmup steps",
          probe=(0, 3)),
    Hyper("r", 0.0, check=_finite("r"), doc="polynomial weighting power of the average"),
    Hyper("weight_lr_power", 2.0, check=_finite("weight_lr_power"),
          doc="weights of the average ∝ lr_max^weight_lr_power"))

_add(Rule(
    "ScheduleFreeAdamW", "schedulefree",
    (LR(0.0025, 0.01), BETAS((0.9, 0.999)), EPS(1e-8)) + _SF_TAIL(),
    _SF_BUFFERS, _plan_schedulefree, _bytes(3),
    paper="Defazio et al. 2024, The Road Less Scheduled",
    update="v ← β2v + (1−β2)g²; ĝ = g/(√v/√bc2 + ε) + λy; y ← lerp(y, z, c) + "
           "γ(β1(1−c)−1)ĝ; z ← z − γĝ",
    scalars=_SF_SCALARS, validate_scalars=_sf_scalars, in_torch=False,
    step_in_state=True, plan_fields=_SF_FIELDS))

_add(Rule(
    "ScheduleFreeSGD", "schedulefree",
    (LR(1.0, 0.01),
     Hyper("momentum", 0.9, check=_sf_momentum, doc="momentum β, in (0, 1)")) + _SF_TAIL(),
    _SF_BUFFERS, _plan_schedulefree, _bytes(2),
    paper="Defazio et al. 2024, The Road Less Scheduled",
    update="ĝ = g + λy; y ← lerp(y, z, c) + γ(β(1−c)−1)ĝ; z ← z − γĝ",
    scalars=_SF_SCALARS, validate_scalars=_sf_scalars, in_torch=False,
    plan_fields=_SF_FIELDS))


# The kernels every backend implements, one per distinct Rule.kernel
KERNELS: tuple[str, ...] = tuple(dict.fromkeys(rule.kernel for rule in RULES.values()))


def kernel_rule(kernel: str) -> Rule:
    """The first rule that runs ``kernel``: rules sharing a kernel share its calling
    convention (buffer slots and plan fields), which is checked here at import."""
    rules = [r for r in RULES.values() if r.kernel == kernel]
    if not rules:
        raise ValueError(f"unknown kernel {kernel!r}; fastopt has {', '.join(KERNELS)}")
    return rules[0]


for _r in RULES.values():
    _first = kernel_rule(_r.kernel)
    if (_r.plan_fields, tuple(b.name for b in _r.buffers)) != \
            (_first.plan_fields, tuple(b.name for b in _first.buffers)):
        raise AssertionError(f"{_r.name} and {_first.name} share kernel {_r.kernel!r} "
                             "but not its buffers and plan fields")
    if len(_r.plan_fields) > MAX_PLAN_FIELDS:
        raise AssertionError(f"{_r.name} has {len(_r.plan_fields)} plan fields; the "
                             f"engines hold at most {MAX_PLAN_FIELDS}")
    if len(_r.buffers) > MAX_BUFFERS:
        raise AssertionError(f"{_r.name} has {len(_r.buffers)} state buffers; the "
                             f"kernels' calling convention has {MAX_BUFFERS} slots")
del _r, _first


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; fastopt has {', '.join(RULES)}") from None
