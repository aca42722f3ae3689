"""`refine` on a synthetic world where the truth is known (masks rendered from true meshes)."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jregfix.body.base import batch_vertices
from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
from jregfix.io.masks import save_silhouettes
from jregfix.render.silhouette import hard_silhouette
from jregfix.stages.refine import RefineConfig, refine
from tests.conftest import camera_facing_poses, planted_regressor

N, SIZE = 8, 64
FOCAL = 5000.0 * SIZE / 224


@pytest.fixture(scope="module")
def world(smpl_body, tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("refine")
    aa = camera_facing_poses(rng, N, 0.2)
    betas = rng.normal(size=(N, 10)) * 0.5
    cam_t = np.stack([rng.normal(size=N) * 0.05, 0.1 + rng.normal(size=N) * 0.05,
                      45 + rng.normal(size=N)], 1)
    verts = batch_vertices(smpl_body, torch.from_numpy(aa.reshape(N, 72)),
                           torch.from_numpy(betas)).double()
    j_true = planted_regressor(rng, 4)
    np.save(root / "J_spin.npy", j_true)
    gt17 = np.einsum("kv,nvc->nkc", j_true, verts.numpy())
    names = np.array([h36m_imgname("S1", "Walking_1", "54138969", i + 1) for i in range(N)])
    save_h36m(root / "gt.npz", names, np.full((N, 2), 500.0), np.full(N, 2.0),
              joints17_to_s24(gt17))
    cam = PinholeCamera.spin_crop(N, FOCAL, SIZE)
    masks = hard_silhouette(verts.float(), smpl_body.faces, cam, SIZE,
                            cam_t=torch.from_numpy(cam_t).float()).numpy()
    save_silhouettes(root / "sil.npz", masks, np.ones(N), np.ones(N, bool), names)
    init_aa = aa + rng.normal(size=aa.shape) * 0.1
    np.savez(root / "init.npz", pose=init_aa.reshape(N, 72),
             betas=betas + rng.normal(size=betas.shape) * 0.3,
             cam_t=cam_t + np.array([0.04, -0.04, 4.0]), imgname=names)
    return root


def run(world, smpl_body, out, **kw):
    cfg = RefineConfig(iters=kw.pop("iters", 25), batch_size=kw.pop("batch_size", 4),
                       image_size=SIZE, **kw)
    return refine(world / "init.npz", world / "gt.npz", world / "sil.npz", smpl_body,
                  world / "J_spin.npy", out, cfg)


def test_refinement_improves_fit_and_is_deterministic(world, smpl_body, tmp_path):
    s = run(world, smpl_body, tmp_path / "a.npz")
    assert s["iou_after"] > s["iou_before"] + 0.1
    assert s["joint_err_after_mm"] < 0.5 * s["joint_err_before_mm"]
    out = np.load(tmp_path / "a.npz")
    assert out["pose"].shape == (N, 72) and out["pred_rotmat"].shape == (N, 24, 3, 3)
    assert (tmp_path / "a.npz.manifest.json").is_file()
    assert not (tmp_path / "a.npz.chunks").exists()
    run(world, smpl_body, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_without_silhouette_term_the_iou_gain_disappears(world, smpl_body, tmp_path):
    full = run(world, smpl_body, tmp_path / "full.npz")
    nosil = run(world, smpl_body, tmp_path / "nosil.npz", weights={"silhouette": 0.0})
    gain_full = full["iou_after"] - full["iou_before"]
    gain_nosil = nosil["iou_after"] - nosil["iou_before"]
    # root-relative joints also fix the pose (some IoU), but only the silhouette moves the camera
    assert gain_nosil < 0.5 * gain_full
    init_t = np.load(world / "init.npz")["cam_t"]
    true_t = init_t - np.array([0.04, -0.04, 4.0])
    t_full = np.load(tmp_path / "full.npz")["cam_t"]
    t_nosil = np.load(tmp_path / "nosil.npz")["cam_t"]
    np.testing.assert_allclose(t_nosil, init_t, rtol=1e-5)
    assert np.abs(t_full - true_t)[:, 2].mean() < 0.85 * np.abs(init_t - true_t)[:, 2].mean()


def test_resume_after_a_kill_gives_the_same_bytes(world, smpl_body, tmp_path):
    run(world, smpl_body, tmp_path / "ref.npz", iters=5, batch_size=2)

    class Killed(Exception):
        pass

    calls = {"chunks": 0}

    def killer(done, live):
        if not live:  # called once per finished chunk
            calls["chunks"] += 1
            if calls["chunks"] == 2:
                raise Killed

    cfg = RefineConfig(iters=5, batch_size=2, image_size=SIZE)
    args = (world / "init.npz", world / "gt.npz", world / "sil.npz", smpl_body,
            world / "J_spin.npy", tmp_path / "resumed.npz", cfg)
    with pytest.raises(Killed):
        refine(*args, progress=killer)
    assert not (tmp_path / "resumed.npz").exists()
    assert len(list((tmp_path / "resumed.npz.chunks").glob("chunk_*"))) == 2
    summary = refine(*args)
    assert summary["resumed_chunks"] == 2
    assert (tmp_path / "resumed.npz").read_bytes() == (tmp_path / "ref.npz").read_bytes()

    # a killed batch-group (two batches per discriminator step) resumes mid-group
    cfg2 = RefineConfig(iters=5, batch_size=2, image_size=SIZE, batches_per_disc_step=2)
    grouped = (*args[:5], tmp_path / "grouped.npz", cfg2)
    ref2 = (*args[:5], tmp_path / "grouped_ref.npz", cfg2)
    refine(*ref2)
    calls["chunks"] = -1  # die after the 3rd batch: the second group is half done
    with pytest.raises(Killed):
        refine(*grouped, progress=killer)
    assert refine(*grouped)["resumed_chunks"] == 3
    assert (tmp_path / "grouped.npz").read_bytes() == (tmp_path / "grouped_ref.npz").read_bytes()
    # ...and grouping changes the discriminator schedule, hence the result
    assert (tmp_path / "grouped.npz").read_bytes() != (tmp_path / "ref.npz").read_bytes()


def test_bad_inputs(world, smpl_body, tmp_path):
    names = np.load(world / "gt.npz")["imgname"]
    save_silhouettes(tmp_path / "short.npz", np.zeros((3, SIZE, SIZE), bool), np.ones(3),
                     np.ones(3, bool), names[:3])
    cfg = RefineConfig(iters=1, image_size=SIZE)
    with pytest.raises(JregfixError, match="frame counts differ"):
        refine(world / "init.npz", world / "gt.npz", tmp_path / "short.npz", smpl_body,
               world / "J_spin.npy", tmp_path / "o.npz", cfg)
    save_silhouettes(tmp_path / "big.npz", np.zeros((N, 32, 32), bool), np.ones(N),
                     np.ones(N, bool), names)
    with pytest.raises(JregfixError, match="masks are"):
        refine(world / "init.npz", world / "gt.npz", tmp_path / "big.npz", smpl_body,
               world / "J_spin.npy", tmp_path / "o.npz", cfg)
    init = dict(np.load(world / "init.npz"))
    init["pose"][2, 7] = np.nan
    np.savez(tmp_path / "nan.npz", **init)
    with pytest.raises(JregfixError, match="NaN"):
        refine(tmp_path / "nan.npz", world / "gt.npz", world / "sil.npz", smpl_body,
               world / "J_spin.npy", tmp_path / "o.npz", cfg)
    assert not (tmp_path / "o.npz").exists()
    with pytest.raises(JregfixError, match="weight 0"):
        RefineConfig(weights={"joint": 0, "silhouette": 0, "adversarial": 0}).validate()
    with pytest.raises(JregfixError, match="empty"):
        refine(world / "init.npz", world / "gt.npz", world / "sil.npz", smpl_body,
               world / "J_spin.npy", tmp_path / "o.npz", cfg, shard=(8, 9))


def test_empty_masks_keep_the_frame_without_silhouette_term(world, smpl_body, tmp_path):
    from jregfix.io.masks import load_silhouettes

    sil = load_silhouettes(world / "sil.npz")
    found = sil.found.copy()
    found[[1, 5]] = False
    save_silhouettes(tmp_path / "sil.npz", sil.masks, sil.score, found, sil.imgname)
    cfg = RefineConfig(iters=3, batch_size=4, image_size=SIZE)
    s = refine(world / "init.npz", world / "gt.npz", tmp_path / "sil.npz", smpl_body,
               world / "J_spin.npy", tmp_path / "o.npz", cfg)
    out = np.load(tmp_path / "o.npz")
    assert s["empty_masks"] == 2 and s["frames"] == N
    assert not out["has_mask"][[1, 5]].any() and out["has_mask"].sum() == N - 2
    np.testing.assert_array_equal(out["loss_silhouette_initial"][[1, 5]], 0.0)
    assert np.isnan(out["iou_before"][[1, 5]]).all() and np.isfinite(out["iou_before"][0])
    assert s["iou_before"] == pytest.approx(np.nanmean(out["iou_before"]))


def test_regressor_fitted_on_refined_meshes_is_refused(world, smpl_body, tmp_path):
    import json
    import shutil

    shutil.copy(world / "J_spin.npy", tmp_path / "J_opt.npy")
    (tmp_path / "J_opt.npy.json").write_text(json.dumps({"params_stage": "refine"}))
    with pytest.raises(JregfixError, match="refined meshes"):
        refine(world / "init.npz", world / "gt.npz", world / "sil.npz", smpl_body,
               tmp_path / "J_opt.npy", tmp_path / "o.npz", RefineConfig(iters=1, image_size=SIZE))


def test_discriminators_learn_to_separate_init_from_refined():
    from jregfix.body.rotations import rotmat_to_rot6d
    from jregfix.stages.refine import Discriminators

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    real = rotmat_to_rot6d(torch.from_numpy(
        Rotation.from_rotvec(rng.normal(size=(64 * 24, 3)) * 0.1).as_matrix()).float()
    ).reshape(64, 24, 6)
    fake = rotmat_to_rot6d(torch.from_numpy(
        Rotation.from_rotvec(rng.normal(size=(64 * 24, 3)) * 1.0).as_matrix()).float()
    ).reshape(64, 24, 6)
    real_b, fake_b = torch.zeros(64, 10), torch.ones(64, 10) * 2
    disc = Discriminators(24, 10, 1e-3)
    for _ in range(150):  # lr 1e-3, one step per optimised batch, as in refine
        disc.step(disc.gradient(real, real_b, fake, fake_b)[1])
    with torch.no_grad():
        fake_cost = disc.generator_loss(fake, fake_b).mean()
        assert fake_cost > 4 * disc.generator_loss(real, real_b).mean()
    # the generator cost has a gradient that points fake poses towards the real ones
    x = fake.clone().requires_grad_()
    disc.generator_loss(x, fake_b).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cli_refine_with_figures(world, smpl_pkl, tmp_path):
    from PIL import Image

    from jregfix.cli import main

    out = tmp_path / "refined.npz"
    code = main(["refine", "--init", str(world / "init.npz"), "--gt", str(world / "gt.npz"),
                 "--silhouettes", str(world / "sil.npz"), "--smpl", str(smpl_pkl),
                 "--joint-regressor", str(world / "J_spin.npy"), "--out", str(out),
                 "--iters", "2", "--batch-size", "4", "--image-size", str(SIZE),
                 "--weights", "adversarial=0", "--save-figures", "2"])
    assert code == 0
    assert np.load(out)["pose"].shape == (N, 72)
    assert Image.open(tmp_path / "refined_silhouettes.png").size[0] > SIZE
    assert main(["refine", "--init", str(world / "init.npz"), "--gt", str(world / "gt.npz"),
                 "--silhouettes", str(world / "sil.npz"), "--smpl", str(smpl_pkl),
                 "--joint-regressor", str(world / "J_spin.npy"), "--out", str(out),
                 "--weights", "pose=1"]) == 1


def test_shards_refined_separately_then_merged(world, smpl_pkl, tmp_path):
    from jregfix.cli.app import main

    common = ["refine", "--init", str(world / "init.npz"), "--gt", str(world / "gt.npz"),
              "--silhouettes", str(world / "sil.npz"), "--smpl", str(smpl_pkl),
              "--joint-regressor", str(world / "J_spin.npy"), "--iters", "2", "--batch-size",
              "3", "--image-size", str(SIZE), "--weights", "adversarial=0"]
    whole = tmp_path / "whole.npz"
    assert main([*common, "--out", str(whole)]) == 0
    parts = [tmp_path / f"part{i}.npz" for i in range(2)]
    for i, part in enumerate(parts):
        assert main([*common, "--shard", f"{i}/2", "--out", str(part)]) == 0
    merged = tmp_path / "merged.npz"
    assert main(["refine-merge", str(parts[1]), str(parts[0]), "--out", str(merged)]) == 0
    # 8 frames in batches of 3: shard 0 takes batches 0-1 (6 frames), shard 1 batch 2; without
    # the adversarial term the shards share no state, so the merge equals the whole run
    with np.load(whole) as a, np.load(merged) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), key
    assert main(["refine-merge", str(parts[0]), "--out", str(tmp_path / "bad.npz")]) == 1
    assert main(["refine-merge", str(whole), str(parts[1]), "--out",
                 str(tmp_path / "bad.npz")]) == 1
    assert not (tmp_path / "bad.npz").exists()
