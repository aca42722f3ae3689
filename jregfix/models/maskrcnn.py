"""Person masks from torchvision's Mask R-CNN (ResNet-50 FPN, COCO), the authors' segmenter.

Weights come from ``--weights`` or torchvision's own cache file, ``<torch hub dir>/checkpoints/``
+ :data:`TORCHVISION_FILE`; nothing is downloaded. Two COCO releases load, told apart by their keys:

- ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`` (torchvision 0.3, 2019): trained on a frozen
  ImageNet backbone, so its 53 backbone norms are ``FrozenBatchNorm2d`` (weight, bias,
  running mean and variance, no ``num_batches_tracked``): 307 tensors. It was trained when
  frozen batch norm added no epsilon to the variance; later torchvision defaults to 1e-5 and
  resets it to 0 when loading these weights, and so do we, so outputs match torchvision's.
  The file also predates torchvision's conv blocks: its 26 RPN, FPN and mask-head tensors carry
  the old names (see :func:`current_name`).
- ``maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth`` (torchvision 0.13, 2022): trainable
  ``BatchNorm2d`` throughout, a two-conv RPN head and conv box/mask heads; torchvision's
  ``maskrcnn_resnet50_fpn_v2`` builds it.

Any other file is refused with a one-line guess of what it is. A backend is any callable
``images -> detections`` with :func:`detect_people`'s contract, so other segmenters can plug into
the silhouettes stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from jregfix.errors import JregfixError

if TYPE_CHECKING:  # annotations only: the functions below import torchvision when they run
    from torchvision.models.detection import MaskRCNN

TORCHVISION_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
TORCHVISION_V2_FILE = "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
COCO_CLASSES = 91  # torchvision's COCO label space: background + 90 ids, some unused
COCO_PERSON = 1
MASKRCNN_V1 = "torchvision's Mask R-CNN R50-FPN (COCO release, frozen batch norm)"
MASKRCNN_V2 = "torchvision's Mask R-CNN R50-FPN v2"


def default_weights_path() -> Path:
    """Where torchvision keeps the COCO weights it downloads (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE


def identify_state_dict(keys: Iterable[str]) -> tuple[str | None, str]:
    """Which network a state dict's key names belong to: ``("v1" | "v2" | None, description)``.

    Only the two Mask R-CNN releases get a variant; the description names what else it looks
    like, for one-line errors.
    """
    keys = set(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return None, "a model saved from (Distributed)DataParallel: every key starts with 'module.'"
    v2_heads = "roi_heads.box_head.0.0.weight" in keys  # v2's box head is convolutional
    if "roi_heads.keypoint_predictor.kps_score_lowres.weight" in keys:
        return None, "torchvision's Keypoint R-CNN"
    if "roi_heads.mask_predictor.mask_fcn_logits.weight" in keys:
        if v2_heads:
            return "v2", MASKRCNN_V2
        if any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in keys):
            return None, (
                "a Mask R-CNN R50-FPN built with trainable BatchNorm2d (it has "
                "num_batches_tracked), not the COCO release's frozen batch norm"
            )
        return "v1", MASKRCNN_V1
    if "roi_heads.box_predictor.cls_score.weight" in keys:
        return None, f"torchvision's Faster R-CNN{' v2' if v2_heads else ''} (no mask head)"
    if "head.classification_head.cls_logits.weight" in keys:
        return None, "a single-stage detector (RetinaNet/FCOS, no mask head)"
    if {"decpose.weight", "deccam.weight"} <= keys:
        return None, "SPIN's HMR regressor (model_checkpoint.pt / spin_model_checkpoint.pth.tar)"
    if {"fc.weight", "layer4.0.conv1.weight"} <= keys:
        return None, "a plain ResNet ImageNet classifier (no detection heads)"
    return None, f"an unrecognised state dict ({len(keys)} tensors, e.g. {sorted(keys)[:2]})"


def current_name(key: str) -> str:
    """Today's torchvision name of a tensor named as in the 2019 release.

    torchvision has since wrapped these convolutions in conv blocks: ``rpn.head.conv.weight`` ->
    ``rpn.head.conv.0.0.weight``, ``backbone.fpn.inner_blocks.2.bias`` ->
    ``backbone.fpn.inner_blocks.2.0.bias`` (also ``layer_blocks``) and
    ``roi_heads.mask_head.mask_fcn1.weight`` -> ``roi_heads.mask_head.0.0.weight``. Other names
    are unchanged; torchvision renames the same way when it loads the old file.
    """
    if m := re.fullmatch(r"rpn\.head\.conv\.(weight|bias)", key):
        return f"rpn.head.conv.0.0.{m[1]}"
    if m := re.fullmatch(r"(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)", key):
        return f"{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", key):
        return f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"
    return key


def _architecture(variant: str, min_size: int, max_size: int) -> MaskRCNN:
    """The module tree torchvision builds for that release's weights (random initialisation)."""
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if variant == "v2":
        return maskrcnn_resnet50_fpn_v2(
            weights=None,
            weights_backbone=None,
            num_classes=COCO_CLASSES,
            min_size=min_size,
            max_size=max_size,
        )
    # maskrcnn_resnet50_fpn(weights=None) would use BatchNorm2d: frozen norms only come with
    # weights it downloads, so the same tree is assembled here from its public parts.
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d
    )
    model = MaskRCNN(backbone, num_classes=COCO_CLASSES, min_size=min_size, max_size=max_size)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = 0.0  # the 2019 weights were trained without an epsilon
    return model


def read_maskrcnn_weights(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Load a weights file and tell which release it is laid out as: ``(variant, state_dict)``.

    Keys come back under today's names. Other networks are refused here, NaN/inf tensors by the
    checkpoint reader; the exact key set and shapes are checked against the built model in
    :func:`build_maskrcnn`.
    """
    from jregfix.io.checkpoint import load_state_dict_file

    state = load_state_dict_file(path)
    variant, what = identify_state_dict(state)
    if variant is None:
        raise JregfixError(
            f"{path}: looks like {what}, not torchvision's Mask R-CNN COCO "
            f"weights; pass --weights {TORCHVISION_FILE} ({TORCHVISION_URL})"
        )
    return variant, {current_name(k): v for k, v in state.items()}


def build_maskrcnn(
    weights: str | Path | None = None,
    random_seed: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
) -> MaskRCNN:
    """Mask R-CNN R50-FPN in eval mode, strictly loaded with a COCO release.

    ``weights``: a state_dict file (default: torchvision's cache file); v1 or v2 is chosen from
    its keys. ``random_seed``: skip loading and keep a seeded random initialisation of the v1
    architecture (tests and benchmarks only). ``min_size``/``max_size`` are torchvision's input
    resize bounds (defaults as trained).
    """
    if random_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            return _architecture("v1", min_size, max_size).eval()
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise JregfixError(
            f"Mask R-CNN weights not found at {path}. Offline, download {TORCHVISION_URL} on a "
            f"connected machine and place it at {default_weights_path()} (torchvision's cache) "
            "or pass --weights PATH"
        )
    variant, state = read_maskrcnn_weights(path)
    model = _architecture(variant, min_size, max_size)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise JregfixError(
            f"{path}: looks like {identify_state_dict(state)[1]} but does not "
            f"match its COCO release: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:2]}; use the unmodified "
            f"{TORCHVISION_FILE} ({TORCHVISION_URL})"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def detect_people(
    model: MaskRCNN, images: list[np.ndarray], device: torch.device, score_threshold: float = 0.5
) -> list[dict[str, np.ndarray]]:
    """Person detections for uint8 RGB images (H,W,3).

    Returns per image ``boxes`` (K,4) x0,y0,x1,y1 in image pixels, ``scores`` (K,) and
    ``masks`` (K,H,W) float32 probabilities, for COCO class person with score >= threshold,
    sorted by score. This is torchvision's eval forward with one change: detections of other
    classes are dropped after box post-processing (including its top-100 cut), so the mask
    head and the full-resolution mask pasting run on people only.
    """
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    tensors = [
        torch.tensor(im, device=device).permute(2, 0, 1).float().div_(255.0) for im in images
    ]
    sizes = [tuple(t.shape[-2:]) for t in tensors]
    heads = model.roi_heads
    with torch.inference_mode():
        batch, _ = model.transform(tensors)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        feats = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits, regression = heads.box_predictor(feats)
        boxes, scores, labels = heads.postprocess_detections(
            logits, regression, proposals, batch.image_sizes
        )
        keep = [
            (lab == COCO_PERSON) & (sc >= score_threshold)
            for lab, sc in zip(labels, scores, strict=True)
        ]
        boxes = [b[k] for b, k in zip(boxes, keep, strict=True)]
        scores = [s[k] for s, k in zip(scores, keep, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, keep, strict=True)]
        if sum(len(b) for b in boxes):
            feats = heads.mask_head(heads.mask_roi_pool(features, boxes, batch.image_sizes))
            probs = maskrcnn_inference(heads.mask_predictor(feats), labels)
        else:
            size = heads.mask_roi_pool.output_size
            probs = [torch.zeros((0, 1, size[0] * 2, size[1] * 2), device=device) for _ in boxes]
        kept = [
            {"boxes": b, "scores": s, "labels": lab, "masks": m}
            for b, s, lab, m in zip(boxes, scores, labels, probs, strict=True)
        ]
        kept = model.transform.postprocess(kept, batch.image_sizes, sizes)
    out = []
    for det in kept:
        order = torch.argsort(det["scores"], descending=True)
        out.append(
            {
                "boxes": det["boxes"][order].float().cpu().numpy(),
                "scores": det["scores"][order].float().cpu().numpy(),
                "masks": det["masks"][order, 0].float().cpu().numpy(),
            }
        )
    return out
