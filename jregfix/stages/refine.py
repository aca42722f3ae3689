"""`refine`: pseudo ground truth by Adam over SMPL pose, shape and camera (Hedlin et al. §3).

Per frame, starting from SPIN's estimate, minimise

    w_j L_joint + w_s L_silhouette + w_a (L_adv,pose + L_adv,shape)

* L_joint: mean squared distance (m²) between the root-relative joints J_spin·mesh and the
  root-relative GT joints (17 H36M joints, row 0 = pelvis). J_spin is a regressor fitted to
  SPIN's own meshes; a regressor fitted on refined meshes is refused (drift guard).
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

Weights: a term with no explicit weight is scaled to 1 at the first iteration of each batch
(w = 1 / max(L(θ₀), floor)), the paper's rule; an explicit weight overrides, 0 disables.
Adam (lr 1e-2, betas 0.9/0.999), 100 iterations, per batch of frames.

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
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.camera import FOCAL_LENGTH, PinholeCamera, weak_to_cam_t
from jregfix.io.atomic import read_npz, save_npz
from jregfix.io.h36m import load_h36m
from jregfix.io.manifest import (
    ChunkStore,
    chunk_ranges,
    describe_inputs,
    fingerprint,
    manifest_path,
    read_manifest,
    stage_record,
    versions,
    write_manifest,
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

TERMS = ("joint", "silhouette", "adversarial")
# Floors of the automatic weights: below these a term is "already solved" and is not blown up.
WEIGHT_FLOORS = {"joint": 1e-6, "silhouette": 1e-4, "adversarial": 1e-4}


@dataclass
class RefineConfig:
    iters: int = 100
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
        if self.iters < 0 or self.batch_size < 1 or self.lr <= 0:
            raise JregfixError("iters >= 0, batch size >= 1 and lr > 0 are required")
        if not any(self.weights.get(t, 1.0) > 0 for t in TERMS):
            raise JregfixError("every loss term has weight 0: nothing to optimise")
        if self.batches_per_disc_step is not None and self.batches_per_disc_step < 1:
            raise JregfixError("batches per discriminator step must be >= 1")
        if self.silhouette_loss not in ("soft", "chamfer"):
            raise JregfixError("silhouette loss must be 'soft' or 'chamfer'")


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


def cam_t_to_weak(cam_t: torch.Tensor) -> torch.Tensor:
    """(N,3) translation -> SPIN's (s, tx, ty), the inverse of ``weak_to_cam_t``."""
    s = 2 * FOCAL_LENGTH / (224 * cam_t[:, 2])
    return torch.stack([s, cam_t[:, 0], cam_t[:, 1]], 1)


def orthonormal_6d(rot6d: torch.Tensor) -> torch.Tensor:
    """Map any 6D to the 6D of its Gram-Schmidt rotation (the discriminator's input space)."""
    return rotmat_to_rot6d(rot6d_to_rotmat(rot6d))


def root_relative_joints(j_reg: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    joints = torch.einsum("kv,bvc->bkc", j_reg, verts)
    return joints - joints[:, :1]


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
    """Optimise one batch; update the discriminators once; return refined params and metrics."""
    b = batch.rotmat.shape[0]
    camera = PinholeCamera.spin_crop(b, config.focal, config.image_size, batch.betas.dtype,
                                     batch.betas.device)
    faces = body.faces
    init6d = rotmat_to_rot6d(batch.rotmat)
    pose6d = init6d.clone().requires_grad_(True)
    betas = batch.betas.clone().requires_grad_(True)
    weak = cam_t_to_weak(batch.cam_t).requires_grad_(True)
    opt = torch.optim.Adam([pose6d, betas, weak], lr=config.lr, betas=(0.9, 0.999))
    active = [t for t in TERMS if config.weights.get(t, 1.0) > 0]
    weights: dict[str, float] = {}
    for p in disc.parameters():
        p.requires_grad_(False)

    def losses() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rot = rot6d_to_rotmat(pose6d)
        cam_t = weak_to_cam_t(weak)
        verts = body.vertices(rot, betas)
        terms = {}
        if "joint" in active:
            terms["joint"] = ((root_relative_joints(j_reg, verts) - batch.gt_joints) ** 2
                              ).sum(-1).mean(-1)
        if "silhouette" in active:
            terms["silhouette"] = silhouette_term(config.silhouette_loss, verts, faces, camera,
                                                  cam_t, batch.masks, batch.has_mask,
                                                  config.image_size, config.sigma)
        if "adversarial" in active:
            terms["adversarial"] = disc.generator_loss(orthonormal_6d(pose6d), betas)
        return terms, verts

    history = {}
    for it in range(config.iters + 1):
        terms, _ = losses()
        means = {k: v.mean() for k, v in terms.items()}
        if it == 0:
            for k, v in means.items():
                weights[k] = config.weights.get(k, 1.0 / max(float(v.detach()), WEIGHT_FLOORS[k]))
            history["initial"] = {k: v.detach() for k, v in terms.items()}
        if it == config.iters:
            history["final"] = {k: v.detach() for k, v in terms.items()}
            break
        total = sum(weights[k] * means[k] for k in means)
        opt.zero_grad()
        total.backward()
        opt.step()
        if on_iter is not None:
            on_iter(it, {k: float(v.detach()) for k, v in means.items()})
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
    return {
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
    device: str = "cpu",
    progress: Callable[[int, dict], None] | None = None,
    ranks: Ranks | None = None,
) -> dict:
    """Refine every frame (or one shard) and write ``out`` (npz) plus its manifest.

    ``progress(frames_done, live_losses)`` is called after each iteration and each batch
    (``frames_done`` counts this process's frames). Under a distributed job (``ranks``) every
    rank calls this with the same arguments: batches are dealt out as described in the module
    docstring, each rank writes its own chunks, and rank 0 merges them into ``out``.
    Returns a summary (means of the per-frame metrics, frames, empty masks, time).
    """
    config = config or RefineConfig()
    config.validate()
    ranks = ranks or Ranks()
    out = Path(out)
    prov = check_regressor_provenance(joint_regressor, force)
    gtd = load_h36m(gt)
    params = load_params(init)
    sil = load_silhouettes(silhouettes)
    n = len(gtd)
    if len(params) != n or len(sil.masks) != n:
        raise JregfixError(f"frame counts differ: init {len(params)} ({init}), GT {n} ({gt}), "
                           f"silhouettes {len(sil.masks)} ({silhouettes})")
    if sil.masks.shape[1:] != (config.image_size, config.image_size):
        raise JregfixError(f"{silhouettes}: masks are {sil.masks.shape[1:]}, expected "
                           f"{config.image_size}x{config.image_size} crops")
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
        store = ChunkStore(chunks, record)
    ranges = chunk_ranges(len(rows), config.batch_size)
    dev = torch.device(device)
    dtype = body.template.dtype
    torch.manual_seed(config.seed)
    disc = Discriminators(body.num_joints, body.num_betas, config.disc_lr).to(dev)
    adversarial = config.weights.get("adversarial", 1.0) > 0
    j_t = torch.from_numpy(j_reg).to(dev, dtype)
    gt_joints = gtd.joints17()
    gt_joints = gt_joints - gt_joints[:, :1]
    masks_all = sil.masks & sil.found[:, None, None]
    empty = ~masks_all.reshape(n, -1).any(1)

    def batch_of(idx: np.ndarray) -> Batch:
        return Batch(
            rotmat=pose_to_rotmat(torch.from_numpy(params.pose[idx]).to(dev, dtype),
                                  body.num_joints),
            betas=fit_betas(torch.from_numpy(params.betas[idx]).to(dev, dtype), body.num_betas),
            cam_t=torch.from_numpy(cam_t0[idx]).to(dev, dtype),
            gt_joints=torch.from_numpy(gt_joints[idx]).to(dev, dtype),
            masks=torch.from_numpy(masks_all[idx]).to(dev, dtype),
            has_mask=torch.from_numpy(~empty[idx]).to(dev),
        )

    t0 = time.time()
    done_frames, resumed = 0, 0
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
                    if progress is not None:
                        progress(done, {"iter": it, **live})

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
        save_npz(out, **result)
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
        }
    resumed = int(ranks.all_reduce_sum(torch.tensor([resumed], dtype=torch.int64)))
    if ranks.is_main:
        summary["resumed_chunks"] = resumed
        write_manifest(manifest_path(out), record, outputs={"refined": out},
                       extra={"summary": summary, "joint_regressor_provenance": prov})
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


def merge_refined(parts: list[str | Path], out: str | Path) -> dict:
    """Join the outputs of ``refine --shard i/n`` runs (all n, of one run) into ``out``.

    Each shard had its own discriminators (array jobs share nothing); the merged file records
    that. Rows must cover every GT frame exactly once.
    """
    if not parts:
        raise JregfixError("--merge needs the shard outputs")
    docs = []
    for part in parts:
        doc = read_manifest(manifest_path(part))
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
    save_npz(out, **merged)
    record = {k: docs[0][k] for k in ("stage", "inputs", "seed")}
    record["config"] = {**config, "shard": None, "shards": count}
    summary = {"frames": int(len(merged["rows"])), "shards": count,
               "discriminators": "one per shard (array jobs); torchrun shares one across ranks"}
    write_manifest(manifest_path(out), record, outputs={"refined": out},
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
