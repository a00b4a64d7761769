"""Everyday torch idioms around an optimizer, run with torch.optim and fastopt.torch.

Each idiom is ordinary user code (freezing a layer, pruning as 3D Gaussian splatting
does, Hogwild, a GradScaler, ``p.grad.data = ...``): one function in the table
``IDIOMS`` that takes the optimizer factory ``O`` and returns what a user would look
at afterwards (parameters, losses, optimizer state). It runs twice in this process,
from the same seed and data, once with ``torch.optim.<Rule>`` and once with
``fastopt.torch.<Rule>``; the two results must agree (see ``_idioms.compare``):
the same numbers, the same exception type where torch raises, never a crash. The
idioms that move storage under the optimizer (share_memory, ForkingPickler,
Hogwild) run in a child process, so that a crash is reported as a failure of that
idiom only.

Every case prints one line, its failure message starts with the same: the verdict,
the largest |Δ| over all compared tensors and the first difference. ``COLUMNS=250
pytest -rA`` lists them all. ``test_idiom_tells_a_skewed_optimizer_from_torch``
checks the suite itself: each idiom about steps must tell torch's optimizer from
one whose lr is 1e-9 off.
"""

from __future__ import annotations

import copy
import io
import math
import multiprocessing
import os
import pickle
import signal
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch", reason="the idiom suite compares with torch.optim")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _idioms import (AtMost, Lib, compare, describe, guarded, libs,  # noqa: E402
                     preload_fork_server, run, run_forked)
from fastopt.rules import RULES  # noqa: E402

preload_fork_server(__name__)

F64, F32 = torch.float64, torch.float32

# a transposed weight gets a gradient of the other layout, as the idiom intends
pytestmark = [
    pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout"),
    # torch's Adagrad builds sparse tensors without its invariant checks
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
]

# every rule with a torch.optim twin; the common five where an idiom is about the
# protocol rather than the math
ALL = tuple(name for name, rule in RULES.items() if rule.in_torch)
CORE = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop")

# Hyperparameters that use every buffer and move the weights visibly within a few
# steps (a missed update changes the result by far more than any tolerance)
HP = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adagrad": dict(lr=0.05, lr_decay=1e-2, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-2),
    "Adadelta": dict(lr=1.0, weight_decay=1e-2),
    "Adamax": dict(lr=1e-2, weight_decay=1e-2),
    "NAdam": dict(lr=1e-2, weight_decay=1e-2),
    "RAdam": dict(lr=1e-2, weight_decay=1e-2),
    "ASGD": dict(lr=1e-2, t0=2.0, weight_decay=1e-2),
    "Rprop": dict(lr=1e-2),
    "LBFGS": dict(lr=0.5, max_iter=4, history_size=3),
}

IDIOMS: dict = {}   # name -> (function, rules, dtypes, forked, rules where torch raises)


def idiom(rules=CORE, dtypes=(F64,), forked=False, torch_raises=(), rtol=None):
    """Register an idiom. ``forked``: fastopt's run goes to a child process (True),
    or both runs do ("both"). ``torch_raises``: the rules for which torch.optim raises
    somewhere in the idiom (True: all); anywhere else an exception with torch is a
    bug of the idiom and fails it. ``rtol``: tolerances per dtype, where the
    defaults of ``_idioms.RTOL`` do not fit."""
    def register(fn):
        raises = tuple(rules) if torch_raises is True else tuple(torch_raises)
        IDIOMS[fn.__name__] = (fn, tuple(rules), tuple(dtypes), forked, raises, rtol)
        return fn
    return register


# ---------------------------------------------------------------------------
# Models, data, training
# ---------------------------------------------------------------------------

class Net(nn.Module):
    """8 -> 32 -> 32 -> 4 (1,476 parameters); ``mid`` is square."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class ConvNet(nn.Module):
    """3x8x8 images -> 4 classes (1,000 parameters)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        return self.head(x.mean(dim=(2, 3)))


def make(O, cls=Net, seed=0):
    torch.manual_seed(seed)
    return cls().to(O.dtype)


def dtype_of(model):
    return next(model.parameters()).dtype


def batch(i, dtype, shape=(16, 8), classes=4):
    """Step i's mini-batch, from its own generator (independent of the global seed)."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (shape[0],), generator=g)
    return x, y


def loss_of(model, i):
    dtype = dtype_of(model)
    if isinstance(model, ConvNet):
        x, y = batch(i, dtype, shape=(4, 3, 8, 8))
        if model.c1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.to(memory_format=torch.channels_last)
    else:
        x, y = batch(i, dtype)
    return F.cross_entropy(model(x), y)


def train(model, opt, steps, start=0, before_step=None, zero=None):
    losses = []
    for i in range(start, start + steps):
        if zero is None:
            opt.zero_grad()
        else:
            zero(opt)
        loss = loss_of(model, i)
        loss.backward()
        if before_step is not None:
            before_step(i)
        opt.step()
        losses.append(loss.detach().clone())
    return losses


def state_values(opt):
    """The optimizer's state_dict()['state'] (the dtype of scalar state such as
    'step' is compared in its own idiom, its value in every one)."""
    return {k: dict(st) for k, st in opt.state_dict()["state"].items()}


def finish(model, opt, losses=(), **extra):
    return dict(params=dict(model.named_parameters()), losses=list(losses),
                state=guarded(lambda: state_values(opt)), **extra)


def channels_last_flags(model):
    return [p.is_contiguous(memory_format=torch.channels_last)
            for p in model.parameters() if p.dim() == 4]


# ---------------------------------------------------------------------------
# Idioms the issue lists: storage moved under the optimizer (crashes, run forked)
# ---------------------------------------------------------------------------

@idiom(forked=True)
def share_memory_after_steps(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.share_memory()
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom(forked=True)
def forking_pickler_state_dict(O):
    # what torch.multiprocessing.Queue.put(model.state_dict()) does
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 -- registers torch's reductions
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    blob = ForkingPickler.dumps(model.state_dict())
    losses += train(model, opt, 3, start=2)
    del blob
    return finish(model, opt, losses)


def _hogwild_worker(model, O, start):
    torch.set_num_threads(1)
    opt = O(model.parameters())
    train(model, opt, 3, start=start)


# both runs forked: workers forked from this process, whose BLAS threads have run,
# would hang in their first float64 matmul
@idiom(forked="both")
def hogwild_forked_workers(O):
    # torch's Hogwild example: shared weights, each worker builds its own optimizer;
    # the workers run one after the other here so that the result is deterministic
    model = make(O)
    model.share_memory()
    ctx = multiprocessing.get_context("fork")
    for start in (0, 3):
        worker = ctx.Process(target=_hogwild_worker, args=(model, O, start))
        worker.start()
        worker.join(30)
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()
            raise TimeoutError("a Hogwild worker hung")
        if worker.exitcode != 0:
            code = worker.exitcode
            why = signal.Signals(-code).name if code < 0 else f"exit code {code}"
            raise ChildProcessError(f"a Hogwild worker died: {why}")
    return dict(params=dict(model.named_parameters()))


# ---------------------------------------------------------------------------
# Idioms the issue lists: silent differences
# ---------------------------------------------------------------------------

@idiom(dtypes=(F64, F32))
def half_then_back_mid_run(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.half()
    model.to(O.dtype)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom(dtypes=(F64, F32))
def channels_last_mid_run(O):
    model = make(O, ConvNet)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.to(memory_format=torch.channels_last)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses, channels_last=channels_last_flags(model))


@idiom(dtypes=(F64, F32))
def grad_data_clamp(O):
    model = make(O)
    opt = O(model.parameters())

    def clamp(i):
        for p in model.parameters():
            p.grad.data = p.grad.data.clamp(-0.01, 0.01)
    losses = train(model, opt, 4, before_step=clamp)
    return finish(model, opt, losses)


def lbfgs_run(O, between, steps=2, **kw):
    model = make(O)
    opt = O.cls("LBFGS")(model.parameters(), **{**HP["LBFGS"], **kw})
    losses = []
    for k in range(2):
        for i in range(steps):
            def closure(i=i + 2 * k):
                opt.zero_grad()
                loss = loss_of(model, i)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        if k == 0:
            between(model)
    return lbfgs_finish(model, opt, losses)


def lbfgs_finish(model, opt, losses):
    out = finish(model, opt, losses)
    if isinstance(out["state"], dict):
        for st in out["state"].values():
            st.pop("al", None)   # torch's scratch list of the two-loop recursion
            if isinstance(st.get("prev_loss"), float):   # the loss's dtype's tolerance
                st["prev_loss"] = torch.tensor(st["prev_loss"], dtype=dtype_of(model))
    return out


# L-BFGS divides by curvature pairs (y·s): in float32 the last-bit differences of the
# gradients grow about tenfold over its inner iterations
LBFGS_RTOL = {"torch.float32": 1e-4}


@idiom(rules=("LBFGS",), rtol=LBFGS_RTOL)
def lbfgs_after_vector_to_parameters(O):
    def rescale(model):
        vec = nn.utils.parameters_to_vector(model.parameters())
        nn.utils.vector_to_parameters(vec * 0.9, model.parameters())
    return lbfgs_run(O, rescale)


@idiom(rules=("LBFGS",), rtol=LBFGS_RTOL)
def lbfgs_after_float_double(O):
    return lbfgs_run(O, lambda model: model.float().double())


@idiom(rules=("LBFGS",), rtol=LBFGS_RTOL)
def lbfgs_strong_wolfe_after_vector_to_parameters(O):
    def rescale(model):
        vec = nn.utils.parameters_to_vector(model.parameters())
        nn.utils.vector_to_parameters(vec * 0.9, model.parameters())
    return lbfgs_run(O, rescale, line_search_fn="strong_wolfe")


@idiom(torch_raises=True)  # state_dict(): KeyError for the popped group's state
def param_groups_pop_first(O):
    model = make(O)
    opt = O([{"params": model.inp.parameters()},
             {"params": list(model.mid.parameters()) + list(model.head.parameters())}])
    losses = train(model, opt, 2)
    opt.param_groups.pop(0)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def param_group_params_extend(O):
    model = make(O)
    opt = O(list(model.inp.parameters()) + list(model.mid.parameters()))
    losses = train(model, opt, 2)
    opt.param_groups[0]["params"].extend(model.head.parameters())
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def state_reset_with_defaultdict(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    opt.state = defaultdict(dict)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def state_zeroed_in_place(O):
    # step counter and moments zeroed in place ("st['step'].zero_()")
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 3)
    with torch.no_grad():
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
    losses += train(model, opt, 3, start=3)
    return finish(model, opt, losses)


@idiom()
def state_dict_kept_without_copy_and_reloaded(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    sd = opt.state_dict()
    losses += train(model, opt, 2, start=2)
    opt.load_state_dict(sd)
    losses += train(model, opt, 2, start=4)
    return finish(model, opt, losses)


@idiom(dtypes=(F64, F32))
def freeze_after_construction_default_zero_grad(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 1)
    model.inp.requires_grad_(False)
    losses += train(model, opt, 3, start=1)
    return finish(model, opt, losses)


class TwoHeads(Net):
    def __init__(self):
        super().__init__()
        self.other = nn.Linear(32, 4)
        self.use_other = False

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return (self.other if self.use_other else self.head)(h)


@idiom()
def grads_on_some_steps_only(O):
    model = make(O, TwoHeads)
    opt = O(model.parameters())
    losses = []
    for i in range(5):
        model.use_other = i % 2 == 1
        losses += train(model, opt, 1, start=i)
    return finish(model, opt, losses)


@idiom()
def param_is_view_of_a_tensor(O):
    torch.manual_seed(0)
    base = torch.randn(400, dtype=O.dtype) * 0.3
    w = nn.Parameter(base[:320].view(32, 10))     # shares base's storage
    head = nn.Linear(32, 4).to(O.dtype)
    opt = O([w] + list(head.parameters()))
    losses = []
    for i in range(4):
        opt.zero_grad()
        x, y = batch(i, O.dtype, shape=(16, 10))
        loss = F.cross_entropy(head(torch.tanh(x @ w.t())), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return dict(base=base, w=w, head=list(head.parameters()), losses=losses)


@idiom()
def model_state_dict_taken_before_optimizer(O):
    model = make(O)
    msd = model.state_dict()          # tensors share the parameters' storage
    opt = O(model.parameters())
    losses = train(model, opt, 3)
    return finish(model, opt, losses, model_state_dict=msd)


@idiom()
def grads_swapped(O):
    model = make(O)
    opt = O(model.parameters())
    a, b = model.inp.bias, model.mid.bias

    def swap(i):
        a.grad, b.grad = b.grad, a.grad
    losses = train(model, opt, 4, before_step=swap)
    return finish(model, opt, losses)


@idiom()
def data_swapped(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    a, b = model.inp.bias, model.mid.bias
    a.data, b.data = b.data, a.data
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def square_weight_data_transposed(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.mid.weight.data = model.mid.weight.data.t()
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


# ---------------------------------------------------------------------------
# Idioms the issue lists: errors where torch works, sparse gradients
# ---------------------------------------------------------------------------

class Bag(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=sparse)
        self.head = nn.Linear(6, 4)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(dim=1))


def sparse_run(O, opt_of):
    model = make(O, Bag)
    opt = opt_of(model)
    losses = []
    for i in range(4):
        opt.zero_grad()
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 10, (8, 3), generator=g)   # rows 10.. never used
        y = torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(model(idx), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses)


@idiom(rules=("SGD",), dtypes=(F64, F32))
def sparse_embedding_sgd(O):
    return sparse_run(O, lambda m: O(m.parameters(), momentum=0.0, weight_decay=0.0))


@idiom(rules=("SGD",))
def sparse_embedding_sgd_momentum(O):
    return sparse_run(O, lambda m: O(m.parameters(), momentum=0.9, weight_decay=0.0))


@idiom(rules=("SGD",), torch_raises=True)
def sparse_embedding_sgd_weight_decay(O):
    # torch: add(sparse, dense) is not supported -> RuntimeError
    return sparse_run(O, lambda m: O(m.parameters(), momentum=0.9, weight_decay=1e-2))


@idiom(rules=("Adagrad",), dtypes=(F64, F32))
def sparse_embedding_adagrad(O):
    return sparse_run(O, lambda m: O(m.parameters(), lr_decay=1e-2, weight_decay=0.0))


@idiom(rules=tuple(r for r in ALL if r not in ("SGD", "Adagrad")), torch_raises=True)
def sparse_embedding_rejected(O):
    return sparse_run(O, lambda m: O(m.parameters()))


def _masked(t, keep):
    return t[keep] if t.dim() > 0 else t


@idiom()
def prune_like_gaussian_splatting(O):
    # 3DGS: points are Parameters of shape (N, k); pruning replaces each by a shorter
    # one and moves its optimizer state over, masked the same way
    torch.manual_seed(0)
    pts = nn.Parameter(torch.randn(40, 3, dtype=O.dtype))
    col = nn.Parameter(torch.randn(40, 4, dtype=O.dtype))
    opt = O([{"params": [pts], "name": "xyz"}, {"params": [col], "name": "color"}])
    target = torch.randn(40, 7, dtype=O.dtype)

    def step(i, n):
        opt.zero_grad()
        loss = ((torch.cat([pts, col], dim=1) - target[:n]) ** 2).sum() * (1 + 0.1 * i)
        loss.backward()
        opt.step()
        return loss.detach().clone()
    losses = [step(i, 40) for i in range(3)]
    keep = torch.arange(40) % 3 != 0
    for group in opt.param_groups:
        old = group["params"][0]
        st = opt.state.get(old, None)
        new = nn.Parameter(old.detach()[keep].requires_grad_(True))
        if st is not None:
            del opt.state[old]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.shape == old.shape:
                    st[k] = _masked(v, keep)
            opt.state[new] = st
        group["params"][0] = new
    pts, col = (g["params"][0] for g in opt.param_groups)
    target = target[keep]
    n = int(keep.sum())
    losses += [step(i, n) for i in range(3, 6)]
    return dict(pts=pts, col=col, losses=losses, state=guarded(lambda: state_values(opt)))


@idiom()
def lookahead_slow_buffer_in_state(O):
    # Lookahead (Zhang et al. 2019) as wrappers write it: slow weights kept in the
    # inner optimizer's state (added after the inner optimizer's first step, which
    # initialises its state when it finds none), pulled towards the fast weights
    # every 2 steps
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 1)
    for p in model.parameters():
        opt.state[p]["slow_buffer"] = p.detach().clone()
    for i in range(1, 6):
        losses += train(model, opt, 1, start=i)
        if i % 2 == 0:
            with torch.no_grad():
                for p in model.parameters():
                    slow = opt.state[p]["slow_buffer"]
                    slow.add_(p - slow, alpha=0.5)
                    p.copy_(slow)
    return finish(model, opt, losses)


@idiom()
def state_of_an_unknown_param(O):
    model = make(O)
    opt = O(model.inp.parameters())
    losses = train(model, opt, 2)
    stranger = model.head.weight
    seen = opt.state[stranger]
    return dict(seen=dict(seen), is_dict=isinstance(seen, dict),
                params=dict(model.named_parameters()), losses=losses)


@idiom()
def negative_lr_mid_run(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    opt.param_groups[0]["lr"] = -1e-3
    losses += train(model, opt, 2, start=2)
    return finish(model, opt, losses)


# ---------------------------------------------------------------------------
# Idioms the issue lists: costs
# ---------------------------------------------------------------------------

def saved_size(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


@idiom()
def saved_head_state_dict_size(O):
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    return dict(size=AtMost(saved_size(model.head.state_dict()), 0.05))


@idiom(dtypes=(F64, F32))
def channels_last_weights_stay_channels_last(O):
    model = make(O, ConvNet).to(memory_format=torch.channels_last)
    before = channels_last_flags(model)
    opt = O(model.parameters())
    after_build = channels_last_flags(model)
    losses = train(model, opt, 3)
    return finish(model, opt, losses, before=before, after_build=after_build,
                  after_steps=channels_last_flags(model))


# ---------------------------------------------------------------------------
# Training loops as scripts write them
# ---------------------------------------------------------------------------

@idiom(rules=ALL, dtypes=(F64, F32))
def plain_training_loop(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 5)
    return finish(model, opt, losses)


@idiom(rules=ALL)
def state_dict_structure(O):
    # keys, dtypes and shapes of torch's state_dict, 'step' included
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    state = {k: {n: (str(v.dtype), list(v.shape)) if isinstance(v, torch.Tensor) else v
                 for n, v in st.items()} for k, st in sd["state"].items()}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return dict(state=state, groups=groups)


@idiom(dtypes=(F64, F32))
def zero_grad_set_to_none_false(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 4, zero=lambda o: o.zero_grad(set_to_none=False))
    return finish(model, opt, losses, grads=[p.grad for p in model.parameters()])


@idiom()
def zero_grad_set_to_none_true(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 3, zero=lambda o: o.zero_grad(set_to_none=True))
    opt.zero_grad(set_to_none=True)
    return finish(model, opt, losses, grads_none=[p.grad is None for p in model.parameters()])


@idiom()
def model_zero_grad_instead_of_optimizer(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 4, zero=lambda o: model.zero_grad())
    return finish(model, opt, losses)


@idiom()
def grads_set_to_none_by_hand(O):
    model = make(O)
    opt = O(model.parameters())

    def zero(o):
        for p in model.parameters():
            p.grad = None
    losses = train(model, opt, 4, zero=zero)
    return finish(model, opt, losses)


@idiom()
def grads_zeroed_in_place_by_hand(O):
    model = make(O)
    opt = O(model.parameters())

    def zero(o):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
    losses = train(model, opt, 4, zero=zero)
    return finish(model, opt, losses)


@idiom()
def step_before_any_backward(O):
    model = make(O)
    opt = O(model.parameters())
    opt.step()
    opt.zero_grad()
    losses = train(model, opt, 3)
    return finish(model, opt, losses)


@idiom(dtypes=(F64, F32))
def gradient_accumulation(O):
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(3):
        for micro in range(2):
            loss = loss_of(model, 2 * i + micro) / 2
            loss.backward()
            losses.append(loss.detach().clone())
        opt.step()
        opt.zero_grad()
    return finish(model, opt, losses)


@idiom(dtypes=(F64, F32))
def clip_grad_norm(O):
    model = make(O)
    opt = O(model.parameters())
    norms = []

    def clip(i):
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05))
    losses = train(model, opt, 4, before_step=clip)
    return finish(model, opt, losses, norms=norms)


@idiom()
def clip_grad_value(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 4,
                   before_step=lambda i: nn.utils.clip_grad_value_(model.parameters(), 0.02))
    return finish(model, opt, losses)


@idiom()
def grads_scaled_in_place(O):
    model = make(O)
    opt = O(model.parameters())

    def scale(i):
        for p in model.parameters():
            p.grad.mul_(0.5).add_(0.01)
    losses = train(model, opt, 4, before_step=scale)
    return finish(model, opt, losses)


@idiom()
def grads_assigned_from_autograd_grad(O):
    # meta-learning and RL code: gradients computed with autograd.grad, then assigned
    model = make(O)
    opt = O(model.parameters())
    params = list(model.parameters())
    losses = []
    for i in range(4):
        loss = loss_of(model, i)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g * 0.5
        opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses)


@idiom()
def grad_reference_kept_across_steps(O):
    # code that keeps p.grad objects (gradient statistics, custom all-reduce) and
    # edits them in place: with zero_grad(set_to_none=False) they stay the grads
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 1)
    kept = [p.grad for p in model.parameters()]
    for i in range(1, 4):
        opt.zero_grad(set_to_none=False)
        loss = loss_of(model, i)
        loss.backward()
        for g in kept:
            g.mul_(0.5)
        opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses, same=[p.grad is g for p, g in
                                             zip(model.parameters(), kept)])


@idiom()
def param_data_reference_kept(O):
    # p.data / p.detach() taken before the optimizer was built share the storage
    model = make(O)
    datas = [p.data for p in model.parameters()]
    detached = [p.detach() for p in model.parameters()]
    opt = O(model.parameters())
    losses = train(model, opt, 3)
    return finish(model, opt, losses, datas=datas, detached=detached)


@idiom()
def weights_clamped_in_place(O):
    # WGAN's weight clipping after every step
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.15, 0.15)
    return finish(model, opt, losses)


@idiom()
def weights_edited_with_data(O):
    # older code edits .data in place (weight noise, renormalisation)
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        w = model.mid.weight
        w.data.div_(w.data.norm(dim=1, keepdim=True).clamp(min=1.0))
        model.head.bias.data.fill_(0.0)
    return finish(model, opt, losses)


@idiom()
def weights_reinitialised_after_construction(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    torch.manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def model_load_state_dict_after_construction(O):
    # pretrained weights loaded after the optimizer was built: copied in place
    model = make(O)
    opt = O(model.parameters())
    pretrained = make(O, seed=3).state_dict()
    model.load_state_dict(pretrained)
    losses = train(model, opt, 3)
    return finish(model, opt, losses)


@idiom()
def vector_to_parameters_mid_run(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    vec = nn.utils.parameters_to_vector(model.parameters())
    nn.utils.vector_to_parameters(vec * 0.9, model.parameters())
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


# torch: Adam's lerp and RMSprop's addcmul refuse float32 state with float64 grads
@idiom(dtypes=(F32,), torch_raises=("Adam", "AdamW", "RMSprop"))
def model_double_mid_run(O):
    # a float32 model moved to float64 after a few steps
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.double()
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def model_to_same_dtype_mid_run(O):
    # a no-op .to() keeps the tensors
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.to(O.dtype)
    model.to("cpu")
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


class Dropper(Net):
    def forward(self, x):
        h = F.dropout(torch.tanh(self.inp(x)), p=0.3, training=True)
        return self.head(torch.tanh(self.mid(h)))


@idiom()
def dropout_model(O):
    # the optimizer must not draw from the global generator dropout uses
    model = make(O, Dropper)
    opt = O(model.parameters())
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


class Tied(nn.Module):
    """An embedding tied to the output layer, as language models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mix(self.emb(idx))))


@idiom()
def tied_weights(O):
    model = make(O, Tied)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        opt.zero_grad()
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 12, (10,), generator=g)
        loss = F.cross_entropy(model(idx), torch.roll(idx, 1))
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses, tied=model.out.weight is model.emb.weight)


class WithScalar(Net):
    """CLIP's learnable temperature: a 0-dim parameter clamped after each step."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x):
        return super().forward(x) * self.logit_scale.exp() / 10


@idiom()
def scalar_parameter_clamped(O):
    model = make(O, WithScalar)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        model.logit_scale.data.clamp_(0, 2.6)
    return finish(model, opt, losses)


@idiom()
def non_contiguous_and_empty_params(O):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 8, dtype=O.dtype).t() * 0.3)  # stride (1, 8)
    e = nn.Parameter(torch.empty(0, dtype=O.dtype))
    head = nn.Linear(32, 4).to(O.dtype)
    opt = O([w, e] + list(head.parameters()))
    losses = []
    for i in range(4):
        opt.zero_grad()
        x, y = batch(i, O.dtype)
        loss = F.cross_entropy(head(torch.tanh(x @ w)), y) + e.sum()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return dict(w=w, e=e, head=list(head.parameters()), losses=losses,
                stride=list(w.stride()), state=guarded(lambda: state_values(opt)))


@idiom()
def nan_in_a_gradient(O):
    model = make(O)
    opt = O(model.parameters())

    def poison(i):
        if i == 1:
            model.head.bias.grad[0] = float("nan")
    losses = train(model, opt, 3, before_step=poison)
    return finish(model, opt, losses)


@idiom()
def maximize(O):
    model = make(O)
    opt = O(model.parameters(), maximize=True)
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom()
def zero_lr_group(O):
    model = make(O)
    opt = O([{"params": model.inp.parameters(), "lr": 0.0},
             {"params": list(model.mid.parameters()) + list(model.head.parameters())}])
    losses = train(model, opt, 3)
    return finish(model, opt, losses)


@idiom()
def no_decay_groups_for_biases(O):
    # the transformer recipe: no weight decay on biases and norms, per-group lr
    model = make(O)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = O([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}])
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom()
def mixed_float32_float64_groups(O):
    torch.manual_seed(0)
    a = Net().float()
    b = Net().double()
    opt = O([{"params": a.parameters()}, {"params": b.parameters(), "lr": 5e-3}])
    losses = []
    for i in range(4):
        opt.zero_grad()
        loss = loss_of(a, i) + loss_of(b, i).float()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return dict(a=dict(a.named_parameters()), b=dict(b.named_parameters()),
                losses=losses, state=guarded(lambda: state_values(opt)))


@idiom()
def mixed_dtypes_in_one_group(O):
    torch.manual_seed(0)
    a = Net().float()
    b = Net().double()
    opt = O(list(a.parameters()) + list(b.parameters()))
    losses = []
    for i in range(4):
        opt.zero_grad()
        loss = loss_of(a, i) + loss_of(b, i).float()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return dict(a=dict(a.named_parameters()), b=dict(b.named_parameters()),
                losses=losses, state=guarded(lambda: state_values(opt)))


@idiom()
def frozen_layer_passed_to_the_optimizer(O):
    model = make(O)
    model.inp.requires_grad_(False)
    opt = O(model.parameters())
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom()
def frozen_layer_filtered_out(O):
    model = make(O)
    model.inp.requires_grad_(False)
    opt = O(filter(lambda p: p.requires_grad, model.parameters()))
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom()
def partial_fine_tuning_switched_mid_run(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    losses += train(model, opt, 2, start=2)
    model.requires_grad_(True)
    losses += train(model, opt, 2, start=4)
    return finish(model, opt, losses)


@idiom()
def add_param_group_mid_run(O):
    model = make(O)
    opt = O(list(model.inp.parameters()) + list(model.mid.parameters()))
    losses = train(model, opt, 2)
    opt.add_param_group({"params": model.head.parameters(), "lr": 2e-3})
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def head_replaced_mid_run(O):
    # fine-tuning: a new head, added to the optimizer; the old one stays in it gradless
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    torch.manual_seed(5)
    model.head = nn.Linear(32, 4).to(O.dtype)
    opt.add_param_group({"params": model.head.parameters()})
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def two_optimizers_like_a_gan(O):
    model = make(O)
    body = O(list(model.inp.parameters()) + list(model.mid.parameters()))
    head = O(model.head.parameters())
    losses = []
    for i in range(4):
        body.zero_grad()
        head.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        (body if i % 2 == 0 else head).step()
        losses.append(loss.detach().clone())
    return dict(params=dict(model.named_parameters()), losses=losses,
                state=[guarded(lambda: state_values(body)),
                       guarded(lambda: state_values(head))])


@idiom()
def ema_teacher_deep_copied_from_the_student(O):
    # DINO/BYOL/mean teacher: a deepcopy of the model, updated as an EMA
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 1)
    teacher = copy.deepcopy(model)
    for i in range(1, 4):
        losses += train(model, opt, 1, start=i)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), model.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)
    return finish(model, opt, losses, teacher=dict(teacher.named_parameters()))


@idiom()
def optimizer_in_backward_hooks(O):
    # torch's recipe "optimizer step in the backward pass": one optimizer per
    # parameter, stepped from a post-accumulate-grad hook
    model = make(O)
    opts = {p: O([p]) for p in model.parameters()}

    def hook(p):
        opts[p].step()
        opts[p].zero_grad()
    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    losses = []
    for i in range(4):
        loss = loss_of(model, i)
        loss.backward()
        losses.append(loss.detach().clone())
    for h in handles:
        h.remove()
    return dict(params=dict(model.named_parameters()), losses=losses)


@idiom()
def step_pre_and_post_hooks(O):
    model = make(O)
    opt = O(model.parameters())
    calls = []

    def pre(o, args, kwargs):
        calls.append("pre")
        for g in o.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(0.5)

    def post(o, args, kwargs):
        calls.append("post")
    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    losses = train(model, opt, 3)
    return finish(model, opt, losses, calls=calls)


@idiom()
def state_dict_hooks(O):
    model = make(O)
    opt = O(model.parameters())
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(extra=1) or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: sd.pop("extra", None) and sd)
    losses = train(model, opt, 2)
    sd = opt.state_dict()
    extra = sd.get("extra")
    opt.load_state_dict(copy.deepcopy(sd))
    losses += train(model, opt, 2, start=2)
    return finish(model, opt, losses, extra=extra)


@idiom()
def weight_norm_parametrization(O):
    model = make(O)
    nn.utils.parametrizations.weight_norm(model.mid)
    opt = O(model.parameters())
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom()
def closure_returns_the_loss(O):
    model = make(O)
    opt = O(model.parameters())
    returned = []
    for i in range(4):
        def closure(i=i):
            opt.zero_grad()
            loss = loss_of(model, i)
            loss.backward()
            return loss
        returned.append(opt.step(closure))
    return finish(model, opt, returned)


@idiom(rules=("LBFGS",), dtypes=(F64, F32), rtol=LBFGS_RTOL)
def lbfgs_training(O):
    return lbfgs_run(O, lambda model: None)


@idiom(rules=("LBFGS",), rtol=LBFGS_RTOL)
def lbfgs_strong_wolfe_training(O):
    return lbfgs_run(O, lambda model: None, line_search_fn="strong_wolfe")


@idiom(rules=("LBFGS",), rtol=LBFGS_RTOL)
def lbfgs_state_dict_round_trip(O):
    model = make(O)
    opt = O.cls("LBFGS")(model.parameters(), **HP["LBFGS"])

    def closure(i):
        def c():
            opt.zero_grad()
            loss = loss_of(model, i)
            loss.backward()
            return loss
        return c
    losses = [opt.step(closure(i)) for i in range(2)]
    sd = copy.deepcopy(opt.state_dict())
    opt = O.cls("LBFGS")(model.parameters(), **HP["LBFGS"])
    opt.load_state_dict(sd)
    losses += [opt.step(closure(i)) for i in range(2, 4)]
    return lbfgs_finish(model, opt, losses)


# ---------------------------------------------------------------------------
# Hyperparameters changed by hand or by a scheduler
# ---------------------------------------------------------------------------

@idiom()
def lr_decayed_by_hand(O):
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        for g in opt.param_groups:
            g["lr"] *= 0.5
    return finish(model, opt, losses)


@idiom()
def hyperparameters_changed_mid_run(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    g = opt.param_groups[0]
    g["weight_decay"] = 0.05
    if "betas" in g:
        g["betas"] = (0.8, 0.99)
    if "momentum" in g:
        g["momentum"] = 0.7
    if "eps" in g:
        g["eps"] = 1e-6
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom(rules=("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"))
def tensor_lr(O):
    model = make(O)
    # of the parameters' dtype: a float32 lr makes torch compute the step size in
    # float32, which is not what this idiom is about
    opt = O(model.parameters(), lr=torch.tensor(0.01, dtype=O.dtype))
    losses = train(model, opt, 2)
    opt.param_groups[0]["lr"].fill_(0.003)   # changed in place, as compiled loops do
    losses += train(model, opt, 2, start=2)
    return finish(model, opt, losses)


def scheduled(O, make_sched, steps=5, metric=False):
    model = make(O)
    opt = O(model.parameters())
    sched = make_sched(opt)
    losses, lrs = [], []
    for i in range(steps):
        losses += train(model, opt, 1, start=i)
        sched.step(losses[-1].item()) if metric else sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return finish(model, opt, losses, lrs=lrs)


@idiom()
def step_lr_scheduler(O):
    return scheduled(O, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3))


@idiom()
def warmup_then_cosine(O):
    def sched(o):
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[2])
    return scheduled(O, sched, steps=6)


@idiom(torch_raises=("Adagrad",))  # Adagrad has neither momentum nor betas to cycle
def one_cycle_lr(O):
    return scheduled(O, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.02, total_steps=6), steps=5)


@idiom()
def reduce_lr_on_plateau(O):
    return scheduled(O, lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, patience=0, factor=0.5, threshold=10.0), metric=True)


@idiom()
def lambda_lr(O):
    return scheduled(O, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)))


@idiom()
def swa_with_swalr(O):
    from torch.optim.swa_utils import SWALR, AveragedModel
    model = make(O)
    opt = O(model.parameters())
    swa = AveragedModel(model)
    sched = SWALR(opt, swa_lr=0.005, anneal_epochs=2)
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        swa.update_parameters(model)
        sched.step()
    return finish(model, opt, losses, swa=dict(swa.module.named_parameters()))


@idiom()
def grad_scaler_with_a_skipped_step(O):
    model = make(O)
    opt = O(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    losses, scales = [], []
    for i in range(5):
        opt.zero_grad()
        loss = loss_of(model, i)
        scaler.scale(loss).backward()
        if i == 2:
            model.mid.weight.grad[0, 0] = float("inf")   # an overflow: step skipped
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().clone())
        scales.append(scaler.get_scale())
    return finish(model, opt, losses, scales=scales)


@idiom()
def grad_scaler_unscale_then_clip(O):
    # torch's AMP recipe for clipping: unscale_, clip, step
    model = make(O)
    opt = O(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    for i in range(4):
        opt.zero_grad()
        loss = loss_of(model, i)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses)


# ---------------------------------------------------------------------------
# Checkpoints, copies, state edits
# ---------------------------------------------------------------------------

@idiom(dtypes=(F64, F32))
def checkpoint_resume_through_torch_save(O):
    model = make(O)
    opt = O(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    losses = []
    for i in range(2):
        losses += train(model, opt, 1, start=i)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = make(O, seed=9)
    model.load_state_dict(ckpt["model"])
    opt = O(model.parameters())
    opt.load_state_dict(ckpt["opt"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    sched.load_state_dict(ckpt["sched"])
    for i in range(2, 5):
        losses += train(model, opt, 1, start=i)
        sched.step()
    return finish(model, opt, losses)


@idiom()
def state_dict_through_torch_and_back(O):
    # fastopt -> torch.optim -> fastopt (torch's own run: torch all the way)
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    other = torch.optim.__dict__[O.rule](model.parameters(), **HP[O.rule])
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    losses += train(model, other, 2, start=2)
    opt = O(model.parameters())
    opt.load_state_dict(copy.deepcopy(other.state_dict()))
    losses += train(model, opt, 2, start=4)
    return finish(model, opt, losses)


@idiom()
def load_state_dict_made_by_torch(O):
    model = make(O)
    made = torch.optim.__dict__[O.rule](model.parameters(), **HP[O.rule])
    losses = train(model, made, 2)
    opt = O(model.parameters())
    opt.load_state_dict(made.state_dict())
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def load_state_dict_with_changed_lr(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 1e-3
    opt.load_state_dict(sd)
    losses += train(model, opt, 2, start=2)
    return finish(model, opt, losses, lr=opt.param_groups[0]["lr"])


@idiom()
def self_reload_every_step(O):
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        losses += train(model, opt, 1, start=i)
        opt.load_state_dict(opt.state_dict())
    return finish(model, opt, losses)


@idiom()
def saved_optimizer_state_dict_size(O):
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    return dict(size=AtMost(saved_size(opt.state_dict()), 0.05))


@idiom()
def saved_model_state_dict_size(O):
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    return dict(size=AtMost(saved_size(model.state_dict()), 0.05),
                mid=AtMost(saved_size(model.mid.weight), 0.05))


@idiom()
def optimizer_deepcopied(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    twin = copy.deepcopy(opt)
    twin.step()     # steps the copied parameters with the copied gradients
    losses += train(model, opt, 2, start=2)
    copied = [p for g in twin.param_groups for p in g["params"]]
    return finish(model, opt, losses, copied=copied,
                  twin_state=guarded(lambda: state_values(twin)))


@idiom()
def optimizer_pickled(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    back = pickle.loads(pickle.dumps(opt))
    back.step()
    losses += train(model, opt, 2, start=2)
    copied = [p for g in back.param_groups for p in g["params"]]
    return finish(model, opt, losses, copied=copied,
                  back_state=guarded(lambda: state_values(back)))


@idiom()
def state_of_one_param_deleted(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    del opt.state[model.mid.weight]
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def state_tensor_replaced(O):
    # a state buffer replaced by a new tensor (not edited in place)
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    st = opt.state[model.mid.weight]
    for k, v in list(st.items()):
        if isinstance(v, torch.Tensor) and v.shape == model.mid.weight.shape:
            st[k] = v * 0.5
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def state_memory_counted(O):
    # what memory reports do: iterate opt.state and count the buffers' elements
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    count = sum(v.numel() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    per_param = [sorted(opt.state[p]) for p in model.parameters()]
    return dict(count=count, per_param=per_param, n=len(opt.state))


@idiom()
def named_parameters_given_to_the_optimizer(O):
    model = make(O)
    opt = O(model.named_parameters())
    losses = train(model, opt, 2)
    names = opt.state_dict()["param_groups"][0].get("param_names")
    return finish(model, opt, losses, names=names)


@idiom()
def load_state_dict_from_an_older_torch(O):
    # checkpoints of older torch versions: no dispatch flags in the groups, 'step' a
    # plain number
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for k in ("foreach", "fused", "capturable", "differentiable", "maximize",
                  "decoupled_weight_decay"):
            g.pop(k, None)
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = int(st["step"])
    opt = O(model.parameters())
    opt.load_state_dict(sd)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom(torch_raises=True)
def load_state_dict_with_fewer_groups(O):
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    other = O([{"params": model.inp.parameters()}, {"params": model.head.parameters()}])
    other.load_state_dict(sd)


@idiom(torch_raises=True)
def load_state_dict_with_other_group_sizes(O):
    model = make(O)
    opt = O(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    other = O(model.head.parameters())
    other.load_state_dict(sd)


@idiom()
def extra_keys_in_param_groups(O):
    # timm's layer-wise decay: an 'lr_scale' per group that the schedule applies
    model = make(O)
    base = 1e-2
    opt = O([{"params": model.inp.parameters(), "lr_scale": 0.25, "name": "inp"},
             {"params": model.mid.parameters(), "lr_scale": 0.5, "name": "mid"},
             {"params": model.head.parameters(), "lr_scale": 1.0, "name": "head"}])
    losses = []
    for i in range(4):
        for g in opt.param_groups:
            g["lr"] = base * g["lr_scale"] / (1 + i)
        losses += train(model, opt, 1, start=i)
    sd = copy.deepcopy(opt.state_dict())
    opt = O([{"params": model.inp.parameters()}, {"params": model.mid.parameters()},
             {"params": model.head.parameters()}])
    opt.load_state_dict(sd)
    losses += train(model, opt, 1, start=4)
    return finish(model, opt, losses,
                  groups=[(g["name"], g["lr_scale"], g["lr"]) for g in opt.param_groups])


@idiom()
def params_reordered_in_their_group(O):
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    opt.param_groups[0]["params"] = list(reversed(opt.param_groups[0]["params"]))
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


@idiom()
def duplicate_param_in_one_group(O):
    # torch warns and keeps one copy
    import warnings
    model = make(O)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = O(list(model.parameters()) + [model.head.weight])
    losses = train(model, opt, 3)
    return finish(model, opt, losses, n=len(opt.param_groups[0]["params"]))


@idiom()
def module_pruned_with_nn_utils_prune(O):
    # torch.nn.utils.prune after the optimizer was built: 'weight' becomes
    # 'weight_orig' (the same Parameter) times a mask
    import torch.nn.utils.prune as prune
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    prune.l1_unstructured(model.mid, "weight", amount=0.3)
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses, weight=model.mid.weight)


@idiom()
def grads_with_other_strides_assigned(O):
    # a transposed gradient for a weight, a broadcast (stride 0) one for a bias
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        w, b = model.mid.weight, model.mid.bias
        w.grad = w.grad.t().contiguous().t()
        b.grad = b.grad.mean().reshape(1).expand_as(b)
        opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses)


@idiom()
def step_under_no_grad(O):
    model = make(O)
    opt = O(model.parameters())
    losses = []
    for i in range(4):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        with torch.no_grad():
            opt.step()
        losses.append(loss.detach().clone())
    return finish(model, opt, losses)


@idiom()
def foreach_flag(O):
    model = make(O)
    opt = O(model.parameters(), foreach=True)
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom(rules=("SGD", "Adam", "AdamW", "Adagrad"))
def fused_flag(O):
    model = make(O)
    opt = O(model.parameters(), fused=True)
    losses = train(model, opt, 4)
    return finish(model, opt, losses)


@idiom(torch_raises=("Adam", "AdamW", "RMSprop"))
def model_float_mid_run(O):
    # a float64 model moved to float32 after a few steps
    model = make(O)
    opt = O(model.parameters())
    losses = train(model, opt, 2)
    model.float()
    losses += train(model, opt, 3, start=2)
    return finish(model, opt, losses)


# ---------------------------------------------------------------------------
# Construction errors torch reports
# ---------------------------------------------------------------------------

@idiom(torch_raises=True)
def same_param_in_two_groups(O):
    model = make(O)
    return O([{"params": model.head.parameters()}, {"params": [model.head.weight]}])


@idiom(torch_raises=True)
def empty_parameter_list(O):
    return O([])


@idiom(torch_raises=True)
def non_leaf_tensor_as_param(O):
    model = make(O)
    return O([model.head.weight * 2])


@idiom(torch_raises=True)
def param_group_without_params(O):
    model = make(O)
    opt = O(model.inp.parameters())
    opt.add_param_group({"lr": 0.1})


@idiom(torch_raises=True)
def negative_lr_at_construction(O):
    model = make(O)
    return O(model.parameters(), lr=-1e-3)


@idiom(torch_raises=True)
def negative_weight_decay_at_construction(O):
    model = make(O)
    return O(model.parameters(), weight_decay=-0.1)


@idiom(rules=("Adam", "AdamW"), torch_raises=True)
def beta_of_one_at_construction(O):
    model = make(O)
    return O(model.parameters(), betas=(1.0, 0.999))


@idiom(rules=("SGD", "RMSprop"), torch_raises=True)
def negative_momentum_at_construction(O):
    model = make(O)
    return O(model.parameters(), momentum=-0.5)


@idiom(torch_raises=True)
def unknown_keyword_at_construction(O):
    model = make(O)
    return O(model.parameters(), beta=0.9)


@idiom(torch_raises=True)
def a_tensor_instead_of_an_iterable(O):
    model = make(O)
    return O(model.head.weight)


@idiom(torch_raises=True)
def a_set_of_params(O):
    model = make(O)
    return O(set(model.parameters()))


@idiom(torch_raises=True)
def add_param_group_with_a_param_already_held(O):
    model = make(O)
    opt = O(model.parameters())
    opt.add_param_group({"params": [model.head.weight]})


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: with two OpenMP threads on a busy machine each forward or
    # backward op waits ~0.1 s for the other thread, with one it takes ~0.1 ms
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Known differences, open: after model.double() / model.float() mid-run the state
# keeps its old dtype, and torch's SGD and Adagrad round each in-place op into that
# state (float32 state with float64 gradients, or the reverse); fastopt steps such
# state through a copy in the wider dtype, one rounding per element. The results
# differ at the narrower dtype's precision (~1e-7 relative). strict: a fix turns these
# into failures until the marks go.
KNOWN = {(idiom, rule): "mixed-dtype state after a dtype change mid-run rounds once, "
                        "where torch rounds per in-place op (~1e-7 relative)"
         for idiom in ("model_double_mid_run", "model_float_mid_run")
         for rule in ("SGD", "Adagrad")}


def cases():
    for name, (fn, rules, dtypes, forked, _, _) in IDIOMS.items():
        for rule in rules:
            for dtype in dtypes:
                marks = ([pytest.mark.xfail(strict=True, reason=KNOWN[name, rule])]
                         if (name, rule) in KNOWN else [])
                yield pytest.param(name, rule, dtype, marks=marks,
                                   id=f"{name}-{rule}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name,rule,dtype", list(cases()))
def test_idiom_behaves_as_torch(name, rule, dtype):
    fn, _, _, forked, torch_raises, rtol = IDIOMS[name]
    theirs, ours = libs(rule, dtype, HP[rule])
    if forked:
        expected = (run_forked(__name__, name, rule, dtype, 0) if forked == "both"
                    else run(fn, theirs))
        actual = run_forked(__name__, name, rule, dtype, 1)
    else:
        expected = run(fn, theirs)
        actual = run(fn, ours)
    rep = compare(actual, expected, torch_may_raise=rule in torch_raises, rtol=rtol)
    line = describe(f"{name}[{rule}, {str(dtype)[6:]}]", rep)
    print(line)
    if rep.problems:
        pytest.fail(line, pytrace=False)


# ---------------------------------------------------------------------------
# The suite's own check: every idiom's result depends on the numbers of the steps
# ---------------------------------------------------------------------------

class _Skewed:
    """torch.optim's classes stepping with every lr 1e-9 too large: far above the
    float64 tolerance, far below anything a user would notice. An idiom that tells
    this from torch depends on every step it takes (and would tell an optimizer that
    does not step at all)."""

    def __getattr__(self, name):
        base = getattr(torch.optim, name)

        def step(self, closure=None):
            saved = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = g["lr"] * (1 + 1e-9)
            try:
                return base.step(self, closure)
            finally:
                for g, lr in zip(self.param_groups, saved):
                    g["lr"] = lr
        return type(name, (base,), {"step": step})


# idioms about something else than the numbers of a step
NOT_ABOUT_STEPS = {
    "same_param_in_two_groups", "empty_parameter_list", "non_leaf_tensor_as_param",
    "param_group_without_params", "negative_lr_at_construction",   # construction errors
    "negative_weight_decay_at_construction", "beta_of_one_at_construction",
    "negative_momentum_at_construction", "unknown_keyword_at_construction",
    "a_tensor_instead_of_an_iterable", "a_set_of_params",
    "add_param_group_with_a_param_already_held", "load_state_dict_with_fewer_groups",
    "load_state_dict_with_other_group_sizes",
    "state_dict_structure",                                          # keys and dtypes
    "saved_head_state_dict_size", "saved_model_state_dict_size",    # file sizes
    "saved_optimizer_state_dict_size", "state_memory_counted",
    "sparse_embedding_rejected", "sparse_embedding_sgd_weight_decay",  # torch raises
}


def self_check_cases():
    for name, (fn, rules, dtypes, forked, _, _) in IDIOMS.items():
        if not forked and name not in NOT_ABOUT_STEPS:
            yield pytest.param(name, rules[0], id=f"{name}-{rules[0]}")


@pytest.mark.parametrize("name,rule", list(self_check_cases()))
def test_idiom_tells_a_skewed_optimizer_from_torch(name, rule):
    fn, _, _, _, _, rtol = IDIOMS[name]
    expected = run(fn, Lib(torch.optim, rule, F64, HP[rule]))
    rep = compare(run(fn, Lib(_Skewed(), rule, F64, HP[rule])), expected,
                  torch_may_raise=True, rtol=rtol)
    assert rep.problems, f"{name} cannot tell an lr 1e-9 too large from torch.optim.{rule}"
