"""The implementations the benchmark times side by side.

A *peer* turns (rule, hyperparameters, param, grad) into a zero-argument ``step``
callable that updates ``param`` in place, or says why it cannot:

* ``fastopt``        fastopt's public API, compiled backend: ``fastopt.Adam(p, backend="cython").step(g)``
* ``fastopt_numba``  the same API on the Numba CPU backend
* ``fastopt_kernel`` the compiled kernel called directly with the plan's scalars
                     (no Python layer: the overhead scenario's floor)
* ``numpy``          the best straightforward in-place NumPy: one ufunc per term with
                     ``out=`` into preallocated temporaries, no allocation per step
* ``torch_default`` / ``torch_foreach_false`` / ``torch_fused``
                     ``torch.optim.<Rule>`` with its default implementation choice,
                     ``foreach=False``, and ``fused=True`` (where torch has a CPU fused
                     kernel: Adam, AdamW, SGD, Adagrad); same memory via ``torch.from_numpy``
* ``deepspeed``      ``DeepSpeedCPUAdam`` (Adam/AdamW, float32) when DeepSpeed is installed

A peer that is not installed raises :class:`Missing`; one that does not implement
the rule (torch has no Lion, torch's RMSprop has no fused kernel) raises
:class:`NotApplicable`. Both are reported, never counted as failures.

The NumPy peer and the direct-kernel peer take the per-step scalars from the same
``Rule.plan`` the fastopt classes use, so every peer does the same arithmetic (the
tests check that each peer's first steps agree with fastopt's).
"""

from __future__ import annotations

import importlib
import inspect
import math

import numpy as np

from fastopt.rules import RULES, get_rule


class Missing(Exception):
    """The peer's package is not installed (reported as 'missing')."""


class NotApplicable(Exception):
    """The peer has no implementation of this rule/dtype (reported as 'n/a')."""


# ---------------------------------------------------------------------------
# NumPy: one function per kernel, same call shape as the compiled kernels
#   kernel(p, g, *buffers, *plan_args, tmp)
# where tmp is a list of preallocated scratch arrays of p's length and dtype.
# ---------------------------------------------------------------------------

def _grad(p, g, wd, maximize, tmp):
    """The gradient the rule sees: -g if maximize, + wd*p for L2 decay. Returns g
    itself (no copy) when neither applies."""
    if not maximize and wd == 0.0:
        return g
    tg = tmp[2]
    if maximize:
        np.negative(g, out=tg)
    else:
        np.copyto(tg, g)
    if wd != 0.0:
        np.multiply(p, wd, out=tmp[0])
        tg += tmp[0]
    return tg


def _lerp_(m, g, w, t):
    """m += w*(g - m) in place (torch's lerp)."""
    np.subtract(g, m, out=t)
    t *= w
    m += t


def _ema_sq_(v, g, beta, one_minus_beta, t):
    """v = beta*v + (1-beta)*g*g in place."""
    v *= beta
    np.multiply(g, g, out=t)
    t *= one_minus_beta
    v += t


def np_sgd(p, g, b, _u1, _u2, lr, wd, decay, mom, omd, nesterov, first, maximize, tmp):
    t1 = tmp[1]
    if decay != 1.0:
        p *= decay
    g = _grad(p, g, wd, maximize, tmp)
    upd = g
    if b is not None:
        if first:
            np.copyto(b, g)
        else:
            b *= mom
            if omd != 1.0:
                np.multiply(g, omd, out=t1)
                b += t1
            else:
                b += g
        if nesterov:
            np.multiply(b, mom, out=t1)
            t1 += g
            upd = t1
        else:
            upd = b
    np.multiply(upd, lr, out=t1)
    p -= t1


def _adam_moments_(p, g, m, v, omb1, b2, omb2, wd, decay, maximize, tmp):
    """Weight decay and the Adam-family moments, in place; returns the gradient used."""
    if decay != 1.0:
        p *= decay
    g = _grad(p, g, wd, maximize, tmp)
    _lerp_(m, g, omb1, tmp[1])
    _ema_sq_(v, g, b2, omb2, tmp[1])
    return g


def np_adam(p, g, m, v, vmax, step_size, omb1, b2, omb2, inv_bc2s, eps, wd, decay, maximize,
            tmp):
    t1 = tmp[1]
    g = _adam_moments_(p, g, m, v, omb1, b2, omb2, wd, decay, maximize, tmp)
    if vmax is not None:
        np.maximum(vmax, v, out=vmax)
        v = vmax
    np.sqrt(v, out=t1)
    t1 *= inv_bc2s
    t1 += eps
    np.divide(m, t1, out=t1)
    t1 *= step_size
    p -= t1


def np_adagrad(p, g, s, _u1, _u2, clr, eps, wd, maximize, tmp):
    t1 = tmp[1]
    g = _grad(p, g, wd, maximize, tmp)
    np.multiply(g, g, out=t1)
    s += t1
    np.sqrt(s, out=t1)
    t1 += eps
    np.divide(g, t1, out=t1)
    t1 *= clr
    p -= t1


def np_rmsprop(p, g, v, b, ga, lr, alpha, oma, eps, wd, mom, maximize, tmp):
    t1, t3 = tmp[1], tmp[3]
    g = _grad(p, g, wd, maximize, tmp)
    _ema_sq_(v, g, alpha, oma, t1)
    if ga is not None:
        _lerp_(ga, g, oma, t1)
        np.multiply(ga, ga, out=t1)
        np.subtract(v, t1, out=t1)
        np.sqrt(t1, out=t1)
    else:
        np.sqrt(v, out=t1)
    t1 += eps
    np.divide(g, t1, out=t1)
    if b is not None:
        b *= mom
        b += t1
        np.multiply(b, lr, out=t3)
        p -= t3
    else:
        t1 *= lr
        p -= t1


def np_adadelta(p, g, v, u, _u, lr, rho, omr, eps, wd, maximize, tmp):
    t1, t3 = tmp[1], tmp[3]
    g = _grad(p, g, wd, maximize, tmp)
    _ema_sq_(v, g, rho, omr, t1)
    np.add(u, eps, out=t1)
    np.sqrt(t1, out=t1)
    np.add(v, eps, out=t3)
    np.sqrt(t3, out=t3)
    t1 /= t3
    t1 *= g                      # delta
    _ema_sq_(u, t1, rho, omr, t3)
    t1 *= lr
    p -= t1


def np_adamax(p, g, m, u, _u, clr, omb1, b2, eps, wd, maximize, tmp):
    t1 = tmp[1]
    g = _grad(p, g, wd, maximize, tmp)
    _lerp_(m, g, omb1, t1)
    np.abs(g, out=t1)
    t1 += eps
    u *= b2
    np.maximum(u, t1, out=u)
    np.divide(m, u, out=t1)
    t1 *= clr
    p -= t1


def np_nadam(p, g, m, v, _u, gcoef, mcoef, omb1, b2, omb2, bc2, eps, wd, decay, maximize,
             tmp):
    t1, t3 = tmp[1], tmp[3]
    g = _adam_moments_(p, g, m, v, omb1, b2, omb2, wd, decay, maximize, tmp)
    np.divide(v, bc2, out=t1)
    np.sqrt(t1, out=t1)
    t1 += eps                    # denom
    np.divide(g, t1, out=t3)
    t3 *= gcoef
    p -= t3
    np.divide(m, t1, out=t3)
    t3 *= mcoef
    p -= t3


def np_radam(p, g, m, v, _u, lr, bc1, bc2s, rect, rectified, omb1, b2, omb2, eps, wd,
             decay, maximize, tmp):
    t1 = tmp[1]
    g = _adam_moments_(p, g, m, v, omb1, b2, omb2, wd, decay, maximize, tmp)
    if rectified:
        np.sqrt(v, out=t1)
        t1 += eps
        np.divide(m, t1, out=t1)
        t1 *= lr * rect * bc2s / bc1
    else:
        np.multiply(m, lr / bc1, out=t1)
    p -= t1


def np_asgd(p, g, ax, _u1, _u2, eta, decay, mu, wd, maximize, tmp):
    t1 = tmp[1]
    g = _grad(p, g, wd, maximize, tmp)
    p *= decay
    np.multiply(g, eta, out=t1)
    p -= t1
    if mu != 1.0:
        np.subtract(p, ax, out=t1)
        t1 *= mu
        ax += t1
    else:
        np.copyto(ax, p)


def np_rprop(p, g, prev, step, _u, etaminus, etaplus, smin, smax, maximize, tmp):
    t1, t3, pos, neg = tmp[1], tmp[3], tmp[4], tmp[5]
    if maximize:
        np.negative(g, out=tmp[2])
        g = tmp[2]
    np.multiply(g, prev, out=t1)
    np.greater(t1, 0, out=pos)
    np.less(t1, 0, out=neg)
    t3.fill(1)
    np.copyto(t3, etaplus, where=pos)
    np.copyto(t3, etaminus, where=neg)
    np.copyto(t3, t1, where=np.isnan(t1))   # NaN in g*prev propagates, as in torch
    step *= t3
    np.clip(step, smin, smax, out=step)
    np.copyto(prev, g)
    np.copyto(prev, 0, where=neg)
    np.sign(prev, out=t1)
    t1 *= step
    p -= t1


def np_lion(p, g, m, _u1, _u2, lr, b1, omb1, b2, omb2, decay, maximize, tmp):
    t1, t3 = tmp[1], tmp[3]
    if maximize:
        np.negative(g, out=tmp[2])
        g = tmp[2]
    if decay != 1.0:
        p *= decay
    np.multiply(m, b1, out=t1)
    np.multiply(g, omb1, out=t3)
    t1 += t3
    np.sign(t1, out=t1)
    t1 *= lr
    p -= t1
    m *= b2
    np.multiply(g, omb2, out=t3)
    m += t3


NUMPY_KERNELS = {
    "sgd": np_sgd, "adam": np_adam, "adagrad": np_adagrad, "rmsprop": np_rmsprop,
    "adadelta": np_adadelta, "adamax": np_adamax, "nadam": np_nadam, "radam": np_radam,
    "asgd": np_asgd, "rprop": np_rprop, "lion": np_lion,
}

# scratch arrays each NumPy kernel needs: tmp[0..3] floats, tmp[4..5] bools (Rprop)
_SCRATCH = {"rprop": 6}


def _aligned(n, dtype, value):
    from fastopt.backends._host import full
    return full(n, dtype, value)


class PlanStepper:
    """Runs ``kernel(p, g, *buffers, *plan_args, extra)`` with state it owns and the
    per-step scalars from ``Rule.plan``: the NumPy peer and the direct-kernel peer."""

    def __init__(self, rule, hp, param, grad, kernel, extra, scratch=0):
        self.rule, self.hp, self.p, self.g = rule, hp, param, grad
        n, dt = param.shape[0], param.dtype
        self.buffers = tuple(_aligned(n, dt, b.fill(hp)) if b.needed(hp) else None
                             for b in rule.buffers)
        self.scalars = rule.initial_scalars(hp)
        self.t = 0
        self.kernel = kernel
        if scratch:
            nb = _SCRATCH.get(rule.kernel, 4)
            tmp = [np.empty(n, dt) for _ in range(min(nb, 4))]
            tmp += [np.empty(n, np.bool_) for _ in range(nb - 4)]
            extra = tmp
        self.extra = extra
        # the NumPy kernels take three buffer slots whatever the rule has
        self.slots = (self.buffers + (None,) * 3)[:3] if scratch else self.buffers

    def state(self):
        return {b.name: buf for b, buf in zip(self.rule.buffers, self.buffers)
                if buf is not None}

    def __call__(self):
        self.t += 1
        args, self.scalars = self.rule.plan(self.hp, self.t, self.scalars, self.t == 1)
        self.kernel(self.p, self.g, *self.slots, *args, self.extra)


# ---------------------------------------------------------------------------
# Peer registry
# ---------------------------------------------------------------------------

TORCH_FUSED_CPU = ("SGD", "Adam", "AdamW", "Adagrad")   # torch 2.13, checked at run time

PEERS = ("fastopt", "fastopt_numba", "numpy", "torch_default", "torch_foreach_false",
         "torch_fused", "deepspeed")
EXTRA_PEERS = ("fastopt_kernel",)

LABELS = {
    "fastopt": "fastopt",
    "fastopt_numba": "fastopt numba",
    "fastopt_kernel": "fastopt kernel only",
    "numpy": "NumPy",
    "torch_default": "torch",
    "torch_foreach_false": "torch foreach=False",
    "torch_fused": "torch fused",
    "deepspeed": "DeepSpeedCPUAdam",
}


def hyperparameters(rule_name, overrides=None):
    """The full, validated hyperparameter dict the benchmark uses for a rule."""
    rule = get_rule(rule_name)
    return rule.check_hypers({**rule.defaults, **(overrides or {})})


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Missing(f"{name} is not installed ({exc})") from None


def peer_status(name):
    """('ok', version) or ('missing', why) for a peer, without running anything."""
    try:
        if name in ("fastopt", "fastopt_kernel"):
            import fastopt
            from fastopt import backends
            if not backends.available("cython"):
                raise Missing("the compiled backend did not build")
            return "ok", fastopt.__version__
        if name == "fastopt_numba":
            from fastopt import backends
            if not backends.available("numba"):
                try:
                    backends.load("numba")
                except ImportError as exc:
                    raise Missing(str(exc)) from None
            return "ok", _import("numba").__version__
        if name == "numpy":
            return "ok", np.__version__
        if name.startswith("torch"):
            return "ok", _import("torch").__version__
        if name == "deepspeed":
            ds = _import("deepspeed")
            _deepspeed_cls()
            return "ok", getattr(ds, "__version__", "?")
    except Missing as exc:
        return "missing", str(exc)
    raise ValueError(f"unknown peer {name!r}")


def _deepspeed_cls():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # ImportError, or a failed JIT build of the op
        raise Missing(f"deepspeed.ops.adam.DeepSpeedCPUAdam unavailable ({exc})") from None
    return DeepSpeedCPUAdam


def _torch_kwargs(cls, hp):
    """The hyperparameters torch's constructor takes (AdamW has no
    decoupled_weight_decay: it is always decoupled there, as in fastopt)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hp.items() if k in accepted}


def make_step(peer, rule_name, hp, param, grad, nthreads=None):
    """A zero-argument callable doing one step of ``rule_name`` on ``param`` with
    gradient ``grad`` (both shared, updated in place), and the object holding the
    state (for inspection). Raises Missing / NotApplicable."""
    rule = get_rule(rule_name)
    if peer in ("fastopt", "fastopt_numba"):
        import fastopt
        backend = "cython" if peer == "fastopt" else "numba"
        st = peer_status(peer)
        if st[0] != "ok":
            raise Missing(st[1])
        opt = getattr(fastopt, rule.name)(param, backend=backend, **hp)
        step = opt.step
        return (lambda: step(grad)), opt
    if peer == "fastopt_kernel":
        from fastopt.backends import compiled
        import fastopt
        nt = nthreads if nthreads is not None else fastopt.get_num_threads()
        stepper = PlanStepper(rule, hp, param, grad, getattr(compiled, rule.kernel), nt)
        return stepper, stepper
    if peer == "numpy":
        stepper = PlanStepper(rule, hp, param, grad, NUMPY_KERNELS[rule.kernel], None,
                              scratch=1)
        return stepper, stepper
    if peer.startswith("torch"):
        torch = _import("torch")
        if not rule.in_torch or not hasattr(torch.optim, rule.name):
            raise NotApplicable(f"torch.optim has no {rule.name}")
        cls = getattr(torch.optim, rule.name)
        kw = _torch_kwargs(cls, hp)
        params_sig = inspect.signature(cls.__init__).parameters
        if peer == "torch_foreach_false":
            kw["foreach"] = False
        elif peer == "torch_fused":
            if "fused" not in params_sig:
                raise NotApplicable(f"torch.optim.{rule.name} has no fused kernel")
            kw["fused"] = True
        tp = torch.from_numpy(param)
        tp.grad = torch.from_numpy(grad)
        try:
            opt = cls([tp], **kw)
        except (RuntimeError, ValueError) as exc:
            if peer == "torch_fused":
                raise NotApplicable(f"torch.optim.{rule.name}(fused=True): {exc}") from None
            raise
        step = opt.step
        return (lambda: step()), opt
    if peer == "deepspeed":
        cls = _deepspeed_cls()
        torch = _import("torch")
        if rule.name not in ("Adam", "AdamW") or param.dtype != np.float32:
            raise NotApplicable("DeepSpeedCPUAdam is Adam/AdamW on float32")
        if hp["amsgrad"] or hp["maximize"]:
            raise NotApplicable("DeepSpeedCPUAdam has no amsgrad/maximize")
        tp = torch.from_numpy(param)
        tp.grad = torch.from_numpy(grad)
        opt = cls([tp], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                  weight_decay=hp["weight_decay"], adamw_mode=(rule.name == "AdamW"))
        step = opt.step
        return (lambda: step()), opt
    raise ValueError(f"unknown peer {peer!r}")


def state_buffers(peer, holder):
    """The peer's state buffers as NumPy arrays keyed by torch's names (for checks
    and for the denormal scenario's census)."""
    if isinstance(holder, PlanStepper):
        return holder.state()
    if peer in ("fastopt", "fastopt_numba"):
        return {k: np.asarray(v) for k, v in holder.state.items()}
    if peer.startswith("torch") or peer == "deepspeed":
        out = {}
        for st in holder.state.values():
            for k, v in st.items():
                if hasattr(v, "numpy") and v.dim() == 1 and v.numel() > 1:
                    out[k] = v.detach().numpy()
        return out
    return {}


def make_multi_step(peer, rule_name, hp, flat, nthreads=None):
    """One step over a whole model: fastopt/NumPy on the flat buffer in one call;
    torch over the list of per-tensor views (as a model's parameters are), and
    ``torch_fused_flat`` on the single flat tensor."""
    if peer in ("fastopt", "fastopt_numba", "fastopt_kernel", "numpy"):
        return make_step(peer, rule_name, hp, flat.data, flat.grad, nthreads)
    torch = _import("torch")
    rule = get_rule(rule_name)
    cls = getattr(torch.optim, rule.name)
    kw = _torch_kwargs(cls, hp)
    if peer == "torch_fused_flat":
        return make_step("torch_fused", rule_name, hp, flat.data, flat.grad, nthreads)
    if peer == "deepspeed":
        raise NotApplicable("not run on the multi-tensor model")
    # separate tensors, as a model has them (fresh copies: not views of one buffer)
    params = []
    for v, gv in zip(flat.views, flat.grad_views):
        t = torch.from_numpy(np.array(v, copy=True))
        t.grad = torch.from_numpy(np.array(gv, copy=True))
        params.append(t)
    if peer == "torch_foreach_false":
        kw["foreach"] = False
    elif peer == "torch_fused":
        kw["fused"] = True
    opt = cls(params, **kw)
    step = opt.step
    return (lambda: step()), opt


__all__ = ["Missing", "NotApplicable", "PEERS", "LABELS", "NUMPY_KERNELS", "make_step",
           "make_multi_step", "peer_status", "hyperparameters", "state_buffers"]
