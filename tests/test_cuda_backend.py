"""The CUDA backend's bound steps, kernel variants, grid and rounding, under the
simulator (a real GPU runs them too; the GPU lane is test_cuda_gpu.py).

* a ``Bound`` steps like the plain entry points, bit for bit, whatever sequence
  of gradient arrays it is given (its per-gradient cache must not go stale);
* a bad gradient is refused with an error naming ``grad`` and nothing written,
  and the Bound still works afterwards;
* an absent state buffer is never read (a zero-length stand-in would raise);
* every kernel compiles to IR without a bare multiply (so NVVM has nothing to
  contract into an FMA), checked in a subprocess without the simulator.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastopt import backends  # conftest chose the simulator or a GPU before this
from fastopt.backends import _numba_math as M
from fastopt.rules import RULES

CUDA = backends.load("cuda") if backends.available("cuda") else None
NUMBA = backends.load("numba")
pytestmark = pytest.mark.skipif(CUDA is None, reason="Numba CUDA (or its simulator) unavailable")

N = 97  # 3 blocks of 32 and a tail of 1, each of the 2 blocks' threads striding


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    if CUDA is not None:
        monkeypatch.setattr(CUDA, "BLOCK_SIZE", 32)
        monkeypatch.setattr(CUDA, "MAX_BLOCKS", 2)


def _dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def _adam(amsgrad=True):
    rule = RULES["Adam"]
    hp = rule.check_hypers({**rule.defaults, "amsgrad": amsgrad, "weight_decay": 0.1})
    return rule, hp


def _bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bound_steps_match_numba_cpu_across_changing_gradients(dtype):
    rule, hp = _adam()
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N).astype(dtype)
    host = [p0.copy()] + [np.zeros(N, dtype) for _ in range(3)]
    dev = [_dev(a) for a in host]
    bound = backends.bind(CUDA, rule.kernel, dev[0], dev[1:])
    # the same array twice, another, the first again, a fresh copy of it: the
    # cached view must follow whichever array is passed
    ga, gb = (rng.standard_normal(N).astype(dtype) for _ in range(2))
    da, db = _dev(ga), _dev(gb)
    sequence = [(ga, da), (ga, da), (gb, db), (ga, da), (ga, _dev(ga))]
    s = {}
    for t, (g, dg) in enumerate(sequence, 1):
        args, s = rule.plan(hp, t, s, False)
        NUMBA.adam(host[0], g, *host[1:], *args, 1)
        bound.step(dg, args, 1)
    for h, d in zip(host, dev):
        assert np.array_equal(_bits(h), _bits(d.copy_to_host()))


def _bad_grads(dtype, param, state):
    other = np.float64 if dtype == np.float32 else np.float32
    return {
        "numpy": (np.ones(N, dtype), TypeError, r"Adam: grad must be a CUDA array"),
        "none": (None, TypeError, r"Adam: grad must be a CUDA array .*got NoneType"),
        "dtype": (_dev(np.ones(N, other)), TypeError, r"Adam: grad has dtype"),
        "length": (_dev(np.ones(N + 1, dtype)), ValueError,
                   rf"Adam: grad has {N + 1} elements, param has {N}"),
        "2-D": (_dev(np.ones((N, 1), dtype)), ValueError, r"grad must be a C-contiguous 1-D"),
        "param": (param, ValueError, r"Adam: grad shares memory with param"),
        "state": (state, ValueError, r"Adam: grad shares memory with exp_avg_sq"),
    }


@pytest.mark.parametrize("bad", ["numpy", "none", "dtype", "length", "2-D", "param", "state"])
def test_bad_gradient_named_nothing_written_bound_still_works(bad):
    dtype = np.float32
    rule, hp = _adam()
    dev = [_dev(np.full(N, 0.5, dtype))] + [_dev(np.zeros(N, dtype)) for _ in range(3)]
    bound = backends.bind(CUDA, rule.kernel, dev[0], dev[1:])
    args, _ = rule.plan(hp, 1, {}, False)
    g, error, message = _bad_grads(dtype, dev[0], dev[2])[bad]
    good = _dev(np.ones(N, dtype))
    bound.step(good, args, 1)  # a cached gradient must not let a bad one through
    before = [d.copy_to_host() for d in dev]
    with pytest.raises(error, match=message):
        bound.step(g, args, 1)
    for d, b in zip(dev, before):
        assert np.array_equal(d.copy_to_host(), b)
    bound.step(good, args, 1)
    assert not np.array_equal(dev[0].copy_to_host(), before[0])


def test_a_cpu_tensor_gradient_is_refused_by_name():
    torch = pytest.importorskip("torch")
    rule, hp = _adam(False)
    dev = [_dev(np.ones(N, np.float32)) for _ in range(3)]
    bound = backends.bind(CUDA, rule.kernel, dev[0], [dev[1], dev[2], None])
    with pytest.raises(TypeError, match=r"Adam: grad must be a CUDA tensor, got one on cpu"):
        bound.step(torch.ones(N), rule.plan(hp, 1, {}, False)[0], 1)


def test_bind_checks_param_and_state_once():
    rule, _ = _adam()
    p = _dev(np.ones(N, np.float32))
    with pytest.raises(ValueError, match="Adam: exp_avg has 5 elements, param has 97"):
        backends.bind(CUDA, rule.kernel, p, [_dev(np.zeros(5, np.float32)), None, None])
    with pytest.raises(ValueError, match="Adam: exp_avg shares memory with param"):
        backends.bind(CUDA, rule.kernel, p, [p, None, None])
    with pytest.raises(TypeError, match="Adam: exp_avg has dtype float64"):
        backends.bind(CUDA, rule.kernel, p, [_dev(np.zeros(N)), None, None])
    with pytest.raises(TypeError, match="Adam: param must be a CUDA array"):
        backends.bind(CUDA, rule.kernel, np.ones(N, np.float32), [None, None, None])


@pytest.mark.parametrize("kernel,present", [("adam", (True, True, False)),
                                            ("sgd", (False, False, False)),
                                            ("rmsprop", (True, False, False))])
def test_absent_buffers_are_never_read(kernel, present):
    # a zero-length array in an absent buffer's slot: any read of it would be
    # out of bounds, which the simulator raises
    from numba import cuda
    rule = RULES_BY_KERNEL[kernel]
    hp = rule.check_hypers(rule.defaults)
    args, _ = rule.plan(hp, 1, rule.initial_scalars(hp), False)
    k = CUDA.kernel_for(kernel, present)
    empty = cuda.to_device(np.zeros(0, np.float32))
    p = _dev(np.ones(N, np.float32))
    bufs = [_dev(np.zeros(N, np.float32)) if h else empty for h in present]
    kc = M.RULES[kernel][0](M.plan_of(kernel, args), np.float32)
    k[2, 32](p, _dev(np.full(N, 0.5, np.float32)), *bufs, kc)
    assert (p.copy_to_host() != 1).all()


RULES_BY_KERNEL = {r.kernel: r for r in RULES.values()}


def test_grid_is_sized_once_to_the_device(monkeypatch):
    monkeypatch.setattr(CUDA, "MAX_BLOCKS", None)
    monkeypatch.setattr(CUDA, "BLOCK_SIZE", 256)
    cap = CUDA._device_blocks(0)
    assert cap >= 1
    assert CUDA._blocks(1, 0) == 1
    assert CUDA._blocks(257, 0) == min(2, cap)
    assert CUDA._blocks(10 ** 9, 0) == cap
    rule, _ = _adam(False)
    p = _dev(np.ones(1000, np.float32))
    bound = backends.bind(CUDA, rule.kernel, p, [_dev(np.zeros(1000, np.float32)),
                                                 _dev(np.zeros(1000, np.float32)), None])
    assert bound.grid == min(4, cap)
    assert bound.dispatcher is CUDA.kernel_for("adam", (True, True, False))


def test_kernels_have_no_bare_multiply_for_nvvm_to_contract():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "_cuda_ir.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and "CudaSupportError" in out.stderr:
        pytest.skip("Numba's CUDA compiler cannot lower here: " + out.stderr[-200:])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    control = [r for r in rows if r["kernel"] == "control"]
    assert control and control[0]["fmul"] >= 1  # the count can see a multiply
    kernels = [r for r in rows if r["kernel"] != "control"]
    assert {r["kernel"] for r in kernels} == {r.kernel for r in RULES.values()}
    # every rule also has its segment-table kernel, lowered for the real target
    assert {r["kernel"] for r in kernels if r.get("segments")} == \
        {r.kernel for r in RULES.values()}
    for r in kernels:
        assert r["fmul"] == 0, r
        assert r["mul_rn"] == (["__nv_fmul_rn"] if r["dtype"] == "float32"
                               else ["__nv_dmul_rn"]), r


# --------------------------------------------------------------------------
# FlatParams on the device (Numba arrays here; CuPy and torch in the GPU lane)
# --------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 3, 5), (1,), (7,)]


@pytest.mark.parametrize("dtype", [None, np.float64], ids=["same", "cast"])
def test_flat_params_of_device_arrays_is_one_device_buffer(dtype):
    import fastopt
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    flat = fastopt.FlatParams([_dev(a) for a in host], dtype=dtype)
    assert CUDA.is_device_array(flat.data) and CUDA.is_device_array(flat.grad)
    assert flat.dtype == (np.float32 if dtype is None else np.float64)
    assert flat.numel == sum(a.size for a in host) and flat.device == "cuda:0"
    for v, gv, a in zip(flat.views, flat.grad_views, host):
        assert CUDA.is_device_array(v) and tuple(v.shape) == a.shape
        np.testing.assert_array_equal(v.copy_to_host(), a.astype(flat.dtype))
        gv.copy_to_device(np.ones(a.shape, flat.dtype))
    # the views are views: the buffer holds what was written through them
    np.testing.assert_array_equal(flat.grad.copy_to_host(), np.ones(flat.numel, flat.dtype))
    opt = fastopt.Adam(flat, lr=0.1)
    assert opt.backend == "cuda"
    opt.step(flat.grad)  # one launch for the whole model
    for v, a in zip(flat.views, host):
        np.testing.assert_allclose(v.copy_to_host(), a - 0.1, atol=1e-6)
    out = [_dev(np.zeros(s, flat.dtype)) for s in SHAPES]
    flat.copy_to(out)
    for o, v in zip(out, flat.views):
        np.testing.assert_array_equal(o.copy_to_host(), v.copy_to_host())
    flat.zero_grad()
    assert not flat.grad.copy_to_host().any()
    assert "on cuda:0" in repr(flat)


def test_flat_params_refuses_mixed_host_and_device():
    import fastopt
    with pytest.raises(TypeError, match=r"arrays\[1\] is a numpy array"):
        fastopt.FlatParams([_dev(np.ones(3, np.float32)), np.ones(3, np.float32)])


def test_flat_params_torch_packing_path_on_cpu_tensors(monkeypatch):
    # the torch library path (views, copy_, zero_, copy back) run on CPU tensors;
    # on CUDA tensors it is the same code plus a device (the GPU lane runs that)
    torch = pytest.importorskip("torch")
    import fastopt
    from fastopt import flat as flat_mod
    monkeypatch.setattr(flat_mod, "_library", lambda a: "torch")
    src = [torch.randn(*s, requires_grad=True) for s in SHAPES]
    flat = fastopt.FlatParams(src)
    assert isinstance(flat.data, torch.Tensor) and flat.dtype == np.float32
    for v, gv, a in zip(flat.views, flat.grad_views, src):
        assert v.shape == a.shape and v.data_ptr() >= flat.data.data_ptr()
        assert torch.equal(v, a.detach())
        gv.fill_(1.0)
    opt = fastopt.Adam(flat, lr=0.1)
    opt.step(flat.grad)
    for v, a in zip(flat.views, src):
        assert torch.allclose(v, a.detach() - 0.1, atol=1e-6)
    flat.copy_to(src)
    assert all(torch.equal(a.detach(), v) for a, v in zip(src, flat.views))
    flat.zero_grad()
    assert not flat.grad.any()


class _FakeCudaParameter:
    """What routing sees of a torch CUDA parameter: is_cuda, and an interface that
    raises RuntimeError because it requires grad (hasattr does not catch that)."""

    is_cuda = True
    requires_grad = True

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


_FakeCudaParameter.__module__ = "torch"


def test_a_cuda_parameter_that_requires_grad_routes_to_cuda():
    assert backends.for_array(_FakeCudaParameter()) is CUDA
