"""One CLI vocabulary: every command spells and defaults the common options the same way, and
the per-frame stages take their defaults from their config dataclasses."""

from typing import get_type_hints

import pytest
import typer

from jregfix.cli import app
from jregfix.cli.options import renamed
from jregfix.device import DEFAULT_DEVICE
from jregfix.stages.silhouettes import SilhouetteConfig
from jregfix.stages.spin import SpinConfig


def commands() -> dict:
    """Every leaf command by its path ('spin', 'regressors list', ...); click classes are
    duck-typed (recent typer releases vendor their own click)."""
    out = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            out[path] = cmd

    walk(typer.main.get_command(app), "")
    return out


def option(cmd, name: str):
    return next((p for p in cmd.params if p.param_type_name == "option" and name in p.opts), None)


def test_the_gt_file_is_gt_everywhere_and_h36m_only_an_alias():
    cmds = commands()
    with_gt = {path for path, cmd in cmds.items() if option(cmd, "--gt")}
    assert {"spin", "silhouettes", "check", "evaluate"} <= with_gt
    for path, cmd in cmds.items():
        assert option(cmd, "--h36m") is None, path  # the old name is no option of its own...
    # ...but still works: mapped to --gt before parsing, also in the --name=value form
    assert renamed(["spin", "--h36m", "a.npz", "--h36m=b.npz", "--out", "o.npz"]) == [
        "spin",
        "--gt",
        "a.npz",
        "--gt=b.npz",
        "--out",
        "o.npz",
    ]


def test_one_device_default():
    for path, cmd in commands().items():
        device = option(cmd, "--device")
        if device is None:
            continue
        # `run` alone defaults to None: the config's `device`, whose own default is auto
        assert device.default == (None if path == "run" else DEFAULT_DEVICE), path
    from jregfix.stages.run import DEFAULTS

    assert DEFAULTS["device"] == DEFAULT_DEVICE


@pytest.mark.parametrize(
    "path, config", [("spin", SpinConfig()), ("silhouettes", SilhouetteConfig())]
)
def test_frame_stage_defaults_come_from_their_config(path, config):
    cmd = commands()[path]
    for field in (
        "batch_size",
        "chunk_size",
        "workers",
        "skip_missing",
        "force",
        "device",
        "score_threshold",
        "min_iou",
        "backend",
    ):
        if not hasattr(config, field):
            continue
        opt = option(cmd, "--" + field.replace("_", "-"))
        assert opt is not None and opt.default == getattr(config, field), (path, field)


def test_save_figures_is_a_frame_count_wherever_it_exists():
    cmds = commands()
    found = {path: option(cmd, "--save-figures") for path, cmd in cmds.items()}
    found = {path: opt for path, opt in found.items() if opt is not None}
    assert {"silhouettes", "refine"} <= set(found)
    for path, opt in found.items():
        assert get_type_hints(cmds[path].callback)[opt.name] is int and opt.default == 0, path
