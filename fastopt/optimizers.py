"""Optimizer classes, one per registry row: ``fastopt.Adam(param, lr=...)``.

An optimizer owns one flat parameter buffer and its state. Construction and
hyperparameter changes validate everything once; ``step(grad)`` then computes the
per-step scalars and makes one kernel call, the same call the functional API makes.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np

from fastopt import backends
from fastopt._checks import MAX_STEP, check_array, check_buffers, coerce
from fastopt.flat import FlatParams
from fastopt.rules import RULES, Rule

STATE_DICT_FORMAT = "fastopt.state_dict/1"
_threads = backends._num_threads  # read once per step: a list, shared


class Optimizer:
    """Base of every fastopt optimizer; subclasses set ``rule``."""

    rule: Rule

    def __init__(self, param, *, backend=None, **hyperparameters):
        rule = self.rule
        unknown = set(hyperparameters) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name} got unexpected hyperparameter(s) "
                            f"{', '.join(sorted(unknown))}; it takes "
                            f"{', '.join(rule.defaults)}")
        hp = rule.check_hypers({**rule.defaults, **hyperparameters})
        if isinstance(param, FlatParams):
            param = param.data
        be = backends.for_array(param, backend)
        arr = coerce("param", param, be)
        check_array("param", arr)
        d = self.__dict__
        d["_param"] = arr  # flat: what the kernels and the state buffers follow
        # what `param` shows: the caller's array in its own shape, sharing memory
        # with the flat view (a tensor's NumPy view for a tensor)
        d["_shaped"] = be.as_array(param)
        d["_backend"] = be
        d["_plan"] = rule.plan
        d["_hp"] = hp
        d["_scalars"] = rule.initial_scalars(hp)
        d["_fresh"] = False
        d["state"] = {}
        d["step_count"] = 0
        self._sync_buffers()

    # -- the hot path -------------------------------------------------------
    def step(self, grad):
        """One update of ``param`` in place with gradient ``grad``."""
        t = self.step_count + 1
        args, scalars = self._plan(self._hp, t, self._scalars, self._fresh)
        try:
            self._bound.step(grad, args, _threads[0])
        except (TypeError, ValueError, BufferError):
            # refused before anything was written: flatten an N-D gradient, convert
            # a non-array one (a tensor, a buffer), or name the culprit; then once more
            self._bound.step(self._flat_grad(grad), args, _threads[0])
        d = self.__dict__
        d["_scalars"] = scalars
        d["_fresh"] = False
        d["step_count"] = t

    def _flat_grad(self, grad):
        """``grad`` as a 1-D array the bound kernel takes, or the error in words."""
        p = self._param
        if type(grad) is np.ndarray and grad.flags.c_contiguous:
            flat = grad.reshape(-1)  # a view
        else:  # a tensor, a buffer, a non-contiguous array: a flat view, or the error
            flat = coerce("grad", grad, self._backend)
        # the right dtype and length: the kernel checks overlap itself
        if (type(flat) is np.ndarray and flat.dtype == p.dtype and flat.shape == p.shape
                and flat.flags.c_contiguous):
            return flat
        check_buffers(self.rule.arg_names, (p, flat) + self._bufs)
        return flat

    # -- hyperparameters ----------------------------------------------------
    def __setattr__(self, name, value):
        if name in self.rule.defaults:
            hp = self.rule.check_hypers({**self._hp, name: value})
            self.__dict__["_hp"] = hp
            self._sync_buffers()
        elif name == "step_count":
            raise AttributeError("step_count is set by step() and load_state_dict()")
        elif name in self.__dict__ or name in ("state",):
            raise AttributeError(f"{name} cannot be assigned")
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # only reached for names not found normally
        hp = self.__dict__.get("_hp")
        if hp is not None and name in hp:
            return hp[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def hyperparameters(self) -> dict:
        return dict(self._hp)

    @property
    def param(self):
        """The array given at construction, in its own shape, updated in place (a
        tensor's NumPy view; ``FlatParams.data`` for FlatParams). The kernels update it
        through its flat view; the state buffers are flat, of length ``param.size``."""
        return self._shaped

    @property
    def backend(self) -> str:
        return self._backend.NAME

    def _sync_buffers(self):
        """Allocate the buffers the current hyperparameters need; the kernel gets
        None for the others (kept in ``state`` if they exist, as torch does)."""
        rule, hp, p = self.rule, self._hp, self._param
        for b in rule.buffers:
            if b.needed(hp) and b.name not in self.state:
                self.state[b.name] = self._backend.full(p.shape[0], p.dtype, b.fill(hp), p)
                # a buffer born after step 1 takes torch's first-use path (SGD: b ← g)
                self.__dict__["_fresh"] = self.step_count > 0
        bufs = tuple(self.state[b.name] if b.needed(hp) else None for b in rule.buffers)
        self.__dict__["_bufs"] = bufs
        self.__dict__["_bound"] = backends.bind(self._backend, rule.kernel, p, bufs)

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hp.items())
        return (f"{type(self).__name__}(<{self._param.shape[0]} x {np.dtype(self._param.dtype)}"
                f" on {self._backend.NAME}>, {hp}; step_count={self.step_count})")

    # -- checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python/NumPy data: rule, dtype, size, step, hyperparameters,
        scalar state and copies of the state buffers."""
        return {
            "format": STATE_DICT_FORMAT,
            "rule": self.rule.name,
            "dtype": np.dtype(self._param.dtype).name,
            "size": int(self._param.shape[0]),
            "step": int(self.step_count),
            "hyperparameters": dict(self._hp),
            "scalars": dict(self._scalars),
            "state": {name: self._backend.to_host(buf) for name, buf in self.state.items()},
        }

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``. Everything is checked before anything changes."""
        rule = self.rule
        sd = _check_state_dict(state_dict, rule, np.dtype(self._param.dtype),
                               int(self._param.shape[0]))
        state = {}
        for name, host in sd["state"].items():
            buf = self.state.get(name)
            if buf is None:
                buf = self._backend.full(host.shape[0], host.dtype, 0, self._param)
            self._backend.copy_from_host(buf, host)
            state[name] = buf
        d = self.__dict__
        d["_hp"] = sd["hyperparameters"]
        d["_scalars"] = sd["scalars"]
        d["step_count"] = sd["step"]
        d["_fresh"] = False
        d["state"] = state
        self._sync_buffers()


def _check_state_dict(sd, rule: Rule, dtype: np.dtype, size: int) -> dict:
    """A validated, normalised copy of ``sd`` (ValueError/TypeError otherwise)."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for key in ("rule", "dtype", "size", "step", "hyperparameters", "scalars", "state"):
        if key not in sd:
            raise ValueError(f"state_dict is missing {key!r}")
    if sd.get("format", STATE_DICT_FORMAT) != STATE_DICT_FORMAT:
        raise ValueError(f"state_dict format {sd['format']!r} is not {STATE_DICT_FORMAT!r}")
    if sd["rule"] != rule.name:
        raise ValueError(f"state_dict['rule'] is {sd['rule']!r}; this optimizer is "
                         f"{rule.name!r}")
    if str(sd["dtype"]) != dtype.name:
        raise ValueError(f"state_dict['dtype'] is {sd['dtype']!r}; the param has dtype "
                         f"{dtype.name!r}")
    if not isinstance(sd["size"], numbers.Integral) or int(sd["size"]) != size:
        raise ValueError(f"state_dict['size'] is {sd['size']!r}; the param has {size} "
                         "elements")
    step = sd["step"]
    # below 2**63: the plans convert t to float (a larger int could overflow there)
    if (isinstance(step, bool) or not isinstance(step, numbers.Integral)
            or not 0 <= step < MAX_STEP):
        raise ValueError(f"state_dict['step'] must be an int in [0, 2**63), got {step!r}")
    hps = sd["hyperparameters"]
    if not isinstance(hps, dict):
        raise TypeError(f"state_dict['hyperparameters'] must be a dict, got {hps!r}")
    unknown = set(hps) - set(rule.defaults)
    if unknown:
        raise ValueError(f"state_dict['hyperparameters'] has unknown names "
                         f"{sorted(unknown)} for {rule.name}")
    hp = rule.check_hypers({**rule.defaults, **hps})
    scalars_in = sd["scalars"]
    names = [n for n, _ in rule.scalars]
    if not isinstance(scalars_in, dict) or sorted(scalars_in) != sorted(names):
        raise ValueError(f"state_dict['scalars'] must have exactly {names}, got "
                         f"{scalars_in!r}")
    scalars = {}
    for n in names:
        v = scalars_in[n]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise ValueError(f"state_dict['scalars'][{n!r}] must be a real number, got {v!r}")
        scalars[n] = float(v)
    rule.validate_scalars(scalars)
    state_in = sd["state"]
    if not isinstance(state_in, dict):
        raise TypeError(f"state_dict['state'] must be a dict, got {type(state_in).__name__}")
    known = {b.name for b in rule.buffers}
    state = {}
    for name, arr in state_in.items():
        if name not in known:
            raise ValueError(f"state_dict['state'] has {name!r}, which {rule.name} does not "
                             f"use (it has {sorted(known)})")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"state_dict['state'][{name!r}] must be a NumPy array, got "
                            f"{type(arr).__name__}")
        if arr.dtype != dtype or arr.shape != (size,):
            raise ValueError(f"state_dict['state'][{name!r}] has shape {arr.shape} and dtype "
                             f"{arr.dtype}; expected ({size},) {dtype.name}")
        state[name] = arr
    if step > 0:
        for b in rule.buffers:
            if b.needed(hp) and b.name not in state:
                raise ValueError(f"state_dict['state'] lacks {b.name!r}, which {rule.name} "
                                 f"needs with these hyperparameters after step 0")
    return {"step": int(step), "hyperparameters": hp, "scalars": scalars, "state": state}


def _make_class(rule: Rule):
    def __init__(self, param, *, backend=None, **hyperparameters):
        Optimizer.__init__(self, param, backend=backend, **hyperparameters)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
              inspect.Parameter("param", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default)
               for h in rule.hypers]
    params.append(inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None))
    __init__.__signature__ = inspect.Signature(params)
    lines = [f"{rule.name}: {rule.update}", "",
             "Parameters", "----------",
             "param : C-contiguous float32/float64 array of any shape, buffer, CPU tensor,",
             "    or FlatParams; updated in place through its flat view by step(grad),",
             "    where grad has param's size (any shape). State buffers are flat."]
    for h in rule.hypers:
        lines.append(f"{h.name} : default {h.default!r}" + (f" — {h.doc}" if h.doc else ""))
    lines.append("backend : None (decided at import), 'cython', 'numba' or 'cuda'.")
    lines += ["", f"State: {', '.join(b.name for b in rule.buffers)}"
              + (f"; scalars: {', '.join(n for n, _ in rule.scalars)}" if rule.scalars else ""),
              "", f"Reference: {rule.paper}."]
    cls = type(rule.name, (Optimizer,), {"rule": rule, "__init__": __init__,
                                         "__doc__": "\n".join(lines),
                                         "__module__": "fastopt"})
    __init__.__qualname__ = f"{rule.name}.__init__"
    return cls


OPTIMIZERS = {name: _make_class(rule) for name, rule in RULES.items()}
globals().update(OPTIMIZERS)
__all__ = ["Optimizer", *OPTIMIZERS]
