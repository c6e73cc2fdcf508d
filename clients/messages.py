"""Plain result types of the client, and request building (protobuf stays in here).

Users of :class:`~clients.client.SwitchboardClient` get these dataclasses, never protobuf
messages; the enum names lose their prefixes (``ROUTE_CALLER_NUMBER`` → ``caller_number``),
and scales come back as the caller wrote them (:func:`reported_scale`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from protos.switchboard.v1 import switchboard_pb2 as pb


@dataclass(frozen=True)
class GenerateResult:
    text: str
    adapter: str
    """The adapter that answered; empty for the base model."""
    adapter_version: str
    route: str
    """explicit, caller_number, region, default or fallback."""
    route_detail: str
    fallback_reason: str
    finish_reason: str
    """eos, stop or length."""
    prompt_tokens: int
    completion_tokens: int
    template_source: str
    prompt_template: str
    weight_scale: float
    request_id: str
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    adapters: tuple[UsedAdapter, ...] = ()
    """Every adapter that answered, in order (one unless the call composed several)."""
    replica: str = ""
    """The cluster replica that answered; empty from a single server."""


@dataclass(frozen=True)
class UsedAdapter:
    name: str
    version: str
    weight_scale: float


AdapterSpec = str | tuple[str, float | None]
"""A composition's part: a name, or (name, weight_scale); ``"telecom_terms@0.6"`` too."""


@dataclass(frozen=True)
class StreamChunk:
    text: str
    tokens: int


@dataclass(frozen=True)
class AdapterStatus:
    name: str
    version: str
    rank: int
    targets: tuple[str, ...]
    tier: str
    """disk, host or device."""
    pinned: int
    last_used_s_ago: float | None
    requests_served: int
    load_ms: float | None
    previous_version: str
    error: str
    dialect: str
    description: str
    default_weight_scale: float


def _float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def reported_scale(value: float) -> float:
    """A scale read from the wire, as the caller gave it: the shortest decimal that rounds
    to the same float32.

    The proto carries scales as float32 (the engine's precision), so 0.6 arrives as
    0.6000000238418579; printing that to a caller who asked for 0.6 reads as a bug, and
    the HTTP API (JSON numbers from Python floats) already says 0.6. Nine significant
    digits always round-trip a float32, so the search ends by then.
    """
    if not math.isfinite(value):
        return value
    target = _float32(value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _float32(candidate) == target:
            return candidate
    return value


def _enum_name(enum: object, value: int, prefix: str) -> str:
    name = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower()


def generate_result(response: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=response.text, adapter=response.adapter.name,
        adapter_version=response.adapter.version,
        route=_enum_name(pb.Route, response.route, "ROUTE_"),
        route_detail=response.route_detail, fallback_reason=response.fallback_reason,
        finish_reason=_enum_name(pb.FinishReason, response.finish_reason, "FINISH_REASON_"),
        prompt_tokens=response.prompt_tokens, completion_tokens=response.completion_tokens,
        template_source=_enum_name(pb.TemplateSource, response.template_source,
                                   "TEMPLATE_SOURCE_"),
        prompt_template=response.prompt_template,
        weight_scale=reported_scale(response.weight_scale),
        request_id=response.request_id, queue_ms=response.timings.queue_ms,
        time_to_first_token_ms=response.timings.time_to_first_token_ms,
        total_ms=response.timings.total_ms,
        adapters=tuple(UsedAdapter(a.name, a.version, reported_scale(a.weight_scale))
                       for a in response.adapters),
        replica=response.replica,
    )


def adapter_status(status: pb.AdapterStatus) -> AdapterStatus:
    return AdapterStatus(
        name=status.name, version=status.version, rank=status.rank,
        targets=tuple(status.targets), tier=_enum_name(pb.Tier, status.tier, "TIER_"),
        pinned=status.pinned,
        last_used_s_ago=status.last_used_s_ago if status.HasField("last_used_s_ago") else None,
        requests_served=status.requests_served,
        load_ms=status.load_ms if status.HasField("load_ms") else None,
        previous_version=status.previous_version, error=status.error, dialect=status.dialect,
        description=status.description,
        default_weight_scale=reported_scale(status.default_weight_scale),
    )


def generate_request(
    text: str | None = None, *, prompt: str | None = None,
    messages: Sequence[tuple[str, str]] | None = None, dialect: str = "",
    caller_number: str = "", region: str = "", weight_scale: float | None = None,
    max_new_tokens: int | None = None, temperature: float | None = None,
    top_p: float | None = None, top_k: int | None = None,
    repetition_penalty: float | None = None, seed: int | None = None,
    stop: Sequence[str] = (), request_id: str = "", adapters: Sequence[AdapterSpec] = (),
    ignore_eos: bool = False, min_tokens: int | None = None,
) -> pb.GenerateRequest:
    """A request; unset options are left unset, so the server's defaults apply.
    ``adapters`` composes several adapters (exclusive with ``dialect``); ``ignore_eos``
    generates exactly ``max_new_tokens`` and ``min_tokens`` keeps EOS and stop strings
    away until that many tokens (benchmarks: fixed-length replies)."""
    request = pb.GenerateRequest(dialect=dialect, caller_number=caller_number, region=region,
                                 stop=list(stop), request_id=request_id,
                                 ignore_eos=ignore_eos)
    for spec in adapters:
        name, scale = parse_adapter_spec(spec)
        ref = request.adapters.add(name=name)
        if scale is not None:
            ref.weight_scale = scale
    if text is not None:
        request.text = text
    if prompt is not None:
        request.prompt = prompt
    for role, content in messages or ():
        request.messages.append(pb.ChatMessage(role=role, content=content))
    for name, value in (("weight_scale", weight_scale), ("max_new_tokens", max_new_tokens),
                        ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("repetition_penalty", repetition_penalty), ("seed", seed),
                        ("min_tokens", min_tokens)):
        if value is not None:
            setattr(request, name, value)
    return request


def parse_adapter_spec(spec: AdapterSpec) -> tuple[str, float | None]:
    """``"wuyu"`` / ``"telecom_terms@0.6"`` / ``("telecom_terms", 0.6)`` → (name, scale)."""
    if not isinstance(spec, str):
        name, scale = spec
        return name, None if scale is None else float(scale)
    name, at, scale_text = spec.partition("@")
    if not at:
        return name, None
    try:
        return name, float(scale_text)
    except ValueError:
        raise ValueError(f"adapter {spec!r}: the scale after '@' must be a number") from None
