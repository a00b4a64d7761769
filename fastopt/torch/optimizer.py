"""``fastopt.torch.Optimizer``: torch's optimizer protocol over fastopt's kernels, run
over the tensors where they live.

The class owns protocol, never math. Parameters, gradients and state stay the
tensors torch and the user know: ``opt.state`` is torch's ``defaultdict(dict)``
with torch's keys, ``state_dict``/``load_state_dict``/``zero_grad`` are torch's.
A step reads every parameter's and gradient's address (they can move behind the
optimizer's back: ``Module._apply``, ``share_memory_``, ``p.data = ...``), checks
them, and makes one kernel call per run of parameters that share (group, device,
dtype, step count and scalar state) through the segment engine: one row of
addresses per tensor (param, grad, state buffers), one parallel region.

What only the optimizer changes is kept between steps: the addresses of the state
tensors it was given or made (re-read when an entry of ``opt.state[p]`` is another
object), and the table of a run, handed to the engine unchecked when it is
identical to the last checked one. ``step`` and the scalar state (NAdam's
``mu_product``, ASGD's ``eta``, ``mu``) are 0-dim tensors as torch keeps them,
views of small banks the optimizer owns, so a run reads and advances them in one
NumPy operation; a user's in-place edit of them is seen at the next step.
"""

from __future__ import annotations

import re
import weakref
from itertools import chain

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from fastopt import backends
from fastopt.rules import RULES, Rule, StoredScalars


def run_segments(backend, kernel, dtype, ptrs, lengths, args, nthreads, check=True,
                 sr_key=None):
    """One kernel call over the segments of ``ptrs``/``lengths`` on ``backend``'s
    segment engine (the tests wrap this to see every table)."""
    if sr_key is None:
        return backend.run_segments(kernel, dtype, ptrs, lengths, args, nthreads, check)
    return backend.run_segments(kernel, dtype, ptrs, lengths, args, nthreads, check,
                                sr_key=sr_key)


def _check_tensor_spans(spans):
    """spans: (lo, hi, is_grad, name) byte ranges. No written range (param, state) may
    overlap another range; gradients may overlap each other (the engine's rule)."""
    reach_any = reach_written = 0
    seen = []
    for lo, hi, is_grad, name in sorted(spans, key=lambda x: x[0]):
        if hi > lo and lo < (reach_written if is_grad else reach_any):
            other = next(n for a, b, g, n in seen if a < hi and lo < b and not (g and is_grad))
            raise ValueError(f"{name} shares memory with {other}; every buffer that is "
                             "written must be distinct (pass a copy)")
        if hi > lo:
            seen.append((lo, hi, is_grad, name))
            reach_any = max(reach_any, hi)
            if not is_grad:
                reach_written = max(reach_written, hi)


def _mix32(x: int) -> int:
    """The stochastic-rounding key hash (the kernels' fo_mix32)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sr_key(seed: int, step: int) -> int:
    """The per-call key of stochastic rounding: a function of the seed and the step
    only, so a run is reproducible and independent of threads."""
    return _mix32(seed ^ _mix32(step * 0x27D4EB2F))


# torch.autograd.graph.increment_version without its isinstance wrapper (a list here)
_increment_version = torch._C._increment_version

# torch's dispatch flags. fastopt makes one fused call per run anyway: foreach and
# fused describe what it does, so any value is accepted and kept in the group.
# capturable (CUDA graph capture) and differentiable (autograd through the step)
# need per-step scalars on the device and a differentiable update, which fastopt
# does not have: they are refused rather than ignored.
DISPATCH_FLAGS = {"foreach": None, "fused": None, "capturable": False,
                  "differentiable": False}
_REFUSED = {"capturable": "CUDA graph capture needs per-step scalars on the device; "
                          "fastopt computes them on the host",
            "differentiable": "fastopt's kernels update parameters outside autograd"}

_FLOAT = (torch.float32, torch.float64)   # what scalar state tensors hold
# what parameters may hold: bf16 and fp16 compute in float32 and store rounded
_PARAM_FLOAT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NONE: dict = {}  # the scalar state of a rule without any
_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
       torch.float16: np.dtype(np.float16), torch.bfloat16: "bfloat16"}

# every state key some rule keeps: a loaded entry with one of another rule's keys
# is another optimizer's state (keys no rule has belong to wrappers, and are kept)
_ALL_STATE_KEYS = frozenset(chain(["step"], *([b.name for b in r.buffers] + [n for n, _ in r.scalars]
                                              for r in RULES.values())))


class StateTypeError(TypeError, RuntimeError):
    """A state tensor of another dtype than its parameter (torch's in-place update
    raises RuntimeError there)."""


class StateValueError(ValueError, RuntimeError):
    """A state tensor of another shape or device than its parameter (torch raises
    RuntimeError)."""


class SparseGradientError(RuntimeError, TypeError):
    """torch raises RuntimeError for a sparse gradient a rule cannot take; it is
    also a TypeError (the gradient's kind is wrong), fastopt's exception for that."""


def check_param_dtype(p: torch.Tensor, where: str) -> None:
    if p.dtype not in _PARAM_FLOAT:
        raise TypeError(f"{where} has dtype {p.dtype}; fastopt.torch updates float32, "
                        "float64, bfloat16 and float16 parameters")


def _check_param(p, where):
    """A parameter fastopt can step: float32/float64, dense, on the CPU or a GPU."""
    check_param_dtype(p, where)
    if p.layout != torch.strided:
        raise TypeError(f"{where} is a {p.layout} tensor; fastopt updates dense parameters")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} is on device {p.device}; fastopt.torch runs on CPU "
                         "and CUDA tensors")


class CheckedGroups:
    """``add_param_group`` that runs the class's ``_check_params(group)`` after torch's
    own checks and drops the group again if it fails (torch appends it first)."""

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        try:
            self._check_params(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise


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


def _scalar_dtype():
    # torch keeps 'step' (and NAdam's/ASGD's scalars) in float32 unless the default
    # dtype is float64
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill a block of memory exactly once
    (contiguous, channels_last, transposed, ...), so an element-wise kernel can run
    over the block in memory order."""
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _number(v, where) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{where} must be a number or a 1-element tensor, got shape "
                             f"{tuple(v.shape)}")
        return float(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where} must be a number, got {type(v).__name__}")
    return float(v)


# ---------------------------------------------------------------------------
# Scalar banks: 'step' and scalar state as 0-dim views of small CPU tensors
# ---------------------------------------------------------------------------

class _Bank:
    """Chunks of scalar slots. A slot is (the chunk's NumPy view, index); the state
    holds the slot's 0-dim tensor view. ``find`` recognises a view of a live chunk."""

    def __init__(self):
        # storage address -> weak reference to the chunk. The runs and records that
        # use a chunk hold its NumPy view (which holds the chunk); once none does,
        # the chunk goes, and a view of it the user kept counts as foreign
        self._chunks: dict = {}

    def new(self, values, dtype):
        """Fresh 0-dim tensors holding ``values``, and their slots."""
        if len(self._chunks) > 64:
            self._chunks = {k: r for k, r in self._chunks.items() if r() is not None}
        chunk = torch.tensor(values, dtype=dtype)
        arr = chunk.numpy()
        self._chunks[chunk.untyped_storage().data_ptr()] = weakref.ref(chunk)
        return [chunk[i] for i in range(len(values))], [(arr, i) for i in range(len(values))]

    def find(self, t):
        """The slot of ``t`` if it is a view of a live chunk, else None."""
        if not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype not in _FLOAT or \
                t.device.type != "cpu":
            return None
        ref = self._chunks.get(t.untyped_storage().data_ptr())
        chunk = ref() if ref is not None else None
        if chunk is None or chunk.dtype != t.dtype:
            return None
        return chunk.numpy(), t.storage_offset()

    def adopt(self, tensors, values):
        """Move foreign 0-dim CPU tensors into one new chunk (``set_``: the objects
        stay the same, so whoever holds them sees the values advance, as with
        torch's in-place ``step += 1``); returns their slots."""
        slots = []
        by_dtype: dict = {}
        for k, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(k)
        out = [None] * len(tensors)
        for dtype, ks in by_dtype.items():
            views, sl = self.new([values[k] for k in ks], dtype)
            for k, v, s in zip(ks, views, sl):
                t = tensors[k]
                with torch.no_grad():
                    t.set_(v.untyped_storage(), v.storage_offset(), (), ())
                out[k] = s
        slots.extend(out)
        return slots

    @staticmethod
    def adoptable(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype in _FLOAT and
                t.device.type == "cpu" and not t.requires_grad and t.layout == torch.strided)


def _read(slot) -> float:
    arr, i = slot
    return float(arr[i])


# ---------------------------------------------------------------------------
# Per-parameter records and runs
# ---------------------------------------------------------------------------

class _Rec:
    """What a step checked about one parameter: enough to see next step whether
    anything changed (identity of the param, state dict and entries; addresses,
    dtypes, shapes, strides), and what the kernel call needs (addresses, length,
    slots of step and scalars)."""

    __slots__ = ("p", "index", "g", "cuda", "sd", "entries", "pp", "gp", "dtype", "shape", "stride",
                 "gstride", "device", "row", "length", "slots", "t", "scalars", "fresh",
                 "missing", "foreign", "copy", "sparse", "cacheable", "bufs")


class _Run:
    """Parameters stepped by one kernel call; ``rows`` are the records whose rows
    the table holds, in order (not the empty ones)."""

    __slots__ = ("recs", "rows", "labels", "backend", "dtype", "np_dtype", "ptrs", "lengths", "checked", "params",
                 "step_slots", "scalar_slots", "gcol", "t", "scalars", "fresh", "cacheable",
                 "keep", "post", "spans")


class _Slots:
    """The slots of one scalar (``step``, say) of a run's parameters, read and
    written a chunk at a time: a slice where the indices are consecutive (the
    usual case: state made together), else an index array."""

    __slots__ = ("parts",)

    def __init__(self, slots):
        groups: dict = {}
        for arr, i in slots:
            groups.setdefault(id(arr), (arr, []))[1].append(i)
        self.parts = []
        for arr, ix in groups.values():
            if ix == list(range(ix[0], ix[0] + len(ix))):
                self.parts.append((arr, slice(ix[0], ix[0] + len(ix))))
            else:
                self.parts.append((arr, np.array(ix, dtype=np.intp)))

    def uniform(self):
        """The common value of the slots, or None when they differ (or hold NaN)."""
        value = None
        for arr, ix in self.parts:
            vals = arr[ix]
            if vals.shape[0] == 1:
                lo = hi = float(vals[0])
            else:
                lo, hi = float(vals.min()), float(vals.max())
            if lo != hi or (value is not None and lo != value) or lo != lo:
                return None
            value = lo
        return value

    def write(self, value):
        for arr, ix in self.parts:
            arr[ix] = value


class _GroupCache:
    __slots__ = ("group", "needed", "recs", "runs")

    def __init__(self, group, needed):
        self.group, self.needed, self.recs, self.runs = group, needed, None, None


class Optimizer(torch.optim.Optimizer):
    """Base of ``fastopt.torch.<Rule>``; subclasses set ``rule``."""

    rule: Rule

    def __init__(self, params, defaults: dict):
        self._hyper_names = tuple(h.name for h in self.rule.hypers)
        self._init_caches()
        super().__init__(params, defaults)
        if self.rule.state_at_init:
            self._init_all_state()

    def _init_caches(self):
        # torch's SGD and Adagrad update a state buffer of another float dtype than
        # its parameter in place (model.double() mid-run), its other rules raise:
        # those two step through a copy in the parameter's dtype
        self._casts_state = self.rule.kernel in ("sgd", "adagrad")
        self._scalar_names = tuple(n for n, _ in self.rule.scalars)
        self._hp_cache: dict = {}     # id(group) -> (group, raw, hp)
        self._groups: dict = {}       # id(group) -> _GroupCache
        self._bank = _Bank()
        self._sparse_rule = self.rule.kernel in ("sgd", "adagrad")

    def __setstate__(self, state):
        super().__setstate__(state)
        # a checkpoint of an older torch lacks newer keys (maximize, foreach, ...):
        # defaults, as torch's classes set them in their __setstate__
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        if not hasattr(self, "_bank"):
            self._hyper_names = tuple(h.name for h in self.rule.hypers)
            self._init_caches()
        else:
            self._groups.clear()

    # -- groups ------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # torch's checks and defaults; appends
        group = self.param_groups[-1]
        try:
            self._check_rounding(group)
            self._check_flags(group)
            self._group_hypers(group)
            self._check_params(group["params"])
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_rounding(group):
        """bf16_stochastic_round: a bool; when on, the group gets a seed (drawn from
        torch's generator, kept in the state dict) that the rounding is keyed by."""
        sr = group.get("bf16_stochastic_round", False)
        if not isinstance(sr, bool):
            raise TypeError(f"bf16_stochastic_round must be True or False, got {sr!r}")
        if sr and "sr_seed" not in group:
            group["sr_seed"] = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        seed = group.get("sr_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"sr_seed must be an int, got {seed!r}")

    @staticmethod
    def _sr_key(group, dtype, t):
        """The stochastic-rounding key of a bf16 run at step t + 1, or None."""
        if dtype is not torch.bfloat16 or not group.get("bf16_stochastic_round"):
            return None
        return sr_key(group["sr_seed"], int(t) + 1)

    def _check_flags(self, group):
        for flag, why in _REFUSED.items():
            if group.get(flag):
                raise ValueError(f"{flag}=True is not supported by "
                                 f"fastopt.torch.{self.rule.name}: {why} "
                                 f"(argument '{flag}')")

    @staticmethod
    def _check_params(params):
        for k, p in enumerate(params):
            _check_param(p, f"param {k} of the group")

    def _raw(self, group):
        try:
            return tuple([group[n] for n in self._hyper_names])
        except KeyError as exc:
            raise ValueError(f"param group lacks hyperparameter {exc.args[0]!r}") from None

    def _group_hypers(self, group) -> dict:
        return self.rule.check_hypers(dict(zip(self._hyper_names, _plain(self._raw(group)))))

    def _hypers(self, group):
        """(hp, state buffers they use): the group's hyperparameters as the kernels
        take them, re-read when a value changed. torch validates values in the constructor only: a later value
        (lr < 0 mid-run, say) is used as given once its type is right."""
        raw = self._raw(group)
        cached = self._hp_cache.get(id(group))
        if cached is not None and cached[0] is group and cached[1] == raw:
            return cached[2], cached[3]
        values = dict(zip(self._hyper_names, _plain(raw)))
        try:
            hp = self.rule.check_hypers(values)
        except ValueError:
            hp = {h.name: h.coerce(values[h.name]) for h in self.rule.hypers}
        # a value that can change in place (a tensor, a list) compares equal to itself
        # after a change: such a group is re-read every step
        needed = self.rule.needed_buffers(hp)
        self._hp_cache[id(group)] = (group, object() if _mutable(raw) else raw, hp, needed)
        return hp, needed

    # -- state ---------------------------------------------------------------------
    def _init_all_state(self):
        """State for every parameter before any step, as torch's Adagrad makes it at
        construction (step 0, ``sum`` at initial_accumulator_value)."""
        rule = self.rule
        dtype = _scalar_dtype()
        todo = []
        for group in self.param_groups:
            hp = self._group_hypers(group)
            for p in group["params"]:
                todo.append((p, hp))
        steps, _ = self._bank.new([0.0] * len(todo), dtype) if todo else ([], [])
        for (p, hp), step in zip(todo, steps):
            st = self.state[p]
            st["step"] = step
            for b in rule.buffers:
                if b.needed(hp):
                    st[b.name] = torch.full_like(p, b.fill(hp),
                                                 memory_format=torch.preserve_format)

    # -- the step ----------------------------------------------------------------
    def _patch_step_function(self) -> None:
        # torch wraps step() for its hooks and profiler label at ~10 us a call;
        # step() below goes through that wrapper only when one is in use
        self._zero_grad_profile_name = (
            f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad")

    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's
        loss (the closure runs with gradients enabled, before the update)."""
        if (_GLOBAL_PRE or _GLOBAL_POST or self._optimizer_step_pre_hooks or
                self._optimizer_step_post_hooks or torch.autograd._profiler_enabled()):
            return _hooked_step(self, closure)
        return self._step(closure)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        caches = self._groups
        # every group is checked before anything is written
        work = []
        for group in groups:
            hp, needed = self._hypers(group)
            gc = caches.get(id(group))
            if gc is None or gc.group is not group or gc.needed != needed:
                gc = caches[id(group)] = _GroupCache(group, needed)
            work.append((gc, hp, self._prepare(gc, hp)))
        if len(caches) > len(groups):  # groups were removed: forget them
            live = {id(g) for g in groups}
            for k in [k for k in caches if k not in live]:
                del caches[k]
                self._hp_cache.pop(k, None)
        nthreads = backends.num_threads()
        for gc, hp, plan in work:
            self._execute(gc, hp, plan, nthreads)
        return loss

    def _optimizer_step_code(self) -> None:
        """torch's profiler hooks this after each step."""

    def _prepare(self, gc, hp):
        """Check a group for this step without writing; returns what ``_execute``
        does. The replay: every parameter, gradient and state entry as last step, so
        last step's runs (their address tables) hold; only the step counts and
        scalars are read."""
        runs = gc.runs
        if runs is not None and self._unchanged(gc):
            plans = []
            for run in runs:
                if run.rows:
                    grads = [r.gp for r in run.rows]
                    if grads != run.gcol:
                        run.ptrs[:, 1] = grads
                        run.gcol = grads
                        run.checked = False
                t = run.step_slots.uniform() if run.step_slots else run.t
                if t is None:
                    break
                scalars = tuple(s.uniform() for s in run.scalar_slots)
                if None in scalars:
                    break
                plans.append((run, t, self._args(hp, t, scalars, False)))
            else:
                return ("replay", plans)
        params = gc.group["params"]
        if len(set(map(id, params))) != len(params):
            # torch steps a parameter listed twice twice (it warns at construction):
            # one pass per listing, each a group of its own
            seen: dict = {}
            passes: list = []
            for p in params:
                k = seen.get(id(p), 0)
                seen[id(p)] = k + 1
                if k == len(passes):
                    passes.append([])
                passes[k].append(p)
            return ("passes", passes)
        recs = self._check_group(gc, hp)
        keyed: dict = {}
        for rec in recs:
            key = (rec.device, rec.dtype, rec.t, rec.scalars, rec.fresh)
            keyed.setdefault(key, []).append(rec)
        plans = [(key, members, self._args(hp, key[2], key[3], key[4]))
                 for key, members in keyed.items()]
        return ("build", recs, plans)

    def _args(self, hp, t, scalars, fresh):
        rule = self.rule
        names = self._scalar_names
        if names:
            # the scalar state lives in tensors of torch's scalar dtype: the plan
            # rounds its products as torch's in-place tensor ops do
            held = dict(zip(names, scalars))
            dtype = _scalar_dtype()
            held = StoredScalars(held, np.float32) if dtype == torch.float32 else held
        else:
            held = _NONE
        try:
            args, new = rule.plan(hp, t + 1, held, fresh)
        except (ZeroDivisionError, OverflowError, ValueError) as exc:
            raise ValueError(f"fastopt.torch.{rule.name}: the hyperparameters "
                             f"{ {k: v for k, v in hp.items()} } give no finite step at "
                             f"step {t + 1} ({type(exc).__name__}: {exc})") from None
        return args, tuple(new[n] for n in names)

    def _unchanged(self, gc) -> bool:
        """Whether every parameter, gradient and state entry of the group is what
        the cached runs were built from (gradients may have moved: backward makes
        new ones; their addresses are read into the records)."""
        params = gc.group["params"]
        recs = gc.recs
        if len(params) != len(recs):
            return False
        state_get = self.state.get
        try:
            for p, r in zip(params, recs):
                if p is not r.p:
                    return False
                g = p.grad
                if g is None:
                    if r.g is not None:
                        return False
                    continue
                if r.g is None or p.data_ptr() != r.pp:
                    return False
                dt = r.dtype
                if p.dtype is not dt or g.dtype is not dt or g.is_cuda is not r.cuda:
                    return False
                st = r.stride
                if p.stride() != st or g.stride() != st:
                    return False
                sh = r.shape
                if p.shape != sh or g.shape != sh:
                    return False
                sd = state_get(p)
                if sd is not r.sd:
                    return False
                if sd is not None:
                    get = sd.get
                    for name, obj in r.entries:
                        if get(name) is not obj:
                            return False
                r.gp = g.data_ptr()
        except (RuntimeError, AttributeError, TypeError):
            return False  # a gradient without storage (sparse), a non-tensor
        return True

    # -- the full check (first step, or something changed) --------------------------
    def _check_group(self, gc, hp):
        gc.runs = None
        needed = gc.needed
        gi = self._group_index(gc.group)
        state = self.state
        recs = []
        all_recs = []
        for k, p in enumerate(gc.group["params"]):
            rec = _Rec()
            rec.p = p
            rec.index = k
            g = p.grad
            rec.g = g
            all_recs.append(rec)
            if g is None:
                continue
            where = f"param {k} of group {gi}"
            self._check_pair(p, g, where)
            rec.dtype, rec.device = p.dtype, p.device
            rec.sparse = g.layout != torch.strided
            if rec.sparse:
                self._check_sparse(p, g, hp, where)
            sd = state.get(p)
            rec.sd = sd
            self._read_state(rec, sd, hp, needed, where)
            recs.append(rec)
        gc.recs = all_recs
        return recs

    def _group_index(self, group):
        for i, g in enumerate(self.param_groups):
            if g is group:
                return i
        return -1

    @staticmethod
    def _check_pair(p, g, where):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
        _check_param(p, where)
        if g.dtype != p.dtype:
            raise TypeError(f"{where} has a {g.dtype} gradient for a {p.dtype} parameter")
        if g.shape != p.shape:
            raise ValueError(f"{where} has a gradient of shape {tuple(g.shape)} for a "
                             f"parameter of shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"{where} has its gradient on {g.device}, the parameter on "
                             f"{p.device}")

    def _check_sparse(self, p, g, hp, where):
        name = self.rule.name
        if g.layout != torch.sparse_coo or not self._sparse_rule:
            if name in ("Adam", "AdamW"):
                msg = "Adam does not support sparse gradients, please consider SparseAdam instead"
            else:
                msg = f"{name} does not support sparse gradients"
            raise SparseGradientError(f"{msg} ({where} has a {g.layout} gradient)")
        if hp["weight_decay"] != 0:
            if self.rule.kernel == "adagrad":
                msg = "weight_decay option is not compatible with sparse gradients"
            else:
                msg = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
            raise SparseGradientError(f"{msg} ({where}: weight_decay="
                                      f"{hp['weight_decay']} with a sparse gradient)")

    def _read_state(self, rec, sd, hp, needed, where):
        """The parameter's step, scalars and buffers as the state holds them; what is
        missing is made at execution (torch makes state at a parameter's first step
        with a gradient)."""
        rule = self.rule
        p = rec.p
        sd = sd if sd is not None else {}
        rec.missing = []
        rec.foreign = []
        slots = []
        if rule.step_in_state:
            v = sd.get("step")
            if v is None:
                t = 0.0
                rec.missing.append("step")
            else:
                t = self._scalar_of(v, f"{where}: state 'step'", "step", rec, slots)
        else:
            t = None
        scalars = []
        init = rule.initial_scalars(hp) if rule.scalars else {}
        for name, _ in rule.scalars:
            v = sd.get(name)
            if v is None:
                rec.missing.append(name)
                # as the bank will hold it (torch: eta = lr as a float32 tensor)
                scalars.append(float(np.array(init[name], dtype=_NP[_scalar_dtype()])))
            else:
                scalars.append(self._scalar_of(v, f"{where}: state {name!r}", name, rec, slots))
        if rule.scalars and not rec.missing:
            try:
                rule.validate_scalars(dict(zip([n for n, _ in rule.scalars], scalars)))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        bufs = {}
        for name in needed:
            v = sd.get(name)
            if v is None:
                rec.missing.append(name)
                continue
            bufs[name] = self._check_buffer(p, v, f"{where}: state {name!r}",
                                            self._casts_state)
        fresh = False
        if t is None:  # SGD keeps no count: whether its buffer exists is what matters
            t = 1.0 if needed and not any(n in rec.missing for n in needed) else 0.0
        elif t > 0 and any(n in rec.missing for n in needed):
            fresh = True  # a buffer born after step 1: the rule's first-use path
        rec.t, rec.scalars, rec.fresh = t, tuple(scalars), fresh
        if any(v.dtype != p.dtype for v in bufs.values()):
            if rec.sparse:
                raise StateTypeError(f"{where}: state of another dtype than the parameter "
                                     "with a sparse gradient")
            # torch computes in the wider dtype and rounds what it stores: so does
            # the copy this parameter steps through
            rec.dtype = torch.float64
        rec.slots = slots
        rec.bufs = bufs

    def _scalar_of(self, v, where, name, rec, slots):
        slot = self._bank.find(v)
        if slot is not None:
            slots.append((name, slot))
            return _read(slot)
        value = _number(v, where)
        rec.foreign.append((name, v, value))
        return value

    @staticmethod
    def _check_buffer(p, v, where, casts=False):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(v).__name__}")
        if v.dtype != p.dtype and not (casts and v.dtype in _PARAM_FLOAT):
            raise StateTypeError(f"{where} is {v.dtype}, the parameter {p.dtype}")
        if v.device != p.device:
            raise StateValueError(f"{where} is on {v.device}, the parameter on {p.device}")
        if v.shape != p.shape:
            raise StateValueError(f"{where} has shape {tuple(v.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        return v

    # -- execution -------------------------------------------------------------------
    def _execute(self, gc, hp, plan, nthreads):
        if plan[0] == "passes":
            passes = plan[1]
            # torch reads SGD's momentum buffers before any update: a parameter
            # without one starts a new buffer in every pass (the last is kept)
            fresh = [] if self.rule.step_in_state else [
                (p, name) for p in passes[0] for name in gc.needed
                if name not in self.state.get(p, ())]
            for k, params in enumerate(passes):
                if k:
                    here = set(map(id, params))
                    for p, name in fresh:
                        if id(p) in here:
                            self.state[p].pop(name, None)
                sub = _GroupCache({**gc.group, "params": params}, gc.needed)
                self._execute(sub, hp, self._prepare(sub, hp), nthreads)
            return
        if plan[0] == "replay":
            for run, t, (args, new_scalars) in plan[1]:
                run.t = t
                # a table is checked once: again only when a gradient moved
                run_segments(run.backend, self.rule.kernel, run.np_dtype, run.ptrs,
                             run.lengths, args, nthreads, check=not run.checked,
                             sr_key=self._sr_key(gc.group, run.dtype, t))
                run.checked = True
                self._advance(run, new_scalars)
                _increment_version(run.params)
            return
        with torch.no_grad():
            self._build_and_run(gc, hp, plan, nthreads)

    def _build_and_run(self, gc, hp, plan, nthreads):
        _, recs, plans = plan
        self._materialise(recs, hp, gc.needed)
        runs = []
        for key, members, (args, new_scalars) in plans:
            run = self._build_run(key, members, gc.needed)
            if len(run.lengths):
                if run.spans is not None:
                    # sparse rows: the overlap check runs on whole tensors here, not on
                    # each of thousands of row segments in the engine
                    try:
                        _check_tensor_spans(run.spans)
                    except ValueError as exc:
                        raise ValueError(f"{exc} (numbered as the parameters of param "
                                         f"group {self._group_index(gc.group)})") from None
                try:
                    run_segments(run.backend, self.rule.kernel, run.np_dtype, run.ptrs,
                                 run.lengths, args, nthreads, check=run.spans is None,
                                 sr_key=self._sr_key(gc.group, run.dtype, run.t))
                except ValueError as exc:  # the engine names segments: name params
                    labels = run.labels
                    msg = re.sub(r"(segment |\[)(\d+)",
                                 lambda m: m.group(1) + str(labels[int(m.group(2))]),
                                 str(exc))
                    raise ValueError(f"{msg} (numbered as the parameters of param "
                                     f"group {self._group_index(gc.group)})") from None
            run.checked = True
            for dst, src in run.post:
                dst.copy_(src)
            run.keep = run.post = ()
            self._advance(run, new_scalars)
            _increment_version(run.params)
            runs.append(run)
        # the next step replays these runs if nothing changes and every one of them
        # is a plain table (no copies, no sparse rows)
        gc.runs = runs if all(r.cacheable for r in runs) else None
        for run in runs:
            run.recs = None
        if gc.runs is None:
            for rec in gc.recs:  # the gradients themselves are not kept
                rec.g = rec.bufs = None
        if gc.runs is not None:
            for rec in gc.recs:
                if rec.g is not None:
                    rec.pp = rec.p.data_ptr()
                    rec.gp = rec.g.data_ptr()
                    rec.g = True  # had a gradient; the tensor itself is not kept
                    rec.cuda = rec.device.type == "cuda"
                    rec.shape = rec.p.shape
                    rec.stride = rec.p.stride()
                    rec.sd = sd = self.state.get(rec.p)
                    rec.entries = () if sd is None else tuple(
                        (k, v) for k, v in sd.items()
                        if k == "step" or k in gc.needed or k in self._scalar_names)

    def _advance(self, run, new_scalars):
        if run.step_slots:
            run.step_slots.write(run.t + 1)
        for slots, value in zip(run.scalar_slots, new_scalars):
            slots.write(value)
        run.t += 1
        run.scalars = new_scalars

    def _materialise(self, recs, hp, needed):
        """Make the state missing entries (torch's lazy init) and adopt foreign step
        and scalar tensors into the banks."""
        rule = self.rule
        state = self.state
        dtype = _scalar_dtype()
        init = rule.initial_scalars(hp)
        new_names, new_vals, new_recs = [], [], []
        adopt_t, adopt_v, adopt_at = [], [], []
        for rec in recs:
            p = rec.p
            if not (rec.missing or rec.foreign):
                continue
            sd = state.get(p)
            if sd is None:
                sd = {}
                state[p] = sd
            rec.sd = sd
            for name in rec.missing:  # torch's key order: step, scalars, buffers
                if name in init or name == "step":
                    sd[name] = None  # filled from the bank below
            for name in rec.missing:
                if name == "step":
                    new_names.append("step")
                    new_vals.append(rec.t)
                    new_recs.append(rec)
                elif name in init:
                    new_names.append(name)
                    new_vals.append(init[name])
                    new_recs.append(rec)
                else:
                    buf = next(b for b in rule.buffers if b.name == name)
                    t = torch.full_like(p, buf.fill(hp), memory_format=torch.preserve_format)
                    sd[name] = t
                    rec.bufs[name] = t
            for name, obj, value in rec.foreign:
                if _Bank.adoptable(obj):
                    adopt_t.append(obj)
                    adopt_v.append(value)
                    adopt_at.append((rec, name))
                else:  # a number, or a tensor that cannot be moved: replaced
                    new_names.append(name)
                    new_vals.append(value)
                    new_recs.append(rec)
            rec.foreign = []
        if new_vals:
            views, slots = self._bank.new(new_vals, dtype)
            for rec, name, view, slot in zip(new_recs, new_names, views, slots):
                rec.sd[name] = view
                rec.slots.append((name, slot))
        if adopt_t:
            for (rec, name), slot in zip(adopt_at, self._bank.adopt(adopt_t, adopt_v)):
                rec.slots.append((name, slot))

    def _build_run(self, key, members, needed):
        device, dtype, t, scalars, fresh = key
        rule = self.rule
        run = _Run()
        run.recs = members
        run.backend = backends.DEFAULT if device.type == "cpu" else backends.load("cuda")
        run.dtype, run.np_dtype = dtype, _NP[dtype]
        run.t, run.scalars, run.fresh = t, scalars, fresh
        run.params = [r.p for r in members]
        run.keep, run.post = [], []  # copies the kernel runs on; copies back
        run.rows = []
        run.labels = []
        run.cacheable = True
        run.spans = None   # whole-tensor byte ranges, kept when the run has sparse rows
        slot_names = ["step"] * rule.step_in_state + [n for n, _ in rule.scalars]
        by_name = {n: [] for n in slot_names}
        rows, lengths = [], []
        itemsize = torch.empty((), dtype=dtype).element_size()
        for rec in members:
            for name, slot in rec.slots:
                by_name[name].append(slot)
            if rec.sparse:
                run.cacheable = False
                self._sparse_rows(rec, needed, rows, lengths, run, itemsize)
                continue
            n = rec.p.numel()
            if n == 0:
                continue
            row, copied = self._dense_row(rec, needed, run)
            if copied:
                run.cacheable = False
            rows.append(row)
            run.rows.append(rec)
            run.labels.append(rec.index)
            lengths.append(n)
        run.step_slots = _Slots(by_name["step"]) if rule.step_in_state and by_name["step"] \
            else None
        run.scalar_slots = [_Slots(by_name[n]) for n, _ in rule.scalars]
        width = 2 + len(rule.buffers)
        if run.spans is not None:   # sparse blocks of rows (arrays) among dense rows
            for row, n, rec in zip((r for r in rows if not isinstance(r, np.ndarray)),
                                   (m for m in lengths if not isinstance(m, np.ndarray)),
                                   run.rows):
                names = rule.arg_names
                run.spans.extend((a, a + n * itemsize, j == 1, f"{names[j]}[{rec.index}]")
                                 for j, a in enumerate(row) if a)
            run.ptrs = np.concatenate([r if isinstance(r, np.ndarray) else
                                       np.array([r], dtype=np.uintp) for r in rows])
            run.lengths = np.concatenate([m if isinstance(m, np.ndarray) else
                                          np.array([m], dtype=np.intp) for m in lengths])
            run.gcol = None   # never replayed
            return run
        run.ptrs = (np.array(rows, dtype=np.uintp).reshape(-1, width) if rows
                    else np.zeros((0, width), dtype=np.uintp))
        run.lengths = np.array(lengths, dtype=np.intp)
        run.gcol = run.ptrs[:, 1].tolist()
        return run

    def _dense_row(self, rec, needed, run):
        """The row of addresses for a dense gradient. The kernel runs over memory in
        order, so every tensor must lay its elements out as the parameter does; a
        tensor that does not (a non-dense parameter, a gradient or state buffer with
        other strides) is stepped through a copy in the parameter's layout."""
        p, g = rec.p, rec.g
        copied = False
        if _dense(p) and p.dtype == rec.dtype:
            work = p
        else:
            work = p.to(dtype=rec.dtype, memory_format=torch.contiguous_format, copy=True)
            run.post.append((p, work))
            copied = True
        layout = work.stride()
        if g.stride() != layout or not _dense(g) or g.dtype != work.dtype:
            gw = torch.empty_like(work)
            gw.copy_(g)
            run.keep.append(gw)  # alive until the kernel has run
            g = gw
            copied = True
        row = [work.data_ptr(), g.data_ptr()]
        for b in self.rule.buffers:
            if b.name not in needed:
                row.append(0)
                continue
            v = rec.bufs[b.name]
            if v.stride() != layout or not _dense(v) or v.layout != torch.strided or \
                    v.dtype != work.dtype:
                vw = torch.empty_like(work)
                vw.copy_(v.to_dense() if v.layout != torch.strided else v)
                run.keep.append(vw)
                if v.layout != torch.strided:  # torch's sparse SGD momentum: made dense
                    rec.sd[b.name] = vw
                else:
                    run.post.append((v, vw))
                v = vw
                copied = True
            row.append(v.data_ptr())
        return row, copied

    def _sparse_rows(self, rec, needed, rows, lengths, run, itemsize):
        """A sparse gradient's touched rows as segments: each run of consecutive
        touched rows is one row of addresses (param rows, gradient values, state
        rows). SGD with momentum decays its buffer everywhere (torch's sparse buffer
        accumulates every row ever touched), so it takes the dense path over a
        densified gradient."""
        p = rec.p
        g = rec.g.coalesce()
        if self.rule.kernel == "sgd" and "momentum_buffer" in needed:
            rec.g = g.to_dense()
            rec.sparse = False
            n = p.numel()
            if n:
                row, _ = self._dense_row(rec, needed, run)
                rows.append(row)
                lengths.append(n)
                run.labels.append(rec.index)
            rec.sparse = True
            return
        work = p if p.is_contiguous() else p.contiguous()
        if work is not p:
            run.post.append((p, work))
        bufs = {}
        for name in needed:
            v = rec.bufs[name]
            if not v.is_contiguous():
                vw = v.contiguous()
                run.post.append((v, vw))
                v = vw
            bufs[name] = v
        values = g._values().contiguous()
        rec.g = values  # keep the values alive until the kernel has run
        nnz = values.shape[0]
        if nnz == 0 or p.numel() == 0:
            return
        width = int(np.prod(values.shape[1:], dtype=np.int64))
        if width == 0:
            return
        idx = g._indices().cpu().numpy()
        sparse_shape = list(p.shape[:idx.shape[0]])
        linear = np.ravel_multi_index(tuple(idx), sparse_shape) if idx.shape[0] > 1 \
            else idx[0].astype(np.int64)
        # coalesced: sorted, unique; a break where the next row is not the next one
        breaks = np.flatnonzero(np.diff(linear) != 1) + 1
        starts = np.concatenate(([0], breaks))
        counts = np.diff(np.concatenate((starts, [nnz])))
        row_bytes = width * itemsize
        cols = [work.data_ptr() + linear[starts].astype(np.uint64) * row_bytes,
                values.data_ptr() + starts.astype(np.uint64) * row_bytes]
        for b in self.rule.buffers:
            if b.name in needed:
                cols.append(bufs[b.name].data_ptr() + linear[starts].astype(np.uint64) * row_bytes)
            else:
                cols.append(np.zeros(len(starts), dtype=np.uint64))
        rows.append(np.stack(cols, axis=1).astype(np.uintp))
        run.labels.extend([rec.index] * len(starts))
        lengths.append((counts * width).astype(np.intp))
        if run.spans is None:
            run.spans = []
        names = self.rule.arg_names
        tensors = [(work, 0), (values, 1)] + [(bufs[b.name], 2 + j)
                                             for j, b in enumerate(self.rule.buffers)
                                             if b.name in needed]
        run.spans.extend((t.data_ptr(), t.data_ptr() + t.numel() * itemsize, slot == 1,
                          f"{names[slot]}[{rec.index}]") for t, slot in tensors)

    # -- checkpoints in torch's format ---------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, after checking that the state is this rule's
        (a state of another optimizer, or of other shapes, is a ValueError and
        changes nothing). Keys no rule keeps (a wrapper's) are loaded as torch does."""
        state_dict = after_load_pre_hooks(self, state_dict)
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict lacks {key!r}: not an optimizer state dict")
        self._check_loaded(state_dict)
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = type(hooks)()  # they ran above
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks

    def _check_loaded(self, state_dict):
        groups = self.param_groups
        saved = state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        for s in saved:
            ng = {**self.defaults, **{k: v for k, v in s.items() if k != "params"}}
            self._check_flags(ng)
            self._group_hypers(ng)
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved),
                          chain.from_iterable(g["params"] for g in groups)))
        rule = self.rule
        mine = {b.name for b in rule.buffers} | {n for n, _ in rule.scalars}
        if rule.step_in_state:
            mine.add("step")
        for k, value in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"state_dict['state'] has an entry for parameter id {k!r}, "
                                 "which no param group lists")
            p = id_map[k]
            where = f"state of param {k} ({rule.name})"
            if not isinstance(value, dict):
                raise TypeError(f"{where} must be a dict, got {type(value).__name__}")
            others = sorted(set(value) & (_ALL_STATE_KEYS - mine), key=str)
            if others:
                raise ValueError(f"{where} has {others}, which {rule.name} does not keep "
                                 f"(it keeps {sorted(mine)}): a state dict of another "
                                 "optimizer?")
            for b in rule.buffers:
                v = value.get(b.name)
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{where}: {b.name!r} must be a tensor, got "
                                    f"{type(v).__name__}")
                if v.shape != p.shape:
                    raise ValueError(f"{where}: {b.name!r} has shape {tuple(v.shape)}; the "
                                     f"parameter has shape {tuple(p.shape)}")
            names = ["step"] * rule.step_in_state + [n for n, _ in rule.scalars]
            for name in names:
                if name in value:
                    _number(value[name], f"{where}: {name!r}")

    def __repr__(self):
        return "fastopt.torch." + super().__repr__()


_GLOBAL_PRE = _torch_optimizer._global_optimizer_pre_hooks
_GLOBAL_POST = _torch_optimizer._global_optimizer_post_hooks
_hooked_step = torch.optim.Optimizer.profile_hook_step(Optimizer._step)


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
