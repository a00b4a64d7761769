"""Checkpoints: a state dict in one ``.npz`` file, without pickle, written atomically.

The file holds the state arrays under ``state/<name>`` (``state/<i>/<name>`` for the
i-th array of an optimizer built from a list) and everything else as UTF-8 JSON in
``meta``. ``.npz`` has no bfloat16 (ml_dtypes' type would be saved as raw void
bytes): such an array is stored as its uint16 bits, and ``meta['dtypes']`` maps its
entry to ``"bfloat16"``, so it reads back bit for bit. ``save`` writes a temporary
file in the same folder, flushes it to disk and renames it over the target, so a
crash mid-save leaves the previous file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

_META = "meta"
_STATE = "state/"
_KEYS = ("format", "rule", "dtype", "size", "step", "hyperparameters", "scalars")
_OPTIONAL = ("seed",)
_TAGGED = {"bfloat16": np.uint16}   # dtypes .npz cannot hold: stored as these bits


def _stored(key, arr, tags):
    arr = np.ascontiguousarray(arr)
    name = arr.dtype.name
    if name in _TAGGED:
        tags[key] = name
        return arr.view(_TAGGED[name])
    return arr


def _restored(key, arr, tags):
    tag = tags.get(key)
    if tag is None:
        return arr
    if tag not in _TAGGED or arr.dtype != _TAGGED[tag]:
        raise ValueError(f"{key!r} is tagged {tag!r} but holds {arr.dtype}")
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError(f"{key!r} holds {tag} state: reading it needs the ml_dtypes "
                         "package") from None
    return arr.view(getattr(ml_dtypes, tag))


def save(state_dict: dict, path) -> None:
    """Write ``state_dict`` (from ``Optimizer.state_dict()``) to ``path``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = [k for k in _KEYS + ("state",) if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing {missing}")
    meta = {k: state_dict[k] for k in _KEYS}
    meta.update({k: state_dict[k] for k in _OPTIONAL if state_dict.get(k) is not None})
    meta["hyperparameters"] = {k: list(v) if isinstance(v, tuple) else v
                               for k, v in meta["hyperparameters"].items()}
    state = state_dict["state"]
    tags: dict = {}
    if isinstance(state, (list, tuple)):  # one dict per array
        meta["state"] = [sorted(st) for st in state]
        arrays = {f"{_STATE}{i}/{name}": _stored(f"{_STATE}{i}/{name}", arr, tags)
                  for i, st in enumerate(state) for name, arr in st.items()}
    else:
        meta["state"] = sorted(state)
        arrays = {_STATE + name: _stored(_STATE + name, arr, tags)
                  for name, arr in state.items()}
    if tags:
        meta["dtypes"] = tags
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastopt-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path) -> dict:
    """Read a checkpoint written by ``save``; ValueError if it is not one."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if _META not in names:
                raise ValueError("no 'meta' entry")
            meta = json.loads(npz[_META].tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or any(k not in meta for k in _KEYS + ("state",)):
                raise ValueError("'meta' lacks required keys")

            tags = meta.get("dtypes", {})
            if not isinstance(tags, dict):
                raise ValueError("'meta' has a malformed 'dtypes' entry")

            def read(prefix, entries):
                out = {}
                for name in entries:
                    if prefix + name not in names:
                        raise ValueError(f"state array {prefix + name!r} is missing")
                    # reads and CRC-checks it
                    out[name] = _restored(prefix + name, np.array(npz[prefix + name]), tags)
                return out

            listed = meta["state"]
            if listed and all(isinstance(e, list) for e in listed):
                state = [read(f"{_STATE}{i}/", e) for i, e in enumerate(listed)]
            else:
                state = read(_STATE, listed)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"path {path!r} is not a valid fastopt checkpoint "
                         f"({type(exc).__name__}: {exc})") from None
    sd = {k: meta[k] for k in _KEYS}
    sd.update({k: meta[k] for k in _OPTIONAL if k in meta})
    sd["hyperparameters"] = {k: tuple(v) if isinstance(v, list) else v
                             for k, v in meta["hyperparameters"].items()}
    sd["state"] = state
    return sd
