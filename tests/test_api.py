"""The API as a user meets it: bad input, checkpoints, threads, in-place updates,
backend selection, the functional calls and FlatParams."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from cases import combos, grads, initial_param
from fastopt import backends
from fastopt.rules import RULES

N = 37
F32 = np.float32


def snapshot(opt, *extra):
    arrays = [opt.param, *opt.state.values(), *extra]
    return [np.array(fastopt.backends.load(opt.backend).to_host(a)) if not isinstance(a, np.ndarray)
            else a.copy() for a in arrays]


def assert_unchanged(before, opt, *extra):
    after = snapshot(opt, *extra)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def fresh_adam(backend=None, **hp):
    p = initial_param(N, F32)
    kw = {} if backend is None else backend.kw()
    opt = fastopt.Adam(p if backend is None else backend.asarray(p), amsgrad=True, **hp, **kw)
    opt.step(next(iter(grads(N, 1, F32))) if backend is None
             else backend.asarray(grads(N, 1, F32)[0]))
    return opt


# --------------------------------------------------------------------------
# Bad gradients: the exception type, the argument named, nothing written
# --------------------------------------------------------------------------

def _aliased(opt):
    return opt.param


def _state_alias(opt):
    return opt.state["exp_avg"]


def _overlap(opt):
    return opt.param[:]  # same memory, another object


BAD_GRADS = [
    ("float64 grad", lambda opt: np.ones(N, np.float64), TypeError, ["grad", "float64"]),
    ("int grad", lambda opt: np.ones(N, np.int64), TypeError, ["grad", "int64"]),
    ("complex grad", lambda opt: np.ones(N, np.complex64), TypeError, ["grad", "complex64"]),
    # (a float16 or bfloat16 grad for a float32 param is the CPU-offload step:
    # tests/test_lowp_api.py)
    ("float16 grad, 2 elements", lambda opt: np.ones(2, np.float16), ValueError,
     ["grad", "2 elements"]),
    ("short grad", lambda opt: np.ones(N - 1, F32), ValueError, ["grad", str(N - 1), str(N)]),
    ("long grad", lambda opt: np.ones(N + 5, F32), ValueError, ["grad", str(N + 5)]),
    ("0-d grad", lambda opt: np.array(1.0, F32), ValueError, ["grad", "1 elements"]),
    ("2-d grad, wrong size", lambda opt: np.ones((2, N), F32), ValueError,
     ["grad", f"{2 * N} elements"]),
    ("strided 2-d grad", lambda opt: np.ones((1, 2 * N), F32)[:, ::2], ValueError,
     ["grad", "contiguous", f"(1, {N})"]),
    ("Fortran-order 2-d grad", lambda opt: np.ones((2, N), F32, order="F")[:1],
     ValueError, ["grad", "contiguous", f"(1, {N})"]),
    ("strided 3-d grad", lambda opt: np.ones((1, N, 3), F32)[:, :, 1], ValueError,
     ["grad", "contiguous", f"(1, {N})"]),
    ("2-d grad views param", lambda opt: opt.param.reshape(1, N), ValueError, ["grad", "param"]),
    ("strided grad", lambda opt: np.ones(2 * N, F32)[::2], ValueError, ["grad", "contiguous"]),
    ("grad is param", _aliased, ValueError, ["grad", "param"]),
    ("grad views param", _overlap, ValueError, ["grad", "param"]),
    ("grad is state", _state_alias, ValueError, ["grad", "exp_avg"]),
    ("None", lambda opt: None, TypeError, ["grad", "None"]),
    ("list", lambda opt: [0.0] * N, TypeError, ["grad", "list"]),
    ("list of arrays", lambda opt: [np.ones(N, F32)], TypeError, ["grad", "FlatParams"]),
    ("tuple of arrays", lambda opt: (np.ones(N, F32),), TypeError, ["grad", "FlatParams"]),
    ("string", lambda opt: "grad", TypeError, ["grad", "str"]),
]


@pytest.mark.parametrize("case,make,exc,words", BAD_GRADS, ids=[c[0] for c in BAD_GRADS])
def test_bad_grad_is_refused_and_nothing_changes(case, make, exc, words):
    opt = fresh_adam()
    grad = make(opt)
    before = snapshot(opt)
    with pytest.raises(exc) as info:
        opt.step(grad)
    for word in words:
        assert word in str(info.value), (case, str(info.value))
    assert_unchanged(before, opt)
    assert opt.step_count == 1


@pytest.mark.parametrize("case", ["float64 grad", "short grad", "grad is param", "grad is state",
                                  "None"])
def test_bad_grad_on_every_backend(backend, case):
    _, make, exc, words = next(c for c in BAD_GRADS if c[0] == case)
    opt = fresh_adam(backend)
    grad = make(opt)
    if isinstance(grad, np.ndarray) and backend.is_cuda and case != "grad is param":
        grad = backend.asarray(grad)
    before = snapshot(opt)
    with pytest.raises(exc) as info:
        opt.step(grad)
    assert words[0] in str(info.value)
    assert_unchanged(before, opt)


BAD_PARAMS = [
    ("int", np.ones(N, np.int32), TypeError, ["param", "int32"]),
    # (float16 and bfloat16 params: tests/test_lowp_api.py)
    ("uint16 (bfloat16 bits without ml_dtypes' type)", np.ones(N, np.uint16), TypeError,
     ["param", "uint16"]),
    ("transposed 2-d", np.ones((4, 3)).T, ValueError, ["param", "contiguous", "(3, 4)"]),
    ("strided 3-d", np.ones((2, 3, 8))[:, :, ::2], ValueError,
     ["param", "contiguous", "(2, 3, 4)"]),
    ("Fortran-order 2-d", np.asfortranarray(np.ones((5, 6))), ValueError,
     ["param", "contiguous", "(5, 6)"]),
    ("list with an int array", [np.ones(3), np.ones(2, np.int32)], TypeError,
     ["param[1]", "int32"]),
    ("list with a strided array", [np.ones(3), np.ones(4)[::2]], ValueError,
     ["param[1]", "contiguous"]),
    ("empty list", [], ValueError, ["param", "empty"]),
    ("strided", np.ones(10)[::2], ValueError, ["param", "contiguous"]),
    ("None", None, TypeError, ["param", "None"]),
    ("list of numbers", [1.0, 2.0], TypeError, ["param[0]", "float"]),
    ("string", "abc", TypeError, ["param", "str"]),
]


@pytest.mark.parametrize("case,param,exc,words", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_param_is_refused(case, param, exc, words):
    with pytest.raises(exc) as info:
        fastopt.SGD(param)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_read_only_param_is_refused():
    p = np.ones(N, F32)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="param is read-only"):
        fastopt.Adam(p)


def test_read_only_grad_is_fine():
    p, g = np.ones(N, F32), np.ones(N, F32)
    g.flags.writeable = False
    fastopt.Adam(p).step(g)
    assert (p < 1).all()


# --------------------------------------------------------------------------
# Hyperparameters: torch's messages, the argument named, nothing changed
# --------------------------------------------------------------------------

BAD_HYPERS = [
    ("Adam", {"lr": -0.1}, ValueError, "Invalid learning rate: -0.1", "lr"),
    ("Adam", {"lr": float("nan")}, ValueError, "Invalid learning rate: nan", "lr"),
    ("Adam", {"betas": (1.0, 0.999)}, ValueError, "Invalid beta parameter at index 0: 1.0", "betas"),
    ("Adam", {"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1: -0.1", "betas"),
    ("Adam", {"betas": (0.9, float("nan"))}, ValueError, "index 1: nan", "betas"),
    ("Adam", {"betas": (0.9,)}, TypeError, "pair", "betas"),
    ("Adam", {"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08", "eps"),
    ("Adam", {"weight_decay": -1.0}, ValueError, "Invalid weight_decay value: -1.0", "weight_decay"),
    ("Adam", {"lr": "0.1"}, TypeError, "'0.1'", "lr"),
    ("Adam", {"lr": None}, TypeError, "None", "lr"),
    ("Adam", {"lr": 10 ** 400}, ValueError, "does not fit in a float", "lr"),
    ("Adam", {"amsgrad": "yes"}, TypeError, "'yes'", "amsgrad"),
    ("Adam", {"lr_decay": 0.1}, TypeError, "lr_decay", "lr_decay"),
    ("SGD", {"momentum": -0.5}, ValueError, "Invalid momentum value: -0.5", "momentum"),
    ("SGD", {"nesterov": True}, ValueError, "Nesterov momentum requires a momentum and zero dampening", "nesterov"),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "zero dampening", "dampening=0.1"),
    ("Adagrad", {"lr_decay": -1.0}, ValueError, "Invalid lr_decay value: -1.0", "lr_decay"),
    ("Adagrad", {"initial_accumulator_value": -1.0}, ValueError, "Invalid initial_accumulator_value value: -1.0", "initial_accumulator_value"),
    ("RMSprop", {"alpha": -0.1}, ValueError, "Invalid alpha value: -0.1", "alpha"),
    ("Adadelta", {"rho": 1.5}, ValueError, "Invalid rho value: 1.5", "rho"),
    ("NAdam", {"momentum_decay": -1.0}, ValueError, "Invalid momentum_decay value: -1.0", "momentum_decay"),
    ("Rprop", {"etas": (1.5, 1.2)}, ValueError, "Invalid eta values: 1.5, 1.2", "etas"),
    ("Rprop", {"step_sizes": (1.0, 0.5)}, ValueError, "Invalid step size values: 1.0, 0.5", "step_sizes"),
    ("ASGD", {"t0": float("inf")}, ValueError, "Invalid t0 value: inf", "t0"),
    ("Lion", {"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0", "betas"),
]


@pytest.mark.parametrize("name,hp,exc,message,argument", BAD_HYPERS,
                         ids=[f"{c[0]}-{next(iter(c[1]))}-{i}" for i, c in enumerate(BAD_HYPERS)])
def test_bad_hyperparameter(name, hp, exc, message, argument):
    with pytest.raises(exc) as info:
        getattr(fastopt, name)(np.ones(N, F32), **hp)
    assert message in str(info.value)
    assert argument in str(info.value)


@pytest.mark.parametrize("name,hp,exc,message,argument",
                         [c for c in BAD_HYPERS if c[0] != "Adam" or "lr_decay" not in c[1]],
                         ids=lambda v: None)
def test_bad_hyperparameter_assignment_changes_nothing(name, hp, exc, message, argument):
    opt = getattr(fastopt, name)(np.ones(N, F32))
    before = opt.hyperparameters
    with pytest.raises(exc):
        for key, value in hp.items():
            setattr(opt, key, value)
    # a multi-key case may have applied a valid first key; the invalid one never lands
    for key, value in hp.items():
        if key == next(reversed(hp)):
            assert opt.hyperparameters[key] == before[key]


def test_hyperparameters_change_between_steps():
    p1, p2 = initial_param(N, F32), initial_param(N, F32)
    a = fastopt.Adam(p1, lr=1e-2)
    g = grads(N, 4, F32)
    for t, gt in enumerate(g, start=1):
        if t == 3:
            a.lr = 3e-3
        a.step(gt)
    st = {"exp_avg": np.zeros(N, F32), "exp_avg_sq": np.zeros(N, F32)}
    for t, gt in enumerate(g, start=1):
        fastopt.functional.adam(p2, gt, st["exp_avg"], st["exp_avg_sq"], step=t,
                                lr=1e-2 if t < 3 else 3e-3)
    np.testing.assert_array_equal(p1, p2)
    assert a.lr == 3e-3


def test_momentum_switched_on_later_starts_buffer_at_grad_like_torch():
    torch = pytest.importorskip("torch")
    p = initial_param(N, np.float64)
    tp = torch.from_numpy(p.copy())
    opt, topt = fastopt.SGD(p, lr=0.1), torch.optim.SGD([tp], lr=0.1, foreach=False)
    for t, g in enumerate(grads(N, 6, np.float64), start=1):
        if t == 3:
            opt.momentum = 0.9
            topt.param_groups[0]["momentum"] = 0.9
        opt.step(g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.numpy(), rtol=1e-14)


def test_amsgrad_switched_on_later_allocates_its_buffer():
    opt = fastopt.Adam(np.ones(N, F32))
    opt.step(np.ones(N, F32))
    assert "max_exp_avg_sq" not in opt.state
    opt.amsgrad = True
    opt.step(np.ones(N, F32))
    assert opt.state["max_exp_avg_sq"].shape == (N,)


def test_unknown_attribute_and_step_count_are_protected():
    opt = fastopt.Adam(np.ones(N, F32))
    with pytest.raises(AttributeError):
        opt.step_count = 5
    with pytest.raises(AttributeError):
        _ = opt.no_such_thing


# --------------------------------------------------------------------------
# State dicts and checkpoints
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_checkpoint_resume_is_bitwise(backend, tmp_path, name, dtype):
    hp = combos(name)[-1]  # the case with the most flags on
    n, k, total = backend.lengths((1031,))[-1], 7, 15
    steps = list(grads(n, total, dtype))
    straight = getattr(fastopt, name)(backend.asarray(initial_param(n, dtype)), **hp, **backend.kw())
    for g in steps:
        straight.step(backend.asarray(g))

    first = getattr(fastopt, name)(backend.asarray(initial_param(n, dtype)), **hp, **backend.kw())
    for g in steps[:k]:
        first.step(backend.asarray(g))
    path = tmp_path / "ckpt.npz"
    fastopt.save(first.state_dict(), path)
    param_at_k = backend.numpy(first.param).copy()

    sd = fastopt.load(path)
    resumed = getattr(fastopt, name)(backend.asarray(param_at_k), **backend.kw())
    resumed.load_state_dict(sd)
    assert resumed.hyperparameters == first.hyperparameters
    for g in steps[k:]:
        resumed.step(backend.asarray(g))
    assert resumed.step_count == total
    np.testing.assert_array_equal(backend.numpy(resumed.param), backend.numpy(straight.param))
    for key in straight.state:
        np.testing.assert_array_equal(backend.numpy(resumed.state[key]),
                                      backend.numpy(straight.state[key]))
    assert resumed.state_dict()["scalars"] == straight.state_dict()["scalars"]


def test_state_dict_is_plain_data_and_round_trips():
    opt = fresh_adam()
    sd = opt.state_dict()
    assert sd["rule"] == "Adam" and sd["dtype"] == "float32" and sd["size"] == N
    assert sd["step"] == 1 and isinstance(sd["hyperparameters"]["betas"], tuple)
    assert all(type(v) is np.ndarray for v in sd["state"].values())
    sd["state"]["exp_avg"][:] = 123  # a copy: the optimizer is not affected
    assert not (opt.state["exp_avg"] == 123).any()


def _bad_state_dicts():
    good = fresh_adam().state_dict()

    def edit(**changes):
        sd = {**good, "state": dict(good["state"])}
        sd.update(changes)
        return sd

    sgd = fastopt.SGD(np.ones(N, F32), momentum=0.9)
    sgd.step(np.ones(N, F32))
    return [
        ("other rule", sgd.state_dict(), ValueError, "rule"),
        ("other dtype", edit(dtype="float64"), ValueError, "dtype"),
        ("other size", edit(size=N + 1), ValueError, "size"),
        ("negative step", edit(step=-1), ValueError, "step"),
        ("bad hyper", edit(hyperparameters={**good["hyperparameters"], "lr": -1.0}), ValueError, "lr"),
        ("unknown hyper", edit(hyperparameters={**good["hyperparameters"], "zeta": 1.0}), ValueError, "zeta"),
        ("short array", edit(state={**good["state"], "exp_avg": np.zeros(N - 1, F32)}), ValueError, "exp_avg"),
        ("wrong dtype array", edit(state={**good["state"], "exp_avg": np.zeros(N)}), ValueError, "exp_avg"),
        ("unknown buffer", edit(state={**good["state"], "sum": np.zeros(N, F32)}), ValueError, "sum"),
        ("missing buffer", edit(state={"exp_avg": good["state"]["exp_avg"]}), ValueError, "exp_avg_sq"),
        ("not a dict", [1, 2], TypeError, "dict"),
        ("missing key", {k: v for k, v in good.items() if k != "step"}, ValueError, "step"),
    ]


@pytest.mark.parametrize("case,sd,exc,word", _bad_state_dicts(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_state_dict_is_refused_and_nothing_changes(case, sd, exc, word):
    opt = fresh_adam()
    before = snapshot(opt)
    hp = opt.hyperparameters
    with pytest.raises(exc) as info:
        opt.load_state_dict(sd)
    assert word in str(info.value)
    assert_unchanged(before, opt)
    assert opt.hyperparameters == hp and opt.step_count == 1


def test_corrupt_checkpoints_are_refused(tmp_path):
    opt = fresh_adam()
    good = tmp_path / "good.npz"
    fastopt.save(opt.state_dict(), good)
    raw = good.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "garbage": os.urandom(512),
        "flipped": raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:],
    }
    np.savez(tmp_path / "nometa.npz", x=np.zeros(3))
    np.savez(tmp_path / "badmeta.npz", meta=np.frombuffer(b"{not json", np.uint8))
    for name, data in cases.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
    for name in [*cases, "nometa", "badmeta"]:
        path = tmp_path / f"{name}.npz"
        with pytest.raises(ValueError) as info:
            fastopt.load(path)
        assert str(path) in str(info.value), name
    with pytest.raises(FileNotFoundError):
        fastopt.load(tmp_path / "absent.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    opt = fresh_adam()
    fastopt.save(opt.state_dict(), path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(np, "savez", crash)
    opt.step(np.ones(N, F32))
    with pytest.raises(KeyboardInterrupt):
        fastopt.save(opt.state_dict(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temp file left


def test_checkpoint_has_no_pickle(tmp_path):
    path = tmp_path / "c.npz"
    fastopt.save(fresh_adam().state_dict(), path)
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            assert npz[key].dtype != object


# --------------------------------------------------------------------------
# Threads, instruction sets, in-place updates, empty buffers
# --------------------------------------------------------------------------

# the compiled backend; test_numba_backends proves the Numba backend bitwise equal to
# it on 1 and 2 threads, kernel path by kernel path
@pytest.mark.parametrize("cpu_backend", ["cython"])
@pytest.mark.parametrize("name", list(RULES))
def test_thread_counts_give_identical_bits(cpu_backend, name):
    n = 100003  # above the parallel threshold, not a multiple of the vector width
    hp = combos(name)[-1]
    results = []
    for threads in (1, 2):
        fastopt.set_num_threads(threads)
        try:
            opt = getattr(fastopt, name)(initial_param(n, F32), **hp, backend=cpu_backend)
            for g in grads(n, 5, F32):
                opt.step(g)
            results.append(opt.param.copy())
        finally:
            fastopt.set_num_threads(backends.DEFAULT.max_threads())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("name", list(RULES))
def test_avx2_and_baseline_builds_give_identical_bits(name):
    from fastopt.kernels import _baseline
    try:
        from fastopt.kernels import _avx2
    except ImportError:
        pytest.skip("no AVX2 build on this platform")
    if not _baseline.cpu_has_avx2_fma():
        pytest.skip("this CPU cannot run the AVX2 build")
    rule = RULES[name]
    hp = combos(name)[-1]
    n = 100003
    out = []
    for mod in (_baseline, _avx2):
        p = initial_param(n, F32)
        bufs = [np.full(n, b.fill(hp), F32) if b.needed(hp) else None for b in rule.buffers]
        scalars = rule.initial_scalars(hp)
        for t, g in enumerate(grads(n, 5, F32), start=1):
            args, scalars = rule.plan(hp, t, scalars, False)
            mod.Bound(rule.kernel, [p], [bufs], True).step(g, args, 2)
        out.append(p)
    np.testing.assert_array_equal(out[0], out[1])


def test_views_and_tensors_are_updated_in_place():
    w = np.ones((30, 41), F32)
    fastopt.SGD(w.reshape(-1), lr=0.5).step(np.ones(30 * 41, F32))  # a view of a 2-D array
    assert (w == 0.5).all()
    fastopt.SGD(w[3], lr=0.5).step(np.ones(41, F32))  # one row
    assert (w[3] == 0).all() and (w[4] == 0.5).all()
    torch = pytest.importorskip("torch")
    t = torch.ones(100, dtype=torch.float64)
    fastopt.SGD(t.numpy(), lr=0.25).step(np.ones(100))
    assert (t == 0.75).all()
    fastopt.SGD(t, lr=0.25).step(torch.ones(100, dtype=torch.float64))  # the tensor itself
    assert (t == 0.5).all()


def test_arrays_of_any_shape_are_updated_through_their_flat_view():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    flat_p, grads = rng.standard_normal(24), rng.standard_normal((3, 24))
    ref = fastopt.NAdam(flat_p.copy(), lr=0.1)
    w = flat_p.reshape(2, 3, 4).copy()
    opt = fastopt.NAdam(w, lr=0.1)
    assert opt.param is w                          # the caller's array, its shape
    for g in grads:
        ref.step(g)
        opt.step(g.reshape(2, 3, 4))               # N-D grad
    opt.step(grads[0].reshape(4, 6))               # any shape of the right size
    ref.step(grads[0])
    np.testing.assert_array_equal(w.reshape(-1), ref.param)
    assert {k: v.shape for k, v in opt.state.items()} == {"exp_avg": (24,), "exp_avg_sq": (24,)}
    # checkpoints are unaffected: a flat optimizer takes the N-D one's state
    ref.load_state_dict(opt.state_dict())
    # CPU tensors of any shape, as param and as grad
    t = torch.ones(2, 5, dtype=torch.float64)
    topt = fastopt.SGD(t, lr=0.5)
    topt.step(torch.ones(2, 5, dtype=torch.float64))
    topt.step(np.ones((5, 2)))
    assert (t == 0).all() and topt.param.shape == (2, 5)
    with pytest.raises(ValueError, match="grad must be C-contiguous"):
        topt.step(torch.ones(5, 2, dtype=torch.float64).t())   # a transposed tensor
    with pytest.raises(ValueError, match="param must be C-contiguous"):
        fastopt.SGD(torch.ones(5, 2).t())
    assert (t == 0).all()
    # the functional calls: every buffer may have any shape of the right size
    p, m, v = np.zeros((2, 3)), np.zeros((3, 2)), np.zeros(6)
    fastopt.functional.adam(p, np.ones((6, 1)), m, v, step=1, lr=0.1)
    np.testing.assert_allclose(p, np.full((2, 3), -0.1), rtol=1e-7)
    assert m.shape == (3, 2) and np.allclose(m, 0.1)
    # a 0-d array is a one-element parameter
    s = np.array(1.0)
    fastopt.SGD(s, lr=1.0).step(np.array(0.25))
    assert s == 0.75


def test_buffer_protocol_objects():
    import array
    p = array.array("d", [1.0, 2.0, 3.0])
    fastopt.SGD(p, lr=1.0).step(array.array("d", [1.0, 1.0, 1.0]))
    assert list(p) == [0.0, 1.0, 2.0]


def test_empty_buffer_is_a_noop(backend):
    for name in RULES:
        opt = getattr(fastopt, name)(backend.asarray(np.zeros(0, F32)), **backend.kw())
        opt.step(backend.asarray(np.zeros(0, F32)))
        assert opt.step_count == 1


# --------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------

def test_default_import_uses_the_compiled_backend():
    """A build that silently fell back to Numba (or lost AVX2/OpenMP) fails here."""
    if os.environ.get("FASTOPT_BACKEND"):
        pytest.skip("FASTOPT_BACKEND forces a backend in this run")
    assert fastopt.backend() == "cython"
    compiled = backends.load("cython")
    assert backends.DEFAULT is compiled
    if compiled.module.cpu_has_avx2_fma():
        assert compiled.ISA == "avx2-fma"
    if os.environ.get("FASTOPT_EXPECT_OPENMP", "1") == "1":
        assert compiled.HAVE_OPENMP, "built without OpenMP"
    assert fastopt.Adam(np.ones(3, F32)).backend == "cython"


def test_forced_backend_and_bad_backend_names():
    code = "import fastopt; print(fastopt.backend())"
    env = {**os.environ, "FASTOPT_BACKEND": "numba"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numba"
    env["FASTOPT_BACKEND"] = "fortran"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTOPT_BACKEND" in out.stderr
    with pytest.raises(ValueError, match="unknown backend"):
        fastopt.Adam(np.ones(3, F32), backend="fortran")


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="n must be >= 1"):
        fastopt.set_num_threads(0)
    with pytest.raises(TypeError):
        fastopt.set_num_threads(1.5)


# --------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RULES))
def test_functional_matches_class(name):
    rule = RULES[name]
    hp = combos(name)[-1]
    p1, p2 = initial_param(N, F32), initial_param(N, F32)
    opt = getattr(fastopt, name)(p1, **hp)
    bufs = {b.name: np.full(N, b.fill(hp), F32) for b in rule.buffers if b.needed(hp)}
    scalars = {}
    fn = getattr(fastopt.functional, name.lower())
    for t, g in enumerate(grads(N, 20, F32), start=1):
        opt.step(g)
        scalars = fn(p2, g, **bufs, step=t, **hp, **scalars)
    np.testing.assert_array_equal(p1, p2)
    for key, buf in bufs.items():
        np.testing.assert_array_equal(opt.state[key], buf)
    assert scalars == opt.state_dict()["scalars"]


def test_functional_errors():
    p, g, m, v = (np.zeros(N, F32) for _ in range(4))
    with pytest.raises(TypeError, match="max_exp_avg_sq is required"):
        fastopt.functional.adam(p, g, m, v, step=1, amsgrad=True)
    with pytest.raises(ValueError, match="step must be >= 1"):
        fastopt.functional.adam(p, g, m, v, step=0)
    with pytest.raises(TypeError, match="step"):
        fastopt.functional.adam(p, g, m, v)
    with pytest.raises(TypeError, match="mu_product is required"):
        fastopt.functional.nadam(p, g, m, v, step=2)
    with pytest.raises(ValueError, match="exp_avg_sq shares memory with exp_avg"):
        fastopt.functional.adam(p, g, m, m, step=1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastopt.functional.sgd(p, g, step=1, lr=-1.0)
    assert (p == 0).all() and (m == 0).all()


# --------------------------------------------------------------------------
# FlatParams
# --------------------------------------------------------------------------

def test_flat_params_one_call_updates_every_tensor():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 3, 5), (), (7,)]
    arrays = [rng.standard_normal(s).astype(F32) for s in shapes]
    flat = fastopt.FlatParams(arrays)
    assert flat.numel == sum(int(np.prod(s)) for s in shapes) and len(flat) == 5
    for v, a in zip(flat.views, arrays):
        assert v.shape == a.shape and np.shares_memory(v, flat.data)
        np.testing.assert_array_equal(v, a)
    for gv in flat.grad_views:
        assert np.shares_memory(gv, flat.grad)
        gv[...] = 1.0
    opt = fastopt.Adam(flat, lr=0.1)
    opt.step(flat.grad)
    for v, a in zip(flat.views, arrays):
        np.testing.assert_allclose(v, a - 0.1, atol=1e-6)
    out = [np.empty(s, F32) for s in shapes]
    flat.copy_to(out)
    for o, v in zip(out, flat.views):
        np.testing.assert_array_equal(o, v)
    assert flat.data.ctypes.data % 64 == 0


def test_flat_params_errors():
    with pytest.raises(ValueError, match="empty"):
        fastopt.FlatParams([])
    with pytest.raises(TypeError, match="dtype"):
        fastopt.FlatParams([np.ones(3)], dtype=np.int32)
    with pytest.raises(TypeError, match="list of arrays"):
        fastopt.FlatParams(np.ones(3))


# --------------------------------------------------------------------------
# Subnormals: flushed inside the compiled kernels by default, IEEE when asked;
# the caller's floating-point state is restored either way
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 100003])  # serial path and OpenMP workers
def test_flush_denormals_and_caller_state(n):
    from fastopt import reference
    tiny = np.float32(1e-39)  # subnormal in float32
    g = np.full(n, tiny, F32)
    assert fastopt.get_flush_denormals() is True
    opt = fastopt.Adam(np.ones(n, F32))
    opt.step(g)
    assert (opt.state["exp_avg"] == 0).all()  # DAZ: the subnormal gradient read as 0
    # the caller's state is untouched: NumPy still produces subnormals
    assert (np.array([1e-38], F32) * F32(1e-3))[0] != 0
    fastopt.set_flush_denormals(False)
    try:
        p = np.ones(n, F32)
        opt = fastopt.Adam(p)
        ref_p, st = np.ones(n, F32), reference.initial_state("Adam", opt.hyperparameters, n, F32)
        for t in (1, 2, 3):
            opt.step(g)
            reference.step("Adam", ref_p, g, st, {}, opt.hyperparameters, t)
        np.testing.assert_array_equal(p, ref_p)
        np.testing.assert_array_equal(opt.state["exp_avg"], st["exp_avg"])
        assert (opt.state["exp_avg"] != 0).all()
    finally:
        fastopt.set_flush_denormals(True)
    with pytest.raises(TypeError):
        fastopt.set_flush_denormals("no")


def test_every_backend_has_every_registry_kernel(backend):
    from fastopt.rules import KERNELS
    for name in KERNELS:
        assert callable(getattr(backend.module, name)), name
