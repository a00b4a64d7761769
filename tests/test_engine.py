"""The segment engine: a kernel call over many arrays gives exactly the bits of each
array stepped alone and of the same arrays packed into one FlatParams buffer, on
every backend and thread count; bad entries are named by index and write nothing;
the generated kernel tables are current."""

import numpy as np
import pytest

import fastopt
from cases import CUDA_CASES, case_id, combos, grads
from fastopt import backends
from fastopt.kernels import generate
from fastopt.rules import RULES

F32, F64 = np.float32, np.float64

# odd lengths (SIMD tails), empty and 1-element arrays, N-D shapes, and one array
# big enough that the total crosses the parallel threshold, so parts are cut inside
# segments and across segment ends
SHAPES = [(7,), (0,), (1,), (1031,), (3, 17), (40009,), (2, 3, 5)]
STEPS = 3


def _model(shapes, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _grads(shapes, dtype, step):
    rng = np.random.default_rng(100 + step)
    return [(rng.standard_normal(s) * np.exp(rng.uniform(-3, 1, s))).astype(dtype)
            for s in shapes]


def _run_list(name, hp, shapes, dtype, nthreads, backend="cython"):
    params = _model(shapes, dtype)
    fastopt.set_num_threads(nthreads)
    try:
        opt = getattr(fastopt, name)(params, backend=backend, **hp)
        for t in range(STEPS):
            opt.step(_grads(shapes, dtype, t))
    finally:
        fastopt.set_num_threads(2)
    return params, opt


def _run_alone(name, hp, shapes, dtype, backend="cython"):
    params = _model(shapes, dtype)
    fastopt.set_num_threads(1)
    try:
        opts = [getattr(fastopt, name)(p, backend=backend, **hp) for p in params]
        for t in range(STEPS):
            for o, g in zip(opts, _grads(shapes, dtype, t)):
                o.step(g)
    finally:
        fastopt.set_num_threads(2)
    return params, opts


def _run_flat(name, hp, shapes, dtype, backend="cython"):
    flat = fastopt.FlatParams(_model(shapes, dtype))
    opt = getattr(fastopt, name)(flat, backend=backend, **hp)
    for t in range(STEPS):
        for view, g in zip(flat.grad_views, _grads(shapes, dtype, t)):
            view[...] = g
        opt.step(flat.grad)
    return flat.views, opt


def _same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
        f"max |diff| {np.nanmax(np.abs(a.astype(F64) - b.astype(F64)))}"


def test_generated_tables_are_current():
    assert generate.main(["--check"]) == 0, "run: python -m fastopt.kernels.generate"


ALL = [pytest.param(name, hp, id=f"{name}[{case_id(hp, name)}]")
       for name in RULES for hp in combos(name)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", ALL)
def test_list_equals_alone_and_flat_compiled(name, hp, dtype):
    alone, opts = _run_alone(name, hp, SHAPES, dtype)
    flat, flat_opt = _run_flat(name, hp, SHAPES, dtype)
    for nthreads in (1, 2, 3):
        params, opt = _run_list(name, hp, SHAPES, dtype, nthreads)
        for i, (p, a, f) in enumerate(zip(params, alone, flat)):
            _same_bits(p, a)
            _same_bits(p, f)
            assert set(opt.state[i]) == set(opts[i].state)
            for key, buf in opt.state[i].items():
                _same_bits(buf, opts[i].state[key])
        assert opt.state_dict()["scalars"] == opts[0].state_dict()["scalars"]


# the Numba CPU backend compiles per kernel, dtype and buffer set (seconds each):
# one case per kernel path on the serial loop, float32 and float64 for one rule, and
# the parallel loop in test_thousands_of_tiny_arrays
SMALL = [(7,), (0,), (1,), (1031,), (3, 17)]


@pytest.mark.parametrize("name,hp,dtype", [
    pytest.param(n, hp, dt, id=f"{n}[{case_id(hp, n)}]-{np.dtype(dt).name}")
    for n, hp in CUDA_CASES for dt in ((F32, F64) if n == "Adam" else (F32,))])
def test_list_on_numba_equals_compiled(name, hp, dtype):
    hp = {**RULES[name].defaults, **hp}
    ref, _ = _run_list(name, hp, SMALL, dtype, 1)
    params, _ = _run_list(name, hp, SMALL, dtype, 1, backend="numba")
    for p, r in zip(params, ref):
        _same_bits(p, r)


@pytest.mark.parametrize("name,hp", [pytest.param(n, hp, id=f"{n}[{case_id(hp, n)}]")
                                     for n, hp in CUDA_CASES])
def test_list_on_cuda_equals_compiled(name, hp, monkeypatch):
    """One launch over the device segment table (the simulator; the GPU lane runs
    the same on a GPU): 2 blocks of 32 threads stride over 4 segments."""
    from numba import cuda
    cuda_backend = backends.load("cuda")
    monkeypatch.setattr(cuda_backend, "BLOCK_SIZE", 32)
    monkeypatch.setattr(cuda_backend, "MAX_BLOCKS", 2)
    hp = {**RULES[name].defaults, **hp}
    shapes = [(7,), (0,), (1,), (70,)]
    ref, _ = _run_list(name, hp, shapes, F32, 1)
    params = [cuda.to_device(p) for p in _model(shapes, F32)]
    opt = getattr(fastopt, name)(params, **hp)
    assert type(opt._bound).__name__ == "SegmentBound"
    for t in range(STEPS):
        opt.step([cuda.to_device(g) for g in _grads(shapes, F32, t)])
    for p, r in zip(params, ref):
        _same_bits(p.copy_to_host(), r)


def test_cuda_list_bad_gradient_named_and_nothing_written():
    from numba import cuda
    params = [cuda.to_device(p) for p in _model([(5,), (9,)], F32)]
    opt = fastopt.Adam(params, lr=0.1)
    before = [p.copy_to_host() for p in params]
    for bad, exc, word in (([cuda.to_device(np.ones(5, F32)), cuda.to_device(np.ones(8, F32))],
                            ValueError, "grad[1]"),
                           ([cuda.to_device(np.ones(5, F32)), params[1]], ValueError,
                            "grad[1] shares memory with param[1]"),
                           ([cuda.to_device(np.ones(5, F32)), cuda.to_device(np.ones(9))],
                            TypeError, "grad[1]"),
                           ([np.ones(5, F32), cuda.to_device(np.ones(9, F32))], TypeError,
                            "grad[0]")):
        with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
            opt.step(bad)
        for p, b in zip(params, before):
            _same_bits(p.copy_to_host(), b)


def test_cuda_run_segments_equals_bound():
    from numba import cuda
    cuda_backend = backends.load("cuda")
    rule = RULES["RMSprop"]
    hp = rule.check_hypers({**rule.defaults, "momentum": 0.9, "centered": True})
    shapes = [(7,), (33,)]
    params = [cuda.to_device(p) for p in _model(shapes, F64)]
    twin = [cuda.to_device(p) for p in _model(shapes, F64)]
    grads_ = [cuda.to_device(g) for g in _grads(shapes, F64, 0)]
    state = [[cuda.to_device(np.zeros(s, F64)) for _ in range(3)] for s in shapes]
    addr = lambda a: a.__array_interface__["data"][0] if hasattr(a, "__array_interface__") \
        else a.__cuda_array_interface__["data"][0]  # noqa: E731
    ptrs = np.array([[addr(p), addr(g)] + [addr(b) for b in st]
                     for p, g, st in zip(params, grads_, state)], dtype=np.uintp)
    args, _ = rule.plan(hp, 1, {}, False)
    cuda_backend.run_segments("rmsprop", np.dtype(F64), ptrs,
                              np.array([7, 33], dtype=np.intp), args, 1)
    opt = fastopt.RMSprop(twin, **hp)
    opt.step(grads_)
    for p, q in zip(params, twin):
        _same_bits(p.copy_to_host(), q.copy_to_host())
    bad = ptrs.copy()
    bad[1, 1] = ptrs[0, 2]
    with pytest.raises(ValueError, match="shares memory"):
        cuda_backend.run_segments("rmsprop", np.dtype(F64), bad,
                                  np.array([7, 33], dtype=np.intp), args, 1)


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_thousands_of_tiny_arrays(backend):
    rng = np.random.default_rng(3)
    shapes = [(int(n),) for n in rng.integers(0, 40, 3000)]
    shapes += [(40000,)]  # past the parallel threshold: parts cut across many segments
    hp = dict(lr=1e-2, weight_decay=0.1)
    flat, _ = _run_flat("AdamW", hp, shapes, F32, backend)
    for nthreads in (1, 2):
        params, _ = _run_list("AdamW", hp, shapes, F32, nthreads, backend)
        for p, f in zip(params, flat):
            _same_bits(p, f)


def test_mixed_dtypes_are_one_call_per_dtype():
    shapes = [(5,), (3, 4), (7,), (2,)]
    dtypes = [F32, F64, F32, F64]
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    alone = [p.copy() for p in params]
    opt = fastopt.Adam(params, lr=0.1)
    opts = [fastopt.Adam(a, lr=0.1) for a in alone]
    assert len(opt._groups) == 2
    for t in range(3):
        gs = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        opt.step(gs)
        for o, g in zip(opts, gs):
            o.step(g)
    for p, a in zip(params, alone):
        _same_bits(p, a)
    # a bad gradient in the second dtype group: the first group is not written either
    before = [p.copy() for p in params]
    bad = [np.ones(s, d) for s, d in zip(shapes, dtypes)]
    bad[3] = np.ones(2, F32)
    with pytest.raises(TypeError, match=r"grad\[3\]"):
        opt.step(bad)
    for p, b in zip(params, before):
        _same_bits(p, b)
    assert opt.step_count == 3


def _snapshot(opt):
    return ([np.array(p, copy=True) for p in opt.param],
            [{k: v.copy() for k, v in st.items()} for st in opt.state])


def _assert_unchanged(before, opt):
    params, states = before
    for p, b in zip(opt.param, params):
        _same_bits(np.asarray(p), b)
    for st, b in zip(opt.state, states):
        for k, v in st.items():
            _same_bits(v, b[k])


def _fresh_list(backend="cython"):
    params = _model([(5,), (3, 4), (9,)], F32)
    opt = fastopt.Adam(params, lr=0.1, amsgrad=True, backend=backend)
    opt.step([np.ones_like(p) for p in params])
    return opt


BAD_GRAD_LISTS = [
    ("short list", lambda o: [np.ones_like(p) for p in o.param][:2], ValueError, ["grad", "2"]),
    ("not a list", lambda o: np.ones(5, F32), TypeError, ["grad", "list"]),
    ("wrong dtype", lambda o: [np.ones_like(o.param[0]), np.ones((3, 4), F64),
                               np.ones(9, F32)], TypeError, ["grad[1]", "float64"]),
    ("wrong size", lambda o: [np.ones(5, F32), np.ones(11, F32), np.ones(9, F32)],
     ValueError, ["grad[1]", "11"]),
    ("strided", lambda o: [np.ones(5, F32), np.ones((3, 8), F32)[:, ::2], np.ones(9, F32)],
     ValueError, ["grad[1]", "contiguous"]),
    ("None entry", lambda o: [np.ones(5, F32), None, np.ones(9, F32)], TypeError,
     ["grad[1]", "None"]),
    ("is its param", lambda o: [np.ones(5, F32), np.ones((3, 4), F32), o.param[2]],
     ValueError, ["grad[2]", "param[2]"]),
    ("is another param", lambda o: [o.param[2][:5], np.ones((3, 4), F32), np.ones(9, F32)],
     ValueError, ["grad[0]", "param[2]"]),
    ("is a state buffer", lambda o: [np.ones(5, F32), o.state[1]["exp_avg_sq"],
                                     np.ones(9, F32)], ValueError,
     ["grad[1]", "exp_avg_sq[1]"]),
]


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("case,make,exc,words", BAD_GRAD_LISTS,
                         ids=[c[0] for c in BAD_GRAD_LISTS])
def test_bad_gradient_list_is_named_and_nothing_is_written(backend, case, make, exc, words):
    opt = _fresh_list(backend)
    grad = make(opt)
    before = _snapshot(opt)
    with pytest.raises(exc) as info:
        opt.step(grad)
    for word in words:
        assert word in str(info.value), (case, str(info.value))
    _assert_unchanged(before, opt)
    assert opt.step_count == 1
    opt.step([np.ones_like(p) for p in opt.param])  # still usable
    assert opt.step_count == 2


def test_gradients_may_share_memory_with_each_other():
    params = _model([(5,), (5,)], F32)
    g = np.ones(5, F32)
    opt = fastopt.SGD(params, lr=0.5)
    opt.step([g, g])  # read-only: the same gradient twice is fine
    assert np.allclose(params[0], _model([(5,)], F32)[0] - 0.5)


BAD_PARAM_LISTS = [
    ("the same array twice", lambda: (lambda a: [a, a])(np.ones(4, F32)), ValueError,
     ["param[1]", "param[0]"]),
    ("overlapping views", lambda: (lambda a: [a[:6], a[4:]])(np.ones(10, F32)), ValueError,
     ["param[1]", "param[0]"]),
    ("non-contiguous", lambda: [np.ones(3, F32), np.ones((4, 4), F32).T], ValueError,
     ["param[1]", "contiguous"]),
    ("read-only", lambda: [np.ones(3, F32), np.frombuffer(b"\0" * 16, F32)], ValueError,
     ["param[1]", "read-only"]),
    ("a number", lambda: [np.ones(3, F32), 2.0], TypeError, ["param[1]"]),
    ("a FlatParams inside", lambda: [np.ones(3, F32), fastopt.FlatParams([np.ones(2)])],
     TypeError, ["param[1]", "FlatParams"]),
    ("empty", lambda: [], ValueError, ["param", "empty"]),
]


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("case,make,exc,words", BAD_PARAM_LISTS,
                         ids=[c[0] for c in BAD_PARAM_LISTS])
def test_bad_param_list_is_named(backend, case, make, exc, words):
    params = make()
    with pytest.raises(exc) as info:
        fastopt.Adam(params, backend=backend)
    for word in words:
        assert word in str(info.value), (case, str(info.value))


def test_list_state_and_params_are_per_array():
    params = _model([(3, 4), (5,)], F32)
    opt = fastopt.RMSprop(params, momentum=0.9, centered=True)
    assert opt.param[0] is params[0] and opt.param[1] is params[1]
    assert [sorted(s) for s in opt.state] == [["grad_avg", "momentum_buffer", "square_avg"]] * 2
    assert opt.state[0]["square_avg"].shape == (12,)
    opt.momentum = 0.0  # a buffer the kernel no longer uses stays in state, as in torch
    opt.step([np.ones_like(p) for p in params])
    assert "momentum_buffer" in opt.state[1]


def test_list_checkpoint_round_trip_is_bitwise(tmp_path):
    shapes = [(5,), (3, 4), (0,), (40001,)]
    params = _model(shapes, F32)
    opt = fastopt.NAdam(params, lr=1e-2, weight_decay=0.1)
    for t in range(3):
        opt.step(_grads(shapes, F32, t))
    fastopt.save(opt.state_dict(), tmp_path / "ck.npz")
    snapshot = [p.copy() for p in params]
    for t in range(3, 6):
        opt.step(_grads(shapes, F32, t))
    resumed = [s.copy() for s in snapshot]
    opt2 = fastopt.NAdam(resumed, lr=0.5)
    opt2.load_state_dict(fastopt.load(tmp_path / "ck.npz"))
    assert opt2.step_count == 3 and opt2.lr == 1e-2
    for t in range(3, 6):
        opt2.step(_grads(shapes, F32, t))
    for a, b in zip(params, resumed):
        _same_bits(a, b)
    # a checkpoint of another list is refused whole
    other = fastopt.NAdam(_model(shapes[:2], F32))
    with pytest.raises(ValueError, match="one per array"):
        other.load_state_dict(opt.state_dict())
    one = fastopt.NAdam(np.zeros(5, F32))
    with pytest.raises(ValueError, match="size"):
        one.load_state_dict(opt.state_dict())


def _table(arrays_by_slot):
    return np.array([[0 if a is None else a.ctypes.data for a in row]
                     for row in arrays_by_slot], dtype=np.uintp)


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_run_segments_equals_bound_step(backend):
    be = backends.load(backend)
    rule = RULES["Adam"]
    hp = rule.check_hypers({**rule.defaults, "amsgrad": True, "lr": 0.1})
    shapes = [(7,), (40000,), (0,), (1031,)]
    params, grads_ = _model(shapes, F32), _grads(shapes, F32, 0)
    state = [[np.zeros(p.size, F32) for _ in range(3)] for p in params]
    twin = [p.copy() for p in params]
    opt = fastopt.Adam(twin, backend=backend, **hp)
    args, _ = rule.plan(hp, 1, {}, False)
    ptrs = _table([[p, g, *s] for p, g, s in zip(params, grads_, state)])
    lengths = np.array([p.size for p in params], dtype=np.intp)
    be.run_segments("adam", np.dtype(F32), ptrs, lengths, args, 2)
    opt.step(grads_)
    for p, q in zip(params, twin):
        _same_bits(p, q)
    # a gradient that is a state buffer of another segment: refused, nothing written
    bad = ptrs.copy()
    bad[0, 1] = state[3][1].ctypes.data
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="shares memory"):
        be.run_segments("adam", np.dtype(F32), bad, lengths, args, 2)
    for p, b in zip(params, before):
        _same_bits(p, b)
    with pytest.raises(ValueError, match="columns"):
        be.run_segments("adam", np.dtype(F32), np.ascontiguousarray(ptrs[:, :4]), lengths,
                        args, 2)
    with pytest.raises(TypeError):
        be.run_segments("adam", np.dtype(np.int32), ptrs, lengths, args, 2)
    # element types per slot: the same call spelled slot by slot runs; a signature no
    # kernel is specialised for (a float64 gradient for float32 params) is refused
    before = [p.copy() for p in params]
    be.run_segments("adam", (np.dtype(F32),) * 5, ptrs, lengths, args, 2)
    assert any(not np.array_equal(p, b) for p, b in zip(params, before))
    before = [p.copy() for p in params]
    mixed = (np.dtype(F32), np.dtype(F64)) + (np.dtype(F32),) * 3
    with pytest.raises(TypeError, match="grad float64"):
        be.run_segments("adam", mixed, ptrs, lengths, args, 2)
    for p, b in zip(params, before):
        _same_bits(p, b)
