"""The run directory's layout: every path a stage, the runner, the report or the CLI reads or writes
is named here once (docs/architecture.md has the table).

    store.sqlite  manifest.json  .lock  archive/
    collect/   pairs.jsonl, teacher-NAME.log (a local teacher's server log, by teacher.connect)
    curate/    train.jsonl (+ .parquet, .messages.jsonl), split/, report.json, report.md, map.html, map-*.png,
               README.md (the dataset card)
    train/     student/, data/, teacher/, checkpoints/, job.json, metrics.jsonl, loss.png, model/, summary.json
    export/    model-KIND.gguf, model-KIND.Modelfile, gpt4all.json, README.md, merged/, quant_report.json
               (export.out_dir moves this folder)
    eval/      perplexity-LABEL.jsonl, summary.json, figure3-METRIC.png, judge.sqlite
    report/    index.html, chats.json, speed.json

A stage's folder is `<run_dir>/<stage>` unless its config section has an `out_dir` (the one-stage
`export` and `eval` commands write their files straight into `--out`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill4all.config import RunConfig


@dataclass(frozen=True)
class CollectLayout:
    dir: Path

    @property
    def pairs(self) -> Path:
        return self.dir / "pairs.jsonl"


@dataclass(frozen=True)
class CurateLayout:
    dir: Path

    @property
    def train_pairs(self) -> Path:
        """The kept pairs, GPT4All JSONL: what train reads by default."""
        return self.dir / "train.jsonl"

    @property
    def report_json(self) -> Path:
        return self.dir / "report.json"

    @property
    def report_md(self) -> Path:
        return self.dir / "report.md"

    @property
    def map_html(self) -> Path:
        return self.dir / "map.html"

    @property
    def card(self) -> Path:
        """The dataset card (README.md): licence, sources, teachers and their terms, the funnel."""
        return self.dir / "README.md"

    def map_png(self, color: str) -> Path:
        return self.dir / f"map-{color}.png"


@dataclass(frozen=True)
class TrainLayout:
    dir: Path

    @property
    def data(self) -> Path:
        """Tokenized splits, tokenizer and meta.json, prepared once."""
        return self.dir / "data"

    @property
    def data_meta(self) -> Path:
        return self.data / "meta.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def job(self) -> Path:
        return self.dir / "job.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def loss_png(self) -> Path:
        return self.dir / "loss.png"

    @property
    def model(self) -> Path:
        """The result: a PEFT adapter (or full weights) with the tokenizer and its chat template."""
        return self.dir / "model"

    @property
    def summary(self) -> Path:
        """Written last: its presence means training finished."""
        return self.dir / "summary.json"

    def fixed_outputs(self) -> list[Path]:
        """What the training processes write (not only this one, so not all by atomic writes)."""
        return [self.data, self.student, self.dir / "teacher", self.checkpoints, self.job, self.metrics,
                self.loss_png, self.model, self.summary]  # fmt: skip

    @property
    def student(self) -> Path:
        """base_model pruned (train.prune): the checkpoint that is trained."""
        return self.dir / "student"

    def teacher(self, split: str) -> Path:
        """The teacher's top-k at every target of a split (distillation with a local teacher)."""
        return self.dir / "teacher" / split


@dataclass(frozen=True)
class ExportLayout:
    dir: Path

    def gguf(self, kind: str) -> Path:
        """`kind` is a quantization (q4_0, q8_0, …) or the base type (f16, f32)."""
        return self.dir / f"model-{kind}.gguf"

    def ggufs(self) -> list[Path]:
        return sorted(self.dir.glob("model-*.gguf"))

    @property
    def merged(self) -> Path:
        """A LoRA adapter merged into its base model, the checkpoint the GGUF files are made from."""
        return self.dir / "merged"

    @property
    def quant_report(self) -> Path:
        return self.dir / "quant_report.json"

    def modelfile(self, gguf: Path) -> Path:
        """The Ollama Modelfile of one GGUF file (`ollama create NAME -f model-q4_0.Modelfile`)."""
        return gguf.with_suffix(".Modelfile")

    @property
    def gpt4all(self) -> Path:
        """The GPT4All app's model-list entries (models3.json format) of the GGUF files."""
        return self.dir / "gpt4all.json"

    @property
    def card(self) -> Path:
        """The model card of the GGUF files."""
        return self.dir / "README.md"

    def planned(self, kinds: Sequence[str]) -> list[Path]:
        """Every file an export of these GGUF kinds may write, claimed before it starts, so that a
        user's file at one of these names stops it before any work rather than after."""
        ggufs = [self.gguf(k) for k in kinds]
        return [*ggufs, *map(self.modelfile, ggufs), self.merged, self.quant_report, self.gpt4all, self.card]


@dataclass(frozen=True)
class EvalLayout:
    dir: Path

    def items(self, label: str) -> Path:
        """One model's per-item scores."""
        return self.dir / f"perplexity-{label}.jsonl"

    def all_items(self) -> list[Path]:
        return sorted(self.dir.glob("perplexity-*.jsonl"))

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    def figure(self, metric: str) -> Path:
        return self.dir / f"figure3-{metric}.png"

    @property
    def judge_store(self) -> Path:
        """The judge's own request ledger, apart from the training data's store."""
        return self.dir / "judge.sqlite"

    @property
    def judge_files(self) -> list[Path]:
        """The judge's store with SQLite's journal files beside it."""
        return [self.judge_store, *(self.judge_store.with_name(f"judge.sqlite-{s}") for s in ("wal", "shm", "journal"))]


@dataclass(frozen=True)
class RunLayout:
    root: Path
    export_dir: Path | None = None  # None: root / "export"
    eval_dir: Path | None = None  # None: root / "eval"

    @classmethod
    def of(cls, config: RunConfig) -> RunLayout:
        return cls(
            config.run_dir,
            export_dir=config.export.out_dir if config.export is not None else None,
            eval_dir=config.eval.out_dir if config.eval is not None else None,
        )

    @classmethod
    def read(cls, run_dir: Path) -> RunLayout:
        """The layout of an existing run, from its manifest's config (for readers without the config)."""
        import json

        try:
            config = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("config") or {}
        except (OSError, ValueError):
            config = {}

        def folder(stage: str) -> Path | None:
            section = config.get(stage)
            value = section.get("out_dir") if isinstance(section, dict) else None
            return Path(value) if isinstance(value, str) else None

        return cls(run_dir, export_dir=folder("export"), eval_dir=folder("eval"))

    @property
    def store(self) -> Path:
        return self.root / "store.sqlite"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def archive(self) -> Path:
        """Stores set aside by `collect --force`: paid answers are never thrown away."""
        return self.root / "archive"

    def run_files(self) -> list[Path]:
        """The runner's own files, which no stage claims (a stage's folder may be the run directory)."""
        return [self.store, self.store.with_name("store.sqlite-wal"), self.store.with_name("store.sqlite-shm"),
                self.manifest, self.lock, self.archive, self.report_dir]  # fmt: skip

    def fixed_outputs(self, stage: str) -> list[Path]:
        """Paths a stage writes that are claimed when it starts; all others are claimed as written."""
        if stage == "train":
            return self.train.fixed_outputs()
        if stage == "collect":
            return [self.collect.pairs]
        return []

    def stage_dir(self, stage: str) -> Path:
        if stage == "export" and self.export_dir is not None:
            return self.export_dir
        if stage == "eval" and self.eval_dir is not None:
            return self.eval_dir
        return self.root / stage

    @property
    def collect(self) -> CollectLayout:
        return CollectLayout(self.stage_dir("collect"))

    @property
    def curate(self) -> CurateLayout:
        return CurateLayout(self.stage_dir("curate"))

    @property
    def train(self) -> TrainLayout:
        return TrainLayout(self.stage_dir("train"))

    @property
    def export(self) -> ExportLayout:
        return ExportLayout(self.stage_dir("export"))

    @property
    def eval(self) -> EvalLayout:
        return EvalLayout(self.stage_dir("eval"))

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_page(self) -> Path:
        return self.report_dir / "index.html"

    @property
    def report_chats(self) -> Path:
        """Sample answers of the run's model, cached until the model changes."""
        return self.report_dir / "chats.json"

    @property
    def report_speed(self) -> Path:
        """The decode speeds the report's student section measured, with the files they are of."""
        return self.report_dir / "speed.json"
