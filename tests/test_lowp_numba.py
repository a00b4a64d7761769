"""Low-precision storage on the Numba backends: the staged path of
numba_cpu and numba_cuda (simulator) against a NumPy model of the spec
(docs/rules.md "Storage types") whose float32 arithmetic is the compiled backend's
plain float32 kernel; bitwise, on odd lengths, several segments, 1 and 2 threads."""

import ml_dtypes
import numpy as np
import pytest

from cases import kernel_paths
from fastopt import backends
from fastopt.backends import _numba_math as M
from fastopt.backends import _segments as S
from fastopt.rules import KERNELS, RULES, kernel_rule

BF16 = ml_dtypes.bfloat16
F16, F32, F64, U8 = np.float16, np.float32, np.float64, np.uint8
BLK = 256
CODE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "q8": 4}
STORAGE = {"float32": F32, "float16": F16, "bfloat16": BF16, "q8": U8}


# ---------------------------------------------------------------------------
# The spec in NumPy
# ---------------------------------------------------------------------------

def qmap(signed):
    """bitsandbytes' dynamic map (fastopt.quant), else a cubic stand-in."""
    try:
        from fastopt.quant import dynamic_map
        return np.ascontiguousarray(dynamic_map(signed), dtype=F32)
    except ImportError:
        pass
    if signed:
        k = np.arange(256, dtype=np.float64) - 128.0
        q = np.sign(k) * (np.abs(k) / 127.0) ** 3
        q = np.clip(q, -1, 1)
    else:
        q = (np.arange(256, dtype=np.float64) / 255.0) ** 2
    return np.ascontiguousarray(np.sort(q).astype(F32))


def bf16_bits(x):
    u = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def to_storage(x, name):
    if name == "float32":
        return x.astype(F32)
    if name == "bfloat16":
        return bf16_bits(x).view(BF16)
    if name == "float16":
        return x.astype(F16)
    raise ValueError(name)


def to_f32(a, name, absmax=None, q=None):
    if name == "q8":
        scale = np.repeat(absmax, BLK)[:a.size]
        return (q[a] * scale).astype(F32)
    if name == "bfloat16":
        return (a.view(np.uint16).astype(np.uint32) << 16).view(F32)
    return a.astype(F32)


def quantize(x, q):
    """codes and absmax of float32 x (spec: block absmax, bucketize on midpoints)."""
    bounds = ((q[:-1] + q[1:]) / F32(2)).astype(F32)
    codes = np.empty(x.size, U8)
    am = np.empty((x.size + BLK - 1) // BLK, F32)
    for b in range(am.size):
        blk = x[b * BLK:(b + 1) * BLK]
        # max |x|; with NaNs, the NaN of the largest |bits| (the compiled engine's)
        a = (np.max(blk.view(np.uint32) & 0x7FFFFFFF) if blk.size
             else np.uint32(0)).astype(np.uint32).view(F32)
        inv = F32(1) / a if a > 0 else F32(0)
        with np.errstate(invalid="ignore"):
            y = np.clip(blk * inv, F32(-1), F32(1)).astype(F32)
        y[np.isnan(y)] = 1            # a NaN clamps to 1 (docs/rules.md)
        c = np.searchsorted(bounds, y, side="left")
        codes[b * BLK:(b + 1) * BLK] = c
        am[b] = a
    return codes, am


def sr_bits_np(key, s, n):
    m = lambda x: M.mix32(x)  # noqa: E731
    ks = m(key ^ m((s + 0x9E3779B9) & 0xFFFFFFFF))
    return np.array([m(ks ^ ((i * 0x85EBCA6B) & 0xFFFFFFFF)) & 0xFFFF for i in range(n)],
                    np.uint64)


# ---------------------------------------------------------------------------
# A problem: segments of storage arrays per slot, and the reference step
# ---------------------------------------------------------------------------

def hp_for(kernel):
    """A rule of ``kernel`` and the flag set using the most state buffers."""
    rule = kernel_rule(kernel)
    paths = kernel_paths(rule.name)
    return rule, max(paths, key=lambda hp: len(rule.needed_buffers(hp)))


class Problem:
    def __init__(self, kernel, sizes, types, seed=0, t=2):
        """types: names for (param, grad, state...) (absent state: None)."""
        self.kernel, self.sizes, self.types = kernel, sizes, types
        self.rule, self.hp = hp_for(kernel)
        names = self.rule.arg_names
        need = self.rule.needed_buffers(self.hp)
        self.present = [b in need for b in names[2:]]
        self.args, _ = self.rule.plan(self.hp, t, self.rule.initial_scalars(self.hp), False)
        rng = np.random.default_rng(seed)
        self.maps = [None, None] + [qmap(j != 1 or kernel != "adam") for j in range(3)]
        if kernel in ("rmsprop", "adagrad"):
            self.maps[2] = qmap(False)
        self.data = []   # per segment: list per slot of (storage, absmax or None) or None
        for n in sizes:
            row = []
            for slot, name in enumerate(types):
                if slot >= 2 and not self.present[slot - 2]:
                    row.append(None)
                    continue
                x = rng.standard_normal(n) * np.exp(rng.uniform(-3, 1, n))
                if slot >= 2:
                    x = np.abs(x) + 0.01  # second moments, step sizes: positive
                x = x.astype(F32)
                if name == "q8":
                    codes, am = quantize(x, self.maps[slot])
                    row.append((codes, am))
                else:
                    row.append((to_storage(x, name), None))
            self.data.append(row)

    def copy(self):
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.data = [[None if c is None else (c[0].copy(), None if c[1] is None
                                                else c[1].copy()) for c in row]
                      for row in self.data]
        return other

    def reference(self, copy_name=None, sr_key=None):
        """Step self.data in place as the spec says; returns the copies."""
        ref = backends.load("cython")
        copies = []
        for s, row in enumerate(self.data):
            n = self.sizes[s]
            f = [None if c is None else to_f32(c[0], self.types[k], c[1], self.maps[k])
                 for k, c in enumerate(row)]
            f = [None if a is None else np.ascontiguousarray(a) for a in f]
            if n:
                ptrs = np.array([[0 if a is None else a.ctypes.data for a in f]],
                                dtype=np.uintp)
                ref.run_segments(self.kernel, np.dtype(F32), ptrs,
                                 np.array([n], np.intp), self.args, 1)
            for k, c in enumerate(row):
                if c is None or k == 1:
                    continue
                name = self.types[k]
                if k == 0 and sr_key is not None:
                    u = f[0].view(np.uint32).astype(np.uint64)
                    bits = ((u + sr_bits_np(sr_key, s, n)) >> 16).astype(np.uint16)
                    bits[np.isnan(f[0])] = 0x7FC0
                    c[0][...] = bits.view(BF16)
                elif name == "q8":
                    codes, am = quantize(f[k], self.maps[k])
                    c[0][...] = codes
                    c[1][...] = am
                else:
                    c[0][...] = to_storage(f[k], name)
            if copy_name is not None:   # of the param as stored
                stored = f[0] if self.types[0] == "float32" else to_f32(row[0][0],
                                                                       self.types[0])
                if self.types[0] == "float16":   # NaNs widen quiet (F16C)
                    b = stored.view(np.uint32)
                    stored = np.where(np.isnan(stored), b | 0x400000, b).astype(
                        np.uint32).view(F32)
                copies.append(to_storage(stored, copy_name))
        return copies

    # -- what a backend is given ------------------------------------------------
    def arrays(self, asarray=np.ascontiguousarray):
        params = [asarray(row[0][0]) for row in self.data]
        grads = [asarray(row[1][0]) for row in self.data]
        bufs = [tuple(None if c is None else asarray(c[0]) for c in row[2:])
                for row in self.data]
        absmax = [tuple(None if c is None or c[1] is None else asarray(c[1])
                        for c in row[2:]) for row in self.data]
        return params, grads, bufs, absmax

    def qmaps(self):
        return tuple(self.maps[k] if self.types[k] == "q8" else None
                     for k in range(len(self.types)))

    def segments(self):
        """run_segments' arguments over the problem's own arrays."""
        ptrs = np.array([[0 if c is None else c[0].ctypes.data for c in row]
                         for row in self.data], dtype=np.uintp)
        absmax = np.array([[0 if c is None or c[1] is None else c[1].ctypes.data
                            for c in row] for row in self.data], dtype=np.uintp)
        dtype = tuple(STORAGE.get(t, F32) if t != "q8" else "q8" for t in self.types)
        return ptrs, np.array(self.sizes, np.intp), dtype, absmax


def same(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ua, ub = a.view(np.uint8), b.view(np.uint8)
    if not np.array_equal(ua, ub):
        bad = np.nonzero(a.view(np.uint8) != b.view(np.uint8))[0]
        raise AssertionError(f"{what}: {bad.size} bytes differ, first at byte {bad[0]}: "
                             f"{a.reshape(-1)[bad[0] // a.itemsize]!r} vs "
                             f"{b.reshape(-1)[bad[0] // b.itemsize]!r}")


def check_same(p, q, label=""):
    for s, (ra, rb) in enumerate(zip(p.data, q.data)):
        for k, (ca, cb) in enumerate(zip(ra, rb)):
            if ca is None:
                continue
            same(ca[0], cb[0], f"{label} segment {s} {p.rule.arg_names[k]}")
            if ca[1] is not None:
                same(ca[1], cb[1], f"{label} segment {s} absmax of {p.rule.arg_names[k]}")


def state_types(kernel, name):
    n = len(kernel_rule(kernel).buffers)
    return (name,) * n


SIZES = [7, 0, 1031, 256, 513]


def run_bound(be, prob, copy_name=None, sr_key=None, nthreads=1, asarray=np.ascontiguousarray):
    """Step prob with be.bind_many (arrays are the problem's own on the CPU)."""
    params, grads, bufs, absmax = prob.arrays(asarray)
    q8 = any(t == "q8" for t in prob.types)
    bound = be.bind_many(prob.kernel, params, bufs,
                         grad_dtype=STORAGE[prob.types[1]],
                         absmax=absmax if q8 else None,
                         qmaps=prob.qmaps()[2:] if q8 else None)
    copies = None
    if copy_name is not None:
        copies = [asarray(np.zeros(n, STORAGE[copy_name])) for n in prob.sizes]
    bound.step(grads, prob.args, nthreads, copies=copies, sr_key=sr_key)
    return bound, params, bufs, absmax, copies


TYPESETS = {
    "bf16": lambda k: ("bfloat16", "bfloat16") + state_types(k, "bfloat16"),
    "f16": lambda k: ("float16", "float16") + state_types(k, "float16"),
    "f32+bf16grad": lambda k: ("float32", "bfloat16") + state_types(k, "float32"),
    "f32+f16grad": lambda k: ("float32", "float16") + state_types(k, "float32"),
}
COPY = {"bf16": None, "f16": "float32", "f32+bf16grad": "bfloat16",
        "f32+f16grad": "float16"}
Q8_KERNELS = ("adam", "sgd", "rmsprop", "adagrad", "lion")


@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_staged_every_kernel(kernel):
    """Every rule's kernel: bf16 and f16 params and state, f32 params with bf16 / f16
    gradients and a copy out; run_segments and bind_many both."""
    cpu = backends.load("numba")
    for name, types in TYPESETS.items():
        prob = Problem(kernel, SIZES, types(kernel))
        want = prob.copy()
        copies_ref = want.reference(COPY[name])
        # bind_many
        got = prob.copy()
        _, _, _, _, copies = run_bound(cpu, got, COPY[name])
        check_same(want, got, f"{kernel} {name} bind_many")
        for s, (a, b) in enumerate(zip(copies_ref, copies or [])):
            same(a, b, f"{kernel} {name} copy[{s}]")
        # run_segments over the same storage
        got = prob.copy()
        ptrs, lengths, dtype, _ = got.segments()
        kw = {}
        if COPY[name] is not None:
            outs = [np.zeros(n, STORAGE[COPY[name]]) for n in prob.sizes]
            kw = dict(copy=np.array([o.ctypes.data for o in outs], np.uintp),
                      copy_dtype=STORAGE[COPY[name]])
        cpu.run_segments(kernel, dtype, ptrs, lengths, prob.args, 1, **kw)
        check_same(want, got, f"{kernel} {name} run_segments")
        if kw:
            for s, (a, b) in enumerate(zip(copies_ref, outs)):
                same(a, b, f"{kernel} {name} run_segments copy[{s}]")


@pytest.mark.parametrize("kernel", Q8_KERNELS)
def test_cpu_q8_state(kernel):
    cpu = backends.load("numba")
    for ptype in ("float32", "bfloat16"):
        prob = Problem(kernel, SIZES, (ptype, "float32") + state_types(kernel, "q8"))
        want = prob.copy()
        want.reference()
        got = prob.copy()
        run_bound(cpu, got)
        check_same(want, got, f"{kernel} q8 {ptype}")
        got = prob.copy()
        ptrs, lengths, dtype, absmax = got.segments()
        cpu.run_segments(kernel, dtype, ptrs, lengths, prob.args, 1, absmax=absmax,
                         qmaps=prob.qmaps())
        check_same(want, got, f"{kernel} q8 {ptype} run_segments")


BIG = [32768 + 300, 7, 0, 1031]    # just over the parallel threshold


@pytest.mark.parametrize("kernel", ["adam"])
def test_cpu_threads(kernel):
    """Two threads (parts cut inside segments at multiples of 256) give one thread's
    bits, for bf16, f16 with a copy, and q8 state."""
    cpu = backends.load("numba")
    sets = [("bfloat16", "float32") + state_types(kernel, "q8")]
    for types in sets:
        prob = Problem(kernel, BIG, types)
        want = prob.copy()
        cref = want.reference("bfloat16")
        for nthreads in (1, 2):
            got = prob.copy()
            _, _, _, _, copies = run_bound(cpu, got, "bfloat16", nthreads=nthreads)
            check_same(want, got, f"{types} threads={nthreads}")
            for a, b in zip(cref, copies):
                same(a, b, "copy")


def test_cpu_stochastic_rounding():
    """SR of a bf16 param: the spec's hash, the same on 1 and 2 threads, reproducible,
    and different keys give different bits."""
    cpu = backends.load("numba")
    types = ("bfloat16", "bfloat16") + state_types("adam", "float32")
    prob = Problem("adam", BIG, types)
    key = M.sr_call_key(1234, 7)
    want = prob.copy()
    want.reference(sr_key=key)
    outs = []
    for nthreads in (1, 2, 2):
        got = prob.copy()
        run_bound(cpu, got, sr_key=key, nthreads=nthreads)
        check_same(want, got, f"SR threads={nthreads}")
        outs.append(got)
    other = prob.copy()
    run_bound(cpu, other, sr_key=key ^ 1)
    assert not np.array_equal(other.data[0][0][0].view(np.uint16),
                              want.data[0][0][0].view(np.uint16))
    nearest = prob.copy()
    nearest.reference()
    assert not np.array_equal(nearest.data[0][0][0].view(np.uint16),
                              want.data[0][0][0].view(np.uint16))


# ---------------------------------------------------------------------------
# The CUDA backend (the simulator here; the kernels lower for sm_90 in
# test_staged_kernels_lower_for_sm90): 2 blocks of 32 threads, so a grid-stride
# over several 256-element blocks and several threads per block
# ---------------------------------------------------------------------------

SMALL = [7, 300, 0, 256]      # 1 + 2 + 0 + 1 blocks


@pytest.fixture
def cuda_be(monkeypatch):
    be = backends.load("cuda")
    monkeypatch.setattr(be, "BLOCK_SIZE", 32)
    monkeypatch.setattr(be, "MAX_BLOCKS", 2)
    return be


def _cuda_step(be, prob, copy_name=None, sr_key=None):
    from numba import cuda
    params, grads, bufs, absmax = prob.arrays(cuda.to_device)
    q8 = any(t == "q8" for t in prob.types)
    bound = be.bind_many(prob.kernel, params, bufs, grad_dtype=STORAGE[prob.types[1]],
                         absmax=absmax if q8 else None,
                         qmaps=prob.qmaps()[2:] if q8 else None)
    copies = None
    if copy_name is not None:
        copies = [cuda.to_device(np.zeros(n, STORAGE[copy_name])) for n in prob.sizes]
    bound.step(grads, prob.args, 1, copies=copies, sr_key=sr_key)
    # back to the problem's host arrays
    for s, row in enumerate(prob.data):
        row[0][0][...] = params[s].copy_to_host()
        for j, c in enumerate(row[2:]):
            if c is not None:
                c[0][...] = bufs[s][j].copy_to_host()
                if c[1] is not None:
                    c[1][...] = absmax[s][j].copy_to_host()
    return None if copies is None else [c.copy_to_host() for c in copies]


CUDA_CASES = [
    ("adam", ("bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16"), "float32", None),
    ("adam", ("float32", "float32", "q8", "q8", "q8"), "bfloat16", None),
    ("sgd", ("float16", "float16", "float16"), None, None),
    ("rmsprop", ("bfloat16", "float32", "q8", "q8", "q8"), None, 77),
    ("lion", ("float32", "bfloat16", "q8"), "float16", None),
    ("adagrad", ("float32", "float16", "q8"), None, None),
]


@pytest.mark.parametrize("kernel,types,copy_name,sr_key", CUDA_CASES,
                         ids=[f"{c[0]}-{c[1][0]}-{c[1][2]}" for c in CUDA_CASES])
def test_cuda_staged_matches_spec(cuda_be, kernel, types, copy_name, sr_key):
    prob = Problem(kernel, SMALL, types)
    want = prob.copy()
    cref = want.reference(copy_name, sr_key)
    got = prob.copy()
    copies = _cuda_step(cuda_be, got, copy_name, sr_key)
    check_same(want, got, f"cuda {kernel} {types}")
    for s, (a, b) in enumerate(zip(cref, copies or [])):
        same(a, b, f"cuda copy[{s}]")


def test_cuda_run_segments(cuda_be):
    """run_segments over (simulated) device addresses: the same bits as the spec."""
    prob = Problem("adam", SMALL, ("bfloat16", "float32", "q8", "bfloat16", "q8"))
    want = prob.copy()
    want.reference()
    got = prob.copy()
    ptrs, lengths, dtype, absmax = got.segments()
    cuda_be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=absmax,
                         qmaps=prob.qmaps())
    check_same(want, got, "cuda run_segments")


def test_staged_kernels_lower_for_sm90():
    """The staged kernels compile for a real GPU (LLVM IR for sm_90, no GPU needed):
    barriers present, every product libdevice's fmul_rn (nothing for NVVM to
    contract), no float64 arithmetic. The conversions are the same code for every
    rule, so one rule with three state buffers."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    kernels = ["adam"]
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "_cuda_ir_lowp.py"),
                          *kernels], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and "CudaSupportError" in out.stderr:
        pytest.skip("Numba's CUDA compiler cannot lower here: " + out.stderr[-200:])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["kernel"] for r in rows] == kernels
    for r in rows:
        assert r["fmul"] == 0 and r["mul_rn"] == ["__nv_fmul_rn"], r
        assert r["barrier"] and r["double"] == 0, r


# ---------------------------------------------------------------------------
# Conversions, errors, grid sizes
# ---------------------------------------------------------------------------

def test_conversions_match_numpy_and_torch():
    """f16 both ways (every binary16 value; random and halfway float32 values,
    subnormals, overflow) against NumPy, bf16 against torch's rounding; compiled
    (Numba CPU) and plain Python (the simulator's) bodies alike."""
    import numba
    import warnings

    @numba.njit
    def conv(xs, hs, o16, obf, o32, obf32):
        for i in range(xs.size):
            o16[i] = M.f32_to_f16(xs[i])
            obf[i] = M.f32_to_bf16(xs[i])
        for i in range(hs.size):
            o32[i] = M.f16_to_f32(hs[i])
            obf32[i] = M.bf16_to_f32(hs[i])

    hs = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = hs.view(F16).astype(F32)
    finite = finite[np.isfinite(finite)].view(np.uint32).astype(np.int64)
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2 ** 32, 500_000, dtype=np.uint64),
             finite + (1 << 12) - 1, finite + (1 << 12), finite + (1 << 12) + 1,
             np.arange(0x33000000 - 4, 0x38800004, 97),          # subnormal range
             np.arange(0x477FE000 - 8, 0x47800008, 1)]           # up to overflow
    u = np.concatenate([np.asarray(p, np.int64) for p in parts]) & 0xFFFFFFFF
    u = u.astype(np.uint32)
    xs = u.view(F32)
    o16, obf = np.empty(xs.size, np.uint16), np.empty(xs.size, np.uint16)
    o32, obf32 = np.empty(65536, F32), np.empty(65536, F32)
    conv(xs, hs, o16, obf, o32, obf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref16 = xs.astype(F16).view(np.uint16)
    nan = np.isnan(xs)
    # NumPy keeps a signalling NaN's payload bits as they are; the spec's (C's) cast
    # quiets it: compare NaNs as NaNs with the top payload bits
    same(o16[~nan], ref16[~nan], "f32->f16")
    assert np.isnan(o16[nan].view(F16)).all()
    # a NaN widens quiet (F16C, C's cast); NumPy keeps a signalling one signalling
    wide = hs.view(F16).astype(F32).view(np.uint32)
    wide = np.where(np.isnan(hs.view(F16)), wide | 0x400000, wide).astype(np.uint32)
    same(o32.view(np.uint32), wide, "f16->f32")
    same(obf32.view(np.uint32), hs.astype(np.uint32) << 16, "bf16->f32")
    import torch
    tb = torch.from_numpy(xs).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    same(obf[~nan], tb[~nan], "f32->bf16")
    assert (obf[nan] == 0x7FC0).all()
    # the Python bodies (what the CUDA simulator runs) on a sample
    sample = np.concatenate([xs[:2000], xs[-2000:]])
    o16s, obfs = np.empty(sample.size, np.uint16), np.empty(sample.size, np.uint16)
    conv(sample, hs[:0], o16s, obfs, o32[:0], obf32[:0])
    for j, x in enumerate(sample):
        assert M.f32_to_f16(x) == o16s[j] and M.f32_to_bf16(x) == obfs[j], x
    for h in hs[::37]:
        assert M.f16_to_f32(h).view(np.uint32) == o32[h].view(np.uint32)


def test_sr_key_hash_matches_spec():
    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    for seed, step in [(0, 0), (1, 1), (2 ** 32 - 1, 123456), (42, 2 ** 31)]:
        assert M.sr_call_key(seed, step) == mix(seed ^ mix(step * 0x27D4EB2F))
    ks = M.sr_segment_key(99, 3)
    assert ks == mix(99 ^ mix(3 + 0x9E3779B9))
    assert M.sr_bits(ks, 5) == mix(ks ^ (5 * 0x85EBCA6B)) & 0xFFFF


@pytest.mark.parametrize("be_name", ["numba", "cuda"])
def test_bad_inputs_write_nothing(be_name, monkeypatch):
    be = backends.load(be_name)
    if be_name == "cuda":
        monkeypatch.setattr(be, "BLOCK_SIZE", 32)
        monkeypatch.setattr(be, "MAX_BLOCKS", 2)
    prob = Problem("adam", [300, 7], ("float32", "float32", "q8", "q8", "q8"))
    ptrs, lengths, dtype, absmax = prob.segments()
    before = prob.copy()
    # float64 with anything else: TypeError naming the slot
    mixed = (F32, F64, F32, F32, F32)
    with pytest.raises(TypeError, match="grad"):
        be.run_segments("adam", mixed, ptrs, lengths, prob.args, 1)
    with pytest.raises(TypeError, match="exp_avg"):
        be.run_segments("adam", (F64, F64, "bfloat16", F64, F64), ptrs, lengths, prob.args,
                        1)
    with pytest.raises(TypeError, match="param cannot be q8"):
        be.run_segments("adam", ("q8", F32, F32, F32, F32), ptrs, lengths, prob.args, 1)
    # q8 without absmax, without maps, with a null absmax, an unsorted map
    with pytest.raises(ValueError, match="absmax"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, qmaps=prob.qmaps())
    with pytest.raises(ValueError, match="qmaps"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=absmax)
    bad = absmax.copy()
    bad[1, 3] = 0
    with pytest.raises(ValueError, match="null"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=bad,
                        qmaps=prob.qmaps())
    maps = list(prob.qmaps())
    maps[2] = maps[2][::-1].copy()
    with pytest.raises(ValueError, match="sorted"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=absmax,
                        qmaps=tuple(maps))
    maps[2] = maps[3].astype(F64)
    with pytest.raises(TypeError, match="float32"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=absmax,
                        qmaps=tuple(maps))
    maps[2] = prob.maps[2].copy()      # too fine a map: two midpoints in one bf16 step
    maps[2][100:103] = maps[2][101]
    with pytest.raises(ValueError, match="too fine"):
        be.run_segments("adam", dtype, ptrs, lengths, prob.args, 1, absmax=absmax,
                        qmaps=tuple(maps))
    check_same(before, prob, "after refused calls")
    # bind_many: a wrong absmax length, a missing absmax, a column of two types
    asarray = np.ascontiguousarray
    if be_name == "cuda":
        from numba import cuda
        asarray = cuda.to_device
    params, grads, bufs, am = prob.arrays(asarray)
    short = [tuple(asarray(np.zeros(1, F32)) for _ in row) for row in am]
    with pytest.raises(ValueError, match="absmax"):
        be.bind_many("adam", params, bufs, absmax=short, qmaps=prob.qmaps()[2:])
    with pytest.raises(ValueError, match="absmax"):
        be.bind_many("adam", params, bufs, qmaps=prob.qmaps()[2:])
    two = list(bufs)
    two[1] = (asarray(np.zeros(7, BF16)),) + tuple(bufs[1][1:])
    with pytest.raises(TypeError, match="one column has one type"):
        be.bind_many("adam", params, two, absmax=am, qmaps=prob.qmaps()[2:])
    # a bound step with a gradient of the wrong type writes nothing
    bound = be.bind_many("adam", params, bufs, absmax=am, qmaps=prob.qmaps()[2:])
    wrong = [asarray(np.zeros(n, BF16)) for n in prob.sizes]
    with pytest.raises(TypeError, match="grad"):
        bound.step(wrong, prob.args, 1)
    host = (lambda a: a.copy_to_host()) if be_name == "cuda" else np.asarray
    for s in range(2):
        same(host(params[s]), before.data[s][0][0], "param after refused steps")
        for j in range(3):
            same(host(bufs[s][j]), before.data[s][2 + j][0], "state after refused steps")


@pytest.mark.parametrize("blocks", [1, 3])
def test_cuda_grid_size_does_not_matter(monkeypatch, blocks):
    be = backends.load("cuda")
    monkeypatch.setattr(be, "BLOCK_SIZE", 64)
    monkeypatch.setattr(be, "MAX_BLOCKS", blocks)
    prob = Problem("sgd", SMALL, ("bfloat16", "float16", "q8"))
    want = prob.copy()
    cref = want.reference("float16", 11)
    got = prob.copy()
    copies = _cuda_step(be, got, "float16", 11)
    check_same(want, got, f"grid {blocks}")
    for a, b in zip(cref, copies):
        same(a, b, "copy")


# ---------------------------------------------------------------------------
# compiled == numba_cpu == CUDA (simulator), bit for bit
# ---------------------------------------------------------------------------

def _same_or_both_nan(a, b, what):
    """Bitwise, except that two NaNs match whatever their sign and payload: those are
    the compilers' (GCC folds x - (-y) to x + y, LLVM alike, each where it likes), as
    on the plain float32 path."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fV" or a.dtype == BF16:
        fa, fb = a.astype(F32), b.astype(F32)
        both = np.isnan(fa) & np.isnan(fb)
        a, b = a[~both], b[~both]
    same(a, b, what)


def check_equal(p, q, label=""):
    for s, (ra, rb) in enumerate(zip(p.data, q.data)):
        for k, (ca, cb) in enumerate(zip(ra, rb)):
            if ca is None:
                continue
            _same_or_both_nan(ca[0], cb[0], f"{label} segment {s} {p.rule.arg_names[k]}")
            if ca[1] is not None:
                _same_or_both_nan(ca[1], cb[1], f"{label} segment {s} absmax of "
                                  f"{p.rule.arg_names[k]}")


SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e-40, -1e-42, 0.0, -0.0, 3e38, 6e4, 7e-6],
                   F32)


def with_specials(prob, seed):
    """Special values (NaN, inf, subnormal, float16 overflow) in 2% of every float
    slot's elements."""
    rng = np.random.default_rng(seed)
    for row in prob.data:
        for k, c in enumerate(row):
            if c is None or prob.types[k] == "q8" or c[0].size == 0:
                continue
            idx = rng.integers(0, c[0].size, max(1, c[0].size // 50))
            c[0][idx] = SPECIAL[rng.integers(0, SPECIAL.size, idx.size)].astype(c[0].dtype)
    return prob


@pytest.fixture
def ieee_compiled():
    """The compiled kernels flush subnormals by default (docs/rules.md); the Numba
    backends never do, so the comparison runs them IEEE."""
    cy = backends.load("cython")
    was = cy.get_flush_denormals()
    cy.set_flush_denormals(False)
    yield cy
    cy.set_flush_denormals(was)


def _compare_set(kernel):
    nb = len(kernel_rule(kernel).buffers)
    q8 = ("q8",) * nb if kernel in Q8_KERNELS else ("float32",) * nb
    return [(("bfloat16", "bfloat16") + ("bfloat16",) * nb, "float32", 12345),
            (("float16", "float16") + ("float16",) * nb, "bfloat16", None),
            (("float32", "bfloat16") + q8, "float16", None),
            (("bfloat16", "float16") + ("q8",) * nb, None, 2 ** 32 - 1)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_equals_numba_cpu(ieee_compiled, kernel):
    """Every rule's kernel, four storage signatures (bf16 with SR and a copy, f16, f32
    params with bf16 grads and q8 or f32 state, bf16 params with f16 grads and q8
    state), ordinary and special values: the compiled engine's bits."""
    cpu = backends.load("numba")
    for j, (types, copy_name, sr_key) in enumerate(_compare_set(kernel)):
        for special in (False, True):
            prob = Problem(kernel, SIZES, types, seed=j)
            if special:
                with_specials(prob, j)
            want = prob.copy()
            _, _, _, _, wc = run_bound(ieee_compiled, want, copy_name, sr_key)
            got = prob.copy()
            _, _, _, _, gc = run_bound(cpu, got, copy_name, sr_key)
            label = f"{kernel} {types} special={special}"
            check_equal(want, got, label)
            for s, (a, b) in enumerate(zip(wc or [], gc or [])):
                _same_or_both_nan(a, b, f"{label} copy[{s}]")


@pytest.mark.parametrize("kernel", ["adam"])
def test_compiled_equals_numba_cpu_threads(ieee_compiled, kernel):
    """Two threads each (parts cut inside segments): the compiled engine's bits."""
    cpu = backends.load("numba")
    for types, copy_name, sr_key in _compare_set(kernel)[::3]:
        prob = with_specials(Problem(kernel, BIG, types), 1)
        want = prob.copy()
        _, _, _, _, wc = run_bound(ieee_compiled, want, copy_name, sr_key, nthreads=2)
        got = prob.copy()
        _, _, _, _, gc = run_bound(cpu, got, copy_name, sr_key, nthreads=2)
        check_equal(want, got, f"{kernel} {types} 2 threads")
        for a, b in zip(wc or [], gc or []):
            _same_or_both_nan(a, b, "copy")


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_equals_cuda_simulator(ieee_compiled, cuda_be, kernel):
    """The mixed signature (bf16 params with SR and an f16 copy, f16 grads, q8 state)
    with special values, 2 blocks of 32 threads: the compiled engine's bits."""
    nb = len(kernel_rule(kernel).buffers)
    types = ("bfloat16", "float16") + ("q8",) * nb
    prob = with_specials(Problem(kernel, SMALL, types, seed=3), 3)
    want = prob.copy()
    _, _, _, _, wc = run_bound(ieee_compiled, want, "float16", 99)
    got = prob.copy()
    gc = _cuda_step(cuda_be, got, "float16", 99)
    check_equal(want, got, f"cuda {kernel}")
    for a, b in zip(wc, gc):
        _same_or_both_nan(a, b, "copy")


def test_subnormal_absmax_follows_the_spec(ieee_compiled):
    """A block whose new absmax is subnormal: 1 / absmax overflows to inf, so x * inv
    is +-inf, which the spec clamps to +-1 (code 255 for the largest element), on
    every backend (the compiled engine gave code 1 before it clamped)."""
    rule = RULES["SGD"]
    hp = rule.check_hypers({**rule.defaults, "momentum": 0.9, "lr": 0.1})
    args, _ = rule.plan(hp, 2, {}, False)
    q = qmap(True)
    out = {}
    for name in ("numba", "cython"):
        be = ieee_compiled if name == "cython" else backends.load(name)
        p, g = np.ones(256, F32), np.full(256, 1e-39, F32)
        codes, am = np.full(256, 128, U8), np.zeros(1, F32)
        be.bind_many("sgd", [p], [(codes,)], absmax=[(am,)], qmaps=(q,)).step([g], args, 1)
        out[name] = codes
    want, _ = quantize((F32(0.9) * F32(0) + F32(1 - 0) * np.full(256, 1e-39, F32))
                       .astype(F32), q)
    same(out["numba"], want, "numba")
    same(out["cython"], want, "cython")


@pytest.mark.parametrize("be_name", ["numba", "cuda"])
def test_bind_and_protocol(ieee_compiled, be_name, monkeypatch):
    """bind (one array) with storage keywords, prepare(grads, copies, sr_key) then
    run(args, nthreads), and a float32 binding asked for a copy: the compiled bits."""
    be = backends.load(be_name)
    asarray = np.ascontiguousarray
    host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else a  # noqa: E731
    if be_name == "cuda":
        from numba import cuda
        monkeypatch.setattr(be, "BLOCK_SIZE", 32)
        monkeypatch.setattr(be, "MAX_BLOCKS", 2)
        asarray = cuda.to_device
    prob = Problem("adam", [300], ("bfloat16", "float32", "q8", "bfloat16", "q8"))
    (p,), (g,), (bufs,), (am,) = prob.arrays()
    maps = prob.qmaps()[2:]
    outs = {}
    for name, mod, conv in (("cython", ieee_compiled, np.ascontiguousarray),
                            (be_name, be, asarray)):
        pp, bb, aa = conv(p.copy()), tuple(conv(b.copy()) for b in bufs), tuple(
            None if a is None else conv(a.copy()) for a in am)
        copy = conv(np.zeros(300, F16))
        bound = mod.bind("adam", pp, bb, grad_dtype=F32, absmax=aa, qmaps=maps)
        bound.prepare(conv(g), copy, 7)
        bound.run(prob.args, 1)
        outs[name] = [host(x) for x in (pp, copy, *bb, *(a for a in aa if a is not None))]
    for a, b in zip(outs["cython"], outs[be_name]):
        same(a, b, f"{be_name} bind")
    # float32 throughout, asked for a bf16 copy through prepare/run and step
    prob = Problem("sgd", [300, 7], ("float32",) * 3)
    params, grads, bufs, _ = prob.arrays()
    outs = {}
    for name, mod, conv in (("cython", ieee_compiled, np.ascontiguousarray),
                            (be_name, be, asarray)):
        pp = [conv(x.copy()) for x in params]
        bb = [tuple(conv(x.copy()) for x in row) for row in bufs]
        copies = [conv(np.zeros(n, BF16)) for n in prob.sizes]
        bound = mod.bind_many("sgd", pp, bb)
        bound.prepare([conv(x) for x in grads], copies, None)
        bound.run(prob.args, 1)
        bound.step([conv(x) for x in grads], prob.args, 1, copies=copies)
        outs[name] = [host(x) for x in (*pp, *copies, *(b for row in bb for b in row))]
    for a, b in zip(outs["cython"], outs[be_name]):
        same(a, b, f"{be_name} float32 with copies")
