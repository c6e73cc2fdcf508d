"""Protobuf ⇄ plain types. Protobuf goes no deeper than this module and the servicer.

``parse_generate`` validates every field of a request and names the first bad one in an
``InvalidRequest`` (INVALID_ARGUMENT); error messages quote at most a short slice.
"""

from __future__ import annotations

import math
import re

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.adapters.cache import AdapterInfo
from server.engine.request import FinishReason, GenerationResult, new_request_id
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequest, quote
from server.formats.manifest import ADAPTER_NAME_RE
from server.service.dispatch import CHAT_ROLES, Call, Dispatched, InputKind, TemplateSource
from server.service.routing import Route

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_MESSAGES = 64

ROUTE_PB = {
    Route.EXPLICIT: pb.ROUTE_EXPLICIT,
    Route.CALLER_NUMBER: pb.ROUTE_CALLER_NUMBER,
    Route.REGION: pb.ROUTE_REGION,
    Route.DEFAULT: pb.ROUTE_DEFAULT,
    Route.FALLBACK: pb.ROUTE_FALLBACK,
}
TEMPLATE_PB = {
    TemplateSource.ADAPTER: pb.TEMPLATE_SOURCE_ADAPTER,
    TemplateSource.ROUTING_TABLE: pb.TEMPLATE_SOURCE_ROUTING_TABLE,
    TemplateSource.NONE: pb.TEMPLATE_SOURCE_NONE,
    TemplateSource.CHAT: pb.TEMPLATE_SOURCE_CHAT,
}
FINISH_PB = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}
TIER_PB = {"disk": pb.TIER_DISK, "host": pb.TIER_HOST, "device": pb.TIER_DEVICE}


def parse_generate(request: pb.GenerateRequest, default_max_new_tokens: int,
                   max_new_tokens_limit: int, max_weight_scale: float,
                   deadline: float | None) -> Call:
    """A validated :class:`Call`; raise InvalidRequest naming the first bad field."""
    request_id = request.request_id or new_request_id()
    if not _REQUEST_ID_RE.match(request_id):
        raise InvalidRequest(f"request_id {quote(request_id, 40)} must be 1-64 characters "
                             "of letters, digits, '.', '_' or '-'")
    given = [name for name, present in (("text", request.HasField("text")),
                                        ("prompt", request.HasField("prompt")),
                                        ("messages", len(request.messages) > 0)) if present]
    if len(given) != 1:
        raise InvalidRequest(
            "exactly one of text, prompt and messages must be set, got "
            + (" and ".join(given) if given else "none")
        )
    kind = InputKind(given[0])
    messages: tuple[tuple[str, str], ...] = ()
    if kind == InputKind.TEXT and not request.text.strip():
        raise InvalidRequest("text is empty")
    if kind == InputKind.PROMPT and not request.prompt:
        raise InvalidRequest("prompt is empty")
    if kind == InputKind.MESSAGES:
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidRequest(f"messages: at most {MAX_MESSAGES} turns, "
                                 f"got {len(request.messages)}")
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of "
                                     f"{', '.join(CHAT_ROLES)}, got {quote(message.role, 20)}")
            if not message.content.strip():
                raise InvalidRequest(f"messages[{i}].content is empty")
        messages = tuple((m.role, m.content) for m in request.messages)
    if request.dialect and not ADAPTER_NAME_RE.fullmatch(request.dialect):
        raise InvalidRequest(f"dialect {quote(request.dialect, 40)} is not an adapter name "
                             "([a-z0-9][a-z0-9_-]{0,63})")
    scale = request.weight_scale if request.HasField("weight_scale") else None
    if scale is not None:
        if not math.isfinite(scale) or scale < 0:
            raise InvalidRequest(f"weight_scale must be a finite number >= 0, got {scale}")
        if scale > max_weight_scale:
            raise InvalidRequest(f"weight_scale {scale:g} exceeds the limit {max_weight_scale}")
    sampling = SamplingParams(
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens")
        else default_max_new_tokens,
        temperature=request.temperature if request.HasField("temperature") else 0.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k if request.HasField("top_k") else 0,
        repetition_penalty=request.repetition_penalty
        if request.HasField("repetition_penalty") else 1.0,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )
    sampling.validate(max_new_tokens_limit)
    text = request.text if kind == InputKind.TEXT else request.prompt
    return Call(kind=kind, text=text, messages=messages, dialect=request.dialect,
                caller_number=request.caller_number, region=request.region,
                weight_scale=scale, sampling=sampling, request_id=request_id,
                deadline=deadline)


def generate_response(call: Call, dispatched: Dispatched,
                      result: GenerationResult) -> pb.GenerateResponse:
    timings = dispatched.timings(result)
    return pb.GenerateResponse(
        text=result.text,
        adapter=pb.AdapterRef(name=dispatched.adapter or "", version=dispatched.version),
        route=ROUTE_PB[dispatched.route],
        route_detail=dispatched.route_detail,
        fallback_reason=dispatched.fallback_reason,
        finish_reason=FINISH_PB.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        template_source=TEMPLATE_PB[dispatched.template_source],
        prompt_template=dispatched.prompt_template,
        weight_scale=dispatched.weight_scale,
        request_id=call.request_id,
        timings=pb.Timings(queue_ms=timings.queue_s * 1000,
                           time_to_first_token_ms=(timings.ttft_s or 0.0) * 1000,
                           total_ms=timings.total_s * 1000),
    )


def adapter_status(info: AdapterInfo) -> pb.AdapterStatus:
    manifest = info.manifest
    status = pb.AdapterStatus(
        name=info.name, version=info.version or "", rank=info.rank or 0,
        targets=list(info.targets), tier=TIER_PB[info.tier], pinned=info.pinned,
        requests_served=info.requests_served, previous_version=info.previous_version or "",
        error=info.error or "", dialect=manifest.dialect if manifest else "",
        description=manifest.description if manifest else "",
        default_weight_scale=manifest.default_weight_scale if manifest else 1.0,
    )
    if info.last_used_s_ago is not None:
        status.last_used_s_ago = info.last_used_s_ago
    if info.load_seconds is not None:
        status.load_ms = info.load_seconds * 1000
    return status
