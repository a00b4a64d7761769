"""The flag combinations each rule is tested with: every combination of the
flags docs/rules.md lists, with non-default values for the continuous
hyperparameters so that every term of each update is exercised."""

import functools
import itertools

import numpy as np

from fastopt.rules import RULES

# axes per rule: name -> list of values; combinations are the product
AXES = {
    "SGD": dict(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.3], nesterov=[False, True],
                weight_decay=[0.0, 0.01], maximize=[False, True]),
    "Adam": dict(lr=[0.01], amsgrad=[False, True], maximize=[False, True],
                 weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True]),
    "Adagrad": dict(lr=[0.05], lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.01],
                    initial_accumulator_value=[0.0, 0.1], maximize=[False, True]),
    "RMSprop": dict(lr=[0.01], momentum=[0.0, 0.9], centered=[False, True],
                    weight_decay=[0.0, 0.01], maximize=[False, True]),
    "Adadelta": dict(lr=[1.0], weight_decay=[0.0, 0.01], maximize=[False, True]),
    "Adamax": dict(lr=[0.01], weight_decay=[0.0, 0.01], maximize=[False, True]),
    "NAdam": dict(lr=[0.01], weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True],
                  maximize=[False, True]),
    "RAdam": dict(lr=[0.01], weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True],
                  maximize=[False, True]),
    # t0=10: averaging (mu != 1) starts within the run
    "ASGD": dict(lr=[0.01], lambd=[1e-4, 0.01], t0=[1e6, 10.0], weight_decay=[0.0, 0.01],
                 maximize=[False, True]),
    "Rprop": dict(lr=[0.01], etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50.0), (1e-3, 0.02)],
                  maximize=[False, True]),
    "Lion": dict(lr=[1e-3], weight_decay=[0.0, 0.1], maximize=[False, True]),
}
AXES["SGDW"] = dict(AXES["SGD"])
AXES["AdamW"] = dict(AXES["Adam"])


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


# One flag set per kernel path for the CUDA kernels against the CPU (the simulator
# suite in test_numba_backends.py and the GPU lane in test_cuda_gpu.py)
CUDA_CASES = [
    ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"maximize": True}),
    ("SGDW", {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", {}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    ("RMSprop", {"maximize": True}),
    ("Adadelta", {"weight_decay": 0.1}),
    ("Adamax", {"maximize": True, "weight_decay": 0.1}),
    ("NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RAdam", {"weight_decay": 0.1}),
    ("ASGD", {"t0": 3.0, "weight_decay": 0.1}),
    ("Rprop", {"maximize": True}),
    ("Lion", {"weight_decay": 0.1}),
]
