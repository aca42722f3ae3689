"""`silhouettes` stage: person selection, crop alignment, storage, resume, Mask R-CNN plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.geometry.metrics import box_iou
from jregfix.io.masks import load_silhouettes
from jregfix.models.maskrcnn import TORCHVISION_FILE, build_maskrcnn, detect_people
from jregfix.stages.silhouettes import SilhouetteConfig, run_silhouettes, select_person

H, W = 120, 100
NAMES = [f"images/S11_Posing_1.55011271_{f:06d}.jpg" for f in (1, 6, 11, 16, 21)]
CENTER, SCALE = np.array([50.3, 60.4]), 0.5  # box [0, 100) x [10, 110) in the image
PERSON = (30, 20, 70, 100)  # x0, y0, x1, y1 of the "person" rectangle


def ref_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_iou_and_selection_rule():
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(1, 60, (20, 2))], 1)
    square = np.array([10.0, 5.0, 70.0, 65.0])
    assert np.allclose(box_iou(boxes, square), [ref_iou(b, square) for b in boxes])

    boxes = np.array([[0, 0, 10, 10], [20, 10, 60, 60], [20, 10, 60, 60], [0, 0, 80, 80.0]])
    scores = np.array([0.99, 0.6, 0.8, 0.7])
    square = np.array([15.0, 5.0, 65.0, 65.0])
    best, iou = select_person(boxes, scores, square, 0.1)
    assert best == 2 and iou == pytest.approx(ref_iou(boxes[2], square))  # tie -> higher score
    assert select_person(boxes[:1], scores[:1], square, 0.1)[0] is None  # IoU 0
    assert select_person(np.zeros((0, 4)), np.zeros(0), square, 0.0)[0] is None


def fake_detector(calls):
    """Frame 0/1/4: the person plus a high-scoring distractor far from the crop; frame 2:
    nothing; frame 3: only the distractor."""
    person = np.zeros((H, W), np.float32)
    person[PERSON[1] : PERSON[3], PERSON[0] : PERSON[2]] = 0.9
    distractor = np.zeros((H, W), np.float32)
    distractor[:15, :15] = 1.0

    def detect(images):
        out = []
        for img in images:
            calls.append(img.shape)
            kind = int(img[0, -1, 0]) // 40  # frame index written into the image by the test
            boxes, scores, masks = [], [], []
            if kind in (0, 1, 3, 4):
                boxes.append([0, 0, 15, 15])
                scores.append(0.99)
                masks.append(distractor)
            if kind in (0, 1, 4):
                boxes.append(PERSON)
                scores.append(0.7 + 0.05 * kind)
                masks.append(person)
            out.append(
                {
                    "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                    "scores": np.array(scores, np.float32),
                    "masks": np.array(masks, np.float32).reshape(-1, H, W),
                }
            )
        return out

    return detect


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "h36m" / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate(NAMES):
        img = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        img[PERSON[1] : PERSON[3], PERSON[0] : PERSON[2]] += 150
        img[:4, -4:] = 40 * i + 20  # frame index, survives PNG losslessly
        Image.fromarray(img).save(tmp_path / "h36m" / name, format="PNG")
    n = len(NAMES)
    np.savez(
        tmp_path / "gt.npz",
        imgname=np.array(NAMES),
        center=np.tile(CENTER, (n, 1)),
        scale=np.full(n, SCALE),
    )
    return tmp_path


def test_stage_selection_alignment_storage_resume(data):
    calls = []
    cfg = SilhouetteConfig(backend="fake", batch_size=2, chunk_size=2)
    out = data / "sil.npz"

    def stop_in_second_chunk(step):
        if step.done > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_silhouettes(
            data / "gt.npz",
            data / "h36m",
            out,
            cfg,
            stop_in_second_chunk,
            detector=fake_detector(calls),
        )
    assert not out.exists() and len(calls) == 4  # chunk 0 saved, chunk 1 interrupted
    calls.clear()
    result = run_silhouettes(
        data / "gt.npz",
        data / "h36m",
        out,
        cfg,
        detector=fake_detector(calls),
        figure=data / "fig.png",
    )
    assert result.summary["resumed_chunks"] == 1 and len(calls) == 3 and calls[0] == (H, W, 3)
    assert result.summary["frames"] == 5 and result.summary["found"] == 3
    assert result.outputs == {"silhouettes": out, "figure": data / "fig.png"}

    masks, score, found, imgname = load_silhouettes(out)
    assert imgname.tolist() == NAMES
    assert found.tolist() == [True, True, False, False, True]
    assert np.allclose(score, [0.7, 0.75, 0, 0, 0.9])
    assert not masks[~found].any()
    # Independent crop mapping: box [trunc(c - h/2), trunc(c + h/2)) scaled to 224.
    h = 200 * SCALE
    ul = np.trunc(CENTER - h / 2)
    px = (np.array(PERSON, float).reshape(2, 2) - ul) * 224 / h  # rectangle in crop coords
    yy, xx = np.mgrid[0:224, 0:224] + 0.5
    inside = (
        (xx > px[0, 0] + 1.5)
        & (xx < px[1, 0] - 1.5)
        & (yy > px[0, 1] + 1.5)
        & (yy < px[1, 1] - 1.5)
    )
    outside = (
        (xx < px[0, 0] - 1.5)
        | (xx > px[1, 0] + 1.5)
        | (yy < px[0, 1] - 1.5)
        | (yy > px[1, 1] + 1.5)
    )
    for m in masks[found]:
        assert m[inside].all() and not m[outside].any()
    with np.load(out) as z:
        assert np.allclose(z["box"][0], PERSON) and np.isnan(z["box"][2]).all()
        assert z["iou"][0] == pytest.approx(
            ref_iou(PERSON, (CENTER[0] - 50, CENTER[1] - 50, CENTER[0] + 50, CENTER[1] + 50))
        )
    manifest = json.loads((data / "sil.npz.manifest.json").read_text())
    assert manifest["found"] == 3 and manifest["config"]["backend"] == "fake"
    fig = np.asarray(Image.open(data / "fig.png"))
    assert fig.shape == (2 * 224, 4 * 224, 3)
    calls.clear()
    again = run_silhouettes(data / "gt.npz", data / "h36m", out, cfg, detector=fake_detector(calls))
    assert again.skipped and not calls and again.summary["found"] == 3


def test_missing_images_and_bad_backend(data):
    (data / "h36m" / NAMES[1]).unlink()
    cfg = SilhouetteConfig(backend="fake", batch_size=3)
    with pytest.raises(JregfixError, match="1 of 5 images missing"):
        run_silhouettes(
            data / "gt.npz", data / "h36m", data / "s.npz", cfg, detector=fake_detector([])
        )
    cfg.skip_missing = True
    res = run_silhouettes(
        data / "gt.npz", data / "h36m", data / "s.npz", cfg, detector=fake_detector([])
    )
    assert res.summary["skipped_frames"] == [NAMES[1]] and res.summary["frames"] == 4
    with pytest.raises(JregfixError, match="unknown segmentation backend 'sam'"):
        run_silhouettes(
            data / "gt.npz", data / "h36m", data / "t.npz", SilhouetteConfig(backend="sam")
        )


def small_random_maskrcnn():
    model = build_maskrcnn(random_seed=0, min_size=64, max_size=96)
    # Random class logits are huge and arbitrary: damp them and favour person (1) and bicycle
    # (2): the top 30 of 20 proposals x 91 classes are 20 people + 10 bicycles.
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.01)
        model.roi_heads.box_predictor.cls_score.bias[1:3] += torch.tensor([3.0, 2.0])
    model.rpn._pre_nms_top_n["testing"] = 200
    model.rpn._post_nms_top_n["testing"] = 20
    model.roi_heads.detections_per_img = 30
    return model


@pytest.mark.slow
def test_maskrcnn_person_filter_matches_torchvision():
    model = small_random_maskrcnn()
    rng = np.random.default_rng(2)
    images = [
        rng.integers(0, 255, (60, 80, 3), dtype=np.uint8),
        rng.integers(0, 255, (72, 64, 3), dtype=np.uint8),
    ]
    got = detect_people(model, images, torch.device("cpu"), score_threshold=0.0)
    with torch.no_grad():
        ref = model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    for im, g, r in zip(images, got, ref, strict=True):
        person = (r["labels"] == 1).numpy()
        assert person.any() and not person.all()
        order = np.argsort(-r["scores"].numpy()[person], kind="stable")
        assert np.allclose(g["boxes"], r["boxes"].numpy()[person][order], atol=1e-4)
        assert np.allclose(g["scores"], r["scores"].numpy()[person][order])
        assert g["masks"].shape == (person.sum(),) + im.shape[:2]
        assert np.allclose(g["masks"], r["masks"].numpy()[person][order][:, 0], atol=1e-5)


def test_stage_with_maskrcnn_outputs(data):
    model = small_random_maskrcnn()
    cfg = SilhouetteConfig(
        backend="random-maskrcnn", score_threshold=0.0, min_iou=0.0, batch_size=3, chunk_size=3
    )
    res = run_silhouettes(
        data / "gt.npz",
        data / "h36m",
        data / "s.npz",
        cfg,
        detector=lambda ims: detect_people(model, ims, torch.device("cpu"), 0.0),
    )
    masks, score, found, _ = load_silhouettes(data / "s.npz")
    assert res.summary["frames"] == 5 and masks.shape == (5, 224, 224)
    assert found.all() and (score > 0).all()


def test_maskrcnn_weights_loading(tmp_path, monkeypatch):
    # Loading the release itself (file layout, cache path) is tested in test_maskrcnn_weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(JregfixError, match=f"{tmp_path}/torch/hub/checkpoints/{TORCHVISION_FILE}"):
        build_maskrcnn()
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "hmr.pt")
    with pytest.raises(JregfixError, match="not torchvision's Mask R-CNN"):
        build_maskrcnn(tmp_path / "hmr.pt")


def test_cli_offline_message(data, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(data / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    code = main(
        [
            "silhouettes",
            "--gt",
            str(data / "gt.npz"),
            "--images",
            str(data / "h36m"),
            "--out",
            str(data / "s.npz"),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert TORCHVISION_FILE in err and "--weights" in err
    assert not (data / "s.npz").exists()


def test_cli_save_figures_is_a_frame_count_and_h36m_an_alias(data, monkeypatch, capsys):
    """`--save-figures N` means what it means in refine: a PNG of the first N frames beside
    --out; `--h36m` still names the GT file."""
    import jregfix.stages.silhouettes as stage

    monkeypatch.setattr(stage, "torchvision_detector", lambda *a: fake_detector([]))
    common = ["--images", str(data / "h36m"), "--device", "cpu", "--backend", "torchvision"]
    assert (
        main(["silhouettes", "--h36m", str(data / "gt.npz"), "--out", str(data / "a.npz"), *common])
        == 0
    )
    assert not list(data.glob("*.png"))  # 0 (the default): no figure
    assert (
        main(
            [
                "silhouettes",
                "--gt",
                str(data / "gt.npz"),
                "--out",
                str(data / "b.npz"),
                "--save-figures",
                "2",
                *common,
            ]
        )
        == 0
    )
    assert f"figure: {data / 'b_masks.png'}" in capsys.readouterr().err.replace("\n", "")
    fig = np.asarray(Image.open(data / "b_masks.png"))
    assert fig.shape == (224, 4 * 224, 3)
    assert fig[:, : 2 * 224].any() and not fig[:, 2 * 224 :].any()  # two tiles, the rest empty
    assert np.load(data / "a.npz")["found"].tolist() == np.load(data / "b.npz")["found"].tolist()
    assert (
        main(
            [
                "silhouettes",
                "--gt",
                str(data / "gt.npz"),
                "--out",
                str(data / "c.npz"),
                "--save-figures",
                "-1",
                *common,
            ]
        )
        == 2
    )  # a usage error, one line
