"""SPIN's crop (geometry/crop.py) against independent numpy computations; image reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jregfix.errors import JregfixError
from jregfix.geometry.crop import (
    crop_box,
    crop_image,
    crop_map,
    crop_to_image,
    image_to_crop,
    spin_transform,
)
from jregfix.io.images import check_images, read_image, resolve_image

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures"
RES = 224


def ref_box(center, scale):
    """SPIN utils/imutils.py: the box is [trunc(c - h/2), trunc(c + h/2)), h = 200 scale."""
    h = 200.0 * scale
    return np.trunc(center - h / 2).astype(int), np.trunc(center + h / 2).astype(int)


def ref_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear resampling matrix (n_out, n_in): a triangle filter on pixel centres,
    widened by the shrink factor, normalised per output pixel."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for j in range(n_out):
        c = (j + 0.5) * scale
        x = np.arange(max(int(c - width + 0.5), 0), min(int(c + width + 0.5), n_in))
        k = np.maximum(0.0, 1.0 - np.abs((x + 0.5 - c) / width))
        w[j, x] = k / k.sum()
    return w


def ref_crop(img: np.ndarray, center, scale, stretch=True) -> np.ndarray:
    """Independent SPIN crop: zero-padded box, global contrast stretch, float resample."""
    ul, br = ref_box(np.asarray(center, float), float(scale))
    pad = max(0, -ul.min(), br[0] - img.shape[1], br[1] - img.shape[0])
    padded = np.pad(img.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)))
    box = padded[ul[1] + pad : br[1] + pad, ul[0] + pad : br[0] + pad]
    if stretch:
        lo, hi = box.min(), box.max()
        box = np.floor((box - lo) * 255.0 / (hi - lo) + 0.5)
    wy, wx = ref_weights(box.shape[0], RES), ref_weights(box.shape[1], RES)
    return np.einsum("ij,jkc,lk->ilc", wy, box, wx, optimize=True)


def test_crop_box_matches_formula():
    rng = np.random.default_rng(0)
    center = rng.uniform(-50, 1050, (300, 2))
    scale = rng.uniform(0.3, 6.0, 300)
    ul, br = crop_box(center, scale)
    for i in range(300):
        rul, rbr = ref_box(center[i], scale[i])
        assert np.array_equal(ul[i], rul) and np.array_equal(br[i], rbr)
    # Exact-integer edges: SPIN's inverted matrix lands just below the integer (9 -> 8.999..)
    # and truncation drops a pixel; we reproduce that, so only a one-pixel bound holds here.
    ul, br = crop_box(np.array([[30.5, 70.0]]), np.array([0.61]))
    rul, rbr = ref_box(np.array([30.5, 70.0]), 0.61)
    assert np.abs(ul[0] - rul).max() <= 1 and np.abs(br[0] - rbr).max() <= 1


def test_spin_transform_formula_and_inverse_maps():
    rng = np.random.default_rng(1)
    center = rng.uniform(100, 900, (20, 2))
    scale = rng.uniform(1.0, 5.0, 20)
    pts = rng.uniform(1, 1000, (20, 7, 2))
    h = (200 * scale)[:, None, None]
    ref = np.trunc(RES * (pts - 1 - center[:, None]) / h + RES / 2).astype(int) + 1
    assert np.array_equal(spin_transform(pts, center, scale), ref)

    edge = pts - 0.5  # 1-based pixel p has its centre at edge coordinate p - 0.5
    crop = image_to_crop(edge, center, scale)
    assert np.allclose(crop_to_image(crop, center, scale), edge, atol=1e-9)
    # SPIN's integer keypoint transform vs the exact resize map: one crop pixel of truncation
    # (either side of zero), half a pixel from mapping indices rather than pixel centres, and
    # the box truncation (< 1 image pixel = RES/h crop pixels).
    diff = np.abs((spin_transform(pts, center, scale) - 0.5) - crop)
    assert (diff <= 1.5 + 1.5 * RES / h).all()
    print(f"integer keypoint transform vs exact resize map: max {diff.max():.3f} crop px")


@pytest.mark.parametrize(
    "shape, center, scale",
    [
        ((90, 120), (30.5, 70.3), 0.61),  # upscaling, box sticks out on the left and bottom
        ((500, 420), (200.2, 260.1), 2.37),  # shrinking: the antialiased filter matters
    ],
)
def test_crop_against_reference(shape, center, scale):
    rng = np.random.default_rng(2)
    smooth = rng.integers(40, 200, (shape[0] // 10 + 1, shape[1] // 10 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(smooth).resize(shape[::-1], Image.Resampling.BICUBIC))
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    got = crop_image(img, center, scale)
    ref = ref_crop(img, center, scale)
    assert got.shape == (RES, RES, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(float) - ref)
    # Pillow rounds to 8 bits after each pass in fixed point: a level or two at most.
    assert diff.max() <= 2.0 and diff.mean() < 0.5, (diff.max(), diff.mean())
    # The box outside the image is black before stretching, and so 0 after it.
    ul, _ = ref_box(np.asarray(center), scale)
    if ul[0] < 0:
        assert (got[:, 0] == 0).all()
    plain = crop_image(img, center, scale, stretch=False)
    assert np.abs(plain.astype(float) - ref_crop(img, center, scale, stretch=False)).max() <= 2
    effect = np.abs(got.astype(float) - plain)
    print(
        f"vs float reference: max {diff.max():.0f}, mean {diff.mean():.3f} levels; contrast "
        f"stretch (range {img.min()}..{img.max()}) changes pixels by mean {effect.mean():.1f}"
    )


@pytest.mark.skipif(not (FIXTURES / "im1010.jpg").is_file(), reason="../shared/fixtures absent")
def test_crop_im1010_fixture():
    img = read_image(FIXTURES / "im1010.jpg")
    x, y, w, h = json.loads((FIXTURES / "im1010_bbox.json").read_text())["bbox"]
    # SPIN demo --bbox rule (SPIN demo.py): centre ul + wh/2, scale max(w,h)/200.
    center, scale = np.array([x + w / 2, y + h / 2]), max(w, h) / 200
    ul, br = crop_box(center, scale)
    rul, rbr = ref_box(center, scale)
    assert np.array_equal(ul[0], rul) and np.array_equal(br[0], rbr)
    got = crop_image(img, center, scale)
    diff = np.abs(got.astype(float) - ref_crop(img, center, scale))
    assert diff.max() <= 2.0 and diff.mean() < 0.5, (diff.max(), diff.mean())
    plain = crop_image(img, center, scale, stretch=False)
    effect = np.abs(got.astype(float) - plain)
    print(
        f"im1010 vs float reference: max {diff.max():.0f}, mean {diff.mean():.3f} levels; "
        f"contrast stretch changes pixels by mean {effect.mean():.2f}, max {effect.max():.0f}"
    )


def test_crop_map_aligns_with_point_map():
    mask = np.zeros((300, 260), np.float32)
    mask[60:200, 80:150] = 1.0  # rows 60..199, cols 80..149
    center, scale = np.array([120.3, 140.7]), 1.13
    got = crop_map(mask, center, scale)
    corners = image_to_crop(np.array([[80.0, 60.0], [150.0, 200.0]]), center, scale)[0]
    yy, xx = np.mgrid[0:RES, 0:RES] + 0.5
    margin = 1.5
    inside = (
        (xx > corners[0, 0] + margin)
        & (xx < corners[1, 0] - margin)
        & (yy > corners[0, 1] + margin)
        & (yy < corners[1, 1] - margin)
    )
    outside = (
        (xx < corners[0, 0] - margin)
        | (xx > corners[1, 0] + margin)
        | (yy < corners[0, 1] - margin)
        | (yy > corners[1, 1] + margin)
    )
    assert np.allclose(got[inside], 1.0, atol=1e-5)
    assert np.allclose(got[outside], 0.0, atol=1e-5)
    assert abs(got.sum() - np.prod(corners[1] - corners[0])) < 0.02 * got.sum()


def test_image_reading_and_missing(tmp_path):
    root = tmp_path / "h36m"
    (root / "images").mkdir(parents=True)
    rgb = np.random.default_rng(3).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / "a.png")
    (root / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    assert np.array_equal(read_image(root / "images" / "a.png"), rgb)
    assert resolve_image(root / "images", "images/a.png") == root / "images" / "a.png"
    names = ["images/a.png", "images/b.jpg", "images/c.jpg"]
    with pytest.raises(JregfixError, match=r"2 of 3 images missing.*images/b\.jpg, images/c\.jpg"):
        check_images(root, names)
    assert check_images(root, names, skip_missing=True).tolist() == [True, False, False]
    with pytest.raises(JregfixError, match="unreadable image"):
        read_image(root / "images" / "bad.jpg")
    with pytest.raises(JregfixError, match="not a directory"):
        check_images(tmp_path / "nope", names)
