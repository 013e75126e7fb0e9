"""Depth pruning by block influence (ShortGPT, Men et al. 2024): a smaller student of the same
architecture, made by removing the decoder layers that change their input least.

A layer's block influence is BI = 1 − mean cos(h_in, h_out) over the tokens of a calibration set,
where h_in and h_out are the hidden states entering and leaving it. A layer with BI near 0 hardly
turns the residual stream, so removing it changes the model little; distillation then recovers
most of what is lost. The first and last layers are always kept: they map into and out of the
embedding space and have the highest influence in practice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill4all import atomic
from distill4all.errors import ConfigError, DataError, ModelError, UserError
from distill4all.models.registry import quiet_hf, resolve_model
from distill4all.records import read_records

CALIBRATION_TEXTS: tuple[str, ...] = (
    "The Amazon river carries more water than any other river on Earth. It flows east across South "
    "America and reaches the Atlantic Ocean in Brazil, where its mouth is more than 300 km wide.",
    "How do I read a file line by line in Python?\nUse a with statement: `with open(path) as f:` and "
    "then `for line in f:`. The file is closed for you when the block ends.",
    "def fibonacci(n: int) -> list[int]:\n    seq = [0, 1]\n    while len(seq) < n:\n"
    "        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n",
    "Give three tips for a good night's sleep.\n1. Go to bed at the same time every day. 2. Keep the room "
    "dark and cool. 3. Avoid screens and caffeine in the evening.",
    "A binary search halves the range it looks at with every comparison, so it finds an item in a sorted "
    "list of a million elements in about twenty steps.",
    "Subject: Meeting moved\nHi all, Thursday's planning meeting is moved to Friday at 10:00 in room 4B. "
    "Please bring your estimates for the next sprint. Thanks, Omar",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so "
    "it boils at a lower temperature and pasta takes longer to cook.",
    "Translate to French: I would like a coffee, please.\nJe voudrais un café, s'il vous plaît.",
    'UPDATE accounts SET balance = balance - 50 WHERE id = 7;\n{"status": "ok", "rows": 1, "ids": [7]}',
    "Write a haiku about autumn.\nCold wind through bare trees,\nred leaves drifting on the pond,\n"
    "the geese fly south now.",
    "The French Revolution began in 1789. It ended the monarchy, spread the ideas of liberty and "
    "equality across Europe, and was followed by the rise of Napoleon.",
    "What is 15% of 240?\n10% of 240 is 24 and 5% is 12, so 15% of 240 is 24 + 12 = 36.",
)
"""Varied English prose, code, instructions and numbers: the default calibration set."""

PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
"""Config lists with one entry per decoder layer (sliding/full attention, NoPE layers): they are
sliced with the layers, or the pruned model would pair its layers with the wrong entries."""

BATCH_SIZE = 8


@dataclass(frozen=True)
class PruneResult:
    out_dir: Path
    source: str  # the model as the caller named it
    source_path: str  # the HF checkpoint it resolved to
    layers_before: int
    kept: list[int]  # indices in the source model, in order
    dropped: list[int]
    block_influence: list[float]  # one per source layer
    params_before: int
    params_after: int
    texts: int
    tokens: int  # non-pad tokens measured

    @property
    def layers_after(self) -> int:
        return len(self.kept)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["layers_after"] = self.layers_after
        return d


def decoder_layers(model: Any) -> Any:
    """The decoder's layer list (an nn.ModuleList) of a decoder-only transformers model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise ModelError(f"{type(model).__name__}: not a decoder-only model with model.layers; cannot prune its depth")
    return layers


def block_influence(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """BI of every decoder layer over the non-pad tokens of `batches` (input_ids, attention_mask).

    The states are taken by forward hooks on the layers themselves: `output_hidden_states` gives
    the last layer's output only after the final norm, which would inflate the last layer's BI.
    """
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    mask = torch.zeros(0, dtype=torch.bool)

    def record(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[i] += float(cos[mask].double().sum())

        return hook

    handles = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            for batch in batches:
                ids, attention = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
                mask = attention.bool()
                tokens += int(mask.sum())
                # The decoder alone: the vocabulary projection is not needed for BI.
                model.model(input_ids=ids, attention_mask=attention, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise DataError("no calibration tokens to measure block influence on")
    return [1.0 - s / tokens for s in sums]


def lowest_influence(influence: Sequence[float], n_drop: int) -> list[int]:
    """The `n_drop` layers with the lowest BI, never the first or the last; sorted by index."""
    inner = sorted(range(1, len(influence) - 1), key=lambda i: (influence[i], i))
    return sorted(inner[:n_drop])


def remove_layers(model: Any, dropped: Sequence[int]) -> None:
    """Remove layers in place and renumber the rest, so that the KV cache pairs each remaining
    layer with its own slot and saved weights are named `model.layers.0…n-1`."""
    layers = decoder_layers(model)
    n_before = len(layers)
    kept = [i for i in range(n_before) if i not in set(dropped)]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(kept)
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == n_before:
            setattr(config, name, [values[i] for i in kept])


def check_request(out_dir: Path, drop_layers: int | None, keep_fraction: float | None) -> None:
    """Refuse what can be refused before any model is loaded or data read."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder (nothing was overwritten)")
    if (drop_layers is None) == (keep_fraction is None):
        raise ConfigError("give exactly one of drop_layers (--drop-layers) and keep_fraction (--keep-fraction)")
    if drop_layers is not None and drop_layers < 1:
        raise ConfigError(f"drop_layers must be at least 1, not {drop_layers}")
    if keep_fraction is not None and not 0 < keep_fraction < 1:
        raise ConfigError(f"keep_fraction must be between 0 and 1, not {keep_fraction}")


def layers_to_drop(n_layers: int, drop_layers: int | None, keep_fraction: float | None) -> int:
    """How many of `n_layers` to drop (one of the two settings given); at least 2 layers stay."""
    if keep_fraction is not None:
        n_drop = n_layers - math.floor(n_layers * keep_fraction + 0.5)  # round half up, not to even
    else:
        assert drop_layers is not None
        n_drop = drop_layers
    if n_drop < 1:
        raise ConfigError(f"nothing to drop: {keep_fraction} of {n_layers} layers rounds to all of them")
    if n_layers - n_drop < 2:
        raise ConfigError(
            f"cannot drop {n_drop} of {n_layers} layers: the first and last are always kept (drop at most "
            f"{max(n_layers - 2, 0)})"
        )
    return n_drop


def calibration_texts(data: Path | None, samples: int, seed: int = 0) -> list[str]:
    """`prompt + "\\n" + response` of up to `samples` pairs of a JSONL/Parquet file, chosen by
    `seed` (reservoir sampling: one pass, any file size), or the built-in set without a file."""
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, not {samples}")
    if data is None:
        return list(CALIBRATION_TEXTS[:samples])
    if not data.is_file():
        raise DataError(f"pairs file not found: {data}")
    rng = random.Random(seed)
    chosen: list[str] = []
    seen = 0
    for where, row in read_records(data):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise DataError(f"{where}: expected an object with a string field 'prompt'")
        response = row.get("response")
        text = f"{prompt}\n{response}" if isinstance(response, str) and response else prompt
        if not text.strip():
            continue
        seen += 1
        if len(chosen) < samples:
            chosen.append(text)
        elif (j := rng.randrange(seen)) < samples:
            chosen[j] = text
    if not chosen:
        raise DataError(f"{data}: no pairs with text")
    return chosen


def token_batches(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Texts tokenized (cut to `max_tokens`) and right-padded into batches with attention masks;
    the pad id is irrelevant (masked), so the tokenizer needs no pad token."""
    ids = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    ids = [x for x in ids if x]
    batches = []
    for start in range(0, len(ids), BATCH_SIZE):
        chunk = ids[start : start + BATCH_SIZE]
        width = max(map(len, chunk))
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention_mask[row, : len(x)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def _load(path: Path) -> tuple[Any, Any, Any]:
    """(model in fp32, its tokenizer, the dtype it was stored in)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_hf():
            stored = getattr(AutoConfig.from_pretrained(path), "dtype", None)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {path} as a causal language model: {e}") from None
    return model, tokenizer, stored if isinstance(stored, torch.dtype) else torch.float32


def prune_depth(
    model: str | Path,
    out_dir: Path,
    *,
    drop_layers: int | None = None,
    keep_fraction: float | None = None,
    texts: Sequence[str],
    max_tokens: int = 256,
) -> PruneResult:
    """Measure every layer's BI on `texts`, drop the least influential ones and write the smaller
    model (safetensors, in the source's dtype) with its tokenizer and `prune.json` to `out_dir`."""
    check_request(out_dir, drop_layers, keep_fraction)
    if max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, not {max_tokens}")
    path = resolve_model(str(model), want="hf").path
    net, tokenizer, stored_dtype = _load(path)
    n_layers = len(decoder_layers(net))
    n_drop = layers_to_drop(n_layers, drop_layers, keep_fraction)
    batches = token_batches(tokenizer, texts, max_tokens)
    influence = block_influence(net, batches)
    dropped = lowest_influence(influence, n_drop)
    params_before = net.num_parameters()
    remove_layers(net, dropped)
    result = PruneResult(
        out_dir=out_dir,
        source=str(model),
        source_path=str(path),
        layers_before=n_layers,
        kept=[i for i in range(n_layers) if i not in dropped],
        dropped=dropped,
        block_influence=influence,
        params_before=params_before,
        params_after=net.num_parameters(),
        texts=len(texts),
        tokens=sum(int(b["attention_mask"].sum()) for b in batches),
    )
    net.to(stored_dtype)
    with atomic.output_dir(out_dir, replace=out_dir.exists()) as tmp, quiet_hf():
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / "prune.json", result.as_dict())
    return result
