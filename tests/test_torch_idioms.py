"""Everyday torch idioms around an optimizer, run with torch.optim and fastopt.torch.

Each idiom is ordinary user code (freezing a layer, pruning as 3D Gaussian splatting
does, Hogwild, a GradScaler, ``p.grad.data = ...``): one function in the table
``IDIOMS`` that takes the optimizer factory ``O`` and returns what a user would look
at afterwards (parameters, losses, optimizer state). It runs twice in this process,
from the same seed and data, once with ``torch.optim.<Rule>`` and once with
``fastopt.torch.<Rule>``; the two results must agree (see ``_idioms.compare``):
the same numbers, the same exception type where torch raises, never a crash. The
idioms that moved storage under the optimizer and crashed it run in a forked
process, so that a crash is reported as a failure of that idiom only.

The assertion message of every case, and the line it prints, give the idiom's
largest |Δ| against torch (``pytest -rA`` lists them all).
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

from _idioms import (Approx, compare, describe, libs, preload_fork_server, run,  # noqa: E402
                     run_forked)

preload_fork_server(__name__)
from fastopt.rules import RULES  # noqa: E402

F64, F32 = torch.float64, torch.float32

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


def idiom(rules=CORE, dtypes=(F64,), forked=False, torch_raises=()):
    """Register an idiom. ``torch_raises``: the rules for which torch.optim raises
    somewhere in the idiom (True: all); anywhere else an exception with torch is a
    bug of the idiom and fails it."""
    def register(fn):
        raises = tuple(rules) if torch_raises is True else tuple(torch_raises)
        IDIOMS[fn.__name__] = (fn, tuple(rules), tuple(dtypes), forked, raises)
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
    """The optimizer's state_dict()['state'], scalars as numbers (torch's 'step'
    dtype is compared in its own idiom, not in every one)."""
    out = {}
    for k, st in opt.state_dict()["state"].items():
        out[k] = {n: (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v)
                  for n, v in st.items()}
    return out


def _or_raised(fn):
    from _idioms import guarded
    return guarded(fn)


def finish(model, opt, losses=(), **extra):
    return dict(params=dict(model.named_parameters()), losses=list(losses),
                state=_or_raised(lambda: state_values(opt)), **extra)


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


@idiom(forked=True)
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
    return finish(model, opt, losses)


@idiom(rules=("LBFGS",))
def lbfgs_after_vector_to_parameters(O):
    def rescale(model):
        vec = nn.utils.parameters_to_vector(model.parameters())
        nn.utils.vector_to_parameters(vec * 0.9, model.parameters())
    return lbfgs_run(O, rescale)


@idiom(rules=("LBFGS",))
def lbfgs_after_float_double(O):
    return lbfgs_run(O, lambda model: model.float().double())


@idiom(rules=("LBFGS",))
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
    return dict(pts=pts, col=col, losses=losses, state=_or_raised(lambda: state_values(opt)))


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
    return dict(size=Approx(saved_size(model.head.state_dict()), 0.05))


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


def cases():
    for name, (fn, rules, dtypes, forked, _) in IDIOMS.items():
        for rule in rules:
            for dtype in dtypes:
                yield pytest.param(name, rule, dtype,
                                   id=f"{name}-{rule}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name,rule,dtype", list(cases()))
def test_idiom_behaves_as_torch(name, rule, dtype):
    fn, _, _, forked, torch_raises = IDIOMS[name]
    theirs, ours = libs(rule, dtype, HP[rule])
    if forked:
        expected = run_forked(__name__, name, rule, dtype, 0)
        actual = run_forked(__name__, name, rule, dtype, 1)
    else:
        expected = run(fn, theirs)
        actual = run(fn, ours)
    rep = compare(actual, expected, torch_may_raise=rule in torch_raises)
    line = describe(f"{name}[{rule}, {str(dtype)[6:]}]", rep)
    print(line)
    assert not rep.problems, line
