"""Schedule-free AdamW/SGD against the ``schedulefree`` package (1.4.1), in the same
process: fastopt.torch's classes step by step through train/eval switches, state
dicts both ways, the NumPy classes, and the errors."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

# relative max-norm deviation allowed: float64 is a few ulps (the kernel multiplies by
# 1/√bc2 where the package divides by bc2 under the root; ...), float32 likewise
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
CASES = [
    ("AdamWScheduleFree", dict(lr=0.01, weight_decay=0.01, warmup_steps=3)),
    ("AdamWScheduleFree", dict(lr=0.02, betas=(0.8, 0.99), r=1.0, weight_lr_power=1.0)),
    ("SGDScheduleFree", dict(lr=0.05, weight_decay=0.01, warmup_steps=2)),
    ("SGDScheduleFree", dict(lr=0.1, momentum=0.5, r=0.5)),
]
MEASURED = {}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 19), (101,), (4, 3, 5), (1,)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _run(opt, params, steps, seed, dtype, switch=True):
    g = torch.Generator().manual_seed(seed)
    opt.train()
    for t in range(steps):
        for i, p in enumerate(params):
            # param 1 gets no gradient at first: its state appears at a later step
            p.grad = None if (i == 1 and t < 2) else torch.randn(p.shape, generator=g,
                                                                 dtype=dtype)
        opt.step()
        if switch and t % 3 == 2:
            opt.eval()
            opt.train()
    opt.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,hp", CASES)
def test_matches_the_package(name, hp, dtype):
    ours, theirs = _params(dtype), _params(dtype)
    a = getattr(fot, name)([{"params": ours[:2]}, {"params": ours[2:], "lr": hp["lr"] / 2}], **hp)
    b = getattr(schedulefree, name)([{"params": theirs[:2]},
                                     {"params": theirs[2:], "lr": hp["lr"] / 2}], **hp)
    _run(a, ours, 12, 5, dtype)
    _run(b, theirs, 12, 5, dtype)
    worst = 0.0
    for p, q in zip(ours, theirs):
        worst = max(worst, _rel(p, q))
        for key in b.state[q]:
            worst = max(worst, _rel(a.state[p][key], b.state[q][key]))
    for ga, gb in zip(a.param_groups, b.param_groups):
        for key in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
            assert ga[key] == pytest.approx(gb[key], rel=1e-15), key
    MEASURED[(name, str(hp), str(dtype))] = worst
    assert worst <= TOL[dtype], worst


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_state_dict_both_ways(name):
    hp = dict(lr=0.01, warmup_steps=2)
    dtype = torch.float64
    for src_cls, dst_cls in ((getattr(fot, name), getattr(schedulefree, name)),
                             (getattr(schedulefree, name), getattr(fot, name))):
        p0, p1, p2 = _params(dtype), _params(dtype), _params(dtype)
        src = src_cls(p0, **hp)
        _run(src, p0, 4, 1, dtype)
        dst = dst_cls(p1, **hp)
        with torch.no_grad():
            for a, b in zip(p1, p0):
                a.copy_(b)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        # both continue identically
        ref = src_cls(p2, **hp)
        with torch.no_grad():
            for a, b in zip(p2, p0):
                a.copy_(b)
        ref.load_state_dict(copy.deepcopy(src.state_dict()))
        _run(dst, p1, 3, 2, dtype)
        _run(ref, p2, 3, 2, dtype)
        for a, b in zip(p1, p2):
            assert _rel(a, b) <= 1e-12


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_errors_write_nothing(name):
    p = torch.randn(10, dtype=torch.float64)
    opt = getattr(fot, name)([p], lr=0.1)
    p.grad = torch.randn(10, dtype=torch.float64)
    before = p.clone()
    with pytest.raises(fastopt.schedulefree.ScheduleFreeModeError, match="eval mode"):
        opt.step()                     # never put in train mode
    assert torch.equal(p, before) and not opt.state
    opt.train()
    q = torch.randn(3, dtype=torch.float64)
    q.grad = torch.randn(3, dtype=torch.float64)
    opt.add_param_group({"params": [q]})
    opt.param_groups[1]["lr"] = "fast"   # a bad value in a later group: nothing runs
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    assert torch.equal(p, before) and opt.param_groups[0]["k"] == 0 and not opt.state
    opt.param_groups[1]["lr"] = 0.1
    p.grad = torch.randn(10, dtype=torch.float64).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="lr"):
        getattr(fot, name)([p], lr=-1.0)
    if name == "SGDScheduleFree":
        with pytest.raises(ValueError, match="Momentum must be between 0 and 1 exclusive"):
            fot.SGDScheduleFree([p], momentum=1.0)


@pytest.mark.parametrize("name,hp", CASES)
def test_numpy_classes_match_the_torch_ones(name, hp):
    dtype = torch.float64
    ours = _params(dtype)
    theirs = [p.clone() for p in ours]
    arrays = [p.numpy() for p in ours]
    np_opt = getattr(fastopt, name)(arrays, **hp)
    t_opt = getattr(schedulefree, name)(theirs, **hp)
    g = torch.Generator().manual_seed(3)
    with pytest.raises(fastopt.schedulefree.ScheduleFreeModeError):
        np_opt.step([np.ones_like(a) for a in arrays])
    np_opt.train()
    t_opt.train()
    for t in range(8):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in ours]
        for q, gr in zip(theirs, grads):
            q.grad = gr.clone()
        np_opt.step([gr.numpy() for gr in grads])
        t_opt.step()
        if t == 4:
            np_opt.eval(), t_opt.eval(), np_opt.train(), t_opt.train()
    np_opt.eval()
    t_opt.eval()
    for a, q in zip(ours, theirs):
        assert _rel(a, q) <= 1e-12
    sd = np_opt.state_dict()
    assert sd["train_mode"] is False
    again = getattr(fastopt, name)([a.copy() for a in arrays], **hp)
    again.load_state_dict(sd)
    assert again.train_mode is False and again.step_count == 8


def test_numpy_float32_close():
    p = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    q = torch.tensor(p.astype(np.float64))
    a = fastopt.AdamWScheduleFree(p, lr=0.01)
    b = schedulefree.AdamWScheduleFree([q], lr=0.01)
    a.train(), b.train()
    rng = np.random.default_rng(1)
    for _ in range(10):
        g = rng.standard_normal(1000)
        a.step(g.astype(np.float32))
        q.grad = torch.tensor(g)
        b.step()
    a.eval(), b.eval()
    assert np.max(np.abs(p - q.numpy())) / np.max(np.abs(q.numpy())) < 1e-5
