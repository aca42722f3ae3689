"""`refine`: pseudo ground truth by Adam over SMPL pose, shape and camera (Hedlin et al. §3).

Per frame, starting from SPIN's estimate, minimise

    w_j L_joint + w_2d L_2d + w_s L_silhouette + w_a (L_adv,pose + L_adv,shape)

* L_joint: mean squared distance (m²) between the root-relative joints J_spin·mesh and the
  root-relative GT joints (17 H36M joints, row 0 = pelvis). J_spin is a regressor fitted to
  SPIN's own meshes; a regressor fitted on refined meshes is refused (drift guard).
* L_2d: mean over the visible joints of the squared distance (px² of a 224 crop, whatever
  ``image_size``) between the J_spin joints projected by the crop camera and the GT 2D keypoints.
  Those are SPIN's ``part`` (original-image pixels + visibility, J24 order, reordered to the 17
  regressor rows), mapped into the crop by the frame's center/scale with the exact continuous
  map of the crop's resize (:func:`jregfix.geometry.crop.image_to_crop`; SPIN's own keypoint
  transform truncates to whole pixels). Invisible joints are ignored; a GT file without ``part``
  refines without this term (and says so).
* L_silhouette: mean squared difference between the soft silhouette (our SoftRas renderer, SPIN's
  crop camera: f = 5000 px, centre 112, 224²) and the person mask; ``chamfer`` swaps in the
  cheap boundary loss. Frames whose mask is empty (no person found) get no silhouette term.
  The default blur is sigma = 0.1 px², below the paper's 1.25 px² (PyTorch3D's 1e-4 at 224²):
  SoftRas's union over the many edge-on faces at a body's outline spills coverage outward by
  about sqrt(sigma ln k) px, so an MSE against a hard mask shrinks the body; on the synthetic
  test world (64² and 128² crops, 25 iterations) the mean IoU reached 0.78 / 0.89 at 0.25 px²
  and 0.86 / 0.92 at 0.1 px².
* L_adv: a pose discriminator on 24 SPIN-6D rotations and a shape discriminator on betas, trained
  online as a least-squares GAN (SPIN's initial estimates real, refined ones fake), updated once
  per optimised batch with Adam (lr 1e-3); the refined frame pays ||1 - D(θ)||². Both real and
  fake 6D are orthonormalised first, so the discriminator cannot tell them apart by the
  (arbitrary) scale of SPIN's raw 6D output.

The camera is optimised as SPIN's weak-perspective (s, tx, ty) and turned into the translation
(tx, ty, 2f/(224 s)) for rendering: with tz ≈ 50 m an Adam step of 1e-2 on tz moves the body by
0.02 %, on s by about 1 %, so depth errors of a few metres are correctable in 100 iterations.
``camera_warmup`` N > 0 first runs N Adam steps (same lr) on the camera alone, pose and shape
fixed, on L_2d (or on L_silhouette for a GT file without keypoints), as the authors' released
code does (1,000 steps); it is part of each batch's computation, so chunks and resumption are
unaffected.

Weights: the paper weights the terms to be of about equal magnitude at the first iteration. A
term with no explicit weight is therefore scaled to 1 at the first iteration of the joint
optimisation of each batch (w = 1 / max(L(θ₀), floor)); an explicit weight overrides, 0
disables. The released code uses fixed weights instead: :data:`PRESETS` ``hedlin-code`` maps
them onto these terms (docs/deviations.md lists every difference from the paper and the code).
Adam (lr 1e-2, betas 0.9/0.999), 100 iterations, per batch of frames.

Masks stored at another resolution than ``image_size`` (e.g. 224 for a 96 px run) are resampled
per batch by a box filter (area average), which gives soft targets at the mask's outline.

Batches of ``batch_size`` frames run in order and each is saved as a chunk when done. The
discriminators take one Adam step per *group* of ``batches_per_disc_step`` batches (default:
one per process, so 1 in a single process), on the mean of the group's per-batch gradients;
every batch of a group is refined against the same discriminators. A distributed job (torchrun,
W processes) deals batch j of each group to rank j mod W, gathers the gradients and adds them
in batch order, so all ranks hold the same discriminators and the run equals the
single-process run with the same ``batches_per_disc_step`` (exactly, given per-process
determinism; see the README). A batch's discriminator gradient is computed from the refined
arrays saved in its chunk, so a re-run after a kill (of any rank) reuses every finished chunk,
replays the discriminator steps from them and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from jregfix.body.base import BodyModel, fit_betas
from jregfix.body.rotations import (
    pose_to_rotmat,
    rot6d_to_rotmat,
    rotmat_to_axis_angle,
    rotmat_to_rot6d,
)
from jregfix.device import device_stage, numerics_record
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.camera import FOCAL_LENGTH, PinholeCamera, project, weak_to_cam_t
from jregfix.geometry.crop import image_to_crop, resample_crops
from jregfix.io.atomic import npz_bytes, read_npz
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import load_h36m
from jregfix.io.lock import locks_output
from jregfix.io.manifest import (
    ChunkStore,
    chunk_ranges,
    describe_inputs,
    fingerprint,
    manifest_path,
    read_manifest,
    read_sidecar,
    stage_record,
    versions,
    write_output,
)
from jregfix.io.masks import load_silhouettes
from jregfix.io.params import load_params
from jregfix.io.regressors import load_provenance, load_regressor, validate_regressor
from jregfix.models.discriminator import (
    PoseDiscriminator,
    ShapeDiscriminator,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from jregfix.render.chamfer import chamfer_silhouette_loss
from jregfix.render.silhouette import hard_silhouette, soft_silhouette
from jregfix.stages.frames import merged_chunks

TERMS = ("joint", "j2d", "silhouette", "adversarial")
LIVE_SECONDS = 0.5  # least time between two live loss reports (each one syncs a GPU)
# Floors of the automatic weights: below these a term is "already solved" and is not blown up.
WEIGHT_FLOORS = {"joint": 1e-6, "j2d": 1e-2, "silhouette": 1e-4, "adversarial": 1e-4}
KEYPOINT_RES = 224  # L_2d is measured in pixels of a 224 crop at any image_size


@dataclass
class RefineConfig:
    iters: int = 100
    camera_warmup: int = 0  # Adam steps on the camera alone before the joint optimisation
    lr: float = 1e-2
    batch_size: int = 16
    weights: dict[str, float] = field(default_factory=dict)  # missing terms: automatic
    silhouette_loss: str = "soft"  # "soft" (SoftRas MSE) or "chamfer"
    sigma: float = 0.1  # px², soft silhouette blur (see the module docstring)
    disc_lr: float = 1e-3
    image_size: int = 224  # crop side in px; the focal scales with it (same field of view)
    seed: int = 0
    # batches whose discriminator gradients are averaged into one step; None: one per process
    batches_per_disc_step: int | None = None

    @property
    def focal(self) -> float:
        return FOCAL_LENGTH * self.image_size / 224

    def validate(self) -> None:
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise JregfixError(f"unknown loss term(s) {sorted(unknown)}; terms are {TERMS}")
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()):
            raise JregfixError(f"loss weights must be finite and >= 0, got {self.weights}")
        if self.iters < 0 or self.batch_size < 1 or self.camera_warmup < 0:
            raise JregfixError("iters >= 0, camera warm-up >= 0 and batch size >= 1 are required "
                               f"(--iters {self.iters}, --camera-warmup {self.camera_warmup}, "
                               f"--batch-size {self.batch_size})")
        if not 0 < self.lr < math.inf:
            raise JregfixError(f"--lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.sigma < math.inf or (self.sigma == 0 and self.silhouette_loss == "soft"):
            raise JregfixError(f"--sigma must be a positive finite number, got {self.sigma}")
        if not any(self.weights.get(t, 1.0) > 0 for t in TERMS):
            raise JregfixError("every loss term has weight 0: nothing to optimise")
        if self.batches_per_disc_step is not None and self.batches_per_disc_step < 1:
            raise JregfixError("batches per discriminator step must be >= 1")
        if self.silhouette_loss not in ("soft", "chamfer"):
            raise JregfixError("silhouette loss must be 'soft' or 'chamfer'")


def hedlin_code_preset(image_size: int = 224) -> dict:
    """The settings of the authors' released optimisation, as :class:`RefineConfig` fields.

    Their loss is j2d/100 + silhouette·100 + j3d·1e4 + (pose + shape generator)·10, each an
    element-wise mean (torch MSELoss). Ours sum over coordinates, so their 2D term (mean over
    17 x 2 values) is L_2d / 2 and their 3D term (17 x 3 values) is L_joint / 3; the silhouette
    (mean over pixels) and adversarial terms (mean over the 25 pose outputs, plus the shape
    output) are normalised alike. Batch 256, 1,000 camera warm-up steps; their silhouette blur
    (PyTorch3D sigma 1e-4 in NDC²) in px² at ``image_size``. docs/deviations.md has the rest.
    """
    return {"weights": {"j2d": 1 / 100 / 2, "silhouette": 100.0, "joint": 1e4 / 3,
                        "adversarial": 10.0},
            "batch_size": 256, "camera_warmup": 1000, "silhouette_loss": "soft",
            "sigma": 1e-4 * (image_size / 2) ** 2}


PRESETS = {"hedlin-code": hedlin_code_preset}


class Discriminators(torch.nn.Module):
    """The pose and shape discriminators and their Adam optimiser.

    An update is split in two so that it can be shared: :meth:`gradient` of one batch's LSGAN
    loss (flattened), then :meth:`step` with the mean gradient of a group of batches.
    """

    def __init__(self, num_joints: int, num_betas: int, lr: float):
        super().__init__()
        self.pose = PoseDiscriminator(num_joints)
        self.shape = ShapeDiscriminator(num_betas)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))

    def generator_loss(self, rot6d: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """(B,) adversarial cost of the current estimate (gradients reach rot6d and betas)."""
        return lsgan_generator_loss(self.pose(rot6d)) + lsgan_generator_loss(self.shape(betas))

    def gradient(self, real6d, real_betas, fake6d, fake_betas) -> tuple[float, torch.Tensor]:
        """One batch's LSGAN loss (real: initial estimates, fake: refined) and its gradient
        with respect to every parameter, flattened to (P,)."""
        loss = (lsgan_discriminator_loss(self.pose(real6d), self.pose(fake6d))
                + lsgan_discriminator_loss(self.shape(real_betas), self.shape(fake_betas)))
        grads = torch.autograd.grad(loss, list(self.parameters()))
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    def step(self, gradient: torch.Tensor) -> None:
        """One Adam step along a flattened (P,) gradient."""
        offset = 0
        for p in self.parameters():
            p.grad = gradient[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.opt.step()


@dataclass
class Batch:
    """One optimisation batch: initial parameters and targets, all tensors on one device."""

    rotmat: torch.Tensor  # (B,J,3,3) initial pose
    betas: torch.Tensor  # (B,S)
    cam_t: torch.Tensor  # (B,3)
    gt_joints: torch.Tensor  # (B,17,3) root-relative
    masks: torch.Tensor  # (B,H,W) float
    has_mask: torch.Tensor  # (B,) bool
    keypoints: torch.Tensor | None = None  # (B,17,2) GT 2D joints, px of a 224 crop
    visible: torch.Tensor | None = None  # (B,17) float, 1 = visible


def cam_t_to_weak(cam_t: torch.Tensor) -> torch.Tensor:
    """(N,3) translation -> SPIN's (s, tx, ty), the inverse of ``weak_to_cam_t``."""
    s = 2 * FOCAL_LENGTH / (224 * cam_t[:, 2])
    return torch.stack([s, cam_t[:, 0], cam_t[:, 1]], 1)


def orthonormal_6d(rot6d: torch.Tensor) -> torch.Tensor:
    """Map any 6D to the 6D of its Gram-Schmidt rotation (the discriminator's input space)."""
    return rotmat_to_rot6d(rot6d_to_rotmat(rot6d))


def regress(j_reg: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """(K,V) regressor, (B,V,3) vertices -> (B,K,3) joints."""
    return torch.einsum("kv,bvc->bkc", j_reg, verts)


def root_relative_joints(j_reg: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    joints = regress(j_reg, verts)
    return joints - joints[:, :1]


def reprojection_sq(joints, camera, cam_t, keypoints, visible, image_size) -> torch.Tensor:
    """(B,) L_2d: mean over visible joints of the squared distance (px² of a 224 crop) between
    joints (B,K,3) projected by ``camera`` at ``image_size`` and keypoints (B,K,2) in 224-crop
    px; visible (B,K) float. 0 for a frame without visible joints."""
    px = project(joints, camera, cam_t) * (KEYPOINT_RES / image_size)
    d2 = ((px - keypoints) ** 2).sum(-1)
    return (d2 * visible).sum(-1) / visible.sum(-1).clamp_min(1)


def reprojection_error(joints, camera, cam_t, keypoints, visible, image_size) -> torch.Tensor:
    """(B,) mean 2D distance (px of a 224 crop) over visible joints; NaN without any."""
    px = project(joints, camera, cam_t) * (KEYPOINT_RES / image_size)
    dist = (px - keypoints).norm(dim=-1)
    count = visible.sum(-1)
    return torch.where(count > 0, (dist * visible).sum(-1) / count.clamp_min(1),
                       torch.full_like(count, float("nan")))


def silhouette_term(kind: str, verts, faces, camera, cam_t, masks, has_mask, size, sigma):
    """(B,) silhouette loss; zero for frames without a mask."""
    if kind == "soft":
        sil = soft_silhouette(verts, faces, camera, size, cam_t=cam_t, sigma=sigma)
        per = ((sil - masks) ** 2).mean((1, 2))
    else:
        per = chamfer_silhouette_loss(verts, faces, camera, masks > 0.5, cam_t=cam_t)
        per = per.reshape(-1)
    return per * has_mask.to(per.dtype)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,H,W) bool x 2 -> (B,) intersection over union (1 when both are empty)."""
    inter = (pred & target).sum((1, 2)).double()
    union = (pred | target).sum((1, 2)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def geodesic_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean rotation angle (degrees) between (B,J,3,3) sets, over joints 1.. (body joints)."""
    rel = a[:, 1:].transpose(-1, -2) @ b[:, 1:]
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).mean(1)


def refine_batch(body: BodyModel, j_reg: torch.Tensor, batch: Batch, disc: Discriminators,
                 config: RefineConfig, on_iter: Callable[[int, dict], None] | None = None) -> dict:
    """Optimise one batch; update the discriminators once; return refined params and metrics.

    ``on_iter(it, means)`` gets each term's batch mean as a 0-dim tensor on the device: reading
    it (``float``) waits for the GPU, so callers do that only when they display it. Camera
    warm-up steps report ``{"warmup_<term>": loss}``."""
    b = batch.rotmat.shape[0]
    camera = PinholeCamera.spin_crop(b, config.focal, config.image_size, batch.betas.dtype,
                                     batch.betas.device)
    faces = body.faces
    init6d = rotmat_to_rot6d(batch.rotmat)
    pose6d = init6d.clone().requires_grad_(True)
    betas = batch.betas.clone().requires_grad_(True)
    weak = cam_t_to_weak(batch.cam_t).requires_grad_(True)
    active = [t for t in TERMS if config.weights.get(t, 1.0) > 0
              and (t != "j2d" or batch.keypoints is not None)]
    weights: dict[str, float] = {}
    for p in disc.parameters():
        p.requires_grad_(False)

    def silhouette(verts, cam_t):
        return silhouette_term(config.silhouette_loss, verts, faces, camera, cam_t, batch.masks,
                               batch.has_mask, config.image_size, config.sigma)

    def reprojection(joints, cam_t):
        return reprojection_sq(joints, camera, cam_t, batch.keypoints, batch.visible,
                               config.image_size)

    if config.camera_warmup:
        term = "j2d" if "j2d" in active else "silhouette"
        if term not in active:
            raise JregfixError("the camera warm-up needs the 2D term (GT 'part') or the "
                               "silhouette term; enable one or set --camera-warmup 0")
        with torch.no_grad():  # pose and shape stay fixed: one mesh for every step
            verts0 = body.vertices(rot6d_to_rotmat(pose6d), betas)
            joints0 = regress(j_reg, verts0)
        cam_opt = torch.optim.Adam([weak], lr=config.lr, betas=(0.9, 0.999))
        for step in range(config.camera_warmup):
            cam_t = weak_to_cam_t(weak)
            loss = (reprojection(joints0, cam_t) if term == "j2d"
                    else silhouette(verts0, cam_t)).mean()
            cam_opt.zero_grad()
            loss.backward()
            cam_opt.step()
            if on_iter is not None:
                on_iter(step, {f"warmup_{term}": loss.detach()})
    opt = torch.optim.Adam([pose6d, betas, weak], lr=config.lr, betas=(0.9, 0.999))

    def losses() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rot = rot6d_to_rotmat(pose6d)
        cam_t = weak_to_cam_t(weak)
        verts = body.vertices(rot, betas)
        terms = {}
        joints = regress(j_reg, verts)
        if "joint" in active:
            terms["joint"] = ((joints - joints[:, :1] - batch.gt_joints) ** 2).sum(-1).mean(-1)
        if "j2d" in active:
            terms["j2d"] = reprojection(joints, cam_t)
        if "silhouette" in active:
            terms["silhouette"] = silhouette(verts, cam_t)
        if "adversarial" in active:
            terms["adversarial"] = disc.generator_loss(orthonormal_6d(pose6d), betas)
        return terms, verts

    history = {}
    for it in range(config.iters + 1):
        terms, _ = losses()
        means = {k: v.mean() for k, v in terms.items()}
        if it == 0:
            first = torch.stack(list(means.values())).tolist()  # one device read per batch
            for k, v in zip(means, first, strict=True):
                weights[k] = config.weights.get(k, 1.0 / max(v, WEIGHT_FLOORS[k]))
            history["initial"] = {k: v.detach() for k, v in terms.items()}
        if it == config.iters:
            history["final"] = {k: v.detach() for k, v in terms.items()}
            break
        total = sum(weights[k] * means[k] for k in means)
        opt.zero_grad()
        total.backward()
        opt.step()
        if on_iter is not None:
            on_iter(it, {k: v.detach() for k, v in means.items()})
    for p in disc.parameters():
        p.requires_grad_(True)

    with torch.no_grad():
        out = _batch_metrics(body, j_reg, batch, rot6d_to_rotmat(pose6d), betas.detach(),
                             weak_to_cam_t(weak), camera, config)
    out.update({f"loss_{k}_{when}": history[when][k].cpu().numpy()
                for when in ("initial", "final") for k in history[when]})
    out["weights"] = weights
    return out


def discriminator_gradient(disc: Discriminators, batch: Batch,
                           refined: Mapping[str, np.ndarray]) -> tuple[float, torch.Tensor]:
    """The discriminators' loss and gradient for one batch, computed from the refined arrays
    as saved in its chunk, so that a resumed run replays exactly the same update."""
    fake_rot = torch.from_numpy(refined["pred_rotmat"]).to(batch.betas.device)
    fake_betas = torch.from_numpy(refined["betas"]).to(batch.betas.device)
    return disc.gradient(rotmat_to_rot6d(batch.rotmat), batch.betas, rotmat_to_rot6d(fake_rot),
                         fake_betas)


def _batch_metrics(body, j_reg, batch, rot, betas, cam_t, camera, config) -> dict:
    size = config.image_size
    masks = batch.masks > 0.5
    v0 = body.vertices(batch.rotmat, batch.betas)
    v1 = body.vertices(rot, betas)
    # frames without a mask have no IoU (NaN), so they do not pull the means down
    no_mask = ~batch.has_mask
    iou0 = mask_iou(hard_silhouette(v0, body.faces, camera, size, cam_t=batch.cam_t), masks)
    iou1 = mask_iou(hard_silhouette(v1, body.faces, camera, size, cam_t=cam_t), masks)
    iou0, iou1 = (x.masked_fill(no_mask, float("nan")) for x in (iou0, iou1))
    err = lambda v: (root_relative_joints(j_reg, v) - batch.gt_joints).norm(dim=-1).mean(-1)  # noqa: E731
    out = {}
    if batch.keypoints is not None:  # frames without visible joints: NaN, as for the IoU
        for when, v, t in (("before", v0, batch.cam_t), ("after", v1, cam_t)):
            out[f"j2d_err_{when}_px"] = reprojection_error(
                regress(j_reg, v), camera, t, batch.keypoints, batch.visible, size).cpu().numpy()
    return {
        **out,
        "pred_rotmat": rot.cpu().numpy(),
        "betas": betas.cpu().numpy(),
        "cam_t": cam_t.cpu().numpy(),
        "iou_before": iou0.cpu().numpy(),
        "iou_after": iou1.cpu().numpy(),
        "joint_err_before_mm": 1000 * err(v0).cpu().numpy(),
        "joint_err_after_mm": 1000 * err(v1).cpu().numpy(),
        "geodesic_to_init_deg": geodesic_deg(batch.rotmat, rot).cpu().numpy(),
        "has_mask": batch.has_mask.cpu().numpy(),
    }


def _init_cam_t(params, n: int) -> np.ndarray:
    if params.cam_t is not None:
        return params.cam_t
    if params.camera is not None:
        return weak_to_cam_t(torch.from_numpy(params.camera)).numpy()
    raise JregfixError(f"{params.path}: needs 'cam_t' or 'camera' (s, tx, ty) to start from")


# per-frame metrics that are NaN by design (no mask, no visible keypoint, no adversarial term);
# NaN anywhere else in a chunk means the optimisation diverged
NAN_MARKS = ("iou_before", "iou_after", "j2d_err_before_px", "j2d_err_after_px", "disc_loss")


def check_regressor_provenance(path: str | Path, force: bool) -> dict | None:
    """Refuse a regressor fitted on refined meshes (the paper keeps the two steps apart)."""
    prov = load_provenance(path)
    if prov is None:
        return None
    stage = prov.get("params_stage")
    if stage == "refine" and not force:
        raise JregfixError(f"{path}: its provenance says it was fitted on refined meshes; refine "
                           "needs J_spin (fitted on SPIN's meshes). Pass --force to use it anyway.")
    return prov


@locks_output("out")  # one writer per output and its chunks, for the whole stage
@device_stage()  # 'auto' resolved; on CUDA deterministic kernels and IEEE fp32 (no TF32)
def refine(
    init: str | Path,
    gt: str | Path,
    silhouettes: str | Path,
    body: BodyModel,
    joint_regressor: str | Path,
    out: str | Path,
    config: RefineConfig | None = None,
    body_file: str | Path | None = None,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    progress: Callable[[int, dict], None] | None = None,
    ranks: Ranks | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Refine every frame (or one shard) and write ``out`` (npz) plus its manifest.

    ``progress(frames_done, live_losses)`` is called after each batch with ``{}`` and during
    it with the iteration and the loss terms, at its first and last iterations and at most every
    ``LIVE_SECONDS`` in between (camera warm-up steps, whose term is named ``warmup_<term>``,
    only by time); each report reads the losses back from the device, a sync on a
    GPU. ``frames_done`` counts this process's frames. ``say`` gets one-line notes (a GT file
    without 2D keypoints). Under a distributed job (``ranks``) every
    rank calls this with the same arguments: batches are dealt out as described in the module
    docstring, each rank writes its own chunks, and rank 0 merges them into ``out``.
    Returns a summary (means of the per-frame metrics, frames, empty masks, time).
    """
    refuse_overwriting_inputs({"--init": init, "--gt": gt, "--silhouettes": silhouettes,
                               "--joint-regressor": joint_regressor, "--smpl": body_file},
                              {"--out": out})
    config = config or RefineConfig()
    config.validate()
    ranks = ranks or Ranks()
    say = say or (lambda _msg: None)
    out = Path(out)
    prov = check_regressor_provenance(joint_regressor, force)
    gtd = load_h36m(gt)
    params = load_params(init)
    sil = load_silhouettes(silhouettes)
    n = len(gtd)
    if len(params) != n or len(sil.masks) != n:
        raise JregfixError(f"frame counts differ: init {len(params)} ({init}), GT {n} ({gt}), "
                           f"silhouettes {len(sil.masks)} ({silhouettes})")
    if sil.masks.shape[1] != sil.masks.shape[2]:
        raise JregfixError(f"{silhouettes}: masks are {sil.masks.shape[1]}x"
                           f"{sil.masks.shape[2]}, expected square crops")
    keypoints = gtd.keypoints17()
    j2d = keypoints is not None and config.weights.get("j2d", 1.0) > 0
    if keypoints is None:
        say(f"{gt} has no 2D keypoints ('part'): refining without the 2D term")
    usable = [t for t in TERMS if config.weights.get(t, 1.0) > 0 and (t != "j2d" or j2d)]
    if not usable:
        raise JregfixError(f"{gt} has no 2D keypoints ('part') and every other loss term has "
                           "weight 0: nothing to optimise")
    if config.camera_warmup and not (j2d or "silhouette" in usable):
        raise JregfixError("--camera-warmup needs the 2D term (GT 'part') or the silhouette "
                           "term; enable one or set --camera-warmup 0")
    for name, other in (("init", params.imgname), ("silhouettes", sil.imgname)):
        if other is not None and len(other) and not np.array_equal(other, gtd.imgname):
            raise JregfixError(f"{name} rows are not aligned with the GT file (imgname differs)")
    j_reg = validate_regressor(load_regressor(joint_regressor), body.num_vertices,
                               str(joint_regressor), num_joints=17)
    cam_t0 = _init_cam_t(params, n)
    rows = np.arange(n)
    if shard is not None:
        i, k = shard
        if not 0 <= i < k:
            raise JregfixError(f"shard {i}/{k}: need 0 <= i < n")
        # whole batches per shard: a batch's automatic weights depend on all its frames
        mine = np.array_split(np.arange(len(chunk_ranges(n, config.batch_size))), k)[i]
        if len(mine) == 0:
            raise JregfixError(f"shard {i}/{k} of {n} frames ({config.batch_size} per batch) is "
                               "empty; use fewer shards")
        rows = rows[mine[0] * config.batch_size:min((mine[-1] + 1) * config.batch_size, n)]

    # the device *type* decides the numbers; which GPU a rank uses does not
    record = stage_record("refine", {"init": init, "gt": gt, "silhouettes": silhouettes,
                                     "joint_regressor": joint_regressor, "body": body_file},
                          {**asdict(config), "shard": list(shard) if shard else None,
                           "body": body.name, "device": torch.device(device).type}, config.seed)
    chunks = out.with_name(out.name + ".chunks")
    group = config.batches_per_disc_step or _unfinished_group(chunks, record) or ranks.world_size
    if group % ranks.world_size:
        raise JregfixError(f"{group} batches per discriminator step (recorded in {chunks} when "
                           "not given) cannot be dealt out to "
                           f"{ranks.world_size} processes: use a number of processes that "
                           "divides it, or pass --batches-per-disc-step (a new value restarts)")
    record["config"]["batches_per_disc_step"] = group
    with ranks.main_first():
        store = ChunkStore(chunks, record, nan_marks=NAN_MARKS)
    ranges = chunk_ranges(len(rows), config.batch_size)
    dev = torch.device(device)
    dtype = body.template.dtype
    torch.manual_seed(config.seed)
    disc = Discriminators(body.num_joints, body.num_betas, config.disc_lr).to(dev)
    adversarial = config.weights.get("adversarial", 1.0) > 0
    j_t = torch.from_numpy(j_reg).to(dev, dtype)
    gt_joints = gtd.joints17()
    gt_joints = gt_joints - gt_joints[:, :1]
    empty = ~(sil.masks.reshape(n, -1).any(1) & sil.found)
    if keypoints is not None:
        kp_crop = image_to_crop(keypoints[..., :2], gtd.center, gtd.scale, KEYPOINT_RES)
        kp_visible = (keypoints[..., 2] > 0).astype(np.float64)

    def masks_of(idx: np.ndarray) -> np.ndarray:
        masks = sil.masks[idx] & sil.found[idx, None, None]
        if masks.shape[1] != config.image_size:
            return resample_crops(masks, config.image_size)
        return masks

    def batch_of(idx: np.ndarray) -> Batch:
        kp = {} if keypoints is None else {
            "keypoints": torch.from_numpy(kp_crop[idx]).to(dev, dtype),
            "visible": torch.from_numpy(kp_visible[idx]).to(dev, dtype)}
        return Batch(
            rotmat=pose_to_rotmat(torch.from_numpy(params.pose[idx]).to(dev, dtype),
                                  body.num_joints),
            betas=fit_betas(torch.from_numpy(params.betas[idx]).to(dev, dtype), body.num_betas),
            cam_t=torch.from_numpy(cam_t0[idx]).to(dev, dtype),
            gt_joints=torch.from_numpy(gt_joints[idx]).to(dev, dtype),
            masks=torch.from_numpy(masks_of(idx)).to(dev, dtype),
            has_mask=torch.from_numpy(~empty[idx]).to(dev),
            **kp,
        )

    t0 = time.time()
    done_frames, resumed = 0, 0
    shown = [0.0]  # when the live losses were last reported
    slots = group // ranks.world_size
    for first in range(0, len(ranges), group):
        members = list(range(first, min(first + group, len(ranges))))
        grads = None
        for slot, ci in enumerate(members[ranks.rank::ranks.world_size]):
            idx = rows[ranges[ci][0]:ranges[ci][1]]
            batch = batch_of(idx)
            reused = store.done(ci)
            if reused:  # finished by an earlier run: keep it, replay its D gradient
                res = store.load(ci)
                resumed += 1
            else:
                def on_iter(it, live, done=done_frames):
                    now = time.monotonic()
                    edge = it in (0, config.iters - 1) and not any(
                        k.startswith("warmup_") for k in live)
                    if progress is None or (not edge and now - shown[0] < LIVE_SECONDS):
                        return
                    shown[0] = now
                    values = torch.stack(list(live.values())).tolist()  # one device read
                    progress(done, {"iter": it, **dict(zip(live, values, strict=True))})

                res = refine_batch(body, j_t, batch, disc, config, on_iter)
                res.pop("weights")
                res["rows"] = idx
            if adversarial:
                loss, grad = discriminator_gradient(disc, batch, res)
                res["disc_loss"] = np.full(len(idx), loss)
                if grads is None:
                    grads = torch.zeros(slots, grad.numel(), dtype=grad.dtype, device=dev)
                grads[slot] = grad
            else:
                res["disc_loss"] = np.full(len(idx), np.nan)
            if not reused:
                store.save(ci, **res)
            done_frames += len(idx)
            if progress is not None:
                progress(done_frames, {})
        if adversarial:
            _shared_disc_step(disc, ranks, grads, len(members), slots)

    merged = merged_chunks(store, len(ranges), ranks)  # waits for every rank's chunks
    if ranks.is_main:
        result = _assemble(merged, gtd.imgname)
        summary = {
            "frames": int(len(rows)),
            "empty_masks": int(empty[rows].sum()),
            "iou_before": float(np.nanmean(result["iou_before"])),
            "iou_after": float(np.nanmean(result["iou_after"])),
            "joint_err_before_mm": float(result["joint_err_before_mm"].mean()),
            "joint_err_after_mm": float(result["joint_err_after_mm"].mean()),
            "geodesic_to_init_deg": float(result["geodesic_to_init_deg"].mean()),
            "seconds": time.time() - t0,
            "processes": ranks.world_size,
            "j2d_term": "on" if j2d else "off: weight 0" if keypoints is not None
            else "off: no 'part' in the GT file",
        }
        for when in ("before", "after"):
            errs = result.get(f"j2d_err_{when}_px")
            if errs is not None and np.isfinite(errs).any():
                summary[f"j2d_err_{when}_px"] = float(np.nanmean(errs))
    resumed = int(ranks.all_reduce_sum(torch.tensor([resumed], dtype=torch.int64)))
    if ranks.is_main:
        summary["resumed_chunks"] = resumed
        write_output(out, npz_bytes(**result), record, "refined",
                     extra={"summary": summary, "joint_regressor_provenance": prov,
                            "numerics": numerics_record(dev)})
        store.remove()
    ranks.barrier()  # the output exists when any rank returns
    if not ranks.is_main:
        summary = (read_manifest(manifest_path(out)) or {}).get("summary", {})
    return summary


def _unfinished_group(chunks: Path, record: dict) -> int | None:
    """The batches per discriminator step of an unfinished run of this same computation, so
    that re-running with another number of processes resumes it instead of starting over."""
    tag = read_manifest(chunks / ChunkStore.TAG_FILE)
    if not tag or not isinstance(tag.get("config"), dict):
        return None
    def without_group(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "batches_per_disc_step"}

    new = {**fingerprint(record), "versions": versions()}
    same = ({**tag, "config": without_group(tag["config"])}
            == {**new, "config": without_group(new["config"])})
    group = tag["config"].get("batches_per_disc_step")
    return group if same and isinstance(group, int) else None


def _shared_disc_step(disc: Discriminators, ranks: Ranks, grads: torch.Tensor | None,
                      members: int, slots: int) -> None:
    """One discriminator step on the mean gradient of a group's ``members`` batches.

    Batch j of the group was refined by rank j mod W in its slot j // W; the gradients are
    gathered from every rank and added in batch order, so the sum (and every rank's copy of
    the discriminators) is the same bit for bit for any number of processes.
    """
    if grads is None:  # this rank had no batch in the group (the last one may be short)
        size = sum(p.numel() for p in disc.parameters())
        dtype = next(disc.parameters()).dtype
        grads = torch.zeros(slots, size, dtype=dtype, device=next(disc.parameters()).device)
    gathered = ranks.all_gather(grads)  # (W, slots, P)
    total = torch.zeros_like(grads[0])
    for j in range(members):
        total += gathered[j % ranks.world_size, j // ranks.world_size]
    disc.step(total / members)


@locks_output("out")
def merge_refined(parts: list[str | Path], out: str | Path) -> dict:
    """Join the outputs of ``refine --shard i/n`` runs (all n, of one run) into ``out``.

    Each shard had its own discriminators (array jobs share nothing); the merged file records
    that. Rows must cover every GT frame exactly once.
    """
    if not parts:
        raise JregfixError("--merge needs the shard outputs")
    refuse_overwriting_inputs({"PARTS": parts}, {"--out": out})
    docs = []
    for part in parts:
        doc = read_sidecar(part)
        if doc is None or doc.get("stage") != "refine" or not doc["config"].get("shard"):
            raise JregfixError(f"{part}: not the output of `refine --shard` (no shard manifest)")
        docs.append(doc)
    common = {k: v for k, v in fingerprint(docs[0]).items() if k != "config"}
    config = {k: v for k, v in docs[0]["config"].items() if k != "shard"}
    for part, doc in zip(parts, docs, strict=True):
        same = ({k: v for k, v in fingerprint(doc).items() if k != "config"} == common
                and {k: v for k, v in doc["config"].items() if k != "shard"} == config)
        if not same:
            raise JregfixError(f"{part} belongs to a different run than {parts[0]} "
                               "(inputs, config or seed differ)")
    shards = [tuple(d["config"]["shard"]) for d in docs]
    count = shards[0][1]
    order = sorted(range(len(parts)), key=lambda i: shards[i])
    if [shards[i] for i in order] != [(i, count) for i in range(count)]:
        raise JregfixError(f"--merge needs shards 0..{count - 1} of {count} once each; got "
                           f"{sorted(f'{i}/{n}' for i, n in shards)}")
    arrays = [read_npz(parts[i], "refine shard output") for i in order]
    derived = ("pose", "pose_6d", "camera", "imgname")  # recomputed over all rows at once
    merged = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0] if k not in derived}
    if not np.array_equal(merged["rows"], np.arange(len(merged["rows"]))):
        raise JregfixError("the shards' rows do not cover the GT frames exactly once")
    imgname = np.concatenate([a["imgname"] for a in arrays])
    merged = _assemble(merged, imgname)
    record = {k: docs[0][k] for k in ("stage", "inputs", "seed")}
    record["config"] = {**config, "shard": None, "shards": count}
    summary = {"frames": int(len(merged["rows"])), "shards": count,
               "discriminators": "one per shard (array jobs); torchrun shares one across ranks"}
    write_output(out, npz_bytes(**merged), record, "refined",
                 extra={"summary": summary, "merged_from": describe_inputs(
                     {f"shard_{shards[i][0]}": parts[i] for i in order})})
    return summary


def _assemble(merged: dict, imgname: np.ndarray) -> dict:
    rot = torch.from_numpy(merged["pred_rotmat"])
    out = dict(merged)
    out["pose"] = rotmat_to_axis_angle(rot).reshape(len(rot), -1).numpy()
    out["pose_6d"] = rotmat_to_rot6d(rot).reshape(len(rot), -1).numpy()
    out["camera"] = cam_t_to_weak(torch.from_numpy(merged["cam_t"])).numpy()
    out["imgname"] = imgname[merged["rows"]]
    return out
