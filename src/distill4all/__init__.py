"""distill4all: distil an assistant chatbot from a teacher model, end to end, offline by default."""

import os

__version__ = "0.1.0"

# Offline by default: nothing reaches a model hub unless the user sets HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
