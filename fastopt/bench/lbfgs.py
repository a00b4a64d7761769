"""The L-BFGS scenario: the cost of one iteration, closure excluded, for fastopt.LBFGS,
torch.optim.LBFGS and SciPy's L-BFGS-B, timed interleaved in one run.

Method
------
* Objective: the quadratic f(x) = sum(a x^2) / 2 with a log-uniform in [1, 1e3].
  Every peer's closure is the same two NumPy calls on its own buffers,
  ``np.multiply(a, x, out=g)`` and ``f = np.dot(g, x) / 2``: two passes over n,
  and no allocation.
* Stopping rules off (tolerance_grad = tolerance_change = -1): every ``step`` runs
  exactly ``iters_per_step`` iterations and ``iters_per_step`` closure calls
  (counted, and checked).
* Full history from the first timed iteration: fastopt and torch start from the
  same synthetic state, ``history_size`` exact curvature pairs of the quadratic
  (s random, y = a*s), loaded with ``load_state_dict`` and written into torch's
  ``state``. Each accepted pair then evicts the oldest, so the history stays full.
* Closure time: the closure alone is one more interleaved key (SciPy's own
  float64 closure another). An iteration costs
  (time of one step - iters_per_step x closure time) / iters_per_step.
* SciPy cannot start from a given history, and a difference of two long runs
  drowns in noise at h = 100. Its figure is the mean over one run of h + k
  iterations from x0: (T - evaluations x closure time) / iterations, with its own
  float64 closure timed beside it. Its history fills up during that run, so
  the mean is a lower bound on its full-history cost (the ratio against SciPy is
  conservative). SciPy computes in float64 whatever the input dtype.
* fastopt, torch and the closures are timed by ``time_interleaved``: one untimed
  call, then ``repeats`` rounds in rotating order. SciPy's run lasts seconds (a
  minute at n = 1e6, h = 100) and is timed once, right after.
"""

from __future__ import annotations

import gc
import time

import numpy as np

import fastopt
from fastopt.backends._host import full
from fastopt.bench.machine import set_threads, too_big
from fastopt.bench.timing import time_interleaved

DEFAULT_CASES = ((1_000_000, 10), (1_000_000, 100), (10_000_000, 10))
QUICK_CASES = ((1_000_000, 10),)


class _Problem:
    """The quadratic, a start point and a synthetic full history."""

    def __init__(self, n, history, dtype, rng):
        self.n, self.h, self.dtype = n, history, np.dtype(dtype)
        self.a = (10.0 ** rng.uniform(0.0, 3.0, n)).astype(self.dtype)
        self.x0 = rng.uniform(-1.0, 1.0, n).astype(self.dtype)
        self.calls = 0

    def closure_for(self, x, g):
        """A closure over x whose gradient lands in g (both NumPy arrays)."""
        a = self.a

        def closure():
            np.multiply(a, x, out=g)
            self.calls += 1
            return 0.5 * float(np.dot(g, x)), g
        return closure

    def state_dict(self, lbfgs_hp, rng):
        """fastopt's state_dict for a full history at x0: pairs s ~ 0.01 U(-1, 1),
        y = a*s (so y.s > 0), d = -g0, t = lr."""
        n, h, dt = self.n, self.h, self.dtype
        S = np.empty((h, n), dt)
        Y = np.empty((h, n), dt)
        ro = np.empty(h)
        for i in range(h):
            S[i] = rng.uniform(-0.01, 0.01, n).astype(dt)
            np.multiply(self.a, S[i], out=Y[i])
            ro[i] = 1.0 / float(np.dot(Y[i].astype(np.float64), S[i].astype(np.float64)))
        g0 = self.a * self.x0
        ys = 1.0 / ro[-1]
        yy = float(np.dot(Y[-1].astype(np.float64), Y[-1].astype(np.float64)))
        return {"format": "fastopt.state_dict/1", "rule": "LBFGS", "dtype": dt.name, "size": n,
                "step": h + 1, "hyperparameters": dict(lbfgs_hp),
                "scalars": {"func_evals": h + 1, "n_iter": h + 1, "t": 1e-3, "H_diag": ys / yy,
                            "prev_loss": 0.5 * float(np.dot(g0, self.x0)) + 1.0},
                "state": {"d": -g0, "prev_flat_grad": g0, "old_dirs": Y, "old_stps": S,
                          "ro": ro}}


def _fastopt_step(prob, hp, sd, backend):
    x = full(prob.n, prob.dtype, 0)
    x[:] = prob.x0
    g = full(prob.n, prob.dtype, 0)
    opt = fastopt.LBFGS(x, backend=backend, **hp)
    opt.load_state_dict(sd)
    closure = prob.closure_for(x, g)
    return (lambda: opt.step(closure)), opt


def _torch_step(prob, hp, sd, nthreads):
    import torch
    torch.set_num_threads(nthreads)
    x = torch.from_numpy(prob.x0.copy())
    x.grad = torch.zeros_like(x)
    opt = torch.optim.LBFGS([x], **{k: v for k, v in hp.items()})
    st = opt.state[x]
    S = torch.from_numpy(sd["state"]["old_stps"])
    Y = torch.from_numpy(sd["state"]["old_dirs"])
    st.update(func_evals=sd["scalars"]["func_evals"], n_iter=sd["scalars"]["n_iter"],
              d=torch.from_numpy(sd["state"]["d"].copy()), t=sd["scalars"]["t"],
              old_dirs=[Y[i].clone() for i in range(Y.shape[0])],
              old_stps=[S[i].clone() for i in range(S.shape[0])],
              ro=[torch.tensor(r, dtype=x.dtype) for r in sd["state"]["ro"]],
              H_diag=torch.tensor(sd["scalars"]["H_diag"], dtype=x.dtype),
              prev_flat_grad=torch.from_numpy(sd["state"]["prev_flat_grad"].copy()),
              prev_loss=sd["scalars"]["prev_loss"])
    inner = prob.closure_for(x.numpy(), x.grad.numpy())

    def closure():
        return inner()[0]   # torch reads p.grad, filled by the same NumPy call
    return (lambda: opt.step(closure)), opt


def _scipy_run(prob, history, maxiter):
    from scipy.optimize import minimize
    x = prob.x0.astype(np.float64)
    g = np.empty_like(x)
    a64 = prob.a.astype(np.float64)

    def fun(xk):
        np.multiply(a64, xk, out=g)
        return 0.5 * float(np.dot(g, xk)), g

    def run():
        res = minimize(fun, x, jac=True, method="L-BFGS-B",
                       options=dict(maxcor=history, maxiter=maxiter, maxfun=10 ** 9,
                                    ftol=0.0, gtol=0.0))
        run.nit, run.nfev = int(res.nit), int(res.nfev)
    run.nit = run.nfev = 0
    run.closure = lambda: fun(x)
    return run


def run_case(n, history, dtype, nthreads, iters_per_step, repeats, rng, peers):
    """One (n, history) case: per-iteration seconds of each peer and the raw timings."""
    hp = dict(lr=1.0, max_iter=iters_per_step, max_eval=10 ** 9, tolerance_grad=-1.0,
              tolerance_change=-1.0, history_size=history, line_search_fn=None)
    prob = _Problem(n, history, dtype, rng)
    sd = prob.state_dict(hp, rng)
    steps, holders, status = {}, {}, {}
    for peer in peers:
        try:
            if peer == "fastopt":
                steps[peer], holders[peer] = _fastopt_step(prob, hp, sd, "cython")
            elif peer == "fastopt_numba":
                steps[peer], holders[peer] = _fastopt_step(prob, hp, sd, "numba")
            elif peer == "torch":
                steps[peer], holders[peer] = _torch_step(prob, hp, sd, nthreads)
            elif peer == "scipy":
                holders["scipy"] = _scipy_run(prob, history, history + iters_per_step)
                steps["scipy:closure"] = holders["scipy"].closure
            status[peer] = {"status": "ok"}
        except ImportError as exc:
            status[peer] = {"status": "missing", "detail": str(exc)}
        except Exception as exc:
            status[peer] = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    del sd
    gc.collect()
    x = np.empty(n, prob.dtype)
    x[:] = prob.x0
    gbuf = np.empty_like(x)
    steps["closure"] = prob.closure_for(x, gbuf)
    t = time_interleaved(steps, repeats=repeats, warmup=0, target_sample_s=1e-3,
                         prestep_below_s=0.0)
    closure_s = t["closure"]["median_s"]
    if "scipy" in holders:
        # one run of seconds: timed once, right after the interleaved rounds
        t0 = time.perf_counter()
        try:
            holders["scipy"]()
            t["scipy"] = {"status": "ok", "median_s": time.perf_counter() - t0,
                          "samples_s": [time.perf_counter() - t0]}
        except Exception as exc:
            t["scipy"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    results = {}
    for peer in peers:
        res = dict(status[peer])
        if res["status"] != "ok":
            results[peer] = res
            continue
        if peer == "scipy":
            r, run = t["scipy"], holders["scipy"]
            if r.get("status") != "ok":
                results[peer] = {"status": "error", "detail": r.get("error", "")}
                continue
            c64 = t["scipy:closure"]["median_s"]
            per = (r["median_s"] - run.nfev * c64) / max(run.nit, 1)
            res.update(per_iteration_s=per, method="mean over one run from x0",
                       run_s=r["median_s"], samples_s=r["samples_s"], iterations=run.nit,
                       evaluations=run.nfev, closure_s=c64)
        else:
            r = t[peer]
            if r.get("status") != "ok":
                results[peer] = {"status": "error", "detail": r.get("error", "")}
                continue
            per = (r["median_s"] - iters_per_step * closure_s) / iters_per_step
            res.update(per_iteration_s=per, step_s=r["median_s"], samples_s=r["samples_s"],
                       preempted_retaken=r["preempted_retaken"],
                       preempted_kept=r["preempted_kept"])
            if peer.startswith("fastopt"):
                opt = holders[peer]
                res["history_len"] = len(opt.state["old_dirs"])
            elif peer == "torch":
                res["history_len"] = len(next(iter(holders[peer].state.values()))["old_dirs"])
        results[peer] = res
    base = results.get("fastopt", {})
    speedup = {}
    if base.get("status") == "ok" and base["per_iteration_s"] > 0:
        for peer, r in results.items():
            if peer != "fastopt" and r.get("status") == "ok" and r["per_iteration_s"] > 0:
                speedup[peer] = r["per_iteration_s"] / base["per_iteration_s"]
    itemsize = prob.dtype.itemsize
    return {"n": n, "history": history, "dtype": prob.dtype.name, "threads": nthreads,
            "iters_per_step": iters_per_step, "closure_s": closure_s,
            # the fused passes' memory traffic per iteration (reads + writes of n-vectors):
            # copy g (2), curvature (3 read + 2 write), 2h+1 recursion passes (2 read +
            # 1 write each), the move (2 read + 1 write)
            "fastopt_bytes_per_iteration": (2 + 5 + 3 * (2 * history + 1) + 3) * n * itemsize,
            "results": results, "speedup": speedup}


def scenario(cfg, nthreads, roofs=None, rng=None, bar=None, iters_per_step=2,
             peers=("fastopt", "torch", "scipy")):
    """The cases of ``cfg.lbfgs_cases`` (default: by mode) that fit in memory."""
    cases = [tuple(c) for c in cfg.lbfgs_cases] or list(
        QUICK_CASES if cfg.mode == "quick" else DEFAULT_CASES)
    dtype = cfg.lbfgs_dtype
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
    rows, skipped = [], []
    set_threads(nthreads)
    for n, h in cases:
        why = too_big(mem_needed(n, h, np.dtype(dtype).itemsize, peers), cfg.mem_fraction)
        if why:
            skipped.append({"n": n, "history": h, "reason": why})
            continue
        rows.append(run_case(int(n), int(h), dtype, nthreads, iters_per_step,
                             max(3, min(cfg.repeats, 5)), rng, peers))
        gc.collect()
    return {"cases": rows, "skipped": skipped, "dtype": dtype,
            "objective": "sum(a x^2)/2, a log-uniform in [1, 1e3]",
            "method": __doc__.split("Method\n------\n", 1)[1].strip()}


def mem_needed(n, h, itemsize, peers):
    """Bytes a case holds: 2(h+1) history rows per fastopt/torch peer, SciPy's float64
    history, the synthetic state."""
    per_vec = n * itemsize
    total = 2 * h * per_vec  # the synthetic state
    for p in peers:
        total += (2 * (h + 1) + 8) * (n * 8 if p == "scipy" else per_vec)
    return total
