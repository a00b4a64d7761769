"""Functional API: one call per rule, for users who own their state buffers.

    fastopt.functional.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None,
                            *, step, lr=1e-3, betas=(0.9, 0.999), ...)

updates ``param`` and the state buffers in place for step ``step`` (1-based) and
returns the rule's new scalar state as a dict (``{"mu_product": ...}`` for NAdam,
``{"eta": ..., "mu": ...}`` for ASGD, ``{}`` otherwise). Scalar state is passed back
in by keyword on the next call; on the first step it may be left out.

``param`` and the state buffers are float32, float64, float16 or bfloat16 (ml_dtypes)
arrays of one dtype; ``grad`` has the param's dtype, or float16/bfloat16 for a float32
param (float32 arithmetic throughout, each stored value rounded once).

Every call validates all of its arguments, then computes the per-step scalars
(``Rule.plan``) and calls the backend's kernel. The optimizer classes run the same
plan and the same kernel, bound to their buffers once (``backends.bind``).
"""

from __future__ import annotations

import inspect
import numbers

from fastopt import backends
from fastopt._checks import PARAM_DTYPES, check_buffers, check_step, coerce
from fastopt.rules import RULES, Rule

__all__ = [rule.name.lower() for rule in RULES.values()]


def _make(rule: Rule):
    buffer_params = []
    for b in rule.buffers:
        default = inspect.Parameter.empty if b.needed(rule.defaults) else None
        buffer_params.append(inspect.Parameter(
            b.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    params = ([inspect.Parameter("param", inspect.Parameter.POSITIONAL_OR_KEYWORD),
               inspect.Parameter("grad", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
              + buffer_params
              + [inspect.Parameter("step", inspect.Parameter.KEYWORD_ONLY)]
              + [inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default)
                 for h in rule.hypers]
              + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                 for name, _ in rule.scalars]
              + [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)])
    signature = inspect.Signature(params)
    hyper_names = [h.name for h in rule.hypers]

    def step_fn(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{rule.name.lower()}(): {exc}") from None
        bound.apply_defaults()
        a = bound.arguments
        hp = rule.check_hypers({name: a[name] for name in hyper_names})
        t = check_step(a["step"])
        backend = backends.for_array(a["param"], a["backend"])
        param = coerce("param", a["param"], backend)
        grad = coerce("grad", a["grad"], backend)
        buffers = []
        for b in rule.buffers:
            if not b.needed(hp):
                buffers.append(None)
                continue
            if a[b.name] is None:
                raise TypeError(f"{rule.name.lower()}(): {b.name} is required with these "
                                f"hyperparameters, got None")
            buffers.append(coerce(b.name, a[b.name], backend))
        scalars = {}
        for name, init in rule.scalars:
            value = a[name]
            if value is None:
                if t != 1:
                    raise TypeError(f"{rule.name.lower()}(): {name} is required after the "
                                    f"first step (pass the value the previous call returned)")
                value = init(hp)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{rule.name.lower()}(): {name} must be a real number, "
                                f"got {value!r}")
            scalars[name] = float(value)
        rule.validate_scalars(scalars)
        check_buffers(rule.arg_names, [param, grad] + buffers, PARAM_DTYPES)
        plan_args, new_scalars = rule.plan(hp, t, scalars, False)
        if param.dtype == grad.dtype and param.dtype.name in ("float32", "float64"):
            getattr(backend, rule.kernel)(param, grad, *buffers, *plan_args,
                                          backends.num_threads())
        else:   # bf16/fp16 storage: float32 arithmetic, each stored value rounded once
            try:
                bound = backend.bind(rule.kernel, param, buffers, grad_dtype=grad.dtype)
            except TypeError as exc:
                if "grad_dtype" not in str(exc):
                    raise
                raise TypeError(f"{rule.name.lower()}(): the {backend.NAME} backend does "
                                f"not step {param.dtype} params or {grad.dtype} gradients "
                                "(backend='cython' does)") from None
            bound.step(grad, tuple(plan_args), backends.num_threads())
        return dict(new_scalars) if rule.scalars else {}

    step_fn.__name__ = step_fn.__qualname__ = rule.name.lower()
    step_fn.__signature__ = signature
    step_fn.__doc__ = (f"One {rule.name} step, in place.\n\n    {rule.update}\n\n"
                       f"Buffers: {', '.join(b.name for b in rule.buffers)}. "
                       f"Returns the new scalar state "
                       f"({', '.join(n for n, _ in rule.scalars) or 'none'}) as a dict.\n\n"
                       f"Reference: {rule.paper}.")
    step_fn.__module__ = __name__
    return step_fn


for _rule in RULES.values():
    globals()[_rule.name.lower()] = _make(_rule)
del _rule
