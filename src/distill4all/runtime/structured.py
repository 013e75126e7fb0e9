r"""Structured answers for the OpenAI API: `response_format` (a JSON object, or JSON following a
schema) and tool calls, as GBNF grammars llama.cpp samples under.

llama-cpp-python converts JSON Schema to GBNF (its port of llama.cpp's converter); what is written
here is the layout of a tool call — one JSON object `{"name": …, "arguments": {…}}`, as the
function-calling chat formats of llama-cpp-python and Hermes-style models write it — the tool list
the model is shown, and reading a call back into OpenAI's `tool_calls` shape.

A schema comes from a request, so it is checked before the converter reads it: the converter
assumes well-formed schemas (a `$ref` that is not a string, a `pattern` that is not one, a
subschema that is a list all raise), writes every repetition out (`minLength: 10**9` was a 5 GB
string) and passes regex escapes GBNF does not know (`\d`, `\.`) into the grammar unchanged;
the shorthand classes and escaped punctuation are rewritten into what GBNF reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from distill4all.errors import UserError


class StructureError(UserError):
    """A schema or tool definition that cannot become a grammar; `param` names the field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


MAX_REPEAT = 1000  # the largest count a schema may give (minLength, maxItems, a pattern's {m,n}): each is written out
MAX_REPEATS = 50_000  # their sum over one schema, which bounds the grammar's size


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]
    where: str = "tools"  # its parameters' place in the request, for errors


ANY_JSON: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}


def schema_grammar(schema: dict[str, Any] | bool, what: str) -> str:
    """GBNF for JSON that follows `schema` (`what` is its place in the request, for errors)."""
    if schema is False:
        raise StructureError(f"{what} is false: no answer can follow it", what)
    checked, _ = checked_schema(ANY_JSON if schema is True else schema, what)
    return _gbnf(checked, what)


def _gbnf(checked: dict[str, Any], what: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(checked)))
    except Exception as e:  # the converter's own checks are asserts, index and type errors on bad input
        raise StructureError(f"{what} cannot be followed: {type(e).__name__}: {str(e)[:200]}", what) from None


_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> subschema, where the converter reads them
_SCHEMA_LISTS = ("oneOf", "anyOf", "allOf", "prefixItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
_QUANTIFIER = re.compile(r"\{([^}]*)\}")


def checked_schema(schema: Any, what: str) -> tuple[dict[str, Any], int]:
    """A copy of `schema` the converter can read, with its patterns in GBNF's dialect, and the sum
    of its counts; else a StructureError naming the first field that is not (its path from `what`)."""
    schema = json.loads(json.dumps(schema))  # a copy to rewrite patterns in; its depth is the body's
    total = 0
    todo: list[tuple[Any, str]] = [(schema, what)]
    while todo:
        node, path = todo.pop()
        if not isinstance(node, dict):
            raise StructureError(f"{path} must be a schema (a JSON object), not {json.dumps(node)[:40]}", path)
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            raise StructureError(f"{path}.$ref must point inside the schema (\"#/…\"), not {json.dumps(ref)[:40]}",
                                 f"{path}.$ref")  # fmt: skip
        counts = [(f"{path}.{key}", node[key]) for key in _COUNTS if node.get(key) is not None]
        if "pattern" in node:
            pattern = node["pattern"]
            if not isinstance(pattern, str):
                where = f"{path}.pattern"
                raise StructureError(f"{where} must be a string, not {json.dumps(pattern)[:40]}", where)
            counts += [(f"{path}.pattern", n) for n in _quantifier_counts(pattern)]
            node["pattern"] = gbnf_pattern(pattern)
        for where, n in counts:
            if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_REPEAT):
                raise StructureError(f"{where}: {json.dumps(n)[:40]} is not a count from 0 to {MAX_REPEAT} (this "
                                     "server's limit: each repetition is written into the grammar)", where)  # fmt: skip
            total += n
        if total > MAX_REPEATS:
            raise StructureError(f"{what} repeats {total} times in all (minLength, maxItems, {{m,n}} …); at most "
                                 f"{MAX_REPEATS} are allowed", what)  # fmt: skip
        for key in _SCHEMA_MAPS:
            if (sub := node.get(key)) is not None:
                if not isinstance(sub, dict):
                    raise StructureError(f"{path}.{key} must be an object of schemas", f"{path}.{key}")
                todo += [(v, f"{path}.{key}.{k}") for k, v in sub.items()]
        for key in _SCHEMA_LISTS:
            if (sub := node.get(key)) is not None:
                if not isinstance(sub, list):
                    raise StructureError(f"{path}.{key} must be a list of schemas", f"{path}.{key}")
                todo += [(v, f"{path}.{key}.{i}") for i, v in enumerate(sub)]
        if (items := node.get("items")) is not None:
            subs = enumerate(items) if isinstance(items, list) else [(None, items)]
            todo += [(v, f"{path}.items" + ("" if i is None else f".{i}")) for i, v in subs]
        if (extra := node.get("additionalProperties")) is not None and not isinstance(extra, bool):
            todo.append((extra, f"{path}.additionalProperties"))
    assert isinstance(schema, dict)
    return schema, total


def _quantifier_counts(pattern: str) -> list[int]:
    """The numbers in a pattern's {m}, {m,} and {m,n}, read as the converter reads them (int())."""
    out = []
    for m in _QUANTIFIER.finditer(pattern):
        for part in m.group(1).split(","):
            with contextlib.suppress(ValueError):  # not a number: the converter refuses it itself
                if part.strip():
                    out.append(int(part))
    return out


# Regex shorthand GBNF has no escape for: inside a character class, and as a class of its own.
# \s is narrowed to a space and the negated classes leave out what a JSON string must escape
# (quote, backslash, control characters), so what is sampled still matches and stays JSON.
_IN_CLASS = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_ALONE = {"d": "[0-9]", "w": "[a-zA-Z0-9_]", "s": "[ ]", "D": r'[^0-9"\\\x00-\x1F\x7F]',
          "W": r'[^a-zA-Z0-9_"\\\x00-\x1F\x7F]', "S": r'[^ "\\\x00-\x1F\x7F]'}  # fmt: skip
_PUNCTUATION = frozenset(".-/^$!#%&',:;<=>@_`~")  # escaped in a regex, unknown escapes to GBNF


def gbnf_pattern(pattern: str) -> str:
    r"""`pattern` with the regex escapes GBNF cannot read rewritten: \d, \w, \s (and, outside a
    class, \D, \W, \S) as classes, escaped punctuation as a hex escape (a class of one outside
    a class, so a quantifier after it applies to it whole)."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            i += 2
            if in_class and e in _IN_CLASS:
                out.append(_IN_CLASS[e])
            elif not in_class and e in _ALONE:
                out.append(_ALONE[e])
            elif e in _PUNCTUATION:
                out.append(f"\\x{ord(e):02X}" if in_class else f"[\\x{ord(e):02X}]")
            else:
                out.append(c + e)
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:  # the converter ends a class at its first unescaped ]
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def json_object_grammar() -> str:
    """`response_format: json_object`: any JSON object."""
    return _gbnf({"type": "object"}, "response_format")


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
    checked, total = [], 0
    for f in functions:
        parameters, repeats = checked_schema(f.parameters, f.where)
        checked.append(dataclasses.replace(f, parameters=parameters))
        total += repeats
    if total > MAX_REPEATS:
        raise StructureError(f"the tools' parameters repeat {total} times in all; at most {MAX_REPEATS} are allowed",
                             "tools")  # fmt: skip
    grammar = _gbnf(_call_schema(checked), "tools")
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
    """An assistant turn that called tools, written as the model is asked to write calls; a
    StructureError names the call (its index in `calls`) whose arguments nest too deep to read."""
    lines = []
    for i, c in enumerate(calls):
        try:
            try:
                arguments = json.loads(c["arguments"])
            except (json.JSONDecodeError, TypeError):
                arguments = c["arguments"]
            lines.append(json.dumps({"name": c["name"], "arguments": arguments}, ensure_ascii=False))
        except RecursionError:
            raise StructureError("the arguments nest too deep to read", str(i)) from None
    return "\n".join(lines)


def read_call(text: str, functions: list[Function]) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry for an answer that is a call to one of `functions`, else None."""
    try:
        obj = json.loads(text)
        names = {f.name for f in functions}
        if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments"), dict)):
            return None
        arguments = json.dumps(obj["arguments"], ensure_ascii=False)
    except (json.JSONDecodeError, RecursionError):  # free text, which may nest brackets deep
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}  # fmt: skip
