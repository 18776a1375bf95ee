"""Tool calling: tools into the prompt, calls out of the reply.

Into the prompt: a model whose chat template takes `tools` (it uses the variable) gets them there, and
the history's assistant `tool_calls` and `tool` messages as HF templates expect them. A template
without tools gets the documented fallback, the Hermes/Qwen convention that many open models were
trained on:

- a system message (merged into the first one, if any) listing the functions as JSON and asking for
  calls as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- earlier calls written back into the assistant message in that form;
- each `tool` message becomes a user message `<tool_response>\\n...\\n</tool_response>`.

Out of the reply: the same blocks (also without the closing tag at the very end, and a bare
`{"name", "arguments"}` object as the whole reply, as Llama 3 writes them) become OpenAI `tool_calls`
when they name a served function. With `tool_choice` `required` or a named function the reply is
grammar-constrained to such blocks whose arguments validate against the function's `parameters`
(structured.py), so the calls always parse; with `auto` the model chooses, and what does not parse
as a call stays text.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

from .structured import Constraint

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}

FALLBACK_PROMPT = (
    "You may call these functions (JSON Schema):\n<tools>\n{tools}\n</tools>\n"
    "To call one, reply only with: <tool_call>\n{{\"name\": ..., \"arguments\": {{...}}}}\n</tool_call>"
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- into the prompt ---------------------------------------------------------------------------------
def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` (uses the variable), by Jinja's own parse."""
    if not template:
        return False
    try:
        from jinja2 import Environment, meta

        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:
        return "tools" in template


def template_tools(tools: list[dict]) -> list[dict]:
    """OpenAI's function tools as HF templates take them."""
    return [{"type": "function", "function": {k: v for k, v in tool.items() if v is not None}} for tool in tools]


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows nothing of tools (see the module's docstring)."""
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            blocks = [f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                      f"\n{CLOSE}" for c in message["tool_calls"]]
            text = _text(message.get("content"))
            out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + blocks)})
        elif role == "tool":
            answer = _text(message.get("content"))
            out.append({"role": "user", "content": f"<tool_response>\n{answer}\n</tool_response>"})
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        listing = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listing)
        first = out[0].get("content") if out and out[0].get("role") == "system" else None
        if isinstance(first, str):
            out[0] = {**out[0], "content": first + "\n\n" + prompt}
        elif isinstance(first, list):  # text parts (a VLM's images among them): one more part, which a text
            # model's parts, joined by newlines (chat_encoding.as_text), make the same text as a string's
            out[0] = {**out[0], "content": [*first, {"type": "text", "text": "\n" + prompt}]}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


# --- constrained calls ------------------------------------------------------------------------------
def call_constraint(tools: list[dict], choice: Any, parallel: bool) -> Constraint | None:
    """The grammar of a reply that must call tools (`required`), or the named one; None otherwise."""
    if choice == "required":
        chosen = tools
    elif isinstance(choice, dict):
        chosen = [tool for tool in tools if tool["name"] == choice["name"]]
    else:
        return None
    rules = []
    for i, tool in enumerate(chosen):
        arguments, definitions = _arguments_schema(tool.get("parameters"))
        schema = {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": arguments},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}, **definitions}
        rules.append(f"fn_{i}: %json {json.dumps(schema)}")
    body = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    repeat = "+" if parallel and choice == "required" else ""
    lark = "\n".join([f'start: call{repeat}', f'call: "{OPEN}\\n" ({body}) "\\n{CLOSE}\\n"', *rules])
    name = f"tool_choice {choice['name']!r}" if isinstance(choice, dict) else "tool_choice 'required'"
    return Constraint("lark", lark, "tools", name)


def _arguments_schema(parameters: dict | None) -> tuple[dict, dict]:
    """A function's `parameters` as the `arguments` of the call object, and the definitions to put at
    the call schema's root. Always an object (OpenAI's rule; without `"type": "object"` the grammar let
    a number through, which no call parses from). Its `$ref`s keep pointing into it once nested: "#" and
    "#/properties/..." gain the "/properties/arguments" prefix, `$defs` and `definitions` move to the root."""
    if not parameters:
        return dict(ANY_OBJECT), {}
    schema = copy.deepcopy(parameters)
    definitions = {key: schema.pop(key) for key in ("$defs", "definitions") if key in schema}
    schema.setdefault("type", "object")

    def moved(node: Any) -> Any:
        if isinstance(node, dict):
            out = {key: moved(value) for key, value in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and (ref == "#" or (ref.startswith("#/") and not ref.startswith(
                    ("#/$defs/", "#/definitions/")))):
                out["$ref"] = "#/properties/arguments" + ref[1:]
            return out
        if isinstance(node, list):
            return [moved(value) for value in node]
        return node

    return moved(schema), moved(definitions)


# --- out of the reply --------------------------------------------------------------------------------
# One scanner serves the whole reply (parse_calls) and the stream (CallStream), so the streamed calls and
# content are exactly the plain reply's. A block is `<tool_call>`, one JSON object read with the JSON
# decoder (a `</tool_call>` inside a string argument is the argument's), then `</tool_call>` or the end.
def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_not_json)  # a block with NaN / Infinity is text, not a call


def _scan(text: str, start: int, names: set[str], final: bool) -> tuple[list[tuple[str, Any]], int]:
    """The reply from `start` as ("text", str) and ("call", call) pieces, as far as they are settled;
    and where the settled part ends. Not `final`: a block still being written, or what may be the
    start of a tag, is left for later."""
    out: list[tuple[str, Any]] = []
    pos = i = start
    while True:
        at = text.find(OPEN, i)
        if at < 0:
            end = len(text) if final else len(text) - _partial_suffix(text[pos:], OPEN)
            if end > pos:
                out.append(("text", text[pos:end]))
            return out, max(end, pos)
        j = at + len(OPEN)
        while j < len(text) and text[j].isspace():
            j += 1
        try:
            value, after = _DECODER.raw_decode(text, j)
        except ValueError:
            if not final:  # still being written (or not JSON, which the end of the reply tells)
                if at > pos:
                    out.append(("text", text[pos:at]))
                return out, at
            i = j  # not a call: the tag stays text
            continue
        k = after
        while k < len(text) and text[k].isspace():
            k += 1
        if text.startswith(CLOSE, k):
            block_end = k + len(CLOSE)
        elif k == len(text) or CLOSE.startswith(text[k:]):
            if not final:
                if at > pos:
                    out.append(("text", text[pos:at]))
                return out, at
            block_end = len(text)
        else:
            i = j  # something else follows the object: not a block
            continue
        call = _call_value(value, names, text[j:after])
        if call is None:
            i = block_end  # a block that names no served function stays text
            continue
        if at > pos:
            out.append(("text", text[pos:at]))
        out.append(("call", call))
        pos = i = block_end


def _bare_call(text: str, names: set[str]) -> dict | None:
    """Llama 3 style: the whole reply is one call object."""
    try:
        return _call_value(_DECODER.decode(text.strip()), names, text.strip())
    except ValueError:
        return None


def parse_calls(text: str, tools: list[dict], parallel: bool = True) -> tuple[str | None, list[dict]]:
    """(content outside the calls, or None, calls) from a reply; no calls when none parses (the content
    is then the reply as written). Whitespace next to a call is left out, the reply's own kept: a stream
    can send text before it knows whether a call follows. With `parallel` false, the first call is kept
    and the others' blocks dropped."""
    return _parse(text, {tool["name"] for tool in tools}, parallel)


def _parse(text: str, names: set[str], parallel: bool) -> tuple[str | None, list[dict]]:
    pieces, _ = _scan(text, 0, names, final=True)
    calls = [piece for kind, piece in pieces if kind == "call"]
    if not calls:
        bare = _bare_call(text, names)
        return (None, [bare]) if bare is not None else (text, [])
    parts = []
    for i, (kind, piece) in enumerate(pieces):
        if kind == "text":
            if i > 0 and pieces[i - 1][0] == "call":
                piece = piece.lstrip()
            if i + 1 < len(pieces) and pieces[i + 1][0] == "call":
                piece = piece.rstrip()
            parts.append(piece)
    return "".join(parts) or None, calls if parallel else calls[:1]


def _call_value(value: Any, names: set[str], source: str) -> dict | None:
    """The call a parsed object (`source`: its text) makes, or None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    key = "arguments" if "arguments" in value else "parameters"
    arguments, written = value.get(key, {}), None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments, written = _DECODER.decode(arguments), arguments
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    try:
        text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a number no double holds (1e400) would become Infinity: the model's own text
        text = written if written is not None else _member_text(source, key)
    return {"id": new_call_id(), "type": "function", "function": {"name": value["name"], "arguments": text}}


def _member_text(source: str, key: str) -> str:
    """The text of the value of `key` (the last, as json.loads keeps) in the JSON object `source`."""
    space = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
    found, i = "{}", space(source, 1).end()
    while source.startswith('"', i):
        name, i = json.decoder.scanstring(source, i + 1)  # type: ignore[attr-defined]
        i = space(source, space(source, i).end() + 1).end()  # past ':'
        end = _DECODER.raw_decode(source, i)[1]
        if name == key:
            found = source[i:end]
        i = space(source, space(source, end).end() + 1).end()  # past ','
    return found


class CallStream:
    """Turns a streamed reply into OpenAI chunks that add up to exactly what `parse_calls` makes of the
    whole reply: text outside calls as `content` as soon as it is settled (whitespace held until what
    follows shows whether it touches a call, next to which parse_calls leaves it out), each call as one
    `tool_calls` delta (`index`, `id`, `type`, `function.name` and `function.arguments`) once its
    block has closed. A reply that begins
    with `{` may be one bare call object (Llama 3): it is held to the end."""

    def __init__(self, tools: list[dict], parallel: bool = True):
        self.names = {tool["name"] for tool in tools}
        self.parallel = parallel
        self.text = ""  # the reply so far
        self.settled = 0  # where its settled pieces end
        self.held = ""  # whitespace not sent yet: sent before more text, dropped before a call
        self.after_call = False  # the last piece was a call: whitespace that follows it is dropped
        self.calls: list[dict] = []  # the calls sent

    def feed(self, text: str) -> list[dict]:
        """Deltas ({"content": ...} or {"tool_call": {...}}) that `text` makes ready."""
        self.text += text
        return self._advance(final=False)

    def finish(self) -> list[dict]:
        """What is left at the end of the reply."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[dict]:
        if self.settled == 0 and self.text.lstrip()[:1] in ("{", ""):
            if not final:
                return []  # nothing said yet, or perhaps one bare call object: held to the end
            content, calls = _parse(self.text, self.names, self.parallel)
            return ([{"content": content}] if content else []) + [self._call_delta(call) for call in calls]
        pieces, self.settled = _scan(self.text, self.settled, self.names, final)
        out: list[dict] = []
        for kind, piece in pieces:
            if kind == "text":
                if self.after_call:
                    piece = piece.lstrip()
                    self.after_call = not piece
                text = self.held + piece
                ready = text.rstrip()
                self.held = text[len(ready):]
                if ready:
                    out.append({"content": ready})
            else:
                self.held, self.after_call = "", True
                if self.parallel or not self.calls:
                    out.append(self._call_delta(piece))
        if final and self.held:  # the reply's own trailing whitespace (no call follows it)
            out.append({"content": self.held})
            self.held = ""
        return out

    def _call_delta(self, call: dict) -> dict:
        self.calls.append(call)
        return {"tool_call": {"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                              "function": dict(call["function"])}}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
