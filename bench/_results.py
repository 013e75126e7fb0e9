"""Shared by the benchmarks: machine info and writing one section of bench/RESULTS.md."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADLINES = Path(__file__).parent / "headlines.json"
HEADER = "# Benchmark results\n\nWritten by `make bench`; each section by its own `bench/*.py`.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM" + (f", {gpu}" if gpu else ", no GPU")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_section(name: str, body: str, headlines: list[dict[str, str]] | None = None) -> None:
    """Replace (or add) the section `name` of RESULTS.md, leaving the other benchmarks' sections,
    and this benchmark's rows of the summary table at the top (each row: figure, ours, peer,
    ratio, target)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{start}\n## {name}\n\n_{stamp} · {machine()}_\n\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    if headlines is not None:
        rows = json.loads(HEADLINES.read_text()) if HEADLINES.exists() else {}
        rows[name] = [h | {"measured": stamp} for h in headlines]
        HEADLINES.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    RESULTS.write_text(with_summary(text))


def with_summary(text: str) -> str:
    """RESULTS.md with its summary table (from headlines.json) right under the title."""
    rows = json.loads(HEADLINES.read_text()) if HEADLINES.exists() else {}
    lines = [
        [bench, h["figure"], h["ours"], h["peer"], h["ratio"], h.get("target", ""), h["measured"][:10]]
        for bench, hs in rows.items()
        for h in hs
    ]
    summary = (
        "<!-- summary:start -->\n## Summary\n\nEach figure beside its peer, measured in the same run of its "
        "benchmark (the sections below have the details and the machine).\n\n"
        + table(["bench", "figure", "ours", "peer", "ours vs peer", "target", "measured"], lines)
        + "\n<!-- summary:end -->"
    )
    if "<!-- summary:start -->" in text:
        return re.sub(r"<!-- summary:start -->.*?<!-- summary:end -->", lambda _: summary, text, flags=re.S)
    head, _, rest = text.partition("\n\n<!--")
    return f"{head.rstrip()}\n\n{summary}\n\n<!--{rest}" if rest else f"{text.rstrip()}\n\n{summary}\n"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
