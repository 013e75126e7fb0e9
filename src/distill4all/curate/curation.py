"""The curation, step by step, over every response in a run store.

  filters + keys + minhash
              one pass over the pairs: the failure / refusal / truncation / malformed / length /
              language rules (filters.py), normalized hashes of each prompt and pair (exact
              duplicates) and their MinHash signatures; then the LSH near-duplicate links
  embed       pair embeddings, cached in the store
  topics      two-level k-means topics with c-TF-IDF labels
  diversity   per-source metrics and the homogeneous-source flag; sources excluded
  dedup       one representative per cluster: exact, near, then semantic duplicates
  project     the 2-D map (t-SNE), cached in the stage folder
  decide      one decision row per response, written in a single transaction
  export      curated pairs (GPT4All / Parquet / messages), the split, the map and the report

Every step is deterministic for a given store, config and seed, so a killed curation that runs
again reaches the same decisions; the expensive steps (embeddings, projection) keep what they
finished and are not redone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import mmap
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from rich.console import Console

from distill4all import atomic
from distill4all.config import CurateConfig
from distill4all.curate import decontam, dedup, diversity, embed, filters, outputs, project, topics
from distill4all.curate.pairs import Rows, load_rows
from distill4all.curate.steps import Steps
from distill4all.errors import DataError
from distill4all.store import Store, decisions

T = TypeVar("T")
U = TypeVar("U", np.uint32, np.uint64)

_STATE: dict[str, Any] = {}  # what forked workers see: the rows, filters, hasher, eval index, shared arrays


@dataclass
class Curation:
    """Everything the curation decided and measured, for the store, the exports and the report."""

    rows: Rows
    rules: list[list[str]]
    details: list[dict[str, str]]
    cluster: list[str | None]
    funnel: list[dict[str, Any]]
    sources: list[diversity.SourceProfile]
    excluded: dict[str, str]  # source → rule that excluded it
    topic: list[str | None]
    subtopic: list[str | None]
    topic_table: list[dict[str, Any]]
    xy: dict[int, tuple[float, float]]  # row index → map coordinates (the sampled rows)
    embed_model: str
    steps: Steps
    dedup_counts: dict[str, int] = field(default_factory=dict)
    eval_copies: dict[int, str] = field(default_factory=dict)  # row → which eval item it holds, and how
    eval_items: int = 0  # eval items checked against (0: decontamination off or no eval data)

    @property
    def kept(self) -> list[bool]:
        return [not r for r in self.rules]


def pair_text(prompt: str, response: str | None) -> str:
    return f"{prompt}\n{response or ''}"


# --- parallel scan ------------------------------------------------------------------------------


@dataclass
class Scan:
    """What one pass over the pairs finds: filter hits, exact keys and MinHash signatures."""

    hits: list[list[filters.Hit]]
    keys: dict[str, NDArray[np.uint64]]  # "prompt" / "pair" → one key per row (dedup.exact_key)
    copies: list[tuple[str, str] | None]  # per row: (eval item id, the words it shares), if any
    sigs: dict[str, NDArray[np.uint32]]  # "prompt" / "pair" → (rows, num_perm)


def scan(
    rows: Rows,
    cfg: CurateConfig,
    workers: int,
    advance: Callable[[int], None] = lambda k: None,
    index: decontam.EvalIndex | None = None,
) -> Scan:
    """Filters, exact keys, MinHash signatures and eval-item n-grams of every row, in `workers` processes."""
    n = len(rows)
    # the workers write signatures and keys straight into shared memory: nothing big is pickled back
    kinds = ("prompt", "pair", "answer") if "prompt" in cfg.dedup.scope else ("prompt", "pair")
    sigs = {what: _shared_array((n, cfg.dedup.num_perm), np.uint32) for what in kinds}
    keys = {what: _shared_array((n,), np.uint64) for what in ("prompt", "pair")}
    _STATE.update(
        rows=rows,
        filters=filters.Filters(cfg.filters, cfg.reasoning),
        hasher=dedup.MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_words),
        sigs=sigs,
        keys=keys,
        index=index,
    )
    scanner = Scanner(n, workers)
    try:
        parts = scanner.map(_scan_range, advance)
    finally:
        scanner.close()
        _STATE.clear()
    return Scan(
        hits=[h for hits, _ in parts for h in hits],
        keys=keys,
        copies=[c for _, copies in parts for c in copies],
        sigs=sigs,
    )


_SIG_BATCH = 128  # texts MinHash hashes at once (dedup.MinHasher.signatures)


def _scan_range(lo: int, hi: int) -> tuple[list[list[filters.Hit]], list[tuple[str, str] | None]]:
    """Rows [lo, hi): each prompt is normalized and each answer folded once; their words, cut and
    hashed once a batch, serve MinHash, the exact keys and the eval check."""
    rows: Rows = _STATE["rows"]
    f: filters.Filters = _STATE["filters"]
    hasher: dedup.MinHasher = _STATE["hasher"]
    index: decontam.EvalIndex | None = _STATE["index"]
    prompts = [dedup.normalize(p) for p in rows.prompts[lo:hi]]  # the echo rule reads them too
    answers = [dedup.fold(r or "") for r in rows.responses[lo:hi]]
    # per text: whether `index.match` must read it (the others cannot match), and its word sums
    may_copy = {what: np.zeros(hi - lo, dtype=bool) for what in ("prompt", "answer")}
    sums = {what: (np.zeros(hi - lo, dtype=np.uint64), np.zeros(hi - lo, dtype=np.int64)) for what in may_copy}

    def seen(what: str) -> Callable[[int, dedup.Words], None]:
        def read(at: int, words: dedup.Words) -> None:
            batch = slice(at, at + words.n_docs)
            sums[what][0][batch], sums[what][1][batch] = dedup.word_sums(words)
            if index is not None:
                may_copy[what][batch] |= index.may_match(words)

        return read

    # a pair's shingles are its prompt's and its answer's, so its signature is the element-wise
    # minimum of theirs and the prompt is hashed only once
    sig_prompt = hasher.signatures(prompts, _SIG_BATCH, folded=True, words_seen=seen("prompt"))
    _STATE["sigs"]["prompt"][lo:hi] = sig_prompt
    sig_answer = hasher.signatures(answers, _SIG_BATCH, folded=True, words_seen=seen("answer"))
    np.minimum(sig_prompt, sig_answer, out=_STATE["sigs"]["pair"][lo:hi])
    if "answer" in _STATE["sigs"]:  # prompt dedup tells answers apart
        _STATE["sigs"]["answer"][lo:hi] = sig_answer
    # a pair's words are its prompt's then its answer's (== exact_key(pair_text(...)))
    _STATE["keys"]["prompt"][lo:hi] = dedup.text_keys(*sums["prompt"])
    _STATE["keys"]["pair"][lo:hi] = dedup.text_keys(*dedup.joined_sums(sums["prompt"], sums["answer"]))
    pairs = [
        filters.Pair(rows.prompts[i], rows.responses[i], rows.finish_reasons[i], rows.reasonings[i])
        for i in range(lo, hi)
    ]
    hits = f.check_many(pairs, prompts)
    copies: list[tuple[str, str] | None] = [None] * (hi - lo)
    if index is not None:
        for k in np.flatnonzero(may_copy["prompt"] | may_copy["answer"]).tolist():
            copy = index.match(prompts[k]) if may_copy["prompt"][k] else None
            if copy is None and may_copy["answer"][k]:
                copy = index.match(" ".join(answers[k].split()))  # its normalize()d form
            copies[k] = copy
    return hits, copies


def _shared_array(shape: tuple[int, ...], dtype: type[U]) -> NDArray[U]:
    """Zeroed memory shared with the workers forked after it is made (an anonymous shared map)."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class Scanner:
    """Runs a function over row ranges, in forked worker processes when there is enough work."""

    CHUNK = 2000

    def __init__(self, n: int, workers: int) -> None:
        self.n = n
        self.pool = None
        if workers > 1 and n >= 4 * self.CHUNK and "fork" in multiprocessing.get_all_start_methods():
            # fork: the workers see the rows without pickling a million strings to each
            self.pool = multiprocessing.get_context("fork").Pool(workers)

    def map(self, fn: Callable[[int, int], T], advance: Callable[[int], None]) -> list[T]:
        ranges = [(lo, min(lo + self.CHUNK, self.n)) for lo in range(0, self.n, self.CHUNK)]
        out: list[T] = []
        if self.pool is None:
            for lo, hi in ranges:
                out.append(_star((fn, lo, hi)))
                advance(hi - lo)
            return out
        for (lo, hi), result in zip(ranges, self.pool.imap(_star, [(fn, lo, hi) for lo, hi in ranges]), strict=True):
            out.append(result)
            advance(hi - lo)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _star(args: tuple[Callable[[int, int], T], int, int]) -> T:
    """fn(lo, hi) with the garbage collector paused: a scan makes millions of short-lived objects
    and no cycles, and each of the collector's passes walks every object alive (~10% of a scan)."""
    fn, lo, hi = args
    paused = gc.isenabled()
    gc.disable()
    try:
        return fn(lo, hi)
    finally:
        if paused:
            gc.enable()


# --- the curation -------------------------------------------------------------------------------


def curate(
    store: Store,
    cfg: CurateConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    title: str = "distill4all",
    console: Console | None = None,
    quiet: bool = False,
    eval_data: list[Path] | None = None,
) -> Curation:
    """Decide every response in the store, record the decisions, and write the outputs to `out_dir`.
    `eval_data`: eval item files whose items are kept out (curate.decontaminate)."""
    console = console or Console(stderr=True, quiet=quiet)
    steps = Steps(console, quiet)
    with steps.step("load", 0, bar=False):
        rows = load_rows(store)
    n = len(rows)
    if n == 0:
        raise DataError("nothing to curate: the run store has no answers (run collect, or give curate.input)")
    workers = cfg.workers or os.cpu_count() or 1
    dc = cfg.decontaminate
    index = decontam.load_index(eval_data, dc.ngram, dc.min_words) if dc.enabled and eval_data else None
    with steps.step("filters + keys + minhash", n) as advance:
        scanned = scan(rows, cfg, workers, advance, index)
    hits, sigs = scanned.hits, scanned.sigs
    ok = np.asarray([not h for h in hits])
    ok_idx = np.flatnonzero(ok)
    with steps.step("near-dup links", len(ok_idx), bar=False):
        # among all pairs that passed the filters: the sources' near-duplicate rates
        in_near = np.zeros(n, dtype=bool)
        with ThreadPoolExecutor(2) as pool:  # numpy's sorts and hashing let go of the GIL: ~1.6× on 2 cores
            kinds = (sigs["prompt"], sigs["pair"])
            for edges in pool.map(lambda sig: dedup.near_duplicate_edges(sig, cfg.dedup.threshold, ok_idx), kinds):
                in_near[ok_idx[edges].ravel()] = True

    # embeddings of every pair with an answer: the map shows dropped pairs too
    has_text = [i for i in range(n) if rows.responses[i] and rows.responses[i].strip()]  # type: ignore[union-attr]
    texts = [pair_text(rows.prompts[i], rows.responses[i])[: cfg.embed.max_chars] for i in has_text]
    embedder = embed.load_embedder(cfg.embed.model)
    with steps.step(f"embed ({cfg.embed.model})", len(set(texts))) as advance:
        emb = embed.embed(store, embedder, texts, cfg.embed.batch_size, advance)
    emb_row = np.full(n, -1, dtype=np.int64)
    emb_row[has_text] = np.arange(len(has_text))
    copies = _eval_copies(scanned.copies, index, store, embedder, emb, has_text, cfg)

    topic: list[str | None] = [None] * n
    subtopic: list[str | None] = [None] * n
    topic_table: list[dict[str, Any]] = []
    sub_of_row = np.full(n, -1, dtype=np.int64)
    if len(has_text):
        with steps.step("topics", len(has_text), bar=False):
            found = topics.find_topics(emb, texts, topics=cfg.map.topics, subtopics=cfg.map.subtopics, seed=seed)
        topic_table = _topic_table(found)
        for k, i in enumerate(has_text):
            t, s = int(found.topic[k]), int(found.subtopic[k])
            topic[i] = f"T{t}: {found.topic_labels[t]}"
            subtopic[i] = f"T{t}.{s}: {found.subtopic_labels[s]}"
            sub_of_row[i] = s

    with steps.step("diversity", len(ok_idx), bar=False):
        stats = _source_profiles(rows, ok, in_near, emb, emb_row, sub_of_row, cfg, seed)
        diversity.flag_homogeneous(stats, cfg.diversity)
    present = set(rows.sources)
    for name in cfg.exclude_sources:
        if name not in present:
            console.print(f"[yellow]curate: exclude_sources names {name!r}, which has no pairs[/yellow]")
    excluded = {s: "source.excluded" for s in cfg.exclude_sources if s in present}
    if cfg.auto_exclude_homogeneous:
        for st in stats:
            if st.homogeneous:
                excluded.setdefault(st.source, "source.homogeneous")

    rules = [[name for name, _ in h] for h in hits]
    details = [dict(h) for h in hits]
    for i in range(n):
        if (rule := excluded.get(rows.sources[i])) is not None:
            rules[i].append(rule)
            details[i][rule] = f"source {rows.sources[i]}"
    after_filters = int(ok.sum())
    alive = np.asarray([not r for r in rules])
    after_sources = int(alive.sum())
    for i, why in copies.items():
        if dc.action == "drop" and alive[i]:
            rules[i].append(EVAL_COPY)
            alive[i] = False
        details[i][EVAL_COPY] = why
    after_copies = int(alive.sum())

    cluster: list[str | None] = [None] * n
    funnel = [
        {"step": "pairs", "remaining": n, "dropped": 0},
        {"step": "failed or malformed answers", "remaining": after_filters, "dropped": n - after_filters},
        {"step": "excluded sources", "remaining": after_sources, "dropped": after_filters - after_sources},
        {"step": "eval-set copies", "remaining": after_copies, "dropped": after_sources - after_copies},
    ]
    dedup_counts: dict[str, int] = {}
    with steps.step("dedup", after_sources, bar=False):
        for kind in _dedup_kinds(cfg):
            before = int(alive.sum())
            edges = _duplicate_edges(kind, np.flatnonzero(alive), scanned.keys, sigs, emb, emb_row, cfg)
            _drop_duplicates(kind, edges, alive, rows.ids, rules, details, cluster)
            dedup_counts[kind] = before - int(alive.sum())
            funnel.append({"step": f"{kind} duplicates", "remaining": int(alive.sum()), "dropped": dedup_counts[kind]})

    xy: dict[int, tuple[float, float]] = {}
    if cfg.map.enabled and len(has_text):
        rng = np.random.RandomState(seed)
        pick = np.arange(len(has_text), dtype=np.int64)
        if len(pick) > cfg.map.max_points:
            pick = np.sort(rng.choice(len(pick), cfg.map.max_points, replace=False)).astype(np.int64)
        with steps.step(f"project ({cfg.map.method})", len(pick), bar=False):
            coords = _cached_projection(out_dir, emb[pick], [texts[k] for k in pick], embedder.key, cfg, seed)
        for k, (x, y) in zip(pick.tolist(), coords.tolist(), strict=True):
            xy[has_text[k]] = (x, y)

    result = Curation(
        rows=rows, rules=rules, details=details, cluster=cluster, funnel=funnel, sources=stats,
        excluded=excluded, topic=topic, subtopic=subtopic, topic_table=topic_table, xy=xy,
        embed_model=embedder.key, steps=steps, dedup_counts=dedup_counts, eval_copies=copies,
        eval_items=len(index.items) if index is not None else 0,
    )  # fmt: skip
    with steps.step("decide", n, bar=False):
        write_decisions(store, result)
    with steps.step("export", int(sum(result.kept)), bar=False):
        outputs.write_outputs(out_dir, result, cfg, seed=seed, title=title)
    return result


EVAL_COPY = "eval.copy"


def _eval_copies(
    ngram_hits: list[tuple[str, str] | None],
    index: decontam.EvalIndex | None,
    store: Store,
    embedder: embed.Embedder,
    emb: NDArray[np.float32],
    has_text: list[int],
    cfg: CurateConfig,
) -> dict[int, str]:
    """Rows holding an eval item — a shared n-gram, or an embedding as close as a copy's — and why."""
    found = {i: f"eval item {hit[0]}: shares {hit[1]!r}" for i, hit in enumerate(ngram_hits) if hit is not None}
    threshold = cfg.decontaminate.semantic_threshold
    if index is None or threshold is None or not len(has_text):
        return found
    eval_emb = embed.embed(store, embedder, decontam.eval_pair_texts(index.items), cfg.embed.batch_size)
    best, score = decontam.semantic_matches(emb, eval_emb, threshold)
    for k in np.flatnonzero(best >= 0).tolist():
        found.setdefault(has_text[k], f"eval item {index.items[best[k]].id}: embedding cosine {score[k]:.3f}")
    return found


def _source_profiles(
    rows: Rows,
    ok: NDArray[np.bool_],
    in_near: NDArray[np.bool_],
    emb: NDArray[np.float32],
    emb_row: NDArray[np.int64],
    sub_of_row: NDArray[np.int64],
    cfg: CurateConfig,
    seed: int,
) -> list[diversity.SourceProfile]:
    stats = []
    sources = np.asarray(rows.sources, dtype=object)
    for source in sorted(set(rows.sources)):
        idx = np.flatnonzero((sources == source) & ok)
        if not len(idx):
            continue
        e = emb_row[idx]
        stats.append(
            diversity.source_profile(
                source,
                [rows.prompts[i] for i in idx],
                [rows.responses[i] or "" for i in idx],
                in_near[idx],
                emb[e] if len(emb) and (e >= 0).all() else None,
                sub_of_row[idx] if (sub_of_row[idx] >= 0).all() and len(idx) >= 30 else None,
                cfg.diversity.sample,
                seed,
            )
        )
    return stats


def _dedup_kinds(cfg: CurateConfig) -> list[str]:
    """The enabled duplicate kinds, in the order they are applied."""
    d = cfg.dedup
    on = [what for what in ("pair", "prompt") if what in d.scope]
    kinds = [f"exact-{w}" for w in on if d.exact] + [f"near-{w}" for w in on if d.near]
    return kinds + (["semantic"] if d.semantic else [])


def _duplicate_edges(
    kind: str,
    alive: NDArray[np.int64],
    keys: dict[str, NDArray[np.uint64]],
    sigs: dict[str, NDArray[np.uint32]],
    emb: NDArray[np.float32],
    emb_row: NDArray[np.int64],
    cfg: CurateConfig,
) -> NDArray[np.int64]:
    """Duplicate links of one kind among the rows still kept (indices into all rows)."""
    method, _, what = kind.partition("-")
    if method == "exact":
        local = dedup.exact_duplicate_edges(keys[what][alive])
    elif method == "near":
        local = dedup.near_duplicate_edges(sigs[what], cfg.dedup.threshold, alive)
    else:
        alive = alive[emb_row[alive] >= 0]
        if not len(alive):
            return np.zeros((0, 2), dtype=np.int64)
        local = dedup.semantic_duplicate_edges(emb[emb_row[alive]], cfg.dedup.semantic_threshold)
    edges = alive[local]
    if what == "prompt":
        edges = _same_answer_edges(edges, sigs["answer"], cfg.dedup.prompt_answer_threshold)
    return edges


def _same_answer_edges(edges: NDArray[np.int64], answers: NDArray[np.uint32], threshold: float) -> NDArray[np.int64]:
    """Of pairs linked by their prompts, the links between those whose answers are alike too.

    Within each group of linked prompts, pairs in row order join the most similar answer kept so far
    when it is at least `threshold` similar (MinHash Jaccard), or are kept: the GPT4All data holds
    several good answers to one prompt, and only repeats of an answer are duplicates."""
    if not len(edges):
        return edges
    members = np.unique(edges)
    group = members[dedup.clusters(len(members), np.searchsorted(members, edges))]
    order = np.argsort(group, kind="stable")  # members stay in row order within a group
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    out: list[tuple[int, int]] = []
    for part in np.split(members[order], bounds):
        reps: list[int] = []
        for i in part.tolist():
            sims = [float((answers[r] == answers[i]).mean()) for r in reps]
            best = int(np.argmax(sims)) if sims else -1
            if best >= 0 and sims[best] >= threshold:
                out.append((reps[best], i))
            else:
                reps.append(i)
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _drop_duplicates(
    kind: str,
    edges: NDArray[np.int64],
    alive: NDArray[np.bool_],
    ids: Sequence[int],
    rules: list[list[str]],
    details: list[dict[str, str]],
    cluster: list[str | None],
) -> None:
    """Keep the first row of each cluster and drop the rest."""
    if not len(edges):
        return
    members = np.unique(edges)
    local = np.searchsorted(members, edges)
    rep = members[dedup.clusters(len(members), local)]
    rule = f"dup.{kind}"
    for i, r in zip(members.tolist(), rep.tolist(), strict=True):
        name = f"{kind}:{ids[r]}"
        if cluster[i] is None:
            cluster[i] = name
        if i != r:
            alive[i] = False
            rules[i].append(rule)
            details[i][rule] = f"duplicate of response {ids[r]}"


def _topic_table(found: topics.Topics) -> list[dict[str, Any]]:
    sizes = np.bincount(found.subtopic, minlength=len(found.subtopic_labels))
    table: list[dict[str, Any]] = []
    for t, label in enumerate(found.topic_labels):
        subs = sorted(
            (s for s in range(len(found.subtopic_labels)) if found.subtopic_parent[s] == t), key=lambda s: -sizes[s]
        )
        table.append({
            "id": f"T{t}",
            "label": label,
            "size": int(sizes[subs].sum()),
            "subtopics": [{"id": f"T{t}.{s}", "label": found.subtopic_labels[s], "size": int(sizes[s])} for s in subs],
        })  # fmt: skip
    table.sort(key=lambda row: -row["size"])
    return table


def _cached_projection(
    out_dir: Path, emb: NDArray[np.float32], texts: list[str], model_key: str, cfg: CurateConfig, seed: int
) -> NDArray[np.float32]:
    """The map coordinates, reused when the same texts were projected with the same settings."""
    h = hashlib.sha256(json.dumps([model_key, cfg.map.method, cfg.map.perplexity, seed]).encode())
    for t in texts:
        h.update(embed.text_hash(t).encode())
    path = out_dir / "work" / f"projection-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        xy = np.load(path)
        if xy.shape == (len(texts), 2):
            return np.asarray(xy, dtype=np.float32)
    xy = project.project(emb, cfg.map.method, perplexity=cfg.map.perplexity, seed=seed)
    with atomic.output_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, xy)
    return xy


def write_decisions(store: Store, c: Curation) -> None:
    """Replace every decision at once: a killed curation leaves the previous complete set."""
    rows = []
    for i, rid in enumerate(c.rows.ids):
        x, y = c.xy.get(i, (None, None))
        rows.append(decisions.Decision(rid, c.rules[i], c.cluster[i], c.details[i], c.topic[i], c.subtopic[i], x, y))
    decisions.replace_all(store, rows)
