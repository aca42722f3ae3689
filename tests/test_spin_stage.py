"""`spin` stage and CLI on a synthetic Human3.6M file, images and legacy checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.geometry.crop import crop_image
from jregfix.io.images import read_image
from jregfix.models.hmr import build_hmr, normalize_images
from jregfix.stages.spin import SpinConfig, run_spin
from tests.legacy_torch import save_legacy_cuda
from tests.test_hmr import gram_schmidt_interleaved, random_hmr_state, write_mean_params

NAMES = [
    f"images/S9_Directions_1.{cam}_{f:06d}.jpg"
    for cam in ("54138969", "60457274")
    for f in (1, 6, 11)
][:5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    rng = np.random.default_rng(0)
    (root / "h36m" / "images").mkdir(parents=True)
    for name in NAMES:
        small = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(small).resize((100, 120), Image.Resampling.BICUBIC).save(
            root / "h36m" / name, quality=90
        )
    n = len(NAMES)
    np.savez(
        root / "gt.npz",
        imgname=np.array(NAMES),
        center=rng.uniform(40, 70, (n, 2)),
        scale=rng.uniform(0.4, 0.7, n),
        S=np.zeros((n, 24, 4)),
    )
    state = random_hmr_state(5)
    for k in ("init_pose", "init_shape", "init_cam"):
        del state[k]  # exercise the smpl_mean_params.npz fallback
    save_legacy_cuda({"model": state, "epoch": 0}, root / "model_checkpoint.pt")
    write_mean_params(root / "smpl_mean_params.npz")
    return root


def args(root, out, **kw):
    return dict(
        gt=root / "gt.npz",
        images=root / "h36m",
        checkpoint=root / "model_checkpoint.pt",
        mean_params=root / "smpl_mean_params.npz",
        out=out,
        **kw,
    )


@pytest.mark.slow
def test_spin_outputs_match_direct_model(setup, tmp_path):
    calls = []
    out = tmp_path / "spin.npz"
    result = run_spin(
        **args(setup, out), config=SpinConfig(batch_size=2, chunk_size=2), progress=calls.append
    )
    summary = result.summary
    assert summary["frames"] == 5 and not summary["skipped_frames"] and not result.skipped
    assert result.outputs == {"spin": out} and result.stage == "spin"
    assert set(summary["filled_keys"]) == {"init_pose", "init_shape", "init_cam"}
    assert {c.stage for c in calls} == {"spin"} and {c.unit for c in calls} == {"frames"}
    done = [(c.done, c.total) for c in calls]  # after each batch, and again once a chunk is saved
    assert done == [(2, 5), (2, 5), (4, 5), (4, 5), (5, 5), (5, 5)]
    assert [c.message for c in calls[1::2]] == ["chunk 1 saved", "chunk 2 saved", "chunk 3 saved"]
    assert not (tmp_path / "spin.npz.chunks").exists()
    z = dict(np.load(out))
    shapes = {
        "pred_rotmat": (5, 24, 3, 3),
        "pose": (5, 72),
        "pose_6d": (5, 144),
        "betas": (5, 10),
        "camera": (5, 3),
        "cam_t": (5, 3),
    }
    assert {k: z[k].shape for k in shapes} == shapes
    assert z["imgname"].tolist() == NAMES and z["gt_row"].tolist() == list(range(5))

    # Reference: the same network on all five crops in one batch, no stage plumbing.
    gt = np.load(setup / "gt.npz")
    crops = np.stack(
        [
            crop_image(read_image(setup / "h36m" / n), c, s)
            for n, c, s in zip(NAMES, gt["center"], gt["scale"], strict=True)
        ]
    )
    model, _ = build_hmr(setup / "model_checkpoint.pt", setup / "smpl_mean_params.npz")
    with torch.no_grad():
        ref = model(normalize_images(torch.from_numpy(crops)))
    assert np.allclose(z["pose_6d"], ref.pose_6d.numpy(), atol=1e-4)
    assert np.allclose(z["betas"], ref.betas.numpy(), atol=1e-4)
    assert np.allclose(z["camera"], ref.camera.numpy(), atol=1e-4)
    rot = np.stack(
        [
            [gram_schmidt_interleaved(v) for v in p.reshape(24, 6)]
            for p in z["pose_6d"].astype(np.float64)
        ]
    )
    assert np.allclose(z["pred_rotmat"], rot, atol=1e-5)
    from_aa = Rotation.from_rotvec(z["pose"].reshape(-1, 3).astype(np.float64)).as_matrix()
    assert np.allclose(from_aa, z["pred_rotmat"].reshape(-1, 3, 3), atol=1e-5)
    s, tx, ty = z["camera"].astype(np.float64).T
    assert np.allclose(z["cam_t"], np.stack([tx, ty, 10000 / (224 * s + 1e-9)], 1), rtol=1e-5)

    manifest = json.loads((tmp_path / "spin.npz.manifest.json").read_text())
    assert manifest["stage"] == "spin" and manifest["frames"] == 5
    assert set(manifest["inputs"]) == {"h36m", "checkpoint", "mean_params"}

    again = run_spin(**args(setup, out), config=SpinConfig(batch_size=2, chunk_size=2))
    assert again.skipped and again.summary["frames"] == 5


@pytest.mark.slow
def test_resume_after_interruption(setup, tmp_path):
    fresh = tmp_path / "fresh.npz"
    run_spin(**args(setup, fresh), config=SpinConfig(batch_size=2, chunk_size=2))

    def stop_after_first_chunk(step):
        if step.done > 2:  # inside the second chunk
            raise KeyboardInterrupt

    out = tmp_path / "spin.npz"
    with pytest.raises(KeyboardInterrupt):
        run_spin(
            **args(setup, out),
            config=SpinConfig(batch_size=2, chunk_size=2),
            progress=stop_after_first_chunk,
        )
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "spin.npz.chunks").glob("chunk_*")) == [
        "chunk_000000.npz"
    ]
    result = run_spin(**args(setup, out), config=SpinConfig(batch_size=2, chunk_size=2))
    assert result.summary["resumed_chunks"] == 1 and result.summary["frames"] == 5
    a, b = np.load(fresh), np.load(out)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.slow
def test_missing_and_unreadable_images(setup, tmp_path):
    root = tmp_path / "copy"
    (root / "images").mkdir(parents=True)
    for name in NAMES[1:]:
        (root / name).write_bytes((setup / "h36m" / name).read_bytes())
    kw = args(setup, tmp_path / "spin.npz")
    kw["images"] = root
    with pytest.raises(JregfixError, match=r"1 of 5 images missing.*000001\.jpg.*--skip-missing"):
        run_spin(**kw)
    assert not (tmp_path / "spin.npz").exists()
    (root / NAMES[2]).write_bytes(b"truncated")
    result = run_spin(**kw, config=SpinConfig(batch_size=4, skip_missing=True))
    assert sorted(result.summary["skipped_frames"]) == sorted([NAMES[0], NAMES[2]])
    z = np.load(tmp_path / "spin.npz")
    assert z["gt_row"].tolist() == [1, 3, 4]
    assert z["imgname"].tolist() == [NAMES[i] for i in (1, 3, 4)]
    manifest = json.loads((tmp_path / "spin.npz.manifest.json").read_text())
    assert manifest["skipped"] == 2


def test_cli(setup, tmp_path, capsys, monkeypatch):
    import jregfix.stages.frames as frames

    pools = []
    real_pool = frames.ThreadPoolExecutor
    monkeypatch.setattr(
        frames, "ThreadPoolExecutor", lambda workers: pools.append(workers) or real_pool(workers)
    )
    out = tmp_path / "cli.npz"
    argv = [
        "spin",
        "--gt",
        str(setup / "gt.npz"),
        "--images",
        str(setup / "h36m"),
        "--checkpoint",
        str(setup / "model_checkpoint.pt"),
        "--mean-params",
        str(setup / "smpl_mean_params.npz"),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--workers",
        "3",
    ]
    assert main(argv) == 0
    assert np.load(out)["pose"].shape == (5, 72)
    manifest = json.loads((tmp_path / "cli.npz.manifest.json").read_text())
    assert manifest["run_config"]["workers"] == 3 and pools == [3]  # one chunk, 3 threads
    assert manifest["numerics"] == {"device_type": "cpu"}
    bad = list(argv)
    bad[bad.index("--checkpoint") + 1] = str(tmp_path / "absent.pt")
    assert main(bad + ["--force"]) == 1
    assert "absent.pt" in capsys.readouterr().err
