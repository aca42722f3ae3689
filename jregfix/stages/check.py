"""``check``: a preflight over the user's real files before a multi-day job.

For every file it reports the format as read from the bytes (pickle protocol, Python 2 or 3
writer, legacy or zip torch container, joblib, npz), the key shapes, the sha256, whether the
hash is that of a known official release, and what is wrong, one line per problem. Each file
is read by the same loader the stages use, so "usable" here means usable there. It then pushes
one frame through every stage the given files allow: image -> SPIN crop -> HMR, Mask R-CNN on
one image, LBS -> joints, and one prediction frame scored against the ground truth.

Nothing is written except the optional JSON report, and no pickle is ever executed: the format
scan walks the opcodes with :func:`pickletools.genops`, which only parses.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch

from jregfix.device import resolve_device
from jregfix.errors import JregfixError
from jregfix.io.atomic import read_npz, sha256_file, write_json
from jregfix.io.legacy_torch import MAGIC_NUMBER
from jregfix.stages.result import Progress, StageResult, Step

# SPIN's data/smpl_mean_params.npz (fetch_data.sh)
SPIN_MEAN_PARAMS_SHA256 = "6fd6dd687800da946d0a0492383f973b92ec20f166a0b829775882868c35fcdd"
SMPL_VERTICES = 6890
H36M_JOINTS = 17


@dataclass
class Finding:
    """What ``check`` learned about one input file (or directory)."""

    role: str
    path: str
    format: str = "unknown"
    shapes: dict[str, list[int]] = field(default_factory=dict)
    sha256: str | None = None
    official: str | None = None  # the known release this file is, by hash
    notes: list[str] = field(default_factory=list)  # usable, but worth knowing
    problems: list[str] = field(default_factory=list)  # one line each, naming the file

    @property
    def usable(self) -> bool:
        return not self.problems

    def problem(self, message: str) -> None:
        self.problems.append(_naming(self.path, message))


@dataclass
class StageCheck:
    """One frame pushed through one stage; ``status`` is ok, failed or skipped."""

    stage: str
    inputs: list[str]
    status: str
    detail: str


@dataclass
class CheckResult:
    files: list[Finding]
    stages: list[StageCheck]

    @property
    def ok(self) -> bool:
        return all(f.usable for f in self.files) and all(s.status == "ok" for s in self.stages)

    def problems(self) -> list[str]:
        """Every problem as one line: file problems first, then failed stages."""
        return [p for f in self.files for p in f.problems] + [
            f"{s.stage}: {s.detail}" for s in self.stages if s.status == "failed"
        ]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "files": [asdict(f) for f in self.files],
            "stages": [asdict(s) for s in self.stages],
            "problems": self.problems(),
        }


@dataclass
class CheckInputs:
    """The files to check; ``predictions`` are (method or None to infer it, path),
    ``regressors`` (name, path)."""

    smpl: Sequence[Path] = ()
    gt: Sequence[Path] = ()
    images: Path | None = None
    checkpoint: Sequence[Path] = ()
    mean_params: Path | None = None
    weights: Sequence[Path] = ()
    predictions: Sequence[tuple[str | None, Path]] = ()
    regressors: Sequence[tuple[str, Path]] = ()
    frame_ids: str = "video"  # how VIBE/MEVA frame_ids map to GT rows (see evaluate)
    subject: str | None = None

    def paths(self) -> list[Path]:
        singles = [p for p in (self.images, self.mean_params) if p is not None]
        return [
            Path(p) for p in (*self.smpl, *self.gt, *singles, *self.checkpoint, *self.weights)
        ] + [Path(p) for _, p in (*self.predictions, *self.regressors)]


def _naming(path: str, message: str) -> str:
    """One line that names the file (loader messages usually start with the path already)."""
    message = " ".join(str(message).split())
    return message if path in message else f"{path}: {message}"


# --- reading the format from the bytes --------------------------------------------------------

_PY2_STRINGS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING"})
_PY3_STRINGS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
# torch's legacy (non-zip) files open with a pickled magic number, then the protocol version,
# the writer's sys_info and the object itself, each its own pickle.
_LEGACY_TORCH_PICKLES = 4
_MAX_OPCODES = 1_000_000
_COMPRESSED = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x78\x01", "zlib"),
    (b"\x78\x5e", "zlib"),
    (b"\x78\x9c", "zlib"),
    (b"\x78\xda", "zlib"),
)
_CUDA_TAG = re.compile(r"^cuda(:\d+)?$")


@dataclass
class PickleTraits:
    """What the opcodes of a pickle stream say about its writer (parsed, never executed)."""

    protocol: int | None = None
    py2_strings: bool = False
    py3_strings: bool = False
    text_ints: int = 0  # INT opcodes beyond 32 bits: how Python 2 wrote its 64-bit ints
    globals: list[str] = field(default_factory=list)
    cuda: bool = False  # torch storages tagged cuda:N
    joblib: bool = False  # raw array bytes follow joblib's wrappers: the scan stops there
    legacy_torch: bool = False
    readable: bool = True

    @property
    def python(self) -> str | None:
        if self.py2_strings or self.text_ints:
            return "Python 2"
        return "Python 3" if self.py3_strings else None

    def describe(self) -> str:
        parts = [self.python] if self.python else []
        parts.append(f"protocol {self.protocol}" if self.protocol is not None else "protocol 0/1")
        return ", ".join(parts)


def _scan(fh, traits: PickleTraits, budget: list[int]) -> list[int]:
    """Walk one pickle's opcodes into ``traits``; returns the LONG1 values (torch's magic)."""
    strings: list[str] = []
    longs: list[int] = []
    for opcode, arg, _ in pickletools.genops(fh):
        budget[0] -= 1
        if budget[0] < 0:
            break
        name = opcode.name
        if name == "PROTO" and traits.protocol is None:
            traits.protocol = arg
        elif name == "LONG1":
            longs.append(cast(int, arg))  # LONG1 always decodes to an int
        elif name in _PY2_STRINGS:
            traits.py2_strings = True
        elif name in _PY3_STRINGS:
            traits.py3_strings = True
        elif name == "INT" and type(arg) is int and abs(arg) >= 2**31:
            traits.text_ints += 1
        if isinstance(arg, str) and name != "GLOBAL":
            strings = (strings + [arg])[-2:]
            traits.cuda |= bool(_CUDA_TAG.match(arg))
        if name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            ref = arg if name != "STACK_GLOBAL" else " ".join(strings)
            if ref and ref not in traits.globals:
                traits.globals.append(ref)
            if ref == "joblib.numpy_pickle NumpyArrayWrapper":
                traits.joblib = True
                break
    return longs


def pickle_traits(path: Path) -> PickleTraits:
    """Scan the pickle(s) at the start of ``path`` (a legacy torch file holds four)."""
    traits = PickleTraits()
    budget = [_MAX_OPCODES]
    try:
        with open(path, "rb") as fh:
            if _scan(fh, traits, budget)[:1] == [MAGIC_NUMBER]:
                traits.legacy_torch = True
                for _ in range(_LEGACY_TORCH_PICKLES - 1):
                    _scan(fh, traits, budget)
    except (ValueError, EOFError, OverflowError):  # not a pickle, truncated, or garbage
        traits.readable = False
    return traits


def sniff(path: Path) -> tuple[str, PickleTraits | None]:
    """The container kind of a file and, for pickles, the traits of its writer.

    Kinds: npz, npy, torch-zip, torch-legacy, joblib, pickle, compressed:<codec>, unknown.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                data_pkl = next((n for n in names if n.endswith("/data.pkl")), None)
                if data_pkl is None:
                    kind = "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
                    return kind, None
                traits = PickleTraits()
                with z.open(data_pkl) as fh:
                    _scan(fh, traits, [_MAX_OPCODES])
                return "torch-zip", traits
        except (zipfile.BadZipFile, ValueError, EOFError, OSError):
            return "unknown", None
    if head.startswith(b"\x93NUMPY"):
        return "npy", None
    for magic, codec in _COMPRESSED:
        if head.startswith(magic):
            return f"compressed:{codec}", None
    traits = pickle_traits(path)
    if not traits.readable and not traits.globals:
        return "unknown", None
    if traits.legacy_torch:
        return "torch-legacy", traits
    return ("joblib" if traits.joblib else "pickle"), traits


# --- one inspector per role -------------------------------------------------------------------


def _shape(a) -> list[int]:
    return [int(s) for s in (a.shape if hasattr(a, "shape") else np.shape(a))]


def _start(role: str, path: Path, hash_it: bool = True) -> Finding:
    finding = Finding(role, str(path))
    if not path.exists():
        finding.problem("no such file or directory")
    elif hash_it and path.is_file():
        finding.sha256 = sha256_file(path)
    elif hash_it:
        finding.problem(f"is a directory; expected a {role} file")
    return finding


def inspect_smpl(path: Path) -> tuple[Finding, dict | None]:
    from jregfix.io.smpl_file import load_smpl_file

    finding = _start("smpl", path)
    if not finding.usable:
        return finding, None
    kind, traits = sniff(path)
    if kind == "npz":
        finding.format = "smplx npz"
    elif traits is not None:
        chumpy = any(g.startswith("chumpy") for g in traits.globals)
        finding.format = (
            f"SMPL {'chumpy pickle' if chumpy else 'pickle without chumpy'} ({traits.describe()})"
        )
    try:
        model = load_smpl_file(path)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    for key in (
        "v_template",
        "shapedirs",
        "posedirs",
        "J_regressor",
        "weights",
        "f",
        "kintree_table",
    ):
        finding.shapes[key] = _shape(model[key])
    vertices = finding.shapes["v_template"][0]
    if vertices != SMPL_VERTICES:
        finding.notes.append(f"{vertices} vertices, not SMPL's {SMPL_VERTICES}")
    betas = finding.shapes["shapedirs"][-1]
    if betas < 10:
        finding.problem(f"only {betas} shape coefficients; the stages use 10")
    return finding, model


def inspect_gt(path: Path) -> tuple[Finding, object | None]:
    from jregfix.io.h36m import CAMERAS, P2_CAMERA, load_h36m

    finding = _start("gt", path)
    if not finding.usable:
        return finding, None
    try:
        data = load_h36m(path, require_3d=False)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    for key in ("imgname", "center", "scale", "S", "part", "openpose"):
        value = getattr(data, key)
        if value is not None:
            finding.shapes[key] = _shape(value)
    subjects = sorted(set(data.subjects), key=lambda s: int(s[1:]))
    cameras = sorted(set(data.cameras))
    finding.format = (
        f"SPIN H36M npz, {len(data)} rows: {','.join(subjects)}, {len(cameras)} camera(s)"
    )
    if data.S is None:
        finding.notes.append(
            "no 3D ground truth ('S'): fine for spin/silhouettes, not for evaluate or fit-regressor"
        )
    if subjects == ["S9", "S11"]:
        layout = (
            "h36m_valid_protocol2"
            if cameras == [P2_CAMERA]
            else "h36m_valid_protocol1"
            if cameras == sorted(CAMERAS)
            else None
        )
        if layout:
            finding.notes.append(f"subjects and cameras as in SPIN's {layout}.npz")
    frames = np.array([k.frame for k in data.keys])
    off_grid = int(((frames - 1) % 5 != 0).sum())
    if off_grid:
        finding.notes.append(
            f"{off_grid} row(s) with image numbers not 1 mod 5, unlike SPIN's "
            "every-5th-frame extraction"
        )
    return finding, data


def inspect_images(path: Path, gts: Sequence) -> tuple[Finding, Path | None]:
    """The image root; with GT files, how many of their images exist (a missing one would stop
    ``spin``/``silhouettes`` hours into the run)."""
    from jregfix.io.images import check_images

    finding = _start("images", path, hash_it=False)
    if not finding.usable:
        return finding, None
    if not path.is_dir():
        finding.problem("not a directory; --images is the root the GT's imgname is relative to")
        return finding, None
    finding.format = "image directory"
    for data in gts:
        present = check_images(path, data.imgname, skip_missing=True)
        missing = [n for n, ok in zip(data.imgname, present, strict=True) if not ok]
        finding.format += f"; {int(present.sum())}/{len(present)} images of {data.path} found"
        if missing:
            finding.problem(
                f"{len(missing)} of {len(present)} images of {data.path} are "
                f"missing, e.g. {', '.join(missing[:3])}; fix --images, or run the "
                "stages with --skip-missing"
            )
    if not gts and next(path.rglob("*.jpg"), None) is None:
        finding.problem("holds no .jpg image")
    return finding, path


def inspect_checkpoint(path: Path) -> tuple[Finding, dict | None]:
    from jregfix.io.checkpoint import extract_state_dict, load_torch_file

    finding = _start("checkpoint", path)
    if not finding.usable:
        return finding, None
    kind, traits = sniff(path)
    finding.format = _torch_format(kind, traits, "checkpoint")
    try:
        obj = load_torch_file(path)
        state = extract_state_dict(obj, path)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    if isinstance(obj, dict) and "model" in obj:
        finding.format += "; keys " + ", ".join(map(str, obj))
    finding.format += f"; state_dict of {len(state)} tensors"
    for key in ("conv1.weight", "fc1.weight", "decpose.weight", "init_pose"):
        if key in state:
            finding.shapes[key] = _shape(state[key])
    return finding, state


def _torch_format(kind: str, traits: PickleTraits | None, what: str) -> str:
    if kind == "torch-legacy" and traits is not None:
        extra = (
            [traits.describe()]
            + (["CUDA storages"] if traits.cuda else [])
            + ([f"{traits.text_ints} 64-bit INT opcodes"] if traits.text_ints else [])
        )
        return f"legacy torch {what} ({', '.join(extra)})"
    if kind == "torch-zip" and traits is not None:
        extra = [traits.describe()] + (["CUDA storages"] if traits.cuda else [])
        return f"torch zip {what} ({', '.join(extra)})"
    return f"{kind} (not a torch file)"


def inspect_mean_params(path: Path) -> tuple[Finding, Path | None]:
    from jregfix.models.hmr import load_mean_params

    finding = _start("mean-params", path)
    if not finding.usable:
        return finding, None
    finding.format = "npz" if sniff(path)[0] == "npz" else "unknown"
    try:
        load_mean_params(path)
        arrays = read_npz(path)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    finding.format = "SPIN mean parameters npz (pose as 24 x 6D, shape, cam)"
    finding.shapes = {k: _shape(v) for k, v in arrays.items()}
    if finding.sha256 == SPIN_MEAN_PARAMS_SHA256:
        finding.official = "SPIN data/smpl_mean_params.npz"
    return finding, path


def _hash_in_name(name: str) -> str | None:
    """torchvision's file names end in the first hex digits of their sha256: ``-bf2d0c1e.pth``."""
    m = re.search(r"-([a-f0-9]{8,})\.", name)
    return m.group(1) if m else None


def inspect_weights(path: Path) -> tuple[Finding, Path | None]:
    """Mask R-CNN weights: the format, which release the keys are laid out as, and
    torchvision's own integrity rule (the sha256 starts with the hex digits in the name)."""
    from jregfix.models.maskrcnn import TORCHVISION_FILE, TORCHVISION_V2_FILE, read_maskrcnn_weights

    finding = _start("weights", path)
    if not finding.usable:
        return finding, None
    kind, traits = sniff(path)
    finding.format = _torch_format(kind, traits, "state_dict")
    digest = cast(str, finding.sha256)  # _start hashed it: the file is usable
    claimed = _hash_in_name(path.name)
    if claimed and not digest.startswith(claimed):
        finding.problem(
            f"sha256 {digest[:12]}… does not start with {claimed} as its "
            "file name says: a corrupt or partial download; fetch it again"
        )
    for release in (TORCHVISION_FILE, TORCHVISION_V2_FILE):
        prefix = _hash_in_name(release)
        if prefix and digest.startswith(prefix):
            finding.official = f"torchvision {release} (sha256 prefix of its name)"
    try:
        variant, state = read_maskrcnn_weights(path)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    finding.format += f"; {len(state)} tensors laid out as the {variant} release"
    for key in ("backbone.body.conv1.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        if key in state:
            finding.shapes[key] = _shape(state[key])
    return finding, path


def inspect_regressor(
    name: str, path: Path, num_vertices: int | None
) -> tuple[Finding, np.ndarray | None]:
    from jregfix.io.regressors import HEDLIN_SHA256, load_regressor, regressor_warnings

    finding = _start("regressor", path)
    finding.role = f"regressor {name}"
    if not finding.usable:
        return finding, None
    kind, traits = sniff(path)
    if kind == "npy":
        header = np.load(path, mmap_mode="r", allow_pickle=False)
        order = "Fortran order" if header.flags.f_contiguous and header.ndim > 1 else "C order"
        finding.format = f"npy {header.dtype} {order}"
    else:
        finding.format = _torch_format(kind, traits, "tensor") if kind.startswith("torch") else kind
    try:
        j = load_regressor(path)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    finding.shapes["J"] = _shape(j)
    if finding.sha256 == HEDLIN_SHA256:
        finding.official = (
            "Hedlin et al. released regressor (raw; applied as ReLU + rows renormalised)"
        )
    vertices = num_vertices or SMPL_VERTICES
    if j.shape != (H36M_JOINTS, vertices):
        finding.problem(
            f"shape {tuple(j.shape)}, expected ({H36M_JOINTS}, {vertices}) for "
            f"the {'given SMPL model' if num_vertices else 'SMPL mesh'}"
        )
    flags = regressor_warnings(j)
    if flags:
        applied = "as ReLU + renormalised rows (its hash)" if finding.official else "as stored"
        finding.notes.append(
            f"{'; '.join(flags)}: applied {applied}; `jregfix regressors "
            "convert IN OUT --effective` writes the effective form"
        )
    return finding, j


def _infer_method(path: Path) -> str:
    """'vibe'/'meva' from the output file names (the demos' own), else a SPIN/params npz."""
    from jregfix.io.tracks import TRACK_FILES

    for method, name in TRACK_FILES.items():
        if path.name == name or (path.is_dir() and next(path.rglob(name), None) is not None):
            return method
    return "spin" if path.suffix == ".npz" else "vibe"


def inspect_predictions(
    method: str | None, path: Path, gt, frame_ids: str = "video", subject: str | None = None
) -> tuple[Finding, object | None]:
    """A method's output; with a GT file, how its frames map onto the GT rows (as evaluate
    maps them)."""
    from jregfix.io.tracks import read_tracks, track_files
    from jregfix.stages.evaluate import load_prediction

    finding = _start("predictions", path, hash_it=not path.is_dir())
    if not finding.usable:
        return finding, None
    method = method or _infer_method(path)
    finding.role = f"predictions {method}"
    try:
        if method in ("vibe", "meva"):
            files = track_files(path, method)
            tracks, _ = read_tracks(files[0])
            n_tracks = (
                len(tracks) if len(files) == 1 else sum(len(read_tracks(f)[0]) for f in files)
            )
            kind = sniff(files[0])[0]
            if kind.startswith("compressed:"):
                kind = f"{kind.split(':')[1]}-compressed joblib"
            where = f"{len(files)} per-video files, " if path.is_dir() else ""
            finding.format = f"{kind} {method.upper()} output, {where}{n_tracks} track(s)"
            if tracks:
                first = next(iter(tracks.values()))
                finding.shapes = {
                    k: _shape(v) for k, v in first.items() if isinstance(v, np.ndarray)
                }
        else:
            finding.format = "npz body parameters"
        if gt is None:
            finding.notes.append("give --gt to check how its frames map onto GT rows")
            return finding, None
        prediction = load_prediction(method, path, gt, frame_ids=frame_ids, subject=subject)
    except JregfixError as exc:
        finding.problem(str(exc))
        return finding, None
    if method not in ("vibe", "meva"):
        finding.shapes = {
            k: _shape(v)
            for k, v in vars(prediction.params).items()
            if isinstance(v, np.ndarray) and k != "imgname"
        }
    covered = len(np.unique(prediction.rows))
    finding.format += f"; {covered}/{len(gt)} GT rows covered"
    if covered < len(gt):
        finding.notes.append(
            f"{len(gt) - covered} of {len(gt)} GT rows have no prediction: "
            "evaluate needs --allow-missing"
        )
    finding.notes.extend(prediction.notes)
    return finding, prediction


# --- one frame through each stage -------------------------------------------------------------


@dataclass
class _Frame:
    """The first GT frame: full image, SPIN crop, and where it came from."""

    image: np.ndarray
    crop: np.ndarray
    center: np.ndarray
    scale: float
    source: str


def _run(stage: str, inputs: list[str], fn: Callable[[], str]) -> StageCheck:
    try:
        return StageCheck(stage, inputs, "ok", fn())
    except (JregfixError, RuntimeError, ValueError) as exc:
        return StageCheck(stage, inputs, "failed", " ".join(str(exc).split()) or type(exc).__name__)


def _skipped(stage: str, inputs: list[str], why: str) -> StageCheck:
    return StageCheck(stage, inputs, "skipped", why)


def _first_frame(gt, images: Path) -> _Frame:
    from jregfix.geometry.crop import crop_image
    from jregfix.io.images import read_image, resolve_image

    path = resolve_image(images, gt.imgname[0])
    image = read_image(path)
    crop = crop_image(image, gt.center[0], gt.scale[0])
    return _Frame(image, crop, gt.center[0], float(gt.scale[0]), str(path))


def _synthetic_frame() -> _Frame:
    """A grey ramp: exercises the networks when no real frame was given."""
    ramp = np.linspace(40, 215, 224, dtype=np.float32)
    crop = np.repeat(np.add.outer(ramp, ramp[::-1])[:, :, None] / 2, 3, axis=2).astype(np.uint8)
    return _Frame(crop, crop, np.array([112.0, 112.0]), 224 / 200, "synthetic grey ramp")


def _hmr_once(
    state: dict, mean_params: Path | None, source: str, frame: _Frame, device: torch.device
) -> str:
    from jregfix.models.hmr import HMR, load_hmr_state, load_mean_params, normalize_images

    model = HMR()
    means = load_mean_params(mean_params) if mean_params is not None else None
    report = load_hmr_state(model, state, means, source)
    model.eval().to(device)
    with torch.inference_mode():
        out = model(normalize_images(torch.tensor(frame.crop[None], device=device)))
    values = torch.cat([out.rotmat.flatten(), out.betas.flatten(), out.camera.flatten()])
    if not torch.isfinite(values).all():
        raise JregfixError(f"{source}: HMR gave NaN/inf on {frame.source}")
    eye = out.rotmat[0] @ out.rotmat[0].transpose(-1, -2)
    ortho = float((eye - torch.eye(3, device=device)).abs().max())
    filled = f"; filled {sorted(report.filled)}" if report.filled else ""
    return (
        f"{frame.source}: camera s {float(out.camera[0, 0]):.3f}, |betas| "
        f"{float(out.betas.norm()):.2f}, rotations orthonormal to {ortho:.0e}{filled}"
    )


def _maskrcnn_once(weights: Path, frame: _Frame, device: torch.device) -> str:
    from jregfix.geometry.crop import square_box
    from jregfix.geometry.metrics import box_iou
    from jregfix.models.maskrcnn import build_maskrcnn, detect_people

    model = build_maskrcnn(weights).to(device)
    det = detect_people(model, [frame.image], device)[0]
    if not len(det["boxes"]):
        return f"{frame.source}: no person detected (score >= 0.5)"
    iou = box_iou(det["boxes"], square_box(frame.center, frame.scale)[0])
    return (
        f"{frame.source}: {len(det['boxes'])} person(s), top score "
        f"{float(det['scores'][0]):.2f}, best IoU with the crop box {float(iou.max()):.2f}"
    )


def _lbs_once(smpl: Path, model: dict, regressor: tuple[str, Path] | None) -> str:
    """Rest pose, zero shape -> vertices -> joints (the regressor applied as the stages apply
    it); the joints must be finite and lie on the body."""
    from jregfix.body.smpl import SMPLBody
    from jregfix.stages.evaluate import resolve_regressors

    body = SMPLBody(model, dtype=torch.float64)
    rot = torch.eye(3, dtype=torch.float64).expand(1, body.num_joints, 3, 3)
    verts = body.vertices(rot, torch.zeros(1, body.num_betas, dtype=torch.float64))[0].numpy()
    if regressor is None:
        name, j = "the model's own", body.joint_regressor.double().numpy()
    else:
        name = regressor[0]
        j = resolve_regressors(dict([regressor]), body.num_vertices)[name]["matrix"]
    joints = j @ verts
    if not np.isfinite(joints).all():
        raise JregfixError(f"{smpl}: LBS or regressor {name!r} gave NaN/inf joints")
    lo, hi = verts.min(0) - 0.05, verts.max(0) + 0.05
    outside = int((~((joints >= lo) & (joints <= hi)).all(1)).sum())
    if outside:
        raise JregfixError(
            f"regressor {name!r}: {outside} of {len(joints)} joints lie outside "
            f"the rest-pose mesh of {smpl}: wrong vertex order or scale?"
        )
    height = float(verts[:, 1].max() - verts[:, 1].min())
    return f"{len(verts)} vertices (height {height:.2f} m) -> {len(joints)} joints, all on the body"


def _score_once(prediction, gt, models: dict, regressors: dict[str, Path]) -> str:
    """The prediction's first frame against its GT row, 17 joints, SPIN's evaluation rules
    (pelvis-centred, PA aligns the prediction onto the GT), each regressor applied as
    ``evaluate`` applies it. Vertices come from the file, else from the first SMPL model."""
    from jregfix.body.base import batch_vertices
    from jregfix.body.smpl import SMPLBody
    from jregfix.methods.scoring import score
    from jregfix.stages.evaluate import resolve_regressors

    if gt.S is None:
        raise JregfixError(f"{gt.path}: no 3D ground truth ('S') to score against")
    params, row = prediction.params, int(prediction.rows[0])
    if params.vertices is not None:
        verts = np.asarray(params.vertices[:1], dtype=np.float64)
    elif models:
        body = SMPLBody(next(iter(models.values())))
        verts = (
            batch_vertices(
                body, torch.from_numpy(params.pose[:1]), torch.from_numpy(params.betas[:1])
            )
            .double()
            .numpy()
        )
    else:
        raise JregfixError(f"{prediction.path}: no vertices in the file; give --smpl")
    matrices = {n: r["matrix"] for n, r in resolve_regressors(regressors, verts.shape[1]).items()}
    scores = score(
        verts, gt.joints17()[row : row + 1], matrices, joints=17, name=str(prediction.path)
    ).summary()
    parts = []
    for name, cell in scores.items():
        e, pa = cell["mpjpe_mm"], cell["pa_mpjpe_mm"]
        if not (np.isfinite(e) and np.isfinite(pa)):
            raise JregfixError(f"{prediction.path}: NaN/inf joints under regressor {name!r}")
        parts.append(f"{name} {e:.1f} / {pa:.1f} mm")
    return f"{gt.imgname[row]}: MPJPE / PA-MPJPE (17 joints) " + ", ".join(parts)


# --- the whole check --------------------------------------------------------------------------


def _check_json_out(json_out: Path, inputs: list[Path]) -> None:
    target = json_out.resolve()
    if any(target == p.resolve() for p in inputs):
        raise JregfixError(f"--json {json_out} is one of the inputs; choose another path")
    if target.is_dir():
        raise JregfixError(f"--json {json_out} is a directory; give a file path")


def run_check(
    inputs: CheckInputs,
    device: str = "auto",
    json_out: str | Path | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Inspect every given file, then run one frame through each stage they allow.

    Writes nothing but ``json_out`` (which may not be one of the inputs). ``progress`` gets a
    :class:`Step` per file read or stage run (``unit`` "steps", total unknown, ``message`` what).
    Returns a :class:`StageResult` whose ``summary`` is :meth:`CheckResult.to_dict` (``ok``,
    ``files``, ``stages``, ``problems``: the ``--json`` document) and whose ``outputs`` hold
    ``json_out`` as ``"json"`` when given.
    """
    paths = inputs.paths()
    if not paths:
        raise JregfixError(
            "nothing to check: give at least one of --smpl, --gt, --images, "
            "--checkpoint, --mean-params, --weights, --predictions, --regressor"
        )
    if json_out is not None:
        _check_json_out(Path(json_out), paths)
    dev = resolve_device(device)
    steps = [0]

    def say(message: str) -> None:
        steps[0] += 1
        if progress is not None:
            progress(Step("check", steps[0], unit="steps", message=message))

    files: list[Finding] = []

    def inspect(fn, path, *args):
        say(f"reading {path}")
        finding, value = fn(*args)
        files.append(finding)
        return value if finding.usable else None

    models = {p: inspect(inspect_smpl, p, Path(p)) for p in inputs.smpl}
    gts = [g for g in (inspect(inspect_gt, p, Path(p)) for p in inputs.gt) if g is not None]
    images = (
        inspect(inspect_images, inputs.images, Path(inputs.images), gts)
        if inputs.images is not None
        else None
    )
    states = {p: inspect(inspect_checkpoint, p, Path(p)) for p in inputs.checkpoint}
    means = (
        inspect(inspect_mean_params, inputs.mean_params, Path(inputs.mean_params))
        if inputs.mean_params is not None
        else None
    )
    weights = {p: inspect(inspect_weights, p, Path(p)) for p in inputs.weights}
    bodies = {p: m for p, m in models.items() if m is not None}
    num_vertices = _shape(next(iter(bodies.values()))["v_template"])[0] if bodies else None
    regs = {
        name: inspect(inspect_regressor, p, name, Path(p), num_vertices)
        for name, p in inputs.regressors
    }
    gt = gts[0] if gts else None
    preds = [
        (p, inspect(inspect_predictions, p, m, Path(p), gt, inputs.frame_ids, inputs.subject))
        for m, p in inputs.predictions
    ]

    stages: list[StageCheck] = []
    frames: list[_Frame] = []
    if gt is not None and images is not None:
        say("reading one frame")

        def read_frame() -> str:
            frames.append(_first_frame(gt, images))
            f = frames[0]
            return (
                f"{f.source} ({f.image.shape[1]}x{f.image.shape[0]}) -> "
                f"{f.crop.shape[1]}x{f.crop.shape[0]} crop, side {200 * f.scale:.0f} px"
            )

        stages.append(_run("image → crop", [gt.path, str(images)], read_frame))
    frame = frames[0] if frames else _synthetic_frame()
    unusable = "an input is unusable"
    for path, state in states.items():
        used = [str(path)] + ([str(inputs.mean_params)] if inputs.mean_params else [])
        if state is None or (inputs.mean_params is not None and means is None):
            stages.append(_skipped("crop → HMR", used, unusable))
            continue
        say(f"HMR on one frame ({path})")
        stages.append(
            _run("crop → HMR", used, partial(_hmr_once, state, means, str(path), frame, dev))
        )
    for path, ok in weights.items():
        if ok is None:
            stages.append(_skipped("Mask R-CNN", [str(path)], unusable))
            continue
        say(f"Mask R-CNN on one image ({path})")
        stages.append(_run("Mask R-CNN", [str(path)], partial(_maskrcnn_once, path, frame, dev)))
    reg_paths = dict(inputs.regressors)
    for path, model in models.items():
        # no regressor: the model's own
        reg_items: list[tuple[str | None, np.ndarray | None]] = list(regs.items()) or [(None, None)]
        for name, j in reg_items:
            used = [str(path)] + ([str(reg_paths[name])] if name else [])
            if model is None or (name is not None and j is None):
                stages.append(_skipped("LBS → joints", used, unusable))
                continue
            say(f"LBS with {path}")
            stages.append(
                _run(
                    "LBS → joints",
                    used,
                    partial(_lbs_once, path, model, (name, reg_paths[name]) if name else None),
                )
            )
    usable_regs = {n: reg_paths[n] for n, j in regs.items() if j is not None}
    for path, prediction in preds:
        if gt is None:
            continue
        used = [str(path), gt.path] + [str(p) for p in usable_regs.values()]
        if prediction is None or not usable_regs:
            stages.append(
                _skipped(
                    "score one frame",
                    used,
                    unusable if prediction is None else "give a --regressor",
                )
            )
            continue
        say(f"scoring one frame of {path}")
        stages.append(
            _run("score one frame", used, partial(_score_once, prediction, gt, bodies, usable_regs))
        )
    doc = CheckResult(files, stages).to_dict()
    if json_out is not None:
        write_json(json_out, doc)
    return StageResult(
        "check", {"json": Path(json_out)} if json_out is not None else {}, summary=doc
    )
