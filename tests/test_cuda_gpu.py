"""The GPU lane: the CUDA backend on a real GPU, at real sizes.

Run it with one command on a machine with an NVIDIA GPU::

    FASTOPT_GPU_TESTS=1 python -m pytest -m gpu tests/test_cuda_gpu.py

Everywhere else (no GPU, the simulator, or the switch unset) these tests are
skipped, not failed. What the simulator cannot show is checked here:

* NVVM's FMA contraction: every rule, float32 and float64, bit for bit against
  the Numba CPU backend, at lengths that span many blocks of the device-sized
  grid and end in a partial block (n = 2**20 + 3) and a small one (n = 1000);
* torch CUDA tensors and CuPy arrays through ``bind`` (the torch adapter's path),
  including a parameter that requires grad and a launch on torch's current
  non-default stream;
* FlatParams of torch and CuPy arrays: one device buffer, device views;
* the hot path makes no driver pointer query once a gradient has been seen.

Each kernel variant compiles once (``cache=True`` keeps it on disk for the next
run); the whole lane is meant to finish in well under 5 minutes.
"""

import os

import numpy as np
import pytest

from fastopt import backends
from cases import CUDA_CASES
from fastopt.rules import RULES

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ENABLED = os.environ.get("FASTOPT_GPU_TESTS") == "1"


def _gpu_reason():
    if not ENABLED:
        return "GPU lane: set FASTOPT_GPU_TESTS=1 (and run on a GPU) to run it"
    if SIMULATED:
        return "GPU lane: NUMBA_ENABLE_CUDASIM=1, no real GPU in use"
    try:
        from numba import cuda
        if not cuda.is_available():
            return "GPU lane: no CUDA device found"
    except Exception as exc:  # a broken driver or numba-cuda
        return f"GPU lane: Numba CUDA unavailable ({exc})"
    return None


REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

LENGTHS = (1000, 2 ** 20 + 3)
STEPS = 12  # RAdam: rectified from t = 6; ASGD: averaging from t = 4


@pytest.fixture(autouse=True)
def device_grid(monkeypatch):
    # the real configuration (the simulator-sized one of conftest must not leak in)
    cuda_be = backends.load("cuda")
    monkeypatch.setattr(cuda_be, "BLOCK_SIZE", 256)
    monkeypatch.setattr(cuda_be, "MAX_BLOCKS", None)
    return cuda_be


def _grads(n, dtype, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(n).astype(dtype)
        g[rng.random(n) < 0.1] = 0
        if t == 5:
            g[3], g[5] = np.nan, -np.inf
        out.append(g)
    return out


def _bits_equal(e, a):
    view = np.uint32 if e.dtype == np.float32 else np.uint64
    bad = (e.view(view) != a.view(view)) & ~(np.isnan(e) & np.isnan(a))
    return np.flatnonzero(bad)


def _run(name, hp, n, dtype, put, get, backend, bound):
    """Every step of one case; the final param and state on the host."""
    rule = RULES[name]
    hp = rule.check_hypers({**rule.defaults, **hp})
    rng = np.random.default_rng(0)
    param = put(rng.standard_normal(n).astype(dtype))
    bufs = [put(np.full(n, b.fill(hp), dtype)) if b.needed(hp) else None
            for b in rule.buffers]
    kernel = getattr(backend, rule.kernel)
    b = backends.bind(backend, rule.kernel, param, bufs) if bound else None
    scalars = rule.initial_scalars(hp)
    for t, g in enumerate(_grads(n, dtype), 1):
        args, scalars = rule.plan(hp, t, scalars, False)
        if b is not None:
            b.step(put(g), args, 1)
        else:
            kernel(param, put(g), *bufs, *args, 1)
    return [get(param)] + [get(x) for x in bufs if x is not None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", CUDA_CASES, ids=[f"{n}{sorted(h.items())}" for n, h in CUDA_CASES])
def test_gpu_bitwise_equal_to_cpu(name, hp, dtype, device_grid):
    from numba import cuda
    numba_cpu = backends.load("numba")
    for n in LENGTHS:
        ref = _run(name, hp, n, dtype, lambda a: a, lambda a: a, numba_cpu, False)
        got = _run(name, hp, n, dtype, cuda.to_device, lambda a: a.copy_to_host(),
                   device_grid, True)
        for k, (e, a) in enumerate(zip(ref, got)):
            bad = _bits_equal(e, a)
            assert bad.size == 0, (f"{name} {hp} {np.dtype(dtype).name} n={n}: array {k} "
                                   f"differs at {bad.size} elements, first {bad[0]}: "
                                   f"{e[bad[0]]!r} != {a[bad[0]]!r}")


def test_gpu_torch_tensors_through_bind_on_torch_stream(device_grid):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    name, hp = "Adam", {"amsgrad": True, "weight_decay": 0.1}
    n, dtype = 2 ** 20 + 3, np.float32
    numba_cpu = backends.load("numba")
    ref = _run(name, hp, n, dtype, lambda a: a, lambda a: a, numba_cpu, False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        def put(a):
            return torch.from_numpy(a).cuda()
        rule = RULES[name]
        full = rule.check_hypers({**rule.defaults, **hp})
        rng = np.random.default_rng(0)
        param = put(rng.standard_normal(n).astype(dtype)).requires_grad_(True)
        bufs = [put(np.full(n, b.fill(full), dtype)) if b.needed(full) else None
                for b in rule.buffers]
        be = backends.for_array(param.detach())
        assert be.NAME == "cuda"
        bound = backends.bind(be, rule.kernel, param, bufs)
        scalars = rule.initial_scalars(full)
        for t, g in enumerate(_grads(n, dtype), 1):
            args, scalars = rule.plan(full, t, scalars, False)
            bound.step(put(g), args, 1)
    stream.synchronize()
    got = [param.detach().cpu().numpy()] + [b.cpu().numpy() for b in bufs if b is not None]
    for e, a in zip(ref, got):
        assert _bits_equal(e, a).size == 0
    with pytest.raises(TypeError, match="grad has dtype"):
        bound.step(torch.ones(n, dtype=torch.float64, device="cuda"), args, 1)
    with pytest.raises(ValueError, match="grad has length"):
        bound.step(torch.ones(n - 1, device="cuda"), args, 1)


def test_gpu_no_driver_query_on_the_hot_path(device_grid, monkeypatch):
    from numba import cuda
    rule = RULES["Adam"]
    hp = rule.check_hypers(rule.defaults)
    n = 1000
    p, m, v, g = (cuda.to_device(np.ones(n, np.float32)) for _ in range(4))
    bound = backends.bind(device_grid, rule.kernel, p, [m, v, None])
    args, _ = rule.plan(hp, 1, {}, False)
    bound.step(g, args, 1)

    def forbidden(ptr):
        raise AssertionError("driver pointer query on the hot path")
    monkeypatch.setattr(device_grid, "_pointer_device", forbidden)
    for _ in range(3):
        bound.step(g, args, 1)
    cuda.synchronize()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gpu_list_of_arrays_is_one_launch_bitwise_equal_to_cpu(dtype, device_grid):
    """bind_many's device segment table (_load/_store through raw addresses) against
    the compiled CPU engine, on a transformer-like list of many small arrays."""
    import fastopt
    from numba import cuda
    rng = np.random.default_rng(5)
    shapes = [(int(n),) for n in rng.integers(0, 3000, 130)] + [(2 ** 20 + 3,), (7, 9)]
    cpu = [rng.standard_normal(s).astype(dtype) for s in shapes]
    dev = [cuda.to_device(a) for a in cpu]
    hp = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ref, opt = fastopt.AdamW(cpu, **hp), fastopt.AdamW(dev, **hp)
    for step in range(5):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ref.step(gs)
        opt.step([cuda.to_device(g) for g in gs])
    for a, d in zip(cpu, dev):
        np.testing.assert_array_equal(d.copy_to_host(), a)


@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_gpu_flat_params_of_library_arrays(library, device_grid):
    lib = pytest.importorskip(library)
    import fastopt
    shapes = [(3, 4), (5,), (257, 3), (1,)]
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if library == "torch":
        if not lib.cuda.is_available():
            pytest.skip("torch without CUDA")
        arrays = [lib.from_numpy(a).cuda().requires_grad_(True) for a in host]

        def to_np(x):
            return x.detach().cpu().numpy()
    else:
        arrays = [lib.asarray(a) for a in host]

        def to_np(x):
            return lib.asnumpy(x)
    flat = fastopt.FlatParams(arrays)
    assert type(flat.data) is type(arrays[0]) if library == "cupy" else \
        isinstance(flat.data, lib.Tensor)
    for v, gv, a in zip(flat.views, flat.grad_views, host):
        np.testing.assert_array_equal(to_np(v), a)
        gv[...] = 1.0
    opt = fastopt.Adam(flat, lr=0.1)
    opt.step(flat.grad)
    for v, a in zip(flat.views, host):
        np.testing.assert_allclose(to_np(v), a - 0.1, atol=1e-6)


def test_gpu_direct_launch_equals_dispatcher_launch(device_grid, monkeypatch):
    from numba import cuda
    name, hp, n = "RMSprop", {"centered": True, "momentum": 0.9}, 2 ** 20 + 3
    results = []
    for direct in (True, False):
        monkeypatch.setattr(device_grid, "DIRECT_LAUNCH", direct)
        results.append(_run(name, hp, n, np.float32, cuda.to_device,
                            lambda a: a.copy_to_host(), device_grid, True))
    for e, a in zip(*results):
        assert _bits_equal(e, a).size == 0


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adagrad"])
def test_gpu_torch_adapter_on_a_cuda_model(name, device_grid):
    """fastopt.torch on a CUDA model, two param groups, 20 steps: the parameters are
    views of one device buffer per group, and the run stays close to the same run on
    the CPU and to torch's fused CUDA optimizer."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import fastopt.torch as ft
    kw = {"momentum": 0.9} if name == "SGD" else {}

    def run(device, impl, **extra):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(),
                                    torch.nn.LayerNorm(300), torch.nn.Linear(300, 10))
        model = model.to(device)
        x = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)).to(device)
        y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(2))
        y = y.to(device)
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        opt = getattr(impl, name)([{"params": decay, "weight_decay": 0.01},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-2, **kw, **extra)
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        return model, opt

    gpu_model, gpu_opt = run("cuda", ft)
    flat = gpu_opt._flat[0][0].flat
    for p in gpu_opt.param_groups[0]["params"]:
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    cpu_model, _ = run("cpu", ft)
    for pg, pc in zip(gpu_model.parameters(), cpu_model.parameters()):
        # the forward/backward differ between devices (cuBLAS vs MKL), so the
        # parameters are compared with a tolerance; the kernels' bitwise agreement
        # is test_gpu_bitwise_equal_to_cpu's
        torch.testing.assert_close(pg.cpu(), pc, rtol=1e-4, atol=1e-5)
    ref_model, _ = run("cuda", torch.optim, fused=True)
    for pg, pr in zip(gpu_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(pg, pr, rtol=1e-4, atol=1e-5)
