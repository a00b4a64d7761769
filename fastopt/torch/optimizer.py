"""``fastopt.torch.Optimizer``: torch's optimizer protocol over fastopt's kernels.

The class owns protocol and layout, never math: param groups, hyperparameters read
from ``param_groups`` at every step (so torch's LR schedulers work unchanged),
``state_dict`` in torch's format, ``zero_grad``, closures. Each group's tensors live
in flat buffers (``layout.FlatGroup``), one per (device, dtype); a step is one call
of the rule's kernel per flat buffer, through the same backend selection as the
NumPy classes (compiled or Numba on the CPU, Numba CUDA on GPUs).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from copy import deepcopy
from itertools import chain

import torch

from fastopt import backends
from fastopt.rules import Rule
from fastopt.torch.layout import NO_STATE, FlatGroup, check_param_dtype

# torch's dispatch flags. fastopt always makes one fused call per (group, device,
# dtype): foreach and fused describe what it does anyway, so any value is accepted
# and kept in the group. capturable (CUDA graph capture) and differentiable (autograd
# through the step) need per-step scalars on the device and a differentiable
# update, which fastopt does not have: they are refused rather than ignored.
_increment_version = torch.autograd.graph.increment_version

DISPATCH_FLAGS = {"foreach": None, "fused": None, "capturable": False,
                  "differentiable": False}
_REFUSED = {"capturable": "CUDA graph capture needs per-step scalars on the device; "
                          "fastopt computes them on the host",
            "differentiable": "fastopt's kernels update parameters outside autograd"}


def _plain(value):
    """A tensor hyperparameter (torch allows lr=torch.tensor(...)) as a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter must have one element, got shape "
                             f"{tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _mutable(values) -> bool:
    return any(isinstance(v, (torch.Tensor, list)) or
               (isinstance(v, tuple) and _mutable(v)) for v in values)


def _cache_entry(raw: tuple, hp: dict) -> tuple:
    """(raw values to compare the group's with, their checked hp). A value that can
    change in place (a tensor, a list) would compare equal to itself after a change
    (tuple equality tries identity first), so such a group is cached with a raw that
    matches nothing: it is re-checked every step. Decided once, not per step."""
    return (object(), hp) if _mutable(raw) else (raw, hp)


def _scalar_dtype():
    # torch keeps 'step' in float32 unless the default dtype is float64
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base of ``fastopt.torch.<Rule>``; subclasses set ``rule``."""

    rule: Rule

    def __init__(self, params, defaults: dict):
        self._flat: list[list[FlatGroup]] = []   # per param group
        self._hp_cache: list = []                # per param group: _cache_entry(...)
        self._where: dict = {}                   # param -> (FlatGroup, index)
        self._hyper_names = tuple(h.name for h in self.rule.hypers)
        super().__init__(params, defaults)
        self.state = _State(self)

    # -- groups ------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # torch's checks and defaults; appends
        group = self.param_groups[-1]
        try:
            self._check_flags(group)
            hp = self._group_hypers(group)
            layout = self._pack(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        if self.rule.state_at_init:
            for fg in layout:
                fg.init_state(hp)
        self._flat.append(layout)
        self._hp_cache.append(_cache_entry(self._raw(group), hp))

    def _check_flags(self, group):
        for flag, why in _REFUSED.items():
            if group.get(flag):
                raise ValueError(f"{flag}=True is not supported by "
                                 f"fastopt.torch.{self.rule.name}: {why} "
                                 f"(argument '{flag}')")

    def _raw(self, group):
        try:
            return tuple([group[n] for n in self._hyper_names])
        except KeyError as exc:
            raise ValueError(f"param group lacks hyperparameter {exc.args[0]!r}") from None

    def _group_hypers(self, group) -> dict:
        raw = self._raw(group)
        return self.rule.check_hypers(dict(zip(self._hyper_names, _plain(raw))))

    def _hypers(self, i: int, group) -> dict:
        """Group i's checked hyperparameters; re-checked only when a value changed."""
        raw = self._raw(group)
        cached_raw, hp = self._hp_cache[i]
        if cached_raw == raw:
            return hp
        hp = self._group_hypers(group)
        self._hp_cache[i] = _cache_entry(raw, hp)
        return hp

    def _pack(self, params) -> list[FlatGroup]:
        if len(set(map(id, params))) != len(params):
            raise ValueError("a param group lists the same parameter twice; fastopt packs "
                             "each parameter once")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"a param group holds parameters on several devices "
                             f"({', '.join(sorted(map(str, devices)))}); put each device's "
                             "parameters in a group of their own")
        for k, p in enumerate(params):
            check_param_dtype(p, f"param {k} of the group")
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"param {k} of the group is a {p.layout} tensor; fastopt "
                                "updates dense parameters")
        by_dtype: dict = {}
        # trainable parameters first: frozen ones (no grad) then do not split the
        # trainable run, and a step stays one kernel call
        for p in sorted(params, key=lambda q: not q.requires_grad):
            by_dtype.setdefault(p.dtype, []).append(p)
        layout = [FlatGroup(ps, self.rule) for ps in by_dtype.values() if ps]
        for fg in layout:
            for i, p in enumerate(fg.params):
                self._where[p] = (fg, i)
        return layout

    # -- the step ----------------------------------------------------------------
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's
        loss (the closure runs with gradients enabled, before the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hps = [self._hypers(i, g) for i, g in enumerate(self.param_groups)]
        # every gradient of every group is checked before anything is written
        plans = [[fg.prepare() for fg in flats] for flats in self._flat]
        nthreads = backends.num_threads()
        for flats, group_plans, hp in zip(self._flat, plans, hps):
            for fg, plan in zip(flats, group_plans):
                fg.run(plan, hp, nthreads)
                # the kernels write outside autograd: bump the version counters as
                # torch's in-place updates do, so a backward through a graph that
                # saved a pre-step parameter still fails loudly
                _increment_version(fg.params)
        return loss

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients. The default keeps them as views of the flat gradient
        buffer (one memset, and ``backward`` accumulates in place, so the next step
        needs no gather). ``set_to_none=True`` is torch's default: gradients become
        None, parameters that then get none are skipped, and the next step gathers
        the fresh gradients (one copy)."""
        for flats in self._flat:
            for fg in flats:
                fg.zero_grad(set_to_none)

    # -- checkpoints in torch's format ---------------------------------------------
    def state_dict(self) -> dict:
        return with_state_dict_hooks(self, self._state_dict)

    def _state_dict(self) -> dict:
        index: dict = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        step_dtype = _scalar_dtype()
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                fg, i = self._where[p]
                if fg.has_state(i):
                    state[index[id(p)]] = fg.export(i, step_dtype)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict`` of this class or of ``torch.optim``'s namesake.
        Everything is checked first; on any error nothing changes."""
        state_dict = after_load_pre_hooks(self, state_dict)
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict lacks {key!r}: not an optimizer state dict")
        groups = self.param_groups
        saved = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved),
                          chain.from_iterable(g["params"] for g in groups)))
        new_groups, new_hps, group_of = [], [], {}
        for g, s in zip(groups, saved):
            ng = {**self.defaults, **s, "params": g["params"]}
            if "param_names" in g and "param_names" not in s:
                ng["param_names"] = g["param_names"]
            self._check_flags(ng)
            hp = self._group_hypers(ng)
            new_groups.append(ng)
            new_hps.append(hp)
            for p in g["params"]:
                group_of[p] = hp
        imports = []
        for k, value in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"state_dict['state'] has an entry for parameter id {k!r}, "
                                 "which no param group lists")
            p = id_map[k]
            fg, i = self._where[p]
            key, bufs = fg.check_import(i, value, group_of[p])
            imports.append((fg, i, key, bufs))
        # checked: now change things
        for flats in self._flat:
            for fg in flats:
                fg.keys = [NO_STATE] * len(fg.params)
                fg.uniform = False
        for fg, i, key, bufs in imports:
            fg.apply_import(i, key, bufs)
        self.param_groups = new_groups
        self._hp_cache = [_cache_entry(self._raw(g), hp) for g, hp in zip(new_groups, new_hps)]
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError(f"fastopt.torch.{self.rule.name} cannot be pickled or deep-copied "
                        "(its parameters live in flat buffers); save state_dict() instead")

    def __repr__(self):
        text = super().__repr__()
        return "fastopt.torch." + text


def with_state_dict_hooks(opt, build) -> dict:
    """``build()``'s state dict with torch's state_dict pre- and post-hooks run."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    state_dict = build()
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def after_load_pre_hooks(opt, state_dict) -> dict:
    """A shallow copy of ``state_dict`` after torch's load_state_dict pre-hooks."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = state_dict.copy()
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


class _State(MutableMapping):
    """``opt.state``: param -> dict under torch's keys. Buffers are live views of the
    flat state; ``step`` and scalars are 0-dim tensors. Assigning a dict (as
    ZeroRedundancyOptimizer's ``load_state_dict`` does) writes into the flat state."""

    def __init__(self, opt: Optimizer):
        self._opt = opt

    def _find(self, p):
        try:
            return self._opt._where[p]
        except (KeyError, TypeError):
            raise KeyError(p) from None

    def __getitem__(self, p):
        fg, i = self._find(p)
        return _ParamState(self, p, fg.export(i, _scalar_dtype()) if fg.has_state(i) else {})

    def __setitem__(self, p, value):
        fg, i = self._find(p)
        hp = self._opt._hypers(*self._group_index(p))
        key, bufs = fg.check_import(i, dict(value), hp)
        fg.apply_import(i, key, bufs)

    def __delitem__(self, p):
        fg, i = self._find(p)
        fg.keys[i] = NO_STATE
        fg.uniform = False

    def _group_index(self, p):
        for gi, group in enumerate(self._opt.param_groups):
            if any(q is p for q in group["params"]):
                return gi, group
        raise KeyError(p)

    def _params(self):
        for group in self._opt.param_groups:
            for p in group["params"]:
                fg, i = self._opt._where[p]
                if fg.has_state(i):
                    yield p

    def __iter__(self):
        return self._params()

    def __len__(self):
        return sum(1 for _ in self._params())

    def __contains__(self, p):
        try:
            fg, i = self._find(p)
        except KeyError:
            return False
        return fg.has_state(i)

    def __repr__(self):
        return repr({p: self[p] for p in self})


class _ParamState(dict):
    """One parameter's state; assigning a key writes through to the flat state."""

    def __init__(self, owner: _State, p, values: dict):
        super().__init__(values)
        self._owner, self._p = owner, p

    def __setitem__(self, key, value):
        self._owner[self._p] = {**self, key: value}
        super().__setitem__(key, value)
