"""The OpenAI chat-completions protocol as salachat serves it: requests in, responses, chunks and errors out.

A request's messages become one salachat conversation: a system prompt, the documents, the exchanges so
far and the question to answer. The documents are the `<documents>…</documents>` block that opens the
first user message, exactly as salachat's own conversations (and salachat.remote) write it; the server
reads them once and branches every later question from that reading. Any other client's messages are
served too, and reuse what the server read at the boundaries of earlier answers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from salachat.engine.generate import Sampling

DOCUMENTS_OPEN = "<documents>\n"
DOCUMENTS_CLOSE = "\n</documents>\n\n"
SESSION_PREFIX = "session:"
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    model: str
    session: str | None  # a saved session to continue: model "session:NAME" or the extra field "session"
    system_prompt: str | None  # None: salachat's own (or the saved session's)
    documents: str  # "" when the first user message opens with no documents block
    exchanges: list[tuple[str, str]]  # (question, answer) before the question to answer
    question: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage
    stop: list[str] = field(default_factory=list)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}: content part of type {kind!r} is not supported (text only)", "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{where}: content must be a string or a list of text parts", "messages")


def _number(body: dict, name: str, kind: type, low: float | None, high: float | None, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise bad_request(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad_request(f"{name} must be {bounds}, not {value}", name)
    return kind(value)


def _conversation(messages) -> tuple[str | None, list[tuple[str, str]]]:
    """The system prompt and the (role, text) turns, consecutive turns of one role joined."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content", "messages")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls"):
            raise bad_request(f"{where}: tool calls are not supported (salachat serves plain chat)", "messages")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{where}: role {role!r} is not one of system, developer, user, assistant", "messages")
        text = _text(message.get("content"), where)
        if role in ("system", "developer"):
            if turns:
                raise bad_request(f"{where}: a system message must come before the conversation", "messages")
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != "user":
        raise bad_request("the conversation must start with a user message", "messages")
    if turns[-1][0] != "user":
        raise bad_request("the last message must be the user's: it is the one the server answers", "messages")
    return ("\n\n".join(system) if system else None), turns


def split_documents(first_user: str) -> tuple[str, str]:
    """(documents, question) of a first user message; ("", message) without a documents block."""
    if first_user.startswith(DOCUMENTS_OPEN):
        end = first_user.rfind(DOCUMENTS_CLOSE)
        if end >= len(DOCUMENTS_OPEN):
            return first_user[len(DOCUMENTS_OPEN) : end], first_user[end + len(DOCUMENTS_CLOSE) :]
    return "", first_user


def parse_request(body, default_sampling: Sampling) -> ChatRequest:
    """Validate a /v1/chat/completions body; every problem is an ApiError naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: GET /v1/models lists what this server serves", "model")
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise bad_request("session must be a saved session's name", "session")
    if model.startswith(SESSION_PREFIX):
        session = model[len(SESSION_PREFIX) :]
    if _number(body, "n", int, 1, 1, 1) != 1:
        raise bad_request("n must be 1", "n")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools are not supported: salachat serves plain chat", "tools")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise bad_request(f"response_format {response_format.get('type')!r} is not supported (text only)",
                          "response_format")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings", "stop")

    max_tokens = _number(body, "max_completion_tokens", int, 1, None, None)
    max_tokens = max_tokens or _number(body, "max_tokens", int, 1, None, default_sampling.max_tokens)
    repeat_penalty = _number(body, "repetition_penalty", float, 0, None, None)  # vLLM's and SGLang's name
    sampling = Sampling(
        temperature=_number(body, "temperature", float, 0, 2, default_sampling.temperature),
        top_p=_number(body, "top_p", float, 0, 1, default_sampling.top_p),
        max_tokens=max_tokens,
        seed=_number(body, "seed", int, None, None, default_sampling.seed),
        min_p=_number(body, "min_p", float, 0, 1, default_sampling.min_p),
        repeat_penalty=_number(body, "repeat_penalty", float, 0, None, repeat_penalty or default_sampling.repeat_penalty),
    )
    if sampling.top_p == 0:
        raise bad_request("top_p must be above 0", "top_p")

    system_prompt, turns = _conversation(body.get("messages"))
    documents, first_question = split_documents(turns[0][1])
    questions = [first_question] + [text for role, text in turns[2::2]]
    answers = [text for role, text in turns[1::2]]
    exchanges = list(zip(questions[:-1], answers))
    return ChatRequest(model=model, session=session or None, system_prompt=system_prompt, documents=documents,
                       exchanges=exchanges, question=questions[-1], sampling=sampling, stream=stream,
                       include_usage=bool(options.get("include_usage")), stop=list(stop))


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose state the server already held (memory or a saved session)
    state: str = "new"  # where the reused state came from: "new", "memory" or "session:NAME"

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "salachat": {"state": self.state},
        }


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(cid: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage.to_dict(),
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage: Usage | None = None) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                                       "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage.to_dict()
    return body


class StopSequences:
    """Cuts the answer before the first stop sequence; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        split = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:split], self.pending[split:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
