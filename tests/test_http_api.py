"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client (sync and
async) against a live server on a loopback port (tiny model), and by raw HTTP where a
client library cannot send what is tested (bad JSON, a 2 MB body, a dropped stream)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.engine.config import EngineConfig
from tests.polling import wait_for
from tests.service_fixtures import (
    UTTERANCE,
    LiveServer,
    assert_matches,
    server_config,
    start_server,
)

GEN_KEY = "http-gen-key-1234"


def client(server: LiveServer, **options: Any) -> OpenAI:
    options.setdefault("api_key", "unused")
    options.setdefault("max_retries", 0)
    return OpenAI(base_url=server.server.http_url, timeout=60, **options)


def async_client(server: LiveServer, **options: Any) -> AsyncOpenAI:
    options.setdefault("api_key", "unused")
    options.setdefault("max_retries", 0)
    return AsyncOpenAI(base_url=server.server.http_url, timeout=60, **options)


def raw(server: LiveServer, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    url = server.server.http_url.removesuffix("/v1") + path
    request = urllib.request.Request(url, data=body, method=method, headers={
        "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def calls_counted(server: LiveServer, **labels: str) -> float:
    """The server's ``switchboard_requests_total`` for these labels (0 before any)."""
    return server.server.metrics.registry.get_sample_value(
        "switchboard_requests_total", labels) or 0.0


def grpc_usage(server: LiveServer, **fields: Any) -> pb.GenerateResponse:
    return server.stub().Generate(pb.GenerateRequest(**fields), timeout=60)


# -- answers ------------------------------------------------------------------------------
def test_completions_for_an_adapter_and_the_base_match_the_oracle(live_server, expected):
    api = client(live_server)
    reply = api.completions.create(model="wuyu", prompt=UTTERANCE, max_tokens=8)
    assert reply.model == "wuyu" and reply.object == "text_completion"
    assert_matches(reply.choices[0].text, expected("wuyu", UTTERANCE))
    assert reply.choices[0].finish_reason in ("stop", "length")
    same = grpc_usage(live_server, text=UTTERANCE, dialect="wuyu", max_new_tokens=8)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == \
        (same.prompt_tokens, same.completion_tokens)
    assert reply.usage.total_tokens == same.prompt_tokens + same.completion_tokens
    extra = reply.model_extra["switchboard"]
    assert extra["route"] == "explicit" and extra["adapter_version"] == same.adapter.version
    base_id = live_server.server.http_api.base_id
    for name in ("base", base_id):
        base = api.completions.create(model=name, prompt=UTTERANCE, max_tokens=8)
        assert base.model == base_id
        assert_matches(base.choices[0].text, expected(None, UTTERANCE))


def test_chat_answers_what_grpc_answers(live_server):
    api = client(live_server)
    reply = api.chat.completions.create(
        model="cantonese", max_completion_tokens=8,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello there"}])
    same = live_server.stub().Generate(pb.GenerateRequest(
        dialect="cantonese", max_new_tokens=8,
        messages=[pb.ChatMessage(role="system", content="Be brief."),
                  pb.ChatMessage(role="user", content="Hello there")]), timeout=60)
    assert reply.object == "chat.completion" and reply.model == "cantonese"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == same.text
    assert reply.usage.completion_tokens == same.completion_tokens
    assert reply.usage.prompt_tokens == same.prompt_tokens


def test_auto_routes_by_caller_number_and_says_which_adapter_served(live_server, expected):
    reply = client(live_server).completions.create(
        model="auto", prompt=UTTERANCE, max_tokens=8,
        extra_body={"caller_number": "+86 21 5555 1234"})
    assert reply.model == "wuyu"
    extra = reply.model_extra["switchboard"]
    assert extra["route"] == "caller_number" and extra["route_detail"] == "+8621"
    assert_matches(reply.choices[0].text, expected("wuyu", UTTERANCE))
    fallback = client(live_server).completions.create(
        model="auto", prompt=UTTERANCE, max_tokens=4,
        extra_body={"caller_number": "+86 10 5555 1234"})  # routed to a missing adapter
    assert fallback.model == live_server.server.http_api.base_id
    assert "ghost" in fallback.model_extra["switchboard"]["fallback_reason"]


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_weight_scale_matches_the_oracle(live_server, expected, scale):
    reply = client(live_server).completions.create(
        model="wuyu", prompt=UTTERANCE, max_tokens=8, extra_body={"weight_scale": scale})
    assert reply.model_extra["switchboard"]["weight_scale"] == pytest.approx(scale)
    assert_matches(reply.choices[0].text, expected("wuyu", UTTERANCE, scale=scale))


def test_streamed_deltas_concatenate_to_the_unary_text(live_server):
    api = client(live_server)
    sampled = {"temperature": 0.9, "seed": 7, "max_tokens": 12}
    for model in ("wuyu", "base"):
        unary = api.completions.create(model=model, prompt=UTTERANCE, **sampled)
        chunks = list(api.completions.create(model=model, prompt=UTTERANCE, stream=True,
                                             stream_options={"include_usage": True},
                                             **sampled))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == \
            unary.choices[0].text
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == unary.choices[0].finish_reason
        assert all(f is None for f in finishes[:-1])
    messages = [{"role": "user", "content": "Tell me about the weather"}]
    unary_chat = api.chat.completions.create(model="wuyu", messages=messages, **sampled)
    stream = api.chat.completions.create(model="wuyu", messages=messages, stream=True,
                                         **sampled)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == unary_chat.choices[0].message.content


def test_async_client_unary_and_streaming(live_server, expected):
    async def main() -> tuple[str, str, list[str]]:
        api = async_client(live_server)
        unary = await api.completions.create(model="wuyu", prompt=UTTERANCE, max_tokens=8)
        stream = await api.chat.completions.create(
            model="wuyu", stream=True, max_tokens=8,
            messages=[{"role": "user", "content": "Hello"}])
        parts = [c.choices[0].delta.content or "" async for c in stream]
        chat = await api.chat.completions.create(
            model="wuyu", max_tokens=8, messages=[{"role": "user", "content": "Hello"}])
        await api.close()
        return unary.choices[0].text, chat.choices[0].message.content or "", parts

    text, chat_text, parts = asyncio.run(main())
    assert_matches(text, expected("wuyu", UTTERANCE))
    assert "".join(parts) == chat_text


def test_models_list_holds_the_base_and_every_servable_adapter(live_server):
    models = client(live_server).models.list()
    ids = [m.id for m in models.data]
    base_id = live_server.server.http_api.base_id
    assert ids[0] == base_id
    assert {"wuyu", "cantonese", "plain"} <= set(ids) and "broken" not in ids
    wuyu = next(m for m in models.data if m.id == "wuyu")
    assert wuyu.object == "model" and wuyu.owned_by == "switchboard"
    assert wuyu.model_extra["parent"] == base_id and wuyu.model_extra["rank"] == 8
    assert wuyu.model_extra["version"]
    assert client(live_server).models.retrieve("wuyu").id == "wuyu"
    assert client(live_server).models.retrieve("base").id == base_id


def test_health_ready_and_the_metrics_protocol_label(live_server):
    assert raw(live_server, "GET", "/health")[0] == 200
    assert raw(live_server, "GET", "/ready")[:3:2] == (200, {"status": "ready"})
    labels = {"adapter": "wuyu", "route": "explicit", "status": "OK", "protocol": "http"}
    before = calls_counted(live_server, **labels)
    client(live_server).completions.create(model="wuyu", prompt="hi", max_tokens=2)
    assert calls_counted(live_server, **labels) == before + 1


# -- errors -------------------------------------------------------------------------------
def assert_error(error: openai.APIStatusError, status: int, type_: str,
                 param: str | None) -> None:
    assert error.status_code == status, (error.status_code, error.body)
    body = error.body
    assert isinstance(body, dict), body
    assert body["type"] == type_ and body["param"] == param, body
    assert len(body["message"]) <= 500 and "Traceback" not in body["message"]


@pytest.mark.parametrize(("what", "call", "status", "exc", "param"), [
    ("unknown model", dict(model="klingon"), 404, openai.NotFoundError, "model"),
    ("n=2", dict(n=2), 400, openai.BadRequestError, "n"),
    ("64 stop strings", dict(stop=[f"s{i}" for i in range(64)]), 400,
     openai.BadRequestError, "stop"),
    ("max_tokens 10^9", dict(max_tokens=10**9), 400, openai.BadRequestError, "max_tokens"),
    ("max_tokens a string", dict(extra_body={"max_tokens": "5"}), 400,
     openai.BadRequestError, "max_tokens"),
    ("temperature a string", dict(extra_body={"temperature": "hot"}), 400,
     openai.BadRequestError, "temperature"),
    ("weight_scale -1", dict(extra_body={"weight_scale": -1}), 400,
     openai.BadRequestError, "weight_scale"),
    ("routing field with a named model", dict(extra_body={"region": "CN-SH"}), 400,
     openai.BadRequestError, "region"),
    ("logprobs", dict(logprobs=2), 400, openai.BadRequestError, "logprobs"),
    ("refused adapter", dict(model="broken"), 409, openai.ConflictError, None),
    ("a name no adapter can have", dict(model="GPT 4"), 404, openai.NotFoundError, "model"),
    ("seed 2**64", dict(seed=2**64, temperature=1.0), 400, openai.BadRequestError, "seed"),
    ("temperature 1e-40", dict(temperature=1e-40), 400, openai.BadRequestError,
     "temperature"),
])
def test_invalid_completions_are_refused_with_the_field(live_server, what, call, status,
                                                        exc, param):
    fields = {"model": "wuyu", "prompt": UTTERANCE, "max_tokens": 4, **call}
    with pytest.raises(exc) as caught:
        client(live_server).completions.create(**fields)
    type_ = "invalid_request_error"
    assert_error(caught.value, status, type_, param)
    if param == "max_tokens":  # the message names the field as the client sent it
        assert caught.value.body["message"].startswith("max_tokens")
    if status == 409:  # a refused adapter stays refused: the client must not retry
        assert caught.value.response.headers.get("x-should-retry") == "false"


def test_a_list_prompt_and_bad_messages_are_refused(live_server):
    api = client(live_server)
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="wuyu", prompt=["one", "two"], max_tokens=4)
    assert_error(caught.value, 400, "invalid_request_error", "prompt")
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="wuyu", messages=[{"role": "robot", "content": "x"}])
    assert_error(caught.value, 400, "invalid_request_error", "messages")


def test_bad_json_wrong_shape_and_a_2mb_body(live_server):
    status, _, body = raw(live_server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    status, _, body = raw(live_server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    huge = json.dumps({"model": "wuyu", "prompt": "x" * (2 << 20)}).encode()
    status, _, body = raw(live_server, "POST", "/v1/completions", huge)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, _, body = raw(live_server, "GET", "/v1/nowhere")
    assert status == 404 and "error" in body
    # the server kept serving
    assert client(live_server).completions.create(model="wuyu", prompt="hi", max_tokens=2)


def test_messages_quote_only_a_short_slice_of_the_input(live_server):
    for call in ({"model": "a" * 10_000},
                 {"model": "auto", "extra_body": {"dialect": "b" * 10_000}},
                 {"model": "wuyu", "extra_body": {"temperature": "c" * 10_000}}):
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as caught:
            client(live_server).completions.create(**{"prompt": "hi", **call})
        message = caught.value.body["message"]
        assert len(message) <= 200 and not any(c * 50 in message for c in "abc"), message


def test_an_internal_error_is_500_with_the_request_id_and_the_server_keeps_serving(
        live_server):
    engine = live_server.engine

    def explode(step: int) -> None:
        engine.fault_hook = None
        raise RuntimeError("injected fault")

    engine.fault_hook = explode
    with pytest.raises(openai.InternalServerError) as caught:
        client(live_server).completions.create(model="wuyu", prompt="hi", max_tokens=4,
                                               extra_body={"request_id": "boom-http"})
    assert_error(caught.value, 500, "server_error", None)
    assert "request id boom-http" in caught.value.body["message"]
    assert "injected fault" not in caught.value.body["message"]
    assert client(live_server).completions.create(model="wuyu", prompt="hi", max_tokens=2)


def test_deadline_is_504_and_the_row_leaves(live_server):
    engine = live_server.engine
    gate = threading.Event()
    # The engine stalls for 2 s: the deadline passes, and the next step ends the row.
    engine.fault_hook = lambda step: gate.wait(2)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client(live_server).completions.create(
                model="wuyu", prompt=UTTERANCE, max_tokens=8, extra_body={"timeout_s": 0.5})
        assert_error(caught.value, 504, "timeout", None)
        assert caught.value.response.headers.get("x-should-retry") == "false"
    finally:
        engine.fault_hook = None
        gate.set()
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, 30)
    wait_for(lambda: live_server.cache.usage()["version_pins"] == 0, 30)


def open_stream(server: LiveServer, request_id: str) -> tuple[http.client.HTTPConnection,
                                                              http.client.HTTPResponse]:
    parts = urlsplit(server.server.http_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"model": "wuyu", "prompt": UTTERANCE, "max_tokens": 64, "stream": True,
            "request_id": request_id}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first token is out
    return connection, response


def drop(connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Close the client's socket (its file objects too, or the fd stays open)."""
    connection.sock.shutdown(socket.SHUT_RDWR)
    response.close()
    connection.close()


def test_a_dropped_stream_frees_its_row_within_one_step(live_server):
    engine = live_server.engine

    def cancelled() -> float:
        return calls_counted(live_server, adapter="wuyu", route="explicit",
                             status="CANCELLED", protocol="http")

    before = cancelled()
    connection, _response = open_stream(live_server, "drop-me")
    gate, blocked = threading.Event(), []
    engine.fault_hook = lambda step: (blocked.append(step), gate.wait(10))
    wait_for(lambda: bool(blocked), 30)  # the engine holds at step N, planned with our row
    drop(connection, _response)  # the client goes away mid-generation
    wait_for(lambda: cancelled() == before + 1, 30)
    engine.fault_hook = None
    gate.set()
    wait_for(lambda: engine.stats()["running"] == 0, 30)
    later = [t.step for t in list(engine.trace) if "drop-me" in t.rows and t.step > blocked[0]]
    assert later == [], f"the dropped row took part in steps {later}"


def test_32_dropped_streams_leave_no_pins_rows_or_queue_entries(live_server):
    engine = live_server.engine
    for i in range(32):
        drop(*open_stream(live_server, f"drop-{i}"))
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, 60)
    wait_for(lambda: live_server.cache.usage()["version_pins"] == 0
             and live_server.cache.usage()["slot_pins"] == 0, 30)
    assert engine.stats()["free_kv_rows"] == engine.config.max_batch_size
    assert live_server.server.state.in_flight == 0


# -- keys, queue, life cycle --------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_model_dir, service_library):
    """Keys required, one row and one queue place, CORS for one origin: auth, queue-full
    and CORS tests."""
    root, routing, _ = service_library
    server = start_server(server_config(
        tiny_model_dir, root, routing, api_keys=(GEN_KEY,), metrics_port=-1,
        cors_origins=("https://console.example",),
        engine=EngineConfig(max_batch_size=1, max_queue_size=1, max_model_len=256,
                            max_loras=2, max_lora_rank=16, max_new_tokens_limit=64)))
    yield server
    server.stop()


def test_missing_or_wrong_key_is_401(keyed):
    for key in ("unused", "wrong-key"):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(keyed, api_key=key).completions.create(model="wuyu", prompt="hi")
        assert_error(caught.value, 401, "authentication_error", None)
    with pytest.raises(openai.AuthenticationError):
        client(keyed, api_key="wrong-key").models.list()
    status, _, _ = raw(keyed, "POST", "/v1/completions", b'{"model": "wuyu", "prompt": "hi"}')
    assert status == 401
    reply = client(keyed, api_key=GEN_KEY).completions.create(model="wuyu", prompt="hi",
                                                             max_tokens=2)
    assert reply.usage.completion_tokens > 0


def preflight(server: LiveServer) -> dict[str, str]:
    url = server.server.http_url + "/chat/completions"
    request = urllib.request.Request(url, method="OPTIONS", headers={
        "origin": "https://console.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return {k.lower(): v for k, v in error.headers.items()}


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(keyed, live_server):
    assert preflight(keyed).get("access-control-allow-origin") == "https://console.example"
    assert "access-control-allow-origin" not in preflight(live_server)


def test_queue_full_is_429_with_retry_after_and_the_client_retry_succeeds(keyed):
    engine = keyed.engine

    def refused() -> float:
        return calls_counted(keyed, adapter="(none)", route="none",
                             status="RESOURCE_EXHAUSTED", protocol="http")

    # wuyu resident in a device slot first: a slot copy would hold the first row out of
    # the batch while the engine stalls below.
    client(keyed, api_key=GEN_KEY).completions.create(model="wuyu", prompt="hi", max_tokens=1)
    gate = threading.Event()
    engine.fault_hook = lambda step: gate.wait(30)
    holders = []
    try:
        for _ in range(2):  # one row decoding (stalled), one waiting: the queue is full
            holder = threading.Thread(target=lambda: client(keyed, api_key=GEN_KEY)
                                      .completions.create(model="wuyu", prompt="hi",
                                                          max_tokens=4))
            holder.start()
            holders.append(holder)
        wait_for(lambda: engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1,
                 30)
        before = refused()
        status, headers, body = raw(keyed, "POST", "/v1/completions",
                                    b'{"model": "wuyu", "prompt": "hi", "max_tokens": 2}',
                                    {"authorization": f"Bearer {GEN_KEY}"})
        assert status == 429 and headers.get("retry-after") == "1"
        assert body["error"]["type"] == "rate_limit_error"
        assert refused() == before + 1
        results: list[Any] = []
        retrying = threading.Thread(target=lambda: results.append(
            client(keyed, api_key=GEN_KEY, max_retries=5).completions.create(
                model="wuyu", prompt="hi", max_tokens=2)))
        retrying.start()
        wait_for(lambda: refused() >= before + 2, 30)  # its first try was refused...
        gate.set()  # ... then the queue drains, and the client's own retry gets through
        retrying.join(60)
        assert results and results[0].usage.completion_tokens > 0
    finally:
        engine.fault_hook = None
        gate.set()
        for holder in holders:
            holder.join(60)


def test_starting_and_draining_are_503(tiny_model_dir, service_library):
    from tests.test_service_security import held_server

    with held_server(tiny_model_dir, service_library) as (live, release):
        status, _, body = raw(live, "POST", "/v1/completions",
                              b'{"model": "wuyu", "prompt": "hi"}')
        assert status == 503 and "starting" in body["error"]["message"]
        assert body["error"]["type"] == "service_unavailable"
        assert raw(live, "GET", "/ready")[0] == 503
        assert raw(live, "GET", "/health")[0] == 200
        release.set()
        wait_for(lambda: raw(live, "GET", "/ready")[0] == 200, 60)
        live.server.state.draining = True  # what shutdown sets first
        with pytest.raises(openai.InternalServerError) as caught:
            client(live).completions.create(model="wuyu", prompt="hi")
        assert_error(caught.value, 503, "service_unavailable", None)
        assert caught.value.response.headers.get("retry-after") == "1"
        assert raw(live, "GET", "/ready")[0] == 503
        live.server.state.draining = False
