"""Person masks from torchvision's Mask R-CNN (ResNet-50 FPN, COCO), the authors' segmenter.

Built with ``weights=None, weights_backbone=None`` (nothing is downloaded); weights come from
``--weights`` or torchvision's own cache file, ``<torch hub dir>/checkpoints/`` +
:data:`TORCHVISION_FILE`. A backend is any callable ``images -> detections`` with this module's
:func:`detect_people` contract, so other segmenters can plug into the silhouettes stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jregfix.errors import JregfixError

TORCHVISION_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
COCO_PERSON = 1


def default_weights_path() -> Path:
    """Where torchvision keeps the COCO weights it downloads (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE


def build_maskrcnn(weights: str | Path | None = None, random_seed: int | None = None,
                   min_size: int = 800, max_size: int = 1333) -> torch.nn.Module:
    """Mask R-CNN R50-FPN in eval mode.

    ``weights``: a state_dict file (default: torchvision's cache file). ``random_seed``: skip
    loading and keep a seeded random initialisation (tests and benchmarks only).
    ``min_size``/``max_size`` are torchvision's input resize bounds (defaults as trained).
    """
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    kwargs = dict(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    if random_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            return maskrcnn_resnet50_fpn(**kwargs).eval()
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise JregfixError(
            f"Mask R-CNN weights not found at {path}. Offline, download {TORCHVISION_URL} on a "
            f"connected machine and place it at {default_weights_path()} (torchvision's cache) "
            "or pass --weights PATH"
        )
    from jregfix.io.checkpoint import load_state_dict_file

    model = maskrcnn_resnet50_fpn(**kwargs)
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise JregfixError(f"{path}: not torchvision Mask R-CNN R50-FPN COCO weights: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}, "
                           f"wrong shape {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def detect_people(model: torch.nn.Module, images: list[np.ndarray], device: torch.device,
                  score_threshold: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Person detections for uint8 RGB images (H,W,3).

    Returns per image ``boxes`` (K,4) x0,y0,x1,y1 in image pixels, ``scores`` (K,) and
    ``masks`` (K,H,W) float32 probabilities, for COCO class person with score >= threshold,
    sorted by score. This is torchvision's eval forward with one change: detections of other
    classes are dropped after box post-processing (including its top-100 cut), so the mask
    head and the full-resolution mask pasting run on people only.
    """
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    tensors = [torch.tensor(im, device=device).permute(2, 0, 1).float().div_(255.0)
               for im in images]
    sizes = [tuple(t.shape[-2:]) for t in tensors]
    heads = model.roi_heads
    with torch.inference_mode():
        batch, _ = model.transform(tensors)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        feats = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits, regression = heads.box_predictor(feats)
        boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals,
                                                             batch.image_sizes)
        keep = [(lab == COCO_PERSON) & (sc >= score_threshold) for lab, sc in zip(labels, scores,
                                                                                  strict=True)]
        boxes = [b[k] for b, k in zip(boxes, keep, strict=True)]
        scores = [s[k] for s, k in zip(scores, keep, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, keep, strict=True)]
        if sum(len(b) for b in boxes):
            feats = heads.mask_head(heads.mask_roi_pool(features, boxes, batch.image_sizes))
            probs = maskrcnn_inference(heads.mask_predictor(feats), labels)
        else:
            size = heads.mask_roi_pool.output_size
            probs = [torch.zeros((0, 1, size[0] * 2, size[1] * 2), device=device) for _ in boxes]
        kept = [{"boxes": b, "scores": s, "labels": lab, "masks": m}
                for b, s, lab, m in zip(boxes, scores, labels, probs, strict=True)]
        kept = model.transform.postprocess(kept, batch.image_sizes, sizes)
    out = []
    for det in kept:
        order = torch.argsort(det["scores"], descending=True)
        out.append({"boxes": det["boxes"][order].float().cpu().numpy(),
                    "scores": det["scores"][order].float().cpu().numpy(),
                    "masks": det["masks"][order, 0].float().cpu().numpy()})
    return out
