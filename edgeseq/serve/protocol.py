"""The OpenAI request bodies: every field the server takes, what it accepts, and the ones it refuses.

A field the server does not implement is refused with a 400 naming it, never silently ignored; a field
given its "off" value (logprobs false, presence_penalty 0, tools []) is accepted, since that asks for
nothing. Extensions beside OpenAI's fields, as llama.cpp's and vLLM's servers take them: top_k, min_p,
repetition_penalty.
"""
from __future__ import annotations

import json
import math

MAX_N = 16
MAX_STOPS = 16
MAX_TOKENS = 1 << 20
SEED_MAX = (1 << 63) - 1


class ApiError(Exception):
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


def parse_json(raw: bytes) -> dict:
    def no_constant(name):  # NaN, Infinity: not JSON
        raise ValueError(f"{name} is not a JSON number")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=no_constant)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON for this server (nested too deeply)") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


# -- field checks: each returns the value to use --------------------------------------------------------
def _number(v, name, lo, hi, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"must be a number, not {json.dumps(v)[:40]}")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, not {v}")
    return float(v)


def _int(v, name, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(name, f"must be an integer, not {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise bad(name, f"must be from {lo} to {hi}, not {v}")
    return v


def _off(v, name, off_values):
    """A field the server does not implement: only its 'off' values pass."""
    if v in off_values:
        return None
    raise bad(name, "is not supported by this server (edgeseq serve); leave it out", "unsupported_parameter")


SAMPLING = {
    "temperature": lambda v, n: _number(v, n, 0, 2),
    "top_p": lambda v, n: _number(v, n, 0, 1, lo_open=True),
    "top_k": lambda v, n: _int(v, n, 0, 1 << 31),
    "min_p": lambda v, n: _number(v, n, 0, 1, hi_open=True),
    "repetition_penalty": lambda v, n: _number(v, n, 0, 10, lo_open=True),
    "seed": lambda v, n: _int(v, n, 0, SEED_MAX),
    "max_tokens": lambda v, n: _int(v, n, 0, MAX_TOKENS),
    "n": lambda v, n: _int(v, n, 1, MAX_N),
}
UNSUPPORTED_OFF = {  # field -> the values that ask for nothing
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "response_format": (None, {"type": "text"}), "store": (None, False),
    "service_tier": (None, "auto", "default"), "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
    "reasoning_effort": (None,), "web_search_options": (None,), "metadata": (None, {}),
}
COMMON = {"model", "stream", "stream_options", "user", "stop", *SAMPLING, *UNSUPPORTED_OFF}
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETIONS = COMMON | {"prompt"}


def _stops(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "must be a string or a list of strings")
    if len(v) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings, not {len(v)}")
    for s in v:
        _utf8(s, "stop")
    return [s for s in v if s]


def _utf8(s: str, name: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(name, f"is not valid Unicode text (character {e.start})") from None
    return s


def check_common(body: dict, allowed: set, parallel: int, default_max_tokens: int) -> dict:
    """The sampling and streaming options of a request, checked; unknown and unsupported fields refused."""
    for k in body:
        if k not in allowed:
            raise bad(k, "unknown field (edgeseq serve takes: " + ", ".join(sorted(allowed - set(UNSUPPORTED_OFF)))
                      + ")", "unknown_parameter")
    for k, off in UNSUPPORTED_OFF.items():
        if k in body:
            _off(body[k], k, off)
    out = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None,
           "n": 1, "max_tokens": default_max_tokens}
    for k, check in SAMPLING.items():
        if body.get(k) is not None:
            out[k] = check(body[k], k)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        out["max_tokens"] = _int(body["max_completion_tokens"], "max_completion_tokens", 0, MAX_TOKENS)
    if out["n"] > parallel:
        raise bad("n", f"at most --parallel ({parallel}) choices per request, not {out['n']}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    out["stream"] = bool(stream)
    so = body.get("stream_options")
    out["include_usage"] = False
    if so is not None:
        if not out["stream"]:
            raise bad("stream_options", "is only allowed with stream: true")
        if not isinstance(so, dict):
            raise bad("stream_options", "must be an object")
        for k, v in so.items():
            if k != "include_usage":
                raise bad(f"stream_options.{k}", "unknown field", "unknown_parameter")
            if not isinstance(v, bool):
                raise bad("stream_options.include_usage", "must be true or false")
            out["include_usage"] = v
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "must be a string")
    out["stops"] = _stops(body.get("stop"))
    return out


def check_model(body: dict, name: str) -> None:
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise bad("model", "must be a string")
    if m != name:
        raise ApiError(404, f"model {m[:100]!r} is not served here (this server has {name!r})", "model",
                       "model_not_found")


def completion_prompt(body: dict):
    """The prompt: a string, a list of token ids, or a list of one of those; returns str or list[int]."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "is required")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return _utf8(p, "prompt")
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise bad("prompt", "several prompts in one request are not supported; send one request each",
                  "unsupported_parameter")
    raise bad("prompt", "must be a string or a list of token ids")


ROLES = ("system", "developer", "user", "assistant")


def chat_messages(body: dict) -> list[dict]:
    """messages as [{"role", "content": str}]: text content only (a string or text parts)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "is required: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with role and content")
        for k in m:
            if k not in ("role", "content"):
                raise bad(f"{where}.{k}", "is not supported by this server (text messages only)",
                          "unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            if role == "tool" or role == "function":
                raise bad(f"{where}.role", f"{role} messages are not supported (no tool calls)",
                          "unsupported_parameter")
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", "only text parts ({type: text, text}) are supported",
                              "unsupported_parameter")
                parts.append(part["text"])
            c = "".join(parts)
        if c is None and role == "assistant":
            c = ""
        if not isinstance(c, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": _utf8(c, f"{where}.content")})
    return out


def plain_render(messages: list[dict]) -> tuple[str, list[int]]:
    """The chat command's plain continuation without a template (runtime/chat.py): the system text on its
    own line, each user turn after the first on a new line, each reply right after its turn. Returns the
    text and the character offsets where each message ends (before the last)."""
    text, ends, said = "", [], False
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n"
        elif m["role"] == "user":
            text += ("\n" if said else "") + m["content"]
            said = True
        else:
            text += m["content"]
            said = True
        ends.append(len(text))
    return text, ends[:-1]
