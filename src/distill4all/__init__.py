"""distill4all: distil an assistant chatbot from a teacher model, end to end, offline by default."""

import os

__version__ = "0.1.0"


def offline_defaults() -> None:
    """Offline by default: nothing reaches a model hub unless the user sets HF_HUB_OFFLINE=0.

    Called where our programs start (the CLI, the train worker) and before a model loads (the
    Python API), not at import: importing the package leaves the environment alone. It must run
    before huggingface_hub is imported, which reads these once. Values the user set are kept.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def __getattr__(name: str) -> object:
    # The Python API, imported on first use so that `import distill4all` stays light.
    if name in ("Assistant", "ChatSession"):
        from distill4all.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'distill4all' has no attribute {name!r}")
