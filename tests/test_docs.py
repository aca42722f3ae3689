"""The docs site: its pages, its generated CLI reference and its strict build."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jregfix.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_hook(name: str):
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_text(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no folded option names
    assert main([*args, "--help"]) == 0
    return capsys.readouterr().out


def help_options(text: str) -> set[str]:
    """The option names of rich's option panel: the leading `--x` words of each panel line."""
    options = set()
    for line in text.splitlines():
        words = line.strip("│ ").lstrip("* ").replace(",", " ").split()
        for word in words:
            if not word.startswith("--"):
                break
            options.add(word)
    return options


def reference_sections(reference: str) -> dict[str, str]:
    """'jregfix evaluate' -> the markdown of that command's section (up to the next heading)."""
    parts = re.split(r"^#+ `([^`]+)`$", reference, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cli_reference_covers_every_command_and_option_of_help(capsys, monkeypatch):
    """Compared with what `--help` prints (rich's rendering), not with the walk the hook does."""
    sections = reference_sections(load_hook("cli_reference").cli_reference())
    listed = re.findall(r"^│ (\S+) ", help_text([], capsys, monkeypatch), flags=re.M)
    commands = [c for c in listed if not c.startswith("-")]
    assert {
        "spin",
        "silhouettes",
        "refine",
        "fit-regressor",
        "evaluate",
        "run",
        "check",
        "demo",
        "regressors",
    } <= set(commands)
    subcommands = re.findall(
        r"^│ (\w+) ", help_text(["regressors"], capsys, monkeypatch), flags=re.M
    )
    assert {"list", "download", "convert", "show"} <= set(subcommands)
    paths = [[c] for c in commands] + [["regressors", s] for s in subcommands if s != "help"]
    assert set(sections) == {"jregfix", *(f"jregfix {' '.join(p)}" for p in paths)}
    for path in paths:
        section = sections[f"jregfix {' '.join(path)}"]
        options = help_options(help_text(path, capsys, monkeypatch))
        assert options, path
        declared = {
            option
            for row in re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)
            for option in re.findall(r"--[a-z][a-z0-9-]*", row)
        }
        assert options <= declared, (path, options - declared)


def test_cli_reference_carries_defaults_and_required_marks():
    from jregfix.stages.spin import SpinConfig

    sections = reference_sections(load_hook("cli_reference").cli_reference())
    spin = sections["jregfix spin"]
    assert "Usage: jregfix spin [OPTIONS]" in spin
    row = next(line for line in spin.splitlines() if line.startswith("| `--chunk-size"))
    assert f"*[default: {SpinConfig().chunk_size};" in row  # the stage's own default
    assert "*[required]*" in next(line for line in spin.splitlines() if line.startswith("| `--out"))


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [page for entry in config["nav"] for page in entry.values()]
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    for hook in config["hooks"]:
        assert (ROOT / hook).is_file(), hook
    assert "<!-- cli-reference -->" in (DOCS / "cli.md").read_text()


def test_api_page_documents_modules_that_exist():
    modules = re.findall(r"^::: ([\w.]+)$", (DOCS / "api.md").read_text(), flags=re.M)
    assert "jregfix.io.regressors" in modules and "jregfix.geometry.metrics" in modules
    for module in modules:
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_docs_stand_alone():
    """Users have the docs, not the development notes they were written from."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        assert "conventions.md" not in text and "../shared" not in text, page


def test_rst_habits_are_dropped_from_rendered_docstrings():
    hook = load_hook("rst_roles")
    html = "<p>see :func:<code>jregfix.io.h36m.load_h36m</code>, a :class: word, a::b::</p>"
    assert (
        hook.on_page_content(html, None, None, None)
        == "<p>see <code>jregfix.io.h36m.load_h36m</code>, a :class: word, a::b:</p>"
    )


@pytest.mark.slow
def test_strict_build(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (site / "cli" / "index.html").read_text()
    assert "jregfix fit-regressor" in cli and "--sum-to-one-weight" in cli
    api = (site / "api" / "index.html").read_text()
    assert "pa_mpjpe" in api and ":func:" not in api
