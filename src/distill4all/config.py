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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from distill4all.errors import ConfigError

STAGE_ORDER: tuple[str, ...] = ("collect", "curate", "train", "export", "eval")
"""Stages in pipeline order. `serve` is a config section (the server's settings), not a stage."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- collect -----------------------------------------------------------------------------------


class SourceConfig(Section):
    """A prompt source. `name` becomes the `source` tag of every prompt taken from it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    format: Literal["jsonl"] = "jsonl"
    field: str = Field("prompt", description="the JSON field that holds the prompt text")
    limit: int | None = Field(None, ge=1, description="take at most this many prompts")


class TeacherConfig(Section):
    """The model that answers the prompts: a local model name/path, or an API endpoint."""

    name: str = Field("teacher", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1, description="model name (see `distill4all models`) or path")
    system_prompt: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = 0


class CollectConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    teachers: list[TeacherConfig] = Field(min_length=1)
    batch_size: int = Field(8, ge=1, description="answers committed to the store per transaction")

    @field_validator("sources", "teachers")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        names = [i.name for i in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"names must be unique, repeated: {', '.join(dupes)}")
        return items


# --- curate ------------------------------------------------------------------------------------


class CurateConfig(Section):
    exclude_sources: list[str] = Field(default_factory=list)
    auto_exclude_homogeneous: bool = True


# --- train -------------------------------------------------------------------------------------


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


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


class TrainConfig(Section):
    """Defaults are the paper's gpt4all-lora settings (the `paper-lora` preset)."""

    preset: Literal["paper-lora", "paper-full"] | None = None
    base_model: str = Field(min_length=1, description="model name (see `distill4all models`) or local path")
    data: Path | None = Field(
        None, description="JSONL/Parquet pairs; unset: the run's curate/train.jsonl (or collect/pairs.jsonl)"
    )
    data_format: Literal["auto", "gpt4all", "alpaca", "messages"] = "auto"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="held out by seed, as the paper (5%)")
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    template: Literal["paper", "chat", "chatml", "alpaca"] = Field(
        "paper", description="paper: <s>prompt\\nresponse</s> as the original; chat: the tokenizer's own template"
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


# --- export / eval / serve ---------------------------------------------------------------------

Quant = Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m"]


def _paper_quants() -> list[Quant]:
    return ["q4_0"]


class ExportConfig(Section):
    quantizations: list[Quant] = Field(default_factory=_paper_quants)


class EvalConfig(Section):
    data: Path
    models: list[str] = Field(default_factory=list, description="extra models to compare")
    clip: float = Field(100.0, gt=0)
    stride: int = Field(512, ge=1)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(4891, ge=0, le=65535)
    api_key: SecretStr | None = None


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
    serve: ServeConfig | None = None

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

    def walk(node: yaml.Node, path: KeyPath) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
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
        return data

    def stage_hash(self, stage: str) -> str:
        """Hash of what a stage's result depends on in the config: its section, the seed."""
        pub = self.public_dict()
        return _hash({"section": pub.get(stage), "seed": pub["seed"]})

    def hash(self) -> str:
        return _hash(self.public_dict())


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


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Make every relative Path field absolute against the config file's folder."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(model, name, (base / value).resolve())
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _resolve_paths(item, base)


def load_config(path: Path | str, env: dict[str, str] | None = None) -> LoadedConfig:
    """Read, interpolate, validate and path-resolve a run config, or raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")

    src = _Source(str(path), lines)
    env_paths: dict[KeyPath, str] = {}
    data = _interpolate(raw, (), dict(os.environ) if env is None else env, env_paths, src)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, src)) from None
    _resolve_paths(config, path.parent.resolve())
    return LoadedConfig(config=config, path=path.resolve(), env_paths=env_paths)


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
        parts.append(f"{src.where(loc)}: {msg}")
    first, rest = parts[0], len(parts) - 1
    return first + (f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else "")


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
