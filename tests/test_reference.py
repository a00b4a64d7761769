"""Every rule × every flag combination × both dtypes × odd lengths × 100 steps
against the NumPy transcription of docs/rules.md (fastopt/reference.py), on the
compiled backend (the others are proven bitwise equal to it).

The kernels evaluate each element in the reference's operation order, so the
expected deviation is zero; the tolerances (float64 1e-12, float32 1e-5 relative
to the reference run in float32 arithmetic) leave room only for a compiler that
reorders, never for a wrong term.
"""

import numpy as np
import pytest

import fastopt
from fastopt import reference
from cases import case_id, combos, grads, initial_param
from conftest import Backend, record
from fastopt.rules import RULES

# 33343: odd, and past the parallel threshold (32768), so both threads and a SIMD
# tail run
LENGTHS = (1, 7, 1031, 33343)
STEPS = 100
RTOL = {np.float32: 1e-5, np.float64: 1e-12}

CASES = [pytest.param(name, hp, id=f"{name}[{case_id(hp, name)}]")
         for name in RULES for hp in combos(name)]


@pytest.fixture(scope="module")
def backend():
    """The compiled backend only: the Numba CPU and CUDA backends are proven bitwise
    equal to it, path by path, in test_numba_backends.py and test_engine.py, so
    running this grid on them too would add minutes and no evidence."""
    return Backend("cython")


def run_reference(name, hp, n, dtype, steps):
    ref_p = initial_param(n, dtype)
    ref_state = reference.initial_state(name, hp, n, dtype)
    ref_scalars = reference.initial_scalars(name, hp)
    for t, g in enumerate(grads(n, steps, dtype), start=1):
        reference.step(name, ref_p, g, ref_state, ref_scalars, hp, t)
    return ref_p, ref_state, ref_scalars


def run_both(backend, name, hp, n, dtype, steps):
    opt = getattr(fastopt, name)(backend.asarray(initial_param(n, dtype)), **hp, **backend.kw())
    for g in grads(n, steps, dtype):
        opt.step(backend.asarray(g))
    return (opt, *run_reference(name, hp, n, dtype, steps))


def assert_close(suite, backend, name, dtype, actual, expected, what):
    actual = backend.numpy(actual)
    assert actual.dtype == expected.dtype, what
    scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
    record(suite, backend.name, name, dtype, actual, expected)
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale * 1e-3,
                               equal_nan=True, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", CASES)
def test_matches_reference(backend, name, hp, dtype):
    for n in backend.lengths(LENGTHS):
        steps = backend.steps(STEPS)
        opt, ref_p, ref_state, ref_scalars = run_both(backend, name, hp, n, dtype, steps)
        assert opt.step_count == steps
        assert_close("reference", backend, name, dtype, opt.param, ref_p, f"param, n={n}")
        assert set(opt.state) == set(ref_state)
        for key, ref in ref_state.items():
            assert_close("reference", backend, name, dtype, opt.state[key], ref, f"{key}, n={n}")
        for key, value in ref_scalars.items():
            assert opt.state_dict()["scalars"][key] == pytest.approx(value, rel=1e-15)
