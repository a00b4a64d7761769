"""L-BFGS with torch.optim.LBFGS's semantics, over one flat float32/float64 buffer.

    opt = fastopt.LBFGS(x, line_search_fn="strong_wolfe")
    def closure():                       # evaluates at the current x
        return f(x), grad_f(x)           # (loss, gradient of x's shape or flat)
    first_loss = opt.step(closure)       # up to max_iter iterations, x updated in place

L-BFGS is not element-wise, so it is not a registry row. Each iteration keeps the
pair s = x_new - x_old, y = g_new - g_old when y.s > 1e-10 (the oldest pair goes
once history_size are kept), takes the direction d = -H g from the two-loop
recursion over the pairs (H_diag = y.s / y.y of the newest pair scales the middle),
and moves x by t d: t = lr (the first iteration ever: min(1, 1/||g||_1) lr), or the
t of a strong-Wolfe line search. The control flow (stopping rules, the line search)
is scalar Python here; every pass over the vectors is one call into the backend's
``lbfgs_*`` kernels (``fastopt/kernels/lbfgs.pxi``, or
``fastopt/backends/_numba_lbfgs.py`` without the compiled kernels), over buffers
allocated once.

A torch front end drives the same class on a flat NumPy view of its parameters:
it passes that 1-D buffer as ``param`` and a closure returning
``(float(loss), flat_grad_ndarray)``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from fastopt import backends
from fastopt._checks import FLOAT_DTYPES
from fastopt.backends._host import as_array, full
from fastopt.flat import FlatParams
from fastopt.rules import _real

STATE_DICT_FORMAT = "fastopt.state_dict/1"
_threads = backends._num_threads

DEFAULTS = {"lr": 1, "max_iter": 20, "max_eval": None, "tolerance_grad": 1e-7,
            "tolerance_change": 1e-9, "history_size": 100, "line_search_fn": None}
# The state, under torch.optim.LBFGS's names: scalars always, arrays after an
# iteration ("al" is torch's scratch for the recursion, kept in no checkpoint here)
SCALARS = ("func_evals", "n_iter", "t", "H_diag", "prev_loss")
ARRAYS = ("d", "prev_flat_grad", "old_dirs", "old_stps", "ro")


# ---------------------------------------------------------------------------
# Hyperparameters: torch's wording first (it has one for lr), then the name.
# ---------------------------------------------------------------------------

def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def check_hyperparameters(hp: dict) -> dict:
    """A validated copy of ``hp`` (all of DEFAULTS' keys), max_eval filled in."""
    out = {}
    lr = _real("lr", hp["lr"])
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (argument 'lr')")
    out["lr"] = lr
    out["max_iter"] = _int("max_iter", hp["max_iter"], 1)
    max_eval = hp["max_eval"]
    out["max_eval"] = (out["max_iter"] * 5 // 4 if max_eval is None
                       else _int("max_eval", max_eval, 1))
    for name in ("tolerance_grad", "tolerance_change"):
        v = _real(name, hp[name])
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN, got {v}")
        out[name] = v
    out["history_size"] = _int("history_size", hp["history_size"], 1)
    ls = hp["line_search_fn"]
    if ls is not None and ls != "strong_wolfe":
        raise ValueError(f"only 'strong_wolfe' is supported (argument 'line_search_fn'), "
                         f"got {ls!r}")
    out["line_search_fn"] = ls
    return out


# ---------------------------------------------------------------------------
# Scalar helpers: IEEE results where Python floats would raise
# ---------------------------------------------------------------------------

def _div(a, b):
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _cubic_min(x1, f1, g1, x2, f2, g2, bounds=None):
    """The minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clamped to
    ``bounds`` (default: the interval between x1 and x2); the bounds' midpoint when
    the cubic has no real minimiser (torch's _cubic_interpolate)."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * _div(f1 - f2, x1 - x2)
    disc = d1 * d1 - g1 * g2
    if disc >= 0:
        d2 = math.sqrt(disc)
        if x1 <= x2:
            x = x2 - (x2 - x1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            x = x1 - (x1 - x2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(x, lo), hi)
    return (lo + hi) / 2.0


def _loss_value(loss) -> float:
    """The closure's loss as a float: TypeError if it is not one real number,
    ValueError if it is NaN or infinite."""
    if isinstance(loss, bool):
        raise TypeError("closure returned a bool as the loss; expected a real number")
    if isinstance(loss, numbers.Real):
        value = loss
    else:
        mod = type(loss).__module__ or ""
        if isinstance(loss, np.ndarray) or mod.startswith("torch"):
            size = loss.size if isinstance(loss, np.ndarray) else loss.numel()
            dt = loss.dtype
            complex_ = (np.dtype(dt).kind == "c" if isinstance(loss, np.ndarray)
                        else dt.is_complex)
            if size != 1 or complex_ or (isinstance(loss, np.ndarray)
                                         and loss.dtype.kind not in "fiu"):
                raise TypeError(f"closure returned a loss of shape {tuple(loss.shape)} and "
                                f"dtype {dt}; expected one real number")
            value = loss.item()
        else:
            raise TypeError(f"closure returned a loss of type {type(loss).__name__} "
                            f"({loss!r:.60}); expected a real number")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"closure returned a non-finite loss ({value}); L-BFGS needs a "
                         "finite objective")
    return value


# ---------------------------------------------------------------------------
# The history and the line search's points
# ---------------------------------------------------------------------------

class _History:
    """The curvature pairs: rows of S (s = x_new - x_old) and Y (y = g_new - g_old)
    used as a ring of history_size + 1 rows, one spare so that a new pair is written
    before it is known to be kept. ro[k] = 1 / y_k.s_k in the same row numbering;
    alpha is the recursion's scratch. The pairs, oldest first, are rows
    (start + j) % rows for j < count."""

    def __init__(self, n, dtype, size):
        rows = size + 1
        # np.empty: the OS commits a row's pages when it is first written, so memory
        # grows with the pairs actually stored, as torch's does
        self.S = np.empty((rows, n), dtype)
        self.Y = np.empty((rows, n), dtype)
        self.ro = np.zeros(rows)
        self.alpha = np.zeros(rows)
        self.size = size
        self.start = 0
        self.count = 0

    def order(self) -> list:
        """The rows of the pairs, oldest first."""
        rows = self.S.shape[0]
        return [(self.start + j) % rows for j in range(self.count)]

    def spare(self) -> int:
        """The row the next pair is written to."""
        return (self.start + self.count) % self.S.shape[0]

    def keep(self, ys) -> None:
        """Keep the pair in the spare row (y.s = ys), dropping the oldest when full."""
        slot = self.spare()
        if self.count == self.size:
            self.start = (self.start + 1) % self.S.shape[0]
        else:
            self.count += 1
        self.ro[slot] = 1.0 / ys

    def clear(self) -> None:
        self.start = self.count = 0

    def load(self, old_dirs, old_stps, ro) -> None:
        """The pairs of a checkpoint, oldest first (checked by the caller)."""
        m = ro.shape[0]
        self.Y[:m] = old_dirs
        self.S[:m] = old_stps
        self.ro[:m] = ro
        self.start, self.count = 0, m


class _Point(NamedTuple):
    """A point x0 + t d the line search evaluated: its loss f, the buffer slot of its
    gradient g, and the directional derivative gtd = g.d."""
    t: float
    f: float
    g: int
    gtd: float


class _Trials:
    """The line search's evaluations of the closure at x0 + t d.

    The gradients live in three slots (the optimizer's free _g and two buffers of
    its own) plus X0, the gradient at x0 (the optimizer's g_prev); a new
    evaluation goes into a slot no live point refers to, so nothing is allocated
    or cloned. ``evals`` counts the evaluations."""

    X0 = -1

    def __init__(self, opt, closure):
        K, nth, part = opt._k, _threads[0], opt._part
        p, d = opt._flat, opt._d
        if opt._ls is None:
            n, dt = p.shape[0], p.dtype
            opt._ls = [full(n, dt, 0), full(n, dt, 0), full(n, dt, 0)]
        self.opt, self.closure = opt, closure
        self.x0 = opt._ls[0]
        self.slots = [opt._g, opt._ls[1], opt._ls[2]]
        self.gmax = {}
        self.evals = 0
        K.lbfgs_copy(self.x0, p, None, part, nth)
        # max |d| (the copy into a free slot is how the kernels give it)
        self.d_norm = K.lbfgs_copy(self.slots[2], d, None, part, nth)[2]

    def __call__(self, t, live) -> _Point:
        opt = self.opt
        K, nth, part = opt._k, _threads[0], opt._part
        K.lbfgs_move(opt._flat, self.x0, opt._d, t, part, nth)
        try:
            loss, grad = opt._evaluate(self.closure)
        except BaseException:
            K.lbfgs_copy(opt._flat, self.x0, None, part, nth)  # back to where it began
            raise
        s = next(i for i in range(3) if i not in live)
        _, gtd, self.gmax[s] = K.lbfgs_copy(self.slots[s], grad, opt._d, part, nth)
        self.evals += 1
        return _Point(t, loss, s, gtd)

    def accept(self, pt: _Point):
        """param <- x0 + pt.t d and the optimizer's _g <- pt's gradient; returns
        (max |g|, max |t d|)."""
        opt = self.opt
        K, nth, part = opt._k, _threads[0], opt._part
        step_max = K.lbfgs_move(opt._flat, self.x0, opt._d, pt.t, part, nth)
        s = pt.g
        if s == self.X0:
            gmax = K.lbfgs_copy(opt._g, opt._g_prev, None, part, nth)[2]
        else:
            gmax = self.gmax[s]
            if s != 0:  # make the accepted slot _g
                opt._ls[s], opt._g = opt._g, self.slots[s]
        return gmax, step_max


# The strong-Wolfe line search (More and Thuente's scheme as torch, after minFunc,
# implements it): _bracket finds an interval holding an acceptable step, _zoom
# shrinks it. Both stop once max_ls evaluations follow the first.

def _bracket(trial, x0: _Point, t, c1, c2, max_ls):
    """From x0 (t = 0) and a first step t: ([a, b], False) with an acceptable step
    between a and b (or b the last try when max_ls ran out), or ([the accepted
    point], True)."""
    new = trial(t, ())
    prev = x0
    while trial.evals - 1 < max_ls:
        if new.f > x0.f + c1 * new.t * x0.gtd or (trial.evals > 2 and new.f >= prev.f):
            return [prev, new], False
        if abs(new.gtd) <= -c2 * x0.gtd:
            return [new], True
        if new.gtd >= 0:
            return [prev, new], False
        # extrapolate: a cubic step within [t + 0.01 (t - t_prev), 10 t]
        lo_step, hi_step = new.t + 0.01 * (new.t - prev.t), new.t * 10
        t = _cubic_min(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd, (lo_step, hi_step))
        prev = new
        new = trial(t, (prev.g,))
    return [x0, new], False


def _zoom(trial, bracket, x0: _Point, tol_change, c1, c2, max_ls) -> _Point:
    """The accepted point of a bracket [a, b] (in either order)."""
    insuf_progress = False
    lo, hi = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    while trial.evals - 1 < max_ls:
        a, b = bracket
        if abs(b.t - a.t) * trial.d_norm < tol_change:
            break
        t = _cubic_min(a.t, a.f, a.gtd, b.t, b.f, b.gtd)
        top, bot = max(a.t, b.t), min(a.t, b.t)
        eps = 0.1 * (top - bot)
        if min(top - t, t - bot) < eps:
            # too close to an end: move away from it unless the last try was fine
            if insuf_progress or t >= top or t <= bot:
                t = top - eps if abs(t - top) < abs(t - bot) else bot + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        new = trial(t, (a.g, b.g))
        if new.f > x0.f + c1 * t * x0.gtd or new.f >= bracket[lo].f:
            bracket[hi] = new
            lo, hi = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if abs(new.gtd) <= -c2 * x0.gtd:
                return new
            if new.gtd * (bracket[hi].t - bracket[lo].t) >= 0:
                bracket[hi] = bracket[lo]
            bracket[lo] = new
    return bracket[lo]


def _strong_wolfe(trial, f, gtd, t, tol_change, max_ls, c1=1e-4, c2=0.9) -> _Point:
    x0 = _Point(0.0, f, trial.X0, gtd)
    bracket, done = _bracket(trial, x0, t, c1, c2, max_ls)
    return bracket[0] if done else _zoom(trial, bracket, x0, tol_change, c1, c2, max_ls)


# ---------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------

def check_state_keys(keys, n_iter, where) -> None:
    """The one check of which state an L-BFGS state holds, in this class's
    state_dict (scalars and arrays) and in torch.optim.LBFGS's (both in one dict):
    ValueError naming ``where`` for a name L-BFGS does not keep, or for one it
    needs after an iteration."""
    unknown = set(keys) - set(SCALARS) - set(ARRAYS) - {"al"}
    if unknown:
        raise ValueError(f"{where} has {sorted(unknown)}, which LBFGS does not keep: a "
                         "state dict of another optimizer?")
    if n_iter:
        missing = [k for k in ARRAYS + SCALARS[2:] if k not in keys]
        if missing:
            raise ValueError(f"{where} lacks {missing} after an iteration")


def _check_state_dict(sd, dtype, size):
    """(hyperparameters, scalars, arrays) of a state_dict, every part checked
    against a param of ``dtype`` and ``size`` elements."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for key in ("rule", "dtype", "size", "hyperparameters", "scalars", "state"):
        if key not in sd:
            raise ValueError(f"state_dict is missing {key!r}")
    if sd.get("format", STATE_DICT_FORMAT) != STATE_DICT_FORMAT:
        raise ValueError(f"state_dict format {sd['format']!r} is not {STATE_DICT_FORMAT!r}")
    if sd["rule"] != "LBFGS":
        raise ValueError(f"state_dict['rule'] is {sd['rule']!r}; this optimizer is 'LBFGS'")
    if str(sd["dtype"]) != dtype.name:
        raise ValueError(f"state_dict['dtype'] is {sd['dtype']!r}; the param has dtype "
                         f"{dtype.name!r}")
    if sd["size"] != size:
        raise ValueError(f"state_dict['size'] is {sd['size']!r}; the param has {size} "
                         "elements")
    hps = sd["hyperparameters"]
    if not isinstance(hps, dict) or set(hps) - set(DEFAULTS):
        raise ValueError(f"state_dict['hyperparameters'] must be a dict with keys from "
                         f"{sorted(DEFAULTS)}, got {hps!r}")
    hp = check_hyperparameters({**DEFAULTS, **hps})
    sc = sd["scalars"]
    if not isinstance(sc, dict) or sorted(sc) != sorted(SCALARS):
        raise ValueError(f"state_dict['scalars'] must have exactly {list(SCALARS)}, "
                         f"got {sc!r}")
    scalars = {k: _int(f"state_dict['scalars'][{k!r}]", sc[k], 0)
               for k in ("func_evals", "n_iter")}
    for k in ("t", "H_diag", "prev_loss"):
        v = sc[k]
        if scalars["n_iter"] > 0 or v is not None:
            v = _real(f"state_dict['scalars'][{k!r}]", v)
        scalars[k] = v
    st = sd["state"]
    if not isinstance(st, dict):
        raise TypeError(f"state_dict['state'] must be a dict, got {type(st).__name__}")
    check_state_keys([*sc, *st], scalars["n_iter"], "state_dict['state']")
    arrays = {}
    if scalars["n_iter"] > 0:
        for k in ARRAYS:
            if not isinstance(st[k], np.ndarray):
                raise ValueError(f"state_dict['state'][{k!r}] must be a NumPy array "
                                 f"after an iteration, got {type(st[k]).__name__}")
            arrays[k] = st[k]
        m = arrays["ro"].shape[0] if arrays["ro"].ndim == 1 else -1
        want = {"d": ((size,), dtype), "prev_flat_grad": ((size,), dtype),
                "old_dirs": ((m, size), dtype), "old_stps": ((m, size), dtype),
                "ro": ((m,), np.dtype(np.float64))}
        for k, (shape, wdt) in want.items():
            if arrays[k].shape != shape or arrays[k].dtype != wdt:
                raise ValueError(f"state_dict['state'][{k!r}] has shape "
                                 f"{arrays[k].shape} and dtype {arrays[k].dtype}; "
                                 f"expected {shape} {wdt}")
        if m > hp["history_size"]:
            raise ValueError(f"state_dict holds {m} pairs; history_size is "
                             f"{hp['history_size']}")
    return hp, scalars, arrays


# ---------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------

class LBFGS:
    """L-BFGS (torch.optim.LBFGS's algorithm) on one float32/float64 buffer.

    Parameters
    ----------
    param : C-contiguous float32/float64 NumPy array of any shape (updated in
        place through its flat view), a CPU tensor's ``.numpy()``, or FlatParams.
    lr : step length (default 1); the first iteration ever uses
        min(1, 1/||g||_1) * lr.
    max_iter : iterations per ``step`` (default 20).
    max_eval : closure evaluations per ``step`` (default max_iter * 5 // 4).
    tolerance_grad : stop when max|g| <= tolerance_grad (default 1e-7).
    tolerance_change : stop when the step or the loss change falls below it
        (default 1e-9).
    history_size : curvature pairs kept (default 100).
    line_search_fn : None (fixed step lr) or "strong_wolfe".
    backend : None (decided at import), "cython" or "numba".

    ``step(closure)``: ``closure()`` evaluates the objective at the current
    ``param`` and returns ``(loss, grad)``; grad has param's shape (or is flat)
    and dtype. Returns the first loss evaluated, as torch does.

    Reference: Nocedal, "Updating quasi-Newton matrices with limited storage",
    Math. Comp. 1980; the line search is More and Thuente's strong-Wolfe scheme
    as torch (after minFunc) implements it.
    """

    def __init__(self, param, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None, *,
                 backend=None):
        hp = check_hyperparameters(dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                                        tolerance_grad=tolerance_grad,
                                        tolerance_change=tolerance_change,
                                        history_size=history_size,
                                        line_search_fn=line_search_fn))
        if isinstance(param, FlatParams):
            param = param.data
        if param is None:
            raise TypeError("param must be a float32 or float64 array, got None")
        be = backends.for_array(param, backend)
        if not hasattr(be, "lbfgs_direction"):
            raise ValueError(f"LBFGS runs on host arrays (backend 'cython' or 'numba'), "
                             f"not on backend {be.NAME!r}")
        try:
            arr = as_array(param)
        except TypeError as exc:
            raise TypeError(f"param must be a float32 or float64 array, got "
                            f"{type(param).__name__}: {exc}") from None
        if arr.dtype not in FLOAT_DTYPES:
            raise TypeError(f"param must have dtype float32 or float64, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"param must be C-contiguous, got strides {arr.strides}")
        if not arr.flags.writeable:
            raise ValueError("param is read-only (writeable=False); LBFGS updates it in place")
        self._param = arr
        self._flat = arr.reshape(-1)  # a view: arr is C-contiguous
        self._k = be
        self._hp = hp
        n = self._flat.shape[0]
        dt = arr.dtype
        self._g = full(n, dt, 0)        # the current gradient (our copy)
        self._g_prev = full(n, dt, 0)   # prev_flat_grad
        self._d = full(n, dt, 0)        # the direction (q and r of the recursion)
        self._part = np.zeros(3 * max(1, self._k.lbfgs_blocks(n)))
        self._ls = None                 # x0 and two gradient slots, at the first line search
        self._hist = _History(n, dt, hp["history_size"])
        self._func_evals = 0
        self._n_iter = 0
        self._t = None
        self._H_diag = None
        self._prev_loss = None

    # -- public attributes ----------------------------------------------------
    @property
    def param(self):
        return self._param

    @property
    def backend(self) -> str:
        return self._k.NAME

    @property
    def hyperparameters(self) -> dict:
        return dict(self._hp)

    def __getattr__(self, name):
        hp = self.__dict__.get("_hp")
        if hp is not None and name in hp:
            return hp[name]
        raise AttributeError(f"LBFGS has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in DEFAULTS:
            if name == "history_size" and value != self._hp["history_size"]:
                raise ValueError("history_size cannot change after construction "
                                 f"(it is {self._hp['history_size']}, got {value!r})")
            hp = dict(self._hp)
            hp[name] = value
            self.__dict__["_hp"] = check_hyperparameters(hp)
        else:
            object.__setattr__(self, name, value)

    @property
    def state(self) -> dict:
        """torch's state keys; arrays are views of the optimizer's buffers."""
        st = {"func_evals": self._func_evals, "n_iter": self._n_iter}
        if self._n_iter > 0:
            h = self._hist
            rows = h.order()
            st.update(d=self._d, t=self._t, old_dirs=[h.Y[k] for k in rows],
                      old_stps=[h.S[k] for k in rows], ro=[float(h.ro[k]) for k in rows],
                      H_diag=self._H_diag, prev_flat_grad=self._g_prev,
                      prev_loss=self._prev_loss)
        return st

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hp.items())
        return (f"LBFGS(<{self._param.shape} {self._param.dtype} on {self._k.NAME}>, {hp}; "
                f"n_iter={self._n_iter})")

    # -- the closure ------------------------------------------------------------
    def _evaluate(self, closure):
        """(loss, flat gradient array) from closure(), both checked; nothing of the
        optimizer's is touched here."""
        out = closure()
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"closure must return a pair (loss, grad), got "
                            f"{type(out).__name__}" + (f" of length {len(out)}"
                                                      if isinstance(out, (tuple, list)) else ""))
        loss = _loss_value(out[0])
        grad = out[1]
        try:
            g = as_array(grad)
        except TypeError:
            raise TypeError(f"closure returned a grad of type {type(grad).__name__}; expected "
                            "an array") from None
        if g.dtype != self._flat.dtype:
            raise TypeError(f"closure returned a grad of dtype {g.dtype}; param has dtype "
                            f"{self._flat.dtype}")
        if g.shape != self._param.shape and g.shape != self._flat.shape:
            raise ValueError(f"closure returned a grad of shape {g.shape}; param has shape "
                             f"{self._param.shape} ({self._flat.shape[0]} elements)")
        return loss, np.ascontiguousarray(g).reshape(-1)

    # -- one step -------------------------------------------------------------
    def step(self, closure):
        """Up to max_iter L-BFGS iterations; returns the first loss evaluated."""
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        hp, K, nth, part = self._hp, self._k, _threads[0], self._part
        lr, max_iter, max_eval = hp["lr"], hp["max_iter"], hp["max_eval"]
        tol_grad, tol_change = hp["tolerance_grad"], hp["tolerance_change"]
        p, d, hist = self._flat, self._d, self._hist

        loss, grad = self._evaluate(closure)
        abssum, _, gmax = K.lbfgs_copy(self._g, grad, None, part, nth)
        first_loss = loss
        evals = 1
        self._func_evals += 1
        if gmax <= tol_grad:
            return first_loss

        n = 0
        while n < max_iter:
            n += 1
            self._n_iter += 1
            first = self._n_iter == 1
            if first:
                hist.clear()
                self._H_diag = 1.0
            else:
                # y = g - g_prev and s = t d into the spare row; kept only if y.s > 1e-10
                slot = hist.spare()
                ys, yy = K.lbfgs_curvature(self._g, self._g_prev, d, self._t, hist.Y[slot],
                                           hist.S[slot], part, nth)
                if ys > 1e-10:
                    hist.keep(ys)
                    self._H_diag = _div(ys, yy)
            gtd = K.lbfgs_direction(self._g, d, hist.S, hist.Y, hist.ro, hist.alpha,
                                    hist.start, hist.count, self._H_diag, first, part, nth)
            # prev_flat_grad <- g: swap the buffers; _g is free for the next gradient
            self._g, self._g_prev = self._g_prev, self._g
            self._prev_loss = loss
            self._t = t = min(1.0, _div(1.0, abssum)) * lr if first else lr
            if gtd > -tol_change:
                break

            if hp["line_search_fn"] is not None:
                trial = _Trials(self, closure)
                pt = _strong_wolfe(trial, loss, gtd, t, tol_change, max_eval - evals)
                gmax, step_max = trial.accept(pt)
                loss, self._t, k = pt.f, pt.t, trial.evals
            else:
                step_max = K.lbfgs_move(p, None, d, t, part, nth)
                k = 0
                if n != max_iter:
                    loss, grad = self._evaluate(closure)
                    abssum, _, gmax = K.lbfgs_copy(self._g, grad, None, part, nth)
                    k = 1
            evals += k
            self._func_evals += k

            if n == max_iter or evals >= max_eval or gmax <= tol_grad:
                break
            if step_max <= tol_change or abs(loss - self._prev_loss) < tol_change:
                break
        return first_loss

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data (copies): hyperparameters, torch's scalar state, and d,
        prev_flat_grad and the history pairs oldest first once an iteration ran."""
        sd = {"format": STATE_DICT_FORMAT, "rule": "LBFGS",
              "dtype": self._flat.dtype.name, "size": int(self._flat.shape[0]),
              "step": int(self._n_iter), "hyperparameters": dict(self._hp),
              "scalars": {"func_evals": self._func_evals, "n_iter": self._n_iter,
                          "t": self._t, "H_diag": self._H_diag,
                          "prev_loss": self._prev_loss},
              "state": {}}
        if self._n_iter > 0:
            h = self._hist
            rows = h.order()
            sd["state"] = {"d": self._d.copy(), "prev_flat_grad": self._g_prev.copy(),
                           "old_dirs": h.Y[rows].copy(), "old_stps": h.S[rows].copy(),
                           "ro": h.ro[rows].copy()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes."""
        n, dt = self._flat.shape[0], self._flat.dtype
        hp, scalars, arrays = _check_state_dict(state_dict, dt, n)
        # all checked: apply
        if hp["history_size"] != self._hist.size:
            self._hist = _History(n, dt, hp["history_size"])
        self.__dict__["_hp"] = hp
        self._func_evals, self._n_iter = scalars["func_evals"], scalars["n_iter"]
        self._t, self._H_diag, self._prev_loss = (scalars["t"], scalars["H_diag"],
                                                  scalars["prev_loss"])
        self._hist.clear()
        if arrays:
            np.copyto(self._d, arrays["d"])
            np.copyto(self._g_prev, arrays["prev_flat_grad"])
            self._hist.load(arrays["old_dirs"], arrays["old_stps"], arrays["ro"])
