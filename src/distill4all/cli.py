"""The `distill4all` command line. Thin by design: parse, load the config, call one function.

Errors the user can cause end in one line on stderr and exit code 2 (`--debug` shows the
traceback instead). Heavy libraries are imported inside commands so that `--help` stays fast.
"""

from __future__ import annotations

import contextlib
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


# --- export, chat, serve -----------------------------------------------------------------------

ModelArg = Annotated[
    str, typer.Argument(help="GGUF file, HF checkpoint folder, LoRA adapter folder or model name.", show_default=False)
]
BackendOpt = Annotated[str, typer.Option(help="auto (GGUF → llama.cpp, HF → transformers), llama.cpp or transformers.")]
CtxOpt = Annotated[int | None, typer.Option("--n-ctx", help="Context window in tokens (default: the model's, ≤4096).")]


def _load_engine(model: str, backend: str, n_ctx: int | None) -> Any:
    from distill4all.runtime.engine import BACKENDS, load_engine

    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    with err.status(f"loading {model}…") if not _state["quiet"] else contextlib.nullcontext():
        return load_engine(model, backend, n_ctx=n_ctx)


@app.command("export")
def export_cmd(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the GGUF files.", show_default=False)],
    quant: Annotated[
        list[str] | None, typer.Option("--quant", help="q4_0, q4_k_m, q8_0, f16 or f32; repeat for several.")
    ] = None,
    base_type: Annotated[str, typer.Option(help="The unquantized GGUF: f16 or f32.")] = "f16",
    compat: Annotated[
        bool, typer.Option(help="Older pre-tokenizer name (smollm → refact) for GPT4All 2.8 and other older runtimes.")
    ] = False,
    pre_tokenizer: Annotated[str | None, typer.Option(help="llama.cpp pre-tokenizer name (default: detected).")] = None,
    report: Annotated[bool, typer.Option(help="Measure KL, top-1 agreement and perplexity of each file.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Redo an export made with other settings.")] = False,
) -> None:
    """Export a model to GGUF and quantize it: merge an adapter, write f16/f32, quantize, report."""
    import json
    import shutil

    from pydantic import ValidationError

    from distill4all import atomic
    from distill4all.config import ExportConfig
    from distill4all.export.exporter import check_source, export_model

    check_source(model)
    try:
        cfg = ExportConfig(model=model, quantizations=quant or ["q4_0"], base_type=base_type,
                           compat=compat, pre_tokenizer=pre_tokenizer, report=report)  # fmt: skip
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"--{'-'.join(str(x) for x in first['loc'][:1])}: {first['msg']}") from None
    settings = cfg.model_dump(mode="json")
    record = out_dir / "export.json"
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if previous != settings:
            if not force:
                raise UserError(f"{out_dir} holds an export made with other settings; use --force or another --out")
            for old in out_dir.glob("model-*.gguf"):
                old.unlink()
            shutil.rmtree(out_dir / "merged", ignore_errors=True)
    elif out_dir.exists() and any(out_dir.glob("model-*.gguf")):
        raise UserError(f"{out_dir} already holds GGUF files; choose another --out (nothing was overwritten)")
    atomic.write_json(record, settings)
    outcome = export_model(model, out_dir, cfg, console=err, quiet=_state["quiet"])
    for f in outcome.files:
        out.print(str(f))


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option(min=0, help="0 is off.")] = 40,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option(min=0.0)] = 1.1,
    seed: Annotated[int | None, typer.Option(help="Fixed seed for reproducible sampling.")] = None,
    backend: BackendOpt = "auto",
    n_ctx: CtxOpt = None,
) -> None:
    """Chat with a model in the terminal (streaming; /reset, /system, /exit). Reads stdin when piped."""
    from distill4all.runtime.api import Assistant
    from distill4all.runtime.chat import chat_loop
    from distill4all.runtime.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)  # fmt: skip
    assistant = Assistant(_load_engine(model, backend, n_ctx), params)
    try:
        chat_loop(assistant, system=system, quiet=_state["quiet"])
    except KeyboardInterrupt:
        err.print()
    finally:
        assistant.close()


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless you mean to share.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 4891,
    api_key: Annotated[
        str | None, typer.Option(envvar="DISTILL4ALL_API_KEY", show_default=False, help="Require this bearer key.")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="The model id clients use (default: its name).")] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait; more get 503.")] = 64,
    backend: BackendOpt = "auto",
    n_ctx: CtxOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    from distill4all.runtime.server import serve as run_server

    engine = _load_engine(model, backend, n_ctx)
    model_id = model_name or engine.name
    auth = "an API key is required" if api_key else "no API key"
    err.print(f"serving {model_id} ({engine.backend}) at http://{host}:{port}/v1 — {auth}; Ctrl-C stops")
    try:
        run_server(engine, host=host, port=port, api_key=api_key, model_id=model_id, max_queue=max_queue,
                   quiet=_state["quiet"])  # fmt: skip
    finally:
        engine.close()


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
