"""Bad inputs through the CLI: a non-zero exit, one `error:` line, no traceback, every input
byte-identical afterwards and no partial output left behind."""

import errno
import hashlib
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m

N = 4


def _gt_arrays(subject: str, rng: np.random.Generator) -> dict:
    names = [h36m_imgname(subject, "Walking_1", "54138969", i + 1) for i in range(N)]
    return dict(
        imgname=np.array(names),
        center=np.full((N, 2), 500.0),
        scale=np.full(N, 2.0),
        S=joints17_to_s24(rng.normal(size=(N, 17, 3)) * 0.3),
    )


@pytest.fixture
def world(tmp_path, smpl_pkl):
    """Tiny valid inputs in ``inp/`` (a test S9 GT, a training S1 GT, params, a regressor), an
    empty ``out/`` for outputs."""
    rng = np.random.default_rng(0)
    inp, out = tmp_path / "inp", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    for name, subject in (("gt.npz", "S9"), ("gt_train.npz", "S1")):
        a = _gt_arrays(subject, rng)
        save_h36m(inp / name, a["imgname"], a["center"], a["scale"], a["S"])
    np.savez(
        inp / "params.npz",
        pose=rng.normal(size=(N, 72)) * 0.1,
        betas=np.zeros((N, 10)),
        cam_t=np.tile([0.0, 0.0, 5.0], (N, 1)),
    )
    np.save(inp / "J.npy", np.full((17, 6890), 1 / 6890))
    (inp / "junk.bin").write_bytes(b"not used before the refusal")
    return dict(inp=inp, out=out, smpl=str(smpl_pkl), rng=rng)


def _snapshot(*dirs) -> dict:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for d in dirs
        for p in sorted(d.rglob("*"))
    }


def fails_cleanly(args: list[str], world, capsys, code: int = 1) -> str:
    """Run the CLI; check the exit code, the single error line, untouched inputs and outputs."""
    before = _snapshot(world["inp"], world["out"])
    capsys.readouterr()
    assert main([str(a) for a in args]) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    assert _snapshot(world["inp"], world["out"]) == before  # no input changed, nothing left
    return errors[0]


def _evaluate(world, predictions, gt=None, *extra) -> list:
    i = world["inp"]
    return [
        "evaluate",
        "--method",
        "spin",
        "--predictions",
        predictions,
        "--gt",
        gt or i / "gt.npz",
        "--regressor",
        f"t={i / 'J.npy'}",
        "--smpl",
        world["smpl"],
        "--bootstrap",
        "10",
        *extra,
    ]


def test_the_base_evaluate_command_succeeds(world, capsys):
    """The control for the evaluate cases below: only the planted defect makes them fail."""
    assert main([str(a) for a in _evaluate(world, world["inp"] / "params.npz")]) == 0


# ----------------------------------------------------------------- outputs onto inputs

CLASHES = {
    "fit-regressor --out GT": lambda i, s: [
        "fit-regressor",
        "--params",
        i / "params.npz",
        "--gt",
        i / "gt_train.npz",
        "--out",
        i / "gt_train.npz",
    ],
    "fit-regressor --json GT": lambda i, s: [
        "fit-regressor",
        "--params",
        i / "params.npz",
        "--gt",
        i / "gt_train.npz",
        "--out",
        i / "x.npy",
        "--json",
        i / "params.npz",
    ],
    "fit-regressor --merge": lambda i, s: [
        "fit-regressor",
        "--merge",
        i / "params.npz",
        i / "gt.npz",
        "--out",
        i / "params.npz",
    ],
    "refine --out init": lambda i, s: [
        "refine",
        "--init",
        i / "params.npz",
        "--gt",
        i / "gt_train.npz",
        "--silhouettes",
        i / "junk.bin",
        "--smpl",
        s,
        "--joint-regressor",
        i / "J.npy",
        "--out",
        i / "params.npz",
    ],
    "refine --merge": lambda i, s: [
        "refine",
        "--merge",
        i / "params.npz",
        i / "gt.npz",
        "--out",
        i / "params.npz",
    ],
    "spin --out GT": lambda i, s: [
        "spin",
        "--h36m",
        i / "gt.npz",
        "--images",
        i,
        "--checkpoint",
        i / "junk.bin",
        "--out",
        i / "gt.npz",
    ],
    "spin manifest onto an input": lambda i, s: [
        "spin",
        "--h36m",
        i / "gt.npz",
        "--images",
        i,
        "--checkpoint",
        i / "o.npz.manifest.json",
        "--out",
        i / "o.npz",
    ],
    "silhouettes --out GT": lambda i, s: [
        "silhouettes",
        "--h36m",
        i / "gt.npz",
        "--images",
        i,
        "--out",
        i / "gt.npz",
    ],
    "evaluate --json GT": lambda i, s: [
        "evaluate",
        "--method",
        "spin",
        "--predictions",
        i / "params.npz",
        "--gt",
        i / "gt.npz",
        "--regressor",
        f"t={i / 'J.npy'}",
        "--json",
        i / "gt.npz",
    ],
    "regressors convert SRC SRC": lambda i, s: [
        "regressors",
        "convert",
        i / "J.npy",
        i / "J.npy",
        "--effective",
    ],
    "regressors download --out URL": lambda i, s: [
        "regressors",
        "download",
        "hedlin",
        "--url",
        i / "J.npy",
        "--out",
        i / "J.npy",
    ],
    "check --json GT": lambda i, s: ["check", "--gt", i / "gt.npz", "--json", i / "gt.npz"],
}


@pytest.mark.parametrize("case", CLASHES)
def test_an_output_onto_an_input_is_refused(case, world, capsys):
    (world["inp"] / "o.npz.manifest.json").write_text("{}")  # what `--out o.npz` would replace
    message = fails_cleanly(CLASHES[case](world["inp"], world["smpl"]), world, capsys)
    assert "one of the inputs" in message or "would overwrite the input" in message


# ----------------------------------------------------------------- bad numbers in a file


def _params(world, **change):
    i = world["inp"]
    with np.load(i / "params.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for key, fn in change.items():
        arrays[key] = fn(arrays.get(key))
    path = i / "bad.npz"
    np.savez(path, **arrays)
    return path


def _with(a, index, value):
    a = a.astype(np.result_type(a, np.asarray(value))).copy()
    a[index] = value
    return a


BAD_PARAMS = {
    "NaN cam_t": (dict(cam_t=lambda a: _with(a, (2, 0), np.nan)), "NaN"),
    "cam_t depth 0": (dict(cam_t=lambda a: _with(a, (1, 2), 0.0)), "behind the camera"),
    "pose of 1e8 rad": (dict(pose=lambda a: _with(a, (0, 5), 1e8)), "pose"),
    "betas of 1e6": (dict(betas=lambda a: _with(a, (3, 0), 1e6)), "betas"),
    "string pose": (dict(pose=lambda a: a.astype(str)), "dtype"),
    "complex betas": (dict(betas=lambda a: a.astype(complex)), "dtype"),
    "betas with 11 columns": (dict(betas=lambda a: np.zeros((N, 11))), "bad.npz: betas have 11"),
    "more pose rows than imgnames": (
        dict(imgname=lambda a: np.array(["a.jpg", "b.jpg"])),
        "imgname",
    ),
}


@pytest.mark.parametrize("case", BAD_PARAMS)
def test_implausible_parameters_are_refused(case, world, capsys):
    change, expected = BAD_PARAMS[case]
    message = fails_cleanly(_evaluate(world, _params(world, **change)), world, capsys)
    assert expected in message


def _gt(world, fn):
    a = _gt_arrays("S9", world["rng"])
    fn(a)
    path = world["inp"] / "bad_gt.npz"
    np.savez(path, **a)
    return path


def _duplicate(a):
    a["imgname"][1] = a["imgname"][0]


BAD_GT = {
    "duplicate frame": (_duplicate, "more than once"),
    "scale 0": (lambda a: a["scale"].__setitem__(2, 0.0), "scale"),
    "joints scaled by 1e30": (lambda a: a.__setitem__("S", a["S"] * 1e30), "100 m"),
    "all-zero int8 joints": (
        lambda a: a.__setitem__("S", np.zeros((N, 24, 4), np.int8)),
        "all zeros",
    ),
    "string centres": (lambda a: a.__setitem__("center", a["center"].astype(str)), "dtype"),
}


@pytest.mark.parametrize("case", BAD_GT)
def test_implausible_ground_truth_is_refused(case, world, capsys):
    fn, expected = BAD_GT[case]
    message = fails_cleanly(
        _evaluate(world, world["inp"] / "params.npz", _gt(world, fn)), world, capsys
    )
    assert expected in message


def test_json_named_npz_is_called_json(world, capsys):
    (world["inp"] / "j.npz").write_text(json.dumps({"pose": [1, 2]}))
    message = fails_cleanly(
        _evaluate(world, world["inp"] / "params.npz", world["inp"] / "j.npz"), world, capsys
    )
    assert "not an npz (looks like JSON)" in message


def test_npz_header_declaring_an_absurd_shape_is_refused_before_allocation(world, capsys):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 24, 4)}
    )
    path = world["inp"] / "huge.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, a in _gt_arrays("S9", world["rng"]).items():
            if key != "S":
                with z.open(f"{key}.npy", "w") as f:
                    np.save(f, a)
        z.writestr("S.npy", header.getvalue() + bytes(1000))
    message = fails_cleanly(_evaluate(world, world["inp"] / "params.npz", path), world, capsys)
    assert "'S' declares shape (1000000000, 24, 4)" in message


# ----------------------------------------------------------------- options and configs

OPTIONS = {
    "evaluate --batch-size 0": (
        lambda w: _evaluate(w, w["inp"] / "params.npz", None, "--batch-size", "0"),
        "--batch-size",
    ),
    "fit-regressor --sum-to-one-weight inf": (
        lambda w: [
            "fit-regressor",
            "--params",
            w["inp"] / "params.npz",
            "--gt",
            w["inp"] / "gt_train.npz",
            "--smpl",
            w["smpl"],
            "--out",
            w["out"] / "J.npy",
            "--sum-to-one-weight",
            "inf",
        ],
        "--sum-to-one-weight",
    ),
    "refine --lr nan": (lambda w: _refine(w, "--lr", "nan"), "--lr"),
    "refine --shard 1/0": (lambda w: _refine(w, "--shard", "1/0"), "--shard"),
    "refine --batch-size -1": (lambda w: _refine(w, "--batch-size", "-1"), "--batch-size"),
}


def _refine(world, *extra) -> list:
    i = world["inp"]
    return [
        "refine",
        "--init",
        i / "params.npz",
        "--gt",
        i / "gt_train.npz",
        "--silhouettes",
        i / "junk.bin",
        "--smpl",
        world["smpl"],
        "--joint-regressor",
        i / "J.npy",
        "--out",
        world["out"] / "refined.npz",
        *extra,
    ]


@pytest.mark.parametrize("case", OPTIONS)
def test_bad_option_values_name_the_option(case, world, capsys):
    args, expected = OPTIONS[case]
    assert expected in fails_cleanly(args(world), world, capsys)


USAGE = {
    "out of range": (["spin", "--batch-size", "0"], "'--batch-size'"),
    "unknown option": (["evaluate", "--bogus"], "No such option: --bogus"),
    "missing option": (["silhouettes"], "Missing option"),
    "not a number": (["refine", "--iters", "many"], "'--iters'"),
}


@pytest.mark.parametrize("case", USAGE)
def test_usage_errors_are_one_line_naming_the_help(case, world, capsys):
    args, expected = USAGE[case]
    line = fails_cleanly(args, world, capsys, code=2)
    assert expected in line and f"`jregfix {args[0]} --help`" in line


CONFIGS = {
    "a list": ([1, 2], "the config must be an object"),
    "iters many": ({"refine": {"iters": "many"}}, 'refine.iters must be an integer, got "many"'),
    "run_dir 5": ({"run_dir": 5}, "run_dir must be a path"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_run_config_type_errors_name_their_key(case, world, capsys):
    config, expected = CONFIGS[case]
    path = world["inp"] / "run.json"
    path.write_text(json.dumps(config))
    assert expected in fails_cleanly(["run", path], world, capsys)


# ----------------------------------------------------------------- I/O faults and the boundary


def test_json_pointing_at_a_directory(world, capsys):
    (world["out"] / "results").mkdir()
    message = fails_cleanly(
        _evaluate(world, world["inp"] / "params.npz", None, "--json", world["out"] / "results"),
        world,
        capsys,
    )
    assert "directory" in message


RAISED = {
    "permission": (
        PermissionError(errno.EACCES, "Permission denied", "/x/out.npz"),
        "/x/out.npz: Permission denied",
    ),
    "disk full": (
        OSError(errno.ENOSPC, "No space left on device", "/x/out.npz"),
        "free some space",
    ),
    "absurd size": (MemoryError(), "out of memory"),
    "bad data": (IndexError("index 7 is out of bounds"), "invalid input data"),
    "unexpected": (RuntimeError("something odd\nsecond line"), "--debug for the traceback"),
}


@pytest.mark.parametrize("case", RAISED)
def test_every_exception_becomes_one_line(case, world, capsys, monkeypatch):
    exc, expected = RAISED[case]

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr("jregfix.cli.evaluate.evaluate", boom)
    args = _evaluate(world, world["inp"] / "params.npz")
    assert expected in fails_cleanly(args, world, capsys)
    with pytest.raises(type(exc)):  # --debug shows everything
        main(["--debug", *map(str, args)])


# ----------------------------------------------------------------- downloads, chunks, images


def test_download_deadline_and_no_part_file(world, capsys, monkeypatch):
    cache = world["out"].parent / "cache"  # created empty; only files matter
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(cache))
    monkeypatch.setenv("JREGFIX_DOWNLOAD_TIMEOUT", "1e-9")
    message = fails_cleanly(
        [
            "regressors",
            "download",
            "hedlin",
            "--url",
            world["inp"] / "J.npy",
            "--out",
            world["out"] / "J.npy",
        ],
        world,
        capsys,
    )
    assert "JREGFIX_DOWNLOAD_TIMEOUT" in message
    assert not list(cache.rglob("*.part"))


def test_ctrl_c_during_a_download_leaves_no_part_file(world):
    from jregfix.io.download import download

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(str(world["inp"] / "J.npy"), world["out"] / "J.npy", None, progress=interrupt)
    assert list(world["out"].iterdir()) == []


def test_bad_resume_chunks_are_discarded_alone(tmp_path):
    from jregfix.io.manifest import ChunkStore

    record = {"stage": "t", "inputs": {}, "config": {}, "seed": 0}
    notes = []
    store = ChunkStore(tmp_path / "c", record, say=notes.append)
    for i in range(3):
        store.save(i, pose=np.full((2, 3), float(i)), gt_row=np.array([2 * i, 2 * i + 1]))
    raw = store.path(1).read_bytes()
    store.path(1).write_bytes(raw[: len(raw) // 2])  # killed mid-copy
    with np.load(store.path(2)) as z:  # an edited chunk holding NaN
        arrays = {k: z[k] for k in z.files}
    arrays["pose"][1, 0] = np.nan
    np.savez_compressed(store.path(2), **arrays)
    fresh = ChunkStore(tmp_path / "c", record, say=notes.append)  # the resumed run
    assert [fresh.done(i) for i in range(3)] == [True, False, False]
    assert fresh.path(0).is_file() and not fresh.path(1).exists() and not fresh.path(2).exists()
    assert len(notes) == 2 and "NaN" in notes[1]
    np.testing.assert_array_equal(fresh.load(0)["pose"], np.zeros((2, 3)))


def test_a_stage_producing_nan_names_the_frames_and_keeps_good_chunks(tmp_path):
    from jregfix.io.manifest import ChunkStore

    store = ChunkStore(tmp_path / "c", {"stage": "t", "inputs": {}, "config": {}, "seed": 0})
    store.save(0, pose=np.zeros((2, 3)), gt_row=np.array([0, 1]))
    bad = np.zeros((2, 3))
    bad[1, 2] = np.inf
    with pytest.raises(JregfixError, match=r"1 frame\(s\), e.g. \[3\]"):
        store.save(1, pose=bad, gt_row=np.array([2, 3]))
    assert store.done(0) and not store.path(1).exists()


def _png_declaring(path, width: int, height: int) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [(20000, 10000), (10000, 9000), (9000, 9000)])
def test_images_over_the_pixel_budget_are_refused(size, tmp_path):
    from jregfix.io.images import read_image

    _png_declaring(tmp_path / "bomb.png", *size)
    with pytest.raises(JregfixError) as info:
        read_image(tmp_path / "bomb.png")
    message = str(info.value)
    assert "bomb.png" in message and "\n" not in message
    assert "pixel budget" in message or "decompression bomb" in message
