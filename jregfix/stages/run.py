"""`run`: the whole pipeline over one run directory, stage by stage, resumable.

Stages, in order (each writes into ``run_dir``):

1. ``init``: the SPIN(-like) estimate of the training frames: ``init.given`` (a params npz) or
   ``init.spin`` (``{images, checkpoint, mean_params}``: the `spin` stage -> ``spin.npz``).
2. ``masks``: ``silhouettes.given`` (a silhouettes npz) or ``silhouettes.images`` (the
   `silhouettes` stage -> ``silhouettes.npz``).
3. ``fit_J_spin``: `fit-regressor` on the init meshes vs the train GT -> ``J_spin.npy``.
4. ``refine``: `refine` of the train frames with J_spin and the masks -> ``refined.npz``.
5. ``fit_J_opt``: `fit-regressor` on the refined meshes -> ``J_opt.npy``.
6. ``evaluate``: every method of ``evaluate.methods`` on the test GT under ``evaluate.regressors``
   (e.g. standard, oracle) plus J_spin and J_opt -> ``evaluate.json`` (Table I, with paired
   bootstrap intervals: ``evaluate.bootstrap`` resamples drawn with the run's seed).
7. ``figures``: PNGs under ``figures/`` (:mod:`jregfix.stages.figures`).

``run_dir/manifest.json`` records, per stage, the inputs (sha256), the stage's config, the seed
and the outputs (sha256). A stage whose record equals the stored one and whose outputs are
unchanged is skipped; an interrupted `refine` resumes from its last finished chunk (its own
chunk store). The resolved config (defaults filled in, paths absolute) is saved as
``run_dir/config.json``. A config is a dict, or a ``.json`` / ``.toml`` file whose relative
paths are relative to the file.

A run directory belongs to `run`: it writes there only files it created itself, each listed
(with its sha256) under ``files`` in ``manifest.json``, and it refuses a directory holding any
other file (the user's own ``J_spin.npy`` would otherwise be overwritten) unless the file is
exactly what an earlier run wrote there. Inputs may not lie inside the run directory. A file is
listed before its stage starts (sha256 null) and hashed when it ends, so the outputs of an
interrupted stage are still recognised as `run`'s own. One `run` at a time holds the directory
(the lock ``manifest.json.lock``, see :mod:`jregfix.io.lock`).

One top-level ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, default ``auto``, as
every command's ``--device``) places every stage: the body model, spin, silhouettes, the
meshes of both fits, refine, evaluate and the figures. It is part of each stage's record: a
stage computed on another device type is computed again.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from jregfix.device import DEFAULT_DEVICE, resolve_device
from jregfix.errors import JregfixError
from jregfix.io.atomic import json_bytes, sha256_file, write_bytes, write_json
from jregfix.io.lock import output_lock
from jregfix.io.manifest import read_manifest, records_current, stage_record, versions
from jregfix.methods.refinement import RefineConfig
from jregfix.stages.config_types import check_config_types
from jregfix.stages.result import Progress, StageResult

DEFAULTS: dict = {
    "run_dir": "run",
    "seed": 0,
    "device": DEFAULT_DEVICE,
    "body": {"model": "anny", "cache_dir": None, "smpl": None},
    "gt": {"train": None, "test": None},
    "init": {"given": None, "spin": None},
    "silhouettes": {"given": None, "images": None},
    "fit_regressor": {"support": "knn:128", "sum_to_one_weight": 1.0, "chunk_size": 128},
    "refine": {k: v for k, v in asdict(RefineConfig()).items() if k != "seed"},
    "evaluate": {
        "joints": 17,
        "protocol": "p1",
        "frame_ids": "video",
        "methods": [],
        "regressors": {},
        "bootstrap": 2000,
    },
    "figures": {"enabled": True, "frames": 4, "params": None},
}
PATH_KEYS = (
    ("gt", "train"),
    ("gt", "test"),
    ("init", "given"),
    ("silhouettes", "given"),
    ("silhouettes", "images"),
    ("body", "cache_dir"),
    ("body", "smpl"),
    ("figures", "params"),
)
STAGES = ("init", "masks", "fit_J_spin", "refine", "fit_J_opt", "evaluate", "figures")
Say = Callable[[str], None]


# ----------------------------------------------------------------------------- config


def _merge(base: dict, over: Mapping, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise JregfixError(f"config: unknown key '{where}{key}'; known: {sorted(base)}")
        if (
            isinstance(base[key], dict)
            and base[key]
            and isinstance(value, Mapping)
            and key not in ("regressors", "weights")
        ):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse(path: Path) -> dict:
    text = path.read_text()
    if path.suffix != ".toml":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise JregfixError(f"{path}: TOML configs need Python >= 3.11; use JSON") from None
    return tomllib.loads(text)


def _strings(where: str, section, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    """A config table whose values are strings (paths, names): exactly the ``required`` keys
    plus any of the ``optional`` ones, checked here so that a slip names its key instead of
    failing later inside a stage."""
    if not isinstance(section, Mapping):
        raise JregfixError(
            f"config: {where} must be an object with keys "
            f"{', '.join(required + optional)}, got {section!r}"
        )
    missing = [k for k in required if k not in section]
    unknown = sorted(set(section) - set(required) - set(optional))
    if missing or unknown:
        raise JregfixError(
            f"config: {where}: "
            + "; ".join(
                ([f"missing key(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            )
            + f" (keys: {', '.join(required + optional)})"
        )
    for key, value in section.items():
        if not isinstance(value, str) or not value:
            raise JregfixError(f"config: {where}.{key} must be a non-empty string, got {value!r}")
    return dict(section)


def load_config(config: str | Path | Mapping) -> dict:
    """Read (if a path) and resolve a run config: defaults filled in, paths made absolute."""
    root = Path.cwd()
    if not isinstance(config, Mapping):
        path = Path(config)
        if not path.is_file():
            raise JregfixError(f"{path}: no such config file")
        try:
            raw = _parse(path)
        except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise JregfixError(
                f"{path}: not a valid {path.suffix or 'JSON'} config ({exc})"
            ) from None
        root = path.resolve().parent
        config = raw
    check_config_types(config, DEFAULTS, PATH_KEYS + (("run_dir",),))
    cfg = _merge(DEFAULTS, config)

    def absolute(p):
        return None if p in (None, "") else str((root / Path(p)).resolve())

    cfg["run_dir"] = absolute(cfg["run_dir"])
    for a, b in PATH_KEYS:
        cfg[a][b] = absolute(cfg[a][b])
    for i, m in enumerate(cfg["evaluate"]["methods"]):
        _strings(f"evaluate.methods[{i}]", m, ("method", "path"), ("label",))
        m["path"] = absolute(m["path"])
        m.setdefault("label", m["method"])
    regressors = cfg["evaluate"]["regressors"]
    named = {k: v for k, v in regressors.items() if v is not None}  # null: leave it out
    _strings("evaluate.regressors", named, (), tuple(named))
    cfg["evaluate"]["regressors"] = {k: absolute(v) for k, v in regressors.items()}
    for key in ("train", "test"):
        if cfg["gt"][key] is None:
            raise JregfixError(f"config: gt.{key} (a SPIN-format Human3.6M npz) is required")
    if bool(cfg["init"]["given"]) == bool(cfg["init"]["spin"]):
        raise JregfixError(
            "config: give exactly one of init.given (params npz) or init.spin "
            "({images, checkpoint, mean_params})"
        )
    if cfg["init"]["spin"]:
        spin = _strings(
            "init.spin", cfg["init"]["spin"], ("images", "checkpoint"), ("mean_params",)
        )
        cfg["init"]["spin"] = {k: absolute(v) for k, v in spin.items()}
    if bool(cfg["silhouettes"]["given"]) == bool(cfg["silhouettes"]["images"]):
        raise JregfixError(
            "config: give exactly one of silhouettes.given (masks npz) or "
            "silhouettes.images (an image folder for the silhouettes stage)"
        )
    if not cfg["evaluate"]["methods"]:
        raise JregfixError("config: evaluate.methods is empty (list of {label, method, path})")
    return cfg


# ----------------------------------------------------------------------------- manifest


class RunManifest:
    """``run_dir/manifest.json``: per stage, the record it ran with and its outputs' hashes;
    under ``files`` every file `run` wrote into ``run_dir`` (relative path -> sha256, null
    while its stage runs)."""

    SIDECARS = ("", ".manifest.json", ".json")  # a stage output and what a stage writes beside

    def __init__(self, run_dir: Path, config: dict):
        self.run_dir = run_dir
        self.path = run_dir / "manifest.json"
        self.doc: dict = {"stages": {}, "files": {}}
        if self.path.exists():
            doc = read_manifest(self.path)
            if not (
                isinstance(doc, dict)
                and isinstance(doc.get("stages"), dict)
                and isinstance(doc.get("files"), dict)
            ):
                raise JregfixError(
                    f"{self.path} is not the manifest of a `jregfix run` (or of "
                    "an older version): choose a new run_dir, or move the "
                    "directory's files away"
                )
            self.doc = doc
        self.doc["config"] = config
        self.doc["versions"] = versions()

    def refuse_foreign_files(self, owned: set[str]) -> None:
        """Raise unless every file under run_dir is one `run` wrote and nobody changed since
        (lock files, chunk stores and temporary files of ``owned`` outputs aside)."""
        files = self.doc["files"]
        for path in sorted(self.run_dir.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(self.run_dir).as_posix()
            if rel == "manifest.json" or _transient(rel, owned | {"manifest.json"}):
                continue
            if rel in files and (
                files[rel] is None
                or (path.is_file() and not path.is_symlink() and sha256_file(path) == files[rel])
            ):
                continue
            why = "changed since `run` wrote it" if rel in files else "not written by `run`"
            raise JregfixError(
                f"run_dir {self.run_dir} holds {rel} ({why}); `run` never "
                "overwrites files it did not write: move it away or choose a "
                "new run_dir"
            )

    def claim(self, paths: list[Path]) -> None:
        """List ``paths`` (and their sidecars) as this run's before a stage writes them."""
        for rel in self._names(paths):
            self.doc["files"][rel] = None
        self.save()

    def record(self, paths: list[Path]) -> None:
        """Hash ``paths`` (and their sidecars) after their stage, forgetting absent ones."""
        for rel in self._names(paths):
            path = self.run_dir / rel
            if path.is_file():
                self.doc["files"][rel] = sha256_file(path)
            else:
                self.doc["files"].pop(rel, None)
        self.save()

    def _names(self, paths: list[Path]) -> list[str]:
        return [
            Path(p).relative_to(self.run_dir).as_posix() + s for p in paths for s in self.SIDECARS
        ]

    def current(self, name: str, record: dict, outputs: Mapping[str, Path]) -> bool:
        """Whether stage ``name`` is current (:func:`jregfix.io.manifest.records_current`)."""
        return records_current(self.doc["stages"].get(name), record, outputs)

    def done(
        self,
        name: str,
        record: dict,
        outputs: Mapping[str, Path],
        seconds: float,
        extra: Mapping | None = None,
    ) -> None:
        entry = dict(record)
        entry["outputs"] = {k: sha256_file(p) for k, p in outputs.items()}
        entry["seconds"] = round(seconds, 2)
        entry["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if extra:
            entry["summary"] = json.loads(json.dumps(extra, default=float))
        self.doc["stages"][name] = entry
        self.save()

    def save(self) -> None:
        write_json(self.path, self.doc)


def _transient(rel: str, owned: set[str]) -> bool:
    """A lock file, resume chunk or temporary file that a stage writing ``owned`` may leave."""
    parent, _, name = rel.rpartition("/")
    for out in owned:
        out_parent, _, out_name = out.rpartition("/")
        if (
            rel == out + ".lock"
            or rel.startswith(out + ".chunks/")
            or (
                parent == out_parent and name.startswith(f".{out_name}.") and name.endswith(".part")
            )
        ):
            return True
    return False


def run_outputs(cfg: Mapping) -> list[str]:
    """Every file `run` may write under run_dir for ``cfg`` (relative paths, sidecars too)."""
    outputs = ["J_spin.npy", "refined.npz", "J_opt.npy", "evaluate.json"]
    outputs += ["spin.npz"] if cfg["init"]["spin"] else []
    outputs += ["silhouettes.npz"] if cfg["silhouettes"]["images"] else []
    if cfg["figures"]["enabled"]:
        from jregfix.stages.figures import FIGURES

        outputs += [f"figures/{k}.png" for k in FIGURES]
    return ["config.json"] + [o + s for o in outputs for s in RunManifest.SIDECARS]


def input_paths(cfg: Mapping) -> dict[str, str]:
    """{config key: path} of every file or folder the run reads."""
    paths = {f"{a}.{b}": cfg[a][b] for a, b in PATH_KEYS}
    paths |= {f"init.spin.{k}": v for k, v in (cfg["init"]["spin"] or {}).items()}
    paths |= {
        f"evaluate.methods[{i}].path": m["path"] for i, m in enumerate(cfg["evaluate"]["methods"])
    }
    paths |= {f"evaluate.regressors.{k}": v for k, v in cfg["evaluate"]["regressors"].items()}
    return {k: v for k, v in paths.items() if v}


def refuse_inputs_inside(cfg: Mapping, run_dir: Path) -> None:
    """Inputs are never among a run's outputs: none may lie inside the run directory."""
    for key, value in input_paths(cfg).items():
        path = Path(value).resolve()
        if path == run_dir.resolve() or path.is_relative_to(run_dir.resolve()):
            raise JregfixError(
                f"config: {key} ({value}) lies inside run_dir {run_dir}, where "
                "`run` writes its outputs; keep inputs outside the run directory"
            )


# ----------------------------------------------------------------------------- body


def load_body(spec: Mapping, say: Say | None = None):
    """The body model named by ``config['body']`` (anny, or smpl with a model file)."""
    import torch

    if spec["model"] == "anny":
        from jregfix.body.anny import AnnyBody

        return AnnyBody(cache_dir=spec.get("cache_dir"), say=say)
    if spec["model"] == "smpl":
        if not spec.get("smpl"):
            raise JregfixError("config: body.model = 'smpl' needs body.smpl (a model file)")
        from jregfix.body.smpl import SMPLBody

        return SMPLBody(spec["smpl"]).to(torch.float32)
    raise JregfixError(f"config: body.model must be 'anny' or 'smpl', got {spec['model']!r}")


def rest_candidates(body, support: str) -> list[np.ndarray] | None:
    """Regressor supports around the body's rest joints when it has anatomical joints (Anny);
    None lets fit-regressor's pilot fit place them (SMPL)."""
    if not hasattr(body, "h36m_joints"):
        return None
    from jregfix.body.base import rest_h36m_joints
    from jregfix.methods.fitting import candidate_rows

    return candidate_rows(body.template.double().cpu().numpy(), rest_h36m_joints(body), support)


def fit_stage_regressor(
    body, params: str | Path, gt: str | Path, out: Path, cfg: dict, progress: Progress | None = None
) -> dict:
    """fit-regressor on ``params`` meshes vs ``gt`` (training subjects only)."""
    from jregfix.methods.fitting import FitConfig
    from jregfix.stages.fit_regressor import load_inputs, run_fit

    fc = cfg["fit_regressor"]
    config = FitConfig(
        support=fc["support"],
        sum_to_one_weight=fc["sum_to_one_weight"],
        chunk_size=fc["chunk_size"],
    )
    inputs = load_inputs(
        params, gt, None, out, config, body=body, candidates=rest_candidates(body, fc["support"])
    )
    d = run_fit(inputs, out, config, progress=progress).summary["result"]
    return {"frames": d["frames"], "rms_mm": d["rms_mm_all_joints"], "converged": d["converged"]}


# ----------------------------------------------------------------------------- run


def run(
    config: str | Path | Mapping,
    say: Say | None = None,
    progress: Progress | None = None,
    body=None,
) -> StageResult:
    """Run (or resume) every stage.

    ``say`` gets one line per stage started, skipped or done (and notes: a lock being waited
    for, a body model being downloaded); ``progress`` gets the :class:`Step` events of the
    stages that report them (spin, silhouettes, fit-regressor: frames; refine: frames, with the
    live loss terms in ``info``). Returns a :class:`StageResult` ("run"): ``outputs`` the files the
    stages wrote, by name, ``skipped`` when every stage was current, and ``summary`` = {config,
    run_dir, stages: {name: status}, summaries: {name: numbers}, timings: {name: s}, evaluate:
    the evaluate document, labels: {method: label}}.
    """
    say = say or (lambda _m: None)
    cfg = load_config(config)
    device = resolve_device(cfg["device"], option="config: device")
    run_dir = Path(cfg["run_dir"])
    refuse_inputs_inside(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(run_dir / "manifest.json", say):
        manifest = RunManifest(run_dir, cfg)
        manifest.refuse_foreign_files(set(run_outputs(cfg)))
        manifest.claim([run_dir / "config.json"])
        write_bytes(run_dir / "config.json", json_bytes(cfg))
        manifest.record([run_dir / "config.json"])
        return _run_stages(cfg, device, run_dir, manifest, say, progress, body)


def _run_stages(
    cfg: dict,
    device,
    run_dir: Path,
    manifest: RunManifest,
    say: Say,
    progress: Progress | None,
    body,
) -> StageResult:
    seed = cfg["seed"]
    status: dict[str, str] = {}
    summaries: dict[str, dict] = {}
    timings: dict[str, float] = {}
    outputs_of: dict[str, Path] = {}
    gt_train, gt_test = cfg["gt"]["train"], cfg["gt"]["test"]

    def get_body():
        nonlocal body
        if body is None:
            body = load_body(cfg["body"], say)
        body = body.to(device)
        return body

    def stage(name, inputs, stage_cfg, outputs, fn, writes=True):
        if writes:
            outputs_of.update(outputs)
        record = stage_record(
            name, inputs, {**stage_cfg, "body": cfg["body"]["model"], "device": device.type}, seed
        )
        if manifest.current(name, record, outputs):
            status[name] = "current (skipped)"
            summaries[name] = manifest.doc["stages"][name].get("summary", {})
            say(f"stage {name}: current, skipped")
            return
        say(f"stage {name}: running")
        written = list(outputs.values()) if writes else []
        manifest.claim(written)
        t0 = time.perf_counter()
        summary = fn() or {}
        timings[name] = time.perf_counter() - t0
        manifest.record(written)
        manifest.done(name, record, outputs, timings[name], summary)
        status[name] = f"done in {timings[name]:.1f} s"
        summaries[name] = summary
        say(f"stage {name}: done in {timings[name]:.1f} s")

    # 1-2: init and masks
    if cfg["init"]["given"]:
        init = Path(cfg["init"]["given"])
        stage(
            "init", {"init": init}, {"source": "given"}, {"init": init}, lambda: None, writes=False
        )
    else:
        from jregfix.stages.spin import SpinConfig, run_spin

        sp = cfg["init"]["spin"]
        init = run_dir / "spin.npz"
        stage(
            "init",
            {"gt": gt_train, "checkpoint": sp.get("checkpoint")},
            {"source": "spin", **sp},
            {"init": init},
            lambda: {
                "frames": run_spin(
                    gt_train,
                    sp["images"],
                    sp["checkpoint"],
                    sp.get("mean_params"),
                    init,
                    SpinConfig(device=str(device)),
                    progress,
                ).summary["frames"]
            },
        )
    if cfg["silhouettes"]["given"]:
        masks = Path(cfg["silhouettes"]["given"])
        stage(
            "masks",
            {"masks": masks},
            {"source": "given"},
            {"masks": masks},
            lambda: None,
            writes=False,
        )
    else:
        from jregfix.stages.silhouettes import SilhouetteConfig, run_silhouettes

        masks = run_dir / "silhouettes.npz"
        images = cfg["silhouettes"]["images"]
        stage(
            "masks",
            {"gt": gt_train},
            {"source": "silhouettes", "images": images},
            {"masks": masks},
            lambda: {
                "frames": run_silhouettes(
                    gt_train, images, masks, SilhouetteConfig(device=str(device)), progress
                ).summary["frames"]
            },
        )

    # 3: J_spin
    j_spin = run_dir / "J_spin.npy"
    stage(
        "fit_J_spin",
        {"params": init, "gt": gt_train},
        cfg["fit_regressor"],
        {"J_spin": j_spin},
        lambda: fit_stage_regressor(get_body(), init, gt_train, j_spin, cfg, progress),
    )

    # 4: refine
    from jregfix.stages.refine import refine

    rc = RefineConfig(**cfg["refine"], seed=seed)
    refined = run_dir / "refined.npz"
    stage(
        "refine",
        {"init": init, "gt": gt_train, "silhouettes": masks, "J_spin": j_spin},
        cfg["refine"],
        {"refined": refined},
        lambda: (
            refine(
                init,
                gt_train,
                masks,
                get_body(),
                j_spin,
                refined,
                rc,
                device=device,
                progress=progress,
            ).summary
        ),
    )

    # 5: J_opt
    j_opt = run_dir / "J_opt.npy"
    stage(
        "fit_J_opt",
        {"params": refined, "gt": gt_train},
        cfg["fit_regressor"],
        {"J_opt": j_opt},
        lambda: fit_stage_regressor(get_body(), refined, gt_train, j_opt, cfg, progress),
    )

    # 6: evaluate
    ev = cfg["evaluate"]
    regs = dict(ev["regressors"])
    regs.setdefault("standard", None)
    regs = {k: v for k, v in regs.items() if v is not None}
    ordered = {}
    for name in ("standard",):
        if name in regs:
            ordered[name] = regs.pop(name)
    ordered |= {"J_spin": str(j_spin), "J_opt": str(j_opt)} | regs
    evaluation = run_dir / "evaluate.json"

    def do_evaluate():
        from jregfix.stages.evaluate import evaluate

        doc = evaluate(
            [(m["method"], m["path"]) for m in ev["methods"]],
            gt_test,
            ordered,
            body=get_body(),
            protocol=ev["protocol"],
            joints=ev["joints"],
            frame_ids=ev["frame_ids"],
            chunk_size=64,
            device=device,
            json_out=evaluation,
            bootstrap=ev["bootstrap"],
            seed=seed,
            progress=progress,
        ).summary
        return {"rows": len(doc["results"])}

    inputs = {
        "gt": gt_test,
        **{f"method:{m['label']}": m["path"] for m in ev["methods"]},
        **{f"regressor:{k}": v for k, v in ordered.items()},
    }
    stage(
        "evaluate",
        inputs,
        {k: v for k, v in ev.items() if k != "regressors"},
        {"evaluate": evaluation},
        do_evaluate,
    )
    doc = json.loads(evaluation.read_text())
    labels = {m["method"]: m["label"] for m in ev["methods"]}

    # 7: figures
    if cfg["figures"]["enabled"]:
        from jregfix.stages import figures

        fig_dir = run_dir / "figures"
        outs = {k: fig_dir / f"{k}.png" for k in figures.FIGURES}
        fc = cfg["figures"]
        stage(
            "figures",
            {
                "refined": refined,
                "init": init,
                "masks": masks,
                "evaluate": evaluation,
                "gt_test": gt_test,
                "params": fc["params"],
            },
            fc,
            outs,
            lambda: figures.make_figures(
                fig_dir,
                get_body(),
                init,
                refined,
                masks,
                gt_test,
                ev["methods"],
                ordered,
                doc,
                rc.image_size,
                fc["frames"],
                fc["params"],
            ),
        )
    summary = {
        "config": cfg,
        "run_dir": str(run_dir),
        "stages": status,
        "summaries": summaries,
        "timings": timings,
        "evaluate": doc,
        "labels": labels,
    }
    return StageResult("run", outputs_of, skipped=not timings, summary=summary)


def relabel(doc: dict, labels: Mapping[str, str]) -> dict:
    """A copy of an evaluate document with method keys replaced by display labels."""
    out = copy.deepcopy(doc)
    for r in out["results"] + out.get("differences", []):
        r["method"] = labels.get(r["method"], r["method"])
    return out
