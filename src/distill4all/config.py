"""The run config: one YAML file describes a whole run. This module is the only place defaults live.

Loading does four things in order: parse YAML (keeping each key's line), interpolate `${VAR}` /
`${VAR:-default}` from the environment, validate with pydantic (unknown keys are errors), and
resolve relative paths against the config file's folder. Errors name the key path and YAML line.

Secrets never leave the process: `public_dict()` puts the original `${VAR}` text back wherever
interpolation happened and masks `SecretStr` fields, and it is that form which is hashed, shown
and written to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from distill4all.errors import ConfigError

STAGE_ORDER: tuple[str, ...] = ("collect", "curate", "train", "export", "eval")
"""Stages in pipeline order."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- collect -----------------------------------------------------------------------------------

SourceFormat = Literal["jsonl", "json", "csv", "parquet", "oig_chip2", "stackoverflow", "p3", "hf"]


class SourceConfig(Section):
    """A prompt source. `name` becomes the `source` tag of every prompt taken from it.

    Formats: `oig_chip2` (LAION OIG JSONL, `text` with `<human>:`/`<bot>:` turns), `stackoverflow`
    (CSV/Parquet with title, HTML body, tags), `p3` (JSONL/Parquet with `inputs`/`targets`), generic
    `jsonl`/`json`/`csv`/`parquet` (the prompt in `field`), or `hf` (a Hugging Face dataset by name,
    only when a hub is reachable).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    format: SourceFormat = "jsonl"
    path: Path | None = None
    dataset: str | None = Field(None, description="hf: the dataset name, e.g. laion/OIG")
    subset: str | None = Field(None, description="hf: the dataset's config name")
    split: str = "train"
    field: str | None = Field(None, description="the prompt's field; default per format (generic: prompt)")
    limit: int | None = Field(None, ge=1, description="take at most this many prompts (a seeded sample)")
    fraction: float | None = Field(None, gt=0, le=1, description="take this share of prompts (seeded)")
    seed: int | None = Field(None, description="sampling seed; default: the run's seed")
    min_chars: int = Field(1, ge=1)
    max_chars: int | None = Field(None, ge=1)
    on_error: Literal["fail", "skip"] = Field("fail", description="a malformed row fails the run or is skipped")

    @model_validator(mode="after")
    def _where_from(self) -> SourceConfig:
        if self.format == "hf":
            if not self.dataset:
                raise ValueError("format hf needs `dataset` (e.g. laion/OIG)")
        elif self.path is None:
            raise ValueError(f"format {self.format} needs `path`")
        return self


class Price(Section):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


def _default_prices() -> dict[str, Price]:
    # Public list prices (USD per 1M tokens). GPT-3.5-Turbo cost $2/1M in March 2023, when the
    # paper collected its data; set `price` on a teacher to reproduce that.
    return {
        "gpt-3.5-turbo": Price(input=0.50, output=1.50),
        "gpt-4o-mini": Price(input=0.15, output=0.60),
        "gpt-4o": Price(input=2.50, output=10.00),
        "gpt-4.1-mini": Price(input=0.40, output=1.60),
        "gpt-4.1": Price(input=2.00, output=8.00),
    }


class TeacherConfig(Section):
    """Who answers: an OpenAI-compatible endpoint (`base_url`), or a local model that distill4all
    serves itself on 127.0.0.1 for the duration of the stage (no `base_url`)."""

    name: str = Field("teacher", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1, description="the API's model id; or, without base_url, a local model")
    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1")
    api_key: SecretStr | None = Field(None, description="write ${OPENAI_API_KEY}; never stored")
    system_prompt: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)
    samples: int = Field(1, ge=1, description="answers per prompt (each its own request and seed)")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="passed through in each request")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    price: Price | None = Field(None, description="default: collect.prices[model], else free")
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="counts the tokens of answers that come without usage (their cost then estimated): a local "
        "model folder, GGUF or model name; unset: `model` when it is one, else ~4 characters a token",
    )
    logprobs: int | None = Field(
        None, ge=1, description="keep the top-K logprobs of every answer token (asks logprobs + top_logprobs: K)"
    )
    require_logprobs: bool = Field(
        True, description="an endpoint that returns no logprobs stops the stage; false: collect without them"
    )
    max_retry_wait_s: float = Field(
        600.0, gt=0, description="a teacher that asks to wait longer (Retry-After, x-ratelimit-reset-*) stops the "
        "stage unfinished (exit 2), to be rerun later, instead of waiting",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_kind_of_credentials(self) -> TeacherConfig:
        """`user:password@` in base_url is sent as HTTP Basic auth; with an api_key too a request would
        need two Authorization headers, so the pair is refused rather than one silently dropped."""
        from urllib.parse import urlsplit

        from distill4all import redact

        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        if self.base_url is not None and "@" in urlsplit(self.base_url).netloc and key:
            raise ValueError(
                "base_url carries user:password@ (sent as HTTP Basic auth) and api_key is set (sent as a Bearer "
                "token): a request carries one Authorization; keep one of them"
            )
        # every error recorded or shown from now on is cleared of these (redact.py)
        redact.remember_url(self.base_url)
        redact.remember(key)
        return self

    @model_validator(mode="after")
    def _logprobs_within_the_endpoint_cap(self) -> TeacherConfig:
        from urllib.parse import urlsplit

        k = self.logprobs
        if k is None:
            return self
        host = urlsplit(self.base_url or "").hostname or ""
        if host == "api.openai.com" and k > 20:
            raise ValueError(f"logprobs {k}: OpenAI (api.openai.com) returns at most 20 top_logprobs a token")
        if self.base_url is None and k > 128:  # runtime.server.MAX_TOP_LOGPROBS
            raise ValueError(f"logprobs {k}: a local teacher (distill4all serve) returns at most 128 top_logprobs")
        return self


class CollectConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    teachers: list[TeacherConfig] = Field(min_length=1)
    prices: dict[str, Price] = Field(default_factory=_default_prices)
    max_cost_usd: float | None = Field(None, gt=0, description="stop cleanly once this much is spent")
    batch_size: int = Field(64, ge=1, description="at most this many answers per store transaction")

    @field_validator("sources", "teachers")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        names = [i.name for i in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"names must be unique, repeated: {', '.join(dupes)}")
        return items

    def price_of(self, teacher: TeacherConfig) -> Price:
        if teacher.price is not None:
            return teacher.price
        if teacher.base_url is None:
            return Price(input=0, output=0)  # a local model costs nothing per token
        return self.prices.get(teacher.model, Price(input=0, output=0))


# --- curate ------------------------------------------------------------------------------------


FILTER_RULES: tuple[str, ...] = (
    "failure.empty", "failure.api", "failure.malformed", "refusal", "truncated.length", "truncated.mid-sentence",
    "truncated.code-fence", "malformed.fence", "malformed.json", "malformed.mojibake", "malformed.echo",
    "malformed.repetition", "length.short", "length.long", "language", "truncated.reasoning", "reasoning.no-answer",
)  # fmt: skip
"""Every filter rule; `filters.disable` takes these or a family (the part before the dot)."""


class CurateFiltersConfig(Section):
    """Thresholds of the failure and malformed-answer filters (see docs/curate.md)."""

    disable: list[str] = Field(default_factory=list, description="rules or families to skip")
    refusal_phrases: list[str] = Field(default_factory=list, description="added to the built-in phrases")
    truncation_min_words: int = Field(12, ge=1, description="judge 'ends mid-sentence' from this length")
    repetition_min_words: int = Field(30, ge=1, description="judge repetition loops from this length")
    max_dup_ngram_chars: float = Field(0.3, gt=0, le=1, description="share of text in repeated 5-grams")
    max_top_bigram_chars: float = Field(0.25, gt=0, le=1, description="share of text in the top 2-gram")
    max_dup_line_chars: float = Field(0.3, gt=0, le=1, description="share of text in repeated lines")
    echo_min_words: int = Field(4, ge=1, description="an answer starting with the whole prompt of this length")
    min_response_words: int = Field(1, ge=0)
    max_response_chars: int = Field(20_000, ge=1)
    max_prompt_chars: int = Field(20_000, ge=1)
    languages: list[str] = Field(default_factory=list, description="ISO 639-1 codes to keep, e.g. [en]")
    language_min_chars: int = Field(40, ge=1, description="shorter answers are not language-checked")

    @field_validator("disable")
    @classmethod
    def _known_rules(cls, items: list[str]) -> list[str]:
        families = {r.split(".")[0] for r in FILTER_RULES}
        unknown = [i for i in items if i not in FILTER_RULES and i not in families]
        if unknown:
            raise ValueError(f"unknown rule {unknown[0]!r}; rules: {', '.join(FILTER_RULES)}")
        return items

    @field_validator("refusal_phrases")
    @classmethod
    def _words_in_phrases(cls, items: list[str]) -> list[str]:
        if any(not p.strip() for p in items):
            raise ValueError("a refusal phrase is empty: it would match every answer")
        return items


DedupScope = Literal["prompt", "pair"]


def _dedup_pairs() -> list[DedupScope]:
    return ["pair"]


class CurateDedupConfig(Section):
    exact: bool = Field(True, description="normalized-hash duplicates")
    near: bool = Field(True, description="MinHash LSH near-duplicates")
    scope: list[DedupScope] = Field(
        default_factory=_dedup_pairs,
        description="pair: the same prompt and answer; prompt: the same prompt (distinct answers kept, see "
        "prompt_answer_threshold)",
    )
    prompt_answer_threshold: float = Field(
        0.5, ge=0, le=1, description="with scope prompt: pairs whose prompts repeat are duplicates only when "
        "their answers are this similar (MinHash Jaccard); 0 keeps one answer per prompt",
    )  # fmt: skip
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word shingles")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(5, ge=1)
    semantic: bool = Field(False, description="also drop pairs whose embeddings are this close (faiss)")
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity")


class CurateEmbedConfig(Section):
    model: str = Field(
        "minilm-static",
        min_length=1,
        description="minilm-static (model2vec distillate, fast), minilm (all-MiniLM-L6-v2), or a model path",
    )
    batch_size: int = Field(256, ge=1)
    max_chars: int = Field(1000, ge=16, description="pair text cut to this length (MiniLM reads 256 tokens)")


class CurateMapConfig(Section):
    enabled: bool = True
    method: Literal["tsne", "umap", "pacmap"] = "tsne"
    max_points: int = Field(20_000, ge=10, description="pairs on the map (and projected): a seeded sample beyond this")
    perplexity: float = Field(30.0, gt=1)
    topics: int = Field(0, ge=0, description="coarse topics; 0 picks from the data size")
    subtopics: int = Field(0, ge=0, description="fine topics; 0 picks from the data size")


class CurateDiversityConfig(Section):
    """When a source counts as homogeneous: `min_reasons` of the signals below at once."""

    sample: int = Field(1000, ge=10, description="texts per source that the metrics are measured on")
    min_pairs: int = Field(30, ge=1, description="smaller sources are measured but never flagged")
    min_reasons: int = Field(2, ge=1)
    short_answer_share: float = Field(0.5, ge=0, le=1, description="share of answers of ≤3 tokens")
    prompt_gzip_ratio: float = Field(0.31, ge=0, le=1, description="prompts compress below this ratio")
    response_gzip_ratio: float = Field(0.25, ge=0, le=1)
    prompt_distinct_2: float = Field(0.6, ge=0, le=1, description="distinct bigrams per bigram below this")
    near_dup_rate: float = Field(0.3, ge=0, le=1, description="share of pairs in near-duplicate clusters")
    template_share: float = Field(0.8, ge=0, le=1, description="share of prompts that follow a template")
    neighbour_distance: float = Field(0.6, ge=0, le=2, description="below this share of all sources' median")
    cluster_concentration: float = Field(0.95, ge=0, le=1, description="share in its 3 largest subtopics")


class CurateDecontamConfig(Section):
    """Keep evaluation items out of the training data (see docs/curate.md)."""

    enabled: bool = True
    data: list[Path] = Field(
        default_factory=list, description="eval item files to check against; empty: the run's eval data"
    )
    ngram: int = Field(13, ge=4, le=50, description="words in a shared n-gram (GPT-3 and lm-eval use 13)")
    min_words: int = Field(8, ge=3, description="an eval text shorter than ngram matches whole from this length")
    semantic_threshold: float | None = Field(
        0.95, gt=0, le=1, description="cosine of a pair's and an item's embeddings that counts as a copy; null: off"
    )
    action: Literal["drop", "flag"] = Field("drop", description="drop matching pairs, or keep them and report")


class CurateConfig(Section):
    input: Path | None = Field(None, description="a pairs file (JSONL/Parquet: prompt, response, source)")
    import_teacher: str = Field("import", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    malformed: Literal["error", "drop"] = Field(
        "error", description="an input row that is not text: a file:line error, or dropped (the original clean.py)"
    )
    exclude_sources: list[str] = Field(default_factory=list)
    auto_exclude_homogeneous: bool = True
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    workers: int = Field(0, ge=0, description="processes for the filters; 0 = one per CPU")
    filters: CurateFiltersConfig = Field(default_factory=CurateFiltersConfig)
    dedup: CurateDedupConfig = Field(default_factory=CurateDedupConfig)
    embed: CurateEmbedConfig = Field(default_factory=CurateEmbedConfig)
    map: CurateMapConfig = Field(default_factory=CurateMapConfig)
    diversity: CurateDiversityConfig = Field(default_factory=CurateDiversityConfig)
    decontaminate: CurateDecontamConfig = Field(default_factory=CurateDecontamConfig)
    reasoning: Literal["answer", "with-reasoning"] = Field(
        "answer",
        description="what training sees of a reasoning teacher's pairs: the answer, or the reasoning in "
        "<think>…</think> before it; the reasoning is kept in the curated files either way",
    )


# --- train -------------------------------------------------------------------------------------


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="module names (the paper: q_proj, v_proj; Phi-3's are fused: qkv_proj, gate_up_proj), "
        "or [all-linear]",
    )


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # gpt4all-lora as released (TRAINING_LOG.md of nomic-ai/gpt4all, March 2023): 8 GPUs x 4.
    "paper-lora": {
        "method": "lora",
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "learning_rate": 5e-5, "global_batch_size": 32, "micro_batch_size": 4, "epochs": 4,
        "max_length": 1024, "warmup_steps": 100, "schedule": "constant", "weight_decay": 0.0,
    },
    # The full fine-tune of the same log: 8 GPUs x 32, gradient checkpointing on.
    "paper-full": {
        "method": "full",
        "learning_rate": 5e-5, "global_batch_size": 256, "micro_batch_size": 32, "epochs": 2,
        "max_length": 1024, "warmup_steps": 100, "schedule": "constant", "weight_decay": 0.0,
        "gradient_checkpointing": True,
    },
}  # fmt: skip
"""Named bundles of train settings; keys written next to `preset` override the preset's."""

ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


class PruneConfig(Section):
    """Start the student from `base_model` pruned in depth: the decoder layers with the lowest block
    influence, measured on the run's own training texts, are removed (docs/train.md)."""

    drop_layers: int | None = Field(None, ge=1, description="remove this many decoder layers")
    keep_fraction: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the layers")
    samples: int = Field(64, ge=1, description="training pairs the influence is measured on (seeded)")

    @model_validator(mode="after")
    def _one_amount(self) -> PruneConfig:
        if (self.drop_layers is None) == (self.keep_fraction is None):
            raise ValueError("set exactly one of drop_layers and keep_fraction")
        return self


class DistillConfig(Section):
    """Knowledge distillation: train the student on the teacher's distribution over the next token
    (its top-k), mixed with the usual cross-entropy on the answer, on the same response-only mask.

    The teacher's top-k comes from the answers themselves when collect stored their logprobs
    (`collect.teachers[].logprobs`), matched to the student's tokens by their bytes; else from a
    local model with the student's tokenizer, run once over the training texts before training.
    Both are cached in the run directory (train/teacher/)."""

    source: Literal["auto", "collected", "local"] = Field(
        "auto",
        description="collected: the answers' stored logprobs; local: the `teacher` model run over the texts; "
        "auto: collected when the training answers carry logprobs, else local",
    )
    teacher: str | None = Field(
        None, min_length=1, description="the local teacher, a model name or path; default: train.base_model"
    )
    top_k: int = Field(
        64,
        ge=1,
        le=262_144,
        description="teacher tokens kept per position: at most what was collected; a local teacher's whole "
        "vocabulary keeps its full distribution (6 bytes a token a position, on disk)",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: β=0.5"
    )
    tail: Literal["renormalize", "rest"] = Field(
        "renormalize",
        description="renormalize: the teacher's top-k renormalized to sum to 1; rest: the mass outside the "
        "top-k kept as one more bucket (forward_kl only)",
    )
    temperature: float = Field(1.0, gt=0, description="both distributions softened by it; the loss scaled by T²")
    weight: float = Field(0.5, ge=0, le=1, description="loss = (1 - weight) x cross-entropy + weight x KD")
    min_aligned: float = Field(
        0.95,
        ge=0,
        le=1,
        description="the share that must align, else KD is refused: of the answer tokens, whose bytes the "
        "student's tokens must match (collected), or of the student's vocabulary, same ids (local)",
    )
    batch_tokens: int = Field(4096, ge=1, description="tokens per teacher forward pass when computing its top-k")

    @model_validator(mode="after")
    def _rest_bucket(self) -> DistillConfig:
        if self.tail == "rest" and self.loss != "forward_kl":
            raise ValueError("distill.tail rest is defined for loss forward_kl only (the student's tail is known)")
        if self.tail == "rest" and self.temperature != 1.0:
            raise ValueError("distill.tail rest needs temperature 1: the teacher's tail cannot be softened")
        return self


class TrainConfig(Section):
    """Defaults are the paper's gpt4all-lora settings (the `paper-lora` preset)."""

    preset: Literal["paper-lora", "paper-full"] | None = None
    base_model: str = Field(min_length=1, description="model name (see `distill4all models`) or local path")
    data: Path | None = Field(
        None,
        description="JSONL, JSON array or Parquet rows; unset: the run's curate/train.jsonl (or collect/pairs.jsonl)",
    )
    data_format: Literal["auto", "gpt4all", "alpaca", "messages", "sharegpt"] = "auto"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="held out by seed, as the paper (5%)")
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    template: Literal["paper", "paper-april", "chat", "chatml", "alpaca"] = Field(
        "paper",
        description="paper: <s>prompt\\nresponse</s> as the March 2023 original; paper-april: the April data.py; "
        "chat: the tokenizer's own template",
    )
    template_file: Path | None = Field(None, description="a Jinja chat template file; overrides template")
    train_on_inputs: bool = Field(False, description="also train on prompt tokens (default: response + EOS only)")
    pad_token: str | None = Field(
        None, description="pad token to use, added (embeddings resized) if new; unset: the tokenizer's, else EOS"
    )
    max_length: int = Field(1024, ge=8)
    packing: bool = Field(True, description="lay several examples end to end in each row, attention kept apart")
    pad_to_max_length: bool = Field(False, description="pad every row to max_length (the paper's batching)")
    group_by_length: bool = Field(True, description="put examples of similar length in the same micro-batch")
    epochs: float = Field(4, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(5e-5, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="after the warmup")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    global_batch_size: int = Field(32, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass on one process")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it, else fp32"
    )
    gradient_checkpointing: bool = False
    eval_every: int = Field(500, ge=1, description="validation loss every N steps (and at the start and end)")
    checkpoint_every: int = Field(500, ge=1, description="resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1)
    num_processes: int = Field(1, ge=1)
    launcher: Literal["auto", "local", "accelerate"] = Field(
        "auto", description="auto: accelerate launch when num_processes > 1, else in this process"
    )
    accelerate_config: str = Field(
        "ddp", min_length=1, description=f"{' | '.join(ACCELERATE_CONFIGS)} | an accelerate config file"
    )
    prune: PruneConfig | None = Field(None, description="train a depth-pruned copy of base_model (the student)")
    distill: DistillConfig | None = Field(None, description="train on a teacher's distribution too (docs/distill.md)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in TRAIN_PRESETS:
            return {**TRAIN_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size x "
                f"num_processes ({self.micro_batch_size} x {self.num_processes})"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_processes)


# --- export / eval -----------------------------------------------------------------------------

Quant = Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m"]


def _paper_quants() -> list[Quant]:
    return ["q4_0"]


class ExportConfig(Section):
    """Merge → GGUF → quantize. Input: the train stage's `train/model/`, or `model` without one."""

    model: str | None = Field(
        None, description="model name or path to export when the run has no train stage (else train/model/)"
    )
    quantizations: list[Quant] = Field(default_factory=_paper_quants)
    base_type: Literal["f32", "f16"] = Field(
        "f16", description="the unquantized GGUF every quantization is made from and measured against"
    )
    compat: bool = Field(
        False,
        description="write an older pre-tokenizer name with the identical split rule (smollm → refact) so "
        "runtimes on an older llama.cpp, such as the GPT4All app and its Python bindings, load the files",
    )
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer name; default: detected")
    report: bool = Field(True, description="measure KL, top-1 agreement and perplexity of each file")
    out_dir: Path | None = Field(None, description="folder for the GGUF files; default: <run_dir>/export")
    system_prompt: str | None = Field(
        None,
        description="the system prompt of the Ollama Modelfile (SYSTEM) and the GPT4All entry (systemPrompt); "
        "default: the one the chat template writes without a system message, if any",
    )


class EvalModel(Section):
    name: str = Field(min_length=1, description="its label in tables and plots")
    model: str = Field(min_length=1, description="a model name or path (HF checkpoint, adapter, GGUF)")
    template: Literal["own", "paper", "alpaca", "chatml"] = Field(
        "own",
        description="the prompt layout it was trained in: own (its chat template; the paper's without one) "
        "or a named one (alpaca-lora: alpaca)",
    )


class JudgeConfig(Section):
    """Pairwise LLM-judge win rate of each model against `baseline`, through any OpenAI-compatible
    endpoint (a local model without base_url is served on 127.0.0.1)."""

    judge: TeacherConfig
    answer_max_tokens: int = Field(256, ge=1, description="how long the compared models may answer")
    max_cost_usd: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_verdict(self) -> JudgeConfig:
        if self.judge.samples != 1:
            raise ValueError("judge.samples must be 1: the judge gives one verdict per item and order")
        return self


RunModel = Literal["base", "pruned", "trained", "exported"]
Metric = Literal["faithful", "conditioned"]


def _all_run_models() -> list[RunModel]:
    return ["base", "trained", "exported"]


def _both_metrics() -> list[Metric]:
    return ["faithful", "conditioned"]


class EvalConfig(Section):
    """The paper's Self-Instruct evaluation: ground-truth perplexity, clipped at 100 (its Figure 3)."""

    data: list[Path] = Field(min_length=1, description="eval items; the first path that exists is used")
    limit: int | None = Field(None, ge=1, description="a seeded subset of the items; null for all")
    include: list[RunModel] = Field(
        default_factory=_all_run_models,
        description="this run's models to compare: the base model, the pruned student before training "
        "(with train.prune), the trained one, its exports",
    )
    models: list[EvalModel] = Field(default_factory=list, description="other models to compare")
    baseline: str | None = Field("base", description="the model the others are tested against")
    metrics: list[Metric] = Field(default_factory=_both_metrics)
    clip: float = Field(100.0, gt=0)
    stride: int = Field(512, ge=1)
    judge: JudgeConfig | None = None
    out_dir: Path | None = Field(None, description="folder for the results; default: <run_dir>/eval")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v

    def data_path(self) -> Path:
        return next((p for p in self.data if p.is_file()), self.data[0])


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingDefaults:
    """Default sampling of local generation (runtime.engine.SamplingParams), not a run config section."""

    max_tokens: int
    temperature: float  # 0 → greedy
    top_p: float
    top_k: int  # 0 → off
    min_p: float  # 0 → off
    repeat_penalty: float  # 1 → off
    seed: int | None  # None → a fresh random seed per call


# Three sets on purpose. Engine calls (report samples, scripts) and the Python API are greedy with a
# fixed seed, so the same model gives the same text; the API leaves room for a whole answer. `chat`
# is for a person typing: it samples, with a fresh seed each run (--temperature 0 is greedy).
ENGINE_SAMPLING = SamplingDefaults(
    max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=0
)
ASSISTANT_SAMPLING = replace(ENGINE_SAMPLING, max_tokens=512)
CHAT_SAMPLING = SamplingDefaults(
    max_tokens=512, temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1, seed=None
)


# --- the run -----------------------------------------------------------------------------------


class RunConfig(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: Path = Field(description="where everything the run makes lives; relative to the config")
    seed: int = 0
    collect: CollectConfig | None = None
    curate: CurateConfig | None = None
    train: TrainConfig | None = None
    export: ExportConfig | None = None
    eval: EvalConfig | None = None

    def configured_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]


# --- loading -----------------------------------------------------------------------------------

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

KeyPath = tuple[str | int, ...]


def _fmt_path(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _line_map(text: str) -> dict[KeyPath, int]:
    """Map each key path to the 1-based YAML line where its value (or key) starts."""
    lines: dict[KeyPath, int] = {}
    walked: set[int] = set()  # an alias's node is walked once, at its anchor: no loops, no blow-up

    def walk(node: yaml.Node, path: KeyPath) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key_path = (*path, str(k.value))
                lines[key_path] = k.start_mark.line + 1
                walk(v, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


@dataclass
class LoadedConfig:
    """A validated config plus what is needed to show it without secrets."""

    config: RunConfig
    path: Path
    env_paths: dict[KeyPath, str] = field(default_factory=dict)  # key path → original `${...}` text

    def public_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = self.config.model_dump(mode="json")
        for key_path, raw in self.env_paths.items():
            _set_path(data, key_path, raw)
        public: dict[str, Any] = _without_userinfo(data)
        return public

    def stage_hash(self, stage: str, reads: tuple[str, ...] = ()) -> str:
        """Hash of what a stage's result depends on in the config: its section, the seed, and the
        values at `reads` (dotted key paths into other sections; absent ones count as null)."""
        pub = _without_later_defaults(self.public_dict())
        data: dict[str, Any] = {"section": pub.get(stage), "seed": pub["seed"]}
        if reads:  # only then, so that a stage reading nothing else keeps its earlier fingerprints
            data["reads"] = {path: get_path(pub, path) for path in reads}
        return _hash(data)

    def hash(self) -> str:
        return _hash(self.public_dict())


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def _without_userinfo(node: Any) -> Any:
    """URLs with their `user:password@` masked, wherever they are: a config may carry credentials in
    a base_url, and what this form is written to (the manifest, `config show`) must not."""
    if isinstance(node, dict):
        return {k: _without_userinfo(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_userinfo(v) for v in node]
    if isinstance(node, str) and "@" in node:
        return _USERINFO.sub(r"\1***@", node)
    return node


# Settings added after run directories existed, with their defaults: left out of fingerprints
# while at the default, so that a newer distill4all still skips the stages an older one finished.
LATER_SETTINGS: dict[tuple[str, ...], Any] = {
    ("collect", "teachers", "*", "logprobs"): None,
    ("collect", "teachers", "*", "require_logprobs"): True,
    ("eval", "judge", "judge", "logprobs"): None,
    ("eval", "judge", "judge", "require_logprobs"): True,
    ("export", "out_dir"): None,
    ("export", "system_prompt"): None,
    ("eval", "out_dir"): None,
    ("train", "prune"): None,
    ("train", "distill"): None,
}


# Settings that say how long a stage may wait, not what it makes: never in fingerprints, so that
# raising one to let a stopped stage go on is not "other settings".
UNHASHED_SETTINGS: tuple[tuple[str, ...], ...] = (
    ("collect", "teachers", "*", "max_retry_wait_s"),
    ("eval", "judge", "judge", "max_retry_wait_s"),
)
_ANY = object()


def _without_later_defaults(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(data))  # a deep copy
    for path, default in LATER_SETTINGS.items():
        _drop_default(out, path, default)
    for path in UNHASHED_SETTINGS:
        _drop_default(out, path, _ANY)
    return out


def _drop_default(node: Any, path: tuple[str, ...], default: Any) -> None:
    head, *rest = path
    if head == "*" and isinstance(node, list):
        for item in node:
            _drop_default(item, tuple(rest), default)
    elif isinstance(node, dict) and head in node:
        if not rest:
            if default is _ANY or node[head] == default:
                del node[head]
        else:
            _drop_default(node[head], tuple(rest), default)


def get_path(data: Any, dotted: str) -> Any:
    """data[a][b][c] for "a.b.c", or None where any part is absent."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _has(node: Any, key: str | int) -> bool:
    return (isinstance(node, dict) and key in node) or (
        isinstance(node, list) and isinstance(key, int) and key < len(node)
    )


def _set_path(data: Any, key_path: KeyPath, value: Any) -> None:
    """Set data[k0][k1]... = value where that path exists (validation may have dropped it)."""
    *parents, last = key_path
    node = data
    for p in parents:
        if not _has(node, p):
            return
        node = node[p]
    if _has(node, last):
        node[last] = value


@dataclass
class _Source:
    """Where config text came from, to point errors at a file and line."""

    file: str
    lines: dict[KeyPath, int]

    def where(self, path: KeyPath) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return f"{self.file}:{self.lines[path[:n]]}: {_fmt_path(path)}"
        return f"{self.file}: {_fmt_path(path)}"


def _interpolate(data: Any, path: KeyPath, env: dict[str, str], found: dict[KeyPath, str], src: _Source) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, (*path, str(k)), env, found, src) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, (*path, i), env, found, src) for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{src.where(path)}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
        )

    out = _ENV.sub(sub, data)
    if out != data:
        found[path] = data
    return out


def _absolute(path: Path) -> Path:
    """The path resolved; one whose symlinks loop stays as written, for its reader to name the loop."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        return Path(os.path.abspath(path))


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Make every relative Path field absolute against the config file's folder."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(model, name, _absolute(base / value))
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _resolve_paths(item, base)
                elif isinstance(item, Path) and not item.is_absolute():
                    value[i] = _absolute(base / item)


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b.c=value` (the value read as YAML; a number segment indexes a list) set in place."""
    key, sep, raw = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or not parts:
        raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. eval.limit=null")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is not an item of the list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[:i])} is not a mapping")


def load_config(
    path: Path | str, env: dict[str, str] | None = None, overrides: list[str] | None = None
) -> LoadedConfig:
    """Read, interpolate, validate and path-resolve a run config, or raise ConfigError.

    `overrides` (`key.path=value`, as `--set` on the command line) apply on top of the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
        if isinstance(raw, dict):
            _check_tree(raw, path)
        lines = _line_map(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    for override in overrides or []:
        apply_override(raw, override)

    src = _Source(str(path), lines)
    env_paths: dict[KeyPath, str] = {}
    data = _interpolate(raw, (), dict(os.environ) if env is None else env, env_paths, src)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, src)) from None
    _resolve_paths(config, path.parent.resolve())
    return LoadedConfig(config=config, path=path.resolve(), env_paths=env_paths)


_MAX_NODES = 1_000_000


def _check_tree(raw: Any, path: Path) -> None:
    """YAML aliases may make a value contain itself (`a: &x [*x]`) or expand into billions of nodes
    (nested aliases): refuse both before anything walks the tree."""
    seen = 0
    stack: list[tuple[Any, frozenset[int]]] = [(raw, frozenset())]
    while stack:
        node, above = stack.pop()
        seen += 1
        if seen > _MAX_NODES:
            raise ConfigError(f"{path}: the config expands to more than {_MAX_NODES:,} values (nested YAML aliases?)")
        if isinstance(node, dict | list):
            if id(node) in above:
                raise ConfigError(f"{path}: a YAML alias refers to a value that contains it (a recursive anchor)")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, above | {id(node)}) for child in children)


def _describe(err: ValidationError, src: _Source) -> str:
    """One line per problem (the CLI prints the first and a count of the rest)."""
    parts = []
    for e in err.errors():
        loc: KeyPath = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{src.where(loc)}: {msg}")
    first, rest = parts[0], len(parts) - 1
    return first + (f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else "")


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
