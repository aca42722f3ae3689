"""Atomic writes: file modes follow the umask (or the replaced file), and an output with its
sidecar is one unit that a kill between the two renames cannot silently mix."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jregfix.errors import JregfixError
from jregfix.io.atomic import save_npz, write_json, write_pair
from jregfix.io.manifest import is_current, manifest_path, read_sidecar, stage_record, write_output
from jregfix.io.regressors import load_provenance, provenance_path, save_regressor

REPO = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    save_npz(tmp_path / "a.npz", x=np.zeros(3))
    write_json(tmp_path / "b.json", {"k": 1})
    save_regressor(tmp_path / "J.npy", np.eye(3), {"k": 1})
    for name in ("a.npz", "b.json", "J.npy", "J.npy.json"):
        assert mode(tmp_path / name) == expected, name


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    for name in ("a.npz", "J.npy", "J.npy.json"):
        (tmp_path / name).write_bytes(b"old")
        os.chmod(tmp_path / name, 0o644)
    os.chmod(tmp_path / "J.npy.json", 0o640)
    save_npz(tmp_path / "a.npz", x=np.zeros(3))
    save_regressor(tmp_path / "J.npy", np.eye(3), {"k": 1})
    assert mode(tmp_path / "a.npz") == 0o644
    assert mode(tmp_path / "J.npy") == 0o644 and mode(tmp_path / "J.npy.json") == 0o640
    assert np.load(tmp_path / "J.npy").shape == (3, 3)  # and the content is the new one


def test_pair_records_the_output_hash_and_readers_check_it(tmp_path):
    out, side = tmp_path / "J.npy", tmp_path / "J.npy.json"
    doc = write_pair(out, b"new bytes", side, {"params_stage": "spin"})
    assert doc["output_sha256"] == hashlib.sha256(b"new bytes").hexdigest()
    assert json.loads(side.read_text()) == doc
    assert read_sidecar(out, side) == doc
    out.write_bytes(b"someone else's bytes")
    with pytest.raises(JregfixError, match="does not describe"):
        read_sidecar(out, side)
    side.write_text(json.dumps({"name": "hedlin"}))  # other tools' sidecars record no hash
    assert read_sidecar(out, side) == {"name": "hedlin"}


def kill_between_renames(code: str) -> None:
    """Run ``code`` in a child that is SIGKILLed between a sidecar's and its output's rename."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JREGFIX_FAULT": "after-sidecar", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == -signal.SIGKILL


def test_kill_between_regressor_and_its_provenance_is_detected(tmp_path):
    """fit-regressor's J.npy + J.npy.json: a kill after the first rename leaves the old
    regressor with a sidecar that names other bytes; refine's drift guard refuses it."""
    from jregfix.stages.refine import check_regressor_provenance

    path = tmp_path / "J.npy"
    save_regressor(path, np.eye(3), {"params_stage": "spin"})
    old = path.read_bytes()
    assert check_regressor_provenance(path, force=False)["params_stage"] == "spin"
    kill_between_renames(
        "import numpy as np\nfrom jregfix.io.regressors import save_regressor\n"
        f"save_regressor({str(path)!r}, 2 * np.eye(3), {{'params_stage': 'refine'}})"
    )
    assert path.read_bytes() == old  # the output was not replaced yet...
    assert json.loads(provenance_path(path).read_text())["params_stage"] == "refine"
    for read in (
        lambda: load_provenance(path),
        lambda: check_regressor_provenance(path, force=False),
    ):
        with pytest.raises(JregfixError, match="does not describe"):  # ...and that shows
            read()
    save_regressor(path, 2 * np.eye(3), {"params_stage": "refine"})  # re-running repairs it
    assert load_provenance(path)["params_stage"] == "refine"


def test_kill_between_output_and_manifest_makes_the_stage_not_current(tmp_path):
    out = tmp_path / "r.npz"
    record = stage_record("refine", {}, {"iters": 4}, 0)
    write_output(out, b"first", record, "refined")
    assert is_current(out, record)
    kill_between_renames(
        "from jregfix.io.manifest import stage_record, write_output\n"
        f"write_output({str(out)!r}, b'second', stage_record('refine', {{}}, {{'iters': 4}}, 0),"
        " 'refined')"
    )
    assert out.read_bytes() == b"first"
    assert not is_current(out, record)  # computed again rather than trusted
    with pytest.raises(JregfixError, match="does not describe"):
        read_sidecar(out)
    write_output(out, b"second", record, "refined")
    assert (
        is_current(out, record)
        and read_sidecar(out)["output_sha256"] == hashlib.sha256(b"second").hexdigest()
    )
    assert manifest_path(out).is_file()


def test_json_outputs_hold_no_nan_or_inf(tmp_path):
    from jregfix.io.atomic import write_json

    write_json(tmp_path / "m.json", {"iou": float("nan"), "x": [1.5, float("inf")], "n": 3})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert doc == {"iou": None, "x": [1.5, None], "n": 3}
