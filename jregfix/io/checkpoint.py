"""Safe loading of torch checkpoints, including SPIN's legacy Python-2-era file.

SPIN's ``data/model_checkpoint.pt`` (conventions.md §1.5) is a legacy (non-zip) torch
serialisation, pickle protocol 2, written by Python 2 with storages tagged ``cuda:0``.
``torch.load(weights_only=True, map_location='cpu')`` reads that format: its restricted unpickler
accepts the Python 2 string opcodes and the ``OrderedDict`` reduce Python 2 emits, and it
refuses any global outside torch's allow-list, so no code in the file can run. We never fall
back to a free unpickler; a refused file becomes a :class:`JregfixError`.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from jregfix.errors import JregfixError


def load_torch_file(path: str | Path) -> object:
    """Load any torch-serialised file (zip or legacy) onto the CPU without executing code."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    try:
        return _load(path, "utf-8")
    except UnicodeDecodeError:
        # Python 2 byte strings that are not UTF-8 (e.g. pickled numpy buffers) need latin-1.
        return _load(path, "latin1")


def _load(path: Path, encoding: str) -> object:
    # torch warns that pickle_load_args are ignored with weights_only, yet it does pass
    # ``encoding`` on to its restricted unpickler (utf-8 when not given).
    kwargs = {} if encoding == "utf-8" else {"encoding": encoding}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "pickle_load_args", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except UnicodeDecodeError:
        raise
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JregfixError(
            f"{path}: refused to load: the file needs objects outside torch's weights-only "
            f"allow-list ({first}); only plain tensors, dicts, lists and numbers are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise JregfixError(f"{path}: not a readable torch file ({exc})") from None


def extract_state_dict(obj: object, path: str | Path = "<checkpoint>",
                       key: str = "model") -> dict[str, torch.Tensor]:
    """The model state_dict inside a checkpoint.

    Accepts SPIN's training checkpoint and VIBE/MEVA's ``spin_model_checkpoint.pth.tar`` (both
    hold it under ``model``) or a bare state_dict (every value a tensor).
    """
    if not isinstance(obj, Mapping):
        raise JregfixError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise JregfixError(
            f"{path}: no '{key}' state_dict in the checkpoint; top-level keys: {sorted(obj)[:10]}"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise JregfixError(f"{path}: state_dict entries are not tensors: {bad[:5]}")
    return dict(obj)


def load_state_dict_file(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its model state_dict (CPU tensors)."""
    return extract_state_dict(load_torch_file(path), path, key)
