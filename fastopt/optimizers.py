"""Optimizer classes, one per registry row: ``fastopt.Adam(param, lr=...)``, and
bitsandbytes' 8-bit optimizers over the same rows (``fastopt.AdamW8bit`` ...).

An optimizer owns one parameter array, or a list of them, and each array's state.
Construction and hyperparameter changes validate everything once; ``step(grad)``
then computes the per-step scalars and makes one kernel call over every array (one
per storage type in a mixed list): the segment engine, bound once to the arrays.

Low-precision storage: parameters may be float32, float64, float16 or bfloat16
(``ml_dtypes.bfloat16`` arrays); the arithmetic of a non-float64 array is float32,
its state is stored in the parameter's dtype unless ``state_dtype`` says otherwise,
or in 8-bit block-wise codes (the ``...8bit`` classes). ``step(grad, copy_to=...)``
takes a gradient of another precision (float32/float16/bfloat16 for a non-float64
parameter) and writes a copy of the new parameters in the same pass. These run on
the compiled backend's staged path; a backend without it refuses them by name.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings

import numpy as np

from fastopt import backends
from fastopt._checks import (COPY_DTYPES, MAX_STEP, PARAM_DTYPES, _bf16_tensor_view,
                             _byte_range, check_array, coerce)
from fastopt.flat import FlatParams
from fastopt.rules import RULES, Rule

STATE_DICT_FORMAT = "fastopt.state_dict/1"
_threads = backends._num_threads  # read once per step: a list, shared

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_Q8 = np.dtype(np.uint8)      # a state type: 8-bit block-wise codes (with absmax)
BLOCK = 256                   # elements per 8-bit block (one float32 absmax each)
ABSMAX = ".absmax"            # state key suffix of an 8-bit buffer's block scales
_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """The spec's 32-bit hash (xor-shift-multiply, wrapping), in Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sr_key(seed: int, step: int) -> int:
    """The stochastic-rounding key of step ``step``: mix32(seed ^ mix32(step·0x27D4EB2F)),
    uint32 arithmetic (fastopt.quant.sr_key computes the same)."""
    return _mix32((seed & _M32) ^ _mix32((step * 0x27D4EB2F) & _M32))


def _storage_dtype(name: str, value):
    """``state_dtype``: None, or float32/float16/bfloat16/float64 (name or dtype)."""
    if value is None:
        return None
    if isinstance(value, str) and value == "bfloat16" or \
            getattr(value, "__name__", None) == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"{name}='bfloat16' needs the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.name not in PARAM_DTYPES:
        raise TypeError(f"{name} must be None (the parameter's dtype), 'float32', "
                        f"'float16', 'bfloat16' or 'float64', got {value!r}")
    return dt


def _check_seed(name, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed <= _M32:
        raise TypeError(f"{name} must be None or an int in [0, 2**32), got {seed!r}")
    return int(seed)


_STORAGE_CAPABLE: dict = {}


def _storage_capable(be) -> bool:
    """Whether ``be`` binds low-precision and 8-bit storage (``grad_dtype``,
    ``absmax``, ``qmaps``; its bound calls then take ``copies`` and ``sr_key``)."""
    ok = _STORAGE_CAPABLE.get(be.NAME)
    if ok is None:
        try:
            params = inspect.signature(be.bind_many).parameters
        except (TypeError, ValueError):
            params = {}
        # named, or taken through **storage (then a refusal is caught at the call)
        ok = "grad_dtype" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        _STORAGE_CAPABLE[be.NAME] = ok
    return ok


def _call_refused(exc: TypeError) -> bool:
    """Whether ``exc`` says a backend's call does not take the storage arguments
    (an older signature), rather than refusing an argument's value."""
    text = str(exc)
    return "unexpected keyword argument" in text or "positional argument" in text


def _refuse_backend(be, what: str):
    raise TypeError(f"the {be.NAME} backend does not run {what} (only the compiled "
                    "backend has the staged low-precision path so far: backend='cython')")


_MAPS: dict = {}


def _dynamic_map(signed: bool) -> np.ndarray:
    m = _MAPS.get(signed)
    if m is None:
        from fastopt import quant
        m = _MAPS[signed] = quant.dynamic_map(signed)
        m.flags.writeable = False
    return m


class _Group:
    """Arrays of one storage type (param dtype, state types), stepped by one call."""

    __slots__ = ("index", "pdt", "types", "bf16")

    def __init__(self, index, pdt, types):
        self.index, self.pdt, self.types = index, pdt, types
        self.bf16 = pdt.name == "bfloat16"


class Optimizer:
    """Base of every fastopt optimizer; subclasses set ``rule``.

    ``param`` is one array, or a list of arrays stepped together: one kernel call per
    step over all of them (one per storage type when the list mixes float32, float64,
    float16 and bfloat16), each array updated where it lives, with its own state.
    """

    rule: Rule
    _fixed: dict = {}          # hyperparameters a class keeps at one value (8-bit)
    _exposed = None            # the hyperparameter names a class shows (None: all)
    _signed = None             # 8-bit classes: per state buffer, signed map or not

    def __init__(self, param, *, backend=None, state_dtype=None,
                 bf16_stochastic_round=False, seed=None, **hyperparameters):
        rule = self.rule
        unknown = set(hyperparameters) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name} got unexpected hyperparameter(s) "
                            f"{', '.join(sorted(unknown))}; it takes "
                            f"{', '.join(rule.defaults)}")
        hp = rule.check_hypers({**rule.defaults, **hyperparameters})
        self._check_hp(hp)
        if not isinstance(bf16_stochastic_round, (bool, np.bool_)):
            raise TypeError(f"bf16_stochastic_round must be a bool, got "
                            f"{bf16_stochastic_round!r}")
        if seed is None:
            # drawn once from the OS's entropy; state_dict() keeps it
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        seed = _check_seed("seed", seed)
        sdt = _storage_dtype("state_dtype", state_dtype)
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
        flats, shaped, types = [], [], []
        for name, p in zip(names, params):
            arr = coerce(name, p, be)
            check_array(name, arr, dtypes=PARAM_DTYPES)
            flats.append(arr)
            # what `param` shows: the caller's array in its own shape, sharing memory
            # with the flat view (a tensor's NumPy view for a tensor)
            shaped.append(be.as_array(_bf16_tensor_view(p)))
            types.append(self._state_types(name, np.dtype(arr.dtype), int(arr.shape[0]),
                                           sdt))
        # one group per storage type, in order of first appearance
        keyed: dict = {}
        for i, (p, ty) in enumerate(zip(flats, types)):
            keyed.setdefault((np.dtype(p.dtype), ty), []).append(i)
        groups = [_Group(index, pdt, ty) for (pdt, ty), index in keyed.items()]
        lowp = [g for g in groups if g.pdt.name in ("float16", "bfloat16")
                or any(t != g.pdt for t in g.types)]
        if lowp and not _storage_capable(be):
            g = lowp[0]
            state = "/".join(sorted({"8-bit" if t == _Q8 else t.name for t in g.types}))
            _refuse_backend(be, f"{g.pdt.name} params with {state} state")
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
        d["_types"] = types
        d["_groups"] = groups
        d["_gdt"] = [g.pdt for g in groups]   # each group's gradient dtype, last seen
        d["_seed"] = seed
        d["_sr"] = bool(bf16_stochastic_round) and any(g.bf16 for g in groups)
        d["_bf16_stochastic_round"] = bool(bf16_stochastic_round)
        d["step_count"] = 0
        self._sync_buffers()

    # -- storage ---------------------------------------------------------------
    def _state_types(self, name, pdt, n, sdt):
        """Each state buffer's storage type for a parameter of dtype ``pdt`` and ``n``
        elements: the parameter's dtype, or ``state_dtype``."""
        if sdt is None or sdt == pdt:
            return (pdt,) * len(self.rule.buffers)
        if pdt == _F64 or sdt == _F64:
            raise TypeError(f"state_dtype={sdt.name!r} with {name} of dtype {pdt.name}: "
                            "float64 params keep float64 state, and float64 state needs "
                            "float64 params")
        return (sdt,) * len(self.rule.buffers)

    def _check_hp(self, hp):
        """Checks a class adds to its rule's (the 8-bit classes)."""

    # -- the hot path -------------------------------------------------------
    def step(self, grad, copy_to=None):
        """One update of ``param`` in place with gradient ``grad`` (a list of one
        gradient per array when ``param`` is a list).

        ``grad`` may have another precision than a non-float64 ``param`` (float32,
        float16 or bfloat16: the CPU-offload step). ``copy_to``: an array (a list of
        them for a list of params) of param's size, float32, float16 or bfloat16,
        that receives the new parameters in the same pass. Bad input raises before
        anything (param, state, step count) changes."""
        t = self.step_count + 1
        args, scalars = self._plan(self._hp, t, self._scalars, self._fresh)
        key = sr_key(self._seed, t) if self._sr else None
        try:
            bound = self._bound
            if bound is None:
                self._step_groups(grad, copy_to, key, args)
            elif copy_to is None and key is None:
                bound.step(grad, args, _threads[0])
            else:
                bound.step(grad, args, _threads[0], copy_to, key)
        except (TypeError, ValueError, BufferError):
            # refused before anything was written: convert what is not a NumPy
            # array (a tensor, a buffer), bind for a gradient of another precision,
            # or name the culprit
            self._step_checked(grad, copy_to, key, args)
        d = self.__dict__
        d["_scalars"] = scalars
        d["_fresh"] = False
        d["step_count"] = t

    def _step_groups(self, grad, copy_to, key, args):
        """A list of several storage types, as it comes: every group's gradients
        taken before any group runs (any refusal: ``_step_checked``)."""
        if copy_to is not None or (type(grad) is not list and type(grad) is not tuple) \
                or len(grad) != len(self._params):
            raise TypeError("to the checked path")
        ready = self._gbound
        for g, bound in zip(self._groups, ready):
            gs = [grad[i] for i in g.index]
            if key is not None and g.bf16:
                bound.prepare(gs, None, key)
            else:
                bound.prepare(gs)
        for bound in ready:
            bound.run(args, _threads[0])

    def _step_checked(self, grad, copy_to, key, args):
        """Every group's gradients (and copies) taken and checked before any group
        runs, so that bad input writes nothing; a group whose gradients changed
        precision is bound for the new one."""
        grads = self._grads(grad)
        copies = None if copy_to is None else self._copies(copy_to)
        be, many = self._backend, self._many
        if copies is not None:
            if not _storage_capable(be):
                _refuse_backend(be, "copy_to")
            self._check_copy_overlap(grads, copies)
        ready = []
        for gi, g in enumerate(self._groups):
            first = np.dtype(grads[g.index[0]].dtype)
            for j in g.index:
                if np.dtype(grads[j].dtype) != first:
                    state = "8-bit" if g.types[0] == _Q8 else g.types[0].name
                    raise TypeError(f"grad[{j}] has dtype {np.dtype(grads[j].dtype)}, "
                                    f"grad[{g.index[0]}] has {first}: the gradients of the "
                                    f"{g.pdt.name} params with {state} state must share "
                                    "one dtype")
            bound = self._bind(gi, first)
            gs = grads[0] if not many else [grads[i] for i in g.index]
            k = key if g.bf16 else None
            cs = None if copies is None else (
                copies[0] if not many else [copies[i] for i in g.index])
            extra = () if cs is None and k is None else (cs, k)
            try:
                if len(self._groups) == 1:
                    # checks everything before it writes (a CUDA bound call has no
                    # prepare)
                    bound.step(gs, args, _threads[0], *extra)
                else:
                    bound.prepare(gs, *extra)
            except TypeError as exc:
                if extra and _call_refused(exc):
                    _refuse_backend(be, "copy_to" if cs is not None
                                    else "bf16_stochastic_round")
                raise
            ready.append((gi, bound))
        if len(self._groups) > 1:
            for gi, bound in ready:
                bound.run(args, _threads[0])
        for gi, bound in ready:
            self._gdt[gi] = np.dtype(grads[self._groups[gi].index[0]].dtype)
            self._gbound[gi] = bound
        self.__dict__["_bound"] = ready[0][1] if len(ready) == 1 else None

    def _grads(self, grad):
        """``grad`` as the arrays the bound kernels take, or the error in words."""
        be = self._backend
        if not self._many:
            return [self._one_grad("grad", grad, self._params[0], be)]
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
        check_array(name, flat, writable=False, dtypes=PARAM_DTYPES)
        gdt, pdt = np.dtype(flat.dtype), np.dtype(p.dtype)
        if gdt != pdt and _F64 in (gdt, pdt):
            raise TypeError(f"{name} has dtype {gdt}, param has dtype {pdt}; they must "
                            "match (float64 mixes only with float64; a float32, float16 "
                            "or bfloat16 param takes a float32, float16 or bfloat16 grad)")
        if flat.shape[0] != p.shape[0]:
            raise ValueError(f"{name} has {flat.shape[0]} elements, param has {p.shape[0]}")
        return flat

    def _copies(self, copy_to):
        be = self._backend
        if not self._many:
            items, names = [copy_to], ["copy_to"]
        else:
            if not isinstance(copy_to, (list, tuple)):
                raise TypeError(f"copy_to must be a list of {len(self._params)} arrays "
                                f"(one per param), got {type(copy_to).__name__}")
            if len(copy_to) != len(self._params):
                raise ValueError(f"copy_to has {len(copy_to)} arrays, param has "
                                 f"{len(self._params)}")
            items = list(copy_to)
            names = [f"copy_to[{i}]" for i in range(len(items))]
        out = []
        for name, c, p in zip(names, items, self._params):
            flat = coerce(name, c, be)
            check_array(name, flat, dtypes=COPY_DTYPES)
            if np.dtype(p.dtype) == _F64:
                raise TypeError(f"{name}: copy_to needs float32, float16 or bfloat16 "
                                "params, not float64")
            if flat.shape[0] != p.shape[0]:
                raise ValueError(f"{name} has {flat.shape[0]} elements, param has "
                                 f"{p.shape[0]}")
            out.append(flat)
        return out

    def _check_copy_overlap(self, grads, copies):
        """Each copy against every other array of the call, in every group (a bound
        call checks only its own group), named as the caller passed them."""
        at = (lambda i: f"[{i}]") if self._many else (lambda i: "")  # noqa: E731
        spans = []
        for i, (p, st) in enumerate(zip(self._params, self._states)):
            spans.append((p, f"param{at(i)}"))
            spans.append((grads[i], f"grad{at(i)}"))
            spans += [(a, f"state{at(i)}[{k!r}]") for k, a in st.items()]
        copy_spans = [(c, f"copy_to{at(i)}") for i, c in enumerate(copies)]
        ranges = [(_byte_range(a), n) for a, n in spans + copy_spans if a.shape[0] > 0]
        lo = np.array([r[0][0] for r in ranges], dtype=np.uint64)
        hi = np.array([r[0][1] for r in ranges], dtype=np.uint64)
        first_copy = len(ranges) - sum(1 for c, _ in copy_spans if c.shape[0] > 0)
        for k in range(first_copy, len(ranges)):
            hit = np.flatnonzero((lo < hi[k]) & (lo[k] < hi))
            hit = hit[hit != k]
            if hit.size:
                raise ValueError(f"{ranges[k][1]} shares memory with {ranges[hit[0]][1]}; "
                                 "every buffer that is written must be distinct (pass a copy)")

    # -- hyperparameters ----------------------------------------------------
    def __setattr__(self, name, value):
        if name in self.rule.defaults:
            if name in self._fixed:
                hp = self.rule.check_hypers({**self._hp, name: value})
                if hp[name] != self._fixed[name]:
                    raise ValueError(f"{type(self).__name__} keeps {name}="
                                     f"{self._fixed[name]!r}; it cannot be changed")
                return
            hp = self.rule.with_hyper(self._hp, name, value)
            self._check_hp(hp)
            self.__dict__["_hp"] = hp
            # a schedule's opt.lr = x: re-bind only when the set of buffers changes
            if self.rule.needed_buffers(hp) != self._needed:
                self._sync_buffers()
        elif name == "step_count":
            raise AttributeError("step_count is set by step() and load_state_dict()")
        elif name in self.__dict__ or name in ("state", "seed"):
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
        if self._exposed is None:
            return dict(self._hp)
        return {k: self._hp[k] for k in self._exposed}

    @property
    def param(self):
        """The array given at construction, in its own shape, updated in place (a
        tensor's NumPy view; ``FlatParams.data`` for FlatParams); a list of them when
        a list was given. State buffers are flat, of the array's size."""
        return list(self._shaped) if self._many else self._shaped[0]

    @property
    def state(self):
        """The state buffers by torch's names (an 8-bit buffer: its uint8 codes, and
        its float32 block scales under ``<name>.absmax``): one dict, or one dict per
        array when ``param`` is a list."""
        return self._states if self._many else self._states[0]

    @property
    def seed(self) -> int:
        """The stochastic-rounding seed (drawn at construction unless given)."""
        return self._seed

    @property
    def bf16_stochastic_round(self) -> bool:
        return self._bf16_stochastic_round

    @property
    def backend(self) -> str:
        return self._backend.NAME

    def _sync_buffers(self):
        """Allocate the buffers the current hyperparameters need; the kernel gets
        None for the others (kept in ``state`` if they exist, as torch does)."""
        rule, hp, be = self.rule, self._hp, self._backend
        d = self.__dict__
        bufs, scales = [], []
        for p, state, types in zip(self._params, self._states, self._types):
            n = int(p.shape[0])
            for b, ty in zip(rule.buffers, types):
                if b.needed(hp) and b.name not in state:
                    if ty == _Q8:
                        if b.fill(hp) != 0:
                            raise ValueError(f"{b.name} starts at {b.fill(hp)}; 8-bit "
                                             "state starts at 0")
                        # code 0 times absmax 0: the buffer reads as zeros
                        state[b.name] = be.full(n, _Q8, 0, p)
                        state[b.name + ABSMAX] = be.full(-(-n // BLOCK), _F32, 0, p)
                    else:
                        state[b.name] = be.full(n, ty, b.fill(hp), p)
                    # a buffer born after step 1 takes torch's first-use path (SGD: b ← g)
                    d["_fresh"] = self.step_count > 0
            bufs.append(tuple(state[b.name] if b.needed(hp) else None for b in rule.buffers))
            scales.append(tuple(state.get(b.name + ABSMAX) if b.needed(hp) else None
                                for b in rule.buffers))
        d["_bufs"] = bufs
        d["_scales"] = scales
        d["_needed"] = rule.needed_buffers(hp)
        d["_binds"] = {}
        bound = d["_gbound"] = [self._bind(gi, gdt) for gi, gdt in enumerate(self._gdt)]
        # one group: one bound call takes the whole gradient list as it comes
        d["_bound"] = bound[0] if len(bound) == 1 else None

    def _bind(self, gi, gdt):
        """The bound call of group ``gi`` for gradients of dtype ``gdt`` (cached until
        the buffers change)."""
        bound = self._binds.get((gi, gdt))
        if bound is not None:
            return bound
        g, be, kernel = self._groups[gi], self._backend, self.rule.kernel
        storage = {}
        if gdt != g.pdt:
            storage["grad_dtype"] = gdt
        q8 = _Q8 in g.types
        if q8:
            storage["absmax"] = [self._scales[i] for i in g.index]
            storage["qmaps"] = tuple(_dynamic_map(s) if t == _Q8 else None
                                     for s, t in zip(self._signed or (), g.types))
        if storage and not _storage_capable(be):
            _refuse_backend(be, f"a {gdt.name} gradient for {g.pdt.name} params"
                            if not q8 else "8-bit state")
        try:
            if not self._many:
                if q8:
                    storage["absmax"] = storage["absmax"][0]
                bound = backends.bind(be, kernel, self._params[0], self._bufs[0],
                                      **storage)
            else:
                bound = backends.bind_many(be, kernel, [self._params[i] for i in g.index],
                                           [self._bufs[i] for i in g.index],
                                           labels=g.index, **storage)
        except TypeError as exc:
            if storage and _call_refused(exc):
                _refuse_backend(be, f"a {gdt.name} gradient for {g.pdt.name} params"
                                if not q8 else "8-bit state")
            raise
        self._binds[(gi, gdt)] = bound
        return bound

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
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
        scalar state, the stochastic-rounding seed and copies of the state buffers
        (bfloat16 state as ml_dtypes arrays; 8-bit state as uint8 codes and float32
        ``<name>.absmax``). For a list of arrays, dtype, size and state are lists with
        one entry per array."""
        be = self._backend
        dtypes = [np.dtype(p.dtype).name for p in self._params]
        sizes = [int(p.shape[0]) for p in self._params]
        states = [{name: be.to_host(buf) for name, buf in st.items()} for st in self._states]
        one = not self._many
        return {
            "format": STATE_DICT_FORMAT,
            "rule": type(self).__name__ if self._exposed is not None else self.rule.name,
            "dtype": dtypes[0] if one else dtypes,
            "size": sizes[0] if one else sizes,
            "step": int(self.step_count),
            "hyperparameters": self.hyperparameters,
            "scalars": dict(self._scalars),
            "seed": self._seed,
            "state": states[0] if one else states,
        }

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``. Everything is checked before anything changes."""
        rule = self.rule
        sd = _check_state_dict(state_dict, rule,
                               [np.dtype(p.dtype) for p in self._params],
                               [int(p.shape[0]) for p in self._params], self._many,
                               self._types, self._exposed, self._fixed,
                               type(self).__name__ if self._exposed is not None else None)
        self._check_hp(sd["hyperparameters"])
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
        if sd["seed"] is not None:
            d["_seed"] = sd["seed"]
        self._sync_buffers()


def _check_state_dict(sd, rule: Rule, dtypes: list, sizes: list, many: bool,
                      types: list | None = None, exposed=None, fixed=None,
                      name: str | None = None) -> dict:
    """A validated, normalised copy of ``sd`` (ValueError/TypeError otherwise); its
    'state' is a list with one dict per array. ``types``: per array, each state
    buffer's storage type (default: the param's dtype; uint8: 8-bit codes with
    float32 ``<name>.absmax``); ``exposed``/``fixed``/``name``: an 8-bit class's
    hyperparameter names, its fixed values and its name."""
    name = name or rule.name
    if types is None:
        types = [(d,) * len(rule.buffers) for d in dtypes]
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for key in ("rule", "dtype", "size", "step", "hyperparameters", "scalars", "state"):
        if key not in sd:
            raise ValueError(f"state_dict is missing {key!r}")
    if sd.get("format", STATE_DICT_FORMAT) != STATE_DICT_FORMAT:
        raise ValueError(f"state_dict format {sd['format']!r} is not {STATE_DICT_FORMAT!r}")
    if sd["rule"] != name:
        raise ValueError(f"state_dict['rule'] is {sd['rule']!r}; this optimizer is "
                         f"{name!r}")
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
    unknown = set(hps) - set(rule.defaults if exposed is None else exposed)
    if unknown:
        raise ValueError(f"state_dict['hyperparameters'] has unknown names "
                         f"{sorted(unknown)} for {name}")
    hp = rule.check_hypers({**rule.defaults, **(fixed or {}), **hps})
    seed = sd.get("seed")
    if seed is not None:
        seed = _check_seed("state_dict['seed']", seed)
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
    states = []
    for i, (state_in, ty, size) in enumerate(zip(states_in, types, sizes)):
        where = f"state_dict['state'][{i}]" if many else "state_dict['state']"
        if not isinstance(state_in, dict):
            raise TypeError(f"{where} must be a dict, got {type(state_in).__name__}")
        # each entry's expected (dtype, length)
        want = {}
        for b, t in zip(rule.buffers, ty):
            want[b.name] = (t, size)
            if t == _Q8:
                want[b.name + ABSMAX] = (_F32, -(-size // BLOCK))
        state = {}
        for key, arr in state_in.items():
            if key not in want:
                raise ValueError(f"{where} has {key!r}, which {name} does not "
                                 f"use here (it has {sorted(want)})")
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{where}[{key!r}] must be a NumPy array, got "
                                f"{type(arr).__name__}")
            t, n = want[key]
            if arr.dtype != t or arr.shape != (n,):
                raise ValueError(f"{where}[{key!r}] has shape {arr.shape} and dtype "
                                 f"{arr.dtype}; expected ({n},) {t.name}")
            state[key] = arr
        for b, t in zip(rule.buffers, ty):
            if t == _Q8 and (b.name in state) != (b.name + ABSMAX in state):
                raise ValueError(f"{where} has one of {b.name!r} and "
                                 f"{b.name + ABSMAX!r} without the other")
        if step > 0:
            for b in rule.buffers:
                if b.needed(hp) and b.name not in state:
                    raise ValueError(f"{where} lacks {b.name!r}, which {name} "
                                     f"needs with these hyperparameters after step 0")
        states.append(state)
    return {"step": int(step), "hyperparameters": hp, "scalars": scalars, "state": states,
            "seed": seed}


_STORAGE_DOC = [
    "state_dtype : None (default: the param's dtype, as torch) or 'float32' (or",
    "    'float16'/'bfloat16'): the dtype of the state buffers of a float32, float16",
    "    or bfloat16 param (float64 params keep float64 state). Arithmetic is float32",
    "    for every non-float64 param; e.g. bfloat16 params with float32 state.",
]
_SR_DOC = [
    "bf16_stochastic_round : default False (torchao's name) — round each new",
    "    bfloat16 param stochastically (state rounds to nearest) with a counter-based",
    "    hash of (seed, step, array position, element): bitwise reproducible and",
    "    independent of the thread count.",
    "seed : None (drawn once from the OS's entropy) or an int in [0, 2**32): the",
    "    stochastic-rounding seed; kept in state_dict(), so a reload continues it.",
    "backend : None (decided at import), 'cython', 'numba' or 'cuda'. float16/bfloat16",
    "    storage, other-precision gradients and copy_to need the compiled backend.",
]
_STEP_DOC = [
    "",
    "step(grad, copy_to=None): grad of param's size; a float32/float16/bfloat16 param",
    "    also takes a gradient of another of these precisions (e.g. float32 master",
    "    params, bfloat16 gradients). copy_to: an array (a list for a list of params)",
    "    of param's size, float32/float16/bfloat16, written with the new params in the",
    "    same pass.",
]


def _make_class(rule: Rule):
    def __init__(self, param, *, backend=None, state_dtype=None,
                 bf16_stochastic_round=False, seed=None, **hyperparameters):
        Optimizer.__init__(self, param, backend=backend, state_dtype=state_dtype,
                           bf16_stochastic_round=bf16_stochastic_round, seed=seed,
                           **hyperparameters)

    KW = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
              inspect.Parameter("param", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(h.name, KW, default=h.default) for h in rule.hypers]
    params += [inspect.Parameter(n, KW, default=v) for n, v in
               (("backend", None), ("state_dtype", None),
                ("bf16_stochastic_round", False), ("seed", None))]
    __init__.__signature__ = inspect.Signature(params)
    lines = [f"{rule.name}: {rule.update}", "",
             "Parameters", "----------",
             "param : C-contiguous float32/float64/float16/bfloat16 array (ml_dtypes) of",
             "    any shape, buffer, CPU tensor, or FlatParams; updated in place through its",
             "    flat view by step(grad), where grad has param's size (any shape). State",
             "    buffers are flat. Or a list of such arrays: step([grad, ...]) updates them",
             "    all in one call per storage type, each with its own state (state[i])."]
    for h in rule.hypers:
        lines.append(f"{h.name} : default {h.default!r}" + (f" — {h.doc}" if h.doc else ""))
    lines += _STORAGE_DOC + _SR_DOC + _STEP_DOC
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


# ---------------------------------------------------------------------------
# bitsandbytes' 8-bit optimizers: a registry rule with uint8 block-wise state
# ---------------------------------------------------------------------------

class Optimizer8bit(Optimizer):
    """Base of the 8-bit classes: bitsandbytes 0.50.2's namesake's arguments and
    defaults over the fastopt rule that computes its update (its CPU code). An array
    of at least ``min_8bit_size`` elements keeps each state buffer as uint8 codes of
    bitsandbytes' dynamic map (signed for the first buffer, unsigned for Adam's
    second) with one float32 absmax per block of 256 elements: 2.03 bytes of state
    per parameter for Adam; a smaller one keeps float32 state, as bitsandbytes does.
    Each step dequantizes a block, runs the rule's float32 update on it and stores the
    nearest codes of the new state (ties to the lower), in one pass."""

    _bnb: dict = {}           # bitsandbytes-only arguments: name -> required value
    _min_8bit_size = 4096

    def __init__(self, param, *, backend=None, bf16_stochastic_round=False, seed=None,
                 min_8bit_size=4096, is_paged=False, **kwargs):
        name = type(self).__name__
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Real) \
                or not min_8bit_size >= 0:
            raise TypeError(f"min_8bit_size must be a number >= 0, got {min_8bit_size!r}")
        if is_paged:
            warnings.warn(f"{name}: is_paged=True has no effect here (host memory is not "
                          "paged to a device); ignored", UserWarning, stacklevel=3)
        hp = {}
        for key, value in kwargs.items():
            if key in self._bnb:
                if value != self._bnb[key]:
                    raise ValueError(f"{name} only supports {key}={self._bnb[key]!r} (the "
                                     f"default, kept for bitsandbytes compatibility), got "
                                     f"{value!r} (argument '{key}')")
                continue
            if key in self._fixed:
                hp_value = self.rule.hyper(key).coerce(value)
                if hp_value != self._fixed[key]:
                    raise ValueError(self._fixed_message(key, value))
                continue
            hp[key] = value
        self.__dict__["_min_8bit_size"] = min_8bit_size
        Optimizer.__init__(self, param, backend=backend,
                           bf16_stochastic_round=bf16_stochastic_round, seed=seed,
                           **self._fixed, **hp)

    def _fixed_message(self, key, value):
        name = type(self).__name__
        return (f"{name} supports only {key}={self._fixed[key]!r}, the update bitsandbytes' "
                f"{name} computes on the CPU; got {value!r} (argument '{key}')")

    def _state_types(self, name, pdt, n, sdt):
        if pdt == _F64:
            raise TypeError(f"{name} has dtype float64; {type(self).__name__} steps "
                            "float32, float16 and bfloat16 params")
        ty = _Q8 if n >= self._min_8bit_size else _F32
        return (ty,) * len(self.rule.buffers)

    @property
    def min_8bit_size(self):
        return self._min_8bit_size


def _make_8bit(name: str, rule_name: str, signature, fixed: dict, bnb: dict,
               signed: tuple, check=None, doc: str = ""):
    """One 8-bit class: ``signature`` its arguments after ``param`` in bitsandbytes'
    order ((name, default); ``inspect.Parameter.empty`` for a required one),
    ``fixed`` the rule's hyperparameters it keeps at one value, ``bnb`` its
    bitsandbytes-only arguments with their one accepted value."""
    rule = RULES[rule_name]
    exposed = tuple(n for n, _ in signature if n in rule.defaults and n not in fixed)
    KW = inspect.Parameter.KEYWORD_ONLY
    sig = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
         inspect.Parameter("param", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, KW, default=v) for n, v in signature]
        + [inspect.Parameter(n, KW, default=v) for n, v in
           (("backend", None), ("bf16_stochastic_round", False), ("seed", None))])

    def __init__(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        param = a.pop("param")
        Optimizer8bit.__init__(self, param, **a)

    def _check_hp(self, hp):
        if check is not None:
            check(hp)

    lines = [f"{name}: bitsandbytes' {name} (0.50.2) on fastopt's {rule_name} rule. "
             + doc, "", "Parameters", "----------",
             "param : float32, float16 or bfloat16 array (ml_dtypes) or a list of them.",
             ", ".join(f"{n}={v!r}" if v is not inspect.Parameter.empty else n
                       for n, v in signature) + " : as bitsandbytes;"]
    if bnb or fixed:
        lines.append("    accepted only at the values bitsandbytes' CPU update honours: "
                     + ", ".join(f"{k}={v!r}" for k, v in {**bnb, **fixed}.items()
                                 if k in dict(signature)) + ".")
    lines += ["min_8bit_size : arrays with fewer elements keep float32 state.",
              "is_paged : accepted, ignored with a warning (no device paging here)."]
    lines += _SR_DOC + _STEP_DOC
    lines += ["", f"State: {', '.join(b.name for b in rule.buffers if b.needed(rule.defaults))} "
              "(uint8 codes) and <name>.absmax (float32, one per 256 elements)."]
    cls = type(name, (Optimizer8bit,), {
        "rule": rule, "__init__": __init__, "_check_hp": _check_hp, "_fixed": dict(fixed),
        "_exposed": exposed, "_bnb": dict(bnb), "_signed": signed,
        "__doc__": "\n".join(lines), "__module__": "fastopt"})
    __init__.__signature__ = sig
    __init__.__qualname__ = f"{name}.__init__"
    return cls


def _sgd8_check(hp):
    if hp["momentum"] == 0:
        raise NotImplementedError("SGD without momentum is not supported! "
                                  "(argument 'momentum')")


def _rmsprop8_check(hp):
    if hp["alpha"] == 0:
        raise NotImplementedError("RMSprop with alpha==0.0 is not supported! "
                                  "(argument 'alpha')")


_E = inspect.Parameter.empty
_ADAM8 = dict(rule_name="AdamW", fixed={"amsgrad": False, "maximize": False,
                                        "decoupled_weight_decay": True},
              bnb={"optim_bits": 32}, signed=(True, False, True),
              doc="Weight decay is decoupled (θ ← θ(1 − γλ)) in both, as bitsandbytes'.")
OPTIMIZERS_8BIT = {
    "Adam8bit": _make_8bit(
        "Adam8bit", signature=(("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8),
                               ("weight_decay", 0.0), ("amsgrad", False), ("optim_bits", 32),
                               ("min_8bit_size", 4096), ("is_paged", False)), **_ADAM8),
    "AdamW8bit": _make_8bit(
        "AdamW8bit", signature=(("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8),
                                ("weight_decay", 1e-2), ("amsgrad", False), ("optim_bits", 32),
                                ("min_8bit_size", 4096), ("is_paged", False)), **_ADAM8),
    "Lion8bit": _make_8bit(
        "Lion8bit", "Lion", (("lr", 1e-4), ("betas", (0.9, 0.99)), ("weight_decay", 0.0),
                             ("min_8bit_size", 4096), ("is_paged", False)),
        fixed={"maximize": False}, bnb={}, signed=(True,)),
    "SGD8bit": _make_8bit(
        "SGD8bit", "SGD", (("lr", _E), ("momentum", 0.0), ("dampening", 0.0),
                           ("weight_decay", 0.0), ("nesterov", False),
                           ("min_8bit_size", 4096)),
        fixed={"dampening": 0.0, "nesterov": False, "maximize": False}, bnb={},
        signed=(True,), check=_sgd8_check,
        doc="Momentum without dampening (b ← μb + g; b ← g at step 1), L2 weight decay."),
    "RMSprop8bit": _make_8bit(
        "RMSprop8bit", "RMSprop", (("lr", 1e-2), ("alpha", 0.99), ("eps", 1e-8),
                                   ("weight_decay", 0.0), ("momentum", 0.0),
                                   ("centered", False), ("min_8bit_size", 4096)),
        fixed={"momentum": 0.0, "centered": False, "maximize": False}, bnb={},
        signed=(True, True, True), check=_rmsprop8_check),
    "Adagrad8bit": _make_8bit(
        "Adagrad8bit", "Adagrad", (("lr", 1e-2), ("lr_decay", 0.0), ("weight_decay", 0.0),
                                   ("initial_accumulator_value", 0.0), ("eps", 1e-10),
                                   ("optim_bits", 8), ("min_8bit_size", 4096)),
        fixed={"lr_decay": 0.0, "initial_accumulator_value": 0.0, "maximize": False},
        bnb={"optim_bits": 8}, signed=(True,)),
}
globals().update(OPTIMIZERS_8BIT)
__all__ = ["Optimizer", "Optimizer8bit", "sr_key", *OPTIMIZERS, *OPTIMIZERS_8BIT]
