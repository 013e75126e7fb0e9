"""Structured answers for the OpenAI API: `response_format` (a JSON object, or JSON following a
schema) and tool calls, as GBNF grammars llama.cpp samples under.

llama-cpp-python converts JSON Schema to GBNF (its port of llama.cpp's converter); what is written
here is the layout of a tool call — one JSON object `{"name": …, "arguments": {…}}`, as the
function-calling chat formats of llama-cpp-python and Hermes-style models write it — the tool list
the model is shown, and reading a call back into OpenAI's `tool_calls` shape.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from distill4all.errors import UserError


class StructureError(UserError):
    """A schema or tool definition that cannot become a grammar."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]


def schema_grammar(schema: dict[str, Any] | bool, what: str) -> str:
    """GBNF for JSON that follows `schema`."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as e:
        raise StructureError(f"{what} cannot be followed: {type(e).__name__}: {e}") from None


def json_object_grammar() -> str:
    """`response_format: json_object`: any JSON object."""
    return schema_grammar({"type": "object"}, "json_object")


def _call_schema(functions: list[Function]) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"oneOf": calls}


_ROOT = re.compile(r"^root ::=", re.M)


def tools_grammar(functions: list[Function], required: bool) -> str:
    """A call to one of `functions`; unless `required`, plain text instead (any answer that does
    not open with `{`)."""
    grammar = schema_grammar(_call_schema(functions), "tools")
    if required:
        return grammar
    return _ROOT.sub("tool-call ::=", grammar, count=1) + "\nroot ::= tool-call | free-text\nfree-text ::= [^{] .*\n"


def tools_prompt(functions: list[Function], required: bool) -> str:
    """What the model is told (as a system message) about the functions it may call."""
    listing = json.dumps(
        [{"name": f.name, "description": f.description, "parameters": f.parameters} for f in functions],
        ensure_ascii=False,
    )
    how = "Call one of them" if required else "To call one of them, answer"
    return (
        f"You can call these functions: {listing}\n{how} with only a JSON object "
        '{"name": <function name>, "arguments": <its arguments as an object>}.'
    )


def history_text(calls: list[dict[str, Any]]) -> str:
    """An assistant turn that called tools, written as the model is asked to write calls."""
    lines = []
    for c in calls:
        try:
            arguments = json.loads(c["arguments"])
        except (json.JSONDecodeError, TypeError):
            arguments = c["arguments"]
        lines.append(json.dumps({"name": c["name"], "arguments": arguments}, ensure_ascii=False))
    return "\n".join(lines)


def read_call(text: str, functions: list[Function]) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry for an answer that is a call to one of `functions`, else None."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    names = {f.name for f in functions}
    if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments"), dict)):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)},
    }
