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
    from jregfix.body.synthetic import make_smpl_like_model

    return make_smpl_like_model(seed=0)


@pytest.fixture(scope="session")
def smpl_pkl(smpl_like_model, tmp_path_factory) -> Path:
    """The synthetic model written the way the released SMPL pickles are."""
    from jregfix.body.synthetic import write_released_style_pickle

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
