"""Write torch files the way SPIN's official checkpoint was written (test helper).

SPIN's ``model_checkpoint.pt`` is torch's legacy (non-zip) format, saved by torch 1.x under
Python 2, whose ``torch.save`` pickles with cPickle at protocol 2, from a model on ``cuda:0``.
What Python 2 writes differently from a Python 3 pickler, and what :class:`Py2Pickler` emulates:

- ``str`` is a byte string: SHORT_BINSTRING/BINSTRING (``STRING`` at protocol 0); ``unicode``
  (here :class:`Py2Unicode`) is BINUNICODE/UNICODE;
- an ``int`` is a C long (64-bit on Linux): outside the 32-bit range it is written with the
  text ``INT`` opcode (``I139672168905216\\n``), where Python 3 writes LONG1. Only a ``long``
  (beyond 64 bits here, e.g. torch's magic number) gets LONG1;
- ``OrderedDict`` reduces to ``OrderedDict([[key, value], ...])`` plus its instance dict
  (a state_dict's ``_metadata``) as BUILD state, instead of Python 3's SETITEMS form.

Python 2 dicts iterate in hash order, not insertion order; we keep insertion order (it changes
no opcode, only the order of dict entries).
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from collections.abc import Mapping

import torch
import torch.serialization

from jregfix.io.smpl_write import py2_string_opcode

# SPIN's trainer builds Adam (train/trainer.py) and the saver stores its state next to the model
# (utils/saver.py). The official file's param group holds lr 3e-5 and weight decay 1e-4 (a float),
# not the train_options.py defaults (5e-5, 0): the released run was trained with other options.
SPIN_PARAM_GROUP = {
    "lr": 3e-5,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-4,
    "amsgrad": False,
}
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class Py2Unicode(str):
    """A Python 2 ``unicode`` value (plain ``str`` stands for Python 2's byte string)."""


class Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj: str) -> None:
        self.write(py2_string_opcode(obj.encode("utf-8"), self.bin))
        self.memoize(obj)

    def save_unicode(self, obj: Py2Unicode) -> None:
        pickle._Pickler.save_str(self, obj)

    def save_int(self, obj: int) -> None:
        if -(2**31) <= obj < 2**31 or not -(2**63) <= obj < 2**63:
            pickle._Pickler.save_long(self, obj)  # BININT*/LONG1: the same bytes as Python 2
        else:
            self.write(pickle.INT + str(obj).encode("ascii") + b"\n")

    def save_ordered_dict(self, obj: collections.OrderedDict) -> None:
        state = dict(vars(obj)) or None
        self.save_reduce(
            collections.OrderedDict, ([[k, v] for k, v in obj.items()],), state=state, obj=obj
        )

    dispatch[str] = save_str
    dispatch[Py2Unicode] = save_unicode
    dispatch[int] = save_int
    dispatch[collections.OrderedDict] = save_ordered_dict


def py2_dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol).dump(obj)
    return buf.getvalue()


def _dump(obj, f, protocol=2):
    Py2Pickler(f, protocol).dump(obj)


PY2_PICKLE = types.SimpleNamespace(Pickler=Py2Pickler, dump=_dump, __name__="py2pickle")


def _save_cuda(obj, path, pickle_module) -> None:
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(
            obj,
            path,
            _use_new_zipfile_serialization=False,
            pickle_protocol=2,
            pickle_module=pickle_module,
        )
    finally:
        torch.serialization.location_tag = original


def save_legacy_cuda(obj, path) -> None:
    """torch.save ``obj`` to ``path`` as Python 2 torch 1.x did, storages tagged ``cuda:0``."""
    _save_cuda(obj, path, PY2_PICKLE)


def save_legacy_py3_cuda(obj, path) -> None:
    """The same legacy format written by torch 1.x (< 1.6) under Python 3 (BINUNICODE, LONG1)."""
    _save_cuda(obj, path, pickle)


def module_metadata(keys) -> collections.OrderedDict:
    """``state_dict()._metadata`` for modules named by ``keys``: version 2 for BatchNorm."""
    meta: collections.OrderedDict = collections.OrderedDict([("", {"version": 1})])
    for key in keys:
        parts = key.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            meta.setdefault(".".join(parts[:i]), {"version": 1})
        if key.endswith("running_mean"):
            meta[".".join(parts)] = {"version": 2}
    return meta


def spin_trainer_checkpoint(
    model_state: Mapping[str, torch.Tensor],
    metadata=None,
    *,
    seed: int = 0,
    dataset_size: int = 48_000,
    epoch: int = 7,
    batch_idx: int = 1175,
    batch_size: int = 64,
) -> dict:
    """The dict SPIN's ``CheckpointSaver.save_checkpoint`` saves, as torch 1.x on Python 2 had it.

    ``model``: an OrderedDict state_dict with ``_metadata``. ``optimizer``: Adam's state_dict,
    keyed by ``id()`` of each parameter (heap addresses ~1.4e14, so the text INT opcode), one
    ``{'step', 'exp_avg', 'exp_avg_sq'}`` per parameter. ``dataset_perm``: the sampler's
    ``torch.randperm(len(dataset)).tolist()``. Parameters are the entries that are not BN
    statistics or SPIN's ``init_*`` mean buffers.
    """
    g = torch.Generator().manual_seed(seed)
    model = collections.OrderedDict(model_state)
    model._metadata = metadata if metadata is not None else module_metadata(model_state)
    params = [
        k for k in model_state if not k.endswith(_BUFFER_SUFFIXES) and not k.startswith("init_")
    ]
    step = 264_323  # every parameter's Adam step count in the official file
    base = 139_672_168_905_216
    offsets = torch.randperm(64 * len(params), generator=g)[: len(params)].tolist()
    ids = [base + 1440 * int(o) for o in offsets]
    state = {
        pid: {
            "step": step,
            "exp_avg": 1e-3 * torch.randn(model_state[k].shape, generator=g),
            "exp_avg_sq": 1e-6 * torch.rand(model_state[k].shape, generator=g),
        }
        for pid, k in zip(ids, params, strict=True)
    }
    return {
        "model": model,
        "optimizer": {"state": state, "param_groups": [dict(SPIN_PARAM_GROUP, params=ids)]},
        "epoch": epoch,
        "batch_idx": batch_idx,
        "batch_size": batch_size,
        "dataset_perm": torch.randperm(dataset_size, generator=g).tolist(),
        "total_step_count": step,
    }
