"""SPIN's crop: a box of side h = 200 * scale around ``center``, resized to res x res.

Reference: nkolot/SPIN utils/imutils.py. SPIN maps crop pixel p (1-based)
to the image through ``get_transform`` (x' = res (x - cx) / h + res / 2) with a "subtract 1,
transform, truncate toward zero, add 1" rule. ``crop`` takes the integer box
``[ul, br)`` with ``ul = trunc(T^-1(0))``, ``br = trunc(T^-1(res))`` (so ~ center -/+ h/2), fills
it with the image (zeros outside), then calls ``scipy.misc.imresize``, which *contrast-stretches*
float input (one global min..max over all channels -> 0..255, rounded) and resizes with PIL
bilinear (antialiased when shrinking). The box may be one pixel wider than tall (or vice versa);
it is resized to res x res regardless.

jregfix reproduces that path with numpy + Pillow: same box arithmetic (the same 3x3 matrix and
inverse), the same bytescale, Pillow's BILINEAR resize. Remaining deviations, measured in
tests/test_crop.py:

* JPEG decoding: SPIN uses cv2.imread, we use Pillow; both wrap libjpeg(-turbo). A one-off
  check (opencv-python-headless 5.0.0 vs Pillow 13.0.0) decoded SPIN's demo image
  examples/im1010.jpg and a 1000x1002 4:2:0 JPEG bit-identically; other builds may differ. EXIF
  orientation is applied, as cv2.imread does by default.
* Pillow's resize rounds to 8 bits after each (horizontal, vertical) pass in fixed point; an
  exact float evaluation of the same filter differs by at most 1-2 intensity levels.
* ``stretch=False`` skips the contrast stretch (not SPIN's behaviour; the checkpoint was trained
  with it); the test reports the intensity change this causes on a real photo.
* Point mappings: :func:`spin_transform` is SPIN's integer keypoint transform;
  :func:`image_to_crop` / :func:`crop_to_image` are the exact continuous maps of the pixel
  resize (via the integer box). SPIN's maps pixel indices, not pixel centres, and truncates, so
  the two differ by up to ~1.5 crop pixels (tests/test_crop.py measures it).

Coordinates: *edge* coordinates put pixel (row i, col j) over [j, j+1) x [i, i+1).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jregfix.geometry.camera import IMG_RES


def spin_matrix(center: np.ndarray, scale: np.ndarray | float, res: int = IMG_RES) -> np.ndarray:
    """SPIN's ``get_transform`` (rot = 0): (N,2) centers, (N,) scales -> (N,3,3) image->crop."""
    center = np.asarray(center, dtype=np.float64).reshape(-1, 2)
    h = 200.0 * np.asarray(scale, dtype=np.float64).reshape(-1)
    t = np.zeros((len(h), 3, 3))
    t[:, 0, 0] = res / h
    t[:, 1, 1] = res / h
    t[:, 0, 2] = res * (-center[:, 0] / h + 0.5)
    t[:, 1, 2] = res * (-center[:, 1] / h + 0.5)
    t[:, 2, 2] = 1.0
    return t


def spin_transform(
    points: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray | float,
    res: int = IMG_RES,
    invert: bool = False,
) -> np.ndarray:
    """SPIN's ``transform``: 1-based pixel points (N,K,2) -> (N,K,2) int64 in the other frame.

    Forward maps image -> crop; ``invert`` maps crop -> image. Subtract 1, apply T (or T^-1),
    truncate toward zero (numpy ``astype(int)``), add 1.
    """
    t = spin_matrix(center, scale, res)
    if invert:
        t = np.linalg.inv(t)
    pts = np.asarray(points, dtype=np.float64)
    pts = pts.reshape(len(t), -1, 2)
    hom = np.concatenate([pts - 1.0, np.ones(pts.shape[:-1] + (1,))], -1)
    out = np.einsum("nij,nkj->nki", t, hom)[..., :2]
    return out.astype(np.int64) + 1


def crop_box(
    center: np.ndarray, scale: np.ndarray | float, res: int = IMG_RES
) -> tuple[np.ndarray, np.ndarray]:
    """SPIN's integer crop box: (N,2) ``ul`` and ``br`` (x, y), the box being [ul, br)."""
    n = np.asarray(scale).size
    corners = np.broadcast_to(np.array([[1.0, 1.0], [res + 1.0, res + 1.0]]), (n, 2, 2))
    ends = spin_transform(corners, center, scale, res, invert=True) - 1
    return ends[:, 0], ends[:, 1]


def bytescale(data: np.ndarray) -> np.ndarray:
    """scipy<=1.2 ``bytescale``: global min..max -> 0..255, rounded half up, uint8."""
    lo, hi = float(data.min()), float(data.max())
    span = hi - lo if hi > lo else 1.0
    return (np.clip((data - lo) * (255.0 / span), 0, 255) + 0.5).astype(np.uint8)


def _box_pixels(img: np.ndarray, ul: np.ndarray, br: np.ndarray, dtype) -> np.ndarray:
    """The image over [ul, br) (x, y) with zeros outside the image: (br-ul)[::-1] + channels."""
    w, h = int(br[0] - ul[0]), int(br[1] - ul[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"empty crop box ul={ul.tolist()} br={br.tolist()}")
    out = np.zeros((h, w) + img.shape[2:], dtype=dtype)
    x0, y0 = max(0, -int(ul[0])), max(0, -int(ul[1]))
    x1, y1 = min(int(br[0]), img.shape[1]) - int(ul[0]), min(int(br[1]), img.shape[0]) - int(ul[1])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = img[
            int(ul[1]) + y0 : int(ul[1]) + y1, int(ul[0]) + x0 : int(ul[0]) + x1
        ]
    return out


def crop_image(
    img: np.ndarray, center: np.ndarray, scale: float, res: int = IMG_RES, stretch: bool = True
) -> np.ndarray:
    """SPIN crop of one uint8 image (H,W,3) -> (res,res,3) uint8.

    ``stretch`` applies SPIN's contrast stretch (bytescale of the zero-padded box).
    """
    ul, br = crop_box(center, scale, res)
    box = _box_pixels(img, ul[0], br[0], np.float64 if stretch else np.uint8)
    if stretch:
        box = bytescale(box)
    return np.asarray(Image.fromarray(box).resize((res, res), Image.Resampling.BILINEAR))


def crop_map(
    values: np.ndarray, center: np.ndarray, scale: float, res: int = IMG_RES
) -> np.ndarray:
    """Resample a float map (H,W) (e.g. mask probabilities) into the crop: (res,res) float32.

    Same box and bilinear filter as :func:`crop_image`, no contrast stretch; zeros outside.
    """
    ul, br = crop_box(center, scale, res)
    box = _box_pixels(np.asarray(values, dtype=np.float32), ul[0], br[0], np.float32)
    return np.asarray(Image.fromarray(box).resize((res, res), Image.Resampling.BILINEAR))


def image_to_crop(
    points: np.ndarray, center: np.ndarray, scale: np.ndarray, res: int = IMG_RES
) -> np.ndarray:
    """Edge coordinates in the image (N,K,2) -> edge coordinates in the crop (N,K,2)."""
    ul, br = crop_box(center, scale, res)
    pts = np.asarray(points, dtype=np.float64).reshape(len(ul), -1, 2)
    return (pts - ul[:, None]) * (res / (br - ul))[:, None]


def crop_to_image(
    points: np.ndarray, center: np.ndarray, scale: np.ndarray, res: int = IMG_RES
) -> np.ndarray:
    """Edge coordinates in the crop (N,K,2) -> edge coordinates in the image (N,K,2)."""
    ul, br = crop_box(center, scale, res)
    pts = np.asarray(points, dtype=np.float64).reshape(len(ul), -1, 2)
    return pts * ((br - ul) / res)[:, None] + ul[:, None]


def square_box(center: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """The continuous square of side 200*scale around ``center``: (N,4) x0, y0, x1, y1."""
    c = np.asarray(center, dtype=np.float64).reshape(-1, 2)
    half = 100.0 * np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    return np.concatenate([c - half, c + half], 1)


def box_weights(n_in: int, n_out: int) -> np.ndarray:
    """Area weights of a box-filter resize along one axis: (n_out, n_in), rows sum to 1.

    Output pixel i covers the input interval [i s, (i + 1) s), s = n_in / n_out; its weight on
    input pixel j is the overlap of that interval with [j, j + 1), divided by s. Works for any
    ratio, shrinking (area average) or enlarging (each output pixel reads the input pixel(s)
    it lies on).
    """
    step = n_in / n_out
    lo = np.maximum(np.arange(n_out)[:, None] * step, np.arange(n_in)[None])
    hi = np.minimum((np.arange(n_out)[:, None] + 1) * step, np.arange(1, n_in + 1)[None])
    return np.clip(hi - lo, 0.0, None) / step


def resample_crops(maps: np.ndarray, size: int) -> np.ndarray:
    """Box-filter (area-average) resize of crops (N,H,W) (bool or float) -> (N,size,size)
    float32: the fraction of each output pixel covered by the mask. The crop keeps its extent,
    so crop coordinates scale by size / H (and size / W)."""
    maps = np.asarray(maps, dtype=np.float64)
    wy = box_weights(maps.shape[1], size)
    wx = box_weights(maps.shape[2], size)
    return np.matmul(wy, np.matmul(maps, wx.T)).astype(np.float32)
