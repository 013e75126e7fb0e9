"""Stage `curate`: filters, dedup, embeddings, topic map, per-source diversity, curated export."""
