"""Stage `eval`: the paper's Self-Instruct ground-truth perplexity, a corrected version of it,
model comparison with paired statistics, and an LLM-judge win rate."""
