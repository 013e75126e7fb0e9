"""Stage `export`: merge a LoRA adapter, write GGUF, quantize with llama.cpp, report the cost."""
