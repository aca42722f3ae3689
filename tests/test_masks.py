"""Bit-packed silhouette storage (io/masks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jregfix.errors import JregfixError
from jregfix.io.masks import load_silhouettes, pack_masks, save_silhouettes, unpack_masks


def test_pack_layout_is_row_major_msb_first():
    m = np.zeros((1, 3, 5), bool)
    m[0, 0, 0] = m[0, 1, 2] = m[0, 2, 4] = True  # flat indices 0, 7, 14
    packed = pack_masks(m)
    assert packed.shape == (1, 2)  # 15 bits -> 2 bytes
    ref = np.zeros(2, np.uint8)
    for i in (0, 7, 14):  # flat index i is bit 7 - i % 8 of byte i // 8
        ref[i // 8] |= 1 << (7 - i % 8)
    assert packed[0].tolist() == ref.tolist()
    assert np.array_equal(unpack_masks(packed, (3, 5)), m)


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((5, 224, 224)) > 0.7
    masks[3] = False
    score = rng.random(5).astype(np.float32)
    found = np.array([True, True, True, False, True])
    names = np.array([f"images/S9_Walking_1.60457274_{i:06d}.jpg" for i in range(5)])
    path = tmp_path / "sil.npz"
    save_silhouettes(path, masks, score, found, names, gt_row=np.arange(5))
    got_masks, got_score, got_found, got_names = load_silhouettes(path)
    assert got_masks.dtype == bool and np.array_equal(got_masks, masks)
    assert np.array_equal(got_score, score) and np.array_equal(got_found, found)
    assert got_names.tolist() == names.tolist()
    with np.load(path) as z:
        assert z["masks_packed"].shape == (5, 224 * 224 // 8)
        assert z["gt_row"].tolist() == list(range(5))
    # Same arrays, same bytes.
    save_silhouettes(tmp_path / "again.npz", masks, score, found, names, gt_row=np.arange(5))
    assert (tmp_path / "again.npz").read_bytes() == path.read_bytes()


def test_errors(tmp_path):
    with pytest.raises(JregfixError, match="disagree"):
        save_silhouettes(
            tmp_path / "x.npz",
            np.zeros((2, 4, 4), bool),
            np.zeros(3),
            np.zeros(2, bool),
            ["a", "b"],
        )
    assert not (tmp_path / "x.npz").exists()
    np.savez(tmp_path / "other.npz", pose=np.zeros((2, 72)))
    with pytest.raises(JregfixError, match="not a silhouettes file"):
        load_silhouettes(tmp_path / "other.npz")
    with pytest.raises(JregfixError, match="no such file"):
        load_silhouettes(tmp_path / "absent.npz")
