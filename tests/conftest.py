"""Shared fixtures: a synthetic SMPL-format model file and a path to ../shared/fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def shared_fixture(name: str) -> Path:
    """Path of a file in ../shared/fixtures; skips the test when the folder is absent."""
    path = SHARED_FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} not present (only beside the development checkout)")
    return path


@pytest.fixture(scope="session")
def smpl_like_model() -> dict:
    """The synthetic SMPL-format model as a dict of arrays (6890 vertices, 13776 faces)."""
    from jregfix.synthetic.body import make_smpl_like_model

    return make_smpl_like_model(seed=0)


@pytest.fixture(scope="session")
def smpl_pkl(smpl_like_model, tmp_path_factory) -> Path:
    """The synthetic model written the way the released SMPL pickles are."""
    from jregfix.io.smpl_write import write_released_style_pickle

    path = tmp_path_factory.mktemp("smpl") / "SMPL_NEUTRAL.pkl"
    write_released_style_pickle(path, smpl_like_model)
    return path


@pytest.fixture(scope="session")
def smpl_body(smpl_pkl):
    from jregfix.body.smpl import SMPLBody

    return SMPLBody(smpl_pkl)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def camera_facing_poses(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """(n, 24, 3) random axis-angle poses whose global orientation is SPIN's camera frame
    (180 degrees about x, so the body stands upright facing the camera)."""
    aa = rng.normal(size=(n, 24, 3)) * scale
    aa[:, 0] = [np.pi, 0.0, 0.0]
    return aa


def planted_regressor(
    rng: np.random.Generator, support: int, num_vertices: int = 6890
) -> np.ndarray:
    """(17, V) non-negative regressor, rows on the simplex over ``support`` random vertices."""
    j = np.zeros((17, num_vertices))
    for row in range(17):
        j[row, rng.choice(num_vertices, support, replace=False)] = rng.dirichlet(np.ones(support))
    return j
