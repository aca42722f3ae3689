"""SPIN-format Human3.6M npz files (SPIN datasets/preprocess/h36m.py) and the standard protocols.

An npz holds ``imgname`` (N,) like ``images/S9_Directions_1.60457274_000001.jpg``, ``center``
(N,2) original pixels, ``scale`` (N,) box side / 200, ``S`` (N,24,4) pelvis-relative metres +
confidence in SPIN's J24 order, and optionally ``part`` (N,24,3) and ``openpose`` (N,25,3).
``part`` (SPIN's training files) holds 2D keypoints in original-image pixels plus a visibility
flag, in the same J24 order as ``S`` (1 on the 17 Human3.6M joints, 0 elsewhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import read_npz
from jregfix.io.budget import check_numbers

TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")
CAMERAS = ("54138969", "55011271", "58860488", "60457274")
P2_CAMERA = "60457274"

# SPIN's J24 GT order -> H36M-17 regressor row order (SPIN constants.py, preprocess/h36m.py):
# regressor row r is J24 joint H36M17_FROM_J24[r].
H36M17_FROM_J24 = (14, 3, 4, 5, 2, 1, 0, 16, 12, 17, 18, 9, 10, 11, 8, 7, 6)
H36M17_NAMES = (
    "Pelvis",
    "L Hip",
    "L Knee",
    "L Ankle",
    "R Hip",
    "R Knee",
    "R Ankle",
    "Spine",
    "Thorax",
    "Neck/Nose",
    "Head top",
    "L Shoulder",
    "L Elbow",
    "L Wrist",
    "R Shoulder",
    "R Elbow",
    "R Wrist",
)
H36M_TO_J17 = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10, 0, 7, 9)
H36M_TO_J14 = H36M_TO_J17[:14]
J24_TO_J17 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 14, 16, 17)
J24_TO_J14 = J24_TO_J17[:14]

_IMGNAME = re.compile(r"(S\d+)_(.+)\.(\d+)_(\d+)\.\w+$")


@dataclass(frozen=True)
class FrameKey:
    subject: str
    action: str
    camera: str
    frame: int  # 1-based, as in the image name


def parse_imgname(name: str) -> FrameKey:
    """``images/S9_Directions_1.60457274_000001.jpg`` -> FrameKey('S9', 'Directions_1', ...)."""
    m = _IMGNAME.search(str(name).replace("\\", "/").rsplit("/", 1)[-1])
    if m is None:
        raise JregfixError(
            f"image name {name!r} is not of the Human3.6M form "
            "'images/<subject>_<action>.<camera>_<frame>.jpg'"
        )
    return FrameKey(m.group(1), m.group(2), m.group(3), int(m.group(4)))


def action_family(action: str) -> str:
    """'Directions_1' / 'Sitting Down 2' -> 'Directions' / 'SittingDown' (per-action tables)."""
    base = re.sub(r"[ _]?\d+$", "", action)
    return base.replace(" ", "").replace("_", "")


@dataclass
class H36MData:
    """Rows of a SPIN-format Human3.6M file (all arrays share the first dimension N)."""

    imgname: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    S: np.ndarray | None = None
    part: np.ndarray | None = None
    openpose: np.ndarray | None = None
    path: str = ""
    keys: list[FrameKey] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.imgname)

    @property
    def subjects(self) -> np.ndarray:
        return np.array([k.subject for k in self.keys])

    @property
    def cameras(self) -> np.ndarray:
        return np.array([k.camera for k in self.keys])

    @property
    def actions(self) -> np.ndarray:
        return np.array([action_family(k.action) for k in self.keys])

    def joints17(self) -> np.ndarray:
        """(N,17,3) GT joints in the regressor's row order, pelvis-relative metres."""
        if self.S is None:
            raise JregfixError(f"{self.path}: no 3D ground truth ('S') in this file")
        return self.S[:, list(H36M17_FROM_J24), :3]

    def keypoints17(self) -> np.ndarray | None:
        """(N,17,3) 2D keypoints ``part`` in the regressor's row order: x, y in original-image
        pixels, visibility; None when the file has no ``part``."""
        return None if self.part is None else self.part[:, list(H36M17_FROM_J24)]

    def select(self, mask: np.ndarray) -> H36MData:
        idx = np.flatnonzero(mask)

        def pick(a):
            return None if a is None else a[idx]

        return H36MData(
            self.imgname[idx],
            self.center[idx],
            self.scale[idx],
            pick(self.S),
            pick(self.part),
            pick(self.openpose),
            self.path,
            [self.keys[i] for i in idx],
        )


def load_h36m(path: str | Path, require_3d: bool = True) -> H36MData:
    """Read and validate a SPIN-format Human3.6M npz (see module docstring)."""
    path = Path(path)
    arrays = read_npz(path, "Human3.6M npz")
    required = ["imgname", "center", "scale"] + (["S"] if require_3d else [])
    missing = [k for k in required if k not in arrays]
    if missing:
        raise JregfixError(f"{path}: missing key(s) {missing}; found {sorted(arrays)}")
    n = len(arrays["imgname"])
    if n == 0:
        raise JregfixError(f"{path}: the file has no frames")
    expected = {
        "center": (n, 2),
        "scale": (n,),
        "S": (n, 24, 4),
        "part": (n, 24, 3),
        "openpose": (n, 25, 3),
    }
    for key, shape in expected.items():
        if key in arrays and arrays[key].shape != shape:
            raise JregfixError(
                f"{path}: key '{key}' has shape {arrays[key].shape}, expected {shape}"
            )
    for key in ("center", "scale", "S", "part"):
        if key in arrays:
            check_numbers(arrays[key], f"{path}: key '{key}'")
    _check_ranges(path, arrays, require_3d)
    imgname = arrays["imgname"].astype(str)
    names, first, counts = np.unique(imgname, return_index=True, return_counts=True)
    if (counts > 1).any():
        twice = np.flatnonzero(counts > 1)
        raise JregfixError(
            f"{path}: {len(twice)} frame(s) appear more than once, e.g. "
            f"{str(names[twice[0]])!r} (row {first[twice[0]]}); each frame must be "
            "listed once or it would count twice in every mean"
        )
    return H36MData(
        imgname=imgname,
        center=arrays["center"].astype(np.float64),
        scale=arrays["scale"].astype(np.float64),
        S=arrays["S"].astype(np.float64) if "S" in arrays else None,
        part=arrays["part"].astype(np.float64) if "part" in arrays else None,
        openpose=arrays.get("openpose"),
        path=str(path),
        keys=[parse_imgname(x) for x in imgname],
    )


# plausibility limits: a value beyond them is a unit or format mistake, not a pose
MAX_JOINT_M = 100.0  # joints are metres around the pelvis
MAX_PIXELS = 1e5  # image coordinates and box sides, in pixels


def _check_ranges(path: Path, arrays: dict[str, np.ndarray], require_3d: bool) -> None:
    """Units and sign: scale > 0, pixels and metres within sane bounds, not all-zero joints."""

    def refuse(key: str, bad: np.ndarray, why: str) -> None:
        rows = np.flatnonzero(bad.reshape(len(bad), -1).any(1))
        if len(rows):
            raise JregfixError(
                f"{path}: key '{key}' {why} in {len(rows)} row(s), first at row "
                f"{rows[0]}; is it the right file and unit?"
            )

    scale = arrays["scale"].astype(np.float64)
    refuse("scale", ~(scale > 0), "is not positive (the box side / 200)")
    refuse("scale", scale * 200 > MAX_PIXELS, f"gives a box over {MAX_PIXELS:g} px")
    refuse(
        "center",
        np.abs(arrays["center"].astype(np.float64)) > MAX_PIXELS,
        f"is beyond {MAX_PIXELS:g} px",
    )
    if "S" in arrays:
        xyz = arrays["S"][..., :3].astype(np.float64)
        refuse(
            "S",
            np.abs(xyz) > MAX_JOINT_M,
            f"has joints beyond {MAX_JOINT_M:g} m (metres expected; millimetres?)",
        )
        if require_3d and not xyz[:, list(H36M17_FROM_J24)].any():
            raise JregfixError(f"{path}: key 'S' is all zeros: no 3D ground truth in this file")


def protocol_mask(data: H36MData, protocol: str) -> np.ndarray:
    """Rows kept by a protocol: 'p1' all four cameras, 'p2' camera 60457274 only (HMR naming)."""
    if protocol == "p1":
        return np.ones(len(data), dtype=bool)
    if protocol == "p2":
        return data.cameras == P2_CAMERA
    raise JregfixError(f"unknown protocol {protocol!r}; use 'p1' (4 cameras) or 'p2' (60457274)")


def subject_mask(data: H36MData, subjects: list[str] | tuple[str, ...]) -> np.ndarray:
    return np.isin(data.subjects, list(subjects))


def joints17_to_s24(joints17: np.ndarray) -> np.ndarray:
    """(N,17,3) joints in regressor row order -> SPIN's S (N,24,4), pelvis-relative, conf 1."""
    n = len(joints17)
    s = np.zeros((n, 24, 4))
    rel = joints17 - joints17[:, :1]
    s[:, list(H36M17_FROM_J24), :3] = rel
    s[:, list(H36M17_FROM_J24), 3] = 1.0
    return s


def save_h36m(
    path: str | Path,
    imgname,
    center: np.ndarray,
    scale: np.ndarray,
    S: np.ndarray | None = None,
    **extra: np.ndarray,
) -> None:
    """Write a SPIN-format Human3.6M npz (atomic)."""
    from jregfix.io.atomic import save_npz

    arrays = {
        "imgname": np.asarray(imgname).astype(str),
        "center": np.asarray(center, float),
        "scale": np.asarray(scale, float),
        **extra,
    }
    if S is not None:
        arrays["S"] = np.asarray(S, float)
    save_npz(path, compressed=True, **arrays)


def h36m_imgname(subject: str, action: str, camera: str, frame: int) -> str:
    """SPIN's naming: ``images/S9_Directions_1.60457274_000001.jpg`` (frame is 1-based)."""
    return f"images/{subject}_{action.replace(' ', '_')}.{camera}_{frame:06d}.jpg"
