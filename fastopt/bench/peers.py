"""The implementations the benchmark times side by side.

A *peer* turns (rule, hyperparameters, param, grad) into a zero-argument ``step``
callable that updates ``param`` in place, or says why it cannot:

* ``fastopt``        fastopt's public API, compiled backend: ``fastopt.Adam(p, backend="cython").step(g)``
* ``fastopt_numba``  the same API on the Numba CPU backend
* ``fastopt_kernel`` the compiled kernel called directly with the plan's scalars
                     (no Python layer: the overhead scenario's floor)
* ``numpy``          ``fastopt.reference``, the plain NumPy transcription of the rule
                     the tests check every backend against, run over cache-sized blocks
* ``torch_default`` / ``torch_foreach_false`` / ``torch_foreach`` / ``torch_fused``
                     ``torch.optim.<Rule>`` with its default implementation choice,
                     ``foreach=False``/``True``, and ``fused=True`` (where torch has a
                     fused kernel); same memory via ``torch.from_numpy``
* ``deepspeed``      ``DeepSpeedCPUAdam`` (Adam/AdamW, float32) when DeepSpeed is installed

A peer that is not installed raises :class:`Missing`; one that does not implement
the rule (torch has no Lion, torch's RMSprop has no fused kernel) raises
:class:`NotApplicable`. Both are reported, never counted as failures.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np

import fastopt
from fastopt import backends, reference
from fastopt.backends._host import full
from fastopt.bench.config import LABELS
from fastopt.rules import get_rule


class Missing(Exception):
    """The peer's package is not installed (reported as 'missing')."""


class NotApplicable(Exception):
    """The peer has no implementation of this rule/dtype (reported as 'n/a')."""


def random_array(n, dtype, rng, lo=-1.0, hi=1.0):
    """A 64-byte-aligned array of uniform values in [lo, hi)."""
    a = full(n, dtype, 0)
    rng.random(out=a, dtype=a.dtype.type)
    a *= (hi - lo)
    a += lo
    return a


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Missing(f"{name} is not installed ({exc})") from None


class ReferenceStep:
    """The NumPy peer: ``fastopt.reference`` with state it owns, run over blocks of
    ``BLOCK`` elements (strip-mining, as numexpr does): the plain expressions'
    temporaries then stay in cache instead of costing a fresh multi-MB allocation
    each. The rules are element-wise, so the blocks give the unblocked result to the
    last bit; each block starts from the step's scalars (NAdam's and ASGD's), which
    every block advances alike."""

    BLOCK = 1 << 16

    def __init__(self, rule, hp, param, grad):
        self.name, self.hp, self.t = rule.name, hp, 0
        self.state = reference.initial_state(rule.name, hp, param.shape[0], param.dtype)
        self.scalars = reference.initial_scalars(rule.name, hp)
        self.blocks = [(param[lo:lo + self.BLOCK], grad[lo:lo + self.BLOCK],
                        {k: v[lo:lo + self.BLOCK] for k, v in self.state.items()})
                       for lo in range(0, max(param.shape[0], 1), self.BLOCK)]

    def __call__(self):
        self.t += 1
        for p, g, state in self.blocks:
            scalars = dict(self.scalars)
            reference.step(self.name, p, g, state, scalars, self.hp, self.t)
        self.scalars = scalars


class KernelStep:
    """The compiled kernel called directly with ``Rule.plan``'s per-step scalars."""

    def __init__(self, rule, hp, param, grad, nthreads):
        from fastopt.backends import compiled
        n, dt = param.shape[0], param.dtype
        self.rule, self.hp, self.p, self.g, self.nthreads, self.t = rule, hp, param, grad, \
            nthreads, 0
        self.buffers = tuple(full(n, dt, b.fill(hp)) if b.needed(hp) else None
                             for b in rule.buffers)
        self.state = {b.name: buf for b, buf in zip(rule.buffers, self.buffers)
                      if buf is not None}
        self.scalars = rule.initial_scalars(hp)
        self.kernel = getattr(compiled, rule.kernel)

    def __call__(self):
        self.t += 1
        args, self.scalars = self.rule.plan(self.hp, self.t, self.scalars, self.t == 1)
        self.kernel(self.p, self.g, *self.buffers, *args, self.nthreads)


def peer_status(name):
    """('ok', version) or ('missing', why) for a peer, without running anything."""
    try:
        if name in ("fastopt", "fastopt_kernel"):
            if not backends.available("cython"):
                raise Missing("the compiled backend did not build")
            return "ok", importlib.import_module("fastopt").__version__
        if name == "fastopt_numba":
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


def torch_optimizer(peer, rule, hp, params):
    """``torch.optim.<Rule>`` over ``params`` (tensors with .grad set) as ``peer``
    runs it: torch_default, torch_foreach_false, torch_foreach, torch_fused or
    torch_fused_flat. Only the hyperparameters torch's constructor takes are passed
    (AdamW has no decoupled_weight_decay: it is always decoupled, as in fastopt)."""
    torch = _import("torch")
    if not rule.in_torch or not hasattr(torch.optim, rule.name):
        raise NotApplicable(f"torch.optim has no {rule.name}")
    cls = getattr(torch.optim, rule.name)
    accepted = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in hp.items() if k in accepted}
    if peer in ("torch_fused", "torch_fused_flat"):
        if "fused" not in accepted:
            raise NotApplicable(f"torch.optim.{rule.name} has no fused kernel")
        kw["fused"] = True
    elif peer in ("torch_foreach", "torch_foreach_false"):
        kw["foreach"] = peer == "torch_foreach"
    elif peer != "torch_default":
        raise ValueError(f"unknown peer {peer!r}")
    try:
        return cls(params, **kw)
    except (RuntimeError, ValueError) as exc:
        if "fused" in kw:
            raise NotApplicable(f"torch.optim.{rule.name}(fused=True): {exc}") from None
        raise


def _torch_tensor(torch, a, g):
    t = torch.from_numpy(a)
    t.grad = torch.from_numpy(g)
    return t


def make_step(peer, rule_name, hp, param, grad, nthreads=None):
    """A zero-argument callable doing one step of ``rule_name`` on ``param`` with
    gradient ``grad`` (both shared, updated in place), and the object holding the
    state. Raises Missing / NotApplicable."""
    rule = get_rule(rule_name)
    if peer in ("fastopt", "fastopt_numba"):
        st = peer_status(peer)
        if st[0] != "ok":
            raise Missing(st[1])
        opt = getattr(fastopt, rule.name)(
            param, backend="cython" if peer == "fastopt" else "numba", **hp)
        step = opt.step
        return (lambda: step(grad)), opt
    if peer == "fastopt_kernel":
        nt = nthreads if nthreads is not None else fastopt.get_num_threads()
        stepper = KernelStep(rule, hp, param, grad, nt)
        return stepper, stepper
    if peer == "numpy":
        stepper = ReferenceStep(rule, hp, param, grad)
        return stepper, stepper
    if peer.startswith("torch"):
        torch = _import("torch")
        opt = torch_optimizer(peer, rule, hp, [_torch_tensor(torch, param, grad)])
        return opt.step, opt
    if peer == "deepspeed":
        cls = _deepspeed_cls()
        torch = _import("torch")
        if rule.name not in ("Adam", "AdamW") or param.dtype != np.float32:
            raise NotApplicable("DeepSpeedCPUAdam is Adam/AdamW on float32")
        if hp["amsgrad"] or hp["maximize"]:
            raise NotApplicable("DeepSpeedCPUAdam has no amsgrad/maximize")
        opt = cls([_torch_tensor(torch, param, grad)], lr=hp["lr"], betas=hp["betas"],
                  eps=hp["eps"], weight_decay=hp["weight_decay"],
                  adamw_mode=(rule.name == "AdamW"))
        return opt.step, opt
    raise ValueError(f"unknown peer {peer!r}")


def make_multi_step(peer, rule_name, hp, flat, nthreads=None):
    """One step over a whole model: fastopt/NumPy on the FlatParams buffer in one
    call; torch over separate tensors (as a model has them), and
    ``torch_fused_flat`` on the single flat tensor."""
    if peer in ("fastopt", "fastopt_numba", "fastopt_kernel", "numpy"):
        return make_step(peer, rule_name, hp, flat.data, flat.grad, nthreads)
    if peer == "torch_fused_flat":
        return make_step("torch_fused", rule_name, hp, flat.data, flat.grad, nthreads)
    if peer == "deepspeed":
        raise NotApplicable("not run on the multi-tensor model")
    torch = _import("torch")
    params = [_torch_tensor(torch, np.array(v, copy=True), np.array(gv, copy=True))
              for v, gv in zip(flat.views, flat.grad_views)]
    opt = torch_optimizer(peer, get_rule(rule_name), hp, params)
    return opt.step, opt


def state_buffers(peer, holder):
    """The peer's state buffers as NumPy arrays keyed by torch's names."""
    if isinstance(holder, (ReferenceStep, KernelStep)):
        return dict(holder.state)
    if peer in ("fastopt", "fastopt_numba"):
        return {k: np.asarray(v) for k, v in holder.state.items()}
    out = {}
    for st in getattr(holder, "state", {}).values():
        for k, v in st.items():
            if hasattr(v, "numpy") and v.dim() == 1 and v.numel() > 1:
                out[k] = v.detach().numpy()
    return out


def build_steps(peers, factory):
    """{peer: step}, {peer: holder} for the peers that can run, and {peer: status}
    for all. ``factory(peer)`` returns (step, holder) or raises Missing/NotApplicable."""
    steps, holders, status = {}, {}, {}
    for peer in peers:
        try:
            steps[peer], holders[peer] = factory(peer)
            status[peer] = {"status": "ok"}
        except Missing as exc:
            status[peer] = {"status": "missing", "detail": str(exc)}
        except NotApplicable as exc:
            status[peer] = {"status": "n/a", "detail": str(exc)}
        except Exception as exc:
            status[peer] = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    return steps, holders, status


def peer_table(peers) -> dict:
    """The document's ``peers`` entry: status, version or why not, label."""
    out = {}
    for peer in peers:
        status, detail = peer_status(peer)
        out[peer] = {"status": status, ("version" if status == "ok" else "detail"): detail,
                     "label": LABELS.get(peer, peer)}
    return out
