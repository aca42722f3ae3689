"""A synthetic Human3.6M-like world built with the Anny body model, where the truth is known.

Everything the demo needs, written in the formats the real pipeline reads:

* Subjects: Human3.6M names (train S1, S5, S6, S7, S8; test S9, S11, or a prefix of them) with
  Anny phenotypes drawn per subject (gender, age, muscle, weight, height, proportions).
* Poses: sequences from four action families (Walking, Sitting, Reaching, Bending), each a
  smooth function of time with per-sequence amplitude/phase, per-subject style offsets and
  per-frame jitter, clipped to joint limits (:data:`LIMITS`, degrees). Angles become rotations of
  the 24 Anny bones (conventions in :mod:`jregfix.body.anny`: model frame y up, +z forward, +x
  the subject's left; a bone's rotation acts in its parent-posed frame): a limb "swings" towards
  a direction about the axis ``normalize(d x target)`` with d its rest direction, so hip flexion
  moves the thigh forward, knee flexion the foot backward, elbow flexion folds about the hinge
  ``upper x forearm``. Frames are every 5th of a 50 Hz video (dt = 0.1 s), like SPIN's H36M files.
* Cameras: four, on the corners around the capture area like Human3.6M's (azimuth 45 + 90k
  degrees, 4.5-5.5 m from the centre, 1.2-1.8 m high, looking at (0, 1, 0)), pinhole
  f = 1150 px, 1000 x 1000 px images, principal point at the centre. World frame: y up.
* Crops: the projected true mesh's bounding box gives ``center`` (box centre, original px) and
  ``scale = 1.2 max(w, h) / 200``. (SPIN shrinks Human3.6M's loose ground-truth boxes by 0.9; our
  boxes are tight mesh boxes, so we pad by 1.2 as SPIN's 3DPW preprocessing does.)
* Ground truth: Anny's anatomical joints (bone heads; crown vertex for head top) mapped to the 17
  H36M joints, rotated into each camera, pelvis-relative, in SPIN's ``S`` (``h36m_*.npz``).
* Body parameters in SPIN's crop convention (``truth_*.npz``): global orientation in camera
  coordinates and ``cam_t`` such that SPIN's crop camera (f = 5000 res / 224, centre res / 2)
  reproduces the crop. The crop of a pinhole image is itself a pinhole camera (focal
  f res / side, principal point res (c - center) / side + res / 2); no translation makes SPIN's
  long-focal camera equal to it, so ``cam_t`` is SPIN's own estimate: linear least squares of
  the crop reprojection of the 17 joints and every 10th vertex (``estimate_translation``).
* Masks (``silhouettes_train.npz``): the true mesh rendered by the exact crop camera (hard
  silhouette), then corrupted like a detector's: per frame a 1 px dilation, erosion or neither,
  and boundary pixels flipped with probability ``mask_flip``.
* MoSh-like fits (``mosh_train.npz``): true poses with a body shape that misses the subject
  systematically (``mosh_bias`` added to the phenotype): the "standard" regressor
  (``J_standard.npy``) is fitted (:func:`jregfix.stages.fit_regressor.fit_regressor`) to those
  meshes, the "oracle" (``J_oracle.npy``) to the true ones, both on the training subjects.
* Method outputs, error models of different character:
  SPIN-like (``spin_{train,test}.npz``): independent per-frame noise on every rotation, betas
  pulled towards the mean body, camera noise; VIBE-like (``vibe_output.pkl``, joblib, VIBE's
  keys): noise smoothed over a few frames of each track plus a little white noise; MEVA-like
  (``meva_output.pkl``, pickle, MEVA's keys): smoother noise and slightly under-articulated poses
  (body rotations shrunk towards the rest pose). One track per (subject, action, camera) video;
  ``frame_ids`` index the rows of ``h36m_test.npz``.

All randomness comes from one seed through independent streams per purpose, so the same seed
gives the same bytes. :func:`generate_world` writes everything plus ``world.json``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jregfix.body.anny import DEFAULT_PHENOTYPE, PHENOTYPE_RANGE, PHENOTYPES
from jregfix.body.rotations import rotmat_to_axis_angle
from jregfix.errors import JregfixError
from jregfix.geometry.camera import FOCAL_LENGTH, PinholeCamera
from jregfix.io.atomic import atomic_path, save_npz, sha256_file, write_json
from jregfix.io.h36m import CAMERAS, H36M17_FROM_J24, h36m_imgname, joints17_to_s24, save_h36m
from jregfix.io.masks import save_silhouettes
from jregfix.io.regressors import save_regressor
from jregfix.render.silhouette import hard_silhouette

FAMILIES = ("Walking", "Sitting", "Reaching", "Bending")
IMAGE_SIZE = 1000
FOCAL = 1150.0
DT = 0.1  # seconds between stored frames (every 5th frame at 50 Hz)
BOX_PAD = 1.2

LIMITS = {  # degrees, (min, max)
    "hip_flex": (-25, 120), "hip_abd": (-10, 45), "knee": (0, 145), "ankle": (-25, 30),
    "spine_flex": (-20, 60), "spine_twist": (-30, 30), "neck_flex": (-30, 45),
    "sh_flex": (-45, 170), "sh_abd": (-25, 150), "elbow": (0, 150), "root_pitch": (-15, 60),
}
PHENOTYPE_DRAW = {"gender": (0.0, 1.0), "age": (0.7, 0.9), "muscle": (0.3, 0.8),
                  "weight": (0.25, 0.8), "height": (0.2, 0.6), "proportions": (0.3, 0.7)}


@dataclass
class WorldConfig:
    """Size and error models of a world (all noise std in radians / phenotype units / metres)."""

    train_subjects: tuple[str, ...] = ("S1", "S5", "S6", "S7", "S8")
    test_subjects: tuple[str, ...] = ("S9", "S11")
    frames: int = 8  # stored frames per subject, split over the action families, x 4 cameras
    crop_size: int = 96  # px; masks are stored at this size (SPIN: 224)
    seed: int = 0
    mosh_bias: dict[str, float] = field(default_factory=lambda: {
        "height": -0.12, "weight": 0.2, "proportions": 0.25, "muscle": -0.15})
    mask_flip: float = 0.15
    spin_pose_std: float = 0.07
    spin_root_std: float = 0.03
    spin_shape_pull: float = 0.5  # predicted phenotype offset = pull * true + noise
    spin_shape_std: float = 0.04
    spin_cam_std: float = 0.05  # relative depth noise; tx, ty get 0.3 x this in metres
    vibe_pose_std: float = 0.06
    vibe_smooth: float = 2.0  # frames (Gaussian sigma of the temporal filter)
    meva_pose_std: float = 0.06
    meva_smooth: float = 5.0
    meva_shrink: float = 0.9
    regressor_support: str = "knn:128"
    chunk_size: int = 128

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(self.train_subjects) + tuple(self.test_subjects)

    def validate(self) -> None:
        if self.frames < 1 or self.crop_size < 32:
            raise JregfixError(f"world: frames >= 1 and crop size >= 32 needed, got "
                               f"{self.frames} and {self.crop_size}")
        if not self.train_subjects or not self.test_subjects:
            raise JregfixError("world: need at least one train and one test subject")
        if set(self.train_subjects) & set(self.test_subjects):
            raise JregfixError("world: train and test subjects overlap")
        unknown = set(self.mosh_bias) - set(PHENOTYPES)
        if unknown:
            raise JregfixError(f"world: unknown phenotype(s) in mosh_bias: {sorted(unknown)}")


# ----------------------------------------------------------------------------- rotations


def _rotvec(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, float)
    n = np.linalg.norm(axis)
    if n < 1e-12:
        return np.eye(3)
    return Rotation.from_rotvec(axis / n * angle_rad).as_matrix()


def swing(direction: np.ndarray, target: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation turning a limb of rest direction ``direction`` towards ``target`` by degrees."""
    return _rotvec(np.cross(direction, target), np.deg2rad(degrees))


def axis_rot(axis: str, degrees: float) -> np.ndarray:
    return Rotation.from_euler(axis, degrees, degrees=True).as_matrix()


@dataclass(frozen=True)
class Skeleton:
    """Rest directions of the posable bones (model frame) and the rest elbow bends (deg)."""

    names: tuple[str, ...]
    direction: dict[str, np.ndarray]
    elbow_axis: dict[str, np.ndarray]
    elbow_rest: dict[str, float]

    @classmethod
    def from_body(cls, body) -> Skeleton:
        eye = torch.eye(3, dtype=body.template.dtype).repeat(1, body.num_joints, 1, 1)
        with torch.no_grad():
            heads = body(eye, torch.zeros(1, body.num_betas, dtype=body.template.dtype))
        heads = heads.bone_heads[0].double().numpy()
        index = {n: i for i, n in enumerate(body.all_bone_names)}
        names = tuple(body.bone_names)
        children = {"upperleg01": "lowerleg01", "lowerleg01": "foot",
                    "upperarm01": "lowerarm01", "lowerarm01": "wrist"}
        direction, axis, rest = {}, {}, {}
        for side in ("L", "R"):
            for bone, child in children.items():
                d = heads[index[f"{child}.{side}"]] - heads[index[f"{bone}.{side}"]]
                direction[f"{bone}.{side}"] = d / np.linalg.norm(d)
            up, fore = direction[f"upperarm01.{side}"], direction[f"lowerarm01.{side}"]
            axis[side] = np.cross(up, fore)
            rest[side] = float(np.degrees(np.arccos(np.clip(up @ fore, -1, 1))))
        return cls(names, direction, axis, rest)


def family_angles(family: str, t: float, amp: float, phase: float) -> dict[str, float]:
    """Joint angles (degrees) of an action family at time t (s); L/R suffixes per side."""
    s = np.sin(2 * np.pi * t / 1.1 + phase)
    c = np.cos(2 * np.pi * t / 1.1 + phase)
    slow = np.sin(2 * np.pi * t / 3.0 + phase)
    a: dict[str, float] = {}
    if family == "Walking":
        a |= {"hip_flex.L": 8 + 25 * amp * s, "hip_flex.R": 8 - 25 * amp * s,
              "knee.L": 15 + 40 * amp * max(0.0, c), "knee.R": 15 + 40 * amp * max(0.0, -c),
              "sh_flex.L": -18 * amp * s, "sh_flex.R": 18 * amp * s, "elbow.L": 20 + 8 * s,
              "elbow.R": 20 - 8 * s, "sh_abd.L": 8, "sh_abd.R": 8, "spine_flex": 4,
              "spine_twist": 8 * amp * s, "root_pitch": 3, "height": 0.95}
    elif family == "Sitting":
        a |= {"hip_flex.L": 88 + 6 * slow, "hip_flex.R": 85 - 4 * slow, "knee.L": 90 + 10 * slow,
              "knee.R": 95 - 8 * slow, "hip_abd.L": 10, "hip_abd.R": 8,
              "sh_flex.L": 25 + 20 * amp * s, "sh_flex.R": 30 + 15 * amp * slow,
              "elbow.L": 60 + 25 * amp * s, "elbow.R": 70 - 20 * slow, "sh_abd.L": 12,
              "sh_abd.R": 12, "spine_flex": 12 + 10 * amp * slow, "neck_flex": 10,
              "root_pitch": -5, "height": 0.5}
    elif family == "Reaching":
        a |= {"hip_flex.L": 6, "hip_flex.R": 4, "knee.L": 8, "knee.R": 10,
              "sh_flex.R": 75 + 55 * amp * s, "sh_abd.R": 20 + 25 * amp * c,
              "elbow.R": 25 + 20 * amp * c, "sh_flex.L": 10 + 10 * slow, "sh_abd.L": 10,
              "elbow.L": 15, "spine_twist": -12 * amp * s, "spine_flex": 3,
              "neck_flex": -10 * amp * s, "root_pitch": 0, "height": 0.95}
    elif family == "Bending":
        b = 35 + 25 * amp * s
        a |= {"root_pitch": 0.6 * b, "hip_flex.L": 0.6 * b + 8, "hip_flex.R": 0.6 * b + 5,
              "knee.L": 12 + 0.4 * b, "knee.R": 15 + 0.35 * b, "spine_flex": 0.5 * b,
              "sh_flex.L": 35 + 0.7 * b, "sh_flex.R": 30 + 0.8 * b, "elbow.L": 20 + 10 * c,
              "elbow.R": 25, "sh_abd.L": 10, "sh_abd.R": 10, "neck_flex": -15,
              "height": 0.9 - 0.004 * b}
    else:
        raise JregfixError(f"unknown action family {family!r}; known: {FAMILIES}")
    return a


def clip_angles(angles: dict[str, float]) -> dict[str, float]:
    """Clip every angle to its joint limit (:data:`LIMITS`)."""
    out = {}
    for key, value in angles.items():
        limit = LIMITS.get(key.split(".")[0])
        out[key] = float(np.clip(value, *limit)) if limit else float(value)
    return out


def body_rotations(skel: Skeleton, angles: dict[str, float]) -> np.ndarray:
    """Angles -> (J, 3, 3) bone rotations (root = identity; the caller orients the body)."""
    rot = {n: np.eye(3) for n in skel.names}
    g = angles.get
    x, y, z = np.eye(3)
    for i in range(1, 5):  # spine04..spine01 share the trunk flexion and twist
        rot[skel.names[1 + i]] = axis_rot("x", g("spine_flex", 0) / 4) @ axis_rot(
            "y", g("spine_twist", 0) / 4)
    for neck in ("neck01", "neck02", "neck03"):
        rot[neck] = axis_rot("x", g("neck_flex", 0) / 3)
    for side, sign in (("L", 1.0), ("R", -1.0)):
        d = skel.direction
        thigh, shin = d[f"upperleg01.{side}"], d[f"lowerleg01.{side}"]
        rot[f"upperleg01.{side}"] = swing(thigh, z, g(f"hip_flex.{side}", 0)) @ swing(
            thigh, sign * x, g(f"hip_abd.{side}", 0))
        rot[f"lowerleg01.{side}"] = swing(shin, -z, g(f"knee.{side}", 0))
        rot[f"foot.{side}"] = axis_rot("x", g(f"ankle.{side}", 0))
        arm = d[f"upperarm01.{side}"]
        rot[f"upperarm01.{side}"] = swing(arm, z, g(f"sh_flex.{side}", 0)) @ swing(
            arm, y, g(f"sh_abd.{side}", 0))
        bend = g(f"elbow.{side}", 0) - skel.elbow_rest[side]
        rot[f"lowerarm01.{side}"] = _rotvec(skel.elbow_axis[side], np.deg2rad(bend))
    return np.stack([rot[n] for n in skel.names])


# ----------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class Camera:
    """World -> camera extrinsics (x right, y down, z forward) and pinhole intrinsics."""

    name: str
    rotation: np.ndarray  # (3, 3) R_cw
    translation: np.ndarray  # (3,) t_cw
    focal: float = FOCAL
    center: tuple[float, float] = (IMAGE_SIZE / 2, IMAGE_SIZE / 2)


def make_cameras(rng: np.random.Generator) -> list[Camera]:
    """Four cameras on the corners around the capture area, looking at (0, 1, 0)."""
    cams = []
    target = np.array([0.0, 1.0, 0.0])
    for k, name in enumerate(CAMERAS):
        az = np.deg2rad(45 + 90 * k + rng.uniform(-8, 8))
        dist, height = rng.uniform(4.5, 5.5), rng.uniform(1.2, 1.8)
        pos = np.array([dist * np.sin(az), height, dist * np.cos(az)])
        fwd = (target - pos) / np.linalg.norm(target - pos)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        rot = np.stack([right, down, fwd])
        cams.append(Camera(name, rot, -rot @ pos))
    return cams


def estimate_translation(points: np.ndarray, pixels: np.ndarray, focal: float,
                         res: int) -> np.ndarray:
    """SPIN-style cam_t: least squares t with focal*(p + t)_xy/(p + t)_z + res/2 = pixels.

    points (P, 3) camera-oriented, root-relative; pixels (P, 2) crop px. Per point two rows
    [f, 0, c - u] t = (u - c) Z - f X (and the same for y).
    """
    c = res / 2.0
    a = np.zeros((2 * len(points), 3))
    b = np.zeros(2 * len(points))
    a[0::2, 0] = focal
    a[1::2, 1] = focal
    a[0::2, 2] = c - pixels[:, 0]
    a[1::2, 2] = c - pixels[:, 1]
    b[0::2] = (pixels[:, 0] - c) * points[:, 2] - focal * points[:, 0]
    b[1::2] = (pixels[:, 1] - c) * points[:, 2] - focal * points[:, 1]
    return np.linalg.lstsq(a, b, rcond=None)[0]


# ----------------------------------------------------------------------------- body


def pose_body(body, rotmat: np.ndarray, betas: np.ndarray,
              chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,J,3,3), (N,6) -> vertices (N,V,3) float32 and H36M-17 joints (N,17,3) float64."""
    dtype = body.template.dtype
    verts, joints = [], []
    with torch.no_grad():
        for a in range(0, len(rotmat), chunk):
            out = body(torch.as_tensor(rotmat[a:a + chunk], dtype=dtype),
                       torch.as_tensor(betas[a:a + chunk], dtype=dtype))
            verts.append(out.vertices.float().numpy())
            joints.append(body.h36m_joints(out).double().numpy())
    return np.concatenate(verts), np.concatenate(joints)


def clip_betas(betas: np.ndarray) -> np.ndarray:
    """Keep phenotype offsets inside Anny's ranges (beyond them Anny clamps anyway)."""
    base = np.asarray(DEFAULT_PHENOTYPE)
    lo = np.array([PHENOTYPE_RANGE[k][0] for k in PHENOTYPES]) - base
    hi = np.array([PHENOTYPE_RANGE[k][1] for k in PHENOTYPES]) - base
    return np.clip(betas, lo, hi)


# ----------------------------------------------------------------------------- world


@dataclass
class Frames:
    """One row per (subject, action, camera, frame), the row order of the H36M files."""

    subject: list[str]
    action: list[str]
    camera: list[int]
    frame: list[int]  # 1-based frame number in the image name
    pose_index: list[int]  # row of the per-(subject, time) pose arrays
    imgname: list[str]


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("subjects", "cameras", "poses", "masks", "spin", "vibe", "meva")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, children, strict=True)}


def _sequences(config: WorldConfig) -> list[tuple[str, int]]:
    """(action name, frames) per family for one subject: ``frames`` split over the families."""
    k = min(len(FAMILIES), config.frames)
    counts = [config.frames // k + (i < config.frames % k) for i in range(k)]
    return [(f"{FAMILIES[i]}_1", counts[i]) for i in range(k)]


def _make_poses(config: WorldConfig, skel: Skeleton, rng: np.random.Generator):
    """Per (subject, action, time): bone rotations (with root orientation in the world),
    world root position; and the table of (subject, action, frame) keys."""
    rots, positions, keys = [], [], []
    for subject in config.subjects:
        style = {k: rng.normal(0, 4) for k in ("sh_abd", "elbow", "hip_flex", "knee")}
        for action, count in _sequences(config):
            family = action.split("_")[0]
            amp, phase = rng.uniform(0.8, 1.2), rng.uniform(0, 2 * np.pi)
            yaw0, turn = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.15)
            origin = np.array([rng.uniform(-0.3, 0.3), 0.0, rng.uniform(-0.3, 0.3)])
            for k in range(count):
                t = k * DT
                raw = family_angles(family, t, amp, phase)
                for key in [k for k in raw if k != "height"]:
                    base = key.split(".")[0]
                    raw[key] += style.get(base, 0.0) + rng.normal(0, 3.0)
                ang = clip_angles(raw)
                rot = body_rotations(skel, ang)
                rot[0] = axis_rot("y", np.degrees(yaw0 + turn * t)) @ axis_rot(
                    "x", ang.get("root_pitch", 0.0))
                rots.append(rot)
                positions.append(origin + [0.0, ang["height"], 0.0])
                keys.append((subject, action, 1 + 5 * k))
    return np.stack(rots), np.stack(positions), keys


def _phenotypes(config: WorldConfig, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    out = {}
    for subject in config.subjects:
        out[subject] = {k: round(float(rng.uniform(*PHENOTYPE_DRAW[k])), 4) for k in PHENOTYPES}
    return out


def _betas_of(phenotype: dict[str, float], bias: dict[str, float] | None = None) -> np.ndarray:
    values = np.array([phenotype[k] + (bias or {}).get(k, 0.0) for k in PHENOTYPES])
    return clip_betas(values - np.asarray(DEFAULT_PHENOTYPE))


def _noisy_rotations(rot: np.ndarray, body_noise: np.ndarray, root_noise: np.ndarray,
                     shrink: float = 1.0) -> np.ndarray:
    """rot (N,J,3,3) camera-frame params; body noise (N,J-1,3) local, root noise (N,3) in the
    camera frame; ``shrink`` scales body rotations towards the rest pose first."""
    out = rot.copy()
    if shrink != 1.0:
        aa = Rotation.from_matrix(rot[:, 1:].reshape(-1, 3, 3)).as_rotvec() * shrink
        out[:, 1:] = Rotation.from_rotvec(aa).as_matrix().reshape(rot[:, 1:].shape)
    n, j = rot.shape[:2]
    local = Rotation.from_rotvec(body_noise.reshape(-1, 3)).as_matrix().reshape(n, j - 1, 3, 3)
    out[:, 1:] = out[:, 1:] @ local
    out[:, 0] = Rotation.from_rotvec(root_noise).as_matrix() @ out[:, 0]
    return out


def _smoothed_noise(rng, tracks: list[np.ndarray], shape: tuple[int, ...], std: float,
                    sigma: float) -> np.ndarray:
    """Stationary Gaussian noise, smoothed in time within each track, marginal std ``std``.

    White noise is drawn over the track padded by 4 sigma on both sides, filtered, and the
    middle kept, so short tracks are as noisy as long ones; the filter's gain on white noise,
    sqrt(sum k^2) for its kernel k, is divided out.
    """
    pad = int(4 * sigma + 1) if sigma > 0 else 0
    gain = 1.0
    if sigma > 0:
        impulse = np.zeros(2 * pad + 1)
        impulse[pad] = 1.0
        gain = float(np.sqrt((ndimage.gaussian_filter1d(impulse, sigma) ** 2).sum()))
    out = np.zeros((sum(len(t) for t in tracks), *shape))
    for rows in tracks:
        white = rng.normal(0, 1, (len(rows) + 2 * pad, *shape))
        if sigma > 0:
            white = ndimage.gaussian_filter1d(white, sigma, axis=0) / gain
        out[rows] = white[pad:pad + len(rows)] * std
    return out


def corrupt_masks(masks: np.ndarray, rng: np.random.Generator, flip: float) -> np.ndarray:
    """Per frame: 1 px dilation (p = 1/4), erosion (1/4) or neither, then boundary pixels
    flipped with probability ``flip``."""
    out = np.empty_like(masks)
    for i, m in enumerate(masks):
        op = rng.integers(4)
        if op == 1:
            m = ndimage.binary_dilation(m)
        elif op == 2:
            m = ndimage.binary_erosion(m)
        band = ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)
        out[i] = m ^ (band & (rng.random(m.shape) < flip))
    return out


def _params_arrays(rot: np.ndarray, betas: np.ndarray, cam_t: np.ndarray, crop: int,
                   imgname: list[str]) -> dict[str, np.ndarray]:
    aa = rotmat_to_axis_angle(torch.from_numpy(rot)).reshape(len(rot), -1).numpy()
    s = 2 * FOCAL_LENGTH / (224 * cam_t[:, 2])
    return {"pose": aa, "pred_rotmat": rot, "betas": betas, "cam_t": cam_t,
            "camera": np.stack([s, cam_t[:, 0], cam_t[:, 1]], 1),
            "imgname": np.asarray(imgname), "crop_size": np.int64(crop)}


def _track_file(path: Path, params: dict, rows_by_track: list[np.ndarray], center, scale,
                use_joblib: bool) -> None:
    """VIBE/MEVA demo output: {track_id: {pred_cam, orig_cam, pose, betas, bboxes, frame_ids,
    joints2d}} (as VIBE's/MEVA's demos write them; no 'verts': evaluate poses the body)."""
    tracks = {}
    for tid, rows in enumerate(rows_by_track):
        side = 200 * scale[rows]
        cam = params["camera"][rows]
        sx = cam[:, 0] * side / IMAGE_SIZE
        tx = (center[rows, 0] - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2) / sx + cam[:, 1]
        ty = (center[rows, 1] - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2) / sx + cam[:, 2]
        tracks[tid] = {
            "pred_cam": cam.astype(np.float32),
            "orig_cam": np.stack([sx, sx, tx, ty], 1).astype(np.float32),
            "pose": params["pose"][rows].astype(np.float32),
            "betas": params["betas"][rows].astype(np.float32),
            "bboxes": np.stack([center[rows, 0], center[rows, 1], side, side], 1)
            .astype(np.float32),
            "joints2d": None,
            "frame_ids": rows.astype(np.int64),
        }
    with atomic_path(path) as tmp:
        if use_joblib:
            import joblib

            joblib.dump(tracks, tmp)
        else:
            with open(tmp, "wb") as fh:
                pickle.dump(tracks, fh, protocol=4)


def rest_joint_candidates(body, support: str) -> list[np.ndarray]:
    """Support of each regressor row: template vertices near the rest joint centre."""
    from jregfix.stages.fit_regressor import candidate_rows

    like = {"dtype": body.template.dtype, "device": body.template.device}
    eye = torch.eye(3, **like).repeat(1, body.num_joints, 1, 1)
    with torch.no_grad():
        out = body(eye, torch.zeros(1, body.num_betas, **like))
        joints = body.h36m_joints(out)[0].double().cpu().numpy()
    return candidate_rows(body.template.double().cpu().numpy(), joints, support)


def fit_world_regressor(body, meshes: np.ndarray, joints: np.ndarray, out: Path,
                        config: WorldConfig, params_stage: str, note: str) -> dict:
    """NNLS fit (fit-regressor's solver) of meshes (N,V,3) to joints (N,17,3); writes ``out``."""
    from jregfix.stages.fit_regressor import ArrayMeshes, FitConfig, fit_regressor

    fit_config = FitConfig(support=config.regressor_support, chunk_size=config.chunk_size)
    candidates = rest_joint_candidates(body, config.regressor_support)
    sol, support = fit_regressor(ArrayMeshes(meshes), joints, body.template.double().numpy(),
                                 fit_config, candidates=candidates)
    diag = sol.diagnostics
    save_regressor(out, sol.regressor, {
        "stage": "world", "params_stage": params_stage, "description": note,
        "subjects": list(config.train_subjects),  # read by evaluate's training-data flag
        "config": asdict(fit_config), "frames": diag["frames"],
        "rms_mm_all_joints": diag["rms_mm_all_joints"], "converged": diag["converged"],
        "support_locations": support.source})
    return {"rms_mm": diag["rms_mm_all_joints"], "frames": diag["frames"]}


def generate_world(out_dir: str | Path, config: WorldConfig | None = None, body=None,
                   say: Callable[[str], None] | None = None) -> dict:
    """Write the world's files into ``out_dir`` (see the module docstring); returns world.json.

    ``body``: an :class:`~jregfix.body.anny.AnnyBody` (built with default options if None).
    """
    config = config or WorldConfig()
    config.validate()
    say = say or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if body is None:
        from jregfix.body.anny import AnnyBody

        body = AnnyBody(say=say)
    rng = _streams(config.seed)
    skel = Skeleton.from_body(body)
    phenotypes = _phenotypes(config, rng["subjects"])
    cameras = make_cameras(rng["cameras"])
    rots, positions, keys = _make_poses(config, skel, rng["poses"])
    n_poses = len(keys)
    subj_of_pose = np.array([k[0] for k in keys])
    true_betas = np.stack([_betas_of(phenotypes[s]) for s in subj_of_pose])
    mosh_betas = np.stack([_betas_of(phenotypes[s], config.mosh_bias) for s in subj_of_pose])

    say(f"posing {n_poses} bodies x 4 cameras")
    verts_w, joints_w = pose_body(body, rots, true_betas, config.chunk_size)
    verts_w -= joints_w[:, :1].astype(np.float32)  # pelvis at the origin (it is, up to float)
    joints_rel = joints_w - joints_w[:, :1]

    # Rows: subject-major, then action, camera, frame (SPIN files are sorted by image name).
    rows = []
    for p, (subject, action, frame) in enumerate(keys):
        for c in range(len(cameras)):
            rows.append((subject, action, c, frame, p))
    rows.sort(key=lambda r: (config.subjects.index(r[0]), r[1], r[2], r[3]))
    frames = Frames(*map(list, zip(*rows, strict=True)),
                    imgname=[h36m_imgname(s, a, CAMERAS[c], f) for s, a, c, f, _ in rows])
    pidx = np.array(frames.pose_index)
    cidx = np.array(frames.camera)
    n = len(rows)
    r_cw = np.stack([cameras[c].rotation for c in cidx])
    t_cw = np.stack([cameras[c].translation for c in cidx])
    orient = r_cw @ rots[pidx, 0]  # global orientation in camera coordinates
    trans = np.einsum("nij,nj->ni", r_cw, positions[pidx]) + t_cw  # pelvis in camera coords
    cam_rot = rots[pidx].copy()
    cam_rot[:, 0] = orient
    # Root-relative meshes and joints, camera-oriented: R_cw (R_root X) for X in the world mesh.
    joints_c = np.einsum("nij,nkj->nki", r_cw, joints_rel[pidx])

    size = config.crop_size
    center = np.zeros((n, 2))
    scale = np.zeros(n)
    cam_t = np.zeros((n, 3))
    part = np.zeros((n, 24, 3))
    masks = np.zeros((n, size, size), dtype=bool)
    spin_focal = FOCAL_LENGTH * size / 224
    say(f"cropping and rendering {n} frames at {size} px")
    for a in range(0, n, config.chunk_size):
        b = min(a + config.chunk_size, n)
        v = np.einsum("nij,nvj->nvi", r_cw[a:b], verts_w[pidx[a:b]].astype(np.float64))
        v += trans[a:b, None]
        pix = FOCAL * v[..., :2] / v[..., 2:] + IMAGE_SIZE / 2
        lo, hi = pix.min(1), pix.max(1)
        center[a:b] = (lo + hi) / 2
        side = BOX_PAD * (hi - lo).max(1)
        scale[a:b] = side / 200
        jc = joints_c[a:b] + trans[a:b, None]
        jpix = FOCAL * jc[..., :2] / jc[..., 2:] + IMAGE_SIZE / 2
        part[a:b, list(H36M17_FROM_J24), :2] = jpix
        part[a:b, list(H36M17_FROM_J24), 2] = 1.0
        # The crop of the pinhole image is a pinhole camera: focal f*size/side, shifted centre.
        fx = FOCAL * size / side
        cx = size * (IMAGE_SIZE / 2 - center[a:b, 0]) / side + size / 2
        cy = size * (IMAGE_SIZE / 2 - center[a:b, 1]) / side + size / 2
        crop_cam = PinholeCamera.from_intrinsics(torch.from_numpy(fx), torch.from_numpy(fx),
                                                 torch.from_numpy(cx), torch.from_numpy(cy),
                                                 dtype=torch.float64)
        vt = torch.from_numpy(v)
        masks[a:b] = hard_silhouette(vt, body.faces, crop_cam, size).numpy()
        for i in range(b - a):  # SPIN-style translation for the crop camera
            pts = np.concatenate([joints_c[a + i], v[i, ::10] - trans[a + i]])
            crop_px = np.concatenate([jpix[i], pix[i, ::10]])
            crop_px = size * (crop_px - center[a + i]) / side[i] + size / 2
            cam_t[a + i] = estimate_translation(pts, crop_px, spin_focal, size)
    del verts_w

    s24 = joints17_to_s24(joints_c)
    subj = np.array(frames.subject)
    train = np.isin(subj, config.train_subjects)
    test = ~train
    imgname = np.array(frames.imgname)
    files = {}

    def write_gt(name, sel):
        save_h36m(out_dir / name, imgname[sel], center[sel], scale[sel], s24[sel],
                  part=part[sel])
        files[name] = out_dir / name

    write_gt("h36m_train.npz", train)
    write_gt("h36m_test.npz", test)
    true_b = true_betas[pidx]
    for split, sel in (("train", train), ("test", test)):
        name = f"truth_{split}.npz"
        save_npz(out_dir / name, **_params_arrays(cam_rot[sel], true_b[sel], cam_t[sel], size,
                                                  list(imgname[sel])))
        files[name] = out_dir / name
    name = "mosh_train.npz"
    save_npz(out_dir / name, **_params_arrays(cam_rot[train], mosh_betas[pidx][train],
                                              cam_t[train], size, list(imgname[train])))
    files[name] = out_dir / name

    noisy_masks = corrupt_masks(masks, rng["masks"], config.mask_flip)
    for split, sel in (("train", train), ("test", test)):
        name = f"silhouettes_{split}.npz"
        save_silhouettes(out_dir / name, noisy_masks[sel], np.full(sel.sum(), 0.99),
                         np.ones(sel.sum(), bool), imgname[sel],
                         clean_iou=_iou(noisy_masks[sel], masks[sel]))
        files[name] = out_dir / name

    # SPIN-like: independent per-frame errors.
    r = rng["spin"]
    spin_rot = _noisy_rotations(cam_rot, r.normal(0, config.spin_pose_std, (n, 23, 3)),
                                r.normal(0, config.spin_root_std, (n, 3)))
    spin_b = clip_betas(config.spin_shape_pull * true_b
                        + r.normal(0, config.spin_shape_std, true_b.shape))
    spin_t = cam_t.copy()
    spin_t[:, 2] *= np.exp(r.normal(0, config.spin_cam_std, n))
    spin_t[:, :2] += r.normal(0, 0.3 * config.spin_cam_std, (n, 2))
    spin = _params_arrays(spin_rot, spin_b, spin_t, size, list(imgname))
    for split, sel in (("train", train), ("test", test)):
        name = f"spin_{split}.npz"
        save_npz(out_dir / name, **{k: (v[sel] if np.ndim(v) else v) for k, v in spin.items()})
        files[name] = out_dir / name

    # VIBE-like / MEVA-like on the test videos: temporally smoothed errors.
    test_rows = np.flatnonzero(test)
    video = [(frames.subject[i], frames.action[i], frames.camera[i]) for i in test_rows]
    tracks = [np.array([j for j, v in enumerate(video) if v == key])
              for key in dict.fromkeys(video)]
    cam_test, b_test = cam_rot[test], true_b[test]
    for method, std, sigma, shrink, use_joblib in (
            ("vibe", config.vibe_pose_std, config.vibe_smooth, 1.0, True),
            ("meva", config.meva_pose_std, config.meva_smooth, config.meva_shrink, False)):
        r = rng[method]
        body_noise = _smoothed_noise(r, tracks, (23, 3), std, sigma)
        body_noise += r.normal(0, 0.25 * std, body_noise.shape)
        root_noise = _smoothed_noise(r, tracks, (3,), 0.5 * std, sigma)
        rot_m = _noisy_rotations(cam_test, body_noise, root_noise, shrink)
        per_track = np.zeros_like(b_test)
        for rows_t in tracks:
            per_track[rows_t] = r.normal(0, config.spin_shape_std, 6)
        b_m = clip_betas(config.spin_shape_pull * b_test + per_track)
        t_m = cam_t[test].copy()
        t_m[:, 2] *= np.exp(_smoothed_noise(r, tracks, (), config.spin_cam_std, sigma))
        params = _params_arrays(rot_m, b_m, t_m, size, list(imgname[test]))
        name = f"{method}_output.pkl"
        _track_file(out_dir / name, params, tracks, center[test], scale[test], use_joblib)
        files[name] = out_dir / name

    say("fitting the standard (MoSh-like) and oracle regressors")
    tr = np.flatnonzero(train)
    regs = {}
    for name, betas_w, stage, note in (
            ("J_standard.npy", mosh_betas, "mosh",
             "standard: fitted to MoSh-like meshes (true poses, biased body shape)"),
            ("J_oracle.npy", true_betas, "truth", "oracle: fitted to the true meshes")):
        uniq = np.unique(pidx[tr])
        v_pose, _ = pose_body(body, rots[uniq], betas_w[uniq], config.chunk_size)
        where = np.searchsorted(uniq, pidx[tr])
        meshes = np.einsum("nij,nvj->nvi", r_cw[tr].astype(np.float32), v_pose[where])
        regs[name] = fit_world_regressor(body, meshes, joints_c[tr], out_dir / name, config,
                                         stage, note)
        files[name] = out_dir / name
        del v_pose, meshes

    doc = {
        "description": "synthetic Human3.6M-like world (Anny body model); see "
                       "jregfix.stages.world",
        "config": asdict(config),
        "phenotypes": phenotypes,
        "cameras": {c.name: {"R_cw": c.rotation.tolist(), "t_cw": c.translation.tolist(),
                             "focal": c.focal, "center": list(c.center),
                             "image_size": [IMAGE_SIZE, IMAGE_SIZE]} for c in cameras},
        "frames": {"train": int(train.sum()), "test": int(test.sum()),
                   "poses_per_subject": config.frames, "cameras": len(cameras)},
        "crop": {"scale": f"{BOX_PAD} * max(w, h) / 200 of the projected mesh box",
                 "mask_size": size, "spin_focal": spin_focal},
        "mask_iou_vs_clean": float(_iou(noisy_masks, masks).mean()),
        "regressors": regs,
        "files": {k: {"sha256": sha256_file(p)} for k, p in sorted(files.items())},
    }
    write_json(out_dir / "world.json", doc)
    return doc


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------- demo


DEMO_SIZES = {
    # train/test subjects, poses per subject, refine iterations and batch
    "quick": {"train": ("S1", "S5"), "test": ("S9",), "frames": 4, "iters": 20, "batch": 16},
    "default": {"train": ("S1", "S5", "S6", "S7", "S8"), "test": ("S9", "S11"), "frames": 8,
                "iters": 40, "batch": 16},
}
METHOD_FILES = (("SPIN-like", "spin", "spin_test.npz"), ("VIBE-like", "vibe", "vibe_output.pkl"),
                ("MEVA-like", "meva", "meva_output.pkl"))


def demo_world_config(size: str = "default", frames: int | None = None,
                      seed: int = 0) -> WorldConfig:
    s = DEMO_SIZES[size]
    return WorldConfig(train_subjects=s["train"], test_subjects=s["test"],
                       frames=frames or s["frames"], seed=seed)


def demo_run_config(world_dir: str | Path, run_dir: str | Path, world: WorldConfig,
                    size: str = "default") -> dict:
    """The `run` config of the demo: given init and masks from the world, Table I columns
    standard / J_spin / J_opt / oracle, rows SPIN-like / VIBE-like / MEVA-like."""
    w = Path(world_dir).resolve()
    s = DEMO_SIZES[size]
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "seed": world.seed,
        "body": {"model": "anny"},
        "gt": {"train": str(w / "h36m_train.npz"), "test": str(w / "h36m_test.npz")},
        "init": {"given": str(w / "spin_train.npz")},
        "silhouettes": {"given": str(w / "silhouettes_train.npz")},
        "fit_regressor": {"support": world.regressor_support, "chunk_size": world.chunk_size},
        # The chamfer boundary loss costs less than SoftRas on Anny's 27k faces (1.7x per
        # iteration on an idle 2-core CPU, far more when the CPU is shared; see
        # benchmarks/bench_demo.py) and keeps the demo inside its time budget. Set
        # "silhouette_loss": "soft" in run_config.json for the paper's loss.
        "refine": {"iters": s["iters"], "batch_size": s["batch"], "image_size": world.crop_size,
                   "silhouette_loss": "chamfer"},
        # the synthetic VIBE/MEVA-like tracks number GT rows, not video frames
        "evaluate": {"joints": 17, "frame_ids": "rows",
                     "methods": [{"label": label, "method": m, "path": str(w / f)}
                                 for label, m, f in METHOD_FILES],
                     "regressors": {"standard": str(w / "J_standard.npy"),
                                    "oracle": str(w / "J_oracle.npy")}},
        "figures": {"params": str(w / "truth_test.npz")},
    }


def world_is_current(out_dir: str | Path, config: WorldConfig) -> bool:
    """True when ``out_dir/world.json`` was written for this config and no file has changed."""
    import json

    path = Path(out_dir) / "world.json"
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if doc.get("config") != json.loads(json.dumps(asdict(config))):
        return False
    files = doc.get("files", {})
    return bool(files) and all((Path(out_dir) / k).is_file()
                               and sha256_file(Path(out_dir) / k) == v["sha256"]
                               for k, v in files.items())
