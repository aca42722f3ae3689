"""Writers of the SMPL model files, byte for byte as their original tools wrote them.

The released SMPL ``.pkl`` files (v1.0.0 / v1.1.0) were written by Python 2's cPickle at
protocol 2: a dict holding numpy 1.x arrays, ``shapedirs`` as a chumpy ``Ch`` object with
chumpy's full instance state, the joint regressors as old scipy ``csc_matrix`` objects, byte
strings for text, and the dict entries in Python 2's hash-table order. smplx's
``tools/clean_ch.py`` rewrites them without chumpy through Python 2's pure-Python ``pickle`` at
its default protocol 0; smplx also reads an ``.npz`` of the same arrays.

These writers produce such files from a model dict (e.g. the synthetic stand-in body used by
tests and benchmarks, since the real files are licensed) so that the reader,
:func:`jregfix.io.smpl_file.load_smpl_file`, is exercised on the real layouts.
"""

from __future__ import annotations

import copyreg
import pickle
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse

from jregfix.io.atomic import atomic_path, save_npz

# The released pickles' entries in their file order (Python 2 dict order, as every dump shows).
RELEASED_KEY_ORDER = (
    "J_regressor_prior",
    "f",
    "J_regressor",
    "kintree_table",
    "J",
    "weights_prior",
    "weights",
    "vert_sym_idxs",
    "posedirs",
    "pose_training_info",
    "bs_style",
    "v_template",
    "shapedirs",
    "bs_type",
)


def write_released_style_pickle(
    path: str | Path,
    model: dict,
    *,
    gender: str = "neutral",
    protocol: int = 2,
    chumpy_keys=("shapedirs",),
) -> None:
    """Write ``model`` opcode for opcode the way the released SMPL pickles were written.

    That is Python 2 cPickle (``protocol`` 2; 0 and 1 are also accepted) of a dict holding
    numpy 1.x arrays, ``chumpy_keys`` as chumpy ``Ch`` leaves (``shapedirs`` in the released
    v1.0.0 files) with chumpy's full state, and the sparse regressors as old scipy
    ``csc_matrix`` objects; strings are byte strings and dicts come in Python 2 order. Entries
    the released files carry besides the model (``J_regressor_prior``, ``weights_prior``,
    ``vert_sym_idxs``, ``pose_training_info``) are added when ``model`` lacks them. Only memo
    indices may differ: cPickle skips memoizing objects nothing else refers to.
    """
    layout = _released_layout(model, gender)
    out = {k: (_ChLeaf(np.asarray(v)) if k in chumpy_keys else v) for k, v in layout.items()}
    _write_py2_pickle(path, out, protocol, cpickle=True)


def write_cleaned_pickle(path: str | Path, model: dict, gender: str = "neutral") -> None:
    """Write ``model`` as smplx's ``tools/clean_ch.py`` does: the released dict with every chumpy
    object replaced by its array, dumped by Python 2's ``pickle`` module at its default protocol
    0."""
    _write_py2_pickle(path, _released_layout(model, gender), 0, cpickle=False)


def _released_layout(model: dict, gender: str) -> dict:
    from scipy.spatial import cKDTree

    def mirror_indices():  # nearest vertex of the left-right mirror image (x is the body's left)
        v = np.asarray(model["v_template"])
        return cKDTree(v).query(v * [-1.0, 1.0, 1.0])[1].astype(np.int64)

    defaults = {
        "J_regressor_prior": lambda: model["J_regressor"],
        "weights_prior": lambda: model["weights"],
        "vert_sym_idxs": mirror_indices,
        "pose_training_info": lambda: {
            "expid": "tj10smooth",
            "J_regressor_prior_wt": 10.0,
            "restpose_type": "t",
            "bs_style": "lbs",
            "gender": gender,
            "bs_type": "lrotmin",
        },
    }
    merged = {**{k: make() for k, make in defaults.items() if k not in model}, **model}
    ordered = {k: merged[k] for k in RELEASED_KEY_ORDER if k in merged}
    return {**ordered, **{k: v for k, v in merged.items() if k not in ordered}}


class _ChLeaf:
    """A chumpy ``Ch`` leaf to be pickled as ``chumpy.ch.Ch`` with chumpy's own state."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def state(self) -> dict:
        # Ch.__new__ fills __dict__ in this order (then set(x=...)); __getstate__ returns a copy
        # (a 16-slot dict in Python 2) without _parents and _cache.
        created = ("_dirty_vars", "_itr", "_parents", "_cache", "_depends_on_deps", "x")
        values: dict[str, object] = {
            "_dirty_vars": set(),
            "_itr": None,
            "_depends_on_deps": {},
            "x": self.x,
        }
        order = [k for k in py2_dict_order(py2_dict_order(created), size=16) if k in values]
        return _Py2Dict({k: values[k] for k in order}, order)


class _CscMatrix:
    """A sparse matrix to be pickled as scipy 0.x's ``scipy.sparse.csc.csc_matrix``."""

    def __init__(self, m):
        self.m = scipy.sparse.csc_matrix(m)

    def state(self) -> dict:
        m = self.m
        # spmatrix.__init__ sets format, _shape, maxprint; the compressed constructor then
        # indices, indptr, data: the instance dict that Python 2 pickled as the state.
        values = {
            "format": "csc",
            "_shape": tuple(int(n) for n in m.shape),
            "maxprint": 50,
            "indices": m.indices.astype(np.int32),
            "indptr": m.indptr.astype(np.int32),
            "data": m.data.astype(np.float64),
        }
        return _Py2Dict(values, py2_dict_order(list(values)))


class _Py2Dict(dict):
    """A dict whose Python 2 iteration order is already known."""

    def __init__(self, items: dict, order: list):
        super().__init__(items)
        self.py2_order = order


def py2_dict_order(keys, size: int = 8) -> list:
    """Iteration order of a Python 2.7 dict (64-bit) after inserting the str ``keys`` in order.

    Python 2 dicts iterate in hash-table slot order: string hash, open addressing with
    perturbation, growth to 4 x used when two thirds full. ``size`` presizes the table.
    """
    mask64 = (1 << 64) - 1

    def str_hash(s: str) -> int:
        b = s.encode("latin1")
        if not b:
            return 0
        x = b[0] << 7
        for c in b:
            x = ((1000003 * x) & mask64) ^ c
        x ^= len(b)
        return (mask64 - 1) if x == mask64 else x  # -1 is reserved, becomes -2

    def insert(table: list[str | None], key: str) -> None:
        i = perturb = str_hash(key)
        while table[i & (len(table) - 1)] is not None:
            i = ((i << 2) + i + perturb + 1) & mask64
            perturb >>= 5
        table[i & (len(table) - 1)] = key

    table: list[str | None] = [None] * size
    for used, key in enumerate(keys, 1):
        insert(table, key)
        if used * 3 >= len(table) * 2:
            new_size = 8
            while new_size <= 4 * used:
                new_size *= 2
            old, table = [k for k in table if k is not None], [None] * new_size
            for k in old:
                insert(table, k)
    return [k for k in table if k is not None]


_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
# Python 2 names of the globals a released SMPL pickle refers to.
_PY2_NAMES = {
    _NUMPY_RECONSTRUCT: ("numpy.core.multiarray", "_reconstruct"),
    np.ndarray: ("numpy", "ndarray"),
    np.dtype: ("numpy", "dtype"),
    set: ("__builtin__", "set"),
    object: ("__builtin__", "object"),
    # typeshed omits copyreg's undocumented _reconstructor (it exists in every CPython 3)
    copyreg._reconstructor: ("copy_reg", "_reconstructor"),  # type: ignore[attr-defined]
    _ChLeaf: ("chumpy.ch", "Ch"),
    _CscMatrix: ("scipy.sparse.csc", "csc_matrix"),
}


def py2_string_opcode(data: bytes, binary: bool) -> bytes:
    """The opcode that Python 2's pickler writes for the byte string ``data`` (a Python 2
    ``str``): STRING at protocol 0, SHORT_BINSTRING / BINSTRING at protocols 1 and 2."""
    if not binary:
        # Python 3's bytes repr follows Python 2's str repr rule for rule (quotes, escapes).
        return pickle.STRING + repr(data)[1:].encode("ascii") + b"\n"
    if len(data) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(data)]) + data
    return pickle.BINSTRING + len(data).to_bytes(4, "little") + data


class _Py2Pickler(pickle._Pickler):
    """Emits the opcodes Python 2 wrote: ``str``/``bytes`` as (SHORT_)BINSTRING (STRING at
    protocol 0), numpy 1.x array and dtype reductions, objects by NEWOBJ at protocol 2 and by
    ``copy_reg._reconstructor`` below, dicts in Python 2 order. cPickle numbers memo entries from
    1, the pure-Python ``pickle`` module from 0."""

    # The pure-Python pickler's undocumented internals this class drives, which typeshed leaves
    # out (and whose dispatch it types as taking an Unpickler).
    dispatch: ClassVar[dict[type, Callable[..., None]]] = dict(pickle._Pickler.dispatch)
    memo: dict[int, tuple[int, object]]
    proto: int
    write: Callable[[bytes], object]
    put: Callable[[int], bytes]
    _batch_setitems: Callable[[Iterable[tuple[object, object]]], None]

    def __init__(self, file, protocol: int, cpickle: bool):
        super().__init__(file, protocol, fix_imports=False)
        self.memo_base = 1 if cpickle else 0

    def memoize(self, obj) -> None:
        index = len(self.memo) + self.memo_base
        self.write(self.put(index))
        self.memo[id(obj)] = index, obj

    def save_global(self, obj, name=None) -> None:
        module, name = _PY2_NAMES[obj]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    def save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        self.write(py2_string_opcode(data, self.bin))
        if len(data) > 1 or not self.memo_base:  # cPickle never memoizes 0/1-char strings
            self.memoize(obj)

    def save_dict(self, obj: dict) -> None:
        self.write(pickle.EMPTY_DICT if self.bin else pickle.MARK + pickle.DICT)
        self.memoize(obj)
        order = getattr(obj, "py2_order", None) or py2_dict_order(list(obj))
        self._batch_setitems((k, obj[k]) for k in order)

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            # numpy 1.x ndarray.__reduce__: placeholder + (version, shape, dtype, fortran, data)
            fortran = bool(obj.flags.f_contiguous and not obj.flags.c_contiguous)
            state = (1, obj.shape, obj.dtype, fortran, obj.tobytes(order="A"))
            return _NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b"), state
        if isinstance(obj, np.dtype):
            endian = "<" if obj.byteorder == "=" else obj.byteorder
            return (
                np.dtype,
                (f"{obj.kind}{obj.itemsize}", 0, 1),
                (3, endian, None, None, None, -1, -1, obj.flags),
            )
        if isinstance(obj, _ChLeaf | _CscMatrix):
            if self.proto >= 2:
                return copyreg.__newobj__, (type(obj),), obj.state()
            return copyreg._reconstructor, (type(obj), object, None), obj.state()
        return NotImplemented

    dispatch[types.FunctionType] = save_global
    dispatch[str] = dispatch[bytes] = save_py2_str
    dispatch[dict] = dispatch[_Py2Dict] = save_dict


def _write_py2_pickle(path: str | Path, obj: dict, protocol: int, cpickle: bool) -> None:
    out = {k: (_CscMatrix(v) if scipy.sparse.issparse(v) else v) for k, v in obj.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _Py2Pickler(f, protocol, cpickle).dump(out)


def write_npz(path: str | Path, model: dict) -> None:
    """Write ``model`` in smplx's .npz layout (dense J_regressor)."""
    arrays = {
        k: (v.toarray() if scipy.sparse.issparse(v) else np.asarray(v))
        for k, v in model.items()
        if not isinstance(v, str)
    }
    save_npz(path, compressed=True, **arrays)
