"""`run` writes only into files it created itself: user files in the run directory, inputs
inside it and a second concurrent `run` are refused before anything is written."""

import json
from pathlib import Path

import numpy as np
import pytest

from jregfix.errors import JregfixError
from jregfix.stages.run import RunManifest, load_config, run, run_outputs
from tests.test_locks import hold_lock


def config(tmp_path: Path, run_dir: Path, **regressors) -> dict:
    inputs = tmp_path / "inputs"  # need not exist: the checks come before any read
    return {
        "run_dir": str(run_dir),
        "device": "cpu",
        "gt": {"train": str(inputs / "gt_train.npz"), "test": str(inputs / "gt_test.npz")},
        "init": {"given": str(inputs / "init.npz")},
        "silhouettes": {"given": str(inputs / "sil.npz")},
        "evaluate": {
            "methods": [{"method": "spin", "path": str(inputs / "spin.npz")}],
            "regressors": {k: str(v) for k, v in regressors.items()},
        },
    }


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_user_files_named_as_inputs_are_never_overwritten(tmp_path, capsys):
    """The issue's case: the user's own J_spin.npy (given as the standard regressor) and an
    evaluate.json in the run directory."""
    from jregfix.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.save(run_dir / "J_spin.npy", np.eye(3))
    (run_dir / "evaluate.json").write_text('{"mine": true}\n')
    before = snapshot(run_dir)
    cfg = config(tmp_path, run_dir, standard=run_dir / "J_spin.npy")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(cfg))
    assert main(["run", str(cfg_file)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: config: evaluate.regressors.standard")
    assert "inside run_dir" in errors[0]
    assert snapshot(run_dir) == before  # not even config.json or manifest.json was written


@pytest.mark.parametrize(
    "name", ["evaluate.json", "J_spin.npy", "figures/poses.png", "notes.txt", "manifest.json"]
)
def test_a_file_run_did_not_write_is_refused(tmp_path, name):
    run_dir = tmp_path / "run"
    (run_dir / name).parent.mkdir(parents=True)
    (run_dir / name).write_text("the user's\n")
    with pytest.raises(
        JregfixError,
        match=name if name != "manifest.json" else "not the manifest of a `jregfix run`",
    ) as err:
        run(config(tmp_path, run_dir))
    assert "\n" not in str(err.value)
    assert snapshot(run_dir) == {name: b"the user's\n"}


def test_previous_run_outputs_are_accepted_changed_ones_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(config(tmp_path, run_dir))
    owned = set(run_outputs(cfg))
    earlier = RunManifest(run_dir, cfg)
    j_spin = run_dir / "J_spin.npy"
    earlier.claim([j_spin, run_dir / "refined.npz"])  # refined.npz: its stage was killed
    np.save(j_spin, np.eye(3))
    (run_dir / "J_spin.npy.json").write_text("{}")
    earlier.record([j_spin])
    (run_dir / "refined.npz").write_bytes(b"half")
    (run_dir / "refined.npz.lock").write_text("{}")  # what the killed stage left behind
    (run_dir / "refined.npz.chunks").mkdir()
    (run_dir / "refined.npz.chunks" / "chunk_000000.npz").write_bytes(b"chunk")
    (run_dir / ".refined.npz.abc123.part").write_bytes(b"tmp")
    assert json.loads((run_dir / "manifest.json").read_text())["files"] == {
        "J_spin.npy": earlier.doc["files"]["J_spin.npy"],
        "J_spin.npy.json": earlier.doc["files"]["J_spin.npy.json"],
        "refined.npz": None,
        "refined.npz.json": None,
        "refined.npz.manifest.json": None,
    }

    RunManifest(run_dir, cfg).refuse_foreign_files(owned)  # exactly an earlier run's files
    np.save(j_spin, 2 * np.eye(3))  # the user replaced one of them
    with pytest.raises(JregfixError, match="J_spin.npy \\(changed since `run` wrote it\\)"):
        RunManifest(run_dir, cfg).refuse_foreign_files(owned)
    j_spin.unlink()
    (run_dir / ".notes.txt.x.part").write_text("user")  # not a temporary file of an output
    with pytest.raises(JregfixError, match="notes.txt.x.part \\(not written by `run`\\)"):
        RunManifest(run_dir, cfg).refuse_foreign_files(owned)


def test_inputs_inside_the_run_directory_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, run_dir)
    cfg["init"]["given"] = str(run_dir / "sub" / "init.npz")
    with pytest.raises(JregfixError, match="init.given .* lies inside run_dir"):
        run(cfg)
    assert not run_dir.exists()


def test_a_second_run_on_one_directory_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir / "manifest.json")
    try:
        with pytest.raises(JregfixError, match=f"being written by pid {holder.pid}"):
            run(config(tmp_path, run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "config.json").exists()


@pytest.mark.parametrize(
    "spin, message",
    [
        ({"images": "imgs"}, "config: init.spin: missing key(s) checkpoint"),
        ("imgs", "config: init.spin must be an object with keys images, checkpoint, mean_params"),
        (
            {"images": "imgs", "checkpoint": "c.pt", "batch": 3},
            "config: init.spin: unknown key(s) batch",
        ),
        (
            {"images": 3, "checkpoint": "c.pt"},
            "config: init.spin.images must be a non-empty string",
        ),
    ],
)
def test_config_slips_are_one_line_naming_the_key(tmp_path, capsys, spin, message):
    """These used to reach a stage and end as a KeyError/TypeError line naming nothing (or a
    traceback): they are refused at the door, before the run directory is created."""
    from jregfix.cli import main

    cfg = config(tmp_path, tmp_path / "run")
    cfg["init"] = {"spin": spin}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid input data" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "run").exists()


def test_method_and_regressor_entries_are_checked_at_the_door(tmp_path):
    cfg = config(tmp_path, tmp_path / "run", standard=tmp_path / "J.npy")
    cfg["evaluate"]["methods"][0]["path"] = 7
    with pytest.raises(JregfixError, match=r"evaluate.methods\[0\].path must be a non-empty"):
        load_config(cfg)
    cfg = config(tmp_path, tmp_path / "run")
    cfg["evaluate"]["regressors"] = {"standard": 7}
    with pytest.raises(JregfixError, match="evaluate.regressors.standard must be a non-empty"):
        load_config(cfg)
