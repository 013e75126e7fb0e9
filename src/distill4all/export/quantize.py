"""Quantize a GGUF file with llama.cpp's own quantizer (llama-cpp-python exposes it).

llama.cpp decides the per-tensor types (e.g. Q4_K_M keeps some tensors at Q6_K, and rows too
short for a K-quant block fall back to a compatible type), exactly as its `llama-quantize` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from distill4all import atomic
from distill4all.errors import ExportError

QUANT_TYPES: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def quantize(src: Path, dst: Path, kind: str) -> None:
    """Write `dst` as `src` quantized to `kind` (one of QUANT_TYPES), atomically."""
    import llama_cpp
    from llama_cpp import _logger

    if kind not in QUANT_TYPES:
        raise ExportError(f"unknown quantization {kind!r}; choose from {', '.join(QUANT_TYPES)}")
    _logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with atomic.output_file(dst) as tmp, native_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            last = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise ExportError(f"llama.cpp could not quantize {src} to {kind} (code {rc}): {last}")


@contextlib.contextmanager
def native_stderr() -> Iterator[Path]:
    """Send what native code writes to stderr into a file for the duration.

    llama.cpp's quantizer prints a line per tensor (e.g. K-quant fallbacks on narrow rows) with
    no way to turn it off; our progress bar says what is going on, and a failure quotes the file.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "stderr.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
