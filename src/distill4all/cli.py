"""The `distill4all` command line. Thin by design: parse, load the config, call one function.

Errors the user can cause end in one line on stderr and exit code 2 (`--debug` shows the
traceback instead). Heavy libraries are imported inside commands so that `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from distill4all import __version__
from distill4all.config import CHAT_SAMPLING  # the chat options' defaults, shown in --help
from distill4all.errors import UserError
from distill4all.redact import redact  # every error printed: no secret a teacher echoed or a URL carried

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

PIPE_WIDTH = 10_000  # columns of output that is not a terminal: wide enough that nothing is cut


def _console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A rich console that fits its terminal, and into a pipe or file cuts and wraps nothing: rich
    would lay tables out in 80 columns there, cutting the names and paths a script reads."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    return console


out = _console()
err = _console(stderr=True)
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


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
    max_cost: Annotated[
        float | None, typer.Option("--max-cost", help="Stop collecting cleanly once this many USD are spent.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Estimate the collection's tokens and cost only.")] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set eval.limit=null.")
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not write the report page.")] = False,
) -> None:
    """Run the configured stages in order; finished ones are skipped, interrupted ones resume."""
    from distill4all.config import load_config
    from distill4all.layout import RunLayout
    from distill4all.run import run_stages

    loaded = load_config(config, overrides=overrides)
    if dry_run:
        _print_estimate(loaded)
        return
    console = _console(stderr=True, quiet=_state["quiet"])
    options = {"max_cost_usd": max_cost} if max_cost is not None else {}
    outcomes = run_stages(
        loaded,
        from_stage=from_stage,
        until_stage=until_stage,
        force=force,
        console=console,
        quiet=_state["quiet"],
        options=options,
    )
    table = Table("stage", "action", "status", "counts", "time")
    for o in outcomes:
        table.add_row(o.stage, o.action, o.row.status, _counts_text(o.row.counts), f"{o.row.seconds:.1f}s")
    out.print(table)
    run_dir = loaded.config.run_dir
    for o in outcomes:
        for artifact in o.row.artifacts:
            out.print(f"  {o.stage}: {run_dir / artifact}")
    if not no_report:
        from distill4all.report.build import build_report

        out.print(f"report: {build_report(run_dir)}")
    out.print(f"run directory: {run_dir}")
    out.print(f"manifest: {RunLayout(run_dir).manifest}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    chats: Annotated[bool, typer.Option(help="Include sample chats with the run's model.")] = True,
) -> None:
    """Write the run's report page (report/index.html): funnel, costs, map, losses, quantization, eval."""
    from distill4all.report.build import build_report
    from distill4all.run import RunDir

    RunDir(run_dir, readonly=True).close()  # a clear error when it is not a run directory
    out.print(f"report: {build_report(run_dir, chats=chats)}")


def _print_estimate(loaded: Any) -> None:
    from distill4all.collect.estimate import estimate
    from distill4all.layout import RunLayout
    from distill4all.store import Store

    cfg = loaded.config
    if cfg.collect is None:
        raise UserError("--dry-run estimates the collect stage, and this config has none")
    store_path = RunLayout(cfg.run_dir).store
    store = Store(store_path, readonly=True) if store_path.exists() else None
    try:
        estimates = estimate(cfg.collect, cfg.seed, store)
    finally:
        if store is not None:
            store.close()
    table = Table("teacher", "model", "requests", "prompt tokens", "prompt $", "expected $", "worst case $")
    for e in estimates:
        table.add_row(
            e.teacher,
            e.model,
            f"{e.requests:,}",
            f"~{e.prompt_tokens:,}",
            f"{e.prompt_usd:.4f}",
            f"{e.expected_usd:.4f}",
            f"{e.worst_usd:.4f}",
        )
    out.print(table)
    out.print(
        "nothing was sent or written. Prompt tokens are estimated at ~4 characters each; 'worst case' "
        "assumes every answer reaches max_tokens, 'expected' the mean length collected so far (else half)."
    )


# --- collect -----------------------------------------------------------------------------------

collect_app = typer.Typer(
    help="The collect stage alone, and its extras: pair exports and OpenAI Batch API files.", no_args_is_help=True
)
app.add_typer(collect_app, name="collect")


@collect_app.command("run")
def collect_run(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Archive the answers and collect afresh.")] = False,
    max_cost: Annotated[
        float | None, typer.Option("--max-cost", help="Stop collecting cleanly once this many USD are spent.")
    ] = None,
) -> None:
    """Run the collect stage of a run config alone; an interrupted collection resumes."""
    from distill4all.layout import RunLayout

    loaded = _stage_of_config(config, "collect")
    outcome = _run_one_stage(loaded, "collect", force, {"max_cost_usd": max_cost} if max_cost is not None else {})
    out.print(f"collect: {outcome.action}, {_counts_text(outcome.row.counts)}")
    out.print(f"pairs: {RunLayout.of(loaded.config).collect.pairs}")


def _open_run_store(config: Path) -> tuple[Any, Any]:
    from distill4all.run import RunDir

    loaded = _stage_of_config(config, "collect")
    return loaded, RunDir(loaded.config.run_dir)


@collect_app.command("export")
def collect_export(
    config: ConfigArg,
    out_path: Annotated[Path, typer.Argument(help="Output file.", show_default=False)],
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl (GPT4All), parquet, or messages (OpenAI chat).")
    ] = "jsonl",
) -> None:
    """Write the collected pairs as GPT4All JSONL/Parquet or OpenAI `messages` JSONL."""
    from distill4all.collect.pairs_file import write_pairs

    if fmt not in ("jsonl", "parquet", "messages"):
        raise UserError(f"--format must be jsonl, parquet or messages, not {fmt!r}")
    _, rd = _open_run_store(config)
    try:
        n = write_pairs(rd.store, out_path, fmt)  # type: ignore[arg-type]
    finally:
        rd.close()
    out.print(f"wrote {n} pairs to {out_path}")


@collect_app.command("batch-export")
def collect_batch_export(
    config: ConfigArg,
    out_path: Annotated[Path, typer.Argument(help="Batch API input JSONL to write.", show_default=False)],
    teacher: Annotated[str | None, typer.Option(help="Teacher name (default: the first).")] = None,
) -> None:
    """Write the pending requests as an OpenAI Batch API input file (half price, within 24 h)."""
    from distill4all.collect.batch import export_requests
    from distill4all.collect.gather import load_sources
    from distill4all.store import tasks

    loaded, rd = _open_run_store(config)
    try:
        with rd.locked():
            load_sources(
                rd.store, loaded.config.collect, loaded.config.seed, _console(stderr=True, quiet=_state["quiet"])
            )
            tasks.requeue(rd.store)
            name = teacher or loaded.config.collect.teachers[0].name
            n = export_requests(rd.store, loaded.config.collect, name, out_path)
    finally:
        rd.close()
    out.print(f"wrote {n} requests to {out_path}; submit it with the OpenAI Batch API, then batch-ingest the results")


@collect_app.command("batch-ingest")
def collect_batch_ingest(
    config: ConfigArg,
    results: Annotated[Path, typer.Argument(help="Batch API output JSONL.", show_default=False)],
) -> None:
    """Store the answers of an OpenAI Batch API results file (reading it twice stores nothing twice)."""
    from distill4all.collect.batch import ingest_results

    loaded, rd = _open_run_store(config)
    try:
        with rd.locked():
            counts = ingest_results(rd.store, loaded.config.collect, results)
    finally:
        rd.close()
    out.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)], as_json: JsonOpt = False
) -> None:
    """Show each stage's state, attempts, time and counts."""
    import json

    from distill4all.config import STAGE_ORDER
    from distill4all.layout import RunLayout
    from distill4all.run import RunDir

    rd = RunDir(run_dir, readonly=True)
    try:
        rows = rd.store.stages()
    finally:
        rd.close()
    configured: list[str] = list(STAGE_ORDER)
    manifest = RunLayout(run_dir).manifest
    if manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {})
        configured = [s for s in STAGE_ORDER if cfg.get(s) is not None]
    if as_json:
        print(
            json.dumps({"run_dir": str(run_dir), "stages": [_stage_json(n, rows.get(n), run_dir) for n in configured]})
        )
        return
    table = Table("stage", "status", "attempts", "started", "time", "counts", title=str(run_dir))
    for name in configured:
        row = rows.get(name)
        if row is None:
            table.add_row(name, "pending", "0", "", "", "")
            continue
        started = datetime.fromtimestamp(row.started_at).strftime("%Y-%m-%d %H:%M:%S") if row.started_at else ""
        table.add_row(
            name,
            _shown_status(row, run_dir),
            str(row.attempts),
            started,
            f"{row.seconds:.1f}s",
            _counts_text(row.counts),
        )
    out.print(table)
    for name in configured:  # why a stage stopped, as `run` said it
        row = rows.get(name)
        if row is not None and row.status == "failed" and row.error:
            out.print(f"{name}: {redact(row.error)}", markup=False, soft_wrap=True)


def _stage_json(name: str, row: Any, run_dir: Path) -> dict[str, Any]:
    """A stage's row as `status --json` prints it; a stage never started is pending."""
    if row is None:
        return {"stage": name, "status": "pending", "attempts": 0}
    return {
        "stage": name, "status": _shown_status(row, run_dir), "attempts": row.attempts, "started_at": row.started_at,
        "finished_at": row.finished_at, "seconds": row.seconds, "counts": row.counts, "costs": row.costs,
        "artifacts": row.artifacts, "error": redact(row.error) if row.error else row.error,
    }  # fmt: skip


def _shown_status(row: Any, run_dir: Path) -> str:
    return "interrupted" if row.status == "running" and _stale(run_dir) else str(row.status)


def _stale(run_dir: Path) -> bool:
    """True when no process holds the run's lock, so a 'running' stage was in fact interrupted."""
    import fcntl
    import os

    from distill4all.layout import RunLayout

    lock = RunLayout(run_dir).lock
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
    """Numeric counts as `key value`; a cost that includes answers without usage says it is estimated."""
    estimated = counts.get("cost_estimated_answers") or 0

    def shown(key: str, value: Any) -> str:
        if key == "cost_usd" and estimated:
            return f"cost_usd ~{value} (estimated: {estimated} answers without usage)"
        return f"{key} {value}"

    numeric = [(k, v) for k, v in counts.items() if isinstance(v, int | float) and k != "cost_estimated_answers"]
    return ", ".join(shown(k, v) for k, v in numeric)


# --- eval --------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="Self-Instruct JSONL (or instruction/input/output lines).")],
    models: Annotated[list[str], typer.Option("--model", help="LABEL=MODEL (name or path); repeat to compare.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for per-item results, summary and figures.")],
    baseline: Annotated[str | None, typer.Option(help="The label the others are tested against.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="A seeded subset of the items.")] = None,
    seed: int = 0,
    metrics: Annotated[str, typer.Option(help="faithful, conditioned, or both (comma-separated).")] = (
        "faithful,conditioned"
    ),
    stride: Annotated[int, typer.Option(min=1)] = 512,
    clip: Annotated[float, typer.Option(min=0.0)] = 100.0,
    force: Annotated[bool, typer.Option("--force", help="Redo an evaluation made with other settings.")] = False,
) -> None:
    """The paper's Self-Instruct ground-truth perplexity (and its corrected form) for several models,
    side by side: per-item JSONL, summary with paired tests, Figure-3 plots. Resumes where it stopped."""
    from distill4all.evaluate.runner import METRICS
    from distill4all.layout import RunLayout

    entries = []
    for m in models:
        label, sep, spec = m.partition("=")
        if not sep or not label or not spec:
            raise UserError(f"--model {m!r}: write LABEL=MODEL, e.g. base=smollm2-135m-instruct")
        entries.append({"name": label, "model": str(Path(spec).resolve()) if Path(spec).exists() else spec})
    chosen = [x.strip() for x in metrics.split(",") if x.strip()]
    if not chosen or any(x not in METRICS for x in chosen):
        raise UserError(f"--metrics must name {' and/or '.join(METRICS)}, not {metrics!r}")
    if baseline is not None and baseline not in {e["name"] for e in entries}:
        raise UserError(f"--baseline {baseline!r} is none of the --model labels")
    section = {"data": [str(data.resolve())], "limit": limit, "include": [], "models": entries, "baseline": baseline,
               "metrics": chosen, "stride": stride, "clip": clip, "out_dir": str(out_dir.resolve())}  # fmt: skip
    loaded = _generated_config("eval", out_dir, section, name="eval", force=force, seed=seed)
    _run_one_stage(loaded, "eval", force)
    summary = json.loads(RunLayout.of(loaded.config).eval.summary.read_text(encoding="utf-8"))
    for metric, per_model in summary["summaries"].items():
        table = Table("model", "median", "mean", "clipped", "NaN", title=f"{metric} perplexity (clip {clip:g})")
        for label, summ in per_model.items():
            table.add_row(
                label,
                f"{summ['median']:.2f}",
                f"{summ['mean']:.2f}",
                f"{summ['share_clipped']:.1%}",
                str(summ["n_nan"]),
            )
        out.print(table)
        for p in summary["paired"].get(metric, []):
            share = f"{p['share_lower']:.0%} of {p['n']} items"
            out.print(f"  {p['model']} < {p['baseline']} on {share} (Wilcoxon one-sided p={p['p_lower']:.3g})")
    out.print(f"results: {out_dir}")


# --- reproducibility ---------------------------------------------------------------------------


@app.command()
def reproduce(
    manifest: Annotated[Path, typer.Argument(help="A manifest.json or a run directory.", show_default=False)],
    run_dir: Annotated[Path | None, typer.Option(help="New run directory (default: <run_dir>-repro).")] = None,
    allow_changed_inputs: Annotated[bool, typer.Option(help="Run even if input files changed.")] = False,
) -> None:
    """Rerun a recorded run from its manifest: same config, seeds and checked inputs, a new run directory."""
    from distill4all.reproduce import prepare_reproduction, read_manifest
    from distill4all.run import run_stages

    recorded = read_manifest(manifest)
    target = run_dir or Path(str(recorded["config"]["run_dir"]) + "-repro")
    plan = prepare_reproduction(manifest, target, allow_changed_inputs=allow_changed_inputs)
    for w in plan.warnings:
        err.print(f"note: {w}", markup=False)
    console = _console(stderr=True, quiet=_state["quiet"])
    run_stages(plan.loaded, console=console, quiet=_state["quiet"])
    out.print(f"reproduced into {target} (config: {plan.config_path})")
    out.print(f"compare: distill4all diff {recorded['config']['run_dir']} {target}")


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="A run directory or manifest.", show_default=False)],
    run_b: Annotated[Path, typer.Argument(help="Another one.", show_default=False)],
) -> None:
    """Show what differs between two runs: config, versions, inputs, stage counts and artifacts."""
    from distill4all.reproduce import diff_manifests, read_manifest

    diffs = diff_manifests(read_manifest(run_a), read_manifest(run_b))
    if not diffs:
        out.print("no differences (besides times and run ids)")
        return
    table = Table("where", str(run_a), str(run_b))
    for d in diffs:
        table.add_row(d.where, _short(d.a), _short(d.b))
    out.print(table)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


# --- one stage at a time -----------------------------------------------------------------------

if TYPE_CHECKING:
    from distill4all.config import LoadedConfig
    from distill4all.run import StageOutcome


def _run_one_stage(
    loaded: LoadedConfig, stage: str, force: bool, options: dict[str, Any] | None = None
) -> StageOutcome:
    """Every single-stage command goes through the runner: skip, resume, refuse and --force mean
    what they mean for `run`."""
    from distill4all.run import run_stages

    console = _console(stderr=True, quiet=_state["quiet"])
    return run_stages(
        loaded, from_stage=stage, until_stage=stage, force=force, console=console, quiet=_state["quiet"],
        options=options, redo_hint="rerun with --force to redo it",
    )[-1]  # fmt: skip


def _stage_of_config(config: Path, stage: str) -> LoadedConfig:
    from distill4all.config import load_config

    loaded = load_config(config)
    if getattr(loaded.config, stage) is None:
        raise UserError(f"{config} has no {stage}: section")
    return loaded


def _generated_config(
    stage: str, run_dir: Path, section: dict[str, Any], *, name: str, force: bool, seed: int = 0
) -> LoadedConfig:
    """A one-stage run config for a command given without a config file. Its record,
    `<run_dir>/<stage>.yaml`, is written when new or with --force, so that a refused rerun keeps
    the record of what was run."""
    from pydantic import ValidationError

    from distill4all import atomic
    from distill4all.config import LoadedConfig, RunConfig, to_yaml
    from distill4all.errors import ConfigError

    data = {"name": name, "run_dir": str(run_dir.resolve()), "seed": seed, stage: section}
    try:
        run_config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            f"{stage}: " + "; ".join(f"{'.'.join(map(str, x['loc'][1:]))}: {x['msg']}" for x in e.errors())
        ) from None
    record = run_dir / f"{stage}.yaml"
    if force or not record.exists():
        written = run_config.model_dump(mode="json", exclude_defaults=True) | {"name": name}
        atomic.write_text(record, f"# written by `distill4all {stage}`\n" + to_yaml(written))
    return LoadedConfig(run_config, record.resolve())


# --- curate ------------------------------------------------------------------------------------


@app.command()
def curate(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run config (YAML: runs its curate stage) or a pairs file (JSONL/Parquet with prompt, "
            "response and optionally source).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory for a pairs file [default: runs/curate-NAME].")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A run config whose curate: section and seed to use.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the curation even if it finished.")] = False,
) -> None:
    """Filter, dedup, map and export a collection: the curate stage alone, on a run or on any pairs file."""
    import json

    from distill4all.layout import RunLayout

    if source.suffix in (".yaml", ".yml"):
        if out_dir is not None or config is not None:
            raise UserError("--out and --config are for a pairs file; a run config names its own run_dir")
        loaded = _stage_of_config(source, "curate")
    else:
        loaded = _pairs_file_config(source, out_dir, config)
    outcome = _run_one_stage(loaded, "curate", force)
    files = RunLayout.of(loaded.config).curate
    report = json.loads(files.report_json.read_text())
    table = Table("step", "dropped", "remaining", title=f"curate: {outcome.action}")
    for step in report["funnel"]:
        table.add_row(step["step"], f"{step['dropped']:,}", f"{step['remaining']:,}")
    out.print(table)
    for s in report["sources"]:
        if s["homogeneous"]:
            out.print(f"homogeneous source {s['source']!r}: {'; '.join(s['reasons'])}")
    for path in (files.train_pairs, files.map_html, files.report_md):
        if path.is_file():
            out.print(f"  {path}")


def _pairs_file_config(pairs: Path, out_dir: Path | None, config: Path | None) -> LoadedConfig:
    """A run config for curating a pairs file, written into its run directory so reruns compare."""
    from distill4all import atomic
    from distill4all.config import load_config, to_yaml
    from distill4all.layout import RunLayout

    if not pairs.is_file():
        raise UserError(f"pairs file not found: {pairs}")
    if pairs.suffix not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"{pairs}: expected a .jsonl or .parquet pairs file, or a .yaml run config")
    stem = pairs.name.split(".")[0]
    out_dir = out_dir or Path("runs") / f"curate-{stem}"
    generated = out_dir / "curate.yaml"
    if RunLayout(out_dir).store.exists() and not generated.exists():
        raise UserError(f"{out_dir} is another run's directory; choose a new --out")
    section: dict[str, Any] = {}
    seed = 0
    if config is not None:
        base = load_config(config)
        section = base.public_dict().get("curate") or {}
        seed = base.config.seed
    section["input"] = str(pairs.resolve())
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in f"curate-{stem}")
    data = {"name": name, "run_dir": ".", "seed": seed, "curate": section}
    atomic.write_text(generated, "# written by `distill4all curate`\n" + to_yaml(data))
    return load_config(generated)


# --- train -------------------------------------------------------------------------------------


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="A run config with a train section; or give --base-model/--data/--out.")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Model name or path (without a config).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="JSONL, JSON array or Parquet pairs or conversations (without a config).")
    ] = None,
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

    from distill4all.config import TrainConfig
    from distill4all.errors import ConfigError
    from distill4all.layout import RunLayout

    overrides = {
        k: v
        for k, v in {
            "template": template, "epochs": epochs, "max_steps": max_steps, "num_processes": num_processes,
            "launcher": launcher, "accelerate_config": accelerate_config,
        }.items()
        if v is not None
    }  # fmt: skip
    if config is not None:
        if base_model or data or out_dir or preset:
            raise UserError("with a config file, set base_model, data and preset in its train section")
        loaded = _stage_of_config(config, "train")
        if overrides:
            assert loaded.config.train is not None
            try:
                loaded.config.train = TrainConfig.model_validate(loaded.config.train.model_dump() | overrides)
            except ValidationError as e:
                raise ConfigError(
                    "train: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                ) from None
    else:
        if not (base_model and data and out_dir):
            raise UserError("without a config file, --base-model, --data and --out are all needed")
        spec = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
        section: dict[str, Any] = {"base_model": spec, "data": str(data.resolve()), **overrides}
        if preset:
            section["preset"] = preset
        loaded = _generated_config("train", out_dir, section, name="train", force=force)
    outcome = _run_one_stage(loaded, "train", force)
    out.print(f"train: {outcome.action}, {_counts_text(outcome.row.counts)}")
    files = RunLayout.of(loaded.config).train
    out.print(f"model: {files.model}")
    out.print(f"loss curve: {files.loss_png}")


# --- models ------------------------------------------------------------------------------------


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the named models: format, size, licence and where they are."""
    from dataclasses import asdict

    from distill4all.models import list_models

    if as_json:
        print(json.dumps([asdict(m) for m in list_models()]))
        return
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


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Model name, HF checkpoint folder or GGUF.", show_default=False)],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="New folder for the pruned checkpoint.", show_default=False)
    ],
    drop_layers: Annotated[int | None, typer.Option(help="Remove this many decoder layers.")] = None,
    keep_fraction: Annotated[float | None, typer.Option(help="Keep this fraction of the layers (rounded).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="JSONL/Parquet pairs to measure on (default: built-in texts).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Pairs drawn from --data.")] = 64,
) -> None:
    """Remove the decoder layers with the lowest block influence (ShortGPT): a smaller student to distil."""
    from distill4all.models.prune import calibration_texts, check_request, prune_depth

    check_request(out_dir, drop_layers, keep_fraction)
    texts = calibration_texts(data, samples)
    with err.status(f"measuring block influence of {model}…") if not _state["quiet"] else contextlib.nullcontext():
        result = prune_depth(model, out_dir, drop_layers=drop_layers, keep_fraction=keep_fraction, texts=texts)
    bi = result.block_influence
    out.print(f"kept layers {result.kept} of {result.layers_before}")
    out.print("dropped layers " + ", ".join(f"{i} (BI {bi[i]:.4f})" for i in result.dropped))
    out.print(f"params {result.params_before / 1e6:.2f}M → {result.params_after / 1e6:.2f}M")
    out.print(f"measured on {result.texts} texts, {result.tokens} tokens")
    out.print(f"model: {out_dir}")


# --- export, chat, serve -----------------------------------------------------------------------

ModelArg = Annotated[
    str, typer.Argument(help="GGUF file, HF checkpoint folder, LoRA adapter folder or model name.", show_default=False)
]
BackendOpt = Annotated[str, typer.Option(help="auto (GGUF → llama.cpp, HF → transformers), llama.cpp or transformers.")]
CtxOpt = Annotated[
    int | None, typer.Option("--n-ctx", min=16, help="Context window in tokens (default: the model's, ≤4096).")
]


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
    system_prompt: Annotated[
        str | None, typer.Option(help="System prompt of the Ollama Modelfile and the GPT4All entry.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo an export made with other settings.")] = False,
) -> None:
    """Export a model to GGUF and quantize it: merge an adapter, write f16/f32, quantize, report."""
    from distill4all.export.exporter import check_source
    from distill4all.layout import ExportLayout, RunLayout

    check_source(model)
    if not RunLayout(out_dir).store.exists() and ExportLayout(out_dir).ggufs():
        raise UserError(f"{out_dir} already holds GGUF files; choose another --out (nothing was overwritten)")
    spec = str(Path(model).resolve()) if Path(model).exists() else model
    section = {"model": spec, "quantizations": quant or ["q4_0"], "base_type": base_type, "compat": compat,
               "pre_tokenizer": pre_tokenizer, "report": report, "out_dir": str(out_dir.resolve()),
               **({"system_prompt": system_prompt} if system_prompt is not None else {})}  # fmt: skip
    loaded = _generated_config("export", out_dir, section, name="export", force=force)
    outcome = _run_one_stage(loaded, "export", force)
    for artifact in outcome.row.artifacts:
        if artifact.endswith(".gguf"):
            out.print(str(out_dir / artifact))


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = CHAT_SAMPLING.max_tokens,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = CHAT_SAMPLING.temperature,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = CHAT_SAMPLING.top_p,
    top_k: Annotated[int, typer.Option(min=0, help="0 is off.")] = CHAT_SAMPLING.top_k,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = CHAT_SAMPLING.min_p,
    repeat_penalty: Annotated[float, typer.Option(min=0.0)] = CHAT_SAMPLING.repeat_penalty,
    seed: Annotated[int | None, typer.Option(help="Fixed seed for reproducible sampling.")] = CHAT_SAMPLING.seed,
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
    read_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request body may stall before a 408.")] = 30.0,
    backend: BackendOpt = "auto",
    n_ctx: CtxOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    from distill4all.runtime import server

    engine = _load_engine(model, backend, n_ctx)
    model_id = model_name or engine.name
    auth = "an API key is required" if api_key else "no API key"
    err.print(f"serving {model_id} ({engine.backend}) at http://{host}:{port}/v1 — {auth}; Ctrl-C stops")
    try:
        server.serve(engine, host=host, port=port, api_key=api_key, model_id=model_id, max_queue=max_queue,
                     read_timeout=read_timeout, quiet=_state["quiet"])  # fmt: skip
    finally:
        engine.close()


# --- entry point -------------------------------------------------------------------------------


_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.ELOOP,
                             errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM})  # fmt: skip


def _fault_line(e: BaseException) -> str | None:
    """The line for an error of the machine rather than of distill4all (a full or failing disk, a
    read-only file system, a symlink loop), or None. When it was raised while an earlier user's or
    machine's error was being handled (a full disk fails the stage, then its manifest too), the
    earliest that names its file is the cause, and reported."""

    def line(x: BaseException) -> tuple[str, bool] | None:  # (the line, whether it names the file)
        if isinstance(x, UserError):
            return str(x), True
        if isinstance(x, OSError) and x.errno in _MACHINE_ERRNOS:
            if x.filename:
                return f"{x.filename}: {x.strerror}", True
            return f"a file could not be written or read: {x.strerror}", False
        return None

    found: str | None = None
    node: BaseException | None = e
    while node is not None and (seen := line(node)) is not None:
        if seen[1] or found is None:
            found = seen[0]
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    return found


def main(argv: list[str] | None = None) -> None:
    import os

    from distill4all import offline_defaults

    offline_defaults()
    # Progress is shown with rich; libraries' tqdm bars (transformers, datasets) would interleave.
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: click itself reports usage errors (exit 2) and exits via SystemExit.
        app(args=args, prog_name="distill4all")
    except UserError as e:
        if debug:
            _traceback_exit(2)
        print(f"error: {redact(str(e))}", file=sys.stderr)
        sys.exit(2)
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a path the user named (or its folder) is a file where a folder must be, or not writable
        if debug:
            _traceback_exit(2)
        what = {
            FileExistsError: "a file is there, where a folder must be",
            NotADirectoryError: "a file is in its path, where a folder must be",
            IsADirectoryError: "it is a folder, not a file",
        }.get(type(e), e.strerror)
        print(f"error: cannot write {e.filename or 'a file'}: {what or e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if debug:
            _traceback_exit(2 if _fault_line(e) is not None else 1)
        if (fault := _fault_line(e)) is not None:  # the machine's doing (a full disk…), not a bug
            print(f"error: {redact(fault)}", file=sys.stderr)
            sys.exit(2)
        print(f"internal error: {type(e).__name__}: {redact(str(e))} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)


def _traceback_exit(code: int) -> NoReturn:
    """--debug: the traceback of the error being handled, with secrets masked as in the one-line
    form (a teacher's echoed key can sit in any exception's text), then exit."""
    import traceback

    print(redact(traceback.format_exc()), file=sys.stderr, end="")
    sys.exit(code)
