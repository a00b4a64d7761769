"""fastopt.quant: the 8-bit dynamic map, block-wise quantisation, the bucket table,
bfloat16 rounding and the float64 8-bit step reference.

bitsandbytes is the reference for the map and the quantiser's semantics; the tests
that need it are skipped without it.
"""

import numpy as np
import pytest

from fastopt import quant as Q
from fastopt import reference as R

torch = pytest.importorskip("torch")

F32 = np.float32
MAPS = {"signed": Q.dynamic_map(True), "unsigned": Q.dynamic_map(False)}


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


# ---------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_bit_for_bit(signed):
    bnb = _bnb()
    theirs = bnb.functional.create_dynamic_map(signed=signed).numpy()
    assert np.array_equal(_bits(Q.dynamic_map(signed)), _bits(theirs))


def test_dynamic_map_shape():
    s, u = MAPS["signed"], MAPS["unsigned"]
    for q in (s, u):
        assert q.dtype == F32 and q.shape == (256,)
        assert np.all(np.diff(q) > 0)
        assert q[-1] == 1.0 and 0.0 in q
    assert s[0] < -0.99 and np.array_equal(np.sort(-s[s < 0]), s[(s > 0) & (s < 1)])
    assert u[0] == 0.0 and u[1] > 0
    # the smallest nonzero magnitude is 10^-6 times the first midpoint of [0.1, 1]
    assert s[s > 0].min() == F32(1e-6) * F32(0.55)


# ---------------------------------------------------------------------------
# Nearest codes, as torch.bucketize over the float32 midpoints
# ---------------------------------------------------------------------------

def _torch_quantize(x, qmap):
    """The semantics of bitsandbytes' default quantiser written with torch ops:
    A·(1/absmax) per block, clamp, bucketize over the midpoints; zero blocks give
    y = 0 (inv = 0 here; bitsandbytes clamps absmax to 1e-38, the same codes)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=F32))
    n = t.numel()
    nb = -(-n // 256)
    pad = torch.zeros(nb * 256)
    pad[:n] = t
    blocks = pad.view(nb, 256)
    am = blocks.abs().amax(dim=1)
    inv = torch.where(am > 0, 1.0 / am, torch.zeros(()))
    y = torch.clamp(blocks * inv[:, None], -1, 1).reshape(-1)[:n]
    q = torch.from_numpy(qmap)
    b = (q[:-1] + q[1:]) / 2
    return torch.bucketize(y, b).to(torch.uint8).numpy(), am.numpy()


def _edge_data(qmap, rng):
    """Blocks of absmax 1 holding every bound (ties), its float32 neighbours, every
    code value, zeros of both signs, subnormals, ±1; an all-zero block; random
    blocks over many magnitudes; a short last block."""
    b = Q.bounds(qmap)
    special = np.concatenate([
        b, np.nextafter(b, F32(2)), np.nextafter(b, F32(-2)), qmap,
        np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0, -1.0], dtype=F32)])
    if qmap[0] >= 0:
        special = np.abs(special)
    pieces = []
    for k in range(0, len(special), 255):
        chunk = special[k:k + 255]
        pieces.append(np.concatenate([chunk, [F32(1.0)], np.zeros(255 - len(chunk), F32)]))
    pieces.append(np.zeros(256, F32))
    scale = np.exp(rng.uniform(-25, 5, 40 * 256))
    r = rng.standard_normal(40 * 256) * scale
    if qmap[0] >= 0:
        r = np.abs(r)
    pieces.append(r.astype(F32))
    pieces.append((rng.standard_normal(77) * (1 if qmap[0] < 0 else 0) + 1).astype(F32))
    return np.concatenate(pieces).astype(F32)


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_quantize_is_bucketize_semantics(kind):
    q = MAPS[kind]
    x = _edge_data(q, np.random.default_rng(3))
    codes, am = Q.quantize_blocks(x, q)
    tc, tam = _torch_quantize(x, q)
    assert np.array_equal(codes, tc)
    assert np.array_equal(_bits(am), _bits(tam))
    # nearest: no code of the map is closer to y (up to the float32 rounding of a
    # midpoint), and a value exactly on a bound takes the lower code
    inv = np.where(am > 0, F32(1) / np.where(am > 0, am, F32(1)), F32(0)).astype(F32)
    y = np.clip(x * np.repeat(inv, 256)[:len(x)], F32(-1), F32(1)).astype(np.float64)
    q64 = q.astype(np.float64)
    best = np.abs(q64[None, :] - y[:, None]).min(axis=1)
    assert np.all(np.abs(q64[codes] - y) <= best + 3e-7 * np.abs(y))
    on_bound = np.isin(y.astype(F32), Q.bounds(q))
    assert on_bound.sum() > 200
    assert np.all(q64[codes[on_bound]] < y[on_bound])


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_quantize_matches_bitsandbytes_default_backend(kind):
    """bitsandbytes' own torch implementation (its 'default' backend, reached by
    dispatching past its CPU kernel) gives the same codes and block maxima (it
    divides an all-zero block by 1e-38 instead of multiplying by 0: y = 0 alike)."""
    _bnb()
    q = MAPS[kind]
    x = _edge_data(q, np.random.default_rng(4))[: 200 * 256]   # whole blocks
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    bc, bam = op.redispatch(keys, torch.from_numpy(x), torch.from_numpy(q), 256)
    codes, am = Q.quantize_blocks(x, q)
    assert np.array_equal(codes, bc.numpy())
    assert (am == 0).any()
    assert np.array_equal(_bits(am), _bits(bam.numpy()))


def test_quantize_nan_and_inf():
    """A NaN in a block makes its absmax NaN and inv 0: the block's finite values
    go to the code of 0, the NaN clamps to 1 (the top code, as bucketize puts NaN).
    An inf absmax gives inv 0 too, and inf·0 is NaN."""
    q = MAPS["signed"]
    zero_code = int(np.searchsorted(Q.bounds(q), F32(0)))
    assert q[zero_code] == 0
    x = np.linspace(-1, 1, 512).astype(F32)
    x[3] = np.nan
    x[300] = np.inf
    codes, am = Q.quantize_blocks(x, q)
    assert np.isnan(am[0]) and am[1] == np.inf
    assert codes[3] == 255 and codes[300] == 255
    assert np.all(np.delete(codes, [3, 300]) == zero_code)


def test_dequantize():
    q = MAPS["unsigned"]
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, 1000).astype(np.uint8)
    am = rng.uniform(0, 3, 4).astype(F32)
    out = Q.dequantize_blocks(codes, am, q)
    assert out.dtype == F32
    expect = np.array([q[c] * am[i // 256] for i, c in enumerate(codes)], dtype=F32)
    assert np.array_equal(_bits(out), _bits(expect))
    with pytest.raises(ValueError, match="absmax has 3 entries"):
        Q.dequantize_blocks(codes, am[:3], q)


# ---------------------------------------------------------------------------
# The bucket table
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_bucket_table_is_exact_everywhere(kind):
    """code(y) = T[u] + (B[T[u]] < y) equals the count of bounds below y for every
    float32 y in [−1, 1] and NaN. Both sides are step functions of y that change
    only at bucket edges (the table) or bounds (the count): checking both ends of
    every bucket and every bound with its neighbours checks every value."""
    q = MAPS[kind]
    table, exact = Q.bucket_table(q)
    assert exact and table.dtype == np.uint8 and table.shape == (65536,)
    u = np.arange(65536, dtype=np.uint32)
    ends = np.concatenate([(u << 16), (u << 16) | 0xFFFF]).view(F32)
    b = Q.bounds(q)
    points = np.concatenate([ends, b, np.nextafter(b, F32(2)), np.nextafter(b, F32(-2)),
                             np.random.default_rng(6).uniform(-1, 1, 100_000).astype(F32)])
    finite = points[np.abs(points) <= 1]
    assert np.array_equal(Q.codes_by_table(finite, table, q), Q.nearest_codes(finite, q))
    nans = points[np.isnan(points)]
    assert len(nans) == 510 and np.all(Q.codes_by_table(nans, table, q) == 255)
    assert np.all(Q.nearest_codes(nans, q) == 255)
    # the brute force: per bucket, the count of bounds below its smallest value
    lo = np.minimum(ends[:65536], ends[65536:])
    ok = ~np.isnan(lo)
    brute = (b[None, :] < lo[ok][:, None]).sum(axis=1)
    nanish = (u[ok] & 0x7F80) == 0x7F80
    assert np.array_equal(table[ok][~nanish], brute[~nanish])


def test_bucket_table_flags_a_crowded_map():
    q = np.linspace(0.5, 0.502, 256).astype(F32)   # many bounds per bf16 bucket
    _, exact = Q.bucket_table(q)
    assert not exact


# ---------------------------------------------------------------------------
# bitsandbytes' CPU quantiser: a 65,536-entry table, not the nearest code
# ---------------------------------------------------------------------------

def _bnb_cpu_codes(x, q):
    bnb = _bnb()
    c, st = bnb.functional.quantize_blockwise(torch.from_numpy(x), code=torch.from_numpy(q),
                                              blocksize=256)
    return c.numpy(), st.absmax.numpy()


# The resolution of bitsandbytes' CPU quantiser, measured here: its code's value is
# within one top-decade step of the map (0.9/64 signed, 0.9/128 unsigned) of the
# nearest code's value, in units of absmax. test_torch_8bit compares with it.
BNB_CPU_RESOLUTION = {"signed": 0.9 / 64, "unsigned": 0.9 / 128}


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_bitsandbytes_cpu_quantizer_against_nearest(kind, capsys):
    q = MAPS[kind]
    rng = np.random.default_rng(7)
    g = rng.standard_normal(1 << 18)
    x = (g * g if kind == "unsigned" else g).astype(F32)    # a second / first moment
    codes, am = Q.quantize_blocks(x, q)
    bc, bam = _bnb_cpu_codes(x, q)
    assert np.array_equal(_bits(am), _bits(bam))
    dist = np.abs(bc.astype(int) - codes.astype(int))
    frac = float((dist > 0).mean())
    value_err = np.abs(q[bc].astype(np.float64) - q[codes]).max()
    with capsys.disabled():
        print(f"\nbitsandbytes CPU quantiser vs nearest ({kind}, "
              f"{'g²' if kind == 'unsigned' else 'g'}, g ~ N(0,1), {len(x)} values): "
              f"{100 * frac:.2f}% differ, up to {dist.max()} codes, "
              f"value error ≤ {value_err:.5f}·absmax")
    assert 0 < frac < 0.05                      # not the nearest code, but close
    assert dist.max() <= 7
    assert value_err <= BNB_CPU_RESOLUTION[kind] + 1e-6


# ---------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------

def _special_floats(rng):
    return np.concatenate([
        rng.standard_normal(20000).astype(F32) * np.exp(rng.uniform(-80, 80, 20000)).astype(F32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45,
                  np.finfo(F32).max, -np.finfo(F32).max, np.finfo(F32).tiny], dtype=F32),
        # exact halfway cases: lower 16 bits 0x8000, both parities
        (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x8000, dtype=np.uint32)).view(F32)])


def test_bf16_round_is_torch_round_to_nearest_even():
    x = _special_floats(np.random.default_rng(8))
    ours = Q.bf16_round(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.all(ours[~finite] == 0x7FC0)
    assert np.array_equal(Q.bf16_to_float(ours)[finite].view(np.uint32) >> 16,
                          ours[finite].astype(np.uint32))


def _mix32_python(x):
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_stochastic_rounding_hash_is_the_spec():
    for v in (0, 1, 0x9E3779B9, 0xFFFFFFFF, 123456789):
        assert int(Q.mix32(v)) == _mix32_python(v)
    seed, step = 1234, 77
    key = _mix32_python(seed ^ _mix32_python((step * 0x27D4EB2F) & 0xFFFFFFFF))
    assert Q.sr_key(seed, step) == key
    ks = _mix32_python(key ^ _mix32_python((3 + 0x9E3779B9) & 0xFFFFFFFF))
    expect = [_mix32_python(ks ^ ((i * 0x85EBCA6B) & 0xFFFFFFFF)) & 0xFFFF
              for i in range(1000, 1010)]
    assert Q.sr_bits(key, 3, 10, start=1000).tolist() == expect


def test_stochastic_rounding_is_unbiased_and_brackets():
    x = _special_floats(np.random.default_rng(9))
    r = Q.bf16_stochastic(x, key=Q.sr_key(5, 1), segment=2)
    u = x.view(np.uint32)
    finite = np.isfinite(x)
    down = (u >> 16).astype(np.uint16)
    assert np.all((r[finite] == down[finite]) | (r[finite] == down[finite] + 1))
    assert np.all(r[np.isnan(x)] == 0x7FC0)
    assert np.all(r[np.isinf(x)] == down[np.isinf(x)])
    # one value, many indices: rounds up with probability = the dropped fraction
    n = 1 << 16
    v = np.full(n, np.uint32(0x3F800000 | 0x4000)).view(F32)    # 1 + 1/4 ulp of bf16
    up = (Q.bf16_stochastic(v, key=Q.sr_key(11, 3)) == 0x3F81).mean()
    assert abs(up - 0.25) < 0.01
    # a different key or segment changes the bits, the same ones repeat them
    k = Q.sr_key(11, 3)
    assert np.array_equal(Q.bf16_stochastic(v, k, 1), Q.bf16_stochastic(v, k, 1))
    assert not np.array_equal(Q.sr_bits(k, 1, 64), Q.sr_bits(k, 2, 64))


# ---------------------------------------------------------------------------
# The float64 8-bit step
# ---------------------------------------------------------------------------

# bitsandbytes' rule name -> (fastopt.reference rule, its hyperparameters, the
# state buffers in order, the maps they use)
_STEP_CASES = {
    "adam": ("AdamW", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                           amsgrad=False, maximize=False, decoupled_weight_decay=True),
             ("exp_avg", "exp_avg_sq"), ("signed", "unsigned")),
    "momentum": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01,
                             nesterov=False, maximize=False), ("momentum_buffer",), ("signed",)),
    "rmsprop": ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.0,
                                centered=False, maximize=False), ("square_avg",), ("signed",)),
    "adagrad": ("Adagrad", dict(lr=0.05, lr_decay=0.0, weight_decay=0.01,
                                initial_accumulator_value=0.0, eps=1e-10, maximize=False),
                ("sum",), ("signed",)),
    "lion": ("Lion", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, maximize=False),
             ("exp_avg",), ("signed",)),
}


@pytest.mark.parametrize("name", sorted(_STEP_CASES))
@pytest.mark.parametrize("t", [1, 5])
def test_step8_is_the_float64_rule_on_the_dequantized_state(name, t):
    """step8 = fastopt's float64 reference of the matching rule, run on the
    dequantized state (the same update, in other algebraic forms), then the
    nearest codes of the result."""
    ref_name, hp, keys, kinds = _STEP_CASES[name]
    rng = np.random.default_rng(10 + t)
    n = 1000
    p = rng.standard_normal(n).astype(F32)
    g = rng.standard_normal(n).astype(F32)
    qmaps = [MAPS[k] for k in kinds]
    codes, absmax = [], []
    for k in kinds:
        s = rng.standard_normal(n)
        s = np.abs(s) if (k == "unsigned" or name in ("rmsprop", "adagrad")) else s
        c, a = Q.quantize_blocks(s.astype(F32) * 0.1, MAPS[k])
        codes.append(c)
        absmax.append(a)
    before = [c.copy() for c in codes]
    p_new, new_codes, new_absmax, new_state = Q.step8(name, p, g, codes, absmax, qmaps, hp, t)
    assert all(np.array_equal(a, b) for a, b in zip(codes, before))
    p64 = p.astype(np.float64)
    state = {key: Q.dequantize_blocks(c, a, q).astype(np.float64)
             for key, c, a, q in zip(keys, codes, absmax, qmaps)}
    R.step(ref_name, p64, g.astype(np.float64), state, {}, hp, t)
    np.testing.assert_allclose(p_new, p64, rtol=1e-12, atol=1e-15)
    for key, s, c, a, q in zip(keys, new_state, new_codes, new_absmax, qmaps):
        np.testing.assert_allclose(s, state[key], rtol=1e-12, atol=1e-300)
        assert np.array_equal(a, np.abs(np.pad(state[key], (0, 24))).reshape(-1, 256).max(1))
        # nearest in float64: no code of the map is closer to s/absmax
        y = s / np.repeat(a, 256)[:n]
        assert np.all(np.abs(q[c] - y) <= np.abs(q[None, :].astype(np.float64) - y[:, None]).min(1))


# ---------------------------------------------------------------------------
# The compiled engine's staged storage is this reference, bit for bit
# ---------------------------------------------------------------------------

def _compiled():
    from fastopt import backends
    if not backends.available("cython"):
        pytest.skip("the compiled kernels are not built")
    return backends.load("cython")


def _sgd_call(C, p, g, buf, am, qmap, pdt, first, lr, momentum, damp, sr_key=None,
              nthreads=2):
    # SGD's plan: lr, weight_decay, decay, momentum, 1 − dampening, nesterov, first,
    # maximize. The momentum buffer is one 8-bit column.
    args = (lr, 0.0, 1.0, momentum, 1.0 - damp, 0, first, 0)
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, buf.ctypes.data]], dtype=np.uintp)
    absmax = np.array([[0, 0, am.ctypes.data]], dtype=np.uintp)
    C.run_segments("sgd", (pdt, np.dtype(F32), "q8"), ptrs,
                   np.array([len(g)], dtype=np.intp), args, nthreads, True,
                   absmax=absmax, qmaps=(None, None, qmap), sr_key=sr_key)


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_engine_8bit_store_and_load_are_the_reference(kind):
    """SGD's first step sets its buffer to g exactly, so the stored codes and block
    maxima are the quantisation of g; a later step with momentum 1, dampening 1
    and lr 1 from p = 0 writes p = −(the dequantized buffer)."""
    C = _compiled()
    q = MAPS[kind]
    g = _edge_data(q, np.random.default_rng(12))
    g = np.concatenate([g, np.full(300, np.nan, F32), g[:1000]]).astype(F32)
    g[5000] = np.inf
    n = len(g)
    buf = np.zeros(n, np.uint8)
    am = np.zeros(-(-n // 256), F32)
    p = np.zeros(n, F32)
    _sgd_call(C, p, g, buf, am, q, np.dtype(F32), 1, 0.0, 0.9, 0.0)
    codes, want_am = Q.quantize_blocks(g, q)
    assert np.array_equal(buf, codes)
    assert np.array_equal(_bits(am), _bits(want_am))
    p[:] = 0
    _sgd_call(C, p, np.zeros(n, F32), buf, am, q, np.dtype(F32), 0, 1.0, 1.0, 1.0)
    with np.errstate(invalid="ignore"):
        want = F32(0) - Q.dequantize_blocks(codes, want_am, q)
    nan = np.isnan(want)
    assert nan.sum() >= 300 and np.array_equal(np.isnan(p), nan)
    assert np.array_equal(_bits(p[~nan]), _bits(want[~nan]))


def test_engine_bf16_parameters_are_the_reference():
    """A bf16 parameter is widened, stepped in float32 and rounded back: to nearest
    even, or stochastically with the spec's hash of (key, segment, index)."""
    C = _compiled()
    rng = np.random.default_rng(13)
    n = 3000
    p = Q.bf16_round(rng.standard_normal(n).astype(F32))
    g = rng.standard_normal(n).astype(F32)
    q = MAPS["signed"]
    lr = 1e-3
    step32 = Q.bf16_to_float(p) - F32(lr) * g     # first step: the buffer is g
    for key in (None, Q.sr_key(7, 3)):
        out = p.copy()
        buf = np.zeros(n, np.uint8)
        am = np.zeros(-(-n // 256), F32)
        _sgd_call(C, out, g, buf, am, q, "bfloat16", 1, lr, 0.9, 0.0, sr_key=key)
        want = Q.bf16_round(step32) if key is None else Q.bf16_stochastic(step32, key, 0)
        assert np.array_equal(out, want)
