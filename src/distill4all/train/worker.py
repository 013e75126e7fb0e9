"""Entry point of one training process under `accelerate launch`:

    accelerate launch --config_file CONFIG --num_processes N -m distill4all.train.worker JOB.json

The train stage writes JOB.json (see loop.Job) after preparing the data, and runs this command
itself when train.num_processes > 1 or train.launcher is accelerate; on a cluster, run it with the
cluster's own launcher instead (docs/train.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from pathlib import Path

from distill4all import offline_defaults
from distill4all.errors import UserError


def die_with_parent() -> None:
    """Linux: get SIGKILL when the launching process dies, so a killed stage leaves no stray trainer."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    die_with_parent()
    offline_defaults()  # a cluster's launcher starts this without our CLI
    if len(argv) != 1:
        print("usage: python -m distill4all.train.worker JOB.json", file=sys.stderr)
        return 2
    from distill4all.train.loop import Job, train

    try:
        train(Job.from_json(Path(argv[0]).read_text(encoding="utf-8")))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
