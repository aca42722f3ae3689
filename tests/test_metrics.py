import numpy as np
from scipy.spatial.transform import Rotation

from jregfix.geometry.metrics import mpjpe, pa_mpjpe, similarity_align


def reference_pa(pred: np.ndarray, gt: np.ndarray) -> float:
    """SPIN's compute_similarity_transform written from its formula (points as 3xK columns)."""
    s1, s2 = pred.T, gt.T
    mu1 = s1.mean(1, keepdims=True)
    mu2 = s2.mean(1, keepdims=True)
    x1, x2 = s1 - mu1, s2 - mu2
    k = x1 @ x2.T
    u, _, vh = np.linalg.svd(k)
    v = vh.T
    z = np.eye(3)
    z[2, 2] = np.sign(np.linalg.det(u @ v.T))
    r = v @ z @ u.T
    scale = np.trace(r @ k) / (x1**2).sum()
    t = mu2 - scale * r @ mu1
    aligned = scale * r @ s1 + t
    return float(np.sqrt(((aligned - s2) ** 2).sum(0)).mean())


def test_against_per_sample_reference(rng):
    pred = rng.normal(size=(200, 14, 3))
    gt = pred + rng.normal(size=pred.shape) * 0.1
    ours = pa_mpjpe(pred, gt)
    ref = np.array([reference_pa(p, g) for p, g in zip(pred, gt, strict=True)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    per_frame = np.array(
        [
            np.mean([np.linalg.norm(a - b) for a, b in zip(p, g, strict=True)])
            for p, g in zip(pred, gt, strict=True)
        ]
    )
    np.testing.assert_allclose(mpjpe(pred, gt), per_frame, rtol=1e-12)


def test_similarity_transform_gives_zero(rng):
    gt = rng.normal(size=(10, 17, 3))
    rot = Rotation.random(10, random_state=2).as_matrix()
    pred = 0.37 * np.einsum("nij,nkj->nki", rot, gt) + rng.normal(size=(10, 1, 3))
    np.testing.assert_allclose(pa_mpjpe(pred, gt), 0.0, atol=1e-12)
    assert (mpjpe(pred, gt) > 0.1).all()


def test_reflection_is_not_undone(rng):
    gt = rng.normal(size=(5, 14, 3))
    mirrored = gt * np.array([-1.0, 1.0, 1.0])  # a reflection cannot be reached by a rotation
    aligned = similarity_align(mirrored, gt)
    assert (pa_mpjpe(mirrored, gt) > 1e-3).all()
    ref = np.array([reference_pa(p, g) for p, g in zip(mirrored, gt, strict=True)])
    np.testing.assert_allclose(pa_mpjpe(mirrored, gt), ref, rtol=1e-10)
    # the fitted transform is proper: aligned points keep the mirrored handedness
    a = aligned - aligned.mean(1, keepdims=True)
    m = mirrored - mirrored.mean(1, keepdims=True)
    assert np.all(np.sign(np.linalg.det(a[:, :3])) == np.sign(np.linalg.det(m[:, :3])))


def test_direction_matters(rng):
    pred = rng.normal(size=(50, 14, 3))
    gt = 1.3 * pred + rng.normal(size=pred.shape) * 0.2
    assert not np.allclose(pa_mpjpe(pred, gt), pa_mpjpe(gt, pred))
