"""The soak's calls over the OpenAI-compatible HTTP API (the official ``openai`` client).

Each call returns its outcome under the status names the gRPC calls use (``OK``,
``INVALID_ARGUMENT``, ``DEADLINE_EXCEEDED``...), read back from the HTTP status through
the server's own table, so one allowed-outcome table covers both protocols.
"""

from __future__ import annotations

from typing import Any

import openai
from openai import AsyncOpenAI

from server.service.http_api import ERROR_CODES, HTTP_ERRORS

STATUS_BY_HTTP = {code: status.value for status, (code, _type) in HTTP_ERRORS.items()}
STATUS_BY_ERROR_CODE = {code: status.value for status, code in ERROR_CODES.items()}
OK = "OK"


def http_malformed_requests() -> list[tuple[str, dict[str, Any], str]]:
    """(what is wrong, the completion's arguments, its one allowed status)."""
    bad = "INVALID_ARGUMENT"
    return [
        ("n=2", {"n": 2}, bad),
        ("a list prompt", {"prompt": ["one", "two"]}, bad),
        ("64 stop strings", {"stop": [f"s{i}" for i in range(64)]}, bad),
        ("max_tokens 1e9", {"max_tokens": 10**9}, bad),
        ("max_tokens a string", {"extra_body": {"max_tokens": "5"}}, bad),
        ("negative scale", {"extra_body": {"weight_scale": -1.0}}, bad),
        ("routing field with a named model", {"extra_body": {"region": "CN-SH"}}, bad),
        ("unknown model", {"model": "klingon"}, "NOT_FOUND"),
    ]


def http_model(route: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A gRPC route's fields as an HTTP ``model`` and the body's extra fields."""
    extra = {k: v for k, v in route.items() if k != "dialect"}
    if "dialect" in route:
        return route["dialect"], {k: v for k, v in extra.items() if k == "weight_scale"}
    return "auto", extra


def _status(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return STATUS_BY_HTTP.get(exc.status_code, f"HTTP_{exc.status_code}")
    body = exc.body if isinstance(exc.body, dict) else {}
    status = STATUS_BY_ERROR_CODE.get(str(body.get("code")))  # an error event mid-stream
    return status or type(exc).__name__


class HttpCalls:
    def __init__(self, url: str) -> None:
        self.client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        self.streams_without_final = 0

    async def close(self) -> None:
        await self.client.close()

    async def completion(self, stream: bool, **arguments: Any) -> str:
        """A completion, unary or streamed; a stream must end with its finish reason."""
        arguments.setdefault("model", "wuyu")
        arguments.setdefault("prompt", "侬好")
        try:
            if not stream:
                await self.client.completions.create(**arguments)
                return OK
            finished = False
            async for chunk in await self.client.completions.create(stream=True, **arguments):
                finished = finished or any(c.finish_reason for c in chunk.choices)
        except openai.APIError as exc:
            return _status(exc)
        if not finished:
            self.streams_without_final += 1
            return "OK_WITHOUT_FINAL"
        return OK

    async def cancel_after_first_chunk(self, prompt: str) -> str:
        """A stream the client closes after its first chunk: CANCELLED, as on gRPC (the
        outcome the client saw; the server must have recorded it CANCELLED too)."""
        chunks = 0
        try:
            stream = await self.client.completions.create(
                model="base", prompt=prompt, max_tokens=200, stream=True, extra_body={
                    "raw_prompt": True})
            async for _chunk in stream:
                chunks += 1
                break
            await stream.close()
        except openai.APIError as exc:
            return _status(exc)
        # The server's own count of these is checked after the run (soak.py).
        return "CANCELLED" if chunks else "NO_CHUNK"
