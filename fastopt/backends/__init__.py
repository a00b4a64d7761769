"""Backends: where a step runs. Decided once, at import.

A backend is a module with:

* ``NAME``: "cython", "numba" or "cuda";
* one kernel per ``Rule.kernel`` name (``sgd``, ``adam``, ...), called
  ``kernel(param, grad, *buffers, *plan_args, nthreads)`` (``None`` for an absent
  buffer): one array, one step. It checks everything before it writes anything and
  raises ``ValueError``/``TypeError`` on a bad buffer;
* ``bind(kernel, param, buffers)`` and ``bind_many(kernel, params, buffers, labels)``:
  the classes' fast path, params and state checked once; ``step(grads, args,
  nthreads)``, or ``prepare(grads)`` (checks, writes nothing) then ``run(args,
  nthreads)``. ``bind_many`` runs a list of arrays as one call over segments;
* ``run_segments(kernel, dtype, ptrs, lengths, args, nthreads, check=True)``: one call
  over raw addresses the caller keeps alive (the torch adapter's path);
* ``max_threads()``: the default thread count;
* ``as_array(obj)``: ``obj`` as the backend's array type, without a copy, or
  ``TypeError``; ``full(n, dtype, value, like)``: a new state buffer beside ``like``;
  ``to_host(buf)``: a NumPy copy; ``copy_from_host(dst, host)``: fill ``dst``.

Selection: ``FASTOPT_BACKEND=cython|numba`` forces a CPU backend (an error if it is
unavailable); otherwise the compiled one when it imports, else Numba. Arrays that
expose ``__cuda_array_interface__`` always go to the CUDA backend.
"""

from __future__ import annotations

import importlib
import os
import warnings

_CPU_NAMES = ("cython", "numba")
_MODULES = {"cython": "fastopt.backends.compiled", "numba": "fastopt.backends.numba_cpu",
            "cuda": "fastopt.backends.numba_cuda"}
_loaded: dict = {}
_errors: dict = {}


def load(name: str):
    """The backend module ``name``; ImportError saying why when it cannot load."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_MODULES)}")
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise ImportError(f"fastopt backend {name!r} is unavailable: {_errors[name]}")
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a broken build raises more than ImportError
        _errors[name] = f"{type(exc).__name__}: {exc}"
        raise ImportError(f"fastopt backend {name!r} is unavailable: {_errors[name]}") from exc
    _loaded[name] = mod
    return mod


def available(name: str) -> bool:
    try:
        load(name)
        return True
    except ImportError:
        return False


def _select_default():
    forced = os.environ.get("FASTOPT_BACKEND", "").strip().lower()
    if forced:
        if forced not in _CPU_NAMES:
            raise ImportError(f"FASTOPT_BACKEND={forced!r}: choose 'cython' or 'numba'")
        return load(forced)
    for name in _CPU_NAMES:
        try:
            mod = load(name)
        except ImportError:
            continue
        if name != _CPU_NAMES[0]:
            # pip hides the build's warning when it succeeds: say it here too
            warnings.warn(f"fastopt: compiled kernels unavailable ({_errors.get('cython')}); "
                          f"running on the {name} backend", RuntimeWarning, stacklevel=3)
        return mod
    raise ImportError(
        "fastopt has no usable backend: the compiled kernels did not import "
        f"({_errors.get('cython')}) and Numba is unavailable ({_errors.get('numba')}). "
        "Reinstall with a C compiler (pip install --force-reinstall .) or pip install numba.")


DEFAULT = _select_default()


def _is_device_array(obj) -> bool:
    if obj is None or type(obj).__module__ == "numpy":
        return False
    if (type(obj).__module__ or "").startswith("torch") and hasattr(obj, "is_cuda"):
        # asked directly: torch's interface raises RuntimeError (which hasattr lets
        # through) for a tensor that requires grad, a parameter say
        return bool(obj.is_cuda)
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    # Numba's simulator arrays expose only __array_interface__: ask the backend
    return (type(obj).__module__ or "").startswith("numba.cuda") and \
        load("cuda").is_device_array(obj)


def for_array(obj, name: str | None = None):
    """The backend that updates ``obj``: CUDA for device arrays, else ``name`` or
    the default."""
    if _is_device_array(obj):
        if name not in (None, "cuda"):
            raise ValueError(f"backend={name!r} cannot update a CUDA array; use backend='cuda'")
        return load("cuda")
    if name is None:
        return DEFAULT
    if name == "cuda":
        raise ValueError("backend='cuda' needs arrays that expose __cuda_array_interface__")
    return load(name)


def bind(backend, kernel: str, param, buffers, **storage):
    """One array and its state, checked once: ``step(grad, args, nthreads)``."""
    return backend.bind(kernel, param, buffers, **storage)


def bind_many(backend, kernel: str, params, buffers, labels=None, **storage):
    """Arrays of one storage type and their state (one tuple per array), stepped
    together: ``step(grads, args, nthreads, copies=None, sr_key=None)``, or
    ``prepare(grads, copies, sr_key)`` then ``run(args, nthreads)``. ``labels`` are
    the arrays' indices for messages; ``storage``: ``grad_dtype``, ``absmax``,
    ``qmaps`` (see the compiled backend's ``bind_many``)."""
    return backend.bind_many(kernel, params, buffers, labels, **storage)


# One thread count for every CPU backend, read by each call (kernels take it as
# their last argument, so a change applies from the next step on).
_num_threads = [max(1, int(DEFAULT.max_threads()))]


def num_threads() -> int:
    return _num_threads[0]


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels may use (large buffers only: small ones run on one)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _num_threads[0] = n
