"""The run store: one SQLite file (WAL) that is the contract between stages.

Tables (schema version 6):
  meta        key/value facts about the store itself
  stages      one row per stage: status, attempts, timings, counts, costs, fingerprints
  prompts     every prompt gathered, with its source tag and original metadata
  tasks       the collection ledger: one row per (prompt, teacher, sample): pending/inflight/done/failed
  responses   every answer received: text, finish reason, usage, latency, request params
  response_logprobs  the teacher's top-K logprobs at every answer token, one row per response (v3)
  decisions   curation: one row per response, kept or dropped with the rules that dropped it,
              the rules' details, its near-duplicate cluster, topic and map coordinates (v2)
  embeddings  the curation's embedding cache, keyed by model and text hash (v2)
  file_hashes sha256 of input files, cached by (path, size, mtime) so big files hash once
  outputs     every file and folder a stage wrote, claimed before it was written: what --force removes (v6)

Modules: every query lives in this package, one module per table family, whose functions take
the `Store` first (e.g. `tasks.claim(store, teacher, limit)`):
  schema.py       the tables, and MIGRATIONS (schema version in `PRAGMA user_version`)
  db.py           Store: the connection, migrations, `transaction()`, `backup_to()`; errors of the
                  file or its disk (damaged, read-only, full) as StoreError naming it
  stages.py       stage rows (StageRow), for the runner
  meta.py         run name and creation time
  prompts.py      Prompt and the prompt id rule; prompt lookups
  tasks.py        the request ledger: add, claim, record, requeue, release, counts, reset
  responses.py    answers read back as pairs; imported pairs
  logprobs.py     the answers' logprobs: their binary format, and `for_responses` to read them
  decisions.py    curation's decisions
  embeddings.py   the embedding cache
  file_hashes.py  input file hashes
  outputs.py      the ledger of the stages' own files (Ledger.claim refuses a file the run did not write)
"""

from __future__ import annotations

from distill4all.store.db import Store
from distill4all.store.schema import MIGRATIONS, SCHEMA_VERSION
from distill4all.store.stages import StageRow

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "StageRow", "Store"]
