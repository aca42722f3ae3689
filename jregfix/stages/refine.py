"""`refine` over files: pseudo ground truth by Adam over SMPL pose, shape and camera.

The optimisation itself (its terms, weights, camera and discriminators) is
:mod:`jregfix.methods.refinement`; this stage reads the initial estimates (``--init``), the GT
(3D joints, and SPIN's ``part`` 2D keypoints when present) and the masks, and deals batches,
saves chunks and writes the output and its manifest around it.

2D keypoints: SPIN's ``part`` (original-image pixels + visibility, J24 order, reordered to the
17 regressor rows) are mapped into the crop by the frame's center/scale with the exact
continuous map of the crop's resize (:func:`jregfix.geometry.crop.image_to_crop`; SPIN's own
keypoint transform truncates to whole pixels). A GT file without ``part`` refines without the
2D term (and says so). Masks stored at another resolution than ``image_size`` (e.g. 224 for a
96 px run) are resampled per batch by a box filter (area average), which gives soft targets at
the mask's outline.

Batches of ``batch_size`` frames run in order and each is saved as a chunk when done. The
discriminators take one Adam step per *group* of ``batches_per_disc_step`` batches (default:
one per process, so 1 in a single process), on the mean of the group's per-batch gradients;
every batch of a group is refined against the same discriminators. A distributed job (torchrun,
W processes) deals batch j of each group to rank j mod W, gathers the gradients and adds them
in batch order, so all ranks hold the same discriminators and the run equals the
single-process run with the same ``batches_per_disc_step`` (exactly, given per-process
determinism; see the README), and equals :func:`jregfix.methods.refinement.refine` on the same
arrays. A batch's discriminator gradient is computed from the refined arrays saved in its
chunk, so a re-run after a kill (of any rank) reuses every finished chunk, replays the
discriminator steps from them and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from jregfix.body.base import BodyModel
from jregfix.device import device_stage, numerics_record
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.camera import weak_to_cam_t
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
from jregfix.methods.refinement import (
    KEYPOINT_RES,
    Batch,
    RefineConfig,
    Refiner,
    derived_arrays,
    make_batch,
    metric_means,
)
from jregfix.stages.frames import merged_chunks
from jregfix.stages.result import Progress, StageResult, Step

LIVE_SECONDS = 0.5  # least time between two live loss reports (each one syncs a GPU)
STAGE = "refine"


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
        raise JregfixError(
            f"{path}: its provenance says it was fitted on refined meshes; refine "
            "needs J_spin (fitted on SPIN's meshes). Pass --force to use it anyway."
        )
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
    progress: Progress | None = None,
    ranks: Ranks | None = None,
    say: Callable[[str], None] | None = None,
) -> StageResult:
    """Refine every frame (or one shard) and write ``out`` (npz) plus its manifest.

    ``progress`` gets a :class:`Step` (frames done by this process, of its ``total``) after
    each batch, and during it ``info`` = the iteration (``iter``) and the batch means of the
    loss terms, at its first and last iterations and at most every ``LIVE_SECONDS`` in between
    (camera warm-up steps, whose term is named ``warmup_<term>``, only by time); each such
    report reads the losses back from the device, a sync on a GPU. ``say`` gets one-line notes
    (a GT file without 2D keypoints). Under a distributed job (``ranks``) every rank calls this
    with the same arguments: batches are dealt out as described in the module docstring, each
    rank writes its own chunks, and rank 0 merges them into ``out``.
    Returns a :class:`StageResult` whose summary holds the means of the per-frame metrics,
    frames, empty masks, time and resumed chunks (as the manifest records).
    """
    refuse_overwriting_inputs(
        {
            "--init": init,
            "--gt": gt,
            "--silhouettes": silhouettes,
            "--joint-regressor": joint_regressor,
            "--smpl": body_file,
        },
        {"--out": out},
    )
    config = config or RefineConfig()
    config.validate()
    ranks = ranks or Ranks()
    note = say or (lambda _msg: None)
    out = Path(out)
    prov = check_regressor_provenance(joint_regressor, force)
    gtd, params, sil, keypoints, j2d = _load_inputs(init, gt, silhouettes, config, note)
    n = len(gtd)
    j_reg = validate_regressor(
        load_regressor(joint_regressor), body.num_vertices, str(joint_regressor), num_joints=17
    )
    cam_t0 = _init_cam_t(params, n)
    pose, betas = params.pose, params.betas
    rows = _shard_rows(n, config.batch_size, shard)

    # the device *type* decides the numbers; which GPU a rank uses does not
    record = stage_record(
        STAGE,
        {
            "init": init,
            "gt": gt,
            "silhouettes": silhouettes,
            "joint_regressor": joint_regressor,
            "body": body_file,
        },
        {
            **asdict(config),
            "shard": list(shard) if shard else None,
            "body": body.name,
            "device": torch.device(device).type,
        },
        config.seed,
    )
    chunks = out.with_name(out.name + ".chunks")
    group = config.batches_per_disc_step or _unfinished_group(chunks, record) or ranks.world_size
    if group % ranks.world_size:
        raise JregfixError(
            f"{group} batches per discriminator step (recorded in {chunks} when "
            "not given) cannot be dealt out to "
            f"{ranks.world_size} processes: use a number of processes that "
            "divides it, or pass --batches-per-disc-step (a new value restarts)"
        )
    record["config"]["batches_per_disc_step"] = group
    with ranks.main_first():
        store = ChunkStore(chunks, record, nan_marks=NAN_MARKS)
    ranges = chunk_ranges(len(rows), config.batch_size)
    dev = torch.device(device)
    refiner = Refiner(body, j_reg, config)
    gt_joints = gtd.joints17()
    gt_joints = gt_joints - gt_joints[:, :1]
    empty = ~(sil.masks.reshape(n, -1).any(1) & sil.found)
    kp_crop = kp_visible = None
    if keypoints is not None:
        kp_crop = image_to_crop(keypoints[..., :2], gtd.center, gtd.scale, KEYPOINT_RES)
        kp_visible = (keypoints[..., 2] > 0).astype(np.float64)

    def masks_of(idx: np.ndarray) -> np.ndarray:
        masks = sil.masks[idx] & sil.found[idx, None, None]
        if masks.shape[1] != config.image_size:
            return resample_crops(masks, config.image_size)
        return masks

    def batch_of(idx: np.ndarray) -> Batch:
        return make_batch(
            body,
            pose[idx],
            betas[idx],
            cam_t0[idx],
            gt_joints[idx],
            masks_of(idx),
            ~empty[idx],
            None if kp_crop is None else kp_crop[idx],
            None if kp_visible is None else kp_visible[idx],
            dev,
        )

    t0 = time.time()
    done_frames, resumed = 0, 0
    shown = [0.0]  # when the live losses were last reported
    slots = group // ranks.world_size
    batches = [
        range(first, min(first + group, len(ranges))) for first in range(0, len(ranges), group)
    ]
    total = sum(
        ranges[ci][1] - ranges[ci][0]  # this process's share of the frames
        for members in batches
        for ci in members[ranks.rank :: ranks.world_size]
    )
    for members in batches:
        grads = None
        for slot, ci in enumerate(members[ranks.rank :: ranks.world_size]):
            idx = rows[ranges[ci][0] : ranges[ci][1]]
            batch = batch_of(idx)
            reused = store.done(ci)
            if reused:  # finished by an earlier run: keep it, replay its D gradient
                res = store.load(ci)
                resumed += 1
            else:

                def on_iter(it, live, done=done_frames):
                    now = time.monotonic()
                    edge = it in (0, config.iters - 1) and not any(
                        k.startswith("warmup_") for k in live
                    )
                    if progress is None or (not edge and now - shown[0] < LIVE_SECONDS):
                        return
                    shown[0] = now
                    values = torch.stack(list(live.values())).tolist()  # one device read
                    progress(
                        Step(
                            STAGE,
                            done,
                            total,
                            info={"iter": it, **dict(zip(live, values, strict=True))},
                        )
                    )

                res = refiner.refine(batch, on_iter)
                res["rows"] = idx
            if refiner.adversarial:
                grad = refiner.disc_gradient(batch, res)
                if grads is None:
                    grads = torch.zeros(slots, grad.numel(), dtype=grad.dtype, device=dev)
                grads[slot] = grad
            else:
                res["disc_loss"] = np.full(len(idx), np.nan)
            if not reused:
                store.save(ci, **res)
            done_frames += len(idx)
            if progress is not None:
                progress(Step(STAGE, done_frames, total))
        if refiner.adversarial:
            _shared_disc_step(refiner, ranks, grads, len(members), slots)

    merged = merged_chunks(store, len(ranges), ranks)  # waits for every rank's chunks
    summary: dict = {}
    if ranks.is_main:
        assert merged is not None  # rank 0 holds every rank's chunks
        result = _assemble(merged, gtd.imgname)
        means = metric_means(result)
        summary = {
            "frames": int(len(rows)),
            "empty_masks": int(empty[rows].sum()),
            **means,
            "seconds": time.time() - t0,
            "processes": ranks.world_size,
            "j2d_term": "on"
            if j2d
            else "off: weight 0"
            if keypoints is not None
            else "off: no 'part' in the GT file",
        }
    resumed = int(ranks.all_reduce_sum(torch.tensor([resumed], dtype=torch.int64)))
    if ranks.is_main:
        summary["resumed_chunks"] = resumed
        write_output(
            out,
            npz_bytes(compressed=True, **result),
            record,
            "refined",
            extra={
                "summary": summary,
                "joint_regressor_provenance": prov,
                "numerics": numerics_record(dev),
            },
        )
        store.remove()
    ranks.barrier()  # the output exists when any rank returns
    if not ranks.is_main:
        summary = (read_manifest(manifest_path(out)) or {}).get("summary", {})
    return StageResult(STAGE, {"refined": out}, summary=summary)


def _shard_rows(n: int, batch_size: int, shard: tuple[int, int] | None) -> np.ndarray:
    """The frame rows of shard (i, k): whole batches, since a batch's automatic weights depend
    on all its frames."""
    rows = np.arange(n)
    if shard is None:
        return rows
    i, k = shard
    if not 0 <= i < k:
        raise JregfixError(f"shard {i}/{k}: need 0 <= i < n")
    mine = np.array_split(np.arange(len(chunk_ranges(n, batch_size))), k)[i]
    if len(mine) == 0:
        raise JregfixError(
            f"shard {i}/{k} of {n} frames ({batch_size} per batch) is empty; use fewer shards"
        )
    return rows[mine[0] * batch_size : min((mine[-1] + 1) * batch_size, n)]


def _load_inputs(init, gt, silhouettes, config: RefineConfig, note: Callable[[str], None]):
    """GT, initial params and masks, checked against each other and the config: (gtd, params,
    silhouettes, keypoints (N, 17, 3) or None, whether the 2D term is on)."""
    gtd = load_h36m(gt)
    params = load_params(init)
    sil = load_silhouettes(silhouettes)
    n = len(gtd)
    if len(params) != n or len(sil.masks) != n:
        raise JregfixError(
            f"frame counts differ: init {len(params)} ({init}), GT {n} ({gt}), "
            f"silhouettes {len(sil.masks)} ({silhouettes})"
        )
    if sil.masks.shape[1] != sil.masks.shape[2]:
        raise JregfixError(
            f"{silhouettes}: masks are {sil.masks.shape[1]}x"
            f"{sil.masks.shape[2]}, expected square crops"
        )
    if params.pose is None or params.betas is None:
        raise JregfixError(f"{init}: needs 'pose' and 'betas' to start from")
    keypoints = gtd.keypoints17()
    j2d = keypoints is not None and config.weights.get("j2d", 1.0) > 0
    if keypoints is None:
        note(f"{gt} has no 2D keypoints ('part'): refining without the 2D term")
    if not config.active_terms(keypoints is not None):
        raise JregfixError(
            f"{gt} has no 2D keypoints ('part') and every other loss term has "
            "weight 0: nothing to optimise"
        )
    if config.camera_warmup and not (j2d or "silhouette" in config.active_terms(j2d)):
        raise JregfixError(
            "--camera-warmup needs the 2D term (GT 'part') or the silhouette "
            "term; enable one or set --camera-warmup 0"
        )
    for name, other in (("init", params.imgname), ("silhouettes", sil.imgname)):
        if other is not None and len(other) and not np.array_equal(other, gtd.imgname):
            raise JregfixError(f"{name} rows are not aligned with the GT file (imgname differs)")
    return gtd, params, sil, keypoints, j2d


def _unfinished_group(chunks: Path, record: dict) -> int | None:
    """The batches per discriminator step of an unfinished run of this same computation, so
    that re-running with another number of processes resumes it instead of starting over."""
    tag = read_manifest(chunks / ChunkStore.TAG_FILE)
    if not tag or not isinstance(tag.get("config"), dict):
        return None

    def without_group(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "batches_per_disc_step"}

    new = {**fingerprint(record), "versions": versions()}
    same = {**tag, "config": without_group(tag["config"])} == {
        **new,
        "config": without_group(new["config"]),
    }
    group = tag["config"].get("batches_per_disc_step")
    return group if same and isinstance(group, int) else None


def _shared_disc_step(
    refiner: Refiner, ranks: Ranks, grads: torch.Tensor | None, members: int, slots: int
) -> None:
    """One discriminator step on the mean gradient of a group's ``members`` batches.

    Batch j of the group was refined by rank j mod W in its slot j // W; the gradients are
    gathered from every rank and added in batch order, so the sum (and every rank's copy of
    the discriminators) is the same bit for bit for any number of processes.
    """
    disc = refiner.disc
    if grads is None:  # this rank had no batch in the group (the last one may be short)
        size = sum(p.numel() for p in disc.parameters())
        dtype = next(disc.parameters()).dtype
        grads = torch.zeros(slots, size, dtype=dtype, device=next(disc.parameters()).device)
    gathered = ranks.all_gather(grads)  # (W, slots, P)
    refiner.disc_step(
        [gathered[j % ranks.world_size, j // ranks.world_size] for j in range(members)]
    )


@locks_output("out")
def merge_refined(parts: list[str | Path], out: str | Path) -> StageResult:
    """Join the outputs of ``refine --shard i/n`` runs (all n, of one run) into ``out``.

    Each shard had its own discriminators (array jobs share nothing); the merged file records
    that. Rows must cover every GT frame exactly once. The summary holds frames and shards.
    """
    if not parts:
        raise JregfixError("--merge needs the shard outputs")
    refuse_overwriting_inputs({"PARTS": parts}, {"--out": out})
    docs = []
    for part in parts:
        doc = read_sidecar(part)
        if doc is None or doc.get("stage") != STAGE or not doc["config"].get("shard"):
            raise JregfixError(f"{part}: not the output of `refine --shard` (no shard manifest)")
        docs.append(doc)
    common = {k: v for k, v in fingerprint(docs[0]).items() if k != "config"}
    config = {k: v for k, v in docs[0]["config"].items() if k != "shard"}
    for part, doc in zip(parts, docs, strict=True):
        same = {k: v for k, v in fingerprint(doc).items() if k != "config"} == common and {
            k: v for k, v in doc["config"].items() if k != "shard"
        } == config
        if not same:
            raise JregfixError(
                f"{part} belongs to a different run than {parts[0]} (inputs, config or seed differ)"
            )
    shards = [tuple(d["config"]["shard"]) for d in docs]
    count = shards[0][1]
    order = sorted(range(len(parts)), key=lambda i: shards[i])
    if [shards[i] for i in order] != [(i, count) for i in range(count)]:
        raise JregfixError(
            f"--merge needs shards 0..{count - 1} of {count} once each; got "
            f"{sorted(f'{i}/{n}' for i, n in shards)}"
        )
    arrays = [read_npz(parts[i], "refine shard output") for i in order]
    derived = ("pose", "pose_6d", "camera", "imgname")  # recomputed over all rows at once
    merged = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0] if k not in derived}
    if not np.array_equal(merged["rows"], np.arange(len(merged["rows"]))):
        raise JregfixError("the shards' rows do not cover the GT frames exactly once")
    imgname = np.concatenate([a["imgname"] for a in arrays])
    merged = _assemble(merged, imgname)
    record = {k: docs[0][k] for k in ("stage", "inputs", "seed")}
    record["config"] = {**config, "shard": None, "shards": count}
    summary = {
        "frames": int(len(merged["rows"])),
        "shards": count,
        "discriminators": "one per shard (array jobs); torchrun shares one across ranks",
    }
    write_output(
        out,
        npz_bytes(compressed=True, **merged),
        record,
        "refined",
        extra={
            "summary": summary,
            "merged_from": describe_inputs({f"shard_{shards[i][0]}": parts[i] for i in order}),
        },
    )
    return StageResult(STAGE, {"refined": Path(out)}, summary=summary)


def _assemble(merged: dict[str, np.ndarray], imgname: np.ndarray) -> dict[str, np.ndarray]:
    """The chunks' arrays with the derived layouts (pose, pose_6d, camera) and imgname."""
    out = dict(merged)
    out.update(derived_arrays(merged["pred_rotmat"], merged["cam_t"]))
    out["imgname"] = imgname[merged["rows"]]
    return out
