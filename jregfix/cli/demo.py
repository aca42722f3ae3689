"""`jregfix demo`: generate the synthetic Anny world, then `run` the whole pipeline on it."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from jregfix.cli.app import app, console
from jregfix.cli.options import device_option, seed_option
from jregfix.device import DEVICE_HELP, resolve_device
from jregfix.errors import JregfixError


@app.command("demo")
def demo_command(
    out: Path = typer.Option(
        Path("jregfix-demo"), "--out", help="Directory for the world (world/) and the run (run/)."
    ),
    frames: int = typer.Option(
        None,
        "--frames",
        help="Poses per subject (each seen by 4 cameras); default 8, or 4 with --quick.",
    ),
    seed: int = seed_option("the world and the run"),
    quick: bool = typer.Option(
        False, "--quick", help="Small world (2 train, 1 test subject) for CI: under 2 minutes."
    ),
    device: str = device_option(
        help="Device of every stage of the run (the world is generated on the CPU): " + DEVICE_HELP
    ),
) -> None:
    """Synthetic Human3.6M-like world (Anny body model) -> the paper's Table I, with figures."""
    from jregfix.body.anny import AnnyBody
    from jregfix.cli.run import print_result, run_with_progress
    from jregfix.io.atomic import write_json
    from jregfix.synthetic.demo import demo_run_config, demo_world_config
    from jregfix.synthetic.world import generate_world, world_is_current

    if frames is not None and frames < 1:  # 0 must not quietly mean "the default"
        raise JregfixError(f"--frames must be a positive number of poses, got {frames}")
    resolve_device(device)  # a bad --device fails now, not after the world is generated
    t0 = time.perf_counter()
    size = "quick" if quick else "default"
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    body = AnnyBody(say=say)
    world = demo_world_config(size, frames, seed)
    world_dir, run_dir = out / "world", out / "run"
    if world_is_current(world_dir, world):
        say(f"world in {world_dir} is current, reused")
    else:
        generate_world(world_dir, world, body, say)
    config = demo_run_config(world_dir, run_dir, world, size) | {"device": device}
    write_json(out / "run_config.json", config)
    result = run_with_progress(config, body=body)
    print_result(result)
    console.print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; figures in "
        f"{run_dir / 'figures'}. These numbers come from a synthetic world with "
        "known truth: they show whether the method removes a planted regressor bias, "
        "not how it does on Human3.6M."
    )
