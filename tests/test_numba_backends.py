"""The Numba backends against the compiled one, kernel by kernel.

The kernels are called as fastopt.rules documents them (``plan`` + backend
module), with no Python API in between:

* Numba CPU must give the compiled backend's results bit for bit, for every rule
  and every flag that changes the kernel's path, float32 and float64, serial and
  threaded;
* the CUDA kernels (under the simulator when there is no GPU) must give the
  Numba CPU results bit for bit: the same element functions, in the same type;
* without the compiled extension, fastopt falls back to Numba, and forcing the
  compiled backend then fails loudly;
* bad buffers are refused before anything is written.
"""

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before Numba is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastopt import backends  # noqa: E402
from fastopt.rules import RULES  # noqa: E402
from cases import CUDA_CASES, kernel_paths  # noqa: E402

NUMBA = backends.load("numba")
CYTHON = backends.load("cython") if backends.available("cython") else None
CUDA = backends.load("cuda") if backends.available("cuda") else None

DTYPES = (np.float32, np.float64)
LENGTHS = (1, 7, 1031, 33343)  # 33343 > PARALLEL_MIN: the threaded path
STEPS = 30


# Every branch of each kernel, from the registry (cases.kernel_paths). ASGD's t0 probe
# is small so that averaging (μ ≠ 1) starts within the steps; RAdam's ρ_t crosses
# 5 at t = 6 with β2 = 0.999, so 30 steps see both branches.
CASES = {name: [{k: v for k, v in hp.items() if v != RULES[name].defaults[k]}
                for hp in kernel_paths(name)] for name in RULES}
assert set(CASES) == set(RULES), "every rule needs cases here"


def _case_id(hp):
    return ",".join(f"{k}={v}" for k, v in hp.items()) or "defaults"


PARAMS = [pytest.param(name, hp, id=f"{name}[{_case_id(hp)}]")
          for name, cases in CASES.items() for hp in cases]


def _grads(n, dtype, steps, seed=1):
    """The gradients of every step, drawn once and fed to every backend."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, steps + 1):
        g = rng.standard_normal(n).astype(dtype)
        g[rng.random(n) < 0.1] = 0  # sign(0), Rprop's s == 0
        if t == 5 and n >= 7:  # NaN and inf must propagate identically
            g[3], g[5] = np.nan, -np.inf
        out.append(g)
    return out


class Run:
    """One rule with one set of hyperparameters on one backend: buffers as
    ``Rule.buffers`` says, per-step scalars from ``Rule.plan``."""

    def __init__(self, backend, name, hp, n, dtype, seed=0, put=None, get=None):
        self.rule = RULES[name]
        self.hp = self.rule.check_hypers({**self.rule.defaults, **hp})
        self.kernel = getattr(backend, self.rule.kernel)
        self.put = put or (lambda a: a)
        self.get = get or (lambda a: a)
        rng = np.random.default_rng(seed)
        self.param = self.put(rng.standard_normal(n).astype(dtype))
        self.bufs = [self.put(np.full(n, b.fill(self.hp), dtype)) if b.needed(self.hp) else None
                     for b in self.rule.buffers]
        self.scalars = self.rule.initial_scalars(self.hp)
        self.t = 0

    def step(self, grad, nthreads):
        self.t += 1
        args, self.scalars = self.rule.plan(self.hp, self.t, self.scalars, False)
        self.kernel(self.param, self.put(grad), *self.bufs, *args, nthreads)

    def state(self):
        return [self.get(self.param)] + [self.get(b) for b in self.bufs if b is not None]


def _bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _assert_bitwise(expected, actual, what):
    """Equal bit patterns, except that any NaN equals any NaN: IEEE 754 leaves a
    NaN's sign and payload unspecified, and compilers swap the operands of
    commutative operations (which NaN of g·g + v survives) as they please."""
    for k, (e, a) in enumerate(zip(expected, actual)):
        assert e.dtype == a.dtype
        bad = np.flatnonzero((_bits(e) != _bits(a)) & ~(np.isnan(e) & np.isnan(a)))
        assert bad.size == 0, (
            f"{what}: array {k} differs at {bad.size} elements, first at {bad[0]}: "
            f"{e[bad[0]]!r} != {a[bad[0]]!r}")


# --------------------------------------------------------------------------
# (a) Numba CPU == compiled, bit for bit
# --------------------------------------------------------------------------

@pytest.mark.skipif(CYTHON is None, reason="compiled backend not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", PARAMS)
def test_numba_cpu_matches_compiled_bitwise(name, hp, dtype):
    for n in LENGTHS:
        grads = _grads(n, dtype, STEPS)
        for nthreads in (1, 2):
            ref = Run(CYTHON, name, hp, n, dtype)
            new = Run(NUMBA, name, hp, n, dtype)
            for g in grads:
                ref.step(g, nthreads)
                new.step(g, nthreads)
            _assert_bitwise(ref.state(), new.state(),
                            f"{name} {hp} {np.dtype(dtype).name} n={n} nthreads={nthreads}")


def test_radam_and_asgd_cases_reach_both_branches():
    # the cases above are only worth their name if these hold
    rule = RULES["RAdam"]
    hp = rule.check_hypers(rule.defaults)
    rectified = {rule.plan(hp, t, {}, False)[0][4] for t in range(1, STEPS + 1)}
    assert rectified == {0, 1}
    rule = RULES["ASGD"]
    hp = rule.check_hypers({**rule.defaults, "t0": 5.0})
    s, mus = rule.initial_scalars(hp), set()
    for t in range(1, STEPS + 1):
        args, s = rule.plan(hp, t, s, False)
        mus.add(args[2] == 1.0)
    assert mus == {True, False}


# --------------------------------------------------------------------------
# (b) CUDA kernels (simulator without a GPU) == Numba CPU, bit for bit
# --------------------------------------------------------------------------

CUDA_N = 1000     # > BLOCK_SIZE * MAX_BLOCKS below: several blocks, the stride loop runs
CUDA_STEPS = 12   # RAdam: ρ_t > 5 from t = 6, ASGD: μ ≠ 1 from t = 5


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(CUDA, "BLOCK_SIZE", 32)
    monkeypatch.setattr(CUDA, "MAX_BLOCKS", 2)  # 64 threads: each loops ~16 times


@pytest.mark.skipif(CUDA is None, reason="Numba CUDA (or its simulator) unavailable")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars on NaN
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", [pytest.param(n, h, id=f"{n}[{_case_id(h)}]")
                                     for n, h in CUDA_CASES])
def test_cuda_matches_numba_cpu_bitwise(name, hp, dtype, small_grid):
    from numba import cuda
    ref = Run(NUMBA, name, hp, CUDA_N, dtype)
    dev = Run(CUDA, name, hp, CUDA_N, dtype, put=cuda.to_device,
              get=lambda a: a.copy_to_host())
    for g in _grads(CUDA_N, dtype, CUDA_STEPS):
        ref.step(g, 1)
        dev.step(g, 1)
    _assert_bitwise(ref.state(), dev.state(), f"cuda {name} {hp} {np.dtype(dtype).name}")


@pytest.mark.skipif(CUDA is None, reason="Numba CUDA (or its simulator) unavailable")
def test_cuda_array_helpers(small_grid):
    from numba import cuda
    like = cuda.to_device(np.zeros(3, np.float32))
    buf = CUDA.full(100, np.float32, 0.25, like)
    host = CUDA.to_host(buf)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    assert np.array_equal(host, np.full(100, 0.25, np.float32))
    CUDA.copy_from_host(buf, np.arange(100, dtype=np.float32))
    assert np.array_equal(CUDA.to_host(buf), np.arange(100, dtype=np.float32))
    assert CUDA.as_array(buf) is not None
    assert CUDA.is_device_array(buf) and not CUDA.is_device_array(np.zeros(3))
    with pytest.raises(TypeError):
        CUDA.as_array(np.zeros(3))
    with pytest.raises(TypeError, match="CUDA array"):
        CUDA.adam(np.zeros(3, np.float32), np.zeros(3, np.float32), None, None, None,
                  *([0.1] * 8), 0, 1)
    assert CUDA.max_threads() == 1 and CUDA.NAME == "cuda"


# --------------------------------------------------------------------------
# (c) Selection without the compiled extension
# --------------------------------------------------------------------------

_BLOCK_COMPILED = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in ("fastopt.kernels._baseline", "fastopt.kernels._avx2"):
                raise ImportError(f"{name} blocked by the test")
            return None
    sys.meta_path.insert(0, _Block())
""")

_STEP = textwrap.dedent("""
    import numpy as np
    from fastopt import backends
    from fastopt.rules import RULES
    rule = RULES["Adam"]
    hp = rule.check_hypers(rule.defaults)
    args, _ = rule.plan(hp, 1, {}, False)
    p = np.ones(5, np.float32); g = np.full(5, 0.5, np.float32)
    m, v = np.zeros(5, np.float32), np.zeros(5, np.float32)
    getattr(backends.DEFAULT, rule.kernel)(p, g, m, v, None, *args, 1)
    assert (p < 1).all(), p
    print(backends.DEFAULT.NAME)
""")


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "FASTOPT_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_falls_back_to_numba_without_the_compiled_extension():
    out = _python(_BLOCK_COMPILED + _STEP)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "numba"


def test_forcing_numba_selects_it():
    out = _python(_STEP, FASTOPT_BACKEND="numba")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "numba"


def test_forcing_cython_without_the_extension_is_a_clear_import_error():
    out = _python(_BLOCK_COMPILED + "import fastopt.backends", FASTOPT_BACKEND="cython")
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "fastopt backend 'cython' is unavailable" in out.stderr
    assert "blocked by the test" in out.stderr


# --------------------------------------------------------------------------
# (d) Bad buffers are refused before anything is written
# --------------------------------------------------------------------------

def _adam_args():
    rule = RULES["Adam"]
    return rule.plan(rule.check_hypers({**rule.defaults, "amsgrad": True}), 3, {}, False)[0]


BAD = {
    # name: (make(n, dtype) -> (param, grad, m, v, vmax), error, message regex)
    "length": (lambda n, dt: (np.ones(n, dt), np.ones(n, dt), np.zeros(n - 2, dt),
                              np.zeros(n, dt), np.zeros(n, dt)),
               ValueError, r"exp_avg has 5 elements, param has 7"),
    "grad-length": (lambda n, dt: (np.ones(n, dt), np.ones(n + 1, dt), np.zeros(n, dt),
                                   np.zeros(n, dt), np.zeros(n, dt)),
                    ValueError, r"grad has 8 elements, param has 7"),
    "overlap": (lambda n, dt: (lambda big: (big[:n], np.ones(n, dt), big[n - 1:2 * n - 1],
                                            np.zeros(n, dt), np.zeros(n, dt)))(np.ones(3 * n, dt)),
                ValueError, r"exp_avg shares memory with param"),
    "same-state": (lambda n, dt: (lambda v: (np.ones(n, dt), np.ones(n, dt), np.zeros(n, dt),
                                             v, v))(np.zeros(n, dt)),
                   ValueError, r"max_exp_avg_sq shares memory with exp_avg_sq"),
    "dtype": (lambda n, dt: (np.ones(n, dt), np.ones(n, np.float64 if dt == np.float32
                                                      else np.float32),
                             np.zeros(n, dt), np.zeros(n, dt), np.zeros(n, dt)),
              TypeError, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_buffers_leave_everything_unchanged(bad, dtype):
    make, error, message = BAD[bad]
    for backend in [NUMBA] + ([CYTHON] if CYTHON else []):
        arrays = make(7, dtype)
        before = [a.copy() for a in arrays]
        with pytest.raises(error, match=message):
            backend.adam(*arrays, *_adam_args(), 1)
        for a, b in zip(arrays, before):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [b for b in BAD if b != "dtype"])
def test_bad_buffers_same_error_as_compiled(bad):
    if CYTHON is None:
        pytest.skip("compiled backend not built")
    make, _, _ = BAD[bad]
    errors = []
    for backend in (CYTHON, NUMBA):
        with pytest.raises((TypeError, ValueError)) as info:
            backend.adam(*make(7, np.float32), *_adam_args(), 1)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


def test_param_must_be_writable_contiguous_1d():
    args = _adam_args()
    z = lambda: np.zeros(7, np.float32)  # noqa: E731
    ro = np.ones(7, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        NUMBA.adam(ro, z(), z(), z(), None, *args, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        NUMBA.adam(np.ones(14, np.float32)[::2], z(), z(), z(), None, *args, 1)
    # any C-contiguous shape is its elements in order: (7, 1) steps like (7,)
    shaped = np.ones((7, 1), np.float32)
    NUMBA.adam(shaped, z(), z(), z(), None, *args, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        NUMBA.sgd(np.ones(7, np.int64), np.ones(7, np.int64), None,
                  0.1, 0, 1, 0, 1, 0, 1, 0, 1)
    with pytest.raises(TypeError, match="grad must be a NumPy array"):
        NUMBA.adam(np.ones(7, np.float32), None, z(), z(), None, *args, 1)
    # a read-only gradient is fine: it is only read
    g = np.ones(7, np.float32)
    g.flags.writeable = False
    p = np.ones(7, np.float32)
    NUMBA.adam(p, g, z(), z(), None, *args, 1)
    assert (p < 1).all()


def test_empty_buffers_are_a_no_op():
    e = np.zeros(0, np.float32)
    NUMBA.adam(e, e.copy(), e.copy(), e.copy(), None, *_adam_args(), 2)


@pytest.mark.skipif(CUDA is None, reason="Numba CUDA (or its simulator) unavailable")
@pytest.mark.parametrize("bad", list(BAD))
def test_cuda_bad_buffers_leave_everything_unchanged(bad):
    from numba import cuda
    make, error, message = BAD[bad]
    host = make(7, np.float32)
    if bad in ("overlap", "same-state"):
        # rebuild the aliasing on the device
        big = cuda.to_device(np.ones(21, np.float32))
        v = cuda.to_device(np.zeros(7, np.float32))
        arrays = ((big[:7], cuda.to_device(host[1]), big[6:13], cuda.to_device(host[3]),
                   cuda.to_device(host[4])) if bad == "overlap" else
                  (cuda.to_device(host[0]), cuda.to_device(host[1]), cuda.to_device(host[2]),
                   v, v))
    else:
        arrays = tuple(cuda.to_device(a) for a in host)
    before = [a.copy_to_host() for a in arrays]
    with pytest.raises(error, match=message):
        CUDA.adam(*arrays, *_adam_args(), 1)
    for a, b in zip(arrays, before):
        assert np.array_equal(a.copy_to_host(), b)
