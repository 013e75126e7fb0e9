"""Collector throughput against a local teacher that answers after a fixed delay.

Prints, from one run: our requests/s at 64 and 256 in flight vs the concurrency/latency bound
(in_flight / delay), vs a naive sequential `openai` client loop and vs an unthrottled
`asyncio.gather` over `AsyncOpenAI`; our client CPU time per request (ledger writes included);
and the ledger's write rate. Targets: ≥0.9 of the bound at 256 in flight, <1 ms CPU per request.

    python bench/collect.py [--delay 0.5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from _results import table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from distill4all.config import Price, TeacherConfig
from distill4all.store import Store, tasks
from distill4all.store.prompts import Prompt, prompt_id
from distill4all.teacher.answers import answer_pending
from distill4all.teacher.client import TeacherClient
from distill4all.teacher.cost import Budget
from distill4all.teacher.limiter import RateLimiter
from servers import start_stub_process


def ours(url: str, n: int, in_flight: int) -> tuple[float, float]:
    """requests/s and client CPU ms per request (HTTP, JSON, limiter, ledger commits)."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "s.sqlite")
        texts = [f"benchmark prompt {i} about something" for i in range(n)]
        tasks.add_prompts(store, [Prompt(prompt_id("b", t), "b", t) for t in texts], [("t", 1)])
        teacher = TeacherConfig(name="t", model="m", max_tokens=20, concurrency=in_flight)
        client = TeacherClient(url, api_key=None, timeout_s=60, max_retries=3, limiter=RateLimiter(None, None),
                               max_connections=in_flight)  # fmt: skip

        async def go() -> None:
            try:
                await answer_pending(store, teacher, client, Price(input=0, output=0), Budget(None), batch_size=256)
            finally:
                await client.aclose()

        cpu0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(go())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert store.count("SELECT COUNT(*) FROM responses") == n
        store.close()
    return n / wall, cpu / n * 1000


def openai_sequential(url: str, n: int) -> float:
    from openai import OpenAI

    c = OpenAI(base_url=url, api_key="x", max_retries=0)
    t0 = time.perf_counter()
    for i in range(n):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"p{i}"}], max_tokens=20)
    return n / (time.perf_counter() - t0)


def openai_gather(url: str, n: int) -> tuple[float, float, int]:
    """Answers/s, CPU ms a request, and how many requests failed (it has no limiter and no retries)."""
    from openai import AsyncOpenAI

    async def go() -> list[object]:
        c = AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        out = await asyncio.gather(
            *(c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"p{i}"}], max_tokens=20)
              for i in range(n)),
            return_exceptions=True,
        )  # fmt: skip
        await c.close()
        return out

    cpu0, t0 = time.process_time(), time.perf_counter()
    results = asyncio.run(go())
    wall = time.perf_counter() - t0
    failed = sum(isinstance(r, BaseException) for r in results)
    return (n - failed) / wall, (time.process_time() - cpu0) / n * 1000, failed


def ledger_rate(n: int = 20_000, batch: int = 64) -> float:
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "s.sqlite")
        texts = [f"ledger prompt {i}" for i in range(n)]
        tasks.add_prompts(store, [Prompt(prompt_id("b", t), "b", t) for t in texts], [("t", 1)])
        claimed = tasks.claim(store, "t", n)
        answers = [tasks.Answer(t, "m", "an answer of some length " * 8, "stop", 30, 60, 0.5, 0.0, {"max_tokens": 60})
                   for t in claimed]  # fmt: skip
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            tasks.record(store, answers[i : i + batch], [])
        rate = n / (time.perf_counter() - t0)
        store.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--write", action="store_true", help="replace the collect section of bench/RESULTS.md")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    proc, url = start_stub_process(args.delay, words=20)
    rows = []
    try:
        ours(url, 64, 64)  # warm up: imports, connections
        for in_flight, n in ((64, int(1280 * scale)), (256, int(5120 * scale))):
            bound = in_flight / args.delay
            rps, cpu_ms = ours(url, n, in_flight)
            rows.append(
                [
                    f"ours, {in_flight} in flight",
                    f"{n}",
                    f"{rps:.1f}",
                    f"{bound:.0f}",
                    f"{rps / bound:.3f}",
                    f"{cpu_ms:.3f}",
                ]
            )
        n_gather = int(5120 * scale)
        g_rps, g_cpu, g_failed = openai_gather(url, n_gather)
        label = "AsyncOpenAI + asyncio.gather (unthrottled)" + (f", {g_failed} failed" if g_failed else "")
        rows.append([label, f"{n_gather}", f"{g_rps:.1f}", "-", "-", f"{g_cpu:.3f}"])
        n_seq = 10
        s_rps = openai_sequential(url, n_seq)
        rows.append(
            [
                "OpenAI client, sequential loop",
                f"{n_seq}",
                f"{s_rps:.2f}",
                f"{1 / args.delay:.0f}",
                f"{s_rps * args.delay:.3f}",
                "-",
            ]
        )
    finally:
        proc.kill()
        proc.wait()
    ours256 = float(rows[1][2])
    rate = ledger_rate()
    body = table(["client", "requests", "req/s", "bound req/s", "of bound", "client CPU ms/req"], rows)
    body += (
        f"\n\nTeacher delay {args.delay} s per answer. Ours at 256 in flight: {ours256 / g_rps:.2f}× the unthrottled "
        f"AsyncOpenAI gather, {ours256 / s_rps:.0f}× the sequential loop. Ledger write rate (64 answers a "
        f"transaction): {rate:,.0f} answers/s.\n\n"
        "Targets: ≥0.9 of the bound at 256 in flight; <1 ms client CPU per request."
    )
    print(body)
    if args.write:
        write_section("collect", body, headlines=[
            {"figure": "teacher requests/s, 256 in flight", "ours": f"{ours256:.0f}",
             "peer": f"AsyncOpenAI gather {g_rps:.0f}", "ratio": f"{ours256 / g_rps:.2f}×",
             "target": "≥0.9 of bound"},
            {"figure": "client CPU per request", "ours": f"{float(rows[1][5]):.3f} ms",
             "peer": f"AsyncOpenAI {g_cpu:.3f} ms", "ratio": f"{g_cpu / float(rows[1][5]):.1f}× less",
             "target": "<1 ms"},
        ])  # fmt: skip


if __name__ == "__main__":
    main()
