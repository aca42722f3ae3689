"""SMPL model files (.pkl as released, .npz) read without chumpy and without free unpickling.

The released pickles (basicModel_*_lbs_10_207_0_v1.0.0.pkl, SMPL_NEUTRAL.pkl) are Python 2
pickles holding numpy arrays, ``chumpy.ch.Ch`` objects and ``scipy.sparse.csc_matrix``. chumpy
does not import on Python 3.11, so a restricted unpickler resolves only an allow-list of
globals: numpy's array reconstruction, stand-ins for chumpy objects (their ``x`` state is the
array) and for scipy sparse matrices (rebuilt from ``data``/``indices``/``indptr``). Any other
global is refused, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse

from jregfix.errors import JregfixError

REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights",
                 "kintree_table", "f")


class _StandIn:
    """Receives the pickled state of an object whose class we refuse to import."""

    kind = "object"

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _ChumpyStandIn(_StandIn):
    kind = "chumpy"


class _SparseStandIn(_StandIn):
    kind = "sparse"
    fmt = "csc"


def _sparse_class(fmt: str) -> type:
    return type(f"_{fmt}StandIn", (_SparseStandIn,), {"fmt": fmt})


def _reconstructor(cls, base, state):
    """copy_reg._reconstructor, limited to our stand-ins and plain objects."""
    if isinstance(cls, type) and issubclass(cls, _StandIn):
        return cls()
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, 'latin1'): harmless.
_CODECS_ENCODE = ("_codecs", "encode")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler with an allow-list: numpy arrays, chumpy and scipy.sparse stand-ins."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(module, name)
        if (module, name) == _CODECS_ENCODE:
            import codecs

            return codecs.encode
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _reconstructor
        if module in ("__builtin__", "builtins") and name == "object":
            return object
        if module.split(".")[0] == "chumpy":
            return _ChumpyStandIn
        if module.startswith("scipy.sparse") and name.endswith("_matrix"):
            return _sparse_class(name[: -len("_matrix")])
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in an SMPL file")


def _numpy_global(module: str, name: str):
    # numpy 2 renamed numpy.core to numpy._core; old pickles name the former.
    if module == "numpy":
        return getattr(np, name)
    return getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray, name)


def _convert(obj):
    """Turn stand-ins into numpy arrays / scipy sparse matrices, recursively."""
    if isinstance(obj, _ChumpyStandIn):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "x" in state:
            return np.asarray(_convert(state["x"]))
        raise JregfixError("a chumpy object in the SMPL file has no array value ('x')")
    if isinstance(obj, _SparseStandIn):
        s = obj.state or {}
        shape = s.get("_shape", s.get("shape"))
        cls = {"csc": scipy.sparse.csc_matrix, "csr": scipy.sparse.csr_matrix}.get(obj.fmt)
        if cls is None or shape is None:
            raise JregfixError(f"unsupported sparse matrix '{obj.fmt}' in the SMPL file")
        return cls((s["data"], s["indices"], s["indptr"]), shape=tuple(shape))
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _convert(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_convert(v) for v in obj)
    return obj


def load_smpl_file(path: str | Path) -> dict:
    """Read an SMPL model (.pkl or .npz) into a dict of numpy arrays / scipy sparse matrices."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: SMPL model file not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise JregfixError(f"{path}: not a readable SMPL npz ({exc})") from None
    else:
        try:
            with open(path, "rb") as f:
                raw = RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise JregfixError(f"{path}: {exc}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError,
                struct.error) as exc:
            raise JregfixError(f"{path}: not a readable SMPL pickle ({exc})") from None
        if not isinstance(raw, dict):
            raise JregfixError(f"{path}: expected a dict in the SMPL pickle, got {type(raw)}")
        try:
            data = _convert(raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise JregfixError(f"{path}: malformed object in the SMPL pickle ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise JregfixError(f"{path}: SMPL file lacks key(s) {missing}")
    return _validate(data, path)


def _validate(data: dict, path: Path) -> dict:
    v = np.asarray(data["v_template"]).shape
    if len(v) != 2 or v[1] != 3:
        raise JregfixError(f"{path}: v_template has shape {v}, expected (V, 3)")
    nv = v[0]
    checks = {
        "shapedirs": lambda s: len(s) == 3 and s[:2] == (nv, 3),
        "posedirs": lambda s: len(s) == 3 and s[:2] == (nv, 3),
        "weights": lambda s: len(s) == 2 and s[0] == nv,
        "J_regressor": lambda s: len(s) == 2 and s[1] == nv,
        "f": lambda s: len(s) == 2 and s[1] == 3,
        "kintree_table": lambda s: len(s) == 2 and s[0] == 2,
    }
    for key, ok in checks.items():
        shape = tuple(data[key].shape)
        if not ok(shape):
            raise JregfixError(f"{path}: key '{key}' has unexpected shape {shape} (V={nv})")
    return data
