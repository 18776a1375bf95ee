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

import json
import re
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
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
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
        schema = {"type": "object", "properties": {"name": {"const": tool["name"]},
                                                   "arguments": tool.get("parameters") or ANY_OBJECT},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}}
        rules.append(f"fn_{i}: %json {json.dumps(schema)}")
    body = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    repeat = "+" if parallel and choice == "required" else ""
    lark = "\n".join([f'start: call{repeat}', f'call: "{OPEN}\\n" ({body}) "\\n{CLOSE}\\n"', *rules])
    name = f"tool_choice {choice['name']!r}" if isinstance(choice, dict) else "tool_choice 'required'"
    return Constraint("lark", lark, "tools", name)


# --- out of the reply --------------------------------------------------------------------------------
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


def parse_calls(text: str, tools: list[dict], parallel: bool = True) -> tuple[str | None, list[dict]]:
    """(content outside the calls or None, calls) from a reply; no calls when none parses."""
    names = {tool["name"] for tool in tools}
    calls, spans = [], []
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names)
        if call is not None:
            calls.append(call)
            spans.append(match.span())
    if not calls:
        bare = _call(text.strip(), names)  # Llama 3 style: the whole reply is one call object
        if bare is not None:
            return None, [bare]
        return text, []
    if not parallel:
        calls = calls[:1]
    rest, last = [], 0
    for start, end in spans:
        rest.append(text[last:start])
        last = end
    rest.append(text[last:])
    content = "".join(rest).strip()
    return content or None, calls


def _call(body: str, names: set[str]) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class CallStream:
    """Turns a streamed reply into OpenAI chunks: text outside calls as `content`, each call as
    `tool_calls` deltas (`index`, `id`, `type`, `function.name` first, then `function.arguments`
    pieces as they are written). Held back: what may be the start of `<tool_call>`."""

    def __init__(self, tools: list[dict], parallel: bool = True, constrained: bool = False):
        self.names = {tool["name"] for tool in tools}
        self.parallel, self.constrained = parallel, constrained
        self.buffer = ""  # text not yet sent
        self.in_call = False
        self.body = ""  # the current call's text so far
        self.calls: list[dict] = []  # {"id", "name", "sent_args"} per call begun
        self.args_start: int | None = None
        self.args_sent = 0

    def feed(self, text: str) -> list[dict]:
        """Deltas ({"content": ...} or {"tool_call": {...}}) that `text` makes ready."""
        self.buffer += text
        out: list[dict] = []
        while self.buffer:
            if not self.in_call:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    ready = self.buffer[: len(self.buffer) - keep]
                    if ready and not (self.calls and not ready.strip()):
                        out.append({"content": ready})
                    self.buffer = self.buffer[len(ready):]
                    break
                if at and self.buffer[:at].strip():
                    out.append({"content": self.buffer[:at]})
                self.buffer = self.buffer[at + len(OPEN):]
                self.in_call, self.body, self.args_start, self.args_sent = True, "", None, 0
                continue
            end = self.buffer.find(CLOSE)
            if end < 0:
                keep = _partial_suffix(self.buffer, CLOSE)
                self.body += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                out += self._progress(final=False)
                break
            self.body += self.buffer[:end]
            self.buffer = self.buffer[end + len(CLOSE):]
            out += self._progress(final=True)
            self.in_call = False
        return out

    def _progress(self, final: bool) -> list[dict]:
        """Deltas of the current call: its name once known, then its arguments as they grow."""
        out: list[dict] = []
        if self.args_start is None:
            match = re.match(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*', self.body)
            if match and match.group(1) in self.names and (self.parallel or not self.calls):
                self.args_start = match.end()
                self.calls.append({"id": new_call_id(), "name": match.group(1)})
                out.append({"tool_call": {"index": len(self.calls) - 1, "id": self.calls[-1]["id"],
                                          "type": "function", "function": {"name": match.group(1), "arguments": ""}}})
            elif final:
                return self._whole(out)
            else:
                return out
        args = _json_value_prefix(self.body[self.args_start:], final)
        if len(args) > self.args_sent:
            out.append({"tool_call": {"index": len(self.calls) - 1,
                                      "function": {"arguments": args[self.args_sent:]}}})
            self.args_sent = len(args)
        return out

    def _whole(self, out: list[dict]) -> list[dict]:
        """A finished block that was not written name-first: parse it whole."""
        call = _call(self.body.strip(), self.names)
        if call is None or not (self.parallel or not self.calls):
            out.append({"content": OPEN + self.body + CLOSE})
            return out
        self.calls.append({"id": call["id"], "name": call["function"]["name"]})
        out.append({"tool_call": {"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                  "function": {"name": call["function"]["name"],
                                               "arguments": call["function"]["arguments"]}}})
        return out

    def finish(self) -> list[dict]:
        """What is left at the end of the reply."""
        out: list[dict] = []
        if self.in_call:
            self.body += self.buffer
            self.buffer = ""
            if self.args_start is None:
                call = _call(self.body.strip(), self.names)
                if call is not None and (self.parallel or not self.calls):
                    return self._whole(out)
                out.append({"content": OPEN + self.body})
                return out
            out += self._progress(final=True)
        elif self.buffer:
            out.append({"content": self.buffer})
            self.buffer = ""
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _json_value_prefix(text: str, final: bool) -> str:
    """The part of `text` that belongs to the JSON value it starts with: all of it up to where that
    value closes (then the call object's own `}` and whitespace follow, never sent)."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[: i + 1]
            if depth < 0:
                return text[:i].rstrip()
    return text if final and depth == 0 else text
