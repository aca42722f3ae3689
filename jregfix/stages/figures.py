"""PNG figures of a run (Pillow only): the paper's Figures 5 and 7 and a per-joint error chart.

* ``silhouettes.png``: the first few training crops; per frame the person mask (grey) with the
  initial (left, red) and the refined (right, green) hard silhouettes over it, IoU printed.
* ``poses.png``: one test frame; front and side views of the ground-truth joints (black) and of
  the joints each regressor gives on the same mesh (colours). The mesh is the frame's row of
  ``params`` when given (the demo passes the true test meshes, so only the regressors differ),
  else the first method's prediction.
* ``per_joint.png``: per-joint MPJPE (mm) of the first method under every regressor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from jregfix.body.base import fit_betas
from jregfix.body.rotations import pose_to_rotmat
from jregfix.geometry.camera import PinholeCamera, spin_focal, weak_to_cam_t
from jregfix.geometry.metrics import mask_iou
from jregfix.io.atomic import atomic_path
from jregfix.io.h36m import load_h36m
from jregfix.io.masks import load_silhouettes
from jregfix.io.params import load_params
from jregfix.io.regressors import load_regressor
from jregfix.render.silhouette import hard_silhouette

FIGURES = ("silhouettes", "poses", "per_joint")
BONES = (
    (0, 1),
    (1, 2),
    (2, 3),
    (0, 4),
    (4, 5),
    (5, 6),
    (0, 7),
    (7, 8),
    (8, 9),
    (9, 10),
    (8, 11),
    (11, 12),
    (12, 13),
    (8, 14),
    (14, 15),
    (15, 16),
)
COLOURS = ((220, 40, 40), (40, 120, 220), (30, 160, 60), (200, 130, 0), (140, 60, 180))


def _save(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _on_body(body, array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor on the body's device and in its dtype (the body may be on a
    GPU; figures are drawn from CPU copies of the results)."""
    return torch.from_numpy(np.asarray(array)).to(body.template.device, body.template.dtype)


def _silhouettes(body, params, rows: np.ndarray, size: int) -> np.ndarray:
    """(len(rows), size, size) bool hard silhouettes of ``params``' rows."""
    template = body.template
    with torch.no_grad():
        rot = pose_to_rotmat(_on_body(body, params.pose[rows]), body.num_joints)
        betas = fit_betas(_on_body(body, params.betas[rows]), body.num_betas)
        verts = body.vertices(rot, betas)
        cam = PinholeCamera.spin_crop(
            len(rows), spin_focal(size), size, template.dtype, template.device
        )
        return (
            hard_silhouette(verts, body.faces, cam, size, cam_t=_on_body(body, params.cam_t[rows]))
            .cpu()
            .numpy()
        )


def silhouette_figure(
    path: Path, body, init: Path, refined: Path, masks: Path, size: int, frames: int
) -> None:
    """Write the first ``frames`` crops (mask, initial and refined silhouettes at ``size`` px,
    with their IoU) as one PNG."""
    sil = load_silhouettes(masks)
    p0, p1 = load_params(init), load_params(refined)
    if p0.cam_t is None and p0.camera is not None:
        p0.cam_t = weak_to_cam_t(torch.from_numpy(p0.camera)).numpy()
    rows = np.arange(min(frames, len(sil.masks)))
    s0, s1 = _silhouettes(body, p0, rows, size), _silhouettes(body, p1, rows, size)
    zoom = max(1, 192 // size)
    tile = size * zoom
    canvas = Image.new("RGB", (2 * tile + 10, len(rows) * (tile + 16) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        mask = sil.masks[r]
        for j, (sv, colour) in enumerate(((s0[i], (220, 40, 40)), (s1[i], (30, 160, 60)))):
            rgb = np.full((size, size, 3), 255, np.uint8)
            rgb[mask] = (170, 170, 170)
            rgb[sv] = (0.5 * rgb[sv] + 0.5 * np.array(colour)).astype(np.uint8)
            img = Image.fromarray(rgb).resize((tile, tile), Image.Resampling.NEAREST)
            x, y = j * (tile + 10), i * (tile + 16) + 14
            canvas.paste(img, (x, y))
            draw.text(
                (x + 2, y - 13),
                f"{'init' if j == 0 else 'refined'} IoU {float(mask_iou(sv, mask)):.3f}",
                fill=(0, 0, 0),
            )
    _save(canvas, path)


def _joints(body, params, row: int, regressors: Mapping[str, str]) -> dict[str, np.ndarray]:
    """{regressor name: (K, 3) root-relative joints} of ``params``' row ``row``."""
    with torch.no_grad():
        rot = pose_to_rotmat(_on_body(body, params.pose[row : row + 1]), body.num_joints)
        betas = fit_betas(_on_body(body, params.betas[row : row + 1]), body.num_betas)
        verts = body.vertices(rot, betas)[0].double().cpu().numpy()
    out = {}
    for name, path in regressors.items():
        j = load_regressor(path) @ verts
        out[name] = j - j[:1]
    return out


def pose_figure(
    path: Path,
    body,
    gt: Path,
    method: Mapping,
    regressors: Mapping[str, str],
    params: Path | None = None,
) -> None:
    from jregfix.stages.evaluate import load_prediction

    data = load_h36m(gt)
    if params is not None:
        pred = load_prediction("npz", params, data)
        label = Path(params).name
    else:
        pred = load_prediction(method["method"], method["path"], data)
        label = method.get("label", method["method"])
    gt_row = int(pred.rows[0])
    joints = _joints(body, pred.params, 0, regressors)
    truth = data.joints17()[gt_row]
    views = (("front (x, y)", 0), ("side (z, y)", 2))
    w, h, margin = 320, 360, 20
    canvas = Image.new("RGB", (2 * w, h + 20 + 14 * (len(joints) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    every = np.concatenate([truth[None], *[j[None] for j in joints.values()]])
    lo, hi = every.reshape(-1, 3).min(0), every.reshape(-1, 3).max(0)
    span = max(hi[1] - lo[1], hi[0] - lo[0], hi[2] - lo[2])
    scale = (h - 2 * margin) / span

    def to_px(p, axis, x0):
        return (
            x0 + w / 2 + scale * (p[axis] - (lo[axis] + hi[axis]) / 2),
            20 + margin + scale * (p[1] - lo[1]),
        )

    for v, (title, axis) in enumerate(views):
        x0 = v * w
        draw.text(
            (x0 + 5, 3), f"{title}  {label}, {Path(str(data.imgname[gt_row])).name}", fill=(0, 0, 0)
        )
        for sets, colour, width in [((truth,), (0, 0, 0), 3)] + [
            ((j,), COLOURS[k % len(COLOURS)], 1) for k, j in enumerate(joints.values())
        ]:
            pts = [to_px(p, axis, x0) for p in sets[0]]
            for a, b in BONES:
                draw.line([pts[a], pts[b]], fill=colour, width=width)
            for x, y in pts:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    y = h + 22
    draw.text((5, y), "ground truth (anatomical joints)", fill=(0, 0, 0))
    for k, name in enumerate(joints):
        err = 1000 * np.linalg.norm(joints[name] - truth, axis=1).mean()
        draw.text(
            (5, y + 14 * (k + 1)),
            f"{name}: MPJPE {err:.1f} mm on this frame",
            fill=COLOURS[k % len(COLOURS)],
        )
    _save(canvas, path)


def per_joint_figure(path: Path, doc: Mapping, method: str, label: str) -> None:
    rows = [r for r in doc["results"] if r["method"] == method]
    names = [n for n in doc["protocol"]["joints"] if n in rows[0]["per_joint_mm"]]
    values = np.array([[r["per_joint_mm"][n] for n in names] for r in rows])
    w, h, left, bottom = 900, 360, 50, 90
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    top = max(float(values.max()), 1e-9) * 1.1
    group = (w - left - 10) / len(names)
    bar = group * 0.8 / len(rows)
    base = h - bottom
    for tick in np.linspace(0, top, 5):
        y = base - (base - 20) * tick / top
        draw.line([(left, y), (w - 10, y)], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{tick:.0f}", fill=(0, 0, 0))
    for j, name in enumerate(names):
        x = left + j * group + group * 0.1
        for k in range(len(rows)):
            hgt = (base - 20) * values[k, j] / top
            draw.rectangle(
                [x + k * bar, base - hgt, x + (k + 1) * bar - 1, base],
                fill=COLOURS[k % len(COLOURS)],
            )
        short = name.replace("Shoulder", "Sh.").replace("Neck/Nose", "Neck")
        draw.text((x, base + 4 + 12 * (j % 2)), short[:9], fill=(0, 0, 0))
    draw.text((left, 3), f"{label}: per-joint error (mm) by regressor", fill=(0, 0, 0))
    for k, r in enumerate(rows):
        draw.rectangle(
            [left + 150 * k, h - 30, left + 150 * k + 10, h - 20], fill=COLOURS[k % len(COLOURS)]
        )
        draw.text(
            (left + 150 * k + 14, h - 31), f"{r['regressor']} ({r['mpjpe_mm']:.1f})", fill=(0, 0, 0)
        )
    _save(canvas, path)


def make_figures(
    out_dir: Path,
    body,
    init: Path,
    refined: Path,
    masks: Path,
    gt_test: Path,
    methods: Sequence[Mapping],
    regressors: Mapping[str, str],
    doc: Mapping,
    image_size: int,
    frames: int = 4,
    params: Path | None = None,
) -> dict:
    """Write :data:`FIGURES` into ``out_dir``; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{k}.png" for k in FIGURES}
    silhouette_figure(paths["silhouettes"], body, init, refined, masks, image_size, frames)
    pose_figure(paths["poses"], body, gt_test, methods[0], regressors, params)
    per_joint_figure(
        paths["per_joint"], doc, methods[0]["method"], methods[0].get("label", methods[0]["method"])
    )
    return {k: str(v) for k, v in paths.items()}
