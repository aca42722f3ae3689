"""The Anny body model (PyPI ``anny``, Apache-2.0, MakeHuman-based) behind :class:`BodyModel`.

Model frame (what :meth:`AnnyBody.vertices` returns): metres, **y up, +z the direction the body
faces, +x the subject's left**, the root bone head (pelvis centre) at the origin — SMPL's
canonical frame, so a global rotation ``diag(1, -1, -1)`` puts the body in camera coordinates
(y down, z forward) facing the camera, as for SMPL. Anny itself works in Blender axes (z up, the
body facing -y); :data:`ANNY_TO_MODEL` converts.

Pose: ``rotmat (N, J, 3, 3)``, one rotation per bone of :attr:`AnnyBody.bone_names` (default
:data:`DEFAULT_BONES`, 24 bones, ``root`` first = global orientation; the other Anny bones stay at
their reference orientation). Each rotation acts about the bone's head and is expressed in
model-frame axes as posed by the parents (Anny's ``local-ref`` parameterisation, SMPL-like), so
the same rotations give the same limb directions (within a few degrees) for every phenotype.
Identity rotations give Anny's reference pose, an A-pose within ~2 cm of the MakeHuman rest mesh.

Shape: ``betas (N, 6)`` are offsets from :data:`DEFAULT_PHENOTYPE` of Anny's phenotype
parameters in :data:`PHENOTYPES` order (gender 0 male .. 1 female; age -1/3 newborn, 0 baby,
1/3 child, 2/3 young, 1 old, ~0.77-0.83 for 18-64 years; muscle, weight, height, proportions
0..1). Anny clamps each phenotype to its range (:data:`PHENOTYPE_RANGE`), so the gradient is zero
beyond it. Zero betas = an androgynous adult about 1.69 m tall.

The model is built once from the data in the wheel (1-3 minutes on 2 CPU cores, ~2 GB RAM,
~0.8 GB of intermediate files that are deleted afterwards); the built model (~50 MB) is cached
under ``cache_dir``, else ``$ANNY_CACHE_DIR``, else ``<user cache dir>/jregfix/anny``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from jregfix.errors import JregfixError

log = logging.getLogger(__name__)

ANNY_TO_MODEL = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))
"""x_model = ANNY_TO_MODEL @ x_anny: Anny (z up, facing -y) -> model frame (y up, facing +z)."""

PHENOTYPES = ("gender", "age", "muscle", "weight", "height", "proportions")
DEFAULT_PHENOTYPE = (0.5, 0.8, 0.5, 0.5, 0.37, 0.5)
"""Phenotype at zero betas: gender neutral, ~41 years, average muscle/weight/proportions, and the
height value between Anny's calibrated adult male (0.39) and female (0.35) means."""
PHENOTYPE_RANGE = {
    "gender": (0.0, 1.0),
    "age": (-1 / 3, 1.0),
    "muscle": (0.0, 1.0),
    "weight": (0.0, 1.0),
    "height": (0.0, 1.0),
    "proportions": (0.0, 1.0),
}

DEFAULT_BONES = (
    "root",
    "spine05",
    "spine04",
    "spine03",
    "spine02",
    "spine01",
    "neck01",
    "neck02",
    "neck03",
    "head",
    "clavicle.L",
    "upperarm01.L",
    "lowerarm01.L",
    "wrist.L",
    "clavicle.R",
    "upperarm01.R",
    "lowerarm01.R",
    "wrist.R",
    "upperleg01.L",
    "lowerleg01.L",
    "foot.L",
    "upperleg01.R",
    "lowerleg01.R",
    "foot.R",
)
"""Posable bones: global orientation, lower back to head, clavicle/shoulder/elbow/wrist and
hip/knee/ankle. Twist, finger, toe, eye and pelvis bones stay at their reference orientation."""

H36M_JOINTS = (
    ("Pelvis", "root"),
    ("L Hip", "upperleg01.L"),
    ("L Knee", "lowerleg01.L"),
    ("L Ankle", "foot.L"),
    ("R Hip", "upperleg01.R"),
    ("R Knee", "lowerleg01.R"),
    ("R Ankle", "foot.R"),
    ("Spine", "spine02"),
    ("Thorax", "neck01"),
    ("Neck/Nose", "head"),
    ("Head top", None),
    ("L Shoulder", "upperarm01.L"),
    ("L Elbow", "lowerarm01.L"),
    ("L Wrist", "wrist.L"),
    ("R Shoulder", "upperarm01.R"),
    ("R Elbow", "lowerarm01.R"),
    ("R Wrist", "wrist.R"),
)
"""H36M-17 in SPIN's regressor row order (SPIN's J_regressor_h36m.npy) -> the Anny bone whose head
is the joint centre. Head top has no bone head: it is the crown vertex :data:`HEAD_TOP_VERTEX`."""
HEAD_TOP_VERTEX = 881
"""The highest vertex of the skull (midline) in the reference pose, for all phenotypes tried."""

_ANNY_CONFIG = dict(
    rig="anny",
    topology="anny",
    local_changes="none",
    facial_actions="none",
    phenotypes="default",
    extrapolate_phenotypes=False,
    pose_parameterization="local-ref",
    skinning_method="lbs",
    phenotype_blendshapes="compact",
)
_INTERMEDIATE_PREFIXES = ("load_data_", "build_model_data_")


class AnnyOutput(NamedTuple):
    vertices: torch.Tensor  # (N, V, 3) model frame, metres
    bone_heads: torch.Tensor  # (N, 104, 3) posed head of every Anny bone, model frame


def default_cache_dir() -> Path:
    """``$ANNY_CACHE_DIR`` if set, else ``<user cache>/jregfix/anny``."""
    env = os.environ.get("ANNY_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("jregfix")) / "anny"


def _import_anny():
    try:
        import anny
    except ImportError as exc:
        raise JregfixError(
            "the Anny body model is not installed: pip install 'jregfix[anny]'"
        ) from exc
    return anny


class _BuildWatcher(logging.Handler):
    """Turns Anny's 'no cached model data' log record into one user-facing message."""

    def __init__(self, say: Callable[[str], None], cache_dir: Path):
        super().__init__(logging.INFO)
        self.say, self.cache_dir, self.building = say, cache_dir, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.building and record.getMessage().startswith("No cached model data"):
            self.building = True
            self.say(
                f"Building the Anny body model once (1-3 minutes, ~2 GB RAM); "
                f"caching it in {self.cache_dir}"
            )


def build_anny(
    cache_dir: str | os.PathLike | None = None,
    say: Callable[[str], None] | None = None,
    keep_intermediate: bool = False,
):
    """The raw ``anny.Anny`` model (float64, CPU), built once and cached under ``cache_dir``.

    ``say`` receives the one-time build message (default: this module's logger at WARNING).
    Intermediate build files this call creates (~0.74 GB) are deleted unless
    ``keep_intermediate``; the model itself only needs the final ~50 MB file.
    """
    anny = _import_anny()
    from anny.paths import get_anny_cache_path, set_anny_cache_path

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JregfixError(f"cannot create the Anny cache directory {cache_dir}: {exc}") from exc
    before = set(cache_dir.rglob("*.safetensors"))
    watcher = _BuildWatcher(say or log.warning, cache_dir)
    anny_log = logging.getLogger("anny.models.model_data")
    old_level, old_path = anny_log.level, get_anny_cache_path()
    anny_log.addHandler(watcher)
    anny_log.setLevel(logging.INFO)
    set_anny_cache_path(cache_dir)
    start = time.perf_counter()
    try:
        model = anny.Anny(**_ANNY_CONFIG)
    finally:
        anny_log.removeHandler(watcher)
        anny_log.setLevel(old_level)
        set_anny_cache_path(old_path)
    if watcher.building:
        (say or log.warning)(f"Anny body model built in {time.perf_counter() - start:.0f} s")
        if not keep_intermediate:
            for path in set(cache_dir.rglob("*.safetensors")) - before:
                if path.name.startswith(_INTERMEDIATE_PREFIXES):
                    path.unlink()
    return model


class AnnyBody(torch.nn.Module):
    """Anny as a :class:`~jregfix.body.base.BodyModel` (see the module docstring for frames).

    ``bones``: the posable bones, ``root`` first (default :data:`DEFAULT_BONES`; ``"all"`` for
    Anny's 104). Buffers live on ``device`` in ``dtype``.
    """

    name = "anny"
    # buffers registered in __init__
    bone_index: torch.Tensor
    h36m_bone_index: torch.Tensor
    frame: torch.Tensor
    default_phenotype: torch.Tensor
    faces: torch.Tensor
    template: torch.Tensor

    def __init__(
        self,
        bones: tuple[str, ...] | str = DEFAULT_BONES,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        say: Callable[[str], None] | None = None,
    ):
        super().__init__()
        model = build_anny(cache_dir, say=say)
        if tuple(model.phenotype_labels) != PHENOTYPES:
            raise JregfixError(
                f"unsupported anny version: phenotypes {model.phenotype_labels}, "
                f"expected {list(PHENOTYPES)}"
            )
        self.anny = model.to(device=device, dtype=dtype)
        self.all_bone_names: tuple[str, ...] = tuple(model.bone_labels)
        self.bone_names = self.all_bone_names if bones == "all" else tuple(bones)
        unknown = [b for b in self.bone_names if b not in self.all_bone_names]
        if unknown or not self.bone_names or self.bone_names[0] != "root":
            raise JregfixError(f"Anny bones must start with 'root' and exist; unknown: {unknown}")
        index = [self.all_bone_names.index(b) for b in self.bone_names]
        self.register_buffer("bone_index", torch.tensor(index), persistent=False)
        self.bone_parents = _subset_parents(model.bone_parents, index)
        h36m = [self.all_bone_names.index(b) if b else 0 for _, b in H36M_JOINTS]
        self.register_buffer("h36m_bone_index", torch.tensor(h36m), persistent=False)
        frame = torch.tensor(ANNY_TO_MODEL, dtype=dtype, device=device)
        self.register_buffer("frame", frame, persistent=False)
        self.register_buffer(
            "default_phenotype",
            torch.tensor(DEFAULT_PHENOTYPE, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "faces", model.faces.to(device=device, dtype=torch.int64), persistent=False
        )
        self.num_vertices = int(model.template_vertices.shape[0])
        self.num_joints = len(self.bone_names)
        self.num_betas = len(PHENOTYPES)
        eye = torch.eye(3, dtype=dtype, device=device).expand(1, self.num_joints, 3, 3)
        with torch.no_grad():
            template = self.vertices(
                eye, torch.zeros(1, self.num_betas, dtype=dtype, device=device)
            )[0]
        self.register_buffer("template", template, persistent=False)

    def forward(self, rotmat: torch.Tensor, betas: torch.Tensor) -> AnnyOutput:
        """rotmat (N, J, 3, 3), betas (N, 6) -> vertices (N, V, 3), bone heads (N, 104, 3)."""
        n = rotmat.shape[0]
        if rotmat.shape[1:] != (self.num_joints, 3, 3) or betas.shape != (n, self.num_betas):
            raise JregfixError(
                f"Anny expects rotmat (N, {self.num_joints}, 3, 3) and betas (N, "
                f"{self.num_betas}); got {tuple(rotmat.shape)} and {tuple(betas.shape)}"
            )
        # Model-frame rotations -> Anny's axes (conjugation by the frame change).
        rot = self.frame.T @ rotmat @ self.frame
        delta = torch.eye(4, dtype=rot.dtype, device=rot.device).repeat(
            n, len(self.all_bone_names), 1, 1
        )
        delta[:, self.bone_index, :3, :3] = rot
        out = self.anny(pose_parameters=delta, phenotype_kwargs=self.default_phenotype + betas)
        return AnnyOutput(
            out["vertices"] @ self.frame.T, out["bone_poses"][..., :3, 3] @ self.frame.T
        )

    def vertices(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """rotmat (N, J, 3, 3), betas (N, 6) -> vertices (N, V, 3). Differentiable."""
        return self.forward(rotmat, betas).vertices

    def h36m_joints(self, out: AnnyOutput) -> torch.Tensor:
        """Anatomical H36M-17 joint centres (N, 17, 3) in SPIN's row order (:data:`H36M_JOINTS`)."""
        joints = out.bone_heads[:, self.h36m_bone_index].clone()
        joints[:, 10] = out.vertices[:, HEAD_TOP_VERTEX]
        return joints


def phenotype_to_betas(**phenotype: float) -> torch.Tensor:
    """Named Anny phenotype values (missing ones default) -> betas (6,) float64."""
    unknown = set(phenotype) - set(PHENOTYPES)
    if unknown:
        raise JregfixError(f"unknown Anny phenotype {sorted(unknown)}; known: {list(PHENOTYPES)}")
    values = [phenotype.get(k, d) for k, d in zip(PHENOTYPES, DEFAULT_PHENOTYPE, strict=True)]
    return torch.tensor(values, dtype=torch.float64) - torch.tensor(
        DEFAULT_PHENOTYPE, dtype=torch.float64
    )


def _subset_parents(parents: list[int], index: list[int]) -> tuple[int, ...]:
    """Parent of each selected bone within the selection (nearest selected ancestor; root -1)."""
    position = {bone: i for i, bone in enumerate(index)}
    out = []
    for bone in index:
        parent = parents[bone]
        while parent >= 0 and parent not in position:
            parent = parents[parent]
        out.append(position[parent] if parent >= 0 else -1)
    return tuple(out)
