"""HF checkpoint → GGUF (f32 or f16), with the tokenizer and chat template in its metadata; the
families it takes and what each needs are in families.py.

Why a writer of our own: llama.cpp's converter (`convert_hf_to_gguf.py`) lives only in llama.cpp's
source tree and no well-kept package ships it. The `gguf` package, which that converter itself is
built on, provides the file writer, the HF→GGUF tensor-name map and the tokenizer-file reader
(merges, special ids), so a LLaMA conversion is the short mapping below. Every file is checked
after writing: llama.cpp must tokenize a probe text exactly as the HF tokenizer does.

Two tokenizer families: byte-level BPE (SmolLM2, Llama 3, Qwen: llama.cpp's `gpt2` model) and
SentencePiece BPE with byte fallback (LLaMA-1/2, the paper's base model: llama.cpp's `llama` model).
The pre-tokenizer name tells llama.cpp which split regex to use before byte-level BPE. Older runtimes (the
GPT4All app and its `gpt4all` 2.8 Python bindings) predate some names and refuse such files;
`compat=True` writes an older name with the identical regex (see COMPAT_PRE_TOKENIZERS).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distill4all import atomic
from distill4all.errors import ExportError
from distill4all.export.families import Hparams, add_hparams, extra_tensors, transform
from distill4all.export.quantize import native_stderr
from distill4all.models.cards import UNKNOWN_LICENCE, Provenance
from distill4all.models.chat_templates import hf_stop_ids

BaseType = Literal["f32", "f16"]

PROBE_TEXT = (
    "Hello world! The year 2023 had 365 days; π≈3.14159, 1,000,000 and 0.5%.\n"
    "Ça va? Schöne Grüße aus München. ¿Qué tal? Привет, как дела? 你好，世界！東京は日本の首都です。"
    " 안녕하세요 مرحبا بالعالم नमस्ते 🚀🔥👍🏽\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2**n)\n\n"
    "\tfor (int i = 0; i < 10; ++i) { x[i] = i * 42; }\n"
    "SELECT id, name FROM users WHERE age >= 30 ORDER BY name;   \n\n\n"
    "  leading spaces, trailing spaces   \r\n"
    "I'm sure you'll see they've done it. ALL CAPS 123abc abc123 a1b2c3 9999999999 3333"
)
"""Multilingual prose, code, digits and whitespace runs: where split rules differ, this shows it."""

COMPAT_PRE_TOKENIZERS: dict[str, str] = {
    # llama.cpp (src/llama-vocab.cpp) gives these the same regex list: "\p{N}" then the GPT-2
    # rule; `refact` is known to llama.cpp builds from mid-2024 on, `smollm` only from late 2024.
    "smollm": "refact",
}

# Split rules of HF tokenizers that llama.cpp knows, by the pattern in tokenizer.json.
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_SPLIT_NAMES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _is_byte_level(step: dict[str, Any], *, regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the split rule of a byte-level BPE tokenizer.json.

    Only rules whose llama.cpp regex is known to be the same are named here; anything else asks
    the user to name it (export.pre_tokenizer), and the tokenization check still guards the file.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is_byte_level(steps[0], regex=True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _is_byte_level(steps[1], regex=True)
    ):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], regex=False):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    raise ExportError(
        f"cannot tell llama.cpp's name for this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}); "
        "set export.pre_tokenizer (e.g. gpt-2, llama-bpe, qwen2, smollm)"
    )


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad …
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    pre: str
    model: str = "gpt2"  # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece)
    scores: list[float] | None = None  # SentencePiece merge priorities
    add_space_prefix: bool = False


def read_vocab(hf_dir: Path, n_vocab: int, pre: str | None = None) -> Vocab:
    """The vocabulary of an HF tokenizer: byte-level BPE as llama.cpp's `gpt2` tokenizer model, or
    a SentencePiece BPE with byte fallback (LLaMA-1/2, Mistral, TinyLlama) as its `llama` model."""
    from transformers import AutoTokenizer

    from distill4all.models.registry import quiet_hf

    tokenizer_json = hf_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(f"{hf_dir} has no tokenizer.json (a fast tokenizer is needed)")
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(
            f"{hf_dir}: only BPE tokenizers are supported (byte-level, as SmolLM2, Llama 3 and Qwen use, "
            f"or SentencePiece with byte fallback, as LLaMA-1/2), not {model.get('type')}"
        )
    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    if model.get("byte_fallback"):
        return _sentencepiece_vocab(hf_dir, tok, tj, n_vocab)
    return _byte_level_vocab(hf_dir, tok, tj, n_vocab, pre)


def _special_vocab(hf_dir: Path, n_vocab: int, *, merges: bool) -> Any:
    import gguf

    # gguf warns about pair templates (two-sequence inputs), which a causal LM never uses.
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    return gguf.SpecialVocab(hf_dir, load_merges=merges, n_vocab=n_vocab)


def _with_answer_end(special_ids: dict[str, int], tok: Any) -> dict[str, int]:
    """The special ids, with EOT when the chat template ends an answer in a token other than EOS
    (`<|eot_id|>` over a base Llama 3's EOS, Gemma's `<end_of_turn>`): llama.cpp stops at it."""
    ids = dict(special_ids)
    ends = [t for t in hf_stop_ids(tok) if t != ids.get("eos", tok.eos_token_id)]
    if ends and "eot" not in ids:
        ids["eot"] = ends[0]
    return ids


def _adds(tok: Any) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS, as it really does (configs can disagree with it)."""
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    return bos, tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]


def _sentencepiece_vocab(hf_dir: Path, tok: Any, tj: dict[str, Any], n_vocab: int) -> Vocab:
    """LLaMA-1/2-style tokenizers (`tokenizer.json` converted from SentencePiece: BPE over pieces
    with `▁` for spaces and `<0xNN>` byte fallback), for llama.cpp's SentencePiece tokenizer. That
    merges the highest-scoring pair first; the original `tokenizer.model` has the scores, and where
    it is gone (transformers 5 saves only tokenizer.json) a piece's score is minus its id: the
    converter orders pieces, and so merges, by score. The tokenization check after writing
    proves the result."""
    import gguf

    scores_of: dict[int, float] = {}
    spm_file = hf_dir / "tokenizer.model"
    if spm_file.is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
        scores_of = {i: float(sp.GetScore(i)) for i in range(sp.GetPieceSize())}
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    special_ids = set(tok.all_special_ids)
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i == tok.unk_token_id:
            tokens.append(text)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special_ids or (i in added and added[i].special):
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        scores.append(scores_of.get(i, 0.0 if types[-1] != gguf.TokenType.NORMAL else -float(i)))
    pre = tj.get("pre_tokenizer") or {}
    normalizer = json.dumps(tj.get("normalizer") or {})
    space_prefix = pre.get("prepend_scheme") in ("first", "always") or '"Prepend"' in normalizer
    bos, eos = _adds(tok)
    return Vocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=[],
        special_ids=_with_answer_end(_special_vocab(hf_dir, n_vocab, merges=False).special_token_ids, tok),
        add_bos=bos,
        add_eos=eos,
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        pre="default",
        model="llama",
        scores=scores,
        add_space_prefix=space_prefix,
    )


def _byte_level_vocab(hf_dir: Path, tok: Any, tj: dict[str, Any], n_vocab: int, pre: str | None) -> Vocab:
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:  # the embedding is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    special = _special_vocab(hf_dir, n_vocab, merges=True)
    bos, eos = _adds(tok)
    return Vocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=list(special.merges),
        special_ids=_with_answer_end(special.special_token_ids, tok),
        add_bos=bos,
        add_eos=eos,
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        pre=pre or detect_pre_tokenizer(tj),
    )


def _add_vocab(writer: Any, vocab: Vocab, pre: str) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, tid in vocab.special_ids.items():
        add = getattr(writer, f"add_{kind}_token_id", None)
        if add is not None:
            add(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _hf_tensors(hf_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) for every tensor in the checkpoint's safetensors file(s)."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir} has no *.safetensors weights (save the model with safe_serialization)")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                yield name, st.get_tensor(name)


def _file_type(base_type: BaseType) -> int:
    import gguf

    return int(gguf.LlamaFileType.ALL_F32 if base_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def convert_tensors(hf_dir: Path, hp: Hparams, base_type: BaseType) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[hp.family.arch]
    names = gguf.get_tensor_name_map(arch, hp.n_layer)
    yield from extra_tensors(hp).items()
    for name, tensor in _hf_tensors(hf_dir):
        tied = hp.tied or hp.family.name == "gemma2"  # llama.cpp's gemma2 has no output tensor
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{hf_dir}: tensor {name!r} has no GGUF {hp.family.arch} counterpart")
        data = transform(name, tensor.float().numpy(), hp)
        # As llama.cpp's converter does: 1-D tensors (norms, biases) stay f32.
        dtype = np.float16 if base_type == "f16" and data.ndim > 1 else np.float32
        yield new, np.ascontiguousarray(data.astype(dtype))


QUANTIZED_BY = "distill4all"


def provenance_metadata(name: str, provenance: Provenance | None, source_url: str | None = None) -> Any:
    """The GGUF's general.* provenance as gguf's Metadata: name, licence, base model (gguf's own
    hub-id heuristic gives its name, organization and URL), source, quantized_by."""
    import gguf

    meta = gguf.Metadata()
    if provenance is not None and provenance.base_model:
        meta = gguf.Metadata.apply_metadata_heuristic(meta, model_card={"base_model": provenance.base_model})
    meta.name = name
    meta.license = provenance.license if provenance is not None else UNKNOWN_LICENCE
    if meta.license == UNKNOWN_LICENCE:
        meta.license_name = "unknown"
    meta.source_repo_url = source_url
    meta.quantized_by = QUANTIZED_BY
    return meta


def write_gguf(
    hf_dir: Path,
    out: Path,
    base_type: BaseType = "f16",
    *,
    pre_tokenizer: str | None = None,
    compat: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    provenance: Provenance | None = None,
    source_url: str | None = None,
) -> Vocab:
    """Write `out` from the HF checkpoint in `hf_dir`; returns the vocabulary that went in.
    `provenance` (licence, base model) and `source_url` (the hub model converted as it is) go into
    the general.* keys; without them the licence is `other`."""
    import gguf

    hp = Hparams.from_config(hf_dir)
    vocab = read_vocab(hf_dir, hp.n_vocab, pre_tokenizer)
    pre = COMPAT_PRE_TOKENIZERS.get(vocab.pre, vocab.pre) if compat else vocab.pre
    with atomic.output_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=hp.family.arch)
        provenance_metadata(hp.model_name, provenance, source_url).set_gguf_meta_model(writer)
        add_hparams(writer, hp, _file_type(base_type))
        _add_vocab(writer, vocab, pre)
        for name, data in convert_tensors(hf_dir, hp, base_type):
            writer.add_tensor(name, data)
            if on_tensor is not None:
                on_tensor(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_tokenizer(tmp, hf_dir)
    return vocab


def write_vocab_only(out: Path, hf_dir: Path, pre: str) -> None:
    """A GGUF with the tokenizer and no weights, as llama.cpp's own ggml-vocab-*.gguf test files."""
    import gguf

    hp = Hparams.from_config(hf_dir)
    vocab = read_vocab(hf_dir, hp.n_vocab)
    writer = gguf.GGUFWriter(out, arch=hp.family.arch)
    writer.add_name(hp.model_name)
    add_hparams(writer, hp, _file_type("f32"))
    _add_vocab(writer, vocab, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_tokenize(gguf_file: Path, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """How llama.cpp tokenizes `text` with the vocabulary in `gguf_file` (weights are not read);
    `parse_special` reads special tokens written in the text as such, as chat prompts need."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)
    try:
        with native_stderr():  # a vocabulary-only load warns that it has no context length
            llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ExportError(f"llama.cpp cannot read the vocabulary of {gguf_file}: {e}") from None
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))
    finally:
        llm.close()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_tokenizer(gguf_file: Path, hf_dir: Path, text: str = PROBE_TEXT) -> None:
    """Fail unless llama.cpp tokenizes `text` with `gguf_file` exactly as the HF tokenizer does."""
    from transformers import AutoTokenizer

    from distill4all.models.registry import quiet_hf

    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    want = list(tok(text, add_special_tokens=True)["input_ids"])
    got = llama_tokenize(gguf_file, text)
    if got != want:
        i = _first_difference(got, want)
        raise ExportError(
            f"llama.cpp tokenizes differently from the HF tokenizer at token {i} "
            f"(llama.cpp {got[i : i + 5]} vs HF {want[i : i + 5]}); the pre-tokenizer name is probably "
            "wrong: set export.pre_tokenizer"
        )


CHAT_PROBE = [
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "A helpful assistant.\nAsk me anything."},
    {"role": "user", "content": "Write one line of code."},
]


def chat_token_difference(gguf_file: Path, hf_dir: Path) -> str | None:
    """How llama.cpp's tokens of a chat prompt (the model's template, special tokens parsed) first
    differ from the HF tokenizer's, or None where they agree or there is no template.

    Text right after a special token is where they can: llama.cpp's SentencePiece always puts a
    `▁` in front of it (the original LLaMA tokenizer, HF's `legacy: true`); a tokenizer converted
    with `legacy: false` does not. Plain text is checked by check_tokenizer."""
    from transformers import AutoTokenizer

    from distill4all.models.registry import quiet_hf

    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    if not isinstance(tok.chat_template, str) or not tok.chat_template:
        return None
    try:
        text = str(tok.apply_chat_template(CHAT_PROBE, tokenize=False, add_generation_prompt=True))
    except Exception:  # a template that refuses this conversation (roles it does not take)
        return None
    want = list(tok(text, add_special_tokens=False)["input_ids"])
    got = llama_tokenize(gguf_file, text, add_special=False, parse_special=True)
    if got == want:
        return None
    i = _first_difference(got, want)
    return (
        f"llama.cpp tokenizes chat prompts differently from the HF tokenizer at token {i} "
        f"(llama.cpp {tok.convert_ids_to_tokens(got[i : i + 3])} vs HF {tok.convert_ids_to_tokens(want[i : i + 3])}), "
        "so the GGUF sees prompts slightly unlike training's; a SentencePiece tokenizer with `legacy: false` is "
        "the usual cause (llama.cpp puts ▁ after every special token)"
    )


def check_compat(hf_dir: Path, name: str, compat: str, work: Path, text: str = PROBE_TEXT) -> int:
    """Prove that pre-tokenizer `compat` splits `text` token for token as `name` does.

    Writes two vocabulary-only GGUFs that differ only in the name; returns the token count.
    """
    a, b = work / f"vocab-{name}.gguf", work / f"vocab-{compat}.gguf"
    write_vocab_only(a, hf_dir, name)
    write_vocab_only(b, hf_dir, compat)
    try:
        ta, tb = llama_tokenize(a, text), llama_tokenize(b, text)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    if ta != tb:
        i = _first_difference(ta, tb)
        raise ExportError(f"pre-tokenizers {name!r} and {compat!r} split differently at token {i}; compat is unsafe")
    return len(ta)
