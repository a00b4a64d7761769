"""Optimizer classes, one per registry row: ``fastopt.Adam(param, lr=...)``.

An optimizer owns one parameter array, or a list of them, and each array's state.
Construction and hyperparameter changes validate everything once; ``step(grad)``
then computes the per-step scalars and makes one kernel call over every array (one
per dtype in a mixed list): the segment engine, bound once to the arrays.
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
    """Base of every fastopt optimizer; subclasses set ``rule``.

    ``param`` is one array, or a list of arrays stepped together: one kernel call per
    step over all of them (one per dtype when the list mixes float32 and float64),
    each array updated where it lives, with its own state.
    """

    rule: Rule

    def __init__(self, param, *, backend=None, **hyperparameters):
        rule = self.rule
        unknown = set(hyperparameters) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name} got unexpected hyperparameter(s) "
                            f"{', '.join(sorted(unknown))}; it takes "
                            f"{', '.join(rule.defaults)}")
        hp = rule.check_hypers({**rule.defaults, **hyperparameters})
        many = isinstance(param, (list, tuple))
        if many:
            if not param:
                raise ValueError("param is an empty list: give at least one array")
            names = [f"param[{i}]" for i in range(len(param))]
            be = backends.for_array(param[0], backend)
            for i, p in enumerate(param):
                if isinstance(p, FlatParams):
                    raise TypeError(f"param[{i}] is a FlatParams: pass it alone, or pass "
                                    "the arrays themselves as a list")
                if backends.for_array(p, backend) is not be:
                    raise ValueError(f"param[{i}] is on another device than param[0]")
            params = list(param)
        else:
            if isinstance(param, FlatParams):
                param = param.data
            be = backends.for_array(param, backend)
            names, params = ["param"], [param]
        flats, shaped = [], []
        for name, p in zip(names, params):
            arr = coerce(name, p, be)
            check_array(name, arr)
            flats.append(arr)
            # what `param` shows: the caller's array in its own shape, sharing memory
            # with the flat view (a tensor's NumPy view for a tensor)
            shaped.append(be.as_array(p))
        d = self.__dict__
        d["_many"] = many
        d["_params"] = flats  # flat: what the kernels and the state buffers follow
        d["_shaped"] = shaped
        d["_backend"] = be
        d["_plan"] = rule.plan
        d["_hp"] = hp
        d["_scalars"] = rule.initial_scalars(hp)
        d["_fresh"] = False
        d["_states"] = [{} for _ in flats]
        d["step_count"] = 0
        self._sync_buffers()

    # -- the hot path -------------------------------------------------------
    def step(self, grad):
        """One update of ``param`` in place with gradient ``grad`` (a list of one
        gradient per array when ``param`` is a list)."""
        t = self.step_count + 1
        args, scalars = self._plan(self._hp, t, self._scalars, self._fresh)
        bound = self._bound
        if bound is not None:
            try:
                bound.step(grad, args, _threads[0])
            except (TypeError, ValueError, BufferError):
                # refused before anything was written: convert what is not a NumPy
                # array (a tensor, a buffer), or name the culprit; then once more
                bound.step(self._grads(grad), args, _threads[0])
        else:
            self._step_groups(grad, args)
        d = self.__dict__
        d["_scalars"] = scalars
        d["_fresh"] = False
        d["step_count"] = t

    def _step_groups(self, grad, args):
        """A list of mixed dtypes: every group's gradients are taken and checked
        before any group runs, so a bad gradient writes nothing."""
        try:
            self._prepare_groups(grad)
        except (TypeError, ValueError, BufferError):
            grad = self._grads(grad)
            self._prepare_groups(grad)
        for _, bound in self._groups:
            bound.run(args, _threads[0])

    def _prepare_groups(self, grad):
        if type(grad) is not list and type(grad) is not tuple:
            raise TypeError(f"grad must be a list of {len(self._params)} arrays, got "
                            f"{type(grad).__name__}")
        if len(grad) != len(self._params):
            raise ValueError(f"grad has {len(grad)} arrays, param has {len(self._params)}")
        for index, bound in self._groups:
            bound.prepare([grad[i] for i in index])

    def _grads(self, grad):
        """``grad`` as the arrays the bound kernels take, or the error in words."""
        be = self._backend
        if not self._many:
            return self._one_grad("grad", grad, self._params[0], be)
        if not isinstance(grad, (list, tuple)):
            raise TypeError(f"grad must be a list of {len(self._params)} arrays (one per "
                            f"param), got {type(grad).__name__}")
        if len(grad) != len(self._params):
            raise ValueError(f"grad has {len(grad)} arrays, param has {len(self._params)}")
        return [self._one_grad(f"grad[{i}]", g, p, be)
                for i, (g, p) in enumerate(zip(grad, self._params))]

    @staticmethod
    def _one_grad(name, grad, p, be):
        flat = coerce(name, grad, be)  # a flat view, or TypeError/ValueError naming it
        check_array(name, flat, writable=False)
        if np.dtype(flat.dtype) != np.dtype(p.dtype):
            raise TypeError(f"{name} has dtype {np.dtype(flat.dtype)}, param has dtype "
                            f"{np.dtype(p.dtype)}; they must match")
        if flat.shape[0] != p.shape[0]:
            raise ValueError(f"{name} has {flat.shape[0]} elements, param has {p.shape[0]}")
        return flat

    # -- hyperparameters ----------------------------------------------------
    def __setattr__(self, name, value):
        if name in self.rule.defaults:
            hp = self.rule.with_hyper(self._hp, name, value)
            self.__dict__["_hp"] = hp
            # a schedule's opt.lr = x: re-bind only when the set of buffers changes
            if self.rule.needed_buffers(hp) != self._needed:
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
        tensor's NumPy view; ``FlatParams.data`` for FlatParams); a list of them when
        a list was given. State buffers are flat, of the array's size."""
        return list(self._shaped) if self._many else self._shaped[0]

    @property
    def state(self):
        """The state buffers by torch's names: one dict, or one dict per array when
        ``param`` is a list."""
        return self._states if self._many else self._states[0]

    @property
    def backend(self) -> str:
        return self._backend.NAME

    def _sync_buffers(self):
        """Allocate the buffers the current hyperparameters need; the kernel gets
        None for the others (kept in ``state`` if they exist, as torch does)."""
        rule, hp, be = self.rule, self._hp, self._backend
        bufs = []
        for p, state in zip(self._params, self._states):
            for b in rule.buffers:
                if b.needed(hp) and b.name not in state:
                    state[b.name] = be.full(p.shape[0], p.dtype, b.fill(hp), p)
                    # a buffer born after step 1 takes torch's first-use path (SGD: b ← g)
                    self.__dict__["_fresh"] = self.step_count > 0
            bufs.append(tuple(state[b.name] if b.needed(hp) else None for b in rule.buffers))
        d = self.__dict__
        d["_bufs"] = bufs
        d["_needed"] = rule.needed_buffers(hp)
        if not self._many:
            d["_bound"] = backends.bind(be, rule.kernel, self._params[0], bufs[0])
            d["_groups"] = None
            return
        by_dtype: dict = {}
        for i, p in enumerate(self._params):
            by_dtype.setdefault(np.dtype(p.dtype), []).append(i)
        groups = [(index, backends.bind_many(be, rule.kernel,
                                             [self._params[i] for i in index],
                                             [bufs[i] for i in index], labels=index))
                  for index in by_dtype.values()]
        d["_groups"] = groups
        # one dtype: one bound call takes the whole gradient list as it comes
        d["_bound"] = groups[0][1] if len(groups) == 1 else None

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hp.items())
        if self._many:
            n = sum(int(p.shape[0]) for p in self._params)
            what = f"<{len(self._params)} arrays, {n} elements on {self._backend.NAME}>"
        else:
            p = self._params[0]
            what = f"<{p.shape[0]} x {np.dtype(p.dtype)} on {self._backend.NAME}>"
        return f"{type(self).__name__}({what}, {hp}; step_count={self.step_count})"

    # -- checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python/NumPy data: rule, dtype, size, step, hyperparameters,
        scalar state and copies of the state buffers. For a list of arrays, dtype,
        size and state are lists with one entry per array."""
        be = self._backend
        dtypes = [np.dtype(p.dtype).name for p in self._params]
        sizes = [int(p.shape[0]) for p in self._params]
        states = [{name: be.to_host(buf) for name, buf in st.items()} for st in self._states]
        one = not self._many
        return {
            "format": STATE_DICT_FORMAT,
            "rule": self.rule.name,
            "dtype": dtypes[0] if one else dtypes,
            "size": sizes[0] if one else sizes,
            "step": int(self.step_count),
            "hyperparameters": dict(self._hp),
            "scalars": dict(self._scalars),
            "state": states[0] if one else states,
        }

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``. Everything is checked before anything changes."""
        rule = self.rule
        sd = _check_state_dict(state_dict, rule,
                               [np.dtype(p.dtype) for p in self._params],
                               [int(p.shape[0]) for p in self._params], self._many)
        states = []
        for p, old, new in zip(self._params, self._states, sd["state"]):
            state = {}
            for name, host in new.items():
                buf = old.get(name)
                if buf is None:
                    buf = self._backend.full(host.shape[0], host.dtype, 0, p)
                self._backend.copy_from_host(buf, host)
                state[name] = buf
            states.append(state)
        d = self.__dict__
        d["_hp"] = sd["hyperparameters"]
        d["_scalars"] = sd["scalars"]
        d["step_count"] = sd["step"]
        d["_fresh"] = False
        d["_states"] = states
        self._sync_buffers()


def _check_state_dict(sd, rule: Rule, dtypes: list, sizes: list, many: bool) -> dict:
    """A validated, normalised copy of ``sd`` (ValueError/TypeError otherwise); its
    'state' is a list with one dict per array."""
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
    if many:
        for key, want in (("dtype", [d.name for d in dtypes]), ("size", sizes)):
            got = sd[key]
            if not isinstance(got, (list, tuple)) or len(got) != len(want):
                raise ValueError(f"state_dict[{key!r}] must be a list of {len(want)} entries "
                                 f"(one per array), got {got!r}")
        got_dtypes, got_sizes = list(sd["dtype"]), list(sd["size"])
    else:
        if isinstance(sd["size"], (list, tuple)):
            raise ValueError(f"state_dict['size'] is a list of {len(sd['size'])} sizes: it "
                             "comes from an optimizer built from a list of arrays; this one "
                             "has one array")
        got_dtypes, got_sizes = [sd["dtype"]], [sd["size"]]
    for i, (got, want) in enumerate(zip(got_dtypes, dtypes)):
        if str(got) != want.name:
            where = f"['dtype'][{i}]" if many else "['dtype']"
            raise ValueError(f"state_dict{where} is {got!r}; the param has dtype "
                             f"{want.name!r}")
    for i, (got, want) in enumerate(zip(got_sizes, sizes)):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral) or int(got) != want:
            where = f"['size'][{i}]" if many else "['size']"
            raise ValueError(f"state_dict{where} is {got!r}; the param has {want} elements")
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
    states_in = sd["state"]
    if many:
        if not isinstance(states_in, (list, tuple)) or len(states_in) != len(sizes):
            raise TypeError(f"state_dict['state'] must be a list of {len(sizes)} dicts "
                            f"(one per array), got {type(states_in).__name__}")
    else:
        states_in = [states_in]
    known = {b.name for b in rule.buffers}
    states = []
    for i, (state_in, dtype, size) in enumerate(zip(states_in, dtypes, sizes)):
        where = f"state_dict['state'][{i}]" if many else "state_dict['state']"
        if not isinstance(state_in, dict):
            raise TypeError(f"{where} must be a dict, got {type(state_in).__name__}")
        state = {}
        for name, arr in state_in.items():
            if name not in known:
                raise ValueError(f"{where} has {name!r}, which {rule.name} does not "
                                 f"use (it has {sorted(known)})")
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{where}[{name!r}] must be a NumPy array, got "
                                f"{type(arr).__name__}")
            if arr.dtype != dtype or arr.shape != (size,):
                raise ValueError(f"{where}[{name!r}] has shape {arr.shape} and dtype "
                                 f"{arr.dtype}; expected ({size},) {dtype.name}")
            state[name] = arr
        if step > 0:
            for b in rule.buffers:
                if b.needed(hp) and b.name not in state:
                    raise ValueError(f"{where} lacks {b.name!r}, which {rule.name} "
                                     f"needs with these hyperparameters after step 0")
        states.append(state)
    return {"step": int(step), "hyperparameters": hp, "scalars": scalars, "state": states}


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
             "    where grad has param's size (any shape). State buffers are flat.",
             "    Or a list of such arrays: step([grad, ...]) updates them all in one",
             "    call, each with its own state (state[i])."]
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
