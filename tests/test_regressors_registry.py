"""The known-regressor registry (top-level regressors/, shipped as jregfix.registry)."""

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.io import regressors as R
from tests.conftest import shared_fixture

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "regressors"
REQUIRED = ("name", "description", "shape", "url", "sha256", "licence", "transform")
HEDLIN_TOML = (REGISTRY / "hedlin.toml").read_text()


def test_every_entry_has_every_field_and_is_what_the_code_reads():
    files = sorted(REGISTRY.glob("*.toml"))
    assert {f.stem for f in files} == set(R.KNOWN_REGRESSORS) >= {"hedlin", "h36m"}
    for f in files:
        doc = tomllib.loads(f.read_text())
        assert set(REQUIRED) <= set(doc), f.name
        assert all(
            isinstance(doc[k], str) and doc[k].strip()
            for k in ("name", "description", "licence", "transform")
        ), f.name
        known = R.KNOWN_REGRESSORS[f.stem]
        assert (known.name, known.description, known.licence) == (
            doc["name"],
            doc["description"],
            doc["licence"],
        )
        assert list(known.shape) == doc["shape"]
        assert (known.url or "", known.sha256 or "") == (doc["url"], doc["sha256"])
        assert known.transform == doc["transform"] and known.transform in R.TRANSFORMS


def test_registry_is_the_one_the_package_reads():
    import jregfix.registry

    assert Path(jregfix.registry.__file__).resolve().parent == REGISTRY


def test_hedlin_entry_pins_the_released_file():
    entry = R.KNOWN_REGRESSORS["hedlin"]
    assert entry.url.startswith("https://") and entry.url.endswith("retrained_J_Regressor.pt")
    assert entry.transform == "relu-row-normalise" and entry.shape == (17, 6890)
    assert entry.sha256 == R.HEDLIN_SHA256
    released = shared_fixture("retrained_J_Regressor.pt")
    assert hashlib.sha256(released.read_bytes()).hexdigest() == entry.sha256


def test_no_weights_are_committed_in_the_registry():
    assert {p.suffix for p in REGISTRY.iterdir() if p.is_file()} <= {".toml", ".py"}


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.replace('name = "hedlin"', 'name = "other"'), "differs from the file name"),
        (lambda s: s.replace("shape = [17, 6890]", ""), "'shape' missing"),
        (lambda s: s.replace("shape = [17, 6890]", "shape = [17, 0]"), "positive integers"),
        (lambda s: s.replace('sha256 = "4ea3', 'sha256 = "zz'), "not 64 hex digits"),
        (
            lambda s: s.replace(f'sha256 = "{R.HEDLIN_SHA256}"', 'sha256 = ""'),
            "both url and sha256",
        ),
        (
            lambda s: s.replace('transform = "relu-row-normalise"', 'transform = "relu"'),
            "transform 'relu'",
        ),
        (lambda s: s + 'weights = "x"\n', "unknown key"),
        (lambda s: s.replace('licence = """', 'licence = 3\nx = """'), "'licence' missing"),
        (lambda s: s + "[broken", "not valid TOML"),
    ],
)
def test_broken_entries_are_refused_in_one_line(edit, match):
    text = edit(HEDLIN_TOML)
    assert text != HEDLIN_TOML
    with pytest.raises(JregfixError, match=match) as info:
        R.parse_registry_entry(text, "hedlin.toml")
    assert "\n" not in str(info.value) and "hedlin.toml" in str(info.value)


def test_list_shows_every_entry(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no folding: whole values on one line
    assert main(["regressors", "list"]) == 0
    out = capsys.readouterr().out
    for f in REGISTRY.glob("*.toml"):
        doc = tomllib.loads(f.read_text())
        for value in (
            doc["name"],
            doc["sha256"],
            doc["url"],
            doc["transform"],
            f"{doc['shape'][0]}x{doc['shape'][1]}",
        ):
            assert value in out, (f.name, value)


def fake_release(path: Path, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    j = np.zeros((17, 6890), np.float32)
    for row in range(17):
        j[row, rng.choice(6890, 5, replace=False)] = rng.uniform(-0.2, 1.0, 5)
        j[row, row] = 0.5  # at least one positive weight per row
    torch.save(torch.from_numpy(j), path)
    return j


def test_download_refuses_a_file_whose_sha256_is_not_the_registrys(tmp_path, monkeypatch):
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    fake_release(tmp_path / "retrained_J_Regressor.pt")
    with pytest.raises(JregfixError, match="sha256 mismatch"):
        R.download_regressor(
            "hedlin", tmp_path / "eff.npy", url=str(tmp_path / "retrained_J_Regressor.pt")
        )
    assert not (tmp_path / "eff.npy").exists()
    assert (
        main(
            [
                "regressors",
                "download",
                "hedlin",
                "--out",
                str(tmp_path / "eff.npy"),
                "--url",
                str(tmp_path / "retrained_J_Regressor.pt"),
            ]
        )
        == 1
    )


def test_download_applies_the_entrys_transform(tmp_path, monkeypatch):
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    raw = fake_release(tmp_path / "J.pt").astype(np.float64)
    digest = hashlib.sha256((tmp_path / "J.pt").read_bytes()).hexdigest()
    text = HEDLIN_TOML.replace(R.HEDLIN_SHA256, digest)
    for transform, expected in (
        ("none", raw),
        ("relu-row-normalise", np.maximum(raw, 0) / np.maximum(raw, 0).sum(1, keepdims=True)),
    ):
        entry = R.parse_registry_entry(
            text.replace('"relu-row-normalise"', f'"{transform}"'), "hedlin.toml"
        )
        monkeypatch.setitem(R.KNOWN_REGRESSORS, "hedlin", entry)
        out = R.download_regressor(
            "hedlin", tmp_path / f"{transform}.npy", url=str(tmp_path / "J.pt")
        )
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-12)
        assert R.load_provenance(out)["transform"] == R.TRANSFORMS[transform]


def test_an_entry_without_a_pinned_hash_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    fake_release(tmp_path / "J_regressor_h36m.pt")
    with pytest.raises(JregfixError, match="no pinned public download"):
        R.download_regressor(
            "h36m", tmp_path / "out.npy", url=str(tmp_path / "J_regressor_h36m.pt")
        )
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.slow
def test_a_built_wheel_ships_the_registry(tmp_path):
    """Build a wheel from a copy of the sources: the registry must be inside it, byte-equal."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jregfix", "regressors"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("jregfix-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {
            Path(n).name: z.read(n)
            for n in z.namelist()
            if n.startswith("jregfix/registry/") and n.endswith(".toml")
        }
        assert "jregfix/cli/regressors.py" in z.namelist()
    assert shipped == {p.name: p.read_bytes() for p in REGISTRY.glob("*.toml")}
