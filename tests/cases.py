"""The flag combinations each rule is tested with: every combination of the
flags docs/rules.md lists, with non-default values for the continuous
hyperparameters so that every term of each update is exercised."""

import functools
import itertools

import numpy as np

from fastopt.rules import RULES

# axes per rule, from the registry: each hyperparameter's probe values, and False/True
# for every flag; the combinations are the product
AXES = {name: {h.name: ([False, True] if h.kind == "flag" else list(h.probe))
               for h in rule.hypers if h.kind == "flag" or h.probe}
        for name, rule in RULES.items()}


def combos(rule_name):
    axes = AXES[rule_name]
    rule = RULES[rule_name]
    out = []
    for values in itertools.product(*axes.values()):
        hp = dict(rule.defaults)
        hp.update(zip(axes.keys(), values))
        try:
            rule.check_hypers(hp)
        except ValueError:
            continue  # e.g. nesterov without momentum: torch refuses it too
        out.append(hp)
    return out


def case_id(hp, rule_name):
    defaults = RULES[rule_name].defaults
    parts = [f"{k}={v}" for k, v in hp.items() if v != defaults[k] and k != "lr"]
    return ",".join(parts) or "defaults"


@functools.lru_cache(maxsize=16)
def _grad_stream(n, steps, dtype, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((steps, n)) * np.exp(rng.uniform(-3, 1, (steps, n)))
    g[rng.random((steps, n)) < 0.05] = 0.0
    g = g.astype(dtype)
    g.flags.writeable = False  # shared between tests: nobody may change it
    return g


def grads(n, steps, dtype, seed=0):
    """A reproducible gradient stream with mixed magnitudes and exact zeros
    (read-only rows; the same stream for every test that asks)."""
    return _grad_stream(n, steps, np.dtype(dtype).type, seed)


def initial_param(n, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def kernel_paths(rule_name):
    """A few flag sets of a rule that between them take every branch of its kernel:
    the valid combination with the most non-default values, then for each flag it
    leaves off the fullest combination with that flag on (SGD's nesterov excludes
    dampening), then the defaults with maximize. For the suites that pay per case
    (the CUDA simulator, the GPU lane, Numba's compiles)."""
    rule = RULES[rule_name]
    everything = combos(rule_name)

    def fullest(pool):
        return max(reversed(pool), key=lambda hp: sum(v != rule.defaults[k]
                                                      for k, v in hp.items()))
    out = [fullest(everything)]
    for h in rule.hypers:
        if h.kind == "flag" and not any(hp[h.name] for hp in out):
            out.append(fullest([hp for hp in everything if hp[h.name]]))
    # (the schedule-free rows have no maximize, as the schedulefree package)
    plain = {**rule.defaults, **({"maximize": True} if "maximize" in rule.defaults else {})}
    return out + ([plain] if plain not in out else [])


# Those flag sets of every rule, as (name, hyperparameters that differ from the
# defaults): the CUDA kernels against the CPU (the simulator suite in
# test_numba_backends.py, the GPU lane in test_cuda_gpu.py) and the Numba lists
CUDA_CASES = [(name, {k: v for k, v in hp.items() if v != RULES[name].defaults[k]})
              for name in RULES for hp in kernel_paths(name)]
