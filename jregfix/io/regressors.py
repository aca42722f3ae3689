"""Joint regressors (K x V matrices, joints = J @ vertices): files, validation, statistics.

Formats: ``.npy`` (SPIN's J_regressor_h36m.npy), ``.npz`` (key ``J_regressor`` or the only
array), ``.pt`` (a bare tensor, or a dict with one tensor, read with ``weights_only=True`` onto
the CPU, so a file saved from CUDA loads anywhere). Provenance (how a regressor was made) lives
in ``<file>.json`` beside it.
"""

from __future__ import annotations

import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import npy_bytes, npz_bytes, sha256_file, write_bytes, write_pair
from jregfix.io.budget import check_npz
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.manifest import read_sidecar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


TRANSFORMS = {
    "none": "applied as stored",
    "relu-row-normalise": "ReLU(J), each row divided by its sum (what the authors' code applies)",
}


@dataclass(frozen=True)
class KnownRegressor:
    """One registry entry (one ``<name>.toml`` of the source tree's ``regressors/`` folder).

    ``url`` and ``sha256`` are None when there is no public download; ``transform`` is a key
    of :data:`TRANSFORMS`, applied to the raw file before ``joints = J @ vertices``.
    """

    name: str
    description: str
    shape: tuple[int, int]
    url: str | None
    sha256: str | None
    licence: str
    transform: str = "none"
    training_subjects: tuple[str, ...] | None = None  # Human3.6M subjects it was fitted on
    training_note: str = ""


_REQUIRED = {
    "name": str,
    "description": str,
    "shape": list,
    "url": str,
    "sha256": str,
    "licence": str,
    "transform": str,
}
_OPTIONAL = {"training_subjects": list, "training_note": str}


def load_registry() -> dict[str, KnownRegressor]:
    """{name: entry} from the TOML files shipped as ``jregfix.registry`` (sorted by name).

    Each file is checked whole (all keys, their types, ``name`` = file stem, a 64-hex sha256
    exactly when there is a url, a known transform): a broken entry is a packaging bug, so it
    fails loudly at import instead of surfacing mid-run.
    """
    from importlib.resources import files

    files_ = sorted(
        (f for f in files("jregfix.registry").iterdir() if f.name.endswith(".toml")),
        key=lambda f: f.name,
    )
    entries = (parse_registry_entry(f.read_text(encoding="utf-8"), f.name) for f in files_)
    return {entry.name: entry for entry in entries}


def parse_registry_entry(text: str, filename: str) -> KnownRegressor:
    """One ``<name>.toml`` -> :class:`KnownRegressor`; :class:`JregfixError` names what is
    wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JregfixError(f"regressor registry {filename}: not valid TOML ({exc})") from None

    def bad(why: str) -> JregfixError:
        return JregfixError(f"regressor registry {filename}: {why}")

    for key, kind in _REQUIRED.items():
        if not isinstance(doc.get(key), kind):
            raise bad(f"'{key}' missing or not a {kind.__name__}")
    for key, kind in _OPTIONAL.items():
        if key in doc and not isinstance(doc[key], kind):
            raise bad(f"'{key}' is not a {kind.__name__}")
    unknown = set(doc) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)}")
    if filename != f"{doc['name']}.toml":
        raise bad(f"name '{doc['name']}' differs from the file name")
    shape = doc["shape"]
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise bad(f"shape {shape} is not [K, V] with positive integers")
    url, sha256 = doc["url"], doc["sha256"].lower()
    if bool(url) != bool(sha256):
        raise bad("give both url and sha256 (a download is always pinned) or neither")
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise bad(f"sha256 '{sha256}' is not 64 hex digits")
    if doc["transform"] not in TRANSFORMS:
        raise bad(f"transform '{doc['transform']}' is not one of {sorted(TRANSFORMS)}")
    subjects = doc.get("training_subjects")
    return KnownRegressor(
        doc["name"],
        doc["description"],
        (shape[0], shape[1]),
        url or None,
        sha256 or None,
        doc["licence"],
        doc["transform"],
        tuple(map(str, subjects)) if subjects else None,
        doc.get("training_note", ""),
    )


KNOWN_REGRESSORS = load_registry()
# the raw released file is recognised by its hash wherever a regressor is read (evaluate, check)
HEDLIN_SHA256 = KNOWN_REGRESSORS["hedlin"].sha256


def load_regressor(path: str | Path) -> np.ndarray:
    """Read a regressor file into a float64 (K, V) array (no validation against a body)."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: regressor file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            check_npz(path, "regressor npz")
            with np.load(path, allow_pickle=False) as z:
                key = "J_regressor" if "J_regressor" in z.files else None
                if key is None and len(z.files) != 1:
                    raise JregfixError(f"{path}: npz has keys {z.files}; expected 'J_regressor'")
                array = z[key or z.files[0]]
        elif suffix in (".pt", ".pth"):
            array = _load_torch_tensor(path)
        else:
            raise JregfixError(f"{path}: unknown regressor format '{suffix}' (use .npy/.npz/.pt)")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise JregfixError(f"{path}: could not read regressor ({exc})") from None
    return checked_regressor(array, str(path))


def checked_regressor(array, name: str) -> np.ndarray:
    """(K, V) float64 copy of a regressor; refuses what cannot be a regressor (complex,
    non-numeric, NaN/inf, all-zero rows)."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":  # complex, object, strings
        raise JregfixError(
            f"{name}: regressor has dtype {array.dtype}; expected real numbers "
            "(re-save it as a float array)"
        )
    array = array.astype(np.float64)
    if array.ndim != 2:
        raise JregfixError(f"{name}: regressor has shape {array.shape}, expected (K, V)")
    if not np.isfinite(array).all():
        raise JregfixError(
            f"{name}: regressor contains NaN or inf; re-create it (a fit that diverged?)"
        )
    zero = np.flatnonzero(~array.any(axis=1))
    if len(zero):
        raise JregfixError(
            f"{name}: regressor row {zero[0]} is all zeros ({len(zero)} such "
            "row(s)); that joint would sit at the origin: use another file"
        )
    return array


def _load_torch_tensor(path: Path) -> np.ndarray:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise JregfixError(f"{path}: refused to load (not a plain tensor file): {exc}") from None
    except RuntimeError as exc:
        raise JregfixError(f"{path}: could not read torch file ({exc})") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise JregfixError(f"{path}: dict with {len(tensors)} tensors; expected one")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise JregfixError(f"{path}: holds a {type(obj).__name__}, expected a tensor")
    obj = obj.detach().resolve_conj()
    # complex stays complex so that checked_regressor refuses it (a cast would drop the imaginary)
    return obj.numpy() if obj.is_complex() else obj.to(torch.float64).numpy()


def validate_regressor(
    j: np.ndarray, num_vertices: int, name: str = "regressor", num_joints: int | None = None
) -> np.ndarray:
    if j.shape[1] != num_vertices:
        raise JregfixError(
            f"{name}: shape {j.shape} does not fit a body model with "
            f"{num_vertices} vertices (expected (K, {num_vertices}))"
        )
    if num_joints is not None and j.shape[0] != num_joints:
        raise JregfixError(f"{name}: {j.shape[0]} rows, expected {num_joints} joints")
    return j


def apply_transform(j: np.ndarray, transform: str) -> np.ndarray:
    """(K, V) -> (K, V): a registry entry's ``transform`` (a key of :data:`TRANSFORMS`)."""
    return effective_regressor(j) if transform == "relu-row-normalise" else j


def effective_regressor(j: np.ndarray) -> np.ndarray:
    """What Hedlin et al.'s code applies: ReLU(J), each row divided by its sum."""
    pos = np.maximum(j, 0.0)
    sums = pos.sum(1, keepdims=True)
    if (sums <= 0).any():
        raise JregfixError("a regressor row has no positive entry; cannot renormalise")
    return pos / sums


ROW_SUM_TOL = 1e-3


def regressor_warnings(j: np.ndarray) -> list[str]:
    """Why ``j`` is not a weighted average of vertices per joint (negative weights, row sums
    off 1 by more than ``ROW_SUM_TOL``); empty when it is. A joint from such a row moves when
    the mesh is translated or scaled, so results depend on where the body sits."""
    out = []
    negative = int((j < 0).sum())
    if negative:
        out.append(f"{negative} negative weight(s)")
    sums = j.sum(1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOL
    if off.any():
        out.append(
            f"{int(off.sum())} row sum(s) off 1 by more than {ROW_SUM_TOL:g} "
            f"(row sums {sums.min():.4f}..{sums.max():.4f})"
        )
    return out


def regressor_stats(j: np.ndarray, tol: float = 0.0) -> dict:
    """Shape, sparsity, sign and row-sum facts (reported by `regressors show` and on load)."""
    nz = np.abs(j) > tol
    sums = j.sum(1)
    return {
        "shape": list(j.shape),
        "nonzeros": int(nz.sum()),
        "support_per_row": nz.sum(1).tolist(),
        "negative_entries": int((j < -tol).sum()),
        "non_negative": bool((j >= -tol).all()),
        "row_sum_min": float(sums.min()),
        "row_sum_max": float(sums.max()),
        "row_sums": sums.tolist(),
    }


def save_regressor(path: str | Path, j: np.ndarray, provenance: dict | None = None) -> None:
    """Write (K, V) as .npy (or .npz) atomically, with provenance in ``<path>.json``."""
    path = Path(path)
    if path.suffix == ".npz":
        data = npz_bytes(J_regressor=j)
    elif path.suffix == ".npy":
        data = npy_bytes(j)
    else:
        raise JregfixError(f"{path}: write regressors as .npy or .npz")
    if provenance is None:
        write_bytes(path, data)
    else:  # one unit: the sidecar records the regressor's sha256 (see write_pair)
        write_pair(path, data, provenance_path(path), provenance)


def provenance_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_provenance(path: str | Path) -> dict | None:
    """``<path>.json``, checked against the regressor's bytes when it records their hash."""
    return read_sidecar(path, provenance_path(path))


def cached_raw_path(name: str) -> Path:
    from jregfix.io.download import cache_dir

    known = _known(name)
    return cache_dir() / "regressors" / Path(known.url or name).name


def download_regressor(
    name: str, out: str | Path | None = None, url: str | None = None, progress=None
) -> Path:
    """Fetch a known regressor (the registry's url, pinned by its sha256, cached) and write it
    as a (K, V) .npy after the entry's ``transform`` (the form ``joints = J @ vertices`` uses).

    ``url`` overrides the source (``file://...``, a local path, or a mirror); the sha256 pin
    still applies. Returns the path of the written (K, V) .npy.
    """
    from jregfix.io.download import cache_dir, download

    known = _known(name)
    # the registry gives both url and sha256 or neither: never an unpinned download, not even
    # from --url
    if known.sha256 is None or known.url is None:
        raise JregfixError(
            f"regressor '{name}' has no pinned public download "
            f"({known.description}); pass your own copy to --regressor instead"
        )
    source = url or known.url
    raw = cached_raw_path(name)
    out = Path(out) if out is not None else cache_dir() / "regressors" / f"{name}_effective.npy"
    refuse_overwriting_inputs(
        {"--url": _local_path(source), "the cached download": raw}, {"--out": out}
    )
    if not raw.is_file() or sha256_file(raw) != known.sha256:
        try:
            download(source, raw, known.sha256, progress=progress)
        except JregfixError as exc:
            raise JregfixError(
                f"{exc}; offline? Fetch {known.url} by hand (sha256 {known.sha256}) and run "
                f"`jregfix regressors download {name} --url file:///path/to/{raw.name}` "
                "(or give the plain path)."
            ) from None
    j = validate_regressor(load_regressor(raw), known.shape[1], name, known.shape[0])
    save_regressor(
        out,
        apply_transform(j, known.transform),
        provenance={
            "name": name,
            "source": source,
            "sha256_raw": known.sha256,
            "transform": TRANSFORMS[known.transform],
            "description": known.description,
            "licence": known.licence,
        },
    )
    return out


def _local_path(source: str) -> Path | None:
    """The file a plain path or file:// URL names (None for a remote URL)."""
    if source.startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(source).path))
    return None if "://" in source else Path(source)


def _known(name: str) -> KnownRegressor:
    if name not in KNOWN_REGRESSORS:
        raise JregfixError(f"unknown regressor '{name}'; known: {', '.join(KNOWN_REGRESSORS)}")
    return KNOWN_REGRESSORS[name]
