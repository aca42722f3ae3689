"""The `fit-regressor` stage: files, shards and merges around :mod:`jregfix.methods.fitting`.

A fit reads the body parameters (pose and betas, posed by a body model, or vertices) and the
Human3.6M ground truth, checks that their rows are the same frames, keeps the chosen subjects
(training subjects only, unless told otherwise: the leakage guard) and fits with
:func:`jregfix.methods.fitting.fit_regressor`. It writes the (K, V) regressor with its
provenance (``OUT.json``: inputs, config, the fit's diagnostics) and optionally a report.

A shard (``--shard i/n``) saves the exact partial sums of its contiguous block of frame chunks
(.npz); ``--merge`` adds the shards of one run, solves and certifies, with the same bits as the
unsharded fit. Under a distributed job every rank runs the stage; rank 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from jregfix.body.base import BodyModel
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.exact_sum import ExactSum
from jregfix.io.atomic import read_npz, save_npz, sha256_file, write_json
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import TEST_SUBJECTS, TRAIN_SUBJECTS, load_h36m, subject_mask
from jregfix.io.lock import locks_output
from jregfix.io.manifest import (
    manifest_path,
    read_manifest,
    read_sidecar,
    stage_record,
    versions,
)
from jregfix.io.params import BodyParams, load_params
from jregfix.io.regressors import (
    load_regressor,
    provenance_path,
    regressor_stats,
    save_regressor,
    validate_regressor,
)
from jregfix.methods.fitting import (
    ROOT_RELATIVE,
    Accumulator,
    ArrayMeshes,
    BodyMeshes,
    FitConfig,
    FitResult,
    FrameCounter,
    Frames,
    MeshSource,
    Solution,
    accumulate,
    certified_solve,
    check_joints,
    choose_support,
    fit_regressor,
    peak_rss_mb,
)
from jregfix.stages.result import Progress, StageResult, Step

STAGE = "fit-regressor"


@dataclass
class Inputs:
    """Everything read from disk, aligned and filtered (leakage guard applied)."""

    source: MeshSource
    joints: np.ndarray
    template: np.ndarray
    index: np.ndarray
    subjects: dict
    record: dict
    init_regressor: np.ndarray | None
    candidates: list[np.ndarray] | None = None


def load_inputs(
    params: str | Path,
    gt: str | Path,
    smpl: str | Path | None,
    out: str | Path,
    config: FitConfig,
    subjects: list[str] | None = None,
    allow_test_subjects: bool = False,
    init_regressor: str | Path | None = None,
    body: BodyModel | None = None,
    candidates: list[np.ndarray] | None = None,
) -> Inputs:
    """Read GT and params, check row alignment, select subjects, guard against leakage.

    Meshes: posed by ``body`` (any BodyModel, e.g. Anny) or the SMPL model file ``smpl`` from
    the params' pose and betas, else the params' own ``vertices`` (then the first frame's mesh
    stands in for the template of the support). ``candidates``: per-joint vertex supports that
    replace the pilot fit (e.g. around a body model's anatomical joints).
    """
    refuse_overwriting_inputs(
        {"--params": params, "--gt": gt, "--smpl": smpl, "--init-regressor": init_regressor},
        {"--out": out},
    )
    config.validate()
    chosen = list(subjects) if subjects else list(TRAIN_SUBJECTS)
    leaked = sorted(set(chosen) & set(TEST_SUBJECTS))
    if leaked and not allow_test_subjects:
        raise JregfixError(
            f"subjects {leaked} are Human3.6M test subjects; fitting on them "
            "leaks into evaluation (pass --allow-test-subjects to do it anyway)"
        )
    _guard_meshes_not_from(params, out)
    data = load_h36m(gt)
    body_params = load_params(params, require_pose=False)
    if len(body_params) != len(data):
        raise JregfixError(
            f"{params} has {len(body_params)} rows but {gt} has {len(data)}; "
            "the rows must be the same frames in the same order"
        )
    _check_imgnames(body_params, data.imgname, params, gt)
    mask = subject_mask(data, chosen)
    if not mask.any():
        raise JregfixError(f"{gt}: no frames of subjects {chosen}")
    model = body
    if model is None and smpl is not None:
        from jregfix.body.smpl import SMPLBody

        model = SMPLBody(smpl)
    if body_params.pose is not None and body_params.betas is not None and model is not None:
        source: MeshSource = BodyMeshes(model, body_params.pose, body_params.betas)
        template = _rest_vertices(model)
    elif body_params.vertices is not None:
        source = ArrayMeshes(body_params.vertices)
        # without a body model, the first frame's mesh stands in for the rest mesh
        template = (
            body_params.vertices[0].astype(np.float64) if model is None else _rest_vertices(model)
        )
    else:
        raise JregfixError(f"{params} has poses but no vertices: pass --smpl MODEL to pose them")
    init = None
    if init_regressor is not None:
        init = validate_regressor(
            load_regressor(init_regressor), source.num_vertices, str(init_regressor), num_joints=17
        )
    index = np.flatnonzero(mask)
    names, counts = np.unique(data.subjects[index], return_counts=True)
    record = stage_record(
        STAGE,
        {"params": params, "gt": gt, "smpl": smpl, "init_regressor": init_regressor},
        {**asdict(config), "subjects": chosen, "body": getattr(model, "name", None)},
    )
    return Inputs(
        source,
        data.joints17(),
        template,
        index,
        {str(n): int(c) for n, c in zip(names, counts, strict=True)},
        record,
        init,
        candidates,
    )


def _rest_vertices(model: BodyModel) -> np.ndarray:
    """(V, 3) float64: the body's rest mesh, where the fit chooses each row's support."""
    return model.template.detach().double().cpu().numpy()


def _guard_meshes_not_from(params: str | Path, out: str | Path) -> None:
    """Refuse meshes whose recorded inputs include the regressor being fitted."""
    out = Path(out).resolve()
    out_hash = sha256_file(out) if out.is_file() else None
    for doc_path in (manifest_path(params), provenance_path(params)):
        doc = read_sidecar(params, doc_path)
        inputs = (doc or {}).get("inputs", {})
        for name, entry in inputs.items() if isinstance(inputs, dict) else ():
            if not isinstance(entry, dict):
                continue
            same_path = entry.get("path") and Path(entry["path"]).resolve() == out
            if same_path or (out_hash is not None and entry.get("sha256") == out_hash):
                raise JregfixError(
                    f"{params} was produced with {out} (input '{name}' in "
                    f"{doc_path}); a regressor must not be fitted to meshes it "
                    "helped produce"
                )


def _check_imgnames(body_params: BodyParams, gt_names: np.ndarray, params, gt) -> None:
    if body_params.imgname is None:
        return
    base = np.vectorize(lambda s: str(s).replace("\\", "/").rsplit("/", 1)[-1])
    a, b = base(body_params.imgname), base(gt_names)
    bad = np.flatnonzero(a != b)
    if len(bad):
        i = bad[0]
        raise JregfixError(
            f"row {i}: {params} has image {a[i]!r} but {gt} has {b[i]!r}; the "
            "rows must be the same frames in the same order"
        )


@locks_output("out")
def run_fit(
    inputs: Inputs,
    out: str | Path,
    config: FitConfig,
    report_path: str | Path | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Fit on all selected frames and write the regressor, provenance and report.

    Under a distributed job every rank calls this; rank 0 writes, the others wait for it.
    ``progress`` gets the frames streamed (the pilot fit's, the accumulation's and every
    certification pass's; their number depends on the data, so the total is unknown). The
    result's summary is the report (the provenance document).
    """
    ranks = ranks or Ranks()
    result = fit_regressor(
        inputs.source,
        inputs.joints,
        inputs.template,
        config,
        inputs.index,
        inputs.init_regressor,
        inputs.candidates,
        progress=_frame_steps(progress),
        ranks=ranks,
    )
    report = _report(inputs.record, config, result, result.support.source, inputs.subjects)
    report["processes"] = {"world_size": ranks.world_size, "backend": ranks.backend}
    if ranks.is_main:
        _write_outputs(out, result.regressor, report, report_path)
    ranks.barrier()
    return StageResult(STAGE, _outputs(out, report_path), summary=report)


@locks_output("out")
def run_shard(
    inputs: Inputs,
    out: str | Path,
    config: FitConfig,
    shard: tuple[int, int],
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Accumulate shard i of n (a contiguous block of chunks) and save the partial sums to
    ``out`` (.npz); ``ranks`` share the shard's chunks (rank 0 writes). The summary is the
    shard file's metadata (record, config, shard, frames, ...)."""
    ranks = ranks or Ranks()
    i, n = shard
    if Path(out).suffix != ".npz":
        raise JregfixError(f"{out}: a shard's partial sums are written as .npz")
    config.validate()
    joints = check_joints(inputs.joints, inputs.source.num_frames)
    support = choose_support(
        inputs.source,
        joints,
        inputs.template,
        inputs.index,
        config,
        inputs.init_regressor,
        ranks=ranks,
    )
    union = np.unique(np.concatenate(support.rows))
    total = Frames(inputs.source, joints, inputs.index, config.chunk_size, ranks).local_frames(
        shard
    )  # this rank's frames of the shard: the bar's total
    acc = accumulate(
        inputs.source,
        joints,
        union,
        config.mode == ROOT_RELATIVE,
        inputs.index,
        config.chunk_size,
        _frame_steps(progress, total),
        ranks,
        shard,
    )
    meta = {
        "record": inputs.record,
        "config": asdict(config),
        "shard": [i, n],
        "num_vertices": inputs.source.num_vertices,
        "subjects": inputs.subjects,
        "support_source": support.source,
        "frames": acc.frames,
    }
    if ranks.is_main:
        save_npz(
            out,
            compressed=False,
            vertices=acc.vertices,
            frames=np.int64(acc.frames),
            centred=np.bool_(acc.centred),
            rows_flat=np.concatenate(support.rows),
            rows_offsets=np.cumsum([0] + [len(r) for r in support.rows]),
            meta=np.array(json.dumps(meta, sort_keys=True)),
            **{f"{k}_limbs": acc.sums[k].limbs for k in Accumulator.KEYS},
        )
    ranks.barrier()
    return StageResult(STAGE, {"shard": Path(out)}, summary=meta)


@locks_output("out")
def run_merge(
    parts: list[str | Path],
    out: str | Path,
    report_path: str | Path | None = None,
    num_vertices: int | None = None,
    params: str | Path | None = None,
    gt: str | Path | None = None,
    smpl: str | Path | None = None,
    body: BodyModel | None = None,
    certify: bool | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> StageResult:
    """Add shard files (all of one run, each shard once), solve, certify, write outputs.

    The shards hold sums over the candidate vertices only; certifying over all V vertices
    streams the frames again, so it needs the shards' inputs (``params``, ``gt`` and ``smpl``
    or ``body``), checked by hash. ``certify`` overrides the shards' setting (False: solve on
    the candidates only, as the report then says). The result equals the unsharded fit's bits;
    its summary is the report. ``progress`` gets the frames the certification passes stream.
    """
    if not parts:
        raise JregfixError("--merge needs the shard files")
    ranks = ranks or Ranks()
    t0 = time.perf_counter()
    loaded = [_load_part(p) for p in parts]
    meta0, acc, rows = loaded[0]
    for p, (meta, other, other_rows) in zip(parts[1:], loaded[1:], strict=True):
        same = (
            meta["config"] == meta0["config"]
            and meta["shard"][1] == meta0["shard"][1]
            and _fingerprint(meta) == _fingerprint(meta0)
            and all(np.array_equal(a, b) for a, b in zip(rows, other_rows, strict=True))
        )
        if not same:
            raise JregfixError(
                f"{p} belongs to a different run than {parts[0]} (inputs, config or support differ)"
            )
        acc.merge(other)
    n = meta0["shard"][1]
    seen = sorted(m["shard"][0] for m, _, _ in loaded)
    if seen != list(range(n)):
        raise JregfixError(f"--merge needs shards 0..{n - 1} once each; got {seen}")
    if num_vertices is not None and num_vertices != meta0["num_vertices"]:
        raise JregfixError(
            f"shards were fitted on {meta0['num_vertices']} vertices, but the body "
            f"model has {num_vertices}"
        )
    config = FitConfig(**meta0["config"])
    if certify is not None:
        config = replace(config, certify=certify)
    frames = template = None
    if config.certify:
        frames, template = _merge_frames(meta0, acc.frames, out, config, params, gt, smpl, body)
        frames.ranks, frames.progress = ranks, _frame_steps(progress)
    totals = acc.totals()
    del acc, loaded
    t1 = time.perf_counter()
    result = certified_solve(frames, totals, rows, meta0["num_vertices"], config, template)
    result.diagnostics["time_s"] = {"load": t1 - t0, "solve_and_certify": time.perf_counter() - t1}
    result.diagnostics["peak_rss_mb"] = peak_rss_mb()
    report = _report(meta0["record"], config, result, meta0["support_source"], meta0["subjects"])
    report["merged_from"] = [
        {"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in parts
    ]
    if ranks.is_main:
        _write_outputs(out, result.regressor, report, report_path)
    ranks.barrier()
    return StageResult(STAGE, _outputs(out, report_path), summary=report)


def _merge_frames(
    meta: dict, frames: int, out, config: FitConfig, params, gt, smpl, body
) -> tuple[Frames, np.ndarray]:
    """The shards' frames again and the template, for the certification passes of --merge."""
    if params is None or gt is None or (smpl is None and body is None):
        raise JregfixError(
            "--merge: certifying the optimum over all vertices streams the "
            "frames again; pass the shards' --params, --gt and --smpl (or "
            "--no-certify to solve on the candidate vertices only)"
        )
    record = meta["record"]
    inputs = load_inputs(
        params,
        gt,
        smpl,
        out,
        config,
        record["config"]["subjects"],
        allow_test_subjects=True,
        body=body,
    )
    for name in ("params", "gt", "smpl"):
        theirs, ours = record["inputs"].get(name), inputs.record["inputs"].get(name)
        if (theirs or {}).get("sha256") != (ours or {}).get("sha256"):
            raise JregfixError(
                f"--merge: --{name} is not the file the shards were "
                f"accumulated from ({(theirs or {}).get('path')})"
            )
    if len(inputs.index) != frames:
        raise JregfixError(
            f"--merge: the inputs select {len(inputs.index)} frames but the shards summed {frames}"
        )
    joints = check_joints(inputs.joints, inputs.source.num_frames)
    return (
        Frames(inputs.source, joints, inputs.index, config.chunk_size, keep_meshes=True),
        inputs.template,
    )


def _fingerprint(meta: dict) -> dict:
    rec = meta["record"]
    return {k: v["sha256"] for k, v in rec["inputs"].items()} | {"config": rec["config"]}


def _load_part(path) -> tuple[dict, Accumulator, list[np.ndarray]]:
    path = Path(path)
    arrays = read_npz(path, "fit-regressor shard file")
    try:
        meta = json.loads(str(arrays["meta"]))
        vertices = arrays["vertices"]
        k = len(arrays["rows_offsets"]) - 1
        shapes = {"gram": (len(vertices),) * 2, "cross": (k, len(vertices)), "joints_gram": (k, k)}
        sums = {key: ExactSum(shape, arrays[f"{key}_limbs"]) for key, shape in shapes.items()}
        acc = Accumulator(vertices, sums, int(arrays["frames"]), bool(arrays["centred"]))
        offsets = arrays["rows_offsets"]
        rows = [arrays["rows_flat"][a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise JregfixError(f"{path}: not a fit-regressor shard file ({exc})") from None
    except JregfixError as exc:
        raise JregfixError(f"{path}: inconsistent shapes in the shard file ({exc})") from None
    return meta, acc, rows


def _report(
    record: dict,
    config: FitConfig,
    result: FitResult | Solution,
    support_source: str,
    subjects: dict,
) -> dict:
    diag = result.diagnostics
    return {
        **record,
        "versions": versions(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": {
            "objective": "min sum_n ||C (W Vc_n - X_n)||^2 + lam sum_j (1^T w_j - 1)^2, W >= 0"
            if config.mode == ROOT_RELATIVE
            else "min sum_n ||W V_n - X_n||^2 + lam sum_j (1^T w_j - 1)^2, W >= 0",
            "frame": config.mode,
            "translation": "per-frame translation eliminated (meshes centred on their vertex "
            "mean, joints compared after removing the per-frame mean residual)"
            if config.mode == ROOT_RELATIVE
            else "none (meshes and joints share a frame)",
            "sum_to_one": "exact constraint"
            if config.exact_sum_to_one
            else f"penalty, lam = {config.sum_to_one_weight} * frames",
            "support": config.support,
            "support_locations": support_source,
            "solver": "active-set NNLS on the normal equations (float64)",
            "kkt_tolerance_relative": config.tol,
        },
        # refine refuses regressors whose meshes came from refine (the paper's drift guard)
        "params_stage": _params_stage(record),
        "leakage_guard": {
            "subjects": subjects,
            "test_subjects_used": sorted(set(subjects) & set(TEST_SUBJECTS)),
        },
        "result": diag,
        "regressor_stats": {
            k: v for k, v in regressor_stats(result.regressor).items() if k != "row_sums"
        },
    }


def _params_stage(record: dict) -> str | None:
    """The stage that wrote the params file (from its manifest), e.g. 'spin' or 'refine'."""
    entry = record.get("inputs", {}).get("params")
    if not entry:
        return None
    doc = read_manifest(manifest_path(entry["path"]))
    return (doc or {}).get("stage")


def _write_outputs(out, regressor, report, report_path) -> None:
    save_regressor(out, regressor, report)
    if report_path is not None:
        write_json(report_path, report)


def _outputs(out, report_path) -> dict[str, Path]:
    outputs = {"regressor": Path(out), "provenance": provenance_path(out)}
    if report_path is not None:
        outputs["report"] = Path(report_path)
    return outputs


def _frame_steps(progress: Progress | None, total: int | None = None) -> FrameCounter | None:
    """The fit's per-chunk frame counts as cumulative :class:`Step` events for ``progress``."""
    if progress is None:
        return None
    done = 0

    def count(frames: int) -> None:
        nonlocal done
        done += frames
        progress(Step(STAGE, done, total))

    return count
