"""fastopt.torch: drop-in ``torch.optim`` optimizers on fastopt's fused kernels.

    import fastopt.torch
    opt = fastopt.torch.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()                # one fused kernel call per (group, device, dtype)
        opt.zero_grad()           # torch's: gradients become None

One class per registry rule, constructed exactly like torch's namesake (same
positional order, names, defaults and validation messages), and a subclass of
``torch.optim.Optimizer``: LR schedulers, ``torch.amp.GradScaler``,
``ZeroRedundancyOptimizer(optimizer_class=...)`` and DDP drive it unchanged.
The kernels run over the parameters, gradients and state tensors where they live;
``opt.state`` holds torch's keys. See ``fastopt.torch.optimizer``.
"""

from __future__ import annotations

import inspect

import torch

from fastopt.rules import RULES, Rule
from fastopt.torch.bnb8 import (Adagrad8bit, Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit,
                                SGD8bit)
from fastopt.torch.lbfgs import LBFGS
from fastopt.torch.optimizer import DISPATCH_FLAGS, Optimizer, _plain
from fastopt.torch.schedulefree import AdamWScheduleFree, SGDScheduleFree
from fastopt.torch.sparse import SparseAdam
from fastopt.torch.muon import Muon
from fastopt.torch.adafactor import Adafactor


def _signature(rule: Rule):
    """The constructor's signature: torch's namesake's (positional order, which
    dispatch flags exist); for a rule torch lacks, the registry's order with
    ``maximize`` and the flags keyword-only."""
    P = inspect.Parameter
    hypers = {h.name: h.default for h in rule.hypers}
    twin = getattr(torch.optim, rule.name, None) if rule.in_torch else None
    head = [P("self", P.POSITIONAL_ONLY), P("params", P.POSITIONAL_OR_KEYWORD)]
    positional, keyword, flags = [], [], {}
    if twin is not None:
        for name, tp in list(inspect.signature(twin.__init__).parameters.items())[2:]:
            if name in DISPATCH_FLAGS:
                flags[name] = DISPATCH_FLAGS[name]
            elif name not in hypers:
                continue
            default = hypers.pop(name) if name in hypers else flags[name]
            (positional if tp.kind == P.POSITIONAL_OR_KEYWORD else keyword).append(
                P(name, tp.kind, default=default))
    else:
        flags = {k: v for k, v in DISPATCH_FLAGS.items() if k != "capturable"}
        for name in list(hypers):
            if name != "maximize":
                positional.append(P(name, P.POSITIONAL_OR_KEYWORD, default=hypers.pop(name)))
        keyword += [P(name, P.KEYWORD_ONLY, default=d) for name, d in flags.items()]
    # hyperparameters torch's signature lacks (AdamW's decoupled_weight_decay)
    keyword += [P(name, P.KEYWORD_ONLY, default=d) for name, d in hypers.items()]
    # bf16 parameters round stochastically (torchao's keyword)
    keyword.append(P("bf16_stochastic_round", P.KEYWORD_ONLY, default=False))
    return inspect.Signature(head + positional + keyword)


def _make_class(rule: Rule):
    signature = _signature(rule)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        params = values.pop("params")
        # torch validates the constructor's values; the registry's checks carry
        # torch's messages (and name the argument)
        rule.check_hypers({h.name: _plain(values[h.name]) for h in rule.hypers})
        if values.get("bf16_stochastic_round") is False:
            del values["bf16_stochastic_round"]  # off: defaults stay torch's
        Optimizer.__init__(self, params, values)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{rule.name}.__init__"
    twin = f"``torch.optim.{rule.name}``" if rule.in_torch else "(no torch.optim twin)"
    doc = (f"{rule.name} {twin} on fastopt's fused kernels: {rule.update}\n\n"
           f"Constructed like torch's: {signature}.\n"
           f"Reference: {rule.paper}.")
    return type(rule.name, (Optimizer,), {"rule": rule, "__init__": __init__,
                                          "__doc__": doc, "__module__": __name__})


OPTIMIZERS = {name: _make_class(rule) for name, rule in RULES.items()}
globals().update(OPTIMIZERS)
EIGHT_BIT = {c.__name__: c for c in (Adam8bit, AdamW8bit, Lion8bit, SGD8bit, RMSprop8bit,
                                    Adagrad8bit)}
__all__ = ["Optimizer", "LBFGS", *OPTIMIZERS, *EIGHT_BIT, "AdamWScheduleFree",
           "SGDScheduleFree", "SparseAdam", "Muon", "Adafactor"]
