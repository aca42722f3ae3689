import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.io import regressors as R
from tests.conftest import shared_fixture


def random_regressor(rng, k=17, v=6890, negative=False):
    j = np.zeros((k, v))
    for row in range(k):
        idx = rng.choice(v, 6, replace=False)
        j[row, idx] = rng.uniform(0.1, 1.0, 6) - (0.3 if negative else 0.0)
    return j


def cuda_tagged_pt(tensor: torch.Tensor, path: Path) -> None:
    """torch.save, then relabel the storage location 'cpu' -> 'cuda:0' as a GPU save would."""
    buf = io.BytesIO()
    torch.save(tensor, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                old = b"X\x03\x00\x00\x00cpu"
                assert old in data
                data = data.replace(old, b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info, data)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_numpy_round_trip(tmp_path, rng, suffix):
    j = random_regressor(rng)
    path = tmp_path / f"J{suffix}"
    R.save_regressor(path, j, provenance={"why": "test"})
    np.testing.assert_array_equal(R.load_regressor(path), j)
    # the sidecar also records the regressor's hash, which load_provenance checks
    assert R.load_provenance(path) == {"why": "test", "output_sha256": R.sha256_file(path)}


def test_cuda_saved_pt_loads_on_cpu(tmp_path, rng):
    j = random_regressor(rng).astype(np.float32)
    path = tmp_path / "J.pt"
    cuda_tagged_pt(torch.from_numpy(j).t().contiguous().t().requires_grad_(), path)
    np.testing.assert_array_equal(R.load_regressor(path), j.astype(np.float64))


def test_released_hedlin_file():
    path = shared_fixture("retrained_J_Regressor.pt")
    j = R.load_regressor(path)
    assert j.shape == (17, 6890)
    stats = R.regressor_stats(j)
    assert stats["support_per_row"] == [8, 6, 6, 5, 5, 7, 4, 6, 8, 8, 6, 8, 5, 6, 9, 6, 4]
    eff = R.effective_regressor(j)
    assert ((eff > 0).sum(1) == [4, 4, 3, 2, 5, 5, 4, 5, 5, 5, 4, 4, 2, 2, 4, 2, 2]).all()
    np.testing.assert_allclose(eff[3, [3337, 3436]], [0.144, 0.856], atol=1e-3)


def test_effective_regressor_matches_numpy(rng):
    j = random_regressor(rng, negative=True)
    pos = np.where(j > 0, j, 0)
    np.testing.assert_allclose(R.effective_regressor(j), pos / pos.sum(1)[:, None])


def test_pickled_code_in_pt_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"J": Evil()}, path)
    with pytest.raises(JregfixError, match="refused"):
        R.load_regressor(path)


def test_bad_shapes_and_values(tmp_path):
    np.save(tmp_path / "three_d.npy", np.zeros((2, 3, 4)))
    with pytest.raises(JregfixError, match="shape"):
        R.load_regressor(tmp_path / "three_d.npy")
    with pytest.raises(JregfixError, match="6890"):
        R.validate_regressor(np.zeros((17, 100)), 6890)
    bad = np.ones((17, 6890))
    bad[3, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(JregfixError, match="NaN"):
        R.load_regressor(tmp_path / "nan.npy")


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (an ephemeral port)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_over_http_pins_sha(http_server, tmp_path, rng, monkeypatch):
    root, base = http_server
    j = random_regressor(rng, negative=True).astype(np.float32)
    torch.save(torch.from_numpy(j), root / "retrained_J_Regressor.pt")
    digest = hashlib.sha256((root / "retrained_J_Regressor.pt").read_bytes()).hexdigest()
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    known = R.KnownRegressor(
        "hedlin",
        "test",
        (17, 6890),
        f"{base}/retrained_J_Regressor.pt",
        digest,
        "test",
        transform="relu-row-normalise",
    )
    monkeypatch.setitem(R.KNOWN_REGRESSORS, "hedlin", known)
    seen = []
    out = R.download_regressor(
        "hedlin", tmp_path / "eff.npy", progress=lambda done, total: seen.append((done, total))
    )
    pos = np.maximum(j.astype(np.float64), 0)
    np.testing.assert_allclose(np.load(out), pos / pos.sum(1)[:, None])
    assert seen and seen[-1][0] == (root / "retrained_J_Regressor.pt").stat().st_size
    assert R.load_provenance(out)["sha256_raw"] == digest


def test_download_sha_mismatch_leaves_no_file(http_server, tmp_path, monkeypatch):
    root, base = http_server
    (root / "J.pt").write_bytes(b"not the file you pinned")
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    known = R.KnownRegressor("hedlin", "t", (17, 6890), f"{base}/J.pt", "0" * 64, "t")
    monkeypatch.setitem(R.KNOWN_REGRESSORS, "hedlin", known)
    with pytest.raises(JregfixError, match="sha256 mismatch"):
        R.download_regressor("hedlin", tmp_path / "eff.npy")
    assert not (tmp_path / "eff.npy").exists()
    cache = tmp_path / "cache" / "regressors"
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_message_names_the_manual_route(tmp_path, monkeypatch):
    monkeypatch.setenv("JREGFIX_CACHE_DIR", str(tmp_path / "cache"))
    known = R.KnownRegressor("hedlin", "t", (17, 6890), "http://127.0.0.1:9/J.pt", "0" * 64, "t")
    monkeypatch.setitem(R.KNOWN_REGRESSORS, "hedlin", known)
    with pytest.raises(JregfixError, match="--url file://"):
        R.download_regressor("hedlin")


def test_cli_convert_and_show(tmp_path, rng, capsys):
    j = random_regressor(rng, negative=True)
    np.save(tmp_path / "raw.npy", j)
    assert (
        main(
            [
                "regressors",
                "convert",
                str(tmp_path / "raw.npy"),
                str(tmp_path / "eff.npz"),
                "--effective",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(R.load_regressor(tmp_path / "eff.npz").sum(1), 1.0)
    assert main(["regressors", "show", str(tmp_path / "eff.npz")]) == 0
    assert "row sums 1.0000..1.0000" in capsys.readouterr().out.replace("\n", " ")
    assert main(["regressors", "list"]) == 0
    assert main(["regressors", "show", str(tmp_path / "missing.npy")]) == 1


def test_unusable_regressors_are_refused_in_one_line(tmp_path, rng):
    good = random_regressor(rng)
    complex_j = good.astype(np.complex128)
    complex_j[0, 0] += 1j
    np.save(tmp_path / "complex.npy", complex_j)
    torch.save(torch.from_numpy(complex_j), tmp_path / "complex.pt")
    inf = good.copy()
    inf[2, 7] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    zero = good.copy()
    zero[[3, 9]] = 0.0
    np.save(tmp_path / "zero.npy", zero)
    for name, match in (
        ("complex.npy", "complex128"),
        ("complex.pt", "complex128"),
        ("inf.npy", "NaN or inf"),
        ("zero.npy", "row 3 is all zeros"),
    ):
        with pytest.raises(JregfixError, match=match) as info:
            R.load_regressor(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_warnings_flag_what_is_not_a_weighted_average(rng):
    j = random_regressor(rng)
    eff = j / j.sum(1, keepdims=True)
    assert R.regressor_warnings(eff) == []
    assert R.regressor_warnings(eff * (1 + 0.9e-3)) == []  # within the 1e-3 tolerance
    scaled = eff.copy()
    scaled[4] *= 1.002
    assert R.regressor_warnings(scaled) == [
        "1 row sum(s) off 1 by more than 0.001 (row sums 1.0000..1.0020)"
    ]
    raw = random_regressor(rng, negative=True)
    warnings = R.regressor_warnings(raw)
    assert warnings[0] == f"{int((raw < 0).sum())} negative weight(s)" and len(warnings) == 2
    assert R.regressor_warnings(R.effective_regressor(raw)) == []


def test_convert_never_overwrites_its_input(tmp_path, rng, capsys):
    np.save(tmp_path / "raw.npy", random_regressor(rng, negative=True))
    before = (tmp_path / "raw.npy").read_bytes()
    (tmp_path / "link.npy").symlink_to(tmp_path / "raw.npy")
    for dst in ("raw.npy", "./raw.npy", "link.npy"):
        assert (
            main(
                [
                    "regressors",
                    "convert",
                    str(tmp_path / "raw.npy"),
                    str(tmp_path / dst),
                    "--effective",
                ]
            )
            == 1
        )
        assert "would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "raw.npy").read_bytes() == before
    assert (
        main(["regressors", "convert", str(tmp_path / "raw.npy"), str(tmp_path / "copy.npy")]) == 0
    )
    assert "`evaluate` will flag it" in " ".join(capsys.readouterr().err.split())
    assert main(["regressors", "show", str(tmp_path / "copy.npy")]) == 0
    assert "negative weight" in capsys.readouterr().out
    assert (
        main(
            [
                "regressors",
                "convert",
                str(tmp_path / "copy.npy"),
                str(tmp_path / "eff.npy"),
                "--effective",
            ]
        )
        == 0
    )
    assert R.regressor_warnings(np.load(tmp_path / "eff.npy")) == []
