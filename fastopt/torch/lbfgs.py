"""``fastopt.torch.LBFGS``: torch.optim.LBFGS's interface over ``fastopt.LBFGS``.

    opt = fastopt.torch.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)

L-BFGS works on flat vectors, as torch's does: each step gathers the parameters
into one flat vector, the NumPy class runs the algorithm on it, and before each
closure call the vector is written back into the parameters (wherever they live
now) and the closure's gradients are gathered into a flat gradient vector. No
parameter is re-pointed. ``state_dict()`` is torch.optim.LBFGS's format, so
checkpoints move both ways.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fastopt import lbfgs as _core
from fastopt.torch.optimizer import after_load_pre_hooks, check_param_dtype, \
    with_state_dict_hooks

_increment_version = torch.autograd.graph.increment_version
_HYPERS = tuple(_core.DEFAULTS)


class LBFGS(torch.optim.Optimizer):
    """L-BFGS (``torch.optim.LBFGS``) on fastopt's fused kernels; float32/float64 CPU
    parameters in one group. ``step(closure)``: the closure re-evaluates the model,
    calls ``backward()`` and returns the loss; ``step`` returns the first loss."""

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None):
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        # torch resolves max_eval's default once, into the group: a later max_iter
        # does not move it, and torch.optim.LBFGS can load the group
        defaults["max_eval"] = _core.check_hyperparameters(defaults)["max_eval"]
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options "
                             "(parameter groups)")
        params = self.param_groups[0]["params"]
        for k, p in enumerate(params):
            check_param_dtype(p, f"param {k}")
            if p.device.type != "cpu" or p.layout != torch.strided:
                raise TypeError(f"param {k} is a {p.layout} tensor on {p.device}; "
                                "fastopt.torch.LBFGS runs on dense CPU tensors")
        if len({p.dtype for p in params}) > 1:
            raise TypeError("fastopt.torch.LBFGS needs all parameters in one dtype (one "
                            f"flat buffer); got {sorted(str(p.dtype) for p in params)}")
        self._params = list(params)
        self._shapes = [p.shape for p in params]
        self._dtype = params[0].dtype if params else torch.float32
        n = sum(p.numel() for p in params)
        self._flat = torch.empty(n, dtype=self._dtype)       # the parameters, flat
        self._flat_grad = torch.zeros(n, dtype=self._dtype)  # the closure's gradients
        self._gather_params()
        self._core = _core.LBFGS(self._flat.numpy(), **self._core_hypers())
        self.state = _State(self)

    def _core_hypers(self) -> dict:
        group = self.param_groups[0]
        return {name: group[name] for name in _HYPERS}

    def _sync_hypers(self) -> None:
        """param_groups[0] is read at every step (schedulers write it); a changed
        value is checked as at construction."""
        want = _core.check_hyperparameters(self._core_hypers())
        have = self._core.hyperparameters
        for name in _HYPERS:
            if want[name] != have[name]:
                setattr(self._core, name, self.param_groups[0][name])

    def _views(self, flat):
        out, lo = [], 0
        for shape in self._shapes:
            n = shape.numel()
            out.append(flat[lo:lo + n].view(shape))
            lo += n
        return out

    def _check(self, i, t, what):
        p = self._params[i]
        if t.dtype != self._dtype:
            raise TypeError(f"param {i}'s {what} has dtype {t.dtype}; this LBFGS was built "
                            f"for {self._dtype} parameters (build it after converting the "
                            "model)")
        if t.shape != self._shapes[i]:
            raise ValueError(f"param {i}'s {what} has shape {tuple(t.shape)}; it had "
                             f"{tuple(self._shapes[i])} when this LBFGS was built")
        if t.device.type != "cpu" or p.device.type != "cpu":
            raise ValueError(f"param {i}'s {what} is on {t.device}; fastopt.torch.LBFGS "
                             "runs on CPU tensors")

    def _gather_params(self) -> None:
        """The parameters, wherever they live now, into the flat vector."""
        for i, (p, v) in enumerate(zip(self._params, self._views(self._flat))):
            self._check(i, p, "data")
            v.copy_(p.detach())

    def _scatter_params(self) -> None:
        """The flat vector back into the parameters."""
        for p, v in zip(self._params, self._views(self._flat)):
            p.detach().copy_(v)

    def _gather(self) -> None:
        """The closure's gradients into the flat gradient vector; a None gradient
        counts as zeros and a sparse one is made dense, as torch.optim.LBFGS does."""
        for i, (p, v) in enumerate(zip(self._params, self._views(self._flat_grad))):
            g = p.grad
            if g is None:
                v.zero_()
                continue
            if g.layout != torch.strided:
                g = g.to_dense()
            self._check(i, g, "gradient")
            v.copy_(g)

    def step(self, closure):
        if closure is None or not callable(closure):
            raise TypeError("fastopt.torch.LBFGS.step needs a closure that re-evaluates "
                            f"the model and returns the loss, got {closure!r}")
        self._sync_hypers()
        first = []
        grad_np = self._flat_grad.numpy()

        def evaluate():
            with torch.no_grad():
                self._scatter_params()
            _increment_version(self._params)
            with torch.enable_grad():
                loss = closure()
            if not first:
                first.append(loss)
            with torch.no_grad():
                self._gather()
            return _loss_number(loss), grad_np

        with torch.no_grad():
            self._gather_params()
            try:
                self._core.step(evaluate)
            finally:
                self._scatter_params()
        _increment_version(self._params)
        return first[0]

    # -- checkpoints in torch.optim.LBFGS's format ------------------------------------
    def state_dict(self) -> dict:
        return with_state_dict_hooks(self, self._state_dict)

    def _state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._params)))
        return {"state": {0: _to_torch(self._core.state_dict())}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of torch.optim.LBFGS; everything is
        checked first, and on any error nothing changes."""
        state_dict = after_load_pre_hooks(self, state_dict)
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("loaded state dict has a different number of parameter groups")
        if len(groups[0].get("params", ())) != len(self._params):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        unknown = set(groups[0]) - set(_HYPERS) - {"params", "param_names"}
        if unknown:
            raise ValueError(f"loaded param group has {sorted(unknown)}, which LBFGS does "
                             "not have: a state dict of another optimizer?")
        group = {**self.defaults, **groups[0], "params": self.param_groups[0]["params"]}
        hp = {name: group[name] for name in _HYPERS}
        states = state_dict.get("state")
        if not isinstance(states, dict) or len(states) > 1:
            raise ValueError("state_dict['state'] must hold at most one entry (LBFGS keeps "
                             "its state on the first parameter)")
        torch_state = next(iter(states.values()), {})
        sd = _from_torch(torch_state, hp, self._flat)
        self._core.load_state_dict(sd)  # checks everything before it changes anything
        self.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("fastopt.torch.LBFGS cannot be pickled or deep-copied (its "
                        "history lives in a fastopt.LBFGS); save state_dict() instead")

    def __repr__(self):
        return "fastopt.torch." + super().__repr__()


def _loss_number(loss) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"closure returned a loss of shape {tuple(loss.shape)}; "
                             "LBFGS needs a scalar")
        return loss.item()
    if loss is None:
        raise TypeError("closure returned None; it must return the loss")
    return loss


# torch.optim.LBFGS's per-parameter state keys and fastopt.LBFGS's state_dict parts
_VECTORS = ("d", "prev_flat_grad")
_SCALARS = ("t", "H_diag", "prev_loss")


def _to_torch(sd: dict) -> dict:
    out = {"func_evals": sd["scalars"]["func_evals"], "n_iter": sd["scalars"]["n_iter"]}
    if sd["state"]:
        st = sd["state"]
        out.update({k: torch.from_numpy(st[k]) for k in _VECTORS})
        out["old_dirs"] = [torch.from_numpy(row) for row in st["old_dirs"]]
        out["old_stps"] = [torch.from_numpy(row) for row in st["old_stps"]]
        out["ro"] = [torch.tensor(float(r), dtype=torch.float64) for r in st["ro"]]
        out["t"] = sd["scalars"]["t"]
        out["H_diag"] = torch.tensor(sd["scalars"]["H_diag"], dtype=torch.float64)
        out["prev_loss"] = sd["scalars"]["prev_loss"]
    return out


def _number(value, where):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a number, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return value.item()
    return value


def _from_torch(st: dict, hp: dict, flat: torch.Tensor) -> dict:
    """torch.optim.LBFGS's state (or ours) as fastopt.LBFGS's state_dict; the NumPy
    class checks the values."""
    if not isinstance(st, dict):
        raise TypeError(f"the LBFGS state must be a dict, got {type(st).__name__}")
    dtype = flat.numpy().dtype
    n_iter = _number(st.get("n_iter", 0), "state 'n_iter'")
    _core.check_state_keys(st, n_iter, "the LBFGS state")
    scalars = {"func_evals": _number(st.get("func_evals", 0), "state 'func_evals'"),
               "n_iter": n_iter, "t": None, "H_diag": None, "prev_loss": None}
    state = {}
    if n_iter:
        for k in _SCALARS:
            scalars[k] = _number(st[k], f"state {k!r}")
        for k in _VECTORS:
            state[k] = _vector(st[k], k, dtype)
        for k in ("old_dirs", "old_stps"):
            rows = [_vector(v, k, dtype) for v in st[k]]
            state[k] = (np.stack(rows) if rows
                        else np.empty((0, flat.numel()), dtype))
        state["ro"] = np.array([float(_number(r, "state 'ro'")) for r in st["ro"]],
                               dtype=np.float64)
    return {"format": _core.STATE_DICT_FORMAT, "rule": "LBFGS", "dtype": dtype.name,
            "size": flat.numel(), "step": n_iter,
            "hyperparameters": hp, "scalars": scalars, "state": state}


def _vector(v, name, dtype):
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"state {name!r} must hold tensors, got {type(v).__name__}")
    return v.detach().cpu().reshape(-1).numpy().astype(dtype, copy=True)


class _State(Mapping):
    """``opt.state``: {first param: LBFGS's state under torch's keys}, read fresh."""

    def __init__(self, opt):
        self._opt = opt

    def __getitem__(self, p):
        if not self._opt._params or p is not self._opt._params[0]:
            raise KeyError(p)
        return _to_torch(self._opt._core.state_dict())

    def __iter__(self):
        return iter(self._opt._params[:1])

    def __len__(self):
        return 1

    def __repr__(self):
        return repr(dict(self.items()))
