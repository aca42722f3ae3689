"""Joint regressors (K x V matrices, joints = J @ vertices): files, validation, statistics.

Formats: ``.npy`` (SPIN's J_regressor_h36m.npy), ``.npz`` (key ``J_regressor`` or the only
array), ``.pt`` (a bare tensor, or a dict with one tensor, read with ``weights_only=True`` onto
the CPU, so a file saved from CUDA loads anywhere). Provenance (how a regressor was made) lives
in ``<file>.json`` beside it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import npy_bytes, npz_bytes, sha256_file, write_bytes, write_pair
from jregfix.io.budget import check_npz
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.manifest import read_sidecar


@dataclass(frozen=True)
class KnownRegressor:
    name: str
    description: str
    shape: tuple[int, int]
    url: str | None
    sha256: str | None
    licence: str
    training_subjects: tuple[str, ...] | None = None  # Human3.6M subjects it was fitted on
    training_note: str = ""


HEDLIN_URL = (
    "https://raw.githubusercontent.com/ubc-vision/joint-regressor-refinement/"
    "0dc0bed5b08b83666a9c265011644d2354814459/models/retrained_J_Regressor.pt"
)
HEDLIN_SHA256 = "4ea32d1b3b9a135130722218f87eadfcf78321cf2ca6954e14f780eb9b60d079"

KNOWN_REGRESSORS = {
    "hedlin": KnownRegressor(
        "hedlin",
        "Hedlin, Rhodin & Yi (CRV 2022) refined H36M regressor; raw parameter, applied as "
        "ReLU(J) with rows renormalised to sum to 1",
        (17, 6890), HEDLIN_URL, HEDLIN_SHA256,
        "published in ubc-vision/joint-regressor-refinement (no licence file at that commit; "
        "use for research, cite the paper)",
        # scripts/optimize.py at that commit builds its loader from data_set("validation")
        # (the "train" line is commented out), and scripts/data.py maps "validation" to the
        # precomputed S9/S11 data: the released code fits on the test subjects.
        training_subjects=("S9", "S11"),
        training_note="subjects the authors' released code fits on (its optimisation loads "
        "the validation split, S9 and S11); if the released file came from that code, it was "
        "fitted on the Human3.6M test subjects",
    ),
    "h36m": KnownRegressor(
        "h36m",
        "SPIN's standard J_regressor_h36m.npy (fitted to MoSh meshes); ships with SPIN's data "
        "(fetch_data.sh), not downloadable here",
        (17, 6890), None, None, "part of SPIN's data release (SMPL-derived; research use)",
    ),
}


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
        raise JregfixError(f"{name}: regressor has dtype {array.dtype}; expected real numbers "
                           "(re-save it as a float array)")
    array = array.astype(np.float64)
    if array.ndim != 2:
        raise JregfixError(f"{name}: regressor has shape {array.shape}, expected (K, V)")
    if not np.isfinite(array).all():
        raise JregfixError(f"{name}: regressor contains NaN or inf; re-create it (a fit that "
                           "diverged?)")
    zero = np.flatnonzero(~array.any(axis=1))
    if len(zero):
        raise JregfixError(f"{name}: regressor row {zero[0]} is all zeros ({len(zero)} such "
                           "row(s)); that joint would sit at the origin: use another file")
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


def validate_regressor(j: np.ndarray, num_vertices: int, name: str = "regressor",
                       num_joints: int | None = None) -> np.ndarray:
    if j.shape[1] != num_vertices:
        raise JregfixError(f"{name}: shape {j.shape} does not fit a body model with "
                           f"{num_vertices} vertices (expected (K, {num_vertices}))")
    if num_joints is not None and j.shape[0] != num_joints:
        raise JregfixError(f"{name}: {j.shape[0]} rows, expected {num_joints} joints")
    return j


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
        out.append(f"{int(off.sum())} row sum(s) off 1 by more than {ROW_SUM_TOL:g} "
                   f"(row sums {sums.min():.4f}..{sums.max():.4f})")
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


def download_regressor(name: str, out: str | Path | None = None, url: str | None = None,
                       progress=None) -> Path:
    """Fetch a known regressor (pinned sha256, cached), write its effective form as .npy.

    ``url`` overrides the source (``file://...``, a local path, or a mirror); the sha256 pin
    still applies. Returns the path of the written (K, V) .npy.
    """
    from jregfix.io.download import cache_dir, download

    known = _known(name)
    source = url or known.url
    if source is None:
        raise JregfixError(f"regressor '{name}' has no public download; {known.description}")
    raw = cached_raw_path(name)
    out = Path(out) if out is not None else cache_dir() / "regressors" / f"{name}_effective.npy"
    refuse_overwriting_inputs({"--url": _local_path(source), "the cached download": raw},
                              {"--out": out})
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
    eff = effective_regressor(j)
    save_regressor(out, eff, provenance={
        "name": name, "source": source, "sha256_raw": known.sha256,
        "transform": "ReLU(J), each row divided by its sum (what the authors' code applies)",
        "description": known.description, "licence": known.licence,
    })
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
