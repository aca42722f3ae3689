"""``spin`` stage: SPIN's HMR on every frame of a SPIN-format Human3.6M file.

Output npz (float32, rows in GT order, one per readable frame): ``pred_rotmat`` (N,24,3,3),
``pose`` (N,72) axis-angle, ``pose_6d`` (N,144) SPIN interleaved 6D, ``betas`` (N,10),
``camera`` (N,3) = (s, tx, ty), ``cam_t`` (N,3) = [tx, ty, 2*5000/(224 s)], ``imgname`` (N,),
``gt_row`` (N,) row index in the input npz (frames skipped with ``skip_missing`` are absent).
A manifest ``<out>.manifest.json`` records inputs (sha256), config and skipped frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jregfix.body.rotations import rotmat_to_axis_angle
from jregfix.device import numerics, numerics_record
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.camera import weak_to_cam_t
from jregfix.io.atomic import npz_bytes
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import load_h36m
from jregfix.io.images import check_images
from jregfix.io.lock import locks_output
from jregfix.io.manifest import (
    ChunkStore,
    chunk_ranges,
    is_current,
    manifest_path,
    read_manifest,
    stage_record,
    write_output,
)
from jregfix.models.hmr import build_hmr, normalize_images
from jregfix.stages.frames import (
    chunk_dir,
    compute_frame_chunks,
    default_workers,
    frame_reader,
    merged_frame_chunks,
)
from jregfix.stages.result import Progress, StageResult


@dataclass
class SpinConfig:
    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda | cuda:N (jregfix.device)
    skip_missing: bool = False
    chunk_size: int = 2048  # frames per resumable chunk
    workers: int | None = None  # image decoding threads; None: frames.default_workers()
    force: bool = False  # recompute even when the output is current


def predict_crops(
    model: torch.nn.Module, crops: np.ndarray, device: torch.device
) -> dict[str, np.ndarray]:
    """uint8 crops (B,224,224,3) -> the per-frame output arrays (float32) for this batch."""
    with torch.inference_mode():
        x = normalize_images(torch.from_numpy(crops).to(device))
        out = model(x)
        rotmat = out.rotmat.double()
        pose = rotmat_to_axis_angle(rotmat).reshape(len(crops), 72)
        cam_t = weak_to_cam_t(out.camera.double())
    arrays = {
        "pred_rotmat": rotmat,
        "pose": pose,
        "pose_6d": out.pose_6d,
        "betas": out.betas,
        "camera": out.camera,
        "cam_t": cam_t,
    }
    return {k: v.float().cpu().numpy() for k, v in arrays.items()}


def _empty_chunk() -> dict[str, np.ndarray]:
    shapes = {
        "pred_rotmat": (0, 24, 3, 3),
        "pose": (0, 72),
        "pose_6d": (0, 144),
        "betas": (0, 10),
        "camera": (0, 3),
        "cam_t": (0, 3),
    }
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


@locks_output("out")  # one writer per output and its chunks, for the whole stage
def run_spin(
    gt: str | Path,
    images: str | Path,
    checkpoint: str | Path,
    mean_params: str | Path | None,
    out: str | Path,
    config: SpinConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Run HMR over the frames of ``gt`` (a SPIN-format Human3.6M npz; images under ``images``)
    and write ``out`` + manifest.

    Under a distributed job every rank calls this: chunk i goes to rank i mod W, each rank
    writes its chunks, rank 0 merges them (the output is the single-process one, byte for
    byte, given the same per-frame numbers). ``progress`` counts this rank's frames.

    Returns a :class:`StageResult` with ``outputs = {"spin": out}``, ``skipped`` when ``out``
    was current, and ``summary``: ``frames`` (rows written), ``skipped_frames`` (names of the
    images skipped as missing or unreadable), ``filled_keys`` (checkpoint entries taken from
    the mean params: key -> source) and ``resumed_chunks`` (chunks an earlier run finished).
    """
    refuse_overwriting_inputs(
        {"--gt": gt, "--checkpoint": checkpoint, "--mean-params": mean_params}, {"--out": out}
    )
    config = config or SpinConfig()
    ranks = ranks or Ranks()
    if config.batch_size <= 0:
        raise JregfixError(f"batch size must be positive, got {config.batch_size}")
    device = ranks.device(config.device)
    out = Path(out)
    data = load_h36m(gt, require_3d=False)
    present = check_images(images, data.imgname, config.skip_missing)
    record = stage_record(  # the GT keeps its manifest name "h36m": older outputs stay current
        "spin",
        {"h36m": gt, "checkpoint": checkpoint, "mean_params": mean_params},
        {
            "images": str(Path(images).resolve()),
            "skip_missing": config.skip_missing,
            "chunk_size": config.chunk_size,
            "n_iter": 3,
            "crop": "spin-bytescale-pil-bilinear",
        },
    )
    if not config.force and ranks.all_true(is_current(out, record)):
        with np.load(out, allow_pickle=False) as z:
            return _result(out, len(z["imgname"]), skipped=True)

    model, report = build_hmr(checkpoint, mean_params)
    model.to(device)
    with ranks.main_first():
        store = ChunkStore(chunk_dir(out), record)
    ranges = chunk_ranges(len(data), config.chunk_size)
    read = frame_reader(data, images, config.skip_missing, crop=True)
    with numerics(device):  # IEEE fp32 convolutions (no TF32), deterministic kernels on CUDA
        resumed = compute_frame_chunks(
            "spin",
            store,
            ranges,
            ranks,
            read,
            present,
            data.imgname,
            config.batch_size,
            config.workers or default_workers(),
            lambda rows, crops: predict_crops(model, np.stack(crops), device),
            _empty_chunk,
            progress,
        )
        gpu_numerics = numerics_record(device)

    merged, skipped = merged_frame_chunks(
        store, len(ranges), ranks, data.imgname, f"{gt} under {images}"
    )
    resumed = int(ranks.all_reduce_sum(torch.tensor([resumed])))
    if merged is not None:
        write_output(
            out,
            npz_bytes(compressed=True, **merged),
            record,
            "spin",
            extra={
                "frames": len(merged["gt_row"]),
                "skipped": len(skipped),
                "skipped_examples": skipped[:20],
                "device": str(device),
                "numerics": gpu_numerics,
                "processes": ranks.world_size,
                "run_config": asdict(config),
                "checkpoint_filled": report.filled,
            },
        )
        store.remove()
    ranks.barrier()  # the output exists when any rank returns
    frames = (read_manifest(manifest_path(out)) or {}).get("frames", 0)
    return _result(
        out, frames, skipped_frames=skipped, filled_keys=report.filled, resumed_chunks=resumed
    )


def _result(
    out: Path,
    frames: int,
    skipped: bool = False,
    skipped_frames: Sequence[str] = (),
    filled_keys: dict[str, str] | None = None,
    resumed_chunks: int = 0,
) -> StageResult:
    return StageResult(
        "spin",
        {"spin": out},
        skipped,
        {
            "frames": frames,
            "skipped_frames": list(skipped_frames),
            "filled_keys": dict(filled_keys or {}),
            "resumed_chunks": resumed_chunks,
        },
    )
