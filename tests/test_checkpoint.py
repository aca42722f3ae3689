"""Safe, strict loading of SPIN's Python 2 checkpoint and its VIBE/MEVA copies (io/checkpoint.py).

Fixtures come from tests/legacy_torch.py, which writes the legacy format the way torch 1.x under
Python 2 did (text INT opcodes for 64-bit optimizer ids, byte-string keys, cuda:0 storages).
``torch.load(weights_only=False)`` appears only here, on our own fixtures, as an independent
reference reader.
"""

from __future__ import annotations

import collections
import os
import pickle
import pickletools
from pathlib import Path

import pytest
import torch

from jregfix.errors import JregfixError
from jregfix.io.checkpoint import extract_state_dict, load_state_dict_file, load_torch_file
from jregfix.io.legacy_torch import MAGIC_NUMBER, PROTOCOL_VERSION
from tests.legacy_torch import (
    Py2Unicode,
    py2_dumps,
    save_legacy_cuda,
    save_legacy_py3_cuda,
    spin_trainer_checkpoint,
)

SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


def small_state(seed: int = 0) -> collections.OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict(
        [
            ("conv1.weight", torch.randn(4, 3, 7, 7, generator=g)),
            ("bn1.weight", torch.rand(4, generator=g)),
            ("bn1.bias", torch.randn(4, generator=g)),
            ("bn1.running_mean", torch.randn(4, generator=g)),
            ("bn1.running_var", 0.5 + torch.rand(4, generator=g)),
            ("bn1.num_batches_tracked", torch.tensor(264323)),
            ("fc1.weight", torch.randn(5, 4, generator=g)),
            ("fc1.bias", torch.randn(5, generator=g).double()),
            ("init_pose", torch.randn(1, 144, generator=g)),
        ]
    )


def legacy_pickles(path: Path) -> list[list]:
    """The five pickles of a legacy file as (opcode name, arg) lists, by pickletools."""
    with open(path, "rb") as f:
        return [[(op.name, arg) for op, arg, _ in pickletools.genops(f)] for _ in range(5)]


def assert_same(a, b, where="obj"):
    """Deep equality with exact types, dtypes and tensor values."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert a.device.type == "cpu" and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
        assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), where + "._md")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def spin_file(tmp_path_factory):
    ckpt = spin_trainer_checkpoint(small_state(), dataset_size=3000)
    path = tmp_path_factory.mktemp("spin") / "model_checkpoint.pt"
    save_legacy_cuda(ckpt, path)
    return path, ckpt


def test_fixture_is_python2_legacy_format(spin_file):
    path, ckpt = spin_file
    magic, version, sys_info, main, keys = legacy_pickles(path)
    assert ("LONG1", MAGIC_NUMBER) in magic and ("BININT2", PROTOCOL_VERSION) in version
    assert ("NEWTRUE", None) in sys_info
    names = collections.Counter(name for name, _ in main)
    ints = [arg for name, arg in main if name == "INT"]
    n_params = len(ckpt["optimizer"]["param_groups"][0]["params"])
    assert n_params == 5
    # Adam's state keys and param_groups ids: 64-bit id() values, text INT opcodes only.
    assert len(ints) == 2 * n_params and all(i > 2**46 for i in ints)
    assert sorted(ints) == sorted(2 * ckpt["optimizer"]["param_groups"][0]["params"])
    assert b"\nI139672" in path.read_bytes()
    assert names["SHORT_BINSTRING"] > 0 and names["BINPERSID"] == 2 * n_params + 9
    assert not {"BINUNICODE", "SHORT_BINUNICODE", "LONG1", "NEWOBJ"} & set(names)
    assert ("SHORT_BINSTRING", "cuda:0") in main and ("SHORT_BINSTRING", "cpu") not in main
    globals_ = {arg for name, arg in main if name == "GLOBAL"}
    assert globals_ == {
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch DoubleStorage",
        "torch LongStorage",
    }
    assert all(name in ("SHORT_BINSTRING", "BINPUT") for name, _ in keys[4:-2])
    # dataset_perm: small Python 2 ints; the 3000 entries come in MARK...APPENDS batches.
    assert names["BININT2"] >= 3000 - 256


def test_torch_weights_only_cannot_read_it(spin_file):
    """The bug this module fixes: torch's restricted unpickler has no INT opcode (ord 73)."""
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand 73"):
        torch.load(spin_file[0], map_location="cpu", weights_only=True)


def test_matches_original_and_torch_reference(spin_file):
    path, ckpt = spin_file
    got = load_torch_file(path)
    assert_same(got, ckpt)
    assert_same(got, torch.load(path, map_location="cpu", weights_only=False))
    group = got["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 1e-4
    assert group["amsgrad"] is False and len(got["dataset_perm"]) == 3000
    assert got["model"]._metadata["bn1"] == {"version": 2}
    assert set(got["optimizer"]["state"]) == set(group["params"])
    sd = load_state_dict_file(path)
    assert list(sd) == list(ckpt["model"]) and type(sd) is dict


@pytest.mark.slow
def test_real_size_spin_checkpoint_loads_into_hmr(tmp_path):
    from jregfix.models.hmr import HMR, build_hmr
    from tests.test_hmr import random_hmr_state

    metadata = HMR().state_dict()._metadata
    ckpt = spin_trainer_checkpoint(random_hmr_state(3), metadata, dataset_size=48_000)
    path = tmp_path / "model_checkpoint.pt"
    save_legacy_cuda(ckpt, path)
    main = legacy_pickles(path)[3]
    assert sum(name == "INT" for name, _ in main) == 2 * 169  # hundreds of 64-bit ids
    got = load_torch_file(path)
    assert len(got["model"]) == 331 and len(got["dataset_perm"]) == 48_000
    assert got["model"]._metadata == metadata
    for k, v in ckpt["model"].items():
        assert torch.equal(got["model"][k], v), k
    first = ckpt["optimizer"]["param_groups"][0]["params"][0]
    assert torch.equal(
        got["optimizer"]["state"][first]["exp_avg_sq"],
        ckpt["optimizer"]["state"][first]["exp_avg_sq"],
    )
    model, report = build_hmr(path)
    assert report.ok and report.filled == {}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("variant", ["py2", "py3-legacy", "zip"])
def test_vibe_meva_spin_model_checkpoint(tmp_path, variant):
    """VIBE/MEVA ship SPIN's checkpoint as spin_model_checkpoint.pth.tar and read ['model']."""
    ckpt = spin_trainer_checkpoint(small_state(1), dataset_size=500, seed=1)
    path = tmp_path / "spin_model_checkpoint.pth.tar"
    if variant == "py2":
        save_legacy_cuda(ckpt, path)
    elif variant == "py3-legacy":
        save_legacy_py3_cuda(ckpt, path)
        names = {name for name, _ in legacy_pickles(path)[3]}
        assert {"LONG1", "BINUNICODE"} <= names and "INT" not in names  # really Python 3
    else:
        torch.save(ckpt, path)
    assert_same(load_torch_file(path), ckpt)
    sd = load_state_dict_file(path)
    assert all(torch.equal(sd[k], v) for k, v in ckpt["model"].items())
    bare = tmp_path / "bare.pt"
    save_legacy_cuda(ckpt["model"], bare)
    assert list(load_state_dict_file(bare)) == list(ckpt["model"])


# -- every Python 2 opcode, compared with the stdlib unpickler on harmless data ---------------
def plain_values(py2: bool = True):
    shared = [1, 2]
    od = collections.OrderedDict([("b", 1), ("a", {"version": 2})])
    od._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "ids": [139672168905216, -139672168905216, 2**63 - 1, -(2**63)],
        "longs": [2**64, -(2**70), MAGIC_NUMBER, 10**700],
        "small": [0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31],
        "floats": [0.0, -1.5, 1e-8, 3.0e300, float("inf")],
        "flags": [True, False, None],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),)],
        "text": [
            "",
            "x" * 300,
            "caf\u00e9",
            (Py2Unicode if py2 else str)("uni\u00e9\u4e2d"),
            "q'\"\\\n\t",
        ],
        "shared": (shared, shared),
        "od": od,
        "nested": {"a": [{"b": ()}], 7: "int key", (1, "t"): "tuple key"},
    }


def write_legacy(path: Path, main: bytes, keys: bytes | None = None, tail: bytes = b"") -> Path:
    head = b"".join(py2_dumps(x) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO))
    path.write_bytes(head + main + (py2_dumps([]) if keys is None else keys) + tail)
    return path


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python2_opcodes_of_each_protocol(tmp_path, protocol):
    data = py2_dumps(plain_values(), protocol)
    # pickletools cannot decode a non-ASCII protocol-0 STRING; list the opcodes without it.
    ascii_only = dict(plain_values(), text=["", "x" * 300, Py2Unicode("uni\u00e9")])
    ops = {op.name for op, _, _ in pickletools.genops(py2_dumps(ascii_only, protocol))}
    expected = {
        0: {"INT", "LONG", "STRING", "UNICODE", "FLOAT", "PUT", "GET", "DICT", "LIST"},
        1: {
            "BININT",
            "BINSTRING",
            "SHORT_BINSTRING",
            "BINUNICODE",
            "BINFLOAT",
            "LONG",
            "BINPUT",
            "BINGET",
            "EMPTY_TUPLE",
            "APPENDS",
            "SETITEMS",
        },
        2: {
            "PROTO",
            "INT",
            "LONG1",
            "NEWTRUE",
            "NEWFALSE",
            "TUPLE1",
            "TUPLE2",
            "TUPLE3",
            "BININT1",
            "BININT2",
            "BUILD",
            "REDUCE",
            "GLOBAL",
        },
    }[protocol]
    assert expected <= ops
    got = load_torch_file(write_legacy(tmp_path / "p.pt", data))
    assert_same(got, pickle.loads(data, encoding="utf-8"))
    assert got["od"]._metadata == {"": {"version": 1}}


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_python3_opcodes(tmp_path, protocol):
    value = dict(plain_values(py2=False), raw=b"\x00\xff")
    if protocol >= 4:  # set opcodes; protocol 3 reduces sets via the global builtins.set
        value["sets"] = [set(), {1, 2}, frozenset({"a"})]
    if protocol == 5:
        value["buffer"] = bytearray(b"\x01\x02")  # BYTEARRAY8
    data = pickle.dumps(value, protocol)
    got = load_torch_file(write_legacy(tmp_path / "p.pt", data))
    assert_same(got, pickle.loads(data))


def test_python2_non_utf8_byte_strings(tmp_path):
    # A Python 2 str holding raw bytes (not UTF-8) is only decodable as latin-1.
    path = write_legacy(tmp_path / "latin.pt", b"\x80\x02}q\x00U\x01kq\x01U\x02\xff\xfeq\x02s.")
    assert load_torch_file(path) == {"k": "\xff\xfe"}


# -- hostile files: nothing may run ---------------------------------------------------------
def hostile_payloads(sentinel: Path) -> dict[str, bytes]:
    cmd = f"touch {sentinel}".encode()
    expr = f"open({str(sentinel)!r}, 'w')".encode()
    str_arg = b"U" + bytes([len(cmd)]) + cmd

    class Reduce:
        def __init__(self, func, *args):
            self.func, self.args = func, args

        def __reduce__(self):
            return self.func, self.args

    return {
        "os.system": b"\x80\x02cos\nsystem\n" + str_arg + b"\x85R.",
        "posix.system": b"\x80\x02cposix\nsystem\n" + str_arg + b"\x85R.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\nX"
        + len(expr).to_bytes(4, "little")
        + expr
        + b"\x85R.",
        "__builtin__.eval": b"\x80\x02c__builtin__\neval\nU"
        + bytes([len(expr)])
        + expr
        + b"\x85R.",
        "INST": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "stack_global": pickle.dumps(Reduce(os.system, cmd.decode()), protocol=4),
        "open": pickle.dumps(Reduce(open, str(sentinel), "w"), protocol=2),
        "in_dict": b"\x80\x02}U\x05modelcos\nsystem\n" + str_arg + b"\x85Rs.",
        # BUILD would call Tensor.__setstate__ on a rebuilt tensor.
        "build_on_tensor": (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((U\x07storagectorch\n"
            b"FloatStorage\nU\x011U\x03cpuK\x01NtQK\x00K\x01\x85K\x01\x85"
            b"\x89ccollections\nOrderedDict\n)RtR}U\x01x\x88sb."
        ),
        # A reduce whose callable is a storage class, not an allow-listed rebuild.
        "call_storage": b"\x80\x02ctorch\nFloatStorage\n" + str_arg + b"\x85R.",
    }


@pytest.mark.parametrize("name", sorted(hostile_payloads(Path("x"))))
@pytest.mark.parametrize("where", ["bare", "legacy"])
def test_hostile_pickles_execute_nothing(tmp_path, name, where):
    sentinel = tmp_path / "pwned"
    payload = hostile_payloads(sentinel)[name]
    path = tmp_path / "evil.pt"
    if where == "bare":
        path.write_bytes(payload)
    else:
        write_legacy(path, payload)
    with pytest.raises(JregfixError, match="refused to load") as err:
        load_torch_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not sentinel.exists()


def test_hostile_payload_is_live(tmp_path):
    """The stdlib unpickler does run the 'open' payload, so the test above can fail."""
    sentinel = tmp_path / "pwned"
    pickle.loads(hostile_payloads(sentinel)["open"]).close()
    assert sentinel.exists()


def test_zip_path_keeps_torch_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return open, (str(tmp_path / "pwned"), "w")

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(JregfixError, match="weights-only allow-list") as err:
        load_torch_file(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


# -- damaged files: one-line errors -----------------------------------------------------------
def test_truncated_file(spin_file, tmp_path):
    data = spin_file[0].read_bytes()
    keys_end = data.rindex(b"e.") + 2  # end of the storage-key list pickle
    cut = tmp_path / "cut.pt"
    for size in (10, 400, keys_end - 5, keys_end + 4, keys_end + 20, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.raises(JregfixError, match="truncated") as err:
            load_torch_file(cut)
        assert "\n" not in str(err.value) and "cut.pt" in str(err.value)


def test_corrupt_storage_sizes_and_trailing_bytes(spin_file, tmp_path):
    data = bytearray(spin_file[0].read_bytes())
    keys_end = data.rindex(b"e.") + 2
    bad = tmp_path / "bad.pt"
    wrong_count = data.copy()
    wrong_count[keys_end : keys_end + 8] = (10**6).to_bytes(8, "little")
    bad.write_bytes(wrong_count)
    with pytest.raises(JregfixError, match="1000000 elements"):
        load_torch_file(bad)
    bad.write_bytes(bytes(data) + b"\x00")
    with pytest.raises(JregfixError, match="after the last storage"):
        load_torch_file(bad)
    bad.write_bytes(py2_dumps(12345) + bytes(data[15:]))
    with pytest.raises(JregfixError, match="magic number"):
        load_torch_file(bad)


def test_forged_storage_size_allocates_nothing(tmp_path):
    main = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((U\x07storagectorch\nFloatStorage\n"
        b"U\x011U\x06cuda:0\x8a\x06\x00\x00\x00\x00\x00\x01NtQK\x00K\x01\x85K\x01\x85"
        b"\x89ccollections\nOrderedDict\n)RtR."
    )
    path = write_legacy(tmp_path / "huge.pt", main, py2_dumps(["1"]))
    with pytest.raises(JregfixError, match="more bytes than the file holds"):
        load_torch_file(path)


def test_non_finite_weights_are_refused(tmp_path):
    state = small_state()
    state["fc1.weight"][2, 1] = float("nan")
    ckpt = spin_trainer_checkpoint(state, dataset_size=10)
    path = tmp_path / "model_checkpoint.pt"
    save_legacy_cuda(ckpt, path)
    with pytest.raises(JregfixError, match="'fc1.weight' holds NaN/inf") as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)
    state["fc1.weight"][2, 1] = 0.0
    ckpt["optimizer"]["state"][ckpt["optimizer"]["param_groups"][0]["params"][0]]["exp_avg"][0] = (
        float("inf")
    )  # optimizer moments are not the model
    save_legacy_cuda(ckpt, path)
    assert torch.equal(load_state_dict_file(path)["fc1.weight"], state["fc1.weight"])


def test_bad_inputs(tmp_path):
    with pytest.raises(JregfixError, match="no such file"):
        load_torch_file(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(JregfixError, match="junk.pt"):
        load_torch_file(junk)
    junk.write_bytes(b"<html>not found</html>\n")
    with pytest.raises(JregfixError, match="not a readable legacy torch checkpoint"):
        load_torch_file(junk)
    junk.write_bytes(b"")
    with pytest.raises(JregfixError, match="empty file"):
        load_torch_file(junk)
    with pytest.raises(JregfixError, match="no 'model' state_dict"):
        extract_state_dict({"epoch": 3, "weights": torch.zeros(1)}, "x.pt")
    with pytest.raises(JregfixError, match="not tensors"):
        extract_state_dict({"model": {"a": torch.zeros(1), "b": 3}}, "x.pt")


def test_shared_storage_stays_shared(tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "views.pt"
    save_legacy_cuda({"a": base[2:8].view(2, 3), "b": base, "c": base[::4]}, path)
    got = load_torch_file(path)
    assert torch.equal(got["a"], base[2:8].view(2, 3)) and torch.equal(got["c"], base[::4])
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()


def test_parameters_and_pre_v2_tensors(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    path = tmp_path / "param.pt"
    save_legacy_cuda({"w": weight, "frozen": torch.nn.Parameter(torch.ones(2), False)}, path)
    got, ref = load_torch_file(path), torch.load(path, map_location="cpu", weights_only=False)
    assert_same(got, ref)
    assert got["w"].requires_grad and not got["frozen"].requires_grad
    # torch 0.4 wrote _rebuild_tensor(storage, offset, size, stride), without grad/hooks.
    main = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor\n((U\x07storagectorch\nFloatStorage\n"
        b"U\x011U\x06cuda:0K\x03NtQK\x01K\x02\x85K\x01\x85tR."
    )
    data = torch.tensor([1.5, -2.0, 4.25])
    path = write_legacy(
        tmp_path / "old.pt",
        main,
        py2_dumps(["1"]),
        (3).to_bytes(8, "little") + data.numpy().tobytes(),
    )
    assert torch.equal(load_torch_file(path), data[1:])
