"""The terminal chat: `distill4all chat MODEL`.

Interactive on a terminal (a `>>>` prompt, line editing); with stdin piped, each line is one user
turn and only the answers go to stdout, so `echo "Hi" | distill4all chat MODEL` is scriptable.
Commands: /reset, /system TEXT, /help, /exit. Ctrl-C stops the answer being written.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

from distill4all.errors import UserError
from distill4all.runtime.api import Assistant, ChatSession

HELP = "/reset  forget the conversation · /system TEXT  set the system prompt and reset · /exit  quit"


def _lines(stdin: TextIO, interactive: bool) -> object:
    while True:
        if interactive:
            try:
                yield input(">>> ")
            except EOFError:
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
            yield line.rstrip("\r\n")


def _command(session: ChatSession, line: str, err: Console) -> bool:
    """Run a /command; False means exit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd == "/reset":
        session.reset()
        err.print("[dim]conversation reset[/dim]")
    elif cmd == "/system":
        session.reset(system=arg.strip())
        err.print(f"[dim]system prompt {'set' if arg.strip() else 'cleared'}; conversation reset[/dim]")
    elif cmd == "/help":
        err.print(HELP)
    else:
        err.print(f"unknown command {cmd}; {HELP}")
    return True


def chat_loop(
    assistant: Assistant,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    quiet: bool = False,
) -> int:
    """Run the chat until /exit or end of input; returns the number of answers given."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    err = Console(stderr=True, quiet=quiet, highlight=False)
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        engine = assistant.engine
        err.print(f"[bold]{assistant.name}[/bold] ({engine.backend}, context {engine.n_ctx} tokens). {HELP}")
    session = assistant.chat_session(system=system)
    answers = 0
    for line in _lines(stdin, interactive):  # type: ignore[attr-defined]
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip(), err):
                break
            continue
        try:
            stream = session.send(line, stream=True)
        except UserError as e:
            err.print(f"error: {e}")
            continue
        try:
            for piece in stream:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # type: ignore[attr-defined]  # a generator
            err.print("\n[dim](stopped)[/dim]")
        stdout.write("\n")
        stdout.flush()
        answers += 1
        c = session.last
        if c is not None:
            cut = ", cut at --max-tokens" if c.finish_reason == "length" else ""
            err.print(
                f"[dim]{c.completion_tokens} tokens · {c.decode_tokens_per_second:.1f} tokens/s · "
                f"prompt {c.prompt_tokens} tokens in {c.prompt_seconds:.2f}s{cut}[/dim]"
            )
    return answers
