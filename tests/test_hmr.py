"""SPIN's HMR: key set, strict legacy-checkpoint loading, forward pass (models/hmr.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jregfix.body.rotations import rot6d_to_rotmat
from jregfix.errors import JregfixError
from jregfix.models.hmr import HMR, build_hmr, load_mean_params, normalize_images
from tests.legacy_torch import save_legacy_cuda

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures"


def expected_keys() -> dict[str, tuple]:
    """Key -> shape of SPIN's checkpoint (ResNet-50 + HMR head), in parameter order."""
    keys: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{s}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 64)
    for layer, blocks, p, in0, inn in (
        (1, 3, 64, 64, 256),
        (2, 4, 128, 256, 512),
        (3, 6, 256, 512, 1024),
        (4, 3, 512, 1024, 2048),
    ):
        for b in range(blocks):
            pre = f"layer{layer}.{b}"
            keys[f"{pre}.conv1.weight"] = (p, in0 if b == 0 else inn, 1, 1)
            bn(f"{pre}.bn1", p)
            keys[f"{pre}.conv2.weight"] = (p, p, 3, 3)
            bn(f"{pre}.bn2", p)
            keys[f"{pre}.conv3.weight"] = (4 * p, p, 1, 1)
            bn(f"{pre}.bn3", 4 * p)
            if b == 0:
                keys[f"{pre}.downsample.0.weight"] = (4 * p, in0, 1, 1)
                bn(f"{pre}.downsample.1", 4 * p)
    for name, o, i in (
        ("fc1", 1024, 2205),
        ("fc2", 1024, 1024),
        ("decpose", 144, 1024),
        ("decshape", 10, 1024),
        ("deccam", 3, 1024),
    ):
        keys[f"{name}.weight"] = (o, i)
        keys[f"{name}.bias"] = (o,)
    keys.update({"init_pose": (1, 144), "init_shape": (1, 10), "init_cam": (1, 3)})
    return keys


def random_hmr_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial BN statistics, so a mis-mapped key changes the output."""
    torch.manual_seed(seed)
    model = HMR()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.startswith("init_"):
            v = torch.randn(v.shape, generator=g)
        elif v.is_floating_point() and ("bn" in k or "downsample.1" in k):
            v = v + 0.1 * torch.randn(v.shape, generator=g)
        state[k] = v.clone()
    return state


def write_mean_params(path: Path) -> dict[str, np.ndarray]:
    pose = np.tile(np.array([1, 0, 0, 1, 0, 0], np.float32), 24)
    pose[:6] = [1, 0, 0, -1, 0, 0]
    arrays = {
        "pose": pose,
        "shape": np.linspace(-0.3, 0.4, 10).astype(np.float32),
        "cam": np.array([0.9, 0, 0], np.float32),
    }
    np.savez(path, **arrays)
    return arrays


def test_key_set_matches_official_layout():
    model = HMR()
    sd = model.state_dict()
    exp = expected_keys()
    assert len(sd) == len(exp) == 331
    assert {k: tuple(v.shape) for k, v in sd.items()} == exp
    params = [n for n, _ in model.named_parameters()]
    assert len(params) == 169
    assert params == [
        k
        for k in exp
        if not any(k.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked"))
        and not k.startswith("init_")
    ]
    assert sum(p.numel() for p in model.parameters()) == 26_977_501


def gram_schmidt_interleaved(v: np.ndarray) -> np.ndarray:
    """Independent numpy SPIN 6D decode: a1 = v[0::2], a2 = v[1::2] (SPIN utils/geometry.py)."""
    a1, a2 = v[0::2], v[1::2]
    b1 = a1 / np.linalg.norm(a1)
    b2 = a2 - b1 @ a2 * b1
    b2 /= np.linalg.norm(b2)
    return np.stack([b1, b2, np.cross(b1, b2)], 1)


@pytest.mark.skipif(
    not (FIXTURES / "smpl_mean_params.npz").is_file(),
    reason="../shared/fixtures/smpl_mean_params.npz not present",
)
def test_mean_params_fixture_orientation():
    means = load_mean_params(FIXTURES / "smpl_mean_params.npz")
    pose = means["init_pose"].double().reshape(24, 6)
    rot = rot6d_to_rotmat(pose)
    expected = np.diag([1.0, -1.0, -1.0])
    assert np.allclose(rot[0].numpy(), expected, atol=1e-6)
    assert np.allclose(gram_schmidt_interleaved(pose[0].numpy()), expected, atol=1e-6)
    for j in range(24):
        assert np.allclose(rot[j].numpy(), gram_schmidt_interleaved(pose[j].numpy()), atol=1e-6)
    assert np.allclose(torch.linalg.det(rot).numpy(), 1.0, atol=1e-6)
    assert means["init_cam"].tolist() == [[pytest.approx(0.9), 0.0, 0.0]]


def test_legacy_checkpoint_roundtrip_and_forward(tmp_path):
    state = random_hmr_state(0)
    ckpt = tmp_path / "model_checkpoint.pt"
    save_legacy_cuda({"model": state, "epoch": 1, "batch_idx": 1175}, ckpt)
    model, report = build_hmr(ckpt)
    assert report.ok and report.filled == {}
    got = model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not model.training

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        out = model(x)
        out2 = model(x)

        # Independent reference: torchvision's own ResNet-50 on the same weights (its adaptive
        # pooling equals AvgPool2d(7) at 224), then the IEF loop written with F.linear.
        from torchvision.models import resnet50

        tv = resnet50(weights=None)
        tv_state = {k: v for k, v in state.items() if k in tv.state_dict()}
        tv_state["fc.weight"], tv_state["fc.bias"] = tv.fc.weight, tv.fc.bias
        tv.load_state_dict(tv_state, strict=True)
        tv.fc = torch.nn.Identity()
        xf = tv.eval()(x)
        pose, shape, cam = (state[k].expand(2, -1) for k in ("init_pose", "init_shape", "init_cam"))
        for _ in range(3):
            h = torch.cat([xf, pose, shape, cam], 1)
            h = F.linear(h, state["fc1.weight"], state["fc1.bias"])
            h = F.linear(h, state["fc2.weight"], state["fc2.bias"])
            pose = pose + F.linear(h, state["decpose.weight"], state["decpose.bias"])
            shape = shape + F.linear(h, state["decshape.weight"], state["decshape.bias"])
            cam = cam + F.linear(h, state["deccam.weight"], state["deccam.bias"])
    assert torch.equal(out.pose_6d, out2.pose_6d)  # eval mode: dropout off
    assert torch.allclose(out.pose_6d, pose, atol=1e-4)
    assert torch.allclose(out.betas, shape, atol=1e-4)
    assert torch.allclose(out.camera, cam, atol=1e-4)
    ref_rot = np.stack(
        [
            [gram_schmidt_interleaved(v) for v in p.reshape(24, 6)]
            for p in out.pose_6d.double().numpy()
        ]
    )
    assert np.allclose(out.rotmat.numpy(), ref_rot, atol=1e-5)


def test_mean_buffers_fallback_and_zero_head(tmp_path):
    state = random_hmr_state(2)
    for k in ("decpose", "decshape", "deccam"):
        state[f"{k}.weight"].zero_()
        state[f"{k}.bias"].zero_()
    for k in ("init_pose", "init_shape", "init_cam"):
        del state[k]
    with pytest.raises(JregfixError, match="mean-params"):
        build_hmr(state)
    means = write_mean_params(tmp_path / "smpl_mean_params.npz")
    model, report = build_hmr(state, tmp_path / "smpl_mean_params.npz")
    assert set(report.filled) == {"init_pose", "init_shape", "init_cam"}
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    # A zero head leaves the estimate at its initialisation.
    assert np.array_equal(out.pose_6d[0].numpy(), means["pose"])
    assert np.array_equal(out.betas[0].numpy(), means["shape"])
    assert np.array_equal(out.camera[0].numpy(), means["cam"])
    assert np.allclose(out.rotmat[0, 0].numpy(), np.diag([1.0, -1.0, -1.0]), atol=1e-6)
    assert np.allclose(out.rotmat[0, 1:].numpy(), np.eye(3), atol=1e-6)


def test_strict_loading_reports_mismatches():
    state = random_hmr_state(3)
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(JregfixError, match=r"1 unexpected: fc\.weight"):
        build_hmr(bad)
    bad = dict(state)
    del bad["layer2.1.conv2.weight"]
    with pytest.raises(JregfixError, match=r"1 missing: layer2\.1\.conv2\.weight"):
        build_hmr(bad)
    bad = dict(state)
    bad["fc1.weight"] = torch.zeros(1024, 2048)
    with pytest.raises(JregfixError, match=r"fc1\.weight: \(1024, 2048\)"):
        build_hmr(bad)
    prefixed = {f"module.{k}": v for k, v in state.items()}
    with pytest.raises(JregfixError, match="278 missing.*331 unexpected"):
        build_hmr(prefixed)
    tolerated = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    _, report = build_hmr(tolerated)
    assert len(report.filled) == 53


def test_normalize_images():
    crops = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    got = normalize_images(torch.from_numpy(crops)).numpy()
    ref = (crops.astype(np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    assert got.shape == (2, 3, 224, 224)
    assert np.allclose(got, ref.transpose(0, 3, 1, 2), atol=1e-5)
