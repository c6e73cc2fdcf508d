"""Protobuf ⇄ plain types. Protobuf goes no deeper than this module and the servicer.

``call_fields`` only reads a request; ``calls.validate_call`` checks every field (the
same rules for the HTTP API) and names the first bad one.
"""

from __future__ import annotations

from typing import Any

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.adapters.cache import AdapterInfo
from server.engine.request import FinishReason, GenerationResult
from server.service.calls import CallFields
from server.service.dispatch import Call, Dispatched, TemplateSource
from server.service.routing import Route

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


def call_fields(request: pb.GenerateRequest) -> CallFields:
    """The request's fields as plain types (validated by ``calls.validate_call``)."""

    def optional(name: Any) -> Any:  # Any: HasField takes the field names as literals
        return getattr(request, name) if request.HasField(name) else None

    return CallFields(
        text=optional("text"), prompt=optional("prompt"),
        messages=tuple((m.role, m.content) for m in request.messages) or None,
        dialect=request.dialect, caller_number=request.caller_number, region=request.region,
        weight_scale=optional("weight_scale"), max_new_tokens=optional("max_new_tokens"),
        temperature=optional("temperature"), top_p=optional("top_p"), top_k=optional("top_k"),
        repetition_penalty=optional("repetition_penalty"), seed=optional("seed"),
        stop=tuple(request.stop), request_id=request.request_id,
        ignore_eos=request.ignore_eos, min_tokens=optional("min_tokens"),
        adapters=tuple((ref.name, ref.weight_scale if ref.HasField("weight_scale") else None)
                       for ref in request.adapters))


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
        adapters=[pb.AdapterRef(name=name, version=version, weight_scale=scale)
                  for name, version, scale in dispatched.adapters],
        replica=dispatched.replica,
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
