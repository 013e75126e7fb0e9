"""A local teacher: `distill4all serve MODEL` started on a free 127.0.0.1 port for the duration of
the stage, so a local model and a remote API go through the very same HTTP client and ledger."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from distill4all.errors import ModelError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the collector dies, even by SIGKILL (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_teacher(model: str, *, log_path: Path, startup_timeout_s: float = 600.0) -> Iterator[tuple[str, str]]:
    """Serve `model` locally; yield (base_url, model id as the server names it)."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "distill4all", "--quiet", "serve", model, "--host", "127.0.0.1"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        model_id = _wait_ready(proc, base_url, startup_timeout_s, log_path)
        yield base_url, model_id
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout_s: float, log_path: Path) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise ModelError(f"the local teacher server exited with code {proc.returncode}: {tail[0]}")
        try:
            r = httpx.get(f"{base_url}/models", timeout=2.0)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.25)
    raise ModelError(f"the local teacher server did not start within {timeout_s:.0f}s (log: {log_path})")
