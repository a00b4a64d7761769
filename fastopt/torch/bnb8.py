"""bitsandbytes' 8-bit optimizers on fastopt's kernels: ``Adam8bit``, ``AdamW8bit``,
``Lion8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Adagrad8bit``.

    import fastopt.torch
    opt = fastopt.torch.AdamW8bit(model.parameters(), lr=1e-3)

Each class takes bitsandbytes 0.50.2's namesake's arguments, defaults and checks,
and keeps its state exactly as bitsandbytes does, so ``state_dict()`` loads into
``bitsandbytes.optim.<same name>`` and back:

* ``step`` (an int), ``state1`` (and ``state2`` for Adam) per parameter;
* a parameter of at least ``min_8bit_size`` elements keeps 8-bit block-wise state:
  ``state1``/``state2`` uint8 codes in the parameter's shape, ``absmax1``/``absmax2``
  the float32 largest magnitude of each block of 256 elements, ``qmap1`` the signed
  dynamic map and ``qmap2`` the unsigned one (``fastopt.quant.dynamic_map``);
* a smaller one keeps float32 ``state1``/``state2``;
* ``state_dict()`` nests the quantisation entries under
  ``"__bnb_optimizer_quant_state__"``, as bitsandbytes does (FSDP gathers every
  tensor of a parameter's state, and these have other shapes than the parameter).

A step is one call of the compiled engine per run of parameters sharing (group,
dtype, 8-bit or not, step count, maps): the engine dequantizes each block of 256
elements to float32, runs the rule's float32 kernel on it and requantizes to the
nearest code (``docs``: the low-precision storage spec, ``fastopt.quant`` its NumPy
reference). The per-element update is the fastopt rule that computes bitsandbytes'
(its CPU code): Adam8bit and AdamW8bit are fastopt's AdamW (bitsandbytes decays
both decoupled), SGD8bit is SGD with momentum and no dampening, RMSprop8bit is
RMSprop without momentum or centering, Adagrad8bit is Adagrad, Lion8bit is Lion.

Differences from bitsandbytes, all deliberate:

* codes are the nearest (ties to the lower code); bitsandbytes' CPU quantiser looks
  them up in a coarser table (a few percent of second-moment codes differ, by up
  to a top-decade step of the map: ``tests/test_quant.py`` measures it);
* arguments bitsandbytes accepts and then ignores are refused with a ValueError
  naming them: SGD8bit's ``dampening`` and ``nesterov``, RMSprop8bit's
  ``momentum``, and ``max_unorm``/``skip_zeros`` given through ``args``;
* CPU tensors of float32, float16 or bfloat16 only (float64 and CUDA parameters
  are refused); bitsandbytes' ``GlobalOptimManager`` overrides are not read.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain

import numpy as np
import torch

from fastopt import backends, quant
from fastopt.rules import RULES

__all__ = ["Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "RMSprop8bit", "Adagrad8bit"]

BLOCK = quant.BLOCK
# bitsandbytes' state keys that are not cast to the parameter's dtype on load and
# that its state_dict nests under one key
QUANT_KEYS = frozenset({"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1",
                        "state2", "gnorm_vec", "absmax1", "absmax2", "unorm_vec"})
NESTED = "__bnb_optimizer_quant_state__"

_NP = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
       torch.bfloat16: "bfloat16"}

_MAPS: dict = {}


def dynamic_map(signed: bool) -> torch.Tensor:
    """The shared float32[256] map tensor (every parameter's ``qmap1``/``qmap2``
    is one of two objects, as in bitsandbytes)."""
    t = _MAPS.get(signed)
    if t is None:
        t = _MAPS[signed] = torch.from_numpy(quant.dynamic_map(signed))
    return t


def _engine():
    from fastopt.backends import compiled
    return compiled


# ---------------------------------------------------------------------------
# Argument checks: bitsandbytes' messages, then the argument's name
# ---------------------------------------------------------------------------

def _real(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {v!r} ({type(v).__name__}) "
                        f"(argument '{name}')")
    return float(v)


def _at_least_zero(name, label, v):
    v = _real(name, v)
    if not 0.0 <= v:
        raise ValueError(f"Invalid {label}: {v} (argument '{name}')")
    return v


def _betas(v, name="betas"):
    if isinstance(v, str):   # bitsandbytes accepts '(0.9, 0.999)'
        try:
            v = [float(b) for b in v.replace("(", "").replace(")", "").strip().split(",")]
        except ValueError:
            raise ValueError(f"{name} must be two numbers, got {v!r} (argument '{name}')") \
                from None
    if isinstance(v, torch.Tensor) or not hasattr(v, "__len__") or len(v) != 2:
        raise TypeError(f"{name} must be a pair of real numbers, got {v!r} "
                        f"(argument '{name}')")
    out = tuple(_real(f"{name}[{i}]", b) for i, b in enumerate(v))
    for i, b in enumerate(out):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (argument '{name}')")
    return out


def _common(lr, betas, eps, weight_decay, beta_name="betas"):
    """The checks bitsandbytes' 1- and 2-state bases make, in their order."""
    _at_least_zero("lr", "learning rate", lr)
    _at_least_zero("eps", "epsilon value", eps)
    betas = _betas(betas, beta_name)
    _at_least_zero("weight_decay", "weight_decay value", weight_decay)
    return betas


class _Args:
    """The options bitsandbytes keeps in ``opt.args`` (its ``args=`` argument
    replaces them: any object with these attributes)."""

    def __init__(self, optim_bits, min_8bit_size, max_unorm=0.0, skip_zeros=False):
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.max_unorm = max_unorm
        self.skip_zeros = skip_zeros


def _check_args(args):
    bits = getattr(args, "optim_bits", None)
    if bits not in (8, 32):
        raise NotImplementedError(f"Amount of optimizer bits not supported: {bits} "
                                  "(argument 'args.optim_bits')")
    size = getattr(args, "min_8bit_size", None)
    if isinstance(size, bool) or not isinstance(size, numbers.Real) or size != size:
        raise TypeError(f"args.min_8bit_size must be a number, got {size!r} "
                        "(argument 'args.min_8bit_size')")
    if getattr(args, "max_unorm", 0.0):
        raise ValueError(f"max_unorm={args.max_unorm}: update-norm clipping is not "
                         "supported by fastopt's 8-bit optimizers (argument 'args.max_unorm')")
    if getattr(args, "skip_zeros", False):
        raise ValueError("skip_zeros=True is not supported by fastopt's 8-bit optimizers "
                         "(argument 'args.skip_zeros')")


# ---------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------

class Optimizer8bit(torch.optim.Optimizer):
    """Protocol and state of bitsandbytes' 8-bit optimizers; the subclasses set
    ``optimizer_name`` (bitsandbytes' name of the rule), ``rule`` (fastopt's
    registry row that computes it), ``n_states`` and ``_hypers(group)``."""

    optimizer_name: str
    rule = None
    n_states: int

    def __init__(self, params, defaults, optim_bits, args, min_8bit_size, is_paged=False):
        self.args = args if args is not None else _Args(optim_bits, min_8bit_size)
        _check_args(self.args)
        self.is_paged = bool(is_paged)
        self._warned_paged = False
        self._engine = _engine()
        super().__init__(params, defaults)

    # -- parameters --------------------------------------------------------------
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._hypers(group)
            for k, p in enumerate(group["params"]):
                self._check_param(p, f"param {k} of group {len(self.param_groups) - 1}")
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_param(p, where):
        if p.dtype not in _NP:
            raise TypeError(f"{where} has dtype {p.dtype}; fastopt's 8-bit optimizers "
                            "update float32, float16 and bfloat16 parameters")
        if p.layout != torch.strided:
            raise TypeError(f"{where} is a {p.layout} tensor; dense parameters only")
        if p.device.type != "cpu":
            raise ValueError(f"{where} is on {p.device}; fastopt's 8-bit optimizers run "
                             "on CPU tensors")

    def _plan_hypers(self, group):
        """The registry row's hyperparameters for this group: checked as the
        constructor checks them while they pass; a value set later that the
        constructor would refuse (lr < 0, say) is used as given, as in torch."""
        values = self._hypers(group, strict=False)
        try:
            return self.rule.check_hypers(values)
        except ValueError:
            return {h.name: h.coerce(values[h.name]) for h in self.rule.hypers}

    # -- state -------------------------------------------------------------------
    def _eight_bit(self, p) -> bool:
        return self.args.optim_bits == 8 and p.numel() >= self.args.min_8bit_size

    def _new_state(self, p):
        if self.is_paged and not self._warned_paged:
            warnings.warn("is_paged=True: paged state needs CUDA unified memory; on CPU "
                          "the state is ordinary memory (as bitsandbytes does)",
                          stacklevel=3)
            self._warned_paged = True
        st = {"step": 0}
        n = p.numel()
        if not self._eight_bit(p):
            for k in range(1, self.n_states + 1):
                st[f"state{k}"] = torch.zeros(p.shape, dtype=torch.float32)
            return st
        blocks = -(-n // BLOCK)
        st["state1"] = torch.zeros(p.shape, dtype=torch.uint8)
        st["qmap1"] = dynamic_map(True)
        if self.n_states == 2:
            st["state2"] = torch.zeros(p.shape, dtype=torch.uint8)
            st["qmap2"] = dynamic_map(False)
        for k in range(1, self.n_states + 1):
            st[f"absmax{k}"] = torch.zeros(blocks, dtype=torch.float32)
        return st

    def _check_state(self, p, st, where):
        """(8-bit?, step) of a parameter's state, or TypeError/ValueError naming the
        entry: state of other shapes or kinds than the parameter needs."""
        if not isinstance(st, dict):
            raise TypeError(f"{where}: state must be a dict, got {type(st).__name__}")
        t = st.get("step")
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or \
                not math.isfinite(t) or t != int(t) or t < 0:
            raise ValueError(f"{where}: state 'step' must be a count >= 0, got {t!r}")
        n = p.numel()
        kinds = set()
        for k in range(1, self.n_states + 1):
            s = st.get(f"state{k}")
            name = f"state{k}"
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"{where}: state {name!r} must be a tensor, got "
                                f"{type(s).__name__}")
            if s.device.type != "cpu" or s.layout != torch.strided:
                raise ValueError(f"{where}: state {name!r} is a {s.layout} tensor on "
                                 f"{s.device}; CPU dense tensors only")
            if s.numel() != n:
                raise ValueError(f"{where}: state {name!r} has {s.numel()} elements, the "
                                 f"parameter {n}")
            if s.dtype == torch.uint8:
                kinds.add(8)
                self._check_quant(st, k, n, where)
            elif s.dtype == torch.float32:
                kinds.add(32)
            else:
                raise TypeError(f"{where}: state {name!r} is {s.dtype}; uint8 codes or "
                                "float32 values")
        if len(kinds) != 1:
            raise ValueError(f"{where}: state1 and state2 mix 8-bit and 32-bit storage")
        return kinds.pop() == 8, int(t)

    @staticmethod
    def _check_quant(st, k, n, where):
        am, qm = st.get(f"absmax{k}"), st.get(f"qmap{k}")
        blocks = -(-n // BLOCK)
        if not isinstance(am, torch.Tensor) or am.dtype != torch.float32 or \
                am.numel() != blocks or am.device.type != "cpu":
            got = (f"{am.dtype} with {am.numel()} elements on {am.device}"
                   if isinstance(am, torch.Tensor) else type(am).__name__)
            raise ValueError(f"{where}: state 'absmax{k}' must be float32 with {blocks} "
                             f"elements (one per block of {BLOCK}) on the CPU, got {got}")
        if not isinstance(qm, torch.Tensor) or qm.dtype != torch.float32 or \
                qm.shape != (256,) or qm.device.type != "cpu":
            got = (f"{qm.dtype}{list(qm.shape)} on {qm.device}"
                   if isinstance(qm, torch.Tensor) else type(qm).__name__)
            raise ValueError(f"{where}: state 'qmap{k}' must be a float32[256] CPU "
                             f"tensor, got {got}")
        if qm is not dynamic_map(True) and qm is not dynamic_map(False) and \
                not bool((qm[1:] >= qm[:-1]).all()):
            raise ValueError(f"{where}: state 'qmap{k}' is not sorted ascending")

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns the closure's
        loss. Everything is checked before anything is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        seen = set()
        for gi, group in enumerate(self.param_groups):
            hp = self._plan_hypers(group)
            items = []
            for k, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param {k} of group {gi}"
                if id(p) in seen:
                    # torch steps a parameter listed twice twice; one engine call
                    # cannot write one tensor twice
                    raise ValueError(f"{where} is listed twice; fastopt's 8-bit "
                                     "optimizers step each parameter once per step")
                seen.add(id(p))
                self._check_param(p, where)
                self._check_grad(p, g, where)
                st = self.state.get(p)
                items.append((p, self._check_state(p, st, where) if st else None))
            work.append((hp, items))
        _check_args(self.args)
        for hp, items in work:
            runs: dict = {}
            for p, known in items:
                if known is None:
                    self.state[p] = self._new_state(p)
                    known = (self._eight_bit(p), 0)
                st = self.state[p]
                eight, t = known
                maps = (id(st.get("qmap1")), id(st.get("qmap2"))) if eight else ()
                runs.setdefault((p.dtype, eight, t + 1, maps), []).append(p)
            for (dtype, eight, t, _), params in runs.items():
                self._run(hp, dtype, eight, t, params)
        return loss

    @staticmethod
    def _check_grad(p, g, where):
        if g.layout != torch.strided:
            raise TypeError(f"{where} has a {g.layout} gradient; fastopt's 8-bit "
                            "optimizers take dense gradients (argument 'grad')")
        if g.dtype != p.dtype:
            raise TypeError(f"{where} has a {g.dtype} gradient for a {p.dtype} parameter "
                            "(argument 'grad')")
        if g.shape != p.shape:
            raise ValueError(f"{where} has a gradient of shape {tuple(g.shape)} for a "
                             f"parameter of shape {tuple(p.shape)} (argument 'grad')")
        if g.device != p.device:
            raise ValueError(f"{where} has its gradient on {g.device}, the parameter on "
                             f"{p.device} (argument 'grad')")

    def _run(self, hp, dtype, eight, t, params):
        """One engine call over ``params`` (one row of addresses each), then their
        step counts advance."""
        rule = self.rule
        args, _ = rule.plan(hp, t, {}, False)
        ncol = 2 + len(rule.buffers)
        keep, post = [], []
        rows, lengths, maxima = [], [], []
        qmaps = None
        for p in params:
            st = self.state[p]
            n = p.numel()
            if n == 0:
                continue
            work = p
            if not p.is_contiguous():   # bitsandbytes' blocks run in logical order
                work = p.contiguous()
                post.append((p, work))
            g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            keep.append(g)
            row = [work.data_ptr(), g.data_ptr()] + [0] * (ncol - 2)
            am = [0] * ncol
            for k in range(1, self.n_states + 1):
                s = st[f"state{k}"]
                if not s.is_contiguous():
                    s = st[f"state{k}"] = s.contiguous()
                row[1 + k] = s.data_ptr()
                if eight:
                    am[1 + k] = st[f"absmax{k}"].data_ptr()
            rows.append(row)
            maxima.append(am)
            lengths.append(n)
            if eight and qmaps is None:
                qmaps = [None] * ncol
                for k in range(1, self.n_states + 1):
                    qmaps[1 + k] = st[f"qmap{k}"].numpy()
                qmaps = tuple(qmaps)
        if rows:
            state_type = "q8" if eight else np.dtype(np.float32)
            pdt = _NP[dtype]
            types = (pdt, pdt) + tuple(state_type if 2 <= c < 2 + self.n_states
                                       else np.dtype(np.float32) for c in range(2, ncol))
            ptrs = np.array(rows, dtype=np.uintp)
            extra = {}
            if eight:
                extra = {"absmax": np.array(maxima, dtype=np.uintp), "qmaps": qmaps}
            self._engine.run_segments(rule.kernel, types, ptrs,
                                      np.array(lengths, dtype=np.intp), args,
                                      backends.num_threads(), True, **extra)
            for dst, src in post:
                dst.copy_(src)
            torch._C._increment_version(params)
        for p in params:
            self.state[p]["step"] = t

    # -- checkpoints, in bitsandbytes' layout -------------------------------------
    def state_dict(self):
        """torch's state dict with each parameter's quantisation entries nested
        under ``"__bnb_optimizer_quant_state__"`` (bitsandbytes' layout)."""
        sd = super().state_dict()
        packed = {}
        for k, st in sd["state"].items():
            if isinstance(st, dict):
                outer = {key: v for key, v in st.items() if key not in QUANT_KEYS}
                inner = {key: v for key, v in st.items() if key in QUANT_KEYS}
                if inner:
                    outer[NESTED] = inner
                st = outer
            packed[k] = st
        sd["state"] = packed
        return sd

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load a state dict of this class or of bitsandbytes' namesake (nested or
        not). Checked first against the parameters (a state of other shapes or
        kinds is a TypeError/ValueError and changes nothing); quantisation entries
        keep their dtypes, other floating tensors take the parameter's."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or \
                "param_groups" not in state_dict:
            raise ValueError("state_dict must be an optimizer state dict (a dict with "
                             "'state' and 'param_groups')")
        state_dict = deepcopy(state_dict)
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        for s in saved:
            self._hypers({**self.defaults, **s})
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved),
                          chain.from_iterable(g["params"] for g in groups)))
        state = {}
        for key, st in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict['state'] has an entry for parameter id "
                                 f"{key!r}, which no param group lists")
            p = id_map[key]
            where = f"state of param {key}"
            if not isinstance(st, dict):
                raise TypeError(f"{where} must be a dict, got {type(st).__name__}")
            st = dict(st)
            st.update(st.pop(NESTED, {}))
            for name, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if name in QUANT_KEYS:
                    st[name] = v.to(p.device) if move_to_device else v
                elif name != "step" and v.is_floating_point() and p.is_floating_point():
                    st[name] = v.to(dtype=p.dtype, device=p.device)
            if st:
                self._check_state(p, st, where)
                for k in (1, 2):
                    q = st.get(f"qmap{k}")
                    if isinstance(q, torch.Tensor):
                        for signed in (True, False):
                            if torch.equal(q, dynamic_map(signed)):
                                st[f"qmap{k}"] = dynamic_map(signed)
            state[p] = st

        def adopt(group, new):
            new["params"] = group["params"]
            return new

        self.__setstate__({"state": defaultdict(dict, state),
                           "param_groups": [adopt(g, s) for g, s in zip(groups, saved)]})

    def __repr__(self):
        return "fastopt.torch." + super().__repr__()


# ---------------------------------------------------------------------------
# The classes
# ---------------------------------------------------------------------------

def _two_state_defaults(lr, betas, eps, weight_decay):
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=0.0,
                t_alpha=None, t_beta3=None)


class _AdamBase(Optimizer8bit):
    optimizer_name = "adam"
    rule = RULES["AdamW"]   # bitsandbytes decays Adam8bit decoupled too
    n_states = 2

    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                 min_8bit_size, is_paged):
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True (argument 'amsgrad')")
        if optim_bits != 32:
            raise ValueError(f"{name} only supports optim_bits=32 (the default, kept for "
                             f"compatibility; the state is 8-bit) (argument 'optim_bits')")
        betas = _common(lr, betas, eps, weight_decay)
        super().__init__(params, _two_state_defaults(lr, betas, eps, weight_decay), 8, args,
                         min_8bit_size, is_paged)

    def _hypers(self, group, strict=True):
        betas = _betas(group["betas"]) if strict else tuple(group["betas"])[:2]
        if strict:
            _common(group["lr"], betas, group["eps"], group["weight_decay"])
        return dict(lr=group["lr"], betas=betas, eps=group["eps"],
                    weight_decay=group["weight_decay"], amsgrad=False, maximize=False,
                    decoupled_weight_decay=True)


class Adam8bit(_AdamBase):
    """bitsandbytes' Adam8bit: Adam with 8-bit block-wise state; a weight decay
    shrinks the parameter (θ ← θ(1 − γλ)), as bitsandbytes does."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged)


class AdamW8bit(_AdamBase):
    """bitsandbytes' AdamW8bit: AdamW with 8-bit block-wise state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged)


def _one_state_defaults(lr, betas, eps, weight_decay):
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class Lion8bit(Optimizer8bit):
    """bitsandbytes' Lion8bit: Lion (decoupled weight decay) with 8-bit momentum."""

    optimizer_name = "lion"
    rule = RULES["Lion"]
    n_states = 1

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, is_paged=False):
        betas = _common(lr, betas, 0.0, weight_decay)
        super().__init__(params, _one_state_defaults(lr, betas, 0.0, weight_decay), 8, args,
                         min_8bit_size, is_paged)

    def _hypers(self, group, strict=True):
        betas = _common(group["lr"], group["betas"], group["eps"], group["weight_decay"]) \
            if strict else tuple(group["betas"])[:2]
        return dict(lr=group["lr"], betas=betas, weight_decay=group["weight_decay"],
                    maximize=False)


class SGD8bit(Optimizer8bit):
    """bitsandbytes' SGD8bit: SGD with 8-bit momentum, b ← μb + g (no dampening;
    the first step sets b ← g). Momentum is required, as in bitsandbytes."""

    optimizer_name = "momentum"
    rule = RULES["SGD"]
    n_states = 1

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096):
        if momentum == 0:
            raise NotImplementedError("SGD without momentum is not supported! "
                                      "(argument 'momentum')")
        if nesterov:
            raise ValueError("nesterov=True: bitsandbytes' SGD8bit ignores it, and so "
                             "would this class; refused (argument 'nesterov')")
        betas = _common(lr, (momentum, dampening), 0.0, weight_decay, "(momentum, dampening)")
        self._check_dampening(betas[1])
        super().__init__(params, _one_state_defaults(lr, betas, 0.0, weight_decay), 8, args,
                         min_8bit_size)

    @staticmethod
    def _check_dampening(d):
        if d != 0:
            raise ValueError(f"dampening={d}: bitsandbytes' SGD8bit ignores dampening "
                             "(its buffer is μb + g), so this class refuses it "
                             "(argument 'dampening')")

    def _hypers(self, group, strict=True):
        betas = _common(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                        "(momentum, dampening)") if strict else tuple(group["betas"])[:2]
        self._check_dampening(betas[1])
        return dict(lr=group["lr"], momentum=betas[0], dampening=0.0,
                    weight_decay=group["weight_decay"], nesterov=False, maximize=False)


class RMSprop8bit(Optimizer8bit):
    """bitsandbytes' RMSprop8bit: RMSprop (L2 weight decay) with an 8-bit square
    average, stored with the signed map as bitsandbytes stores it."""

    optimizer_name = "rmsprop"
    rule = RULES["RMSprop"]
    n_states = 1

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, args=None, min_8bit_size=4096):
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha==0.0 is not supported! "
                                      "(argument 'alpha')")
        if centered:
            raise NotImplementedError("Centered RMSprop is not supported! "
                                      "(argument 'centered')")
        betas = _common(lr, (alpha, momentum), eps, weight_decay, "(alpha, momentum)")
        self._check_momentum(betas[1])
        super().__init__(params, _one_state_defaults(lr, betas, eps, weight_decay), 8, args,
                         min_8bit_size)

    @staticmethod
    def _check_momentum(m):
        if m != 0:
            raise ValueError(f"momentum={m}: bitsandbytes' RMSprop8bit ignores momentum, "
                             "so this class refuses it (argument 'momentum')")

    def _hypers(self, group, strict=True):
        betas = _common(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                        "(alpha, momentum)") if strict else tuple(group["betas"])[:2]
        self._check_momentum(betas[1])
        return dict(lr=group["lr"], alpha=betas[0], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=0.0, centered=False,
                    maximize=False)


class Adagrad8bit(Optimizer8bit):
    """bitsandbytes' Adagrad8bit: Adagrad (L2 weight decay) with an 8-bit sum,
    stored with the signed map as bitsandbytes stores it."""

    optimizer_name = "adagrad"
    rule = RULES["Adagrad"]
    n_states = 1

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, optim_bits=8, args=None, min_8bit_size=4096):
        _at_least_zero("lr", "learning rate", lr)
        _at_least_zero("weight_decay", "weight_decay value", weight_decay)
        _at_least_zero("eps", "epsilon value", eps)
        if _real("initial_accumulator_value", initial_accumulator_value) != 0.0:
            raise ValueError("Initial accumulator value != 0.0 not supported! "
                             "(argument 'initial_accumulator_value')")
        if _real("lr_decay", lr_decay) != 0.0:
            raise ValueError("Lr Decay != 0.0 not supported! (argument 'lr_decay')")
        if optim_bits != 8:
            raise ValueError("Adagrad8bit only supports optim_bits=8 (the default, kept "
                             "for compatibility) (argument 'optim_bits')")
        super().__init__(params, _one_state_defaults(lr, (0.0, 0.0), eps, weight_decay), 8,
                         args, min_8bit_size)

    def _hypers(self, group, strict=True):
        if strict:
            _common(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        return dict(lr=group["lr"], lr_decay=0.0, weight_decay=group["weight_decay"],
                    initial_accumulator_value=0.0, eps=group["eps"], maximize=False)
