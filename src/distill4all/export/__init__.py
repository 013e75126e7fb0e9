"""Stage `export`: merge a LoRA adapter, write GGUF, quantize with llama.cpp, report the cost."""

from distill4all.errors import UserError


class ExportError(UserError):
    """A checkpoint cannot be exported (unsupported architecture or tokenizer, failed quantization)."""
