"""`evaluate --report/--csv`: the page is self-contained and agrees with the JSON; it renders in
headless Chromium when one is installed (else that part is skipped, the structure still
checked); the CSV holds the same numbers; same inputs and seed give the same bytes."""

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from jregfix.stages.evaluate import evaluate
from tests.test_evaluate import world  # noqa: F401  (the module-scoped synthetic world)

pytestmark = pytest.mark.slow  # the synthetic world and two evaluations with figures: ~10 s

URL_ATTRS = ("src", "href", "srcset", "action", "data", "poster", "background", "formaction")


class PageStructure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.urls, self.text = [], [], [], []
        self.in_table = 0
        self.table_text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.in_table += tag == "table"
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        self.urls += [v or "" for k, v in attrs.items() if k in URL_ATTRS]

    def handle_endtag(self, tag):
        self.in_table -= tag == "table"

    def handle_data(self, data):
        self.text.append(data)
        if self.in_table:
            self.table_text.append(data)


def check_page(path, doc):
    """Structural validation: one table, every image an embedded PNG, nothing fetched."""
    raw = path.read_text()
    page = PageStructure()
    page.feed(raw)
    assert page.tags.count("table") == 1
    for tag in ("script", "link", "iframe", "object", "embed"):
        assert tag not in page.tags, tag
    methods = {r["method"] for r in doc["results"]}
    assert len(page.images) == 2 * len(methods) + 1  # per joint, per action, joints on mesh
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert min(Image.open(io.BytesIO(png)).size) > 100
    assert all(not u.startswith(("http:", "https:", "//")) for u in page.urls)
    assert "http://" not in raw and "https://" not in raw and "url(" not in raw
    return page


@pytest.fixture(scope="module")
def report(world, smpl_body, tmp_path_factory):  # noqa: F811
    r = world["root"]
    out = tmp_path_factory.mktemp("report")
    regs = {"true": r / "J_true.npy", "other": r / "J_other.npy"}
    kwargs = dict(body=smpl_body, joints=17, bootstrap=200, seed=5)
    doc = evaluate(
        [("spin", r / "spin.npz")],
        r / "gt.npz",
        regs,
        json_out=out / "a.json",
        csv_out=out / "a.csv",
        report_dir=out / "a",
        **kwargs,
    ).summary
    evaluate(
        [("spin", r / "spin.npz")],
        r / "gt.npz",
        regs,
        json_out=out / "b.json",
        csv_out=out / "b.csv",
        report_dir=out / "b",
        **kwargs,
    )
    return out, doc


def test_page_structure_and_content(report):
    out, doc = report
    page = check_page(out / "a" / "index.html", doc)
    table = " ".join(page.table_text)
    d = next(x for x in doc["differences"] if x["regressor"] == "other")
    for metric in ("mpjpe_mm", "pa_mpjpe_mm"):
        lo, hi = d[metric]["interval"]
        assert f"{d[metric]['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}]" in table
    for r in doc["results"]:
        assert f"{r['mpjpe_mm']:.1f}" in table and f"{r['pa_mpjpe_mm']:.1f}" in table
    assert doc["protocol"]["bootstrap"]["resamples"] == 200
    assert "per_action" in doc["results"][0]  # the report asks for the per-action breakdown


def test_same_seed_same_bytes(report):
    out, _ = report
    for a, b in (("a.json", "b.json"), ("a.csv", "b.csv"), ("a/index.html", "b/index.html")):
        assert (out / a).read_bytes() == (out / b).read_bytes(), a


def test_csv_holds_the_json_numbers(report):
    out, doc = report
    rows = list(csv.DictReader(io.StringIO((out / "a.csv").read_text())))
    table = [r for r in rows if r["scope"] == "all"]
    assert [(r["method"], r["regressor"]) for r in table] == [
        (r["method"], r["regressor"]) for r in doc["results"]
    ]
    d = next(x for x in doc["differences"] if x["regressor"] == "other")
    other = next(r for r in table if r["regressor"] == "other")
    assert other["baseline"] == "true"
    assert float(other["delta_mpjpe_mm"]) == d["mpjpe_mm"]["difference"]
    assert [float(other["delta_pa_mpjpe_lower"]), float(other["delta_pa_mpjpe_upper"])] == d[
        "pa_mpjpe_mm"
    ]["interval"]
    for res in doc["results"]:
        joints = {
            r["name"]: float(r["mpjpe_mm"])
            for r in rows
            if r["scope"] == "joint" and r["regressor"] == res["regressor"]
        }
        assert joints == res["per_joint_mm"]
        actions = [r for r in rows if r["scope"] == "action" and r["regressor"] == res["regressor"]]
        assert sum(int(a["frames"]) for a in actions) == res["frames"]


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_renders_in_headless_chromium(report, tmp_path):
    """Structure first (always); then a screenshot in a real browser, if one is installed."""
    out, doc = report
    page = out / "a" / "index.html"
    check_page(page, doc)
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no chromium on PATH (Debian: apt-get install chromium); the page was "
            "validated structurally only"
        )
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.resolve().as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # text and charts, not blank


def test_report_without_a_body_model_uses_a_predicted_mesh(world, tmp_path):  # noqa: F811
    """VIBE-style tracks with vertices need no body model; the joints are shown on the first
    scored frame's mesh."""
    import joblib

    r = world["root"]
    n = len(world["names"])
    joblib.dump(
        {1: {"verts": world["pred_verts"].astype(np.float32), "frame_ids": np.arange(n)}},
        tmp_path / "vibe_output.pkl",
    )
    doc = evaluate(
        [("vibe", tmp_path / "vibe_output.pkl")],
        r / "gt.npz",
        {"true": r / "J_true.npy", "other": r / "J_other.npy"},
        frame_ids="rows",
        bootstrap=50,
        report_dir=tmp_path / "rep",
    ).summary
    check_page(tmp_path / "rep" / "index.html", doc)
    assert doc["protocol"]["methods"]["vibe"]["vertices"] == "from file"
    assert json.loads(json.dumps(doc)) == doc  # JSON-able as returned
