"""SMPL model files (released or cleaned .pkl, smplx .npz) read without chumpy or free unpickling.

What the released pickles hold (``basicModel_{f,m,neutral}_lbs_10_207_0_v1.0.0.pkl``, SPIN's
``SMPL_NEUTRAL.pkl``, the v1.1.0 ``basicmodel_*`` files) -- Python 2 cPickle streams of a dict:

* numpy arrays, pickled by numpy 1.x as ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,),
  'b')`` plus the state ``(1, shape, dtype, is_fortran, raw bytes)``; a dtype is
  ``numpy.dtype('f8', 0, 1)`` with state ``(3, '<', None, None, None, -1, -1, 0)``;
* ``shapedirs`` as a chumpy ``chumpy.ch.Ch`` leaf (NEWOBJ at protocol 2,
  ``copy_reg._reconstructor(Ch, object, None)`` at protocols 0/1). ``Ch.__new__`` creates
  ``_dirty_vars = set()``, ``_itr = None`` and ``_depends_on_deps = {}`` and ``Ch.__getstate__``
  drops only ``_parents`` and ``_cache``, so the state is ``{'x': array, '_dirty_vars': set(),
  '_itr': None, '_depends_on_deps': {}}`` (chumpy >= 0.67 adds ``_make_dense``/``_make_sparse``);
  Python 2 writes the set as ``__builtin__.set([])``;
* ``J_regressor`` and ``J_regressor_prior`` as ``scipy.sparse.csc.csc_matrix`` whose state is the
  old scipy instance dict (``format``, ``_shape``, ``maxprint``, ``data``, ``indices``, ``indptr``);
* Python 2 byte strings, which arrive as latin-1 ``str`` (or ``bytes``, from Python 3 re-saves).

smplx's ``tools/clean_ch.py`` (Python 2, protocol 0) writes the same dict with every chumpy object
replaced by its array. chumpy does not import on current Python, and unpickling runs code, so a
restricted unpickler maps an allow-list of globals to inert stand-ins, rebuilds arrays itself
(numeric dtypes only, sizes checked against a budget before anything is allocated) and refuses
every other global and every computed chumpy expression.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse

from jregfix.errors import JregfixError

REQUIRED_KEYS = (
    "v_template",
    "shapedirs",
    "posedirs",
    "J_regressor",
    "weights",
    "kintree_table",
    "f",
)

_FIX = "use the released SMPL pickle, a clean_ch.py output or an smplx .npz"
# Numeric dtypes only: object, string and structured arrays are never part of an SMPL model.
_DTYPE_SPECS = {f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8)} | {
    "f2",
    "f4",
    "f8",
    "b1",
}
# Reconstructed arrays may not exceed this multiple of the file size (plus a little slack):
# legitimate arrays are stored in full, so a larger claim is a lie meant to exhaust memory.
_BUDGET_FACTOR, _BUDGET_SLACK = 4, 1 << 20
# State attributes of a chumpy leaf; any other attribute means a computed node.
_CH_LEAF_KEYS = {"x", "_dirty_vars", "_itr", "_depends_on_deps", "_make_dense", "_make_sparse"}
_SPARSE_KEYS = {
    "format",
    "_shape",
    "maxprint",
    "data",
    "indices",
    "indptr",
    "_has_sorted_indices",
    "_has_canonical_format",
}


class _Refused(pickle.UnpicklingError):
    """A deliberate refusal; its message is shown to the user as is."""


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise _Refused(f"{what} declares {nbytes} bytes, more than the file can hold")
        self.left -= nbytes


class _NdarrayClass:
    """Stands for ``numpy.ndarray``: only valid as the first argument of ``_reconstruct``."""

    def __call__(self, *args):
        raise _Refused("numpy.ndarray is called directly, which numpy's pickles never do")


_NDARRAY = _NdarrayClass()


class _Dtype:
    """A numeric dtype being rebuilt: ``numpy.dtype(spec, align, copy)`` then its state."""

    def __init__(self, spec, align=0, copy=1):
        spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if spec not in _DTYPE_SPECS:
            raise _Refused(f"array dtype {spec!r} is not numeric")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[0] in (3, 4)
            and state[2:5] == (None, None, None)
            and state[8:] in ((), (None,))
        ):
            raise _Refused("unsupported numpy dtype state (structured or with metadata)")
        endian = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if endian not in ("<", ">", "|", "="):
            raise _Refused(f"bad byte order {endian!r} in a numpy dtype")
        if endian in "<>":
            self.dtype = self.dtype.newbyteorder(endian)


def _shape_of(shape) -> tuple[int, ...]:
    if not (
        isinstance(shape, tuple)
        and len(shape) <= 32
        and all(type(n) is int and n >= 0 for n in shape)
    ):
        raise _Refused(f"bad array shape {shape!r}")
    return shape


def _array_from_bytes(raw, dtype, shape, fortran: bool, budget: _Budget) -> np.ndarray:
    """Checks, then copies ``raw`` into a native-order array; nothing is allocated before."""
    shape = _shape_of(shape)
    if not isinstance(dtype, _Dtype):
        raise _Refused("numpy array without a numeric dtype")
    nbytes = math.prod(shape) * dtype.dtype.itemsize
    budget.charge(nbytes, f"array of shape {shape}")
    if isinstance(raw, str):  # a Python 2 str read with encoding='latin1'
        raw = raw.encode("latin1")
    if not isinstance(raw, bytes | bytearray) or len(raw) != nbytes:
        raise _Refused(f"array of shape {shape} does not hold {nbytes} bytes of data")
    flat = np.frombuffer(raw, dtype.dtype)
    return flat.reshape(shape, order="F" if fortran else "C").astype(
        dtype.dtype.newbyteorder("="), order="K"
    )


class _Array:
    """An ndarray being rebuilt from ``(version, shape, dtype, is_fortran, raw bytes)``."""

    def __init__(self, budget: _Budget):
        self.budget = budget
        self.array: np.ndarray | None = None

    @classmethod
    def wrap(cls, array: np.ndarray) -> _Array:
        done = cls(_Budget(0))
        done.array = array
        return done

    def __setstate__(self, state):
        if self.array is not None:
            raise _Refused("numpy array state applied twice")
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _Refused("unsupported numpy array state")
        shape, dtype, fortran, raw = state
        if type(fortran) is not bool:
            raise _Refused("numpy array state without an order flag")
        self.array = _array_from_bytes(raw, dtype, shape, fortran, self.budget)


class _ChumpyNode:
    """A pickled chumpy object; only a leaf ``chumpy.ch.Ch`` holding a plain array is accepted."""

    origin = "chumpy.ch.Ch"

    def __new__(cls, *args):
        if args:
            raise _Refused(f"{cls.origin} is constructed with arguments")
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state


class _Sparse:
    """A pickled scipy compressed sparse matrix (the instance dict of csc_matrix / csr_matrix)."""

    fmt = "csc"

    def __new__(cls, *args):
        if args:
            raise _Refused(f"scipy.sparse {cls.fmt}_matrix is constructed with arguments")
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state


class _Csr(_Sparse):
    fmt = "csr"


def _reconstructor(cls, base, state):
    """``copy_reg._reconstructor`` (protocols 0/1), limited to our stand-in classes."""
    if not (
        isinstance(cls, type)
        and issubclass(cls, _ChumpyNode | _Sparse)
        and base is object
        and state is None
    ):
        raise _Refused("copy_reg._reconstructor of something other than chumpy or scipy.sparse")
    return cls()


def _make_set(items=()):
    """``set(list)``: chumpy's ``_dirty_vars`` is a set of attribute names."""
    if not (isinstance(items, list | tuple) and all(isinstance(s, str | bytes) for s in items)):
        raise _Refused("a pickled set holds something other than names")
    return set(items)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode(str, 'latin1')``: how Python 3 writes bytes at protocol 2."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _Refused("_codecs.encode is used for something other than latin-1 bytes")
    return text.encode("latin1")


_SPARSE_MODULES = {
    "scipy.sparse",
    "scipy.sparse.csc",
    "scipy.sparse.csr",
    "scipy.sparse._csc",
    "scipy.sparse._csr",
}
_BUILTINS = {"__builtin__", "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler with an allow-list (numpy arrays, chumpy nodes, scipy sparse); see module doc."""

    def __init__(self, file, budget: int):
        super().__init__(file, encoding="latin1")
        self.budget = _Budget(budget)
        self._chumpy_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._reconstruct
        if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._scalar
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return self._frombuffer  # numpy's reduction at protocol 5 (Python >= 3.14 default)
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        if (module, name) in {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}:
            return _reconstructor
        if module in _BUILTINS and name == "object":
            return object
        if module in _BUILTINS and name == "set":
            return _make_set
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module.split(".")[0] == "chumpy" and name.isidentifier():
            return self._chumpy_class(module, name)
        if module in _SPARSE_MODULES and name in ("csc_matrix", "csr_matrix"):
            return _Sparse if name == "csc_matrix" else _Csr
        raise _Refused(f"global '{module}.{name}' is not allowed in an SMPL file")

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not allowed in an SMPL file")

    def _chumpy_class(self, module: str, name: str) -> type:
        origin = f"{module}.{name}"
        if origin == "chumpy.ch.Ch":
            return _ChumpyNode
        # Other chumpy classes are computed expressions: kept as named stand-ins so that the
        # refusal can say which key holds one.
        if origin not in self._chumpy_classes:
            self._chumpy_classes[origin] = type(name, (_ChumpyNode,), {"origin": origin})
        return self._chumpy_classes[origin]

    def _reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY:
            raise _Refused("numpy _reconstruct of something other than numpy.ndarray")
        # numpy itself would allocate this placeholder; we only check its size.
        self.budget.charge(math.prod(_shape_of(shape)), f"array placeholder {shape}")
        return _Array(self.budget)

    def _frombuffer(self, buf, dtype, shape, order):
        if order not in ("C", "F"):
            raise _Refused(f"bad array order {order!r}")
        return _Array.wrap(_array_from_bytes(buf, dtype, shape, order == "F", self.budget))

    def _scalar(self, dtype, raw):
        if not isinstance(dtype, _Dtype):
            raise _Refused("numpy scalar without a numeric dtype")
        raw = raw.encode("latin1") if isinstance(raw, str) else raw
        if not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
            raise _Refused("numpy scalar with the wrong number of bytes")
        return np.frombuffer(raw, dtype.dtype)[0]


def _convert(obj, key: str):
    """Turn stand-ins into numpy arrays / scipy sparse matrices; ``key`` names the top entry."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise JregfixError(f"key '{key}' holds a numpy array without data")
        return obj.array
    if isinstance(obj, _ChumpyNode):
        return _chumpy_leaf(obj, key)
    if isinstance(obj, _Sparse):
        return _sparse(obj, key)
    if isinstance(obj, dict) and all(isinstance(k, str | bytes | int) for k in obj):
        return {_text(k): _convert(v, key) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_convert(v, key) for v in obj)
    if isinstance(obj, set) and all(isinstance(s, str | bytes) for s in obj):
        return obj
    if obj is None or isinstance(obj, str | bytes | int | float | np.generic):
        return obj
    raise JregfixError(f"key '{key}' holds an unsupported {type(obj).__name__} object")


def _text(k):
    return k.decode("latin1") if isinstance(k, bytes) else k


def _chumpy_leaf(node: _ChumpyNode, key: str) -> np.ndarray:
    computed = (
        f"key '{key}' is a computed chumpy expression ({{}}); convert the model with "
        "smplx's tools/clean_ch.py or use the released file"
    )
    if type(node) is not _ChumpyNode:
        raise JregfixError(computed.format(node.origin))
    state = getattr(node, "state", None)
    if not isinstance(state, dict):
        raise JregfixError(f"key '{key}': chumpy Ch without a state dict")
    state = {_text(k): v for k, v in state.items()}
    extra = sorted(set(state) - _CH_LEAF_KEYS)
    if extra:
        raise JregfixError(computed.format(f"Ch with attribute(s) {extra}"))
    if state.get("_depends_on_deps", {}) != {}:
        raise JregfixError(computed.format("Ch with non-empty _depends_on_deps"))
    dirty = state.get("_dirty_vars", set())
    if not (
        isinstance(dirty, set)
        and {_text(s) for s in dirty} <= {"x"}
        and (state.get("_itr") is None or type(state.get("_itr")) is int)
        and all(type(state.get(k, False)) is bool for k in ("_make_dense", "_make_sparse"))
    ):
        raise JregfixError(computed.format("Ch with unexpected bookkeeping state"))
    if not isinstance(state.get("x"), _Array):
        raise JregfixError(computed.format("Ch whose value 'x' is not a plain array"))
    return _convert(state["x"], key)


def _sparse(node: _Sparse, key: str):
    state = getattr(node, "state", None)
    state = {_text(k): v for k, v in state.items()} if isinstance(state, dict) else {}
    if not ({"_shape", "data", "indices", "indptr"} <= set(state) <= _SPARSE_KEYS):
        raise JregfixError(
            f"key '{key}': scipy sparse matrix with unexpected state {sorted(state)}"
        )
    shape = state["_shape"]
    data, indices, indptr = (_convert(state[k], key) for k in ("data", "indices", "indptr"))
    if not (
        isinstance(shape, tuple)
        and len(shape) == 2
        and all(type(n) is int and n >= 0 for n in shape)
        and all(isinstance(a, np.ndarray) and a.ndim == 1 for a in (data, indices, indptr))
        and indices.dtype.kind in "iu"
        and indptr.dtype.kind in "iu"
    ):
        raise JregfixError(f"key '{key}': malformed scipy sparse matrix")
    major, minor = shape if node.fmt == "csr" else shape[::-1]
    if not (
        len(indptr) == major + 1
        and indptr[0] == 0
        and (np.diff(indptr) >= 0).all()
        and indptr[-1] == len(indices) == len(data)
        and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < minor))
    ):
        raise JregfixError(f"key '{key}': inconsistent {node.fmt} sparse matrix indices")
    cls = scipy.sparse.csr_matrix if node.fmt == "csr" else scipy.sparse.csc_matrix
    return cls((data, indices, indptr), shape=shape)


def load_smpl_file(path: str | Path) -> dict:
    """Read an SMPL model (.pkl or .npz) into a dict of numpy arrays / scipy sparse matrices.

    Raises JregfixError (one line, naming ``path``) for anything but a well-formed SMPL model.
    """
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: SMPL model file not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise JregfixError(f"{path}: not a readable SMPL npz ({exc}); {_FIX}") from None
    else:
        data = _load_pickle(path)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise JregfixError(f"{path}: SMPL file lacks key(s) {missing}; {_FIX}")
    try:
        return _validate(data)
    except JregfixError as exc:
        raise JregfixError(f"{path}: {exc}") from None


def _load_pickle(path: Path) -> dict:
    budget = _BUDGET_FACTOR * path.stat().st_size + _BUDGET_SLACK
    try:
        with open(path, "rb") as f:
            raw = RestrictedUnpickler(f, budget).load()
    except _Refused as exc:
        raise JregfixError(f"{path}: {exc}; {_FIX}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as exc:
        detail = " ".join(str(exc).split())  # one line, whatever the exception says
        raise JregfixError(
            f"{path}: not a readable SMPL pickle ({type(exc).__name__}: {detail}); {_FIX}"
        ) from None
    if not isinstance(raw, dict):
        raise JregfixError(
            f"{path}: expected a dict in the SMPL pickle, got {type(raw).__name__}; {_FIX}"
        )
    try:
        return {_text(k): _convert(v, _text(k)) for k, v in raw.items()}
    except JregfixError as exc:
        raise JregfixError(f"{path}: {exc}") from None
    except RecursionError:
        raise JregfixError(f"{path}: SMPL pickle nested too deeply; {_FIX}") from None


def _validate(data: dict) -> dict:
    """Shapes, numeric dtypes and finite values of the keys the body model uses."""
    v = np.asarray(data["v_template"]).shape
    if len(v) != 2 or v[1] != 3:
        raise JregfixError(f"v_template has shape {v}, expected (V, 3)")
    nv = v[0]
    checks = {
        "shapedirs": lambda s: len(s) == 3 and s[:2] == (nv, 3),
        "posedirs": lambda s: len(s) == 3 and s[:2] == (nv, 3),
        "weights": lambda s: len(s) == 2 and s[0] == nv,
        "J_regressor": lambda s: len(s) == 2 and s[1] == nv,
        "f": lambda s: len(s) == 2 and s[1] == 3,
        "kintree_table": lambda s: len(s) == 2 and s[0] == 2,
    }
    for key in REQUIRED_KEYS:
        value = data[key]
        values = value.data if scipy.sparse.issparse(value) else np.asarray(value)
        if values.dtype.kind not in "biuf":
            raise JregfixError(f"key '{key}' has non-numeric dtype {values.dtype}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise JregfixError(f"key '{key}' holds NaN or infinite values")
        shape = tuple(value.shape)
        if key in checks and not checks[key](shape):
            raise JregfixError(f"key '{key}' has unexpected shape {shape} (V={nv})")
    faces = np.asarray(data["f"])
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise JregfixError(f"key 'f' indexes vertices outside 0..{nv - 1}")
    return data
