"""OpenAI request bodies ⇄ plain call fields and OpenAI response bodies (no HTTP here).

``parse_chat`` and ``parse_completion`` check every field's JSON type, name the first
bad one in ``InvalidRequest.param`` and turn the body into :class:`CallFields`; the
service's own rules (``calls.validate_call``) then apply exactly as on gRPC, and their
``param`` is renamed to the OpenAI field by ``PARAM_NAMES`` (``max_new_tokens`` →
``max_tokens``; see ``http_api.domain_error``).

``model`` picks what serves the call: an adapter name (its manifest's default scale and
prompt template), ``base`` or the base model's id, or ``auto``, where Switchboard's
routing fields (``dialect``, ``caller_number``, ``region``) and the routing table decide
exactly as on gRPC; with ``model: auto``, ``adapters`` (``extra_body`` in the openai
client) names a composition. vLLM's ``ignore_eos`` and ``min_tokens`` are served (load
generators send them for fixed-length replies). Fields that would change the answer in
ways not served (tools, logprobs, penalties, ``n`` > 1...) are refused by name rather
than ignored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from server.adapters.cache import AdapterInfo
from server.engine.request import FinishReason, TokenChunk
from server.errors import AdapterNotFound, InvalidRequest, quote
from server.formats.manifest import ADAPTER_NAME_RE
from server.service.calls import CallFields, Finished, Started
from server.service.dispatch import Dispatched
from server.service.routing import BASE

AUTO = "auto"
ROUTING_FIELDS = ("dialect", "caller_number", "region")
MAX_MODEL_CHARS = 128
PARAM_NAMES = {"max_new_tokens": "max_tokens", "text": "prompt"}
"""Service field names → the OpenAI body's (for ``InvalidRequest.param``)."""
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop",
                  FinishReason.LENGTH: "length"}
# Refused unless absent or at the value that changes nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "function_call": (None, "none"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "audio": (None,), "prediction": (None,),
    "response_format": (None, {"type": "text"}),
}
_CHAT_ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed chat or completion body."""

    model: str
    fields: CallFields
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also too deep, or a 5000-digit integer
        raise InvalidRequest(f"the body is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def parse_chat(body: dict[str, Any], base_ids: tuple[str, ...]) -> OpenAIRequest:
    messages = body.get("messages")
    if messages is None and "prompt" in body:  # a completion body sent to the chat route
        raise InvalidRequest("messages is missing: /v1/chat/completions takes a list of "
                             "{role, content} messages; send a prompt string to "
                             "/v1/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects",
                             "messages")
    turns = tuple(_message(i, m) for i, m in enumerate(messages))
    return _parse(body, base_ids, messages=turns)


def parse_completion(body: dict[str, Any], base_ids: tuple[str, ...]) -> OpenAIRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        raise InvalidRequest("prompt: a list of prompts is not served; send one string "
                             "per request", "prompt")
    if prompt is None and "messages" in body:  # a chat body sent to the completions route
        raise InvalidRequest("prompt is missing: /v1/completions takes a prompt string; "
                             "send messages to /v1/chat/completions", "prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", "prompt")
    # The adapter's (or routing table's) template wraps the prompt, as gRPC's ``text``;
    # ``raw_prompt: true`` sends it verbatim, as gRPC's ``prompt``.
    if _optional(body, "raw_prompt", bool):
        return _parse(body, base_ids, prompt=prompt)
    return _parse(body, base_ids, text=prompt)


def _parse(body: dict[str, Any], base_ids: tuple[str, ...], *, text: str | None = None,
           prompt: str | None = None,
           messages: tuple[tuple[str, str], ...] | None = None) -> OpenAIRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must name an adapter, 'base' or 'auto'", "model")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise InvalidRequest(f"{name} is not supported by this server", name)
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise InvalidRequest(f"n must be 1 (one choice per request), got {n}", "n")
    routing = {name: _optional(body, name, str) or "" for name in ROUTING_FIELDS}
    adapters = _adapters(body.get("adapters"))
    if adapters and model != AUTO:
        raise InvalidRequest("adapters applies only with model 'auto' (the adapters named "
                             "serve the call)", "adapters")
    if model == AUTO:
        dialect = routing["dialect"]
    else:
        given = [name for name, value in routing.items() if value]
        if given:
            raise InvalidRequest(f"{given[0]} applies only with model 'auto' (the routing "
                                 "table decides); this request names its model", given[0])
        if model in base_ids:
            dialect = BASE
        elif ADAPTER_NAME_RE.fullmatch(model):
            dialect = model
        else:  # no adapter can have this name: unknown, as OpenAI answers
            raise AdapterNotFound(f"model {quote(model, 40)} does not exist (an adapter "
                                  "name, 'base' or 'auto')")
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", "stream_options")
    timeout_s = _optional(body, "timeout_s", float)
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InvalidRequest(f"timeout_s must be a number > 0, got {timeout_s}", "timeout_s")
    fields = CallFields(
        text=text, prompt=prompt, messages=messages, dialect=dialect,
        caller_number=routing["caller_number"], region=routing["region"],
        weight_scale=_optional(body, "weight_scale", float), max_new_tokens=max_tokens,
        temperature=_optional(body, "temperature", float), top_p=_optional(body, "top_p", float),
        top_k=_optional(body, "top_k", int),
        repetition_penalty=_optional(body, "repetition_penalty", float),
        seed=_optional(body, "seed", int), stop=stops,
        ignore_eos=bool(_optional(body, "ignore_eos", bool)),
        min_tokens=_optional(body, "min_tokens", int),
        request_id=_optional(body, "request_id", str) or "", timeout_s=timeout_s,
        user=_optional(body, "user", str) or "", adapters=adapters)
    return OpenAIRequest(
        model=model, fields=fields, stream=bool(_optional(body, "stream", bool)),
        include_usage=bool(options and _optional(options, "include_usage", bool,
                                                 "stream_options.include_usage")))


def _adapters(value: Any) -> tuple[tuple[str, float | None], ...]:
    """``adapters``: a list of names or ``{"name": ..., "weight_scale": ...}`` objects."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("adapters must be a list of adapter names or objects with "
                             "name and weight_scale", "adapters")
    uses: list[tuple[str, float | None]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            uses.append((item, None))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f"adapters[{i}] must be an adapter name or an object with "
                                 "name and weight_scale", "adapters")
        unknown = sorted(set(item) - {"name", "weight_scale"})
        if unknown:
            raise InvalidRequest(f"adapters[{i}] has unknown field {quote(unknown[0], 24)} "
                                 "(valid: name, weight_scale)", "adapters")
        uses.append((item["name"], _optional(item, "weight_scale", float, "adapters")))
    return tuple(uses)


def _message(index: int, message: Any) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content", "messages")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise InvalidRequest(f"{where}.role must be a string", "messages")
    if isinstance(content, list):  # content parts: only text is served
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content: only text parts are served",
                                     "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string", "messages")
    return _CHAT_ROLE_ALIASES.get(role, role), content


def _optional(body: dict[str, Any], name: str, kind: type, param: str | None = None) -> Any:
    """``body[name]`` checked against ``kind`` (ints pass as floats, bools never as
    numbers); None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise InvalidRequest(f"{name} is out of range", param or name) from None
    if not ok:
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
        raise InvalidRequest(f"{name} must be {names[kind]}, got {quote(value, 24)}",
                             param or name)
    return value


# -- responses -------------------------------------------------------------------------
def served_model(dispatched: Dispatched, base_id: str) -> str:
    """The adapter's name, ``a+b`` for a composition, or the base model's id."""
    return "+".join(name for name, _, _ in dispatched.adapters) or base_id


def switchboard_extra(dispatched: Dispatched, request_id: str) -> dict[str, Any]:
    """The ``switchboard`` object of a response: how the call was served (``replica``
    only from a cluster)."""
    extra = {"route": dispatched.route.value, "route_detail": dispatched.route_detail,
            "adapter_version": dispatched.version, "fallback_reason": dispatched.fallback_reason,
            "weight_scale": dispatched.weight_scale, "request_id": request_id,
            "template_source": dispatched.template_source.value,
            "adapters": [{"name": name, "version": version, "weight_scale": scale}
                         for name, version, scale in dispatched.adapters]}
    if dispatched.replica:
        extra["replica"] = dispatched.replica
    return extra


def usage(finished: Finished) -> dict[str, int]:
    result = finished.result
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class ResponseShaper:
    """Builds one call's response body, or its stream's chunks, in the OpenAI shape."""

    def __init__(self, chat: bool, base_id: str, started: Started) -> None:
        self.chat = chat
        self.base_id = base_id
        self.started = started
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{started.call.request_id}"
        self.created = int(time.time())
        self.model = served_model(started.dispatched, base_id)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, finished: Finished) -> dict[str, Any]:
        result = finished.result
        finish = FINISH_REASONS.get(result.finish_reason, "stop")
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {
                "role": "assistant", "content": result.text}, "finish_reason": finish,
                "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish,
                      "logprobs": None}
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [choice], "usage": usage(finished),
                "switchboard": switchboard_extra(finished.dispatched,
                                                 finished.call.request_id)}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role (as OpenAI's do)."""
        if not self.chat:
            return None
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, item: TokenChunk) -> dict[str, Any]:
        return self._chunk({"content": item.text} if self.chat else item.text, None)

    def last_chunks(self, finished: Finished, include_usage: bool) -> list[dict[str, Any]]:
        finish = FINISH_REASONS.get(finished.result.finish_reason, "stop")
        last = self._chunk({} if self.chat else "", finish)
        last["switchboard"] = switchboard_extra(finished.dispatched, finished.call.request_id)
        chunks = [last]
        if include_usage:
            chunks.append({**self._head(self._chunk_object()), "choices": [],
                           "usage": usage(finished)})
        return chunks

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, delta: Any, finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return {**self._head(self._chunk_object()), "choices": [choice]}


def model_entry(model_id: str, created: int, owned_by: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by,
            **extra}


def adapter_entries(infos: list[AdapterInfo], base_id: str, created: int
                    ) -> list[dict[str, Any]]:
    """``/v1/models`` rows of the servable adapters (those not refused by validation)."""
    rows = []
    for info in infos:
        if info.error:
            continue
        manifest = info.manifest
        rows.append(model_entry(
            info.name, created, "switchboard", parent=base_id, root=base_id,
            rank=info.rank, version=info.version, dialect=manifest.dialect if manifest else "",
            default_weight_scale=manifest.default_weight_scale if manifest else 1.0))
    return rows
