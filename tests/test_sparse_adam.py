"""SparseAdam (fastopt.torch and NumPy) against torch.optim.SparseAdam in the same
process: embedding gradients with duplicate indices, state dicts both ways, errors."""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse invariant checks")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _train(cls, dtype, steps=6, hp=None, state=None):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(500, 8, sparse=True).to(dtype)
    emb2 = torch.nn.Embedding(40, 3, sparse=True).to(dtype)
    opt = cls([{"params": emb.parameters()}, {"params": emb2.parameters(), "lr": 0.003}],
              **(hp or dict(lr=0.01)))
    if state is not None:
        opt.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        idx = torch.randint(0, 500, (120,), generator=g)
        idx2 = torch.randint(0, 40, (30,), generator=g)   # many duplicates
        loss = (emb(idx) ** 2).sum() * (s + 1) + emb2(idx2).sum() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [emb.weight.detach(), emb2.weight.detach()], opt


@pytest.mark.parametrize("hp", [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99),
                                                    eps=1e-6, maximize=True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_torch(dtype, hp):
    ours, a = _train(fot.SparseAdam, dtype, hp=hp)
    theirs, b = _train(torch.optim.SparseAdam, dtype, hp=hp)
    worst = max(_rel(p, q) for p, q in zip(ours, theirs))
    for p, q in zip(a.state.values(), b.state.values()):
        assert p["step"] == q["step"]
        worst = max(worst, _rel(p["exp_avg"], q["exp_avg"]),
                    _rel(p["exp_avg_sq"], q["exp_avg_sq"]))
    assert worst <= TOL[dtype], worst


def test_state_dict_both_ways():
    dtype = torch.float64
    for src, dst in ((fot.SparseAdam, torch.optim.SparseAdam),
                     (torch.optim.SparseAdam, fot.SparseAdam)):
        _, o = _train(src, dtype, steps=3)
        sd = copy.deepcopy(o.state_dict())
        a, _ = _train(dst, dtype, steps=2, state=copy.deepcopy(sd))
        b, _ = _train(src, dtype, steps=2, state=copy.deepcopy(sd))
        assert max(_rel(p, q) for p, q in zip(a, b)) <= 1e-12


def test_errors_write_nothing():
    p = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = fot.SparseAdam([p, q])
    before = (p.detach().clone(), q.detach().clone())
    p.grad = torch.sparse_coo_tensor([[1, 3, 3]], torch.ones(3, 4, dtype=torch.float64),
                                     (10, 4))
    q.grad = torch.ones(6, 4, dtype=torch.float64)      # dense
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="dense gradients"):  # torch's type, too
        opt.step()
    q.grad = torch.sparse_coo_tensor([[0, 6]], torch.ones(2, 4, dtype=torch.float64),
                                     (6, 4), check_invariants=False)  # row 6 of 6
    with pytest.raises(ValueError, match="out of range"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]) and not opt.state
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fot.SparseAdam([p], lr=0.0)
    with pytest.raises(ValueError, match="Sparse params"):
        fot.SparseAdam([torch.zeros(3, 2).to_sparse()])


def test_numpy_api_matches_torch():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, 5))
    ref = torch.nn.Parameter(torch.tensor(table))
    opt = fastopt.SparseAdam(table, lr=0.01, betas=(0.85, 0.99))
    topt = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.85, 0.99))
    for _ in range(5):
        idx = rng.integers(0, 300, 80)
        rows = rng.standard_normal((80, 5))
        opt.step((idx, rows))
        ref.grad = torch.sparse_coo_tensor(torch.tensor(idx)[None], torch.tensor(rows),
                                           (300, 5))
        topt.step()
    assert _rel(torch.tensor(table), ref.detach()) <= 1e-12
    assert opt.step_count == 5
    before = table.copy()
    with pytest.raises(ValueError, match="row index 300 is out of range"):
        opt.step((np.array([0, 300]), np.ones((2, 5))))
    with pytest.raises(TypeError, match="dtype"):
        opt.step((np.array([0]), np.ones((1, 5), np.float32)))
    with pytest.raises(TypeError, match="pair"):
        opt.step(np.ones((300, 5)))
    assert np.array_equal(table, before) and opt.step_count == 5
