"""Stage `train`: LoRA or full fine-tuning of a causal LM on prompt/response pairs (see stage.py)."""
