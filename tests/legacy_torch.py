"""Write torch files the way SPIN's official checkpoint was written (test helper).

Legacy (non-zip) serialisation, pickle protocol 2, storages tagged ``cuda:0``, and the opcodes a
Python 2 pickler emits: ``str`` as SHORT_BINSTRING/BINSTRING byte strings and ``OrderedDict`` as
a reduce over a list of ``[key, value]`` pairs plus its ``_metadata`` attribute as state.
"""

from __future__ import annotations

import collections
import pickle
import types

import torch
import torch.serialization


class Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj: str) -> None:
        data = obj.encode("utf-8")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    def save_ordered_dict(self, obj: collections.OrderedDict) -> None:
        state = dict(vars(obj)) or None
        self.save_reduce(collections.OrderedDict, ([[k, v] for k, v in obj.items()],),
                         state=state, obj=obj)

    dispatch[str] = save_str
    dispatch[collections.OrderedDict] = save_ordered_dict


def _dump(obj, f, protocol=2):
    Py2Pickler(f, protocol).dump(obj)


PY2_PICKLE = types.SimpleNamespace(Pickler=Py2Pickler, dump=_dump, __name__="py2pickle")


def save_legacy_cuda(obj, path) -> None:
    """torch.save ``obj`` to ``path`` in the legacy Python-2 format with ``cuda:0`` storages."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=2,
                   pickle_module=PY2_PICKLE)
    finally:
        torch.serialization.location_tag = original
