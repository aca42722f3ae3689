"""Motion of the synthetic world: action families of smooth joint angles on Anny's skeleton.

Poses come from four action families (Walking, Sitting, Reaching, Bending), each a smooth
function of time with per-sequence amplitude and phase, per-subject style offsets and per-frame
jitter, clipped to joint limits (:data:`LIMITS`, degrees). Angles become rotations of the 24 Anny
bones (conventions in :mod:`jregfix.body.anny`: model frame y up, +z forward, +x the subject's
left; a bone's rotation acts in its parent-posed frame): a limb "swings" towards a direction
about the axis ``normalize(d x target)`` with d its rest direction, so hip flexion moves the
thigh forward, knee flexion the foot backward, and elbow flexion folds about the hinge
``upper x forearm``. Frames are every 5th of a 50 Hz video (:data:`DT` = 0.1 s), like SPIN's
Human3.6M files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from jregfix.errors import JregfixError

FAMILIES = ("Walking", "Sitting", "Reaching", "Bending")
DT = 0.1  # seconds between stored frames (every 5th frame at 50 Hz)

LIMITS = {  # degrees, (min, max)
    "hip_flex": (-25, 120),
    "hip_abd": (-10, 45),
    "knee": (0, 145),
    "ankle": (-25, 30),
    "spine_flex": (-20, 60),
    "spine_twist": (-30, 30),
    "neck_flex": (-30, 45),
    "sh_flex": (-45, 170),
    "sh_abd": (-25, 150),
    "elbow": (0, 150),
    "root_pitch": (-15, 60),
}


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
    """(3, 3) rotation by ``degrees`` about the model axis ``"x"``, ``"y"`` or ``"z"``."""
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
        """Measured on an Anny body's rest pose (identity rotations, zero shape)."""
        eye = torch.eye(3, dtype=body.template.dtype).repeat(1, body.num_joints, 1, 1)
        with torch.no_grad():
            heads = body(eye, torch.zeros(1, body.num_betas, dtype=body.template.dtype))
        heads = heads.bone_heads[0].double().numpy()
        index = {n: i for i, n in enumerate(body.all_bone_names)}
        names = tuple(body.bone_names)
        children = {
            "upperleg01": "lowerleg01",
            "lowerleg01": "foot",
            "upperarm01": "lowerarm01",
            "lowerarm01": "wrist",
        }
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
        a |= {
            "hip_flex.L": 8 + 25 * amp * s,
            "hip_flex.R": 8 - 25 * amp * s,
            "knee.L": 15 + 40 * amp * max(0.0, c),
            "knee.R": 15 + 40 * amp * max(0.0, -c),
            "sh_flex.L": -18 * amp * s,
            "sh_flex.R": 18 * amp * s,
            "elbow.L": 20 + 8 * s,
            "elbow.R": 20 - 8 * s,
            "sh_abd.L": 8,
            "sh_abd.R": 8,
            "spine_flex": 4,
            "spine_twist": 8 * amp * s,
            "root_pitch": 3,
            "height": 0.95,
        }
    elif family == "Sitting":
        a |= {
            "hip_flex.L": 88 + 6 * slow,
            "hip_flex.R": 85 - 4 * slow,
            "knee.L": 90 + 10 * slow,
            "knee.R": 95 - 8 * slow,
            "hip_abd.L": 10,
            "hip_abd.R": 8,
            "sh_flex.L": 25 + 20 * amp * s,
            "sh_flex.R": 30 + 15 * amp * slow,
            "elbow.L": 60 + 25 * amp * s,
            "elbow.R": 70 - 20 * slow,
            "sh_abd.L": 12,
            "sh_abd.R": 12,
            "spine_flex": 12 + 10 * amp * slow,
            "neck_flex": 10,
            "root_pitch": -5,
            "height": 0.5,
        }
    elif family == "Reaching":
        a |= {
            "hip_flex.L": 6,
            "hip_flex.R": 4,
            "knee.L": 8,
            "knee.R": 10,
            "sh_flex.R": 75 + 55 * amp * s,
            "sh_abd.R": 20 + 25 * amp * c,
            "elbow.R": 25 + 20 * amp * c,
            "sh_flex.L": 10 + 10 * slow,
            "sh_abd.L": 10,
            "elbow.L": 15,
            "spine_twist": -12 * amp * s,
            "spine_flex": 3,
            "neck_flex": -10 * amp * s,
            "root_pitch": 0,
            "height": 0.95,
        }
    elif family == "Bending":
        b = 35 + 25 * amp * s
        a |= {
            "root_pitch": 0.6 * b,
            "hip_flex.L": 0.6 * b + 8,
            "hip_flex.R": 0.6 * b + 5,
            "knee.L": 12 + 0.4 * b,
            "knee.R": 15 + 0.35 * b,
            "spine_flex": 0.5 * b,
            "sh_flex.L": 35 + 0.7 * b,
            "sh_flex.R": 30 + 0.8 * b,
            "elbow.L": 20 + 10 * c,
            "elbow.R": 25,
            "sh_abd.L": 10,
            "sh_abd.R": 10,
            "neck_flex": -15,
            "height": 0.9 - 0.004 * b,
        }
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
            "y", g("spine_twist", 0) / 4
        )
    for neck in ("neck01", "neck02", "neck03"):
        rot[neck] = axis_rot("x", g("neck_flex", 0) / 3)
    for side, sign in (("L", 1.0), ("R", -1.0)):
        d = skel.direction
        thigh, shin = d[f"upperleg01.{side}"], d[f"lowerleg01.{side}"]
        rot[f"upperleg01.{side}"] = swing(thigh, z, g(f"hip_flex.{side}", 0)) @ swing(
            thigh, sign * x, g(f"hip_abd.{side}", 0)
        )
        rot[f"lowerleg01.{side}"] = swing(shin, -z, g(f"knee.{side}", 0))
        rot[f"foot.{side}"] = axis_rot("x", g(f"ankle.{side}", 0))
        arm = d[f"upperarm01.{side}"]
        rot[f"upperarm01.{side}"] = swing(arm, z, g(f"sh_flex.{side}", 0)) @ swing(
            arm, y, g(f"sh_abd.{side}", 0)
        )
        bend = g(f"elbow.{side}", 0) - skel.elbow_rest[side]
        rot[f"lowerarm01.{side}"] = _rotvec(skel.elbow_axis[side], np.deg2rad(bend))
    return np.stack([rot[n] for n in skel.names])


def sequences(frames: int) -> list[tuple[str, int]]:
    """(action name, frame count) per family for one subject: ``frames`` split over the
    families."""
    k = min(len(FAMILIES), frames)
    counts = [frames // k + (i < frames % k) for i in range(k)]
    return [(f"{FAMILIES[i]}_1", counts[i]) for i in range(k)]


def make_poses(
    subjects: tuple[str, ...], frames: int, skel: Skeleton, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """``frames`` poses per subject over the action families.

    Returns bone rotations (P, J, 3, 3) with the root's orientation in the world (y up), world
    root positions (P, 3) in metres, and the P keys (subject, action, 1-based frame number).
    """
    rots, positions, keys = [], [], []
    for subject in subjects:
        style = {k: rng.normal(0, 4) for k in ("sh_abd", "elbow", "hip_flex", "knee")}
        for action, count in sequences(frames):
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
                    "x", ang.get("root_pitch", 0.0)
                )
                rots.append(rot)
                positions.append(origin + [0.0, ang["height"], 0.0])
                keys.append((subject, action, 1 + 5 * k))
    return np.stack(rots), np.stack(positions), keys
