"""Safe loading of torch checkpoints: SPIN's Python 2 file, VIBE/MEVA's copy, modern zip files.

Two formats, told apart by the first bytes:

- zip archives (``PK\\x03\\x04``, ``torch.save`` since torch 1.6) go through
  ``torch.load(weights_only=True, map_location='cpu')``;
- anything else must be the legacy format. SPIN's ``data/model_checkpoint.pt`` (and the
  ``spin_model_checkpoint.pth.tar`` that VIBE and MEVA ship, same lineage) is such a file, written
  by Python 2 with ``cuda:0`` storages. torch's weights-only unpickler cannot read it (no handler
  for the text ``INT`` opcode of its 64-bit optimizer ids), so it is read by our own restricted
  unpickler in :mod:`jregfix.io.legacy_torch`.

Neither path ever falls back to a free unpickler; anything refused becomes a one-line
:class:`JregfixError`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from jregfix.errors import JregfixError
from jregfix.io.legacy_torch import load_legacy_torch

_ZIP_MAGIC = b"PK\x03\x04"


def load_torch_file(path: str | Path) -> object:
    """Load any torch-serialised file (zip or legacy) onto the CPU without executing code."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise JregfixError(f"{path}: empty file, not a torch checkpoint; download it again")
    if head != _ZIP_MAGIC:
        return load_legacy_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise JregfixError(
            f"{path}: refused to load: the file needs objects outside torch's weights-only "
            f"allow-list ({_first_line(exc)}); only plain tensors, dicts, lists and numbers "
            "are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise JregfixError(
            f"{path}: not a readable torch zip checkpoint ({_first_line(exc)}); download it again"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def extract_state_dict(
    obj: object, path: str | Path = "<checkpoint>", key: str = "model"
) -> dict[str, torch.Tensor]:
    """The model state_dict inside a checkpoint.

    Accepts SPIN's training checkpoint and VIBE/MEVA's ``spin_model_checkpoint.pth.tar`` (both
    hold it under ``model``) or a bare state_dict (every value a tensor). A floating-point entry
    holding NaN or inf is refused: such weights would only produce NaN predictions downstream.
    """
    if not isinstance(obj, Mapping):
        raise JregfixError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    state: Mapping = obj
    if key in obj and isinstance(obj[key], Mapping):
        state = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise JregfixError(
            f"{path}: no '{key}' state_dict in the checkpoint; top-level keys: {sorted(obj)[:10]}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise JregfixError(f"{path}: state_dict entries are not tensors: {bad[:5]}")
    for name, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            raise JregfixError(
                f"{path}: state_dict entry '{name}' holds NaN/inf values; the checkpoint is "
                "corrupt or diverged: use the official file"
            )
    return dict(state)


def load_state_dict_file(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its model state_dict (CPU tensors)."""
    return extract_state_dict(load_torch_file(path), path, key)
