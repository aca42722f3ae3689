"""The maths of the pipeline, arrays in and arrays out (no files, manifests or ranks).

* :mod:`jregfix.methods.scoring`: MPJPE / PA-MPJPE of vertices or SMPL parameters under one or
  more joint regressors (:func:`score`, :class:`Scorer`, :class:`Scores`).
* :mod:`jregfix.methods.fitting`: a non-negative joint regressor from meshes and joints by
  certified NNLS (:func:`fit_regressor`, :class:`FitConfig`, :class:`FitResult`).
* :mod:`jregfix.methods.refinement`: SMPL fits refined against joints, keypoints and
  silhouettes (:func:`refine`, :class:`RefineConfig`, :class:`RefineResult`).

:mod:`jregfix.stages` wraps them with loading, sharding and manifests. The names below are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jregfix._lazy import lazy_attributes

# public name -> the module that defines it (jregfix re-exports these too)
_API = {
    "score": "jregfix.methods.scoring",
    "Scorer": "jregfix.methods.scoring",
    "Scores": "jregfix.methods.scoring",
    "fit_regressor": "jregfix.methods.fitting",
    "FitConfig": "jregfix.methods.fitting",
    "FitResult": "jregfix.methods.fitting",
    "refine": "jregfix.methods.refinement",
    "RefineConfig": "jregfix.methods.refinement",
    "RefineResult": "jregfix.methods.refinement",
}

# spelled out for static checkers; tests/test_api.py checks it equals _API's names
__all__ = [
    "score",
    "Scorer",
    "Scores",
    "fit_regressor",
    "FitConfig",
    "FitResult",
    "refine",
    "RefineConfig",
    "RefineResult",
]

if TYPE_CHECKING:
    from jregfix.methods.fitting import FitConfig, FitResult, fit_regressor
    from jregfix.methods.refinement import RefineConfig, RefineResult, refine
    from jregfix.methods.scoring import Scorer, Scores, score

__getattr__, __dir__ = lazy_attributes(__name__, _API)
