"""The synthetic Anny world: geometry, formats and determinism against independent computations.

Needs the optional ``anny`` package (skips otherwise); the first run builds Anny's model once.
Every test that needs the Anny body is marked slow: loading the built model and generating the
tiny world take 5-15 s even when the tests themselves are quick.
"""

from __future__ import annotations

import ast
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jregfix
from jregfix.errors import JregfixError

TINY = dict(train_subjects=("S1",), test_subjects=("S9",), frames=2, crop_size=64)


@pytest.fixture(scope="session")
def body():
    pytest.importorskip("anny")
    from jregfix.body.anny import AnnyBody

    return AnnyBody()


@pytest.fixture(scope="session")
def world(body, tmp_path_factory):
    from jregfix.synthetic.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    doc = generate_world(out, WorldConfig(**TINY, seed=3), body)
    return out, doc


def _pose(body, path):
    from jregfix.body.rotations import pose_to_rotmat
    from jregfix.io.params import load_params

    p = load_params(path)
    with torch.no_grad():
        out = body(
            pose_to_rotmat(torch.from_numpy(p.pose).float(), 24), torch.from_numpy(p.betas).float()
        )
    return p, out


@pytest.mark.slow
def test_gt_joints_are_the_true_bodies_anatomical_joints(body, world):
    from jregfix.io.h36m import load_h36m

    out_dir, _ = world
    for split in ("train", "test"):
        gt = load_h36m(out_dir / f"h36m_{split}.npz")
        p, out = _pose(body, out_dir / f"truth_{split}.npz")
        assert np.array_equal(p.imgname, gt.imgname)
        joints = body.h36m_joints(out).double().numpy()
        joints -= joints[:, :1]
        np.testing.assert_allclose(gt.joints17(), joints, atol=2e-5)
        np.testing.assert_array_equal(gt.S[:, 14, :3], 0.0)
        assert p.betas.shape[1] == 6
        # Camera frame: y down, so the head top lies above (smaller y than) the pelvis.
        assert (joints[:, 10, 1] < -0.3).mean() >= 0.75
        assert set(gt.cameras) == {"54138969", "55011271", "58860488", "60457274"}


@pytest.mark.slow
def test_crop_camera_reproduces_the_crop(world):
    """SPIN's crop camera (f = 5000 s/224) + cam_t puts the joints where the crop shows them."""
    from jregfix.io.h36m import H36M17_FROM_J24, load_h36m
    from jregfix.io.params import load_params

    out_dir, doc = world
    size = doc["crop"]["mask_size"]
    gt = load_h36m(out_dir / "h36m_test.npz")
    p = load_params(out_dir / "truth_test.npz")
    full = gt.part[:, list(H36M17_FROM_J24), :2]
    side = 200 * gt.scale[:, None, None]
    assert np.all(np.abs(full - gt.center[:, None]) <= side / 2)  # joints inside the box
    crop = size * (full - gt.center[:, None]) / side + size / 2
    cam = gt.joints17() + p.cam_t[:, None]
    focal = 5000 * size / 224
    spin = focal * cam[..., :2] / cam[..., 2:] + size / 2
    err = np.linalg.norm(spin - crop, axis=-1)
    assert err.mean() < 0.02 * size and err.max() < 0.06 * size
    # The body fills the crop as SPIN's boxes do (height ~ side / 1.2).
    extent = np.ptp(crop[..., 1], axis=1)
    assert np.all((extent > 0.3 * size) & (extent < size))


@pytest.mark.slow
def test_masks_are_the_true_silhouettes_corrupted(body, world):
    from jregfix.geometry.camera import PinholeCamera
    from jregfix.io.masks import load_silhouettes
    from jregfix.render.silhouette import hard_silhouette

    out_dir, doc = world
    size = doc["crop"]["mask_size"]
    sil = load_silhouettes(out_dir / "silhouettes_train.npz")
    assert sil.masks.shape[1:] == (size, size) and sil.found.all()

    def iou(path):
        p, out = _pose(body, path)
        cam = PinholeCamera.spin_crop(len(p), 5000 * size / 224, size)
        r = hard_silhouette(
            out.vertices, body.faces, cam, size, cam_t=torch.from_numpy(p.cam_t).float()
        ).numpy()
        return ((r & sil.masks).sum((1, 2)) / (r | sil.masks).sum((1, 2))).mean()

    truth, init = iou(out_dir / "truth_train.npz"), iou(out_dir / "spin_train.npz")
    assert truth > 0.6 and truth > init + 0.05
    with np.load(out_dir / "silhouettes_train.npz") as z:
        clean_iou = z["clean_iou"]
    assert 0.5 < clean_iou.mean() < 1.0  # corrupted, but still the person


@pytest.mark.slow
def test_method_outputs_in_their_real_formats(world):
    import joblib

    from jregfix.io.h36m import load_h36m
    from jregfix.io.tracks import load_tracks

    out_dir, _ = world
    n = len(load_h36m(out_dir / "h36m_test.npz"))
    for name, reader in (("vibe_output.pkl", joblib.load), ("meva_output.pkl", pickle.load)):
        path = out_dir / name
        ours = load_tracks(path)
        if reader is pickle.load:
            with open(path, "rb") as fh:
                theirs = reader(fh)
        else:
            theirs = reader(path)
        ids = np.sort(np.concatenate([t["frame_ids"] for t in ours.values()]))
        np.testing.assert_array_equal(ids, np.arange(n))
        for tid, track in ours.items():
            m = len(track["frame_ids"])
            assert track["pose"].shape == (m, 72) and track["betas"].shape == (m, 6)
            assert track["pred_cam"].shape == (m, 3) and track["bboxes"].shape == (m, 4)
            np.testing.assert_array_equal(track["pose"], theirs[tid]["pose"])
    with np.load(out_dir / "spin_test.npz") as z:
        assert z["pose"].shape == (n, 72) and z["pred_rotmat"].shape == (n, 24, 3, 3)
        assert z["betas"].shape == (n, 6)


@pytest.mark.slow
def test_standard_regressor_carries_the_planted_bias(body, world):
    """On the true training meshes the oracle regresses the GT joints, the standard does not."""
    from jregfix.io.h36m import load_h36m

    out_dir, _ = world
    gt = load_h36m(out_dir / "h36m_train.npz").joints17()
    _, out = _pose(body, out_dir / "truth_train.npz")
    verts = out.vertices.double().numpy()
    errors = {}
    for name in ("standard", "oracle"):
        j = np.load(out_dir / f"J_{name}.npy")
        assert j.shape == (17, body.num_vertices) and (j >= 0).all()
        pred = np.einsum("kv,nvc->nkc", j, verts)
        errors[name] = 1000 * np.linalg.norm((pred - pred[:, :1]) - gt, axis=-1).mean()
    assert errors["oracle"] < 10 and errors["standard"] > 1.5 * errors["oracle"]


@pytest.mark.slow
def test_same_seed_same_bytes(body, world, tmp_path):
    from jregfix.io.atomic import sha256_file
    from jregfix.synthetic.world import WorldConfig, generate_world, world_is_current

    out_dir, doc = world
    again = generate_world(tmp_path / "a", WorldConfig(**TINY, seed=3), body)
    assert again == doc
    assert sha256_file(tmp_path / "a" / "world.json") == sha256_file(out_dir / "world.json")
    assert world_is_current(tmp_path / "a", WorldConfig(**TINY, seed=3))
    assert not world_is_current(tmp_path / "a", WorldConfig(**TINY, seed=4))
    other = generate_world(tmp_path / "b", WorldConfig(**TINY, seed=4), body)
    assert other["files"]["h36m_test.npz"] != doc["files"]["h36m_test.npz"]
    assert other["files"]["spin_test.npz"] != doc["files"]["spin_test.npz"]


@pytest.mark.slow
def test_pose_conventions_move_limbs_the_right_way(body):
    """Hip flexion raises the thigh forward (+z), knee flexion takes the foot back, shoulder
    flexion brings the wrist forward, elbow flexion folds the forearm towards the shoulder."""
    from jregfix.synthetic.motion import Skeleton, body_rotations

    skel = Skeleton.from_body(body)
    names = list(body.all_bone_names)

    def heads(angles):
        rot = torch.from_numpy(body_rotations(skel, angles)).float()[None]
        with torch.no_grad():
            out = body(rot, torch.zeros(1, 6))
        return {
            n: out.bone_heads[0, names.index(n)].numpy()
            for n in (
                "lowerleg01.L",
                "foot.L",
                "upperarm01.R",
                "lowerarm01.R",
                "wrist.R",
                "upperleg01.L",
            )
        }

    rest = heads({})
    hip = heads({"hip_flex.L": 90})
    assert hip["lowerleg01.L"][2] - hip["upperleg01.L"][2] > 0.3  # thigh points forward
    knee = heads({"knee.L": 90})
    assert knee["foot.L"][2] < rest["foot.L"][2] - 0.3  # shin points backward
    sh = heads({"sh_flex.R": 90})
    assert sh["wrist.R"][2] > rest["wrist.R"][2] + 0.3
    assert abs(sh["lowerarm01.R"][1] - sh["upperarm01.R"][1]) < 0.1  # arm horizontal
    straight, bent = heads({"elbow.R": 0}), heads({"elbow.R": 140})

    def wrist_to_shoulder(h):
        return np.linalg.norm(h["wrist.R"] - h["upperarm01.R"])

    assert wrist_to_shoulder(bent) < wrist_to_shoulder(straight) - 0.2


def test_joint_limits_and_smoothed_noise():
    from jregfix.synthetic.motion import FAMILIES, LIMITS, clip_angles, family_angles
    from jregfix.synthetic.noise import smoothed_noise

    for fam in FAMILIES:
        for t in np.linspace(0, 3, 31):
            for amp in (0.8, 1.2, 3.0):
                angles = clip_angles(family_angles(fam, t, amp, 0.3))
                for key, value in angles.items():
                    lim = LIMITS.get(key.split(".")[0])
                    if lim:
                        assert lim[0] <= value <= lim[1]
    with pytest.raises(JregfixError):
        family_angles("Dancing", 0.0, 1.0, 0.0)
    rng = np.random.default_rng(0)
    tracks = [np.arange(200)]

    def lag1(x):
        return np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]

    smooth = smoothed_noise(rng, tracks, (5,), 0.1, 5.0)
    white = smoothed_noise(rng, tracks, (5,), 0.1, 0.0)
    assert lag1(smooth) > 0.9 and abs(lag1(white)) < 0.2
    assert abs(smooth.std() - 0.1) < 0.03 and abs(white.std() - 0.1) < 0.01
    # Short tracks are as noisy as long ones (stationary noise, no blow-up).
    short = smoothed_noise(rng, [np.arange(3 * i, 3 * i + 3) for i in range(400)], (), 0.1, 5.0)
    assert abs(short.std() - 0.1) < 0.01


def test_run_config_errors(tmp_path):
    from jregfix.stages.run import load_config

    base = {
        "gt": {"train": "a.npz", "test": "b.npz"},
        "init": {"given": "i.npz"},
        "silhouettes": {"given": "m.npz"},
        "evaluate": {"methods": [{"method": "spin", "path": "p.npz"}]},
    }
    cfg = load_config(base)
    assert cfg["refine"]["iters"] == 100 and cfg["evaluate"]["methods"][0]["label"] == "spin"
    for bad, message in (
        ({**base, "refine": {"iterations": 3}}, "unknown key 'refine.iterations'"),
        ({**base, "gt": {"train": "a.npz"}}, "gt.test"),
        ({**base, "init": {"given": "i.npz", "spin": {"images": "x"}}}, "exactly one"),
        ({**base, "evaluate": {"methods": []}}, "methods is empty"),
    ):
        with pytest.raises(JregfixError, match=message):
            load_config(bad)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base))
    cfg = load_config(path)
    assert cfg["gt"]["train"] == str(tmp_path / "a.npz")
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[gt]\ntrain = "a.npz"\ntest = "b.npz"\n[init]\ngiven = "i.npz"\n'
        '[silhouettes]\ngiven = "m.npz"\n[refine]\niters = 7\n'
        '[[evaluate.methods]]\nmethod = "vibe"\npath = "v.pkl"\n'
    )
    if sys.version_info >= (3, 11):
        cfg = load_config(toml)
        assert cfg["refine"]["iters"] == 7 and cfg["init"]["given"] == str(tmp_path / "i.npz")
    path.write_text("{not json")
    with pytest.raises(JregfixError, match="not a valid"):
        load_config(path)


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names of every module an AST imports (relative imports resolved in package)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _importers_of_synthetic(root) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        module = ".".join(rel.with_suffix("").parts)
        if module.startswith("jregfix.synthetic") or module == "jregfix.cli.demo":
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        if package.endswith(".__init__"):
            package = package[: -len(".__init__")]
        imported = _imported_modules(ast.parse(path.read_text()), package)
        if any(m == "jregfix.synthetic" or m.startswith("jregfix.synthetic.") for m in imported):
            found.append(module)
    return found


def test_only_the_demo_imports_the_synthetic_world(tmp_path):
    """The real pipeline never depends on synthetic data: under jregfix/ only synthetic/ itself
    and cli/demo.py import jregfix.synthetic (any import form, also inside functions)."""
    root = Path(jregfix.__file__).parent
    assert _importers_of_synthetic(root) == []
    # The check sees every import form: plant each one in a copy of a small package.
    fake = tmp_path / "jregfix"
    (fake / "stages").mkdir(parents=True)
    (fake / "synthetic").mkdir()
    (fake / "cli").mkdir()
    (fake / "synthetic" / "world.py").write_text("from jregfix.stages import a\n")
    (fake / "cli" / "demo.py").write_text("from jregfix.synthetic import world\n")
    (fake / "stages" / "a.py").write_text("import numpy\n")
    assert _importers_of_synthetic(fake) == []
    for i, line in enumerate(
        (
            "import jregfix.synthetic.world",
            "from jregfix.synthetic.world import generate_world",
            "from jregfix import synthetic",
            "from .. import synthetic",
            "from ..synthetic.demo import demo_run_config",
            "def f():\n    from jregfix.synthetic import body\n",
        )
    ):
        (fake / "stages" / f"b{i}.py").write_text(line + "\n")
        assert _importers_of_synthetic(fake) == [f"jregfix.stages.b{i}"], line
        (fake / "stages" / f"b{i}.py").unlink()


def test_mask_iou_numpy_and_torch_against_pixel_sets():
    """geometry.metrics.mask_iou (the world's clean_iou) vs IoU counted on sets of pixels."""
    from jregfix.geometry.metrics import mask_iou

    rng = np.random.default_rng(5)
    a = rng.random((3, 4, 9, 7)) < 0.4
    b = rng.random((3, 4, 9, 7)) < 0.6
    a[0, 0] = b[0, 0] = False  # both empty: IoU 1 by convention
    b[0, 1] = False  # one empty: IoU 0

    def pixel_set(m):
        return {tuple(p) for p in np.argwhere(m)}

    expected = np.ones((3, 4))
    for i, j in np.ndindex(3, 4):
        sa, sb = pixel_set(a[i, j]), pixel_set(b[i, j])
        if sa | sb:
            expected[i, j] = len(sa & sb) / len(sa | sb)
    assert expected[0, 1] == 0.0 and expected[0, 0] == 1.0
    got = mask_iou(a, b)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, expected)
    got_t = mask_iou(torch.from_numpy(a), torch.from_numpy(b))
    assert got_t.dtype == torch.float64
    np.testing.assert_array_equal(got_t.numpy(), expected)
    assert float(mask_iou(a[1, 2], b[1, 2])) == expected[1, 2]  # a single (H, W) pair
