"""One export, start to end: (merge) → GGUF f32/f16 → quantized GGUFs → quantization report.

Each output file is written atomically and an existing one is kept, so an export killed at any
moment picks up where it stopped when run again. Used by the `export` stage and the CLI.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.config import ExportConfig
from distill4all.errors import ExportError, ModelError
from distill4all.export import runtimes
from distill4all.export.cards import export_card, merged_card, read_evals, source_provenance
from distill4all.export.families import Hparams
from distill4all.export.gguf import COMPAT_PRE_TOKENIZERS, chat_token_difference, check_compat, write_gguf
from distill4all.export.merge import is_adapter, merge_adapter
from distill4all.export.quant_report import REPORT_TEXTS, QuantRow, quant_report, report_table
from distill4all.export.quantize import quantize
from distill4all.layout import ExportLayout
from distill4all.models import BUILTINS, resolve_model


@dataclass
class ExportOutcome:
    files: list[Path]  # the GGUF files, unquantized first
    merged: Path | None  # the merged HF checkpoint, when an adapter was merged
    report: list[QuantRow] = field(default_factory=list)
    pre_tokenizer: str = ""  # the name written into the files
    compat_checked_tokens: int = 0  # tokens of the probe text both pre-tokenizer names split alike
    chat_tokens: str | None = None  # how llama.cpp's chat-prompt tokens differ from training's, if they do
    runtimes: str | None = None  # why no Modelfile / GPT4All entry was written, if none was
    license: str = ""  # the licence written into the files and cards


def check_source(spec: str) -> None:
    """Fail early, before anything is written, on a model that is neither a path nor a name."""
    if spec not in BUILTINS and not Path(spec).expanduser().exists():
        raise ModelError(f"model {spec!r} is neither a path that exists nor a known name ({', '.join(BUILTINS)})")


def source_checkpoint(spec: str, out_dir: Path, card: Any = None) -> tuple[Path, Path | None]:
    """The HF checkpoint to convert: a merged adapter (with `card`), an HF folder, or a GGUF's HF form."""
    path = Path(spec).expanduser()
    if is_adapter(path):
        merged = ExportLayout(out_dir).merged
        if not (merged / "config.json").is_file():
            merge_adapter(path, merged, card)
        return merged, merged
    return resolve_model(spec, want="hf").path, None


def export_model(
    spec: str,
    out_dir: Path,
    cfg: ExportConfig,
    *,
    console: Console | None = None,
    quiet: bool = False,
    eval_summary: Path | None = None,
) -> ExportOutcome:
    """`eval_summary`: the run's eval/summary.json, whose numbers the folder's card quotes when it exists."""
    console = console or Console(stderr=True, quiet=quiet)
    files = ExportLayout(out_dir)
    kinds = [cfg.base_type, *[q for q in cfg.quantizations if q != cfg.base_type]]
    for path in files.planned(kinds):  # a user's file at one of these names stops it here, not later
        atomic.claim(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything that can reject the input happens before the progress bar starts.
    with console.status(f"reading {spec}…") if not quiet else contextlib.nullcontext():
        provenance, source_url = source_provenance(spec)
        hf_dir, merged = source_checkpoint(spec, out_dir, merged_card(provenance))
        model_name = Hparams.from_config(hf_dir).model_name  # also refuses what cannot be exported, early
        layout, why_not = _turn_layout(hf_dir, cfg.system_prompt)
    steps = len(kinds) + (len(REPORT_TEXTS) if cfg.report else 0)
    with Progress(
        TextColumn("export · {task.fields[step]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    ) as bar:
        task = bar.add_task("export", total=steps, step="")
        base = files.gguf(cfg.base_type)
        bar.update(task, step=f"writing {base.name}")
        outcome = ExportOutcome(files=[base], merged=merged, runtimes=why_not, license=provenance.license)
        if not base.is_file():
            write_gguf(hf_dir, base, cfg.base_type, pre_tokenizer=cfg.pre_tokenizer, compat=cfg.compat,
                       provenance=provenance, source_url=source_url)  # fmt: skip
        outcome.pre_tokenizer = _pre_name(base)
        outcome.chat_tokens = chat_token_difference(base, hf_dir)
        if outcome.chat_tokens:
            console.print(f"[yellow]warning:[/] {escape(outcome.chat_tokens)}")
        bar.advance(task)

        if cfg.compat and outcome.pre_tokenizer in COMPAT_PRE_TOKENIZERS.values():
            original = next(k for k, v in COMPAT_PRE_TOKENIZERS.items() if v == outcome.pre_tokenizer)
            with atomic.scratch_dir(out_dir, "compat") as work:
                outcome.compat_checked_tokens = check_compat(hf_dir, original, outcome.pre_tokenizer, work)

        for kind in kinds[1:]:
            target = files.gguf(kind)
            bar.update(task, step=f"quantizing {target.name}")
            if not target.is_file():
                quantize(base, target, kind)
            outcome.files.append(target)
            bar.advance(task)

        if cfg.report:
            bar.update(task, step="measuring the quantization report")
            outcome.report = quant_report(base, outcome.files, on_text=lambda: bar.advance(task))
            rows = [r.as_dict() for r in outcome.report]
            atomic.write_json(files.quant_report, {"reference": base.name, "rows": rows})
    if layout is not None:
        write_runtime_files(files, outcome.files, layout, cfg.system_prompt, name=model_name)
    elif why_not:
        console.print(f"[yellow]warning:[/] no Modelfile or GPT4All entry: {escape(why_not)}")
    evals = read_evals(eval_summary)
    card = export_card(provenance, outcome.files, evals=evals, runtimes=layout is not None)
    atomic.write_text(files.card, str(card))
    if outcome.report and not quiet:
        console.print(report_table(outcome.report, title=f"quantization report (vs {base.name})"))
    return outcome


def _turn_layout(hf_dir: Path, system_prompt: str | None) -> tuple[runtimes.TurnLayout | None, str | None]:
    """The chat template cut for the Modelfile and GPT4All entry, or why it cannot be. A system
    prompt the template cannot take is an error: the setting would be ignored."""
    from transformers import AutoTokenizer

    from distill4all.models.registry import quiet_hf

    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    try:
        layout = runtimes.turn_layout(tok)
    except ExportError as e:
        if system_prompt is not None:
            raise ExportError(f"export.system_prompt cannot be written: {e}") from None
        return None, str(e)
    layout.check_system(system_prompt)
    return layout, None


def write_runtime_files(
    files: ExportLayout, ggufs: list[Path], layout: runtimes.TurnLayout, system_prompt: str | None, *, name: str
) -> None:
    """A Modelfile beside each GGUF, and the GPT4All model-list entries of them all."""
    entries = []
    for gguf_file in ggufs:
        atomic.write_text(files.modelfile(gguf_file), runtimes.modelfile(gguf_file.name, layout, system_prompt))
        kind = gguf_file.stem.removeprefix("model-")
        entries.append(runtimes.gpt4all_entry(gguf_file, layout, system_prompt, name=f"{name} {kind}", quant=kind))
    atomic.write_json(files.gpt4all, entries)


def _pre_name(path: Path) -> str:
    import gguf

    field_ = gguf.GGUFReader(path).get_field("tokenizer.ggml.pre")
    if field_ is None:
        raise ExportError(f"{path} has no tokenizer.ggml.pre; delete it and export again")
    return str(field_.contents())
