"""The `distill4all` command line. Thin by design: parse, load the config, call one function.

Errors the user can cause end in one line on stderr and exit code 2 (`--debug` shows the
traceback instead). Heavy libraries are imported inside commands so that `--help` stays fast.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from distill4all import __version__
from distill4all.errors import UserError

app = typer.Typer(
    name="distill4all",
    help="Distil an assistant chatbot from a teacher model: collect, curate, train, export, chat, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Validate and show run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"quiet": False, "debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"distill4all {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["quiet"], _state["debug"] = quiet, debug


ConfigArg = Annotated[Path, typer.Argument(help="The run config (YAML).", show_default=False)]


# --- config ------------------------------------------------------------------------------------


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter config.")] = Path("distill4all.yaml"),
) -> None:
    """Write a commented starter config."""
    from distill4all import atomic

    if path.exists():
        raise UserError(f"{path} exists; choose another path (nothing was overwritten)")
    text = resources.files("distill4all").joinpath("starter.yaml").read_text(encoding="utf-8")
    atomic.write_text(path, text)
    out.print(f"wrote {path}; check it with: distill4all config check {path}")


@config_app.command("check")
def config_check(config: ConfigArg) -> None:
    """Validate a run config; exit code 2 with the key path and line of the first problem."""
    from distill4all.config import load_config

    loaded = load_config(config)
    stages = ", ".join(loaded.config.configured_stages()) or "none"
    out.print(f"{config}: ok (run {loaded.config.name!r}; stages: {stages})")


@config_app.command("show")
def config_show(config: ConfigArg) -> None:
    """Print a run config with every default filled in (secrets stay as ${VAR})."""
    from distill4all.config import load_config, to_yaml

    loaded = load_config(config)
    print(to_yaml(loaded.public_dict()), end="")


# --- running -----------------------------------------------------------------------------------


@app.command()
def run(
    config: ConfigArg,
    from_stage: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    until_stage: Annotated[str | None, typer.Option("--until", help="Last stage to run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the selected stages, even if done.")] = False,
) -> None:
    """Run the configured stages in order; finished ones are skipped, interrupted ones resume."""
    from distill4all.config import load_config
    from distill4all.run import run_pipeline

    loaded = load_config(config)
    console = Console(stderr=True, quiet=_state["quiet"])
    outcomes = run_pipeline(
        loaded,
        from_stage=from_stage,
        until_stage=until_stage,
        force=force,
        console=console,
        quiet=_state["quiet"],
    )
    table = Table("stage", "action", "status", "counts", "time")
    for o in outcomes:
        table.add_row(o.stage, o.action, o.row.status, _counts_text(o.row.counts), f"{o.row.seconds:.1f}s")
    out.print(table)
    run_dir = loaded.config.run_dir
    for o in outcomes:
        for artifact in o.row.artifacts:
            out.print(f"  {o.stage}: {run_dir / artifact}")
    out.print(f"run directory: {run_dir}")
    out.print(f"manifest: {run_dir / 'manifest.json'}")


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]) -> None:
    """Show each stage's state, attempts, time and counts."""
    import json

    from distill4all.config import STAGE_ORDER
    from distill4all.run import RunDir

    rd = RunDir(run_dir, readonly=True)
    try:
        rows = rd.store.stages()
    finally:
        rd.close()
    configured: list[str] = list(STAGE_ORDER)
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {})
        configured = [s for s in STAGE_ORDER if cfg.get(s) is not None]
    table = Table("stage", "status", "attempts", "started", "time", "counts", title=str(run_dir))
    for name in configured:
        row = rows.get(name)
        if row is None:
            table.add_row(name, "pending", "0", "", "", "")
            continue
        started = datetime.fromtimestamp(row.started_at).strftime("%Y-%m-%d %H:%M:%S") if row.started_at else ""
        shown = "interrupted" if row.status == "running" and _stale(run_dir) else row.status
        table.add_row(name, shown, str(row.attempts), started, f"{row.seconds:.1f}s", _counts_text(row.counts))
    out.print(table)


def _stale(run_dir: Path) -> bool:
    """True when no process holds the run's lock, so a 'running' stage was in fact interrupted."""
    import fcntl
    import os

    lock = run_dir / ".lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _counts_text(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int | float))


# --- train -------------------------------------------------------------------------------------


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="A run config with a train section; or give --base-model/--data/--out.")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Model name or path (without a config).")] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL/Parquet pairs or conversations (without a config).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (without a config).")] = None,
    preset: Annotated[str | None, typer.Option(help="paper-lora or paper-full.")] = None,
    template: Annotated[str | None, typer.Option(help="paper, chat, chatml or alpaca.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    num_processes: Annotated[int | None, typer.Option(help="Training processes (data parallel).")] = None,
    launcher: Annotated[
        str | None, typer.Option(help="local (this process) or accelerate (accelerate launch).")
    ] = None,
    accelerate_config: Annotated[
        str | None, typer.Option(help="ddp, fsdp, deepspeed-zero2, deepspeed-zero3, or an accelerate config file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Start over instead of resuming.")] = False,
) -> None:
    """Fine-tune a model (LoRA or full). Rerunning after an interruption resumes from the last checkpoint."""
    from pydantic import ValidationError

    from distill4all import atomic
    from distill4all.config import LoadedConfig, RunConfig, TrainConfig, load_config, to_yaml
    from distill4all.errors import ConfigError
    from distill4all.run import run_pipeline

    overrides = {
        k: v
        for k, v in {
            "template": template, "epochs": epochs, "max_steps": max_steps, "num_processes": num_processes,
            "launcher": launcher, "accelerate_config": accelerate_config,
        }.items()
        if v is not None
    }  # fmt: skip
    try:
        if config is not None:
            if base_model or data or out_dir or preset:
                raise UserError("with a config file, set base_model, data and preset in its train section")
            loaded = load_config(config)
            if loaded.config.train is None:
                raise ConfigError(f"{config}: no train section")
            if overrides:
                loaded.config.train = TrainConfig.model_validate(loaded.config.train.model_dump() | overrides)
        else:
            if not (base_model and data and out_dir):
                raise UserError("without a config file, --base-model, --data and --out are all needed")
            spec = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
            train_section = {"base_model": spec, "data": str(data.resolve()), **overrides}
            if preset:
                train_section["preset"] = preset
            run_config = RunConfig.model_validate(
                {"name": "train", "run_dir": str(out_dir.resolve()), "train": train_section}
            )
            saved = run_config.run_dir / "train.yaml"  # the settings of this run, for the record
            if force or not saved.exists():
                atomic.write_text(saved, to_yaml(run_config.model_dump(mode="json", exclude_defaults=True)))
            loaded = LoadedConfig(run_config, saved)
    except ValidationError as e:
        raise ConfigError(
            "train: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        ) from None
    console = Console(stderr=True, quiet=_state["quiet"])
    outcomes = run_pipeline(
        loaded, from_stage="train", until_stage="train", force=force, console=console, quiet=_state["quiet"]
    )
    row = outcomes[0].row
    out.print(f"train: {outcomes[0].action}, {_counts_text(row.counts)}")
    run_dir = loaded.config.run_dir
    out.print(f"model: {run_dir / 'train' / 'model'}")
    out.print(f"loss curve: {run_dir / 'train' / 'loss.png'}")


# --- models ------------------------------------------------------------------------------------


@app.command()
def models() -> None:
    """List the named models: format, size, licence and where they are."""
    from distill4all.models import list_models

    table = Table("name", "format", "params", "size", "licence", "location")
    for m in list_models():
        size = f"{m.size_bytes / 1e6:.1f} MB" if m.size_bytes is not None else "-"
        table.add_row(m.name, m.format, m.params, size, m.licence, m.location)
    out.print(table)


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="New folder for the checkpoint.", show_default=False)],
    size: Annotated[str, typer.Option(help="tiny (~1M params, tests) or small (~95M, benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Same seed, same weights and tokenizer.")] = 0,
) -> None:
    """Build a random-weight LLaMA checkpoint with a locally trained byte-level BPE tokenizer."""
    from distill4all.models.tiny import SPECS, build_tiny_model

    if size not in SPECS:
        raise UserError(f"--size must be one of {', '.join(SPECS)}, not {size!r}")
    if out_dir.exists():
        raise UserError(f"{out_dir} exists; choose a new folder (nothing was overwritten)")
    t0 = time.perf_counter()
    build_tiny_model(out_dir, size, seed)  # type: ignore[arg-type]
    out.print(f"wrote {size} model to {out_dir} in {time.perf_counter() - t0:.1f}s")


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import os

    # Progress is shown with rich; libraries' tqdm bars (transformers, datasets) would interleave.
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: click itself reports usage errors (exit 2) and exits via SystemExit.
        app(args=args, prog_name="distill4all")
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
