"""Fake Human3.6M-sized JPEGs and a SPIN-format npz for the image-stage benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_fake_h36m(root: Path, n: int, rng: np.random.Generator) -> list[str]:
    """n smooth random 1000x1002 JPEGs under root/images and root/gt.npz; returns imgnames."""
    (root / "images").mkdir()
    names = [f"images/S9_Walking_1.60457274_{5 * i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        small = rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)
        Image.fromarray(small).resize((1000, 1002), Image.Resampling.BICUBIC).save(
            root / name, quality=90
        )
    np.savez(
        root / "gt.npz",
        imgname=np.array(names),
        center=rng.uniform(400, 600, (n, 2)),
        scale=rng.uniform(3.0, 4.5, n),
    )
    return names
