"""``silhouettes`` stage: one person mask per Human3.6M frame, at 224 in SPIN crop coordinates.

Per frame: run the segmenter on the full image; keep COCO-person detections with score >=
``score_threshold``; choose the one whose box best overlaps the frame's SPIN crop square
(side 200*scale around ``center``) by IoU, ties to the higher score; if the best IoU is below
``min_iou`` (or nothing was detected) the frame is "not found" with an empty mask. The chosen
mask probability map is resampled into the crop exactly as the image is (same integer box,
bilinear; geometry/crop.py) and thresholded at ``mask_threshold``. Output format: io/masks.py,
plus ``gt_row`` (N,), ``box`` (N,4) chosen box in image pixels (NaN if none) and ``iou`` (N,).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jregfix.device import numerics, numerics_record
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.crop import crop_image, crop_map, square_box
from jregfix.geometry.metrics import box_iou
from jregfix.io.atomic import write_bytes
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import H36MData, load_h36m
from jregfix.io.images import check_images, read_image, resolve_image
from jregfix.io.lock import locks_output
from jregfix.io.manifest import (
    ChunkStore,
    chunk_ranges,
    is_current,
    manifest_path,
    read_manifest,
    stage_record,
    write_manifest,
)
from jregfix.io.masks import MASK_RES, pack_masks, save_packed_silhouettes, unpack_masks
from jregfix.stages.frames import (
    chunk_dir,
    compute_frame_chunks,
    default_workers,
    frame_reader,
    merged_frame_chunks,
)
from jregfix.stages.result import Progress, StageResult

# images (list of uint8 RGB (H,W,3)) -> per image {"boxes" (K,4), "scores" (K,), "masks" (K,H,W)}
Detector = Callable[[list[np.ndarray]], list[dict[str, np.ndarray]]]
BACKENDS = ("torchvision",)


@dataclass
class SilhouetteConfig:
    backend: str = "torchvision"
    weights: str | None = None  # default: torchvision's cache file
    score_threshold: float = 0.5
    min_iou: float = 0.1
    mask_threshold: float = 0.5
    batch_size: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N (jregfix.device)
    skip_missing: bool = False
    chunk_size: int = 256
    workers: int | None = None  # image decoding threads; None: frames.default_workers()
    force: bool = False


def select_person(
    boxes: np.ndarray, scores: np.ndarray, crop_square: np.ndarray, min_iou: float
) -> tuple[int | None, float]:
    """Index of the detection overlapping the crop square best (ties: higher score), its IoU;
    None when there is no detection with IoU >= ``min_iou``."""
    if len(boxes) == 0:
        return None, 0.0
    iou = box_iou(boxes, crop_square)
    best = int(np.lexsort((-scores, -iou))[0])
    return (best if iou[best] >= min_iou and iou[best] > 0 else None), float(iou[best])


def torchvision_detector(
    weights: str | Path | None, device: torch.device, score_threshold: float
) -> Detector:
    from jregfix.models.maskrcnn import build_maskrcnn, detect_people

    model = build_maskrcnn(weights).to(device)
    return lambda images: detect_people(model, images, device, score_threshold)


def frame_silhouettes(
    detections: list[dict[str, np.ndarray]],
    data: H36MData,
    rows: list[int],
    config: SilhouetteConfig,
) -> dict[str, np.ndarray]:
    """Choose one person per frame and map its mask into the crop; arrays for ``rows``."""
    n = len(rows)
    masks = np.zeros((n, MASK_RES, MASK_RES), bool)
    score, iou = np.zeros(n, np.float32), np.zeros(n, np.float32)
    box = np.full((n, 4), np.nan, np.float32)
    found = np.zeros(n, bool)
    for i, (row, det) in enumerate(zip(rows, detections, strict=True)):
        keep = det["scores"] >= config.score_threshold
        boxes, scores = det["boxes"][keep], det["scores"][keep]
        square = square_box(data.center[row], data.scale[row])[0]
        best, iou[i] = select_person(boxes, scores, square, config.min_iou)
        if best is None:
            continue
        prob = crop_map(det["masks"][keep][best], data.center[row], data.scale[row])
        masks[i] = prob >= config.mask_threshold
        score[i], box[i], found[i] = scores[best], boxes[best], True
    return {
        "masks_packed": pack_masks(masks),
        "score": score,
        "found": found,
        "iou": iou,
        "box": box,
    }


@locks_output("out")  # one writer per output and its chunks, for the whole stage
def run_silhouettes(
    gt: str | Path,
    images: str | Path,
    out: str | Path,
    config: SilhouetteConfig | None = None,
    progress: Progress | None = None,
    detector: Detector | None = None,
    figure: str | Path | None = None,
    figure_frames: int = 8,
    ranks: Ranks | None = None,
) -> StageResult:
    """Segment every frame of ``gt`` (a SPIN-format Human3.6M npz) and write ``out`` (+
    manifest, and at ``figure`` a PNG of the first ``figure_frames`` crops with their masks).

    ``detector`` overrides the backend (its name should then be given as ``config.backend``).
    Under a distributed job chunk i goes to rank i mod W and rank 0 merges (as in ``spin``);
    ``progress`` counts this rank's frames.

    Returns a :class:`StageResult` with ``outputs = {"silhouettes": out}`` (plus ``"figure"``
    when one was written), ``skipped`` when ``out`` was current, and ``summary``: ``frames``,
    ``found`` (frames with a person), ``skipped_frames`` (names of images skipped as missing
    or unreadable) and ``resumed_chunks``.
    """
    config = config or SilhouetteConfig()
    refuse_overwriting_inputs(
        {"--gt": gt, "--weights": config.weights}, {"--out": out, "--save-figures": figure}
    )
    ranks = ranks or Ranks()
    if config.batch_size <= 0:
        raise JregfixError(f"batch size must be positive, got {config.batch_size}")
    if detector is None and config.backend not in BACKENDS:
        raise JregfixError(
            f"unknown segmentation backend {config.backend!r}; available: {', '.join(BACKENDS)}"
        )
    device = ranks.device(config.device)
    out = Path(out)
    data = load_h36m(gt, require_3d=False)
    present = check_images(images, data.imgname, config.skip_missing)
    weights = None
    if detector is None:
        from jregfix.models.maskrcnn import default_weights_path

        weights = Path(config.weights) if config.weights else default_weights_path()
    cfg = {
        k: v
        for k, v in asdict(config).items()
        if k
        in ("backend", "score_threshold", "min_iou", "mask_threshold", "skip_missing", "chunk_size")
    }
    cfg["images"] = str(Path(images).resolve())
    # the GT keeps its manifest name "h36m": older outputs stay current
    record = stage_record(
        "silhouettes",
        {"h36m": gt, "weights": weights}
        if weights is not None and weights.is_file()
        else {"h36m": gt},
        cfg,
    )
    if not config.force and ranks.all_true(is_current(out, record)):
        with np.load(out, allow_pickle=False) as z:
            return _result(out, len(z["imgname"]), int(z["found"].sum()), skipped=True)
    if detector is None:
        detector = torchvision_detector(weights, device, config.score_threshold)

    with ranks.main_first():
        store = ChunkStore(chunk_dir(out), record, nan_marks=("box",))
    ranges = chunk_ranges(len(data), config.chunk_size)
    read = frame_reader(data, images, config.skip_missing, crop=False)
    # IEEE fp32 on CUDA (TF32 would move mask borders). Deterministic mode stays off: the
    # masks are thresholded, and an op of torchvision's detector without a deterministic CUDA
    # kernel would stop the stage
    with numerics(device, deterministic=False):
        resumed = compute_frame_chunks(
            "silhouettes",
            store,
            ranges,
            ranks,
            read,
            present,
            data.imgname,
            config.batch_size,
            config.workers or default_workers(),
            lambda rows, imgs: frame_silhouettes(detector(imgs), data, rows, config),
            lambda: frame_silhouettes([], data, [], config),
            progress,
        )
        gpu_numerics = numerics_record(device)

    merged, skipped = merged_frame_chunks(
        store, len(ranges), ranks, data.imgname, f"{gt} under {images}"
    )
    resumed = int(ranks.all_reduce_sum(torch.tensor([resumed])))
    fig = None
    if merged is not None:
        save_packed_silhouettes(out, merged.pop("masks_packed"), (MASK_RES, MASK_RES), **merged)
        write_manifest(
            manifest_path(out),
            record,
            outputs={"silhouettes": out},
            extra={
                "frames": len(merged["gt_row"]),
                "found": int(merged["found"].sum()),
                "skipped": len(skipped),
                "skipped_examples": skipped[:20],
                "processes": ranks.world_size,
                "run_config": asdict(config),
                "device": str(device),
                "numerics": gpu_numerics,
            },
        )
        store.remove()
        if figure is not None:
            fig = save_overlay_figure(figure, data, images, out, count=figure_frames)
    ranks.barrier()  # the output exists when any rank returns
    doc = read_manifest(manifest_path(out)) or {}
    return _result(
        out,
        doc.get("frames", 0),
        doc.get("found", 0),
        skipped_frames=skipped,
        resumed_chunks=resumed,
        figure=fig,
    )


def _result(
    out: Path,
    frames: int,
    found: int,
    skipped: bool = False,
    skipped_frames: Sequence[str] = (),
    resumed_chunks: int = 0,
    figure: Path | None = None,
) -> StageResult:
    outputs = {"silhouettes": out} | ({"figure": figure} if figure is not None else {})
    return StageResult(
        "silhouettes",
        outputs,
        skipped,
        {
            "frames": frames,
            "found": found,
            "skipped_frames": list(skipped_frames),
            "resumed_chunks": resumed_chunks,
        },
    )


def save_overlay_figure(
    path: str | Path,
    data: H36MData,
    images: str | Path,
    silhouettes: str | Path,
    count: int = 8,
    cols: int = 4,
) -> Path:
    """PNG grid of the first ``count`` frames' crops with their masks tinted red."""
    from PIL import Image

    with np.load(silhouettes, allow_pickle=False) as z:
        rows = z["gt_row"][:count]
        masks = unpack_masks(z["masks_packed"][:count], tuple(z["mask_shape"]))
        found = z["found"][:count]
    tiles = []
    for row, mask, ok in zip(rows, masks, found, strict=True):
        img = read_image(resolve_image(images, data.imgname[row]))
        tile = crop_image(img, data.center[row], data.scale[row]).astype(np.float32)
        if ok:
            tile[mask] = 0.5 * tile[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
        tiles.append(tile.astype(np.uint8))
    rows_n = -(-len(tiles) // cols)
    grid = np.zeros((rows_n * MASK_RES, cols * MASK_RES, 3), np.uint8)
    for i, tile_rgb in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * MASK_RES : (r + 1) * MASK_RES, c * MASK_RES : (c + 1) * MASK_RES] = tile_rgb
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return Path(path)
