"""Restricted reader for torch's legacy (non-zip) checkpoint format, Python 2 files included.

Layout of a legacy file (``torch.save`` before torch 1.6, or ``_use_new_zipfile_serialization
=False``), a sequence of pickles followed by raw bytes:

1. the magic number ``0x1950a86a20f9469cfc6c``, the protocol version ``1001`` and a ``sys_info``
   dict (``little_endian``, C type sizes);
2. the saved object. Each storage appears as a persistent id
   ``('storage', <torch.FloatStorage class>, root_key, location, numel, view)`` and each tensor as
   a reduce of ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
   backward_hooks)``; ``location`` is the device it was saved from (``'cuda:0'`` for SPIN);
3. the sorted list of storage keys;
4. per key: the element count as little-endian int64, then the storage bytes.

SPIN's ``model_checkpoint.pt`` was written by Python 2 cPickle at protocol 2: ``str`` keys are
BINSTRING/SHORT_BINSTRING byte strings and the optimizer's parameter ids (``id()`` values about
1.4e14, one per parameter in ``state`` and in ``param_groups``) use the text ``INT`` opcode,
which torch's ``weights_only`` unpickler does not implement. So this module runs the pickle
machine itself: it implements every opcode of protocols 0-5 (except out-of-band buffers), and
resolves globals only to inert markers from a short allow-list (``collections.OrderedDict``, the
``torch._utils`` tensor/parameter rebuilds; ``torch[.cuda].*Storage`` become their dtype, usable
only inside a storage reference). A reduce runs our own code for that marker, never a callable
from the file; instance-creating opcodes (INST, OBJ, NEWOBJ, EXT*) are refused, and BUILD may
only set a state_dict's ``_metadata``. So nothing in the file can execute.
Storages are always created on the CPU, whatever their saved location.
"""

from __future__ import annotations

import codecs
import collections
import re
import struct
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path
from typing import TypeGuard, cast

import torch

from jregfix.errors import JregfixError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# Storage class names, as torch pickles them (torch.cuda.* only in files older than torch 0.4).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_LOCATION = re.compile(r"cpu|cuda(:\d+)?")
_DECIMAL = re.compile(rb"-?\d+")


class _Malformed(Exception):
    """The bytes are not a well-formed legacy checkpoint (truncated, corrupt, other format)."""


class _Refused(Exception):
    """The file asks for something outside the allow-list."""


@dataclass(frozen=True)
class _Global:
    """An allow-listed global: a name our reduce handlers know, never the real object."""

    module: str
    name: str


@dataclass
class _Storage:
    key: str
    flat: torch.Tensor  # (numel,) CPU tensor of the storage dtype, filled after the pickles


_MARK = object()  # MARK on the stack (the machine keeps one stack, like pickletools)


def _py2_str(data: bytes) -> str:
    """A Python 2 byte string as text: UTF-8 when it decodes, else byte-for-byte latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class _Machine:
    """One pickle, read from ``f`` up to its STOP, with the allow-list above.

    ``storages`` collects the storages of persistent ids (``None``: persistent ids refused);
    ``budget`` is the number of file bytes left for storage data, so a forged element count
    cannot make us allocate more than the file can hold.
    """

    def __init__(
        self,
        f: BufferedIOBase,
        file_size: int,
        storages: dict[str, _Storage] | None = None,
        budget: int = 0,
    ) -> None:
        self.f = f
        self.file_size = file_size
        self.storages = storages
        self.budget = budget
        self.stack: list = []
        self.memo: dict[int, object] = {}

    # -- reading ---------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        # A forged length must not make us allocate more than the file holds.
        if n > 65536 and n > self.file_size - self.f.tell():
            raise _Malformed("a pickle item runs past the end of the file (truncated)")
        data = self.f.read(n)
        if len(data) != n:
            raise _Malformed("the file ends inside a pickle (truncated)")
        return data

    def readline(self) -> bytes:
        line = self.f.readline()
        if not line.endswith(b"\n"):
            raise _Malformed("the file ends inside a pickle (truncated)")
        return line[:-1]

    def read_uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "little")

    def decimal(self, line: bytes) -> int:
        if not _DECIMAL.fullmatch(line):
            raise _Malformed(f"bad integer literal {line[:30]!r}")
        return int(line)

    # -- stack -----------------------------------------------------------------------------
    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise _Malformed("unbalanced MARK")

    def pop(self) -> object:
        if not self.stack or self.stack[-1] is _MARK:
            raise _Malformed("pickle stack underflow")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack or self.stack[-1] is _MARK:
            raise _Malformed("pickle stack underflow")
        return self.stack[-1]

    # -- the machine -----------------------------------------------------------------------
    def load(self) -> object:
        ops = _OPS
        while True:
            code = self.f.read(1)
            if not code:
                raise _Malformed("the file ends where a pickle should start (truncated)")
            op = ops.get(code[0])
            if op is None:
                raise _Malformed(f"unknown pickle opcode {code!r}")
            if op is _stop:
                if len(self.stack) != 1:
                    raise _Malformed("pickle stack not empty at STOP")
                return self.stack.pop()
            op(self)

    def set_items(self, target: object, items: list) -> None:
        if type(target) not in (dict, collections.OrderedDict) or len(items) % 2:
            raise _Refused(f"SETITEM on {type(target).__name__}")
        mapping = cast(dict, target)  # its exact type was checked just above
        try:
            for k, v in zip(items[::2], items[1::2], strict=True):
                mapping[k] = v
        except TypeError:
            raise _Malformed("unhashable dict key") from None

    def find_global(self, module: str, name: str) -> object:
        if (module, name) in _REDUCERS:
            return _Global(module, name)
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise _Refused(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: object) -> _Storage:
        if self.storages is None:
            raise _Refused("a storage reference outside the checkpoint object")
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and isinstance(pid[0], str)
            and pid[0] == "storage"
        ):
            raise _Refused(f"persistent id {str(pid)[:60]} is not a torch storage")
        _, dtype, key, location, numel, view = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _Malformed("storage reference without a storage type or key")
        if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
            raise _Refused(f"storage location {location!r} (expected cpu or cuda:N)")
        if type(numel) is not int or numel < 0:
            raise _Malformed(f"storage {key} has element count {numel!r}")
        if view is not None:
            raise _Refused("storage views (torch < 0.4 files); re-save the checkpoint")
        known = self.storages.get(key)
        if known is not None:
            if known.flat.dtype != dtype or known.flat.numel() != numel:
                raise _Malformed(f"storage {key} is declared twice with different types")
            return known
        nbytes = numel * dtype.itemsize + 8
        self.budget -= nbytes
        if self.budget < 0:
            raise _Malformed("its storages need more bytes than the file holds (truncated)")
        storage = self.storages[key] = _Storage(key, torch.empty(numel, dtype=dtype))
        return storage


# -- reduce handlers: our code for each allow-listed global ---------------------------------
def _ordered_dict(args: tuple) -> collections.OrderedDict:
    if not args:
        return collections.OrderedDict()  # Python 3 style: items follow as SETITEMS
    if (
        len(args) == 1
        and isinstance(args[0], list)
        and all(isinstance(p, list | tuple) and len(p) == 2 for p in args[0])
    ):
        return collections.OrderedDict(args[0])  # Python 2 style: a list of [key, value]
    raise _Refused("OrderedDict with unexpected arguments")


def _is_index_tuple(x: object) -> TypeGuard[tuple[int, ...]]:
    return isinstance(x, tuple) and all(type(v) is int and v >= 0 for v in x)


def _tensor(storage: object, offset: object, size: object, stride: object) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor rebuilt from something other than a storage")
    if not (
        type(offset) is int
        and offset >= 0
        and _is_index_tuple(size)
        and _is_index_tuple(stride)
        and len(size) == len(stride)
    ):
        raise _Malformed(f"tensor on storage {storage.key} has a bad offset/size/stride")
    n = storage.flat.numel()
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if (0 not in size and last >= n) or offset > n:
        raise _Malformed(f"tensor {size} runs past the end of storage {storage.key}")
    flat = storage.flat
    return torch.empty((0,), dtype=flat.dtype).set_(flat.untyped_storage(), offset, size, stride)


def _no_hooks(hooks: object) -> bool:
    return isinstance(hooks, dict) and not hooks  # an empty dict or OrderedDict


def _rebuild_tensor_v2(args: tuple) -> torch.Tensor:
    if len(args) == 7 and (args[6] is None or _no_hooks(args[6])):
        args = args[:6]  # newer torch appends tensor metadata (empty for plain tensors)
    if len(args) != 6 or type(args[4]) is not bool or not _no_hooks(args[5]):
        raise _Refused("_rebuild_tensor_v2 with hooks, metadata or unexpected arguments")
    tensor = _tensor(*args[:4])
    if args[4] and not tensor.is_floating_point():
        raise _Malformed(f"a {tensor.dtype} tensor cannot require gradients")
    return tensor.requires_grad_(args[4])


def _rebuild_tensor(args: tuple) -> torch.Tensor:
    if len(args) != 4:
        raise _Refused("_rebuild_tensor with unexpected arguments")
    return _tensor(*args)


def _rebuild_parameter(args: tuple) -> torch.nn.Parameter:
    if not (
        len(args) == 3
        and isinstance(args[0], torch.Tensor)
        and type(args[1]) is bool
        and _no_hooks(args[2])
    ):
        raise _Refused("_rebuild_parameter with hooks or unexpected arguments")
    if args[1] and not args[0].is_floating_point():
        raise _Malformed(f"a {args[0].dtype} parameter cannot require gradients")
    return torch.nn.Parameter(args[0], requires_grad=args[1])


_REDUCERS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


# -- opcodes (named as in pickletools) -------------------------------------------------------
def _stop(m: _Machine) -> None:
    raise AssertionError("handled in _Machine.load")


def _reduce(m: _Machine) -> None:
    args, func = m.pop(), m.pop()
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise _Refused(f"calling {type(func).__name__} objects is not allowed")
    m.stack.append(_REDUCERS[(func.module, func.name)](args))


def _build(m: _Machine) -> None:
    state, target = m.pop(), m.top()
    # The only state a checkpoint carries: a state_dict's ``_metadata`` (module versions).
    if not (
        type(target) is collections.OrderedDict
        and isinstance(state, dict)
        and set(state) <= {"_metadata"}
    ):
        raise _Refused(f"setting the state of a {type(target).__name__}")
    if state:  # an instance attribute, which OrderedDict's type does not declare
        vars(target)["_metadata"] = state["_metadata"]


def _global(m: _Machine) -> None:
    module, name = (m.readline().decode("utf-8", "replace") for _ in range(2))
    m.stack.append(m.find_global(module, name))


def _stack_global(m: _Machine) -> None:
    name, module = m.pop(), m.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise _Malformed("STACK_GLOBAL without module and name strings")
    m.stack.append(m.find_global(module, name))


def _inst(m: _Machine) -> None:
    module, name = (m.readline().decode("utf-8", "replace") for _ in range(2))
    m.find_global(module, name)  # refuses anything not allow-listed
    raise _Refused(f"instantiating '{module}.{name}' is not allowed")


def _instantiate(m: _Machine) -> None:
    raise _Refused("instantiating classes (OBJ/NEWOBJ) is not allowed")


def _ext(m: _Machine) -> None:
    raise _Refused("copyreg extension codes are not allowed")


def _persid(m: _Machine) -> None:
    m.stack.append(m.persistent_load(_py2_str(m.readline())))


def _binpersid(m: _Machine) -> None:
    m.stack.append(m.persistent_load(m.pop()))


def _int_text(m: _Machine) -> None:
    line = m.readline()
    # Protocol 0/1 booleans are spelled I01 / I00; anything else is a decimal (64-bit ids).
    m.stack.append(line == b"01" if line in (b"01", b"00") else m.decimal(line))


def _long_text(m: _Machine) -> None:
    line = m.readline()
    m.stack.append(m.decimal(line[:-1] if line.endswith(b"L") else line))


def _long_n(width: int):
    def op(m: _Machine) -> None:
        m.stack.append(int.from_bytes(m.read(m.read_uint(width)), "little", signed=True))

    return op


def _fixed_int(width: int, signed: bool):
    def op(m: _Machine) -> None:
        m.stack.append(int.from_bytes(m.read(width), "little", signed=signed))

    return op


def _float_text(m: _Machine) -> None:
    try:
        m.stack.append(float(m.readline()))
    except ValueError:
        raise _Malformed("bad float literal") from None


def _string_text(m: _Machine) -> None:
    line = m.readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise _Malformed("STRING without quotes")
    m.stack.append(_py2_str(codecs.escape_decode(line[1:-1])[0]))


def _sized(width: int, convert):
    def op(m: _Machine) -> None:
        m.stack.append(convert(m.read(m.read_uint(width))))

    return op


def _utf8(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _unicode_text(m: _Machine) -> None:
    m.stack.append(m.readline().decode("raw-unicode-escape"))


def _push(value_factory):
    def op(m: _Machine) -> None:
        m.stack.append(value_factory())

    return op


def _mark(m: _Machine) -> None:
    m.stack.append(_MARK)


def _tuple_n(n: int):
    def op(m: _Machine) -> None:
        items = [m.pop() for _ in range(n)][::-1]
        m.stack.append(tuple(items))

    return op


def _tuple(m: _Machine) -> None:
    m.stack.append(tuple(m.pop_mark()))


def _list(m: _Machine) -> None:
    m.stack.append(m.pop_mark())


def _dict(m: _Machine) -> None:
    d: dict = {}
    m.set_items(d, m.pop_mark())
    m.stack.append(d)


def _append(m: _Machine) -> None:
    value = m.pop()
    target = m.top()
    if type(target) is not list:
        raise _Refused(f"APPEND on {type(target).__name__}")
    target.append(value)


def _appends(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if type(target) is not list:
        raise _Refused(f"APPENDS on {type(target).__name__}")
    target.extend(items)


def _setitem(m: _Machine) -> None:
    value, key = m.pop(), m.pop()
    m.set_items(m.top(), [key, value])


def _setitems(m: _Machine) -> None:
    items = m.pop_mark()
    m.set_items(m.top(), items)


def _additems(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if type(target) is not set:
        raise _Refused(f"ADDITEMS on {type(target).__name__}")
    try:
        target.update(items)
    except TypeError:
        raise _Malformed("unhashable set item") from None


def _frozenset(m: _Machine) -> None:
    try:
        m.stack.append(frozenset(m.pop_mark()))
    except TypeError:
        raise _Malformed("unhashable set item") from None


def _pop(m: _Machine) -> None:
    if m.stack and m.stack[-1] is _MARK:
        m.stack.pop()
    else:
        m.pop()


def _pop_mark(m: _Machine) -> None:
    m.pop_mark()


def _dup(m: _Machine) -> None:
    m.stack.append(m.top())


def _get(index_reader):
    def op(m: _Machine) -> None:
        index = index_reader(m)
        if index not in m.memo:
            raise _Malformed(f"memo entry {index} used before it was stored")
        m.stack.append(m.memo[index])

    return op


def _put(index_reader):
    def op(m: _Machine) -> None:
        m.memo[index_reader(m)] = m.top()

    return op


def _memoize(m: _Machine) -> None:
    m.memo[len(m.memo)] = m.top()


def _proto(m: _Machine) -> None:
    if m.read(1)[0] > 5:
        raise _Malformed("pickle protocol newer than 5")


def _frame(m: _Machine) -> None:
    m.read(8)  # protocol 4 framing is only a read-ahead hint; opcodes continue inline


def _text_index(m: _Machine) -> int:
    return m.decimal(m.readline())


_OPS = {
    op[0]: fn
    for op, fn in {
        b".": _stop,
        b"(": _mark,
        b"0": _pop,
        b"1": _pop_mark,
        b"2": _dup,
        b"N": _push(lambda: None),
        b"\x88": _push(lambda: True),
        b"\x89": _push(lambda: False),
        b"I": _int_text,
        b"J": _fixed_int(4, True),
        b"K": _fixed_int(1, False),
        b"M": _fixed_int(2, False),
        b"L": _long_text,
        b"\x8a": _long_n(1),
        b"\x8b": _long_n(4),
        b"F": _float_text,
        b"G": lambda m: m.stack.append(struct.unpack(">d", m.read(8))[0]),
        b"S": _string_text,
        b"T": _sized(4, _py2_str),
        b"U": _sized(1, _py2_str),
        b"V": _unicode_text,
        b"X": _sized(4, _utf8),
        b"\x8c": _sized(1, _utf8),
        b"\x8d": _sized(8, _utf8),
        b"B": _sized(4, bytes),
        b"C": _sized(1, bytes),
        b"\x8e": _sized(8, bytes),
        b"\x96": _sized(8, bytearray),
        b")": _push(tuple),
        b"t": _tuple,
        b"\x85": _tuple_n(1),
        b"\x86": _tuple_n(2),
        b"\x87": _tuple_n(3),
        b"]": _push(list),
        b"l": _list,
        b"a": _append,
        b"e": _appends,
        b"}": _push(dict),
        b"d": _dict,
        b"s": _setitem,
        b"u": _setitems,
        b"\x8f": _push(set),
        b"\x90": _additems,
        b"\x91": _frozenset,
        b"g": _get(_text_index),
        b"h": _get(lambda m: m.read_uint(1)),
        b"j": _get(lambda m: m.read_uint(4)),
        b"p": _put(_text_index),
        b"q": _put(lambda m: m.read_uint(1)),
        b"r": _put(lambda m: m.read_uint(4)),
        b"\x94": _memoize,
        b"\x80": _proto,
        b"\x95": _frame,
        b"c": _global,
        b"\x93": _stack_global,
        b"R": _reduce,
        b"b": _build,
        b"i": _inst,
        b"o": _instantiate,
        b"\x81": _instantiate,
        b"\x92": _instantiate,
        b"\x82": _ext,
        b"\x83": _ext,
        b"\x84": _ext,
        b"P": _persid,
        b"Q": _binpersid,
    }.items()
}


def _read_legacy(f: BufferedIOBase, file_size: int) -> object:
    if _Machine(f, file_size).load() != MAGIC_NUMBER:
        raise _Malformed("no torch magic number: not a torch checkpoint")
    if _Machine(f, file_size).load() != PROTOCOL_VERSION:
        raise _Malformed("unknown legacy protocol version")
    sys_info = _Machine(f, file_size).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise _Refused("storages saved big-endian")
    storages: dict[str, _Storage] = {}
    obj = _Machine(f, file_size, storages, budget=file_size - f.tell()).load()
    keys = _Machine(f, file_size).load()
    if not (
        isinstance(keys, list)
        and all(isinstance(k, str) for k in keys)
        and len(keys) == len(set(keys))
        and set(keys) == set(storages)
    ):
        raise _Malformed("the storage key list does not match the storages the object uses")
    for key in keys:
        flat = storages[key].flat
        count = f.read(8)
        if len(count) != 8:
            raise _Malformed(f"the file ends before storage {key} (truncated)")
        if int.from_bytes(count, "little", signed=True) != flat.numel():
            raise _Malformed(
                f"storage {key} holds {int.from_bytes(count, 'little')} elements "
                f"where the object expects {flat.numel()}"
            )
        buffer = flat.view(torch.uint8).numpy() if flat.numel() else None
        if buffer is not None and f.readinto(buffer.data) != buffer.nbytes:
            raise _Malformed(f"the file ends inside storage {key} (truncated)")
    if f.read(1):
        raise _Malformed("unexpected bytes after the last storage")
    return obj


def load_legacy_torch(path: str | Path) -> object:
    """Load a legacy (non-zip) torch file onto the CPU with the allow-list in the module doc.

    Raises :class:`JregfixError` (one line) for refused content and for malformed or truncated
    files; nothing from the file is ever executed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_legacy(f, path.stat().st_size)
    except _Refused as exc:
        raise JregfixError(
            f"{path}: refused to load: {exc}; a checkpoint may only hold tensors, OrderedDicts "
            "and plain Python values (get the file from its official source)"
        ) from None
    except (_Malformed, ValueError, TypeError, OverflowError, RuntimeError) as exc:
        # ValueError & co. come from decoding forged literals (escapes, UTF-8, floats).
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JregfixError(
            f"{path}: not a readable legacy torch checkpoint: {reason}; download it again"
        ) from None
