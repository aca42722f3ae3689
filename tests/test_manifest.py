"""One definition of "current" (io/manifest.records_current), for a stage's own manifest and for
a stage's entry in a run manifest: same inputs (by sha256), config and seed, and every recorded
output present with its recorded sha256."""

import hashlib
import json

import pytest

from jregfix.io.manifest import (
    is_current,
    manifest_path,
    records_current,
    stage_record,
    write_manifest,
    write_output,
)
from jregfix.stages.run import RunManifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in.npz").write_bytes(b"input")
    (tmp_path / "out.npz").write_bytes(b"output")
    (tmp_path / "fig.png").write_bytes(b"figure")
    return tmp_path


def test_the_rule_for_both_ways_of_recording_outputs(files):
    record = stage_record("fit", {"gt": files / "in.npz"}, {"iters": 3}, seed=0)
    assert record["inputs"]["gt"]["sha256"] == sha(b"input")
    outputs = {"out": files / "out.npz", "fig": files / "fig.png"}
    as_hashes = {**record, "outputs": {"out": sha(b"output"), "fig": sha(b"figure")}}
    as_entries = {
        **record,
        "outputs": {
            "out": {"path": "elsewhere", "sha256": sha(b"output")},
            "fig": {"sha256": sha(b"figure"), "bytes": 6},
        },
    }
    for doc in (as_hashes, as_entries):
        assert records_current(doc, record, outputs)
        assert not records_current(doc, {**record, "config": {"iters": 4}}, outputs)
        assert not records_current(doc, {**record, "seed": 1}, outputs)
        assert not records_current(doc, record, {"out": files / "out.npz"})  # one output fewer
        assert not records_current(doc, record, {**outputs, "more": files / "in.npz"})
    (files / "in.npz").write_bytes(b"another input")
    changed = stage_record("fit", {"gt": files / "in.npz"}, {"iters": 3}, seed=0)
    assert not records_current(as_hashes, changed, outputs)
    (files / "fig.png").write_bytes(b"replaced")
    assert not records_current(as_entries, record, outputs)
    (files / "fig.png").unlink()
    assert not records_current(as_hashes, record, outputs)
    for not_ours in (None, [], {"stage": "fit"}, {**record, "outputs": ["out"]}):
        assert not records_current(not_ours, record, outputs)


def test_a_stage_manifest_is_current_only_with_its_output_hash(files):
    out = files / "spin.npz"
    record = stage_record("spin", {"h36m": files / "in.npz"}, {"chunk_size": 2})
    assert not is_current(out, record)
    write_output(out, b"arrays", record, "spin")
    assert is_current(out, record)
    assert not is_current(out, stage_record("spin", {"h36m": files / "in.npz"}, {"chunk_size": 3}))
    out.write_bytes(b"arrays, replaced")
    assert not is_current(out, record)
    # written beside an existing output (silhouettes): the same rule
    write_manifest(manifest_path(out), record, outputs={"silhouettes": out})
    assert is_current(out, record)
    doc = json.loads(manifest_path(out).read_text())
    del doc["outputs"]  # no output hash recorded: never trusted
    manifest_path(out).write_text(json.dumps(doc))
    assert not is_current(out, record)


def test_run_manifest_stages_use_the_same_rule(files):
    run_dir = files / "run"
    run_dir.mkdir()
    manifest = RunManifest(run_dir, {"seed": 0})
    record = stage_record("refine", {"init": files / "in.npz"}, {"iters": 3}, 0)
    outputs = {"refined": files / "out.npz"}
    assert not manifest.current("refine", record, outputs)
    manifest.done("refine", record, outputs, 1.0, {"frames": 2})
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["refine"]
    assert entry["outputs"] == {"refined": sha(b"output")}
    reloaded = RunManifest(run_dir, {"seed": 0})
    assert reloaded.current("refine", record, outputs)
    assert records_current(entry, record, outputs)
    assert not reloaded.current("refine", {**record, "config": {"iters": 4}}, outputs)
    (files / "out.npz").write_bytes(b"edited")
    assert not reloaded.current("refine", record, outputs)
