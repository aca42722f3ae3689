"""A synthetic Human3.6M-like world built with the Anny body model, where the truth is known.

Everything the demo needs, written in the formats the real pipeline reads:

* Subjects: Human3.6M names (train S1, S5, S6, S7, S8; test S9, S11, or a prefix of them) with
  Anny phenotypes drawn per subject (gender, age, muscle, weight, height, proportions).
* Poses: :mod:`jregfix.synthetic.motion` (four action families, joint limits, 0.1 s apart).
* Cameras and crops: :mod:`jregfix.synthetic.rig` (four Human3.6M-like cameras, tight mesh
  boxes padded by 1.2).
* Ground truth: Anny's anatomical joints (bone heads; crown vertex for head top) mapped to the 17
  H36M joints, rotated into each camera, pelvis-relative, in SPIN's ``S`` (``h36m_*.npz``).
* Body parameters in SPIN's crop convention (``truth_*.npz``): global orientation in camera
  coordinates and ``cam_t`` such that SPIN's crop camera (f = 5000 res / 224, centre res / 2)
  reproduces the crop: SPIN's own kind of estimate, linear least squares of the crop
  reprojection of the 17 joints and every 10th vertex.
* Masks (``silhouettes_train.npz``): the true mesh rendered by the exact crop camera (hard
  silhouette), then corrupted like a detector's (:func:`jregfix.synthetic.noise.corrupt_masks`).
* MoSh-like fits (``mosh_train.npz``): true poses with a body shape that misses the subject
  systematically (``mosh_bias`` added to the phenotype): the "standard" regressor
  (``J_standard.npy``) is fitted (:func:`jregfix.methods.fitting.fit_regressor`) to those
  meshes, the "oracle" (``J_oracle.npy``) to the true ones, both on the training subjects.
* Method outputs with the error models of :mod:`jregfix.synthetic.noise`: SPIN-like
  (``spin_{train,test}.npz``), VIBE-like (``vibe_output.pkl``, joblib, VIBE's keys) and
  MEVA-like (``meva_output.pkl``, pickle, MEVA's keys). One track per (subject, action, camera)
  video; ``frame_ids`` index the rows of ``h36m_test.npz``.

All randomness comes from one seed through independent streams per purpose, so the same seed
gives the same bytes. :func:`generate_world` writes everything plus ``world.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from jregfix.body.anny import DEFAULT_PHENOTYPE, PHENOTYPES
from jregfix.body.base import rest_h36m_joints
from jregfix.body.rotations import rotmat_to_axis_angle
from jregfix.errors import JregfixError
from jregfix.geometry.camera import cam_t_to_weak, spin_focal
from jregfix.geometry.metrics import mask_iou
from jregfix.io.atomic import save_npz, sha256_file, write_json
from jregfix.io.h36m import CAMERAS, H36M17_FROM_J24, h36m_imgname, joints17_to_s24, save_h36m
from jregfix.io.manifest import read_manifest, records_current
from jregfix.io.masks import save_silhouettes
from jregfix.io.regressors import save_regressor
from jregfix.io.tracks import save_tracks
from jregfix.render.silhouette import hard_silhouette
from jregfix.synthetic.motion import Skeleton, make_poses
from jregfix.synthetic.noise import clip_betas, corrupt_masks, spin_like, track_like
from jregfix.synthetic.rig import (
    BOX_PAD,
    IMAGE_SIZE,
    crop_box,
    crop_camera,
    estimate_translation,
    make_cameras,
    project,
    to_crop,
)

PHENOTYPE_DRAW = {
    "gender": (0.0, 1.0),
    "age": (0.7, 0.9),
    "muscle": (0.3, 0.8),
    "weight": (0.25, 0.8),
    "height": (0.2, 0.6),
    "proportions": (0.3, 0.7),
}


@dataclass
class WorldConfig:
    """Size and error models of a world (all noise std in radians / phenotype units / metres)."""

    train_subjects: tuple[str, ...] = ("S1", "S5", "S6", "S7", "S8")
    test_subjects: tuple[str, ...] = ("S9", "S11")
    frames: int = 8  # stored frames per subject, split over the action families, x 4 cameras
    crop_size: int = 96  # px; masks are stored at this size (SPIN: 224)
    seed: int = 0
    mosh_bias: dict[str, float] = field(
        default_factory=lambda: {
            "height": -0.12,
            "weight": 0.2,
            "proportions": 0.25,
            "muscle": -0.15,
        }
    )
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
        """Training then test subjects: the row order of the world's files."""
        return tuple(self.train_subjects) + tuple(self.test_subjects)

    def validate(self) -> None:
        """Refuse a config that cannot make a world (one-line :class:`JregfixError`)."""
        if self.frames < 1 or self.crop_size < 32:
            raise JregfixError(
                f"world: frames >= 1 and crop size >= 32 needed, got "
                f"{self.frames} and {self.crop_size}"
            )
        if not self.train_subjects or not self.test_subjects:
            raise JregfixError("world: need at least one train and one test subject")
        if set(self.train_subjects) & set(self.test_subjects):
            raise JregfixError("world: train and test subjects overlap")
        unknown = set(self.mosh_bias) - set(PHENOTYPES)
        if unknown:
            raise JregfixError(f"world: unknown phenotype(s) in mosh_bias: {sorted(unknown)}")


@dataclass
class Frames:
    """One row per (subject, action, camera, frame), the row order of the H36M files."""

    subject: list[str]
    action: list[str]
    camera: list[int]
    frame: list[int]  # 1-based frame number in the image name
    pose_index: list[int]  # row of the per-(subject, time) pose arrays
    imgname: list[str]


def pose_body(
    body, rotmat: np.ndarray, betas: np.ndarray, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N,J,3,3), (N,6) -> vertices (N,V,3) float32 and H36M-17 joints (N,17,3) float64.

    One forward pass gives both: Anny's joints are its bone heads, not regressed vertices.
    """
    dtype = body.template.dtype
    verts, joints = [], []
    with torch.no_grad():
        for a in range(0, len(rotmat), chunk):
            out = body(
                torch.as_tensor(rotmat[a : a + chunk], dtype=dtype),
                torch.as_tensor(betas[a : a + chunk], dtype=dtype),
            )
            verts.append(out.vertices.float().numpy())
            joints.append(body.h36m_joints(out).double().numpy())
    return np.concatenate(verts), np.concatenate(joints)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("subjects", "cameras", "poses", "masks", "spin", "vibe", "meva")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, children, strict=True)}


def _phenotypes(config: WorldConfig, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    out = {}
    for subject in config.subjects:
        out[subject] = {k: round(float(rng.uniform(*PHENOTYPE_DRAW[k])), 4) for k in PHENOTYPES}
    return out


def _betas_of(phenotype: dict[str, float], bias: dict[str, float] | None = None) -> np.ndarray:
    values = np.array([phenotype[k] + (bias or {}).get(k, 0.0) for k in PHENOTYPES])
    return clip_betas(values - np.asarray(DEFAULT_PHENOTYPE))


def _params_arrays(
    rot: np.ndarray, betas: np.ndarray, cam_t: np.ndarray, crop: int, imgname: list[str]
) -> dict[str, np.ndarray]:
    aa = rotmat_to_axis_angle(torch.from_numpy(rot)).reshape(len(rot), -1).numpy()
    return {
        "pose": aa,
        "pred_rotmat": rot,
        "betas": betas,
        "cam_t": cam_t,
        "camera": cam_t_to_weak(torch.from_numpy(cam_t)).numpy(),
        "imgname": np.asarray(imgname),
        "crop_size": np.asarray(crop, dtype=np.int64),
    }


def _track_file(
    path: Path, params: dict, rows_by_track: list[np.ndarray], center, scale, use_joblib: bool
) -> None:
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
            "bboxes": np.stack([center[rows, 0], center[rows, 1], side, side], 1).astype(
                np.float32
            ),
            "joints2d": None,
            "frame_ids": rows.astype(np.int64),
        }
    save_tracks(path, tracks, "joblib" if use_joblib else "pickle")


def fit_world_regressor(
    body,
    meshes: np.ndarray,
    joints: np.ndarray,
    out: Path,
    config: WorldConfig,
    params_stage: str,
    note: str,
) -> dict:
    """NNLS fit (fit-regressor's solver) of meshes (N,V,3) to joints (N,17,3); writes ``out``.

    Each row's support surrounds the joint of the rest body (Anny has anatomical joints).
    """
    from jregfix.methods.fitting import FitConfig, candidate_rows, fit_regressor

    fit_config = FitConfig(support=config.regressor_support, chunk_size=config.chunk_size)
    template = body.template.double().cpu().numpy()
    candidates = candidate_rows(template, rest_h36m_joints(body), config.regressor_support)
    fit = fit_regressor(meshes, joints, template, fit_config, candidates=candidates)
    diag = fit.diagnostics
    save_regressor(
        out,
        fit.regressor,
        {
            "stage": "world",
            "params_stage": params_stage,
            "description": note,
            "subjects": list(config.train_subjects),  # read by evaluate's training-data flag
            "config": asdict(fit_config),
            "frames": diag["frames"],
            "rms_mm_all_joints": diag["rms_mm_all_joints"],
            "converged": diag["converged"],
            "support_locations": fit.support.source,
        },
    )
    return {"rms_mm": diag["rms_mm_all_joints"], "frames": diag["frames"]}


def generate_world(
    out_dir: str | Path,
    config: WorldConfig | None = None,
    body=None,
    say: Callable[[str], None] | None = None,
) -> dict:
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
    rots, positions, keys = make_poses(config.subjects, config.frames, skel, rng["poses"])
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
    subjects, actions, cams, frame_numbers, poses = map(list, zip(*rows, strict=True))
    frames = Frames(
        subjects,
        actions,
        cams,
        frame_numbers,
        poses,
        [h36m_imgname(s, a, CAMERAS[c], f) for s, a, c, f, _ in rows],
    )
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
    focal = spin_focal(size)
    say(f"cropping and rendering {n} frames at {size} px")
    for a in range(0, n, config.chunk_size):
        b = min(a + config.chunk_size, n)
        v = np.einsum("nij,nvj->nvi", r_cw[a:b], verts_w[pidx[a:b]].astype(np.float64))
        v += trans[a:b, None]
        pix = project(v)
        center[a:b], side = crop_box(pix)
        scale[a:b] = side / 200
        jc = joints_c[a:b] + trans[a:b, None]
        jpix = project(jc)
        part[a:b, list(H36M17_FROM_J24), :2] = jpix
        part[a:b, list(H36M17_FROM_J24), 2] = 1.0
        masks[a:b] = hard_silhouette(
            torch.from_numpy(v), body.faces, crop_camera(center[a:b], side, size), size
        ).numpy()
        for i in range(b - a):  # SPIN-style translation for the crop camera
            pts = np.concatenate([joints_c[a + i], v[i, ::10] - trans[a + i]])
            crop_px = to_crop(np.concatenate([jpix[i], pix[i, ::10]]), center[a + i], side[i], size)
            cam_t[a + i] = estimate_translation(pts, crop_px, focal, size)
    del verts_w

    s24 = joints17_to_s24(joints_c)
    subj = np.array(frames.subject)
    train = np.isin(subj, config.train_subjects)
    test = ~train
    imgname = np.array(frames.imgname)
    files = {}

    def write_gt(name, sel):
        save_h36m(out_dir / name, imgname[sel], center[sel], scale[sel], s24[sel], part=part[sel])
        files[name] = out_dir / name

    write_gt("h36m_train.npz", train)
    write_gt("h36m_test.npz", test)
    true_b = true_betas[pidx]
    for split, sel in (("train", train), ("test", test)):
        name = f"truth_{split}.npz"
        save_npz(
            out_dir / name,
            compressed=True,
            **_params_arrays(cam_rot[sel], true_b[sel], cam_t[sel], size, list(imgname[sel])),
        )
        files[name] = out_dir / name
    name = "mosh_train.npz"
    save_npz(
        out_dir / name,
        compressed=True,
        **_params_arrays(
            cam_rot[train], mosh_betas[pidx][train], cam_t[train], size, list(imgname[train])
        ),
    )
    files[name] = out_dir / name

    noisy_masks = corrupt_masks(masks, rng["masks"], config.mask_flip)
    for split, sel in (("train", train), ("test", test)):
        name = f"silhouettes_{split}.npz"
        save_silhouettes(
            out_dir / name,
            noisy_masks[sel],
            np.full(sel.sum(), 0.99),
            np.ones(sel.sum(), bool),
            imgname[sel],
            clean_iou=mask_iou(noisy_masks[sel], masks[sel]),
        )
        files[name] = out_dir / name

    # SPIN-like: independent per-frame errors.
    spin = _params_arrays(
        *spin_like(
            cam_rot,
            true_b,
            cam_t,
            rng["spin"],
            pose_std=config.spin_pose_std,
            root_std=config.spin_root_std,
            shape_pull=config.spin_shape_pull,
            shape_std=config.spin_shape_std,
            cam_std=config.spin_cam_std,
        ),
        size,
        list(imgname),
    )
    for split, sel in (("train", train), ("test", test)):
        name = f"spin_{split}.npz"
        save_npz(
            out_dir / name,
            compressed=True,
            **{k: (v[sel] if np.ndim(v) else v) for k, v in spin.items()},
        )
        files[name] = out_dir / name

    # VIBE-like / MEVA-like on the test videos: temporally smoothed errors.
    test_rows = np.flatnonzero(test)
    video = [(frames.subject[i], frames.action[i], frames.camera[i]) for i in test_rows]
    tracks = [
        np.array([j for j, v in enumerate(video) if v == key]) for key in dict.fromkeys(video)
    ]
    for method, std, sigma, shrink, use_joblib in (
        ("vibe", config.vibe_pose_std, config.vibe_smooth, 1.0, True),
        ("meva", config.meva_pose_std, config.meva_smooth, config.meva_shrink, False),
    ):
        params = _params_arrays(
            *track_like(
                cam_rot[test],
                true_b[test],
                cam_t[test],
                tracks,
                rng[method],
                pose_std=std,
                smooth=sigma,
                shrink=shrink,
                shape_pull=config.spin_shape_pull,
                shape_std=config.spin_shape_std,
                cam_std=config.spin_cam_std,
            ),
            size,
            list(imgname[test]),
        )
        name = f"{method}_output.pkl"
        _track_file(out_dir / name, params, tracks, center[test], scale[test], use_joblib)
        files[name] = out_dir / name

    say("fitting the standard (MoSh-like) and oracle regressors")
    tr = np.flatnonzero(train)
    regs = {}
    for name, betas_w, stage, note in (
        (
            "J_standard.npy",
            mosh_betas,
            "mosh",
            "standard: fitted to MoSh-like meshes (true poses, biased body shape)",
        ),
        ("J_oracle.npy", true_betas, "truth", "oracle: fitted to the true meshes"),
    ):
        uniq = np.unique(pidx[tr])
        v_pose, _ = pose_body(body, rots[uniq], betas_w[uniq], config.chunk_size)
        where = np.searchsorted(uniq, pidx[tr])
        meshes = np.einsum("nij,nvj->nvi", r_cw[tr].astype(np.float32), v_pose[where])
        regs[name] = fit_world_regressor(
            body, meshes, joints_c[tr], out_dir / name, config, stage, note
        )
        files[name] = out_dir / name
        del v_pose, meshes

    doc = {
        "description": "synthetic Human3.6M-like world (Anny body model); see "
        "jregfix.synthetic.world",
        "config": asdict(config),
        "phenotypes": phenotypes,
        "cameras": {
            c.name: {
                "R_cw": c.rotation.tolist(),
                "t_cw": c.translation.tolist(),
                "focal": c.focal,
                "center": list(c.center),
                "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            }
            for c in cameras
        },
        "frames": {
            "train": int(train.sum()),
            "test": int(test.sum()),
            "poses_per_subject": config.frames,
            "cameras": len(cameras),
        },
        "crop": {
            "scale": f"{BOX_PAD} * max(w, h) / 200 of the projected mesh box",
            "mask_size": size,
            "spin_focal": focal,
        },
        "mask_iou_vs_clean": float(mask_iou(noisy_masks, masks).mean()),
        "regressors": regs,
        "files": {k: {"sha256": sha256_file(p)} for k, p in sorted(files.items())},
    }
    write_json(out_dir / "world.json", doc)
    return doc


def world_is_current(out_dir: str | Path, config: WorldConfig) -> bool:
    """True when ``out_dir/world.json`` was written for this config and no file has changed
    (the stages' rule, :func:`jregfix.io.manifest.records_current`, over world.json's files)."""
    doc = read_manifest(Path(out_dir) / "world.json")
    if not isinstance(doc, dict) or not doc.get("files"):
        return False
    config_json = json.loads(json.dumps(asdict(config)))
    recorded = {
        "stage": "world",
        "inputs": {},
        "seed": None,
        "config": doc.get("config"),
        "outputs": doc["files"],
    }
    wanted = {"stage": "world", "inputs": {}, "seed": None, "config": config_json}
    return records_current(recorded, wanted, {k: Path(out_dir) / k for k in doc["files"]})
