"""jregfix: refine SMPL fits and re-fit the Human3.6M joint regressor (Hedlin et al., CRV 2022).

The library API, for a notebook (arrays in, arrays out; metres in, millimetres out)::

    import jregfix

    gt = jregfix.load_h36m("h36m_valid_protocol1.npz")        # SPIN's npz: joints, cameras
    body = jregfix.load_body_model("SMPL_NEUTRAL.pkl")
    regressors = {"standard": jregfix.load_regressor("J_regressor_h36m.npy")}  # (17, 6890)
    scores = jregfix.score({"pose": pose, "betas": betas}, gt, regressors, body, joints=17)
    scores.summary()          # {"standard": {"mpjpe_mm": ..., "pa_mpjpe_mm": ...}}

    fit = jregfix.fit_regressor(vertices, joints, body.template.numpy())  # (N,V,3), (N,17,3)
    fit.regressor             # (17, V), non-negative, certified

    refined = jregfix.refine(body, j_spin, pose, betas, cam_t, gt.joints17(), masks)
    refined.rotmat, refined.cam_t, refined.summary()  # (N,24,3,3), (N,3), IoU/joint error

Names are imported on first use, so ``import jregfix`` loads neither numpy nor torch:

* :func:`score`, :class:`Scorer`, :class:`Scores` (:mod:`jregfix.methods.scoring`): MPJPE /
  PA-MPJPE of vertices (N, V, 3) or SMPL parameters against GT joints (N, 17, 3).
* :func:`fit_regressor`, :class:`FitConfig`, :class:`FitResult`
  (:mod:`jregfix.methods.fitting`): a non-negative (K, V) regressor from meshes and joints.
* :func:`refine`, :class:`RefineConfig`, :class:`RefineResult`
  (:mod:`jregfix.methods.refinement`): SMPL fits refined against joints, keypoints and
  silhouettes, in memory.
* :func:`load_body_model` / :class:`SMPLBody`, :func:`load_regressor`,
  :func:`effective_regressor`, :func:`load_h36m`: the real files, read safely.

The command line (``jregfix --help``) drives the same code over files (:mod:`jregfix.stages`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jregfix import methods
from jregfix._lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> the module that defines it: the methods, and the safe loaders
_API = {
    **methods._API,
    "SMPLBody": "jregfix.body.smpl",
    "load_regressor": "jregfix.io.regressors",
    "effective_regressor": "jregfix.io.regressors",
    "load_h36m": "jregfix.io.h36m",
    "H36MData": "jregfix.io.h36m",
    "JregfixError": "jregfix.errors",
}
# spelled out for static checkers; tests/test_api.py checks it equals _API's names + these two
__all__ = [
    "__version__",
    "load_body_model",
    "score",
    "Scorer",
    "Scores",
    "fit_regressor",
    "FitConfig",
    "FitResult",
    "refine",
    "RefineConfig",
    "RefineResult",
    "SMPLBody",
    "load_regressor",
    "effective_regressor",
    "load_h36m",
    "H36MData",
    "JregfixError",
]


# what static checkers and IDEs see; at run time __getattr__ imports lazily
if TYPE_CHECKING:
    from jregfix.body.smpl import SMPLBody
    from jregfix.errors import JregfixError
    from jregfix.io.h36m import H36MData, load_h36m
    from jregfix.io.regressors import effective_regressor, load_regressor
    from jregfix.methods.fitting import FitConfig, FitResult, fit_regressor
    from jregfix.methods.refinement import RefineConfig, RefineResult, refine
    from jregfix.methods.scoring import Scorer, Scores, score


def load_body_model(path: str | Path, num_betas: int = 10, device: str = "cpu") -> SMPLBody:
    """The SMPL model of a released file (``SMPL_NEUTRAL.pkl``, ``basicModel_*.pkl``, v1.1.0
    pickles, smplx ``.npz``), read without chumpy and without unpickling anything else.

    Returns a :class:`SMPLBody` on ``device``: rotations (N, 24, 3, 3) and betas
    (N, ``num_betas``) -> vertices (N, 6890, 3) in metres; ``template`` (6890, 3),
    ``faces`` (13776, 3).
    """
    from jregfix.body.smpl import SMPLBody

    return SMPLBody(path, num_betas=num_betas).to(device)


__getattr__, __dir__ = lazy_attributes(__name__, _API)
