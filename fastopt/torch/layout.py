"""The flat layout behind ``fastopt.torch``: one param group's tensors of one
(device, dtype) packed into one contiguous buffer, so that a step is one kernel call.

``FlatLayout(params, name)`` copies the parameters into a flat buffer and re-points
each ``p.data`` at its slice; gradients get a flat buffer of the same layout whose
slices become ``p.grad`` at the first step, so ``backward()`` accumulates into it in
place. ``FlatGroup(params, rule)`` adds what an element-wise rule needs: flat state
buffers, allocated when the rule first needs them, and the kernel calls.

Per-parameter bookkeeping follows torch exactly (a parameter whose ``grad`` is None
is skipped: no decay, no state, no step count). Each parameter carries a key
``(t, scalars, present)``: its step count, its scalar state (NAdam's mu_product,
ASGD's eta and mu) and the state buffers it has. Parameters that share a key and sit
side by side are stepped by one kernel call; when every parameter steps with the
same key (the usual case) the whole buffer is one call on buffers bound once.

Nothing here knows a rule's math: the kernels and ``Rule.plan`` do that.
"""

from __future__ import annotations

import torch

from fastopt import backends

NO_STATE = (0, None, frozenset())  # the key of a parameter that was never stepped
_ALL = "all"  # prepare(): every parameter steps with one key, as last time
_FLOAT = (torch.float32, torch.float64)


def check_param_dtype(p: torch.Tensor, where: str) -> None:
    if p.dtype not in _FLOAT:
        raise TypeError(f"{where} has dtype {p.dtype}; fastopt.torch updates float32 and "
                        "float64 parameters (fp16/bf16 are not supported yet: keep fp32 "
                        "master weights, e.g. with torch.autocast)")


def _array(t: torch.Tensor):
    """What a backend kernel takes: a NumPy view of a CPU tensor, a CUDA tensor as is."""
    return t.numpy() if t.device.type == "cpu" else t


class FlatLayout:
    """Parameters of one device and dtype packed into one flat buffer: ``p.data`` is
    re-pointed at its slice of ``flat``; ``grad_views[i]`` is its slice of ``grad``,
    the tensor ``p.grad`` becomes once a gradient was gathered. ``name`` is what
    messages call the optimizer."""

    def __init__(self, params: list, name: str):
        self.name = name
        self.params = params
        p0 = params[0]
        self.dtype, self.device = p0.dtype, p0.device
        if self.device.type not in ("cpu", "cuda"):
            raise TypeError(f"params are on device {self.device}; fastopt.torch runs on "
                            "CPU and CUDA tensors")
        self.shapes = [p.shape for p in params]
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        self.offsets = offsets
        n = offsets[-1]
        self.flat = torch.empty(n, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(n, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p, lo, hi, shape in zip(params, offsets, offsets[1:], self.shapes):
                view = self.flat[lo:hi].view(shape)
                view.copy_(p)
                p.data = view
        self.grad_views = [self.grad[lo:hi].view(shape)
                           for lo, hi, shape in zip(offsets, offsets[1:], self.shapes)]

    def check_grad(self, i, g):
        p = self.params[i]
        if g.layout != torch.strided:
            raise TypeError(f"param {i} of this group has a {g.layout} gradient; "
                            f"{self.name} does not support sparse gradients")
        if g.dtype != p.dtype:
            raise TypeError(f"param {i} of this group has a {g.dtype} gradient for a "
                            f"{p.dtype} parameter")
        if g.shape != p.shape:
            raise ValueError(f"param {i} of this group has a gradient of shape "
                             f"{tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"param {i} of this group has its gradient on {g.device}, "
                             f"the parameter on {p.device}")

    def adopt(self, foreign) -> None:
        """Copy checked gradients ``[(i, g), ...]`` into the flat gradient buffer (one
        pass) and re-point each ``p.grad`` at its view."""
        if foreign:
            with torch.no_grad():
                torch._foreach_copy_([self.grad_views[i] for i, _ in foreign],
                                     [g for _, g in foreign])
            for i, _ in foreign:
                self.params[i].grad = self.grad_views[i]


class FlatGroup(FlatLayout):
    """One (device, dtype) slice of a param group, stepped by the rule's kernel; see
    the module docstring."""

    def __init__(self, params: list, rule):
        super().__init__(params, f"fastopt.torch.{rule.name}")
        self.rule = rule
        self.data_ptrs = [p.data_ptr() for p in params]  # where each p.data is now
        self.home_ptrs = list(self.data_ptrs)              # where the flat buffer has it
        self.elsewhere: set = set()  # params whose .data was re-pointed away from it
        self.state: dict = {}           # buffer name -> flat tensor
        self.keys = [NO_STATE] * len(params)
        self.uniform = False            # every param has keys[0] and its grad view
        self._bound: dict = {}          # (lo, hi, buffer names) -> bound kernel
        self._backend = backends.for_array(self.flat)
        self._arrays = {}               # (lo, hi) -> the gradient slice the kernel takes

    # -- per-step: prepare() checks, run() writes --------------------------------
    def prepare(self):
        """Check this buffer's gradients (and parameters) for the next step without
        writing anything; returns the plan ``run`` carries out."""
        if self.uniform:
            for p, g, ptr in zip(self.params, self.grad_views, self.data_ptrs):
                if p.grad is not g or p.data_ptr() != ptr:
                    break
            else:
                return _ALL
        moved = self._moved()
        active, foreign = [], []
        views = self.grad_views
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g is not views[i]:
                self.check_grad(i, g)
                foreign.append((i, g))
            active.append(i)
        return moved, active, foreign

    def run(self, plan, hp: dict, nthreads: int) -> None:
        n = len(self.params)
        if plan is _ALL:
            self.keys = [self._run(0, n, self.keys[0], hp, nthreads)] * n
            return
        moved, active, foreign = plan
        params = self.params
        for i in moved:
            self.data_ptrs[i] = params[i].data_ptr()
            if self.data_ptrs[i] == self.home_ptrs[i]:
                self.elsewhere.discard(i)
            else:
                self.elsewhere.add(i)
        outside = [i for i in active if i in self.elsewhere]
        with torch.no_grad():
            for i in outside:
                self._home(i).copy_(params[i].data)
        self.adopt(foreign)
        keys = self.keys
        k = 0
        while k < len(active):
            first = last = active[k]
            key = keys[first]
            while k + 1 < len(active) and active[k + 1] == last + 1 and \
                    keys[last + 1] == key:
                k += 1
                last += 1
            new = self._run(first, last + 1, key, hp, nthreads)
            keys[first:last + 1] = [new] * (last + 1 - first)
            k += 1
        with torch.no_grad():
            for i in outside:
                params[i].data.copy_(self._home(i))
        self.uniform = (len(active) == n and not self.elsewhere
                        and all(key is keys[0] for key in keys))

    def _home(self, i):
        """Parameter i's slice of the flat buffer, in its shape."""
        return self.flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])

    def _run(self, a: int, b: int, key, hp, nthreads):
        """Step params a..b-1, which share ``key``; returns their new key."""
        rule = self.rule
        t, scalars, present = key
        needed = rule.needed_buffers(hp)
        lo, hi = self.offsets[a], self.offsets[b]
        fresh = False
        if not present.issuperset(needed):
            for name in needed:
                if name not in present:
                    self._allocate(name, lo, hi, hp)
            present = present.union(needed)
            fresh = t > 0  # a buffer born after step 1: torch's first-use path
        if scalars is None:
            scalars = tuple(rule.initial_scalars(hp).values())
        names = [s for s, _ in rule.scalars]
        args, new_scalars = rule.plan(hp, t + 1, dict(zip(names, scalars)), fresh)
        bound = self._bound.get((lo, hi, needed))
        if bound is None:
            bufs = [_array(self.state[b.name][lo:hi]) if b.name in needed else None
                    for b in rule.buffers]
            bound = backends.bind(self._backend, rule.kernel,
                                  _array(self.flat[lo:hi]), bufs)
            self._bound[(lo, hi, needed)] = bound
            self._arrays[(lo, hi)] = _array(self.grad[lo:hi])
        bound.step(self._arrays[(lo, hi)], args, nthreads)
        return (t + 1, tuple(new_scalars[s] for s in names) if names else (), present)

    def _allocate(self, name, lo, hi, hp):
        buf = self.state.get(name)
        fill = next(b.fill for b in self.rule.buffers if b.name == name)(hp)
        if buf is None:
            self.state[name] = torch.full_like(self.flat, fill)
            self._bound.clear()
        else:
            buf[lo:hi].fill_(fill)

    def _moved(self) -> list:
        """Parameters whose ``.data`` was re-pointed since the last step (``p.data =
        ...``; ZeroRedundancyOptimizer's bucket views do it). Their new storage is
        what the model reads, so it stays theirs: each step copies it into the flat
        buffer, runs, and copies the result back (two extra passes over those
        parameters only). A move to another dtype, shape or device is refused."""
        moved = []
        for i, p in enumerate(self.params):
            if p.data_ptr() != self.data_ptrs[i]:
                if p.dtype != self.dtype or p.device != self.device or \
                        p.shape != self.shapes[i]:
                    raise ValueError(
                        f"param {i} of this group changed to {p.dtype} {tuple(p.shape)} on "
                        f"{p.device} after the optimizer packed it ({self.dtype} "
                        f"{tuple(self.shapes[i])} on {self.device}); build the optimizer "
                        "after moving or converting the model")
                moved.append(i)
        return moved

    def zero_grad(self, set_to_none: bool) -> None:
        params, views = self.params, self.grad_views
        if set_to_none:
            for p in params:
                p.grad = None
            self.uniform = False
            return
        self.grad.zero_()
        for p, g in zip(params, views):
            cur = p.grad
            if cur is not None and cur is not g:
                p.grad = g  # a foreign gradient: zero in our layout instead

    # -- state as torch shows it ----------------------------------------------
    def has_state(self, i) -> bool:
        return self.keys[i] != NO_STATE

    def init_state(self, hp) -> None:
        """State for every parameter before any step, as torch's Adagrad makes it
        at construction (step 0, ``sum`` at initial_accumulator_value)."""
        rule = self.rule
        needed = rule.needed_buffers(hp)
        for name in needed:
            self._allocate(name, 0, self.offsets[-1], hp)
        key = (0, tuple(rule.initial_scalars(hp).values()), frozenset(needed))
        self.keys = [key] * len(self.params)
        self.uniform = True

    def export(self, i, step_dtype) -> dict:
        """Parameter i's state under torch's keys: buffers as live views of the flat
        buffers, the step and scalars as 0-dim tensors."""
        t, scalars, present = self.keys[i]
        rule = self.rule
        out = {}
        if rule.step_in_state:
            out["step"] = torch.tensor(float(t), dtype=step_dtype)
        for (name, _), value in zip(rule.scalars, scalars or ()):
            out[name] = torch.tensor(value, dtype=torch.float64)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        for b in rule.buffers:
            if b.name in present:
                out[b.name] = self.state[b.name][lo:hi].view(self.shapes[i])
        return out

    def check_import(self, i, state, hp) -> tuple:
        """Validate torch-format state for param i; returns the key and buffers to write.
        Raises ValueError/TypeError naming what is wrong; changes nothing."""
        rule = self.rule
        where = f"state of param {i} ({rule.name})"
        if not isinstance(state, dict):
            raise TypeError(f"{where} must be a dict, got {type(state).__name__}")
        known = {b.name for b in rule.buffers} | {n for n, _ in rule.scalars}
        if rule.step_in_state:
            known.add("step")
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"{where} has {unknown}, which {rule.name} does not keep "
                             f"(it keeps {sorted(known)}): a state dict of another "
                             "optimizer?")
        if not state:
            return NO_STATE, {}
        bufs = {}
        numel = self.offsets[i + 1] - self.offsets[i]
        for b in rule.buffers:
            if b.name in state:
                v = state[b.name]
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{where}: {b.name!r} must be a tensor, got "
                                    f"{type(v).__name__}")
                if v.numel() != numel or not v.is_floating_point():
                    raise ValueError(f"{where}: {b.name!r} has {v.numel()} {v.dtype} "
                                     f"elements (shape {tuple(v.shape)}); the parameter has "
                                     f"{numel} (shape {tuple(self.shapes[i])})")
                bufs[b.name] = v
        if rule.step_in_state:
            if "step" not in state:
                raise ValueError(f"{where} lacks 'step'")
            t = _number(state["step"], f"{where}: 'step'")
            if not 0 <= t < 2 ** 63 or t != int(t):
                raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {t}")
            t = int(t)
        else:
            t = 1  # torch's SGD keeps no count; only 'has a buffer' matters
        for name in rule.needed_buffers(hp):
            if t > 0 and name not in bufs and rule.step_in_state:
                raise ValueError(f"{where} lacks {name!r}, which {rule.name} needs with "
                                 "these hyperparameters")
        scalars = {}
        for name, _ in rule.scalars:
            if name not in state:
                raise ValueError(f"{where} lacks {name!r}")
            scalars[name] = _number(state[name], f"{where}: {name!r}")
        rule.validate_scalars(scalars)
        return (t, tuple(scalars.values()), frozenset(bufs)), bufs

    def apply_import(self, i, key, bufs) -> None:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        with torch.no_grad():
            for name, v in bufs.items():
                if name not in self.state:
                    self.state[name] = torch.zeros_like(self.flat)
                    self._bound.clear()
                self.state[name][lo:hi].copy_(v.reshape(-1))
        self.keys[i] = key
        self.uniform = False


def _number(v, where) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{where} must be a number or a 1-element tensor, got shape "
                             f"{tuple(v.shape)}")
        return float(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where} must be a number, got {type(v).__name__}")
    return float(v)
