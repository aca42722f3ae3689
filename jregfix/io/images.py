"""Reading dataset images: path resolution, missing-file checks, RGB uint8 decoding.

Human3.6M frames are 1000x1000 (or 1000x1002); an image declaring far more pixels is a
decompression bomb or not a dataset frame, and is refused from its header, before decoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jregfix.errors import JregfixError

MAX_IMAGE_PIXELS = 64_000_000  # 8000x8000: 64 times a Human3.6M frame


def resolve_image(root: str | Path, imgname: str) -> Path:
    """``root / imgname``; if absent, ``root / basename`` (``--images`` given as the images dir)."""
    root = Path(root)
    path = root / imgname
    if path.is_file():
        return path
    alt = root / Path(imgname).name
    return alt if alt.is_file() else path


def check_images(
    root: str | Path,
    imgnames: Sequence[str] | np.ndarray,
    skip_missing: bool = False,
    show: int = 5,
) -> np.ndarray:
    """(N,) bool: which images exist under ``root``.

    Without ``skip_missing``, any missing image raises :class:`JregfixError` naming the first
    ``show`` of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise JregfixError(f"image root {root} is not a directory")
    present = np.array([resolve_image(root, n).is_file() for n in imgnames], dtype=bool)
    if not skip_missing and not present.all():
        missing = [str(n) for n, ok in zip(imgnames, present, strict=True) if not ok]
        raise JregfixError(
            f"{len(missing)} of {len(present)} images missing under {root}, e.g. "
            f"{', '.join(missing[:show])}; fix --images or pass --skip-missing"
        )
    return present


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as RGB uint8 (H,W,3), EXIF orientation applied (as cv2.imread does)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on huge images; our own budget below decides instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise JregfixError(
                        f"{path}: image of {width}x{height} pixels is over the "
                        f"{MAX_IMAGE_PIXELS:,}-pixel budget; not a dataset frame"
                    )
                upright = ImageOps.exif_transpose(im)
                return np.asarray(upright.convert("RGB"))
    except FileNotFoundError:
        raise JregfixError(f"{path}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise JregfixError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise JregfixError(f"{path}: unreadable image ({exc})") from None
