"""Safe loading of legacy Python-2-era torch checkpoints with CUDA storages (io/checkpoint.py)."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch

from jregfix.errors import JregfixError
from jregfix.io.checkpoint import extract_state_dict, load_state_dict_file, load_torch_file
from tests.legacy_torch import save_legacy_cuda


def _spin_like(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict(
        [("conv1.weight", torch.randn(4, 3, 7, 7, generator=g)),
         ("bn1.num_batches_tracked", torch.tensor(7)),
         ("fc1.bias", torch.randn(5, generator=g).double())]
    )
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn1", {"version": 2})])
    return {
        "model": sd,
        "optimizer": {"state": {0: {"step": 264323, "exp_avg": torch.ones(3)}},
                      "param_groups": [{"lr": 3e-5, "betas": (0.9, 0.999), "params": [0]}]},
        "epoch": 4, "batch_idx": 1175, "batch_size": 64,
        "dataset_perm": list(range(300)), "total_step_count": 264323,
    }


def test_legacy_file_really_is_legacy_py2_cuda(tmp_path):
    path = tmp_path / "model_checkpoint.pt"
    save_legacy_cuda(_spin_like(), path)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"  # pickle protocol 2, not a zip archive ("PK")
    assert b"cuda:0" in data
    assert pickle.SHORT_BINSTRING + bytes([len("conv1.weight")]) + b"conv1.weight" in data
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)


def test_load_legacy_roundtrip(tmp_path):
    path = tmp_path / "model_checkpoint.pt"
    obj = _spin_like()
    save_legacy_cuda(obj, path)
    got = load_torch_file(path)
    assert set(got) == set(obj)
    assert list(got["model"]) == list(obj["model"])
    for k, v in obj["model"].items():
        assert got["model"][k].dtype == v.dtype
        assert got["model"][k].device.type == "cpu"
        assert torch.equal(got["model"][k], v)
    assert got["dataset_perm"] == obj["dataset_perm"]
    assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert got["optimizer"]["state"][0]["step"] == 264323
    assert got["model"]._metadata["bn1"] == {"version": 2}
    sd = load_state_dict_file(path)
    assert set(sd) == set(obj["model"])


def test_vibe_style_zip_checkpoint(tmp_path):
    path = tmp_path / "spin_model_checkpoint.pth.tar"
    obj = _spin_like(1)
    torch.save(obj, path)
    sd = load_state_dict_file(path)
    assert all(torch.equal(sd[k], obj["model"][k]) for k in obj["model"])
    bare = tmp_path / "bare.pt"
    torch.save(obj["model"], bare)
    assert set(load_state_dict_file(bare)) == set(obj["model"])


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("legacy", [True, False])
def test_refuses_code_execution(tmp_path, legacy):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if legacy:
        path.write_bytes(pickle.dumps(_Evil(target), protocol=2))
    else:
        torch.save({"model": _Evil(target)}, path)
    assert not target.exists()
    with pytest.raises(JregfixError, match="allow-list"):
        load_torch_file(path)
    assert not target.exists()


def test_bad_inputs(tmp_path):
    with pytest.raises(JregfixError, match="no such file"):
        load_torch_file(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(JregfixError, match="junk.pt"):
        load_torch_file(junk)
    with pytest.raises(JregfixError, match="no 'model' state_dict"):
        extract_state_dict({"epoch": 3, "weights": torch.zeros(1)}, "x.pt")
    with pytest.raises(JregfixError, match="not tensors"):
        extract_state_dict({"model": {"a": torch.zeros(1), "b": 3}}, "x.pt")


def test_python2_non_utf8_byte_strings(tmp_path):
    # A Python 2 str holding raw bytes (not UTF-8) is only decodable as latin-1.
    path = tmp_path / "latin.pt"
    with open(path, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
            pickle.dump(part, f, protocol=2)
        f.write(b"\x80\x02}q\x00U\x01kq\x01U\x02\xff\xfeq\x02s.")  # {'k': '\xff\xfe'}
        pickle.dump([], f, protocol=2)
    assert load_torch_file(path) == {"k": "\xff\xfe"}
