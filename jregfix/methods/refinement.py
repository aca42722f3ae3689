"""SMPL fits refined against 3D joints, 2D keypoints and silhouettes (Hedlin et al. §3).

Tensors in, tensors out: :func:`refine` takes initial SMPL parameters and the targets of N
frames as arrays and returns the refined parameters and per-frame metrics
(:class:`RefineResult`); the `refine` stage (``jregfix.stages.refine``) reads the files, deals
batches to ranks, saves resumable chunks and writes the manifest around the same
:class:`Refiner`.

Per frame, starting from the initial estimate (SPIN's), minimise

    w_j L_joint + w_2d L_2d + w_s L_silhouette + w_a (L_adv,pose + L_adv,shape)

* L_joint: mean squared distance (m²) between the root-relative joints J·mesh and the
  root-relative GT joints (17 Human3.6M joints, row 0 = pelvis). J is J_spin, a regressor
  fitted to SPIN's own meshes (the stage refuses one fitted on refined meshes: drift).
* L_2d: mean over the visible joints of the squared distance (px² of a 224 crop, whatever
  ``image_size``) between the joints projected by the crop camera and the GT 2D keypoints
  (the stage maps SPIN's ``part``, original-image pixels, into the crop with
  :func:`jregfix.geometry.crop.image_to_crop`). Invisible joints are ignored; without
  keypoints there is no such term.
* L_silhouette: mean squared difference between the soft silhouette (our SoftRas renderer, SPIN's
  crop camera: f = 5000 px, centre 112, 224²) and the person mask; ``chamfer`` swaps in the
  cheap boundary loss. Frames whose mask is empty (no person found) get no silhouette term.
  The default blur is sigma = 0.1 px², below the paper's 1.25 px² (PyTorch3D's 1e-4 at 224²):
  SoftRas's union over the many edge-on faces at a body's outline spills coverage outward by
  about sqrt(sigma ln k) px, so an MSE against a hard mask shrinks the body; on the synthetic
  test world (64² and 128² crops, 25 iterations) the mean IoU reached 0.78 / 0.89 at 0.25 px²
  and 0.86 / 0.92 at 0.1 px².
* L_adv: a pose discriminator on 24 SPIN-6D rotations and a shape discriminator on betas, trained
  online as a least-squares GAN (the initial estimates real, refined ones fake), updated once
  per group of optimised batches with Adam (lr 1e-3); the refined frame pays ||1 - D(θ)||².
  Both real and fake 6D are orthonormalised first, so the discriminator cannot tell them apart
  by the (arbitrary) scale of SPIN's raw 6D output.

The camera is optimised as SPIN's weak-perspective (s, tx, ty) and turned into the translation
(tx, ty, 2f/(224 s)) for rendering: with tz ≈ 50 m an Adam step of 1e-2 on tz moves the body by
0.02 %, on s by about 1 %, so depth errors of a few metres are correctable in 100 iterations.
``camera_warmup`` N > 0 first runs N Adam steps (same lr) on the camera alone, pose and shape
fixed, on L_2d (or on L_silhouette without keypoints), as the authors' released code does
(1,000 steps); it is part of each batch's computation.

Weights: the paper weights the terms to be of about equal magnitude at the first iteration. A
term with no explicit weight is therefore scaled to 1 at the first iteration of the joint
optimisation of each batch (w = 1 / max(L(θ₀), floor)); an explicit weight overrides, 0
disables. The released code uses fixed weights instead: :data:`PRESETS` ``hedlin-code`` maps
them onto these terms (docs/deviations.md lists every difference from the paper and the code).
Adam (lr 1e-2, betas 0.9/0.999), 100 iterations, per batch of ``batch_size`` frames.

Batches run in order. The discriminators take one Adam step per *group* of
``batches_per_disc_step`` batches (default 1), on the mean of the group's per-batch gradients,
each computed from the batch's refined arrays; every batch of a group is refined against the
same discriminators. The result therefore depends on the batch size and the grouping, and on
nothing else: the same inputs, config and seed give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from jregfix.body.base import BodyModel, fit_betas
from jregfix.body.rotations import (
    pose_to_rotmat,
    rot6d_to_rotmat,
    rotmat_to_axis_angle,
    rotmat_to_rot6d,
)
from jregfix.errors import JregfixError
from jregfix.geometry.camera import (
    IMG_RES,
    PinholeCamera,
    cam_t_to_weak,
    project,
    spin_focal,
    weak_to_cam_t,
)
from jregfix.geometry.crop import resample_crops
from jregfix.geometry.metrics import mask_iou
from jregfix.io.manifest import chunk_ranges
from jregfix.io.regressors import checked_regressor, validate_regressor
from jregfix.models.discriminator import (
    PoseDiscriminator,
    ShapeDiscriminator,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from jregfix.render.chamfer import chamfer_silhouette_loss
from jregfix.render.silhouette import hard_silhouette, soft_silhouette

TERMS = ("joint", "j2d", "silhouette", "adversarial")
# Floors of the automatic weights: below these a term is "already solved" and is not blown up.
WEIGHT_FLOORS = {"joint": 1e-6, "j2d": 1e-2, "silhouette": 1e-4, "adversarial": 1e-4}
KEYPOINT_RES = IMG_RES  # L_2d is measured in pixels of a 224 crop at any image_size

OnIter = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class RefineConfig:
    """The optimisation's settings (the module docstring explains each term and weight)."""

    iters: int = 100
    camera_warmup: int = 0  # Adam steps on the camera alone before the joint optimisation
    lr: float = 1e-2
    batch_size: int = 16
    weights: dict[str, float] = field(default_factory=dict)  # missing terms: automatic
    silhouette_loss: str = "soft"  # "soft" (SoftRas MSE) or "chamfer"
    sigma: float = 0.1  # px², soft silhouette blur (see the module docstring)
    disc_lr: float = 1e-3
    image_size: int = IMG_RES  # crop side in px; the focal scales with it (same field of view)
    seed: int = 0
    # batches whose discriminator gradients are averaged into one step; None: one per process
    batches_per_disc_step: int | None = None

    @property
    def focal(self) -> float:
        return spin_focal(self.image_size)

    def validate(self) -> None:
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise JregfixError(f"unknown loss term(s) {sorted(unknown)}; terms are {TERMS}")
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()):
            raise JregfixError(f"loss weights must be finite and >= 0, got {self.weights}")
        if self.iters < 0 or self.batch_size < 1 or self.camera_warmup < 0:
            raise JregfixError(
                "iters >= 0, camera warm-up >= 0 and batch size >= 1 are required "
                f"(--iters {self.iters}, --camera-warmup {self.camera_warmup}, "
                f"--batch-size {self.batch_size})"
            )
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

    def active_terms(self, keypoints: bool) -> list[str]:
        """The terms optimised: weight > 0, and the 2D term only with ``keypoints``."""
        return [t for t in TERMS if self.weights.get(t, 1.0) > 0 and (t != "j2d" or keypoints)]


def hedlin_code_preset(image_size: int = IMG_RES) -> dict:
    """The settings of the authors' released optimisation, as :class:`RefineConfig` fields.

    Their loss is j2d/100 + silhouette·100 + j3d·1e4 + (pose + shape generator)·10, each an
    element-wise mean (torch MSELoss). Ours sum over coordinates, so their 2D term (mean over
    17 x 2 values) is L_2d / 2 and their 3D term (17 x 3 values) is L_joint / 3; the silhouette
    (mean over pixels) and adversarial terms (mean over the 25 pose outputs, plus the shape
    output) are normalised alike. Batch 256, 1,000 camera warm-up steps; their silhouette blur
    (PyTorch3D sigma 1e-4 in NDC²) in px² at ``image_size``. docs/deviations.md has the rest.
    """
    return {
        "weights": {"j2d": 1 / 100 / 2, "silhouette": 100.0, "joint": 1e4 / 3, "adversarial": 10.0},
        "batch_size": 256,
        "camera_warmup": 1000,
        "silhouette_loss": "soft",
        "sigma": 1e-4 * (image_size / 2) ** 2,
    }


PRESETS = {"hedlin-code": hedlin_code_preset}


class Discriminators(torch.nn.Module):
    """The pose and shape discriminators and their Adam optimiser.

    An update is split in two so that it can be shared: :meth:`gradient` of one batch's LSGAN
    loss (flattened), then :meth:`step_mean` of a group of batches' gradients.
    """

    def __init__(self, num_joints: int, num_betas: int, lr: float):
        super().__init__()
        self.pose = PoseDiscriminator(num_joints)
        self.shape = ShapeDiscriminator(num_betas)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))

    def generator_loss(self, rot6d: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """(B,) adversarial cost of the current estimate (gradients reach rot6d and betas)."""
        return lsgan_generator_loss(self.pose(rot6d)) + lsgan_generator_loss(self.shape(betas))

    def gradient(
        self,
        real6d: torch.Tensor,
        real_betas: torch.Tensor,
        fake6d: torch.Tensor,
        fake_betas: torch.Tensor,
    ) -> tuple[float, torch.Tensor]:
        """One batch's LSGAN loss (real: initial estimates, fake: refined) and its gradient
        with respect to every parameter, flattened to (P,)."""
        loss = lsgan_discriminator_loss(
            self.pose(real6d), self.pose(fake6d)
        ) + lsgan_discriminator_loss(self.shape(real_betas), self.shape(fake_betas))
        grads = torch.autograd.grad(loss, list(self.parameters()))
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    def step(self, gradient: torch.Tensor) -> None:
        """One Adam step along a flattened (P,) gradient."""
        offset = 0
        for p in self.parameters():
            p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.opt.step()

    def step_mean(self, gradients: Sequence[torch.Tensor]) -> None:
        """One Adam step along the mean of (P,) gradients, added in the given (batch) order,
        so that any split of the batches over processes gives the same bits."""
        total = torch.zeros_like(gradients[0])
        for g in gradients:
            total += g
        self.step(total / len(gradients))


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


def make_batch(
    body: BodyModel,
    pose: np.ndarray,
    betas: np.ndarray,
    cam_t: np.ndarray,
    gt_joints: np.ndarray,
    masks: np.ndarray,
    has_mask: np.ndarray,
    keypoints: np.ndarray | None = None,
    visible: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> Batch:
    """A :class:`Batch` on ``device`` in the body's dtype from B frames' arrays: pose in any
    layout of :func:`pose_to_rotmat` (B, ...), betas (B, S' <= S), cam_t (B, 3), root-relative
    gt_joints (B, 17, 3), masks (B, H, W) bool or float, has_mask (B,) bool, keypoints (B, 17, 2)
    in px of a 224 crop with visible (B, 17)."""
    dtype = body.template.dtype

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, dtype)

    kp = (
        {}
        if keypoints is None or visible is None
        else {"keypoints": t(keypoints), "visible": t(visible)}
    )
    return Batch(
        rotmat=pose_to_rotmat(t(pose), body.num_joints),
        betas=fit_betas(t(betas), body.num_betas),
        cam_t=t(cam_t),
        gt_joints=t(gt_joints),
        masks=t(masks),
        has_mask=torch.from_numpy(has_mask).to(device),
        **kp,
    )


def orthonormal_6d(rot6d: torch.Tensor) -> torch.Tensor:
    """Map any 6D to the 6D of its Gram-Schmidt rotation (the discriminator's input space)."""
    return rotmat_to_rot6d(rot6d_to_rotmat(rot6d))


def regress(j_reg: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """(K,V) regressor, (B,V,3) vertices -> (B,K,3) joints."""
    return torch.einsum("kv,bvc->bkc", j_reg, verts)


def root_relative_joints(j_reg: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """(K,V) regressor, (B,V,3) vertices -> (B,K,3) joints minus joint 0 (the pelvis)."""
    joints = regress(j_reg, verts)
    return joints - joints[:, :1]


def _keypoint_offsets(joints, camera, cam_t, keypoints, image_size: int) -> torch.Tensor:
    """(B,K,2) joints (B,K,3) projected by ``camera`` at ``image_size`` minus keypoints (B,K,2),
    both in px of a 224 crop (the GT keypoints' frame)."""
    return project(joints, camera, cam_t) * (KEYPOINT_RES / image_size) - keypoints


def reprojection_sq(
    joints: torch.Tensor,
    camera: PinholeCamera,
    cam_t: torch.Tensor,
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """(B,) L_2d: mean over visible joints of the squared distance (px² of a 224 crop) between
    joints (B,K,3) projected by ``camera`` at ``image_size`` and keypoints (B,K,2) in 224-crop
    px; visible (B,K) float. 0 for a frame without visible joints."""
    d2 = (_keypoint_offsets(joints, camera, cam_t, keypoints, image_size) ** 2).sum(-1)
    return (d2 * visible).sum(-1) / visible.sum(-1).clamp_min(1)


def reprojection_error(
    joints: torch.Tensor,
    camera: PinholeCamera,
    cam_t: torch.Tensor,
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """(B,) mean 2D distance (px of a 224 crop) over visible joints; NaN without any."""
    dist = _keypoint_offsets(joints, camera, cam_t, keypoints, image_size).norm(dim=-1)
    count = visible.sum(-1)
    return torch.where(
        count > 0,
        (dist * visible).sum(-1) / count.clamp_min(1),
        torch.full_like(count, float("nan")),
    )


def silhouette_term(
    kind: str,
    verts: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    cam_t: torch.Tensor,
    masks: torch.Tensor,
    has_mask: torch.Tensor,
    size: int,
    sigma: float,
) -> torch.Tensor:
    """(B,) silhouette loss of vertices (B,V,3) against masks (B,size,size); zero for frames
    without a mask (has_mask (B,) bool)."""
    if kind == "soft":
        sil = soft_silhouette(verts, faces, camera, size, cam_t=cam_t, sigma=sigma)
        per = ((sil - masks) ** 2).mean((1, 2))
    else:
        per = chamfer_silhouette_loss(verts, faces, camera, masks > 0.5, cam_t=cam_t)
        per = per.reshape(-1)
    return per * has_mask.to(per.dtype)


def geodesic_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean rotation angle (degrees) between (B,J,3,3) sets, over joints 1.. (body joints)."""
    rel = a[:, 1:].transpose(-1, -2) @ b[:, 1:]
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).mean(1)


def refine_batch(
    body: BodyModel,
    j_reg: torch.Tensor,
    batch: Batch,
    disc: Discriminators,
    config: RefineConfig,
    on_iter: OnIter | None = None,
) -> dict:
    """Optimise one batch against fixed discriminators; return refined params and metrics.

    Returns numpy arrays (B, ...): ``pred_rotmat``, ``betas``, ``cam_t``, the metrics of
    :func:`batch_metrics`, ``loss_<term>_initial`` / ``_final``; and ``weights`` {term: w}.
    ``on_iter(it, means)`` gets each term's batch mean as a 0-dim tensor on the device: reading
    it (``float``) waits for the GPU, so callers do that only when they display it. Camera
    warm-up steps report ``{"warmup_<term>": loss}``."""
    b = batch.rotmat.shape[0]
    camera = PinholeCamera.spin_crop(
        b, config.focal, config.image_size, batch.betas.dtype, batch.betas.device
    )
    faces = body.faces
    init6d = rotmat_to_rot6d(batch.rotmat)
    pose6d = init6d.clone().requires_grad_(True)
    betas = batch.betas.clone().requires_grad_(True)
    weak = cam_t_to_weak(batch.cam_t).requires_grad_(True)
    active = config.active_terms(batch.keypoints is not None)
    weights: dict[str, float] = {}
    for p in disc.parameters():
        p.requires_grad_(False)

    def silhouette(verts, cam_t):
        return silhouette_term(
            config.silhouette_loss,
            verts,
            faces,
            camera,
            cam_t,
            batch.masks,
            batch.has_mask,
            config.image_size,
            config.sigma,
        )

    def reprojection(joints, cam_t):
        assert batch.keypoints is not None and batch.visible is not None  # "j2d" is active
        return reprojection_sq(
            joints, camera, cam_t, batch.keypoints, batch.visible, config.image_size
        )

    if config.camera_warmup:
        term = "j2d" if "j2d" in active else "silhouette"
        if term not in active:
            raise JregfixError(
                "the camera warm-up needs the 2D term (GT 'part') or the "
                "silhouette term; enable one or set --camera-warmup 0"
            )
        with torch.no_grad():  # pose and shape stay fixed: one mesh for every step
            verts0 = body.vertices(rot6d_to_rotmat(pose6d), betas)
            joints0 = regress(j_reg, verts0)
        cam_opt = torch.optim.Adam([weak], lr=config.lr, betas=(0.9, 0.999))
        for step in range(config.camera_warmup):
            cam_t = weak_to_cam_t(weak)
            loss = (
                reprojection(joints0, cam_t) if term == "j2d" else silhouette(verts0, cam_t)
            ).mean()
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
        # `active` is never empty (config.validate, refine), so the sum is a tensor
        total = cast(torch.Tensor, sum(weights[k] * means[k] for k in means))
        opt.zero_grad()
        total.backward()
        opt.step()
        if on_iter is not None:
            on_iter(it, {k: v.detach() for k, v in means.items()})
    for p in disc.parameters():
        p.requires_grad_(True)

    with torch.no_grad():
        out: dict[str, Any] = batch_metrics(
            body,
            j_reg,
            batch,
            rot6d_to_rotmat(pose6d),
            betas.detach(),
            weak_to_cam_t(weak),
            camera,
            config.image_size,
        )
    out.update(
        {
            f"loss_{k}_{when}": history[when][k].cpu().numpy()
            for when in ("initial", "final")
            for k in history[when]
        }
    )
    out["weights"] = weights
    return out


def discriminator_gradient(
    disc: Discriminators, batch: Batch, refined: Mapping[str, np.ndarray]
) -> tuple[float, torch.Tensor]:
    """The discriminators' loss and gradient for one batch, computed from the refined arrays
    (``pred_rotmat`` (B,J,3,3), ``betas`` (B,S)) as saved, so that a resumed run replays
    exactly the same update."""
    fake_rot = torch.from_numpy(refined["pred_rotmat"]).to(batch.betas.device)
    fake_betas = torch.from_numpy(refined["betas"]).to(batch.betas.device)
    return disc.gradient(
        rotmat_to_rot6d(batch.rotmat), batch.betas, rotmat_to_rot6d(fake_rot), fake_betas
    )


def batch_metrics(
    body: BodyModel,
    j_reg: torch.Tensor,
    batch: Batch,
    rot: torch.Tensor,
    betas: torch.Tensor,
    cam_t: torch.Tensor,
    camera: PinholeCamera,
    size: int,
) -> dict[str, np.ndarray]:
    """The refined parameters (rot (B,J,3,3), betas, cam_t) and per-frame metrics before and
    after, as numpy (B, ...) arrays: hard-silhouette IoU against the mask (NaN without a mask),
    root-relative joint error (mm), 2D error (px of a 224 crop; NaN without visible joints;
    only with keypoints), mean geodesic distance to the initial pose (degrees)."""
    masks = batch.masks > 0.5
    v0 = body.vertices(batch.rotmat, batch.betas)
    v1 = body.vertices(rot, betas)
    # frames without a mask have no IoU (NaN), so they do not pull the means down
    no_mask = ~batch.has_mask
    iou0 = mask_iou(hard_silhouette(v0, body.faces, camera, size, cam_t=batch.cam_t), masks)
    iou1 = mask_iou(hard_silhouette(v1, body.faces, camera, size, cam_t=cam_t), masks)
    iou0, iou1 = (x.masked_fill(no_mask, float("nan")) for x in (iou0, iou1))

    def err(v: torch.Tensor) -> torch.Tensor:
        return (root_relative_joints(j_reg, v) - batch.gt_joints).norm(dim=-1).mean(-1)

    out = {}
    if batch.keypoints is not None and batch.visible is not None:
        for when, v, t in (("before", v0, batch.cam_t), ("after", v1, cam_t)):
            out[f"j2d_err_{when}_px"] = (
                reprojection_error(
                    regress(j_reg, v), camera, t, batch.keypoints, batch.visible, size
                )
                .cpu()
                .numpy()
            )
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


class Refiner:
    """Refines batch after batch against discriminators trained along the way.

    ``body`` (on the device to compute on), ``regressor`` (17, V) J_spin; seeds torch's global
    generator with ``config.seed`` and builds the discriminators. Per batch: :meth:`refine`,
    then (with the adversarial term) :meth:`disc_gradient`; per group of batches
    :meth:`disc_step` with the group's gradients in batch order.
    """

    def __init__(self, body: BodyModel, regressor: np.ndarray, config: RefineConfig):
        self.body, self.config = body, config
        device, dtype = body.template.device, body.template.dtype
        torch.manual_seed(config.seed)
        self.disc = Discriminators(body.num_joints, body.num_betas, config.disc_lr).to(device)
        self.adversarial = config.weights.get("adversarial", 1.0) > 0
        self.regressor = torch.from_numpy(regressor).to(device, dtype)

    def refine(self, batch: Batch, on_iter: OnIter | None = None) -> dict[str, np.ndarray]:
        """:func:`refine_batch` of one batch: its refined arrays and metrics."""
        res = refine_batch(self.body, self.regressor, batch, self.disc, self.config, on_iter)
        res.pop("weights")
        return res

    def disc_gradient(self, batch: Batch, refined: dict[str, np.ndarray]) -> torch.Tensor:
        """The batch's discriminator gradient (P,); records its loss as ``disc_loss`` (B,)."""
        loss, grad = discriminator_gradient(self.disc, batch, refined)
        refined["disc_loss"] = np.full(len(refined["betas"]), loss)
        return grad

    def disc_step(self, gradients: Sequence[torch.Tensor]) -> None:
        self.disc.step_mean(gradients)


def derived_arrays(rotmat: np.ndarray, cam_t: np.ndarray) -> dict[str, np.ndarray]:
    """The refined parameters in the other layouts an output carries: ``pose`` (N, 3J)
    axis-angle, ``pose_6d`` (N, 6J) and ``camera`` (N, 3) SPIN weak perspective (s, tx, ty)."""
    rot = torch.from_numpy(rotmat)
    return {
        "pose": rotmat_to_axis_angle(rot).reshape(len(rot), -1).numpy(),
        "pose_6d": rotmat_to_rot6d(rot).reshape(len(rot), -1).numpy(),
        "camera": cam_t_to_weak(torch.from_numpy(cam_t)).numpy(),
    }


def metric_means(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of the per-frame metrics over frames (IoU and 2D error ignore NaN frames)."""
    means = {
        "iou_before": float(np.nanmean(arrays["iou_before"])),
        "iou_after": float(np.nanmean(arrays["iou_after"])),
        "joint_err_before_mm": float(arrays["joint_err_before_mm"].mean()),
        "joint_err_after_mm": float(arrays["joint_err_after_mm"].mean()),
        "geodesic_to_init_deg": float(arrays["geodesic_to_init_deg"].mean()),
    }
    for when in ("before", "after"):
        errs = arrays.get(f"j2d_err_{when}_px")
        if errs is not None and np.isfinite(errs).any():
            means[f"j2d_err_{when}_px"] = float(np.nanmean(errs))
    return means


@dataclass
class RefineResult:
    """Refined SMPL parameters of N frames and per-frame metrics (numpy arrays, float in the
    body's dtype unless stated).

    rotmat (N, J, 3, 3), pose (N, 3J) axis-angle, pose_6d (N, 6J), betas (N, S), cam_t (N, 3)
    metres, camera (N, 3) SPIN's (s, tx, ty). ``metrics``: per-frame (N,) arrays ``iou_before``
    / ``iou_after`` (float64, NaN without a mask), ``joint_err_before_mm`` / ``_after_mm``
    (root-relative, under the refining regressor), ``geodesic_to_init_deg``, ``has_mask``,
    ``disc_loss`` (NaN without the adversarial term), ``loss_<term>_initial`` / ``_final``
    and, with keypoints, ``j2d_err_before_px`` / ``_after_px``.
    """

    rotmat: np.ndarray
    pose: np.ndarray
    pose_6d: np.ndarray
    betas: np.ndarray
    cam_t: np.ndarray
    camera: np.ndarray
    metrics: dict[str, np.ndarray]

    def summary(self) -> dict[str, float]:
        """Means over frames of the before / after metrics."""
        return metric_means(self.metrics)


def refine(
    body: BodyModel,
    regressor: np.ndarray | torch.Tensor,
    pose: np.ndarray | torch.Tensor,
    betas: np.ndarray | torch.Tensor,
    cam_t: np.ndarray | torch.Tensor,
    joints: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    config: RefineConfig | None = None,
    *,
    keypoints: np.ndarray | torch.Tensor | None = None,
    visible: np.ndarray | torch.Tensor | None = None,
    has_mask: np.ndarray | torch.Tensor | None = None,
    seed: int | None = None,
) -> RefineResult:
    """Refine N frames' SMPL fits toward their GT joints, keypoints and masks, in memory.

    The same computation as the `refine` command on one process (same inputs, config and seed:
    the same bits), without files: batches of ``config.batch_size`` frames in order, the
    discriminators stepping once per ``config.batches_per_disc_step`` (default 1) batches.
    Computes on the body's device and in its dtype.

    Args:
        body: the body model, e.g. :func:`jregfix.load_body_model`'s SMPL (J = 24 rotations,
            S betas, V vertices).
        regressor: (17, V) J_spin, the joint regressor fitted to the initial meshes.
        pose: (N, ...) initial pose in any layout of
            :func:`jregfix.body.rotations.pose_to_rotmat`: axis-angle (N, 3J), rotation
            matrices (N, J, 3, 3), SPIN 6D (N, J, 6). Global orientation first, in SPIN's camera
            frame (x right, y down, z forward).
        betas: (N, S') initial shape, S' <= S (missing coefficients are zero).
        cam_t: (N, 3) initial camera translation (metres); SPIN's (s, tx, ty) converts with
            :func:`jregfix.geometry.camera.weak_to_cam_t`.
        joints: (N, 17, 3) GT joints (metres, Human3.6M order, pelvis first); only their
            root-relative positions matter.
        masks: (N, H, H) person masks of the crop (bool, or float coverage); resampled by a box
            filter when H differs from ``config.image_size``.
        config: the optimisation's settings (default :class:`RefineConfig`).
        keypoints: (N, 17, 2) GT 2D joints in px of SPIN's 224 crop, with ``visible``
            (N, 17) (1 = visible); without them there is no 2D term.
        has_mask: (N,) bool, frames with a usable mask (default: those whose mask is not
            empty); the others get no silhouette term and NaN IoU.
        seed: replaces ``config.seed`` (it seeds the discriminators).

    Returns:
        :class:`RefineResult`: the refined parameters and per-frame metrics.
    """
    config = config or RefineConfig()
    if seed is not None:
        config = replace(config, seed=seed)
    config.validate()
    pose = _array(pose, "pose")
    rows = len(pose)
    arrays = {
        "pose": pose,
        "betas": _array(betas, "betas", (rows, -1)),
        "cam_t": _array(cam_t, "cam_t", (rows, 3)),
        "joints": _array(joints, "joints", (rows, 17, 3)),
    }
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise JregfixError(f"{name}: contains NaN or inf")
    try:  # the layout, told by the shape
        pose_to_rotmat(torch.from_numpy(pose[:1]), body.num_joints)
    except ValueError:
        j = body.num_joints
        raise JregfixError(
            f"pose: shape {pose.shape} is none of axis-angle (N, {3 * j}), 6D "
            f"(N, {j}, 6) / (N, {6 * j}), rotation matrices (N, {j}, 3, 3)"
        ) from None
    if arrays["betas"].shape[1] > body.num_betas:
        raise JregfixError(
            f"betas: {arrays['betas'].shape[1]} coefficients but the body model "
            f"has {body.num_betas}"
        )
    mask = _array(masks, "masks", (rows, -1, -1), check_finite=True)
    if mask.shape[1] != mask.shape[2]:
        raise JregfixError(f"masks: {mask.shape[1]}x{mask.shape[2]} crops, expected square")
    found = np.asarray(mask.reshape(rows, -1).any(1))
    if has_mask is not None:
        found &= _array(has_mask, "has_mask", (rows,)).astype(bool)
    mask = mask * found[:, None, None]  # a frame without a usable mask has an empty one
    if mask.shape[1] != config.image_size:
        mask = resample_crops(mask, config.image_size)
    gt = arrays["joints"] - arrays["joints"][:, :1]
    kp = vis = None
    if keypoints is not None:
        if visible is None:
            raise JregfixError("keypoints need `visible` (N, 17): 1 for a visible joint")
        kp = _array(keypoints, "keypoints", (rows, 17, 2), check_finite=True)
        vis = _array(visible, "visible", (rows, 17), check_finite=True)
    if not config.active_terms(kp is not None):
        raise JregfixError(
            "without keypoints every other loss term has weight 0: nothing to optimise"
        )
    reg = checked_regressor(_array(regressor, "regressor"), "regressor")
    refiner = Refiner(
        body, validate_regressor(reg, body.num_vertices, "regressor", num_joints=17), config
    )
    ranges = chunk_ranges(rows, config.batch_size)
    group = config.batches_per_disc_step or 1
    parts = []
    for first in range(0, len(ranges), group):
        grads = []
        for lo, hi in ranges[first : first + group]:
            s = slice(lo, hi)
            batch = make_batch(
                body,
                pose[s],
                arrays["betas"][s],
                arrays["cam_t"][s],
                gt[s],
                mask[s],
                found[s],
                None if kp is None else kp[s],
                None if vis is None else vis[s],
                body.template.device,
            )
            res = refiner.refine(batch)
            if refiner.adversarial:
                grads.append(refiner.disc_gradient(batch, res))
            else:
                res["disc_loss"] = np.full(hi - lo, np.nan)
            parts.append(res)
        if grads:
            refiner.disc_step(grads)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    params = ("pred_rotmat", "betas", "cam_t")
    return RefineResult(
        rotmat=merged["pred_rotmat"],
        betas=merged["betas"],
        cam_t=merged["cam_t"],
        **derived_arrays(merged["pred_rotmat"], merged["cam_t"]),
        metrics={k: v for k, v in merged.items() if k not in params},
    )


def _array(
    value, name: str, shape: tuple[int, ...] | None = None, check_finite: bool = False
) -> np.ndarray:
    """A numpy copy of an array or tensor (any device), its shape checked: -1 matches any."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "biuf" or a.ndim == 0:
        raise JregfixError(f"{name}: expected a real array, got {a.dtype} of shape {a.shape}")
    if shape is not None and (
        a.ndim != len(shape)
        or any(want not in (-1, got) for want, got in zip(shape, a.shape, strict=True))
    ):
        want = ", ".join("N" if i == 0 else "*" if s == -1 else str(s) for i, s in enumerate(shape))
        raise JregfixError(f"{name}: shape {a.shape}, expected ({want}) with N = {shape[0]} frames")
    if check_finite and not np.isfinite(a).all():
        raise JregfixError(f"{name}: contains NaN or inf")
    return a
