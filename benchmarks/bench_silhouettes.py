"""`silhouettes` throughput on CPU and where the time goes (Mask R-CNN R50-FPN, random weights).

H36M-sized JPEGs (1000x1002) are resized by torchvision to 800 px (its COCO setting). Random
weights: the cost of the backbone, RPN and box head does not depend on them; the mask head and
pasting scale with the number K of person detections, timed here for K = 1 and K = 10.
Usage: python benchmarks/bench_silhouettes.py [N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_h36m import write_fake_h36m


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def breakdown(model, image: np.ndarray) -> dict[str, float]:
    """Seconds per stage of torchvision's eval forward for one image (K person masks)."""
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    from jregfix.geometry.crop import crop_map
    from jregfix.io.masks import pack_masks

    heads = model.roi_heads
    times = {}
    with torch.inference_mode():
        x = torch.tensor(image).permute(2, 0, 1).float().div_(255)
        (batch, _), times["resize + normalise"] = timed(lambda: model.transform([x]))
        features, times["backbone + FPN"] = timed(lambda: model.backbone(batch.tensors))
        (props, _), times["RPN"] = timed(lambda: model.rpn(batch, features))

        def box_stage():
            f = heads.box_head(heads.box_roi_pool(features, props, batch.image_sizes))
            return heads.postprocess_detections(*heads.box_predictor(f), props, batch.image_sizes)

        (boxes, scores, labels), times["box head + NMS"] = timed(box_stage)
        for k in (1, 10):
            b, lab = [boxes[0][:k]], [torch.ones(k, dtype=torch.int64)]

            def mask_stage(b=b, lab=lab):
                f = heads.mask_head(heads.mask_roi_pool(features, b, batch.image_sizes))
                return maskrcnn_inference(heads.mask_predictor(f), lab)

            probs, times[f"mask head, K={k}"] = timed(mask_stage)
            det = [{"boxes": b[0], "scores": scores[0][:k], "labels": lab[0], "masks": probs[0]}]
            out, times[f"paste masks to full image, K={k}"] = timed(
                lambda det=det: model.transform.postprocess(
                    det, batch.image_sizes, [image.shape[:2]]
                )
            )
        mask = out[0]["masks"][0, 0].numpy()
        _, times["crop map + threshold + pack (1 mask)"] = timed(
            lambda: pack_masks((crop_map(mask, np.array([500.0, 500.0]), 4.0) > 0.5)[None])
        )
    return times


def main(n: int = 4, batch: int = 2) -> None:
    from jregfix.io.images import read_image
    from jregfix.models.maskrcnn import build_maskrcnn, detect_people
    from jregfix.stages.silhouettes import SilhouetteConfig, run_silhouettes

    rng = np.random.default_rng(0)
    model = build_maskrcnn(random_seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = write_fake_h36m(tmp, n, rng)
        image, t_read = timed(lambda: read_image(tmp / names[0]))
        breakdown(model, image)  # warm-up
        parts = breakdown(model, image)
        counts = []
        # Random class scores sit below torchvision's 0.05 floor; for the end-to-end run make
        # each image yield 3 "person" detections (H36M: the subject + a few false positives).
        model.roi_heads.score_thresh = 0.0
        model.roi_heads.detections_per_img = 3
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.weight.mul_(0.01)
            model.roi_heads.box_predictor.cls_score.bias[1] += 3.0

        def detector(images):
            dets = detect_people(model, images, torch.device("cpu"), 0.0)
            counts.extend(len(d["scores"]) for d in dets)
            return dets

        cfg = SilhouetteConfig(
            backend="random", score_threshold=0.0, min_iou=0.0, batch_size=batch, force=True
        )
        _, total = timed(
            lambda: run_silhouettes(tmp / "gt.npz", tmp, tmp / "s.npz", cfg, detector=detector)
        )
    print(f"load (uptime): {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    print(
        f"stage end to end: {n / total:.3f} images/s ({total:.1f} s for {n} images, batch "
        f"{batch}; random weights gave {np.mean(counts):.0f} person detections per image, "
        "each masked, pasted and cropped)"
    )
    print(f"per image, one at a time: JPEG decode {t_read * 1000:.0f} ms")
    for name, sec in parts.items():
        print(f"  {name:40s} {sec * 1000:8.0f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
