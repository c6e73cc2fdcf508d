"""The gRPC service, driven by a real client against a live server on a loopback port."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.formats.prompt import build_prompt, render_prompt
from server.service.logs import JsonFormatter, TextFormatter
from tests.polling import wait_for
from tests.service_fixtures import (
    SCALES,
    TEMPLATES,
    UTTERANCE,
    WUYU_TEMPLATE,
    assert_matches,
)


def request(**fields) -> pb.GenerateRequest:
    fields.setdefault("text", UTTERANCE)
    return pb.GenerateRequest(**fields)


def stream_all(stub, req, timeout=60) -> tuple[str, pb.GenerateResponse]:
    chunks, final = [], None
    for message in stub.GenerateStream(req, timeout=timeout):
        if message.HasField("final"):
            final = message.final
        else:
            chunks.append(message.text)
    assert final is not None
    return "".join(chunks), final


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.GenerateResponse | pb.AdapterStatus
                          | pb.ListAdaptersResponse):
            list(result)  # a stream: errors surface while iterating
    return info.value


# -- routes -------------------------------------------------------------------------------
ROUTES = [
    ("explicit", {"dialect": "wuyu"}, "wuyu", pb.ROUTE_EXPLICIT, "wuyu"),
    ("caller number", {"caller_number": "+86 21 5555 1234"}, "wuyu", pb.ROUTE_CALLER_NUMBER,
     "+8621"),
    ("national number", {"caller_number": "0512-6666-7777"}, "wuyu", pb.ROUTE_CALLER_NUMBER,
     "+86512"),
    ("region", {"region": "CN-GD"}, "cantonese", pb.ROUTE_REGION, "CN-GD"),
    ("region alias", {"region": "HK", "caller_number": "+1 212 555 0100"}, "cantonese",
     pb.ROUTE_REGION, "CN-HK"),
    ("default (mobile)", {"caller_number": "+86 138 0000 1111"}, None, pb.ROUTE_DEFAULT,
     "default"),
    ("fallback: missing", {"caller_number": "+86 10 5555 1234"}, None, pb.ROUTE_FALLBACK,
     "+8610"),
    ("fallback: refused", {"caller_number": "+86 99 5555 1234"}, None, pb.ROUTE_FALLBACK,
     "+8699"),
]


@pytest.mark.parametrize(("label", "fields", "adapter", "route", "detail"), ROUTES,
                         ids=[r[0] for r in ROUTES])
def test_routes_unary_and_streaming(live_server, expected, label, fields, adapter, route,
                                    detail):
    stub = live_server.stub()
    unary = stub.Generate(request(**fields), timeout=60)
    streamed_text, final = stream_all(stub, request(**fields))
    for response in (unary, final):
        assert response.adapter.name == (adapter or "")
        assert response.route == route
        assert response.route_detail == detail
        if adapter is not None:
            assert response.adapter.version == live_server.cache.info(adapter).version
            assert response.template_source == (
                pb.TEMPLATE_SOURCE_ADAPTER if adapter != "plain" else
                pb.TEMPLATE_SOURCE_ROUTING_TABLE)
            assert response.weight_scale == pytest.approx(SCALES[adapter], rel=1e-6)
        else:
            assert response.adapter.version == ""
            assert response.template_source == pb.TEMPLATE_SOURCE_ROUTING_TABLE
        assert response.prompt_template == TEMPLATES[adapter]
        assert (response.fallback_reason != "") == (route == pb.ROUTE_FALLBACK)
        assert response.completion_tokens > 0 and response.prompt_tokens > 0
        assert_matches(response.text, expected(adapter, UTTERANCE))
    assert streamed_text == final.text == unary.text
    if label == "fallback: missing":
        assert "no adapter named 'ghost'" in unary.fallback_reason


def test_adapter_without_manifest_uses_the_table_template(live_server, expected):
    response = live_server.stub().Generate(request(dialect="plain"), timeout=60)
    assert response.template_source == pb.TEMPLATE_SOURCE_ROUTING_TABLE
    assert_matches(response.text, expected("plain", UTTERANCE))


def test_text_equals_prompt_with_the_template_applied_by_hand(live_server, tokenizer):
    stub = live_server.stub()
    by_text = stub.Generate(request(dialect="wuyu", max_new_tokens=12), timeout=60)
    by_prompt = stub.Generate(pb.GenerateRequest(
        prompt=render_prompt(WUYU_TEMPLATE, UTTERANCE), dialect="wuyu", max_new_tokens=12),
        timeout=60)
    assert by_prompt.template_source == pb.TEMPLATE_SOURCE_NONE
    assert by_text.prompt_tokens == by_prompt.prompt_tokens == len(
        build_prompt(WUYU_TEMPLATE, UTTERANCE, tokenizer))
    assert by_text.text == by_prompt.text


def test_weight_scale_is_applied(live_server, expected):
    stub = live_server.stub()
    for scale in (0.0, 1.5):
        response = stub.Generate(request(dialect="wuyu", weight_scale=scale), timeout=60)
        assert response.weight_scale == pytest.approx(scale, rel=1e-6)
        assert_matches(response.text, expected("wuyu", UTTERANCE, scale=scale))


def test_chat_messages_use_the_chat_template(live_server, tokenizer):
    messages = [pb.ChatMessage(role="user", content="Hello there")]
    response = live_server.stub().Generate(pb.GenerateRequest(messages=messages), timeout=60)
    assert response.template_source == pb.TEMPLATE_SOURCE_CHAT
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    assert response.prompt_tokens == len(chat)


# -- status codes -------------------------------------------------------------------------
INVALID = [
    (pb.GenerateRequest(), "exactly one of text, prompt and messages must be set, got none"),
    (pb.GenerateRequest(text="a", prompt="b"), "got text and prompt"),
    (pb.GenerateRequest(text="   "), "text is empty"),
    (pb.GenerateRequest(prompt=""), "prompt is empty"),
    (request(max_new_tokens=0), "max_new_tokens must be > 0"),
    (request(max_new_tokens=-3), "max_new_tokens must be > 0"),
    (request(max_new_tokens=65), "max_new_tokens 65 exceeds the limit 64"),
    (request(text="word " * 300, max_new_tokens=8), "exceeds max_model_len 256"),
    (request(weight_scale=float("nan")), "weight_scale must be a finite number"),
    (request(weight_scale=float("inf")), "weight_scale must be a finite number"),
    (request(weight_scale=-0.5), "weight_scale must be a finite number >= 0"),
    (request(weight_scale=9.0), "weight_scale 9 exceeds the limit"),
    (request(temperature=-1.0), "temperature must be a finite number >= 0"),
    (request(top_p=0.0), "top_p must be in (0, 1]"),
    (request(top_p=1.5), "top_p must be in (0, 1]"),
    (request(stop=[f"s{i}" for i in range(17)]), "at most 16 stop strings"),
    (request(stop=["x" * 300]), "stop string of 300 bytes exceeds 256"),
    (request(caller_number="call me maybe"), "caller_number is not a phone number"),
    (request(dialect="../etc/passwd"), "dialect '../etc/passwd' is not an adapter name"),
    (request(region="Shanghai!"), "region 'Shanghai!' is not an ISO 3166-2 code"),
    (request(request_id="has spaces"), "request_id 'has spaces' must be"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]),
     "messages[0].role must be one of"),
]


def assert_invalid_argument(stub, req: pb.GenerateRequest, message: str) -> None:
    """Unary and streaming, ``req`` is INVALID_ARGUMENT with one short line naming it."""
    for call in (stub.Generate, stub.GenerateStream):
        error = rpc_error(call, req, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()
        assert "\n" not in error.details() and len(error.details()) < 300


@pytest.mark.parametrize(("req", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_arguments_name_the_field(live_server, req, message):
    assert_invalid_argument(live_server.stub(), req, message)


def test_unknown_dialect_is_not_found_and_lists_the_adapters(live_server):
    error = rpc_error(live_server.stub().Generate, request(dialect="klingon"), timeout=30)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "klingon" in error.details() and "available: " in error.details()
    assert "wuyu" in error.details()


def test_refused_adapter_is_failed_precondition_with_the_reason(live_server):
    error = rpc_error(live_server.stub().Generate, request(dialect="broken"), timeout=30)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not valid JSON" in error.details()


def test_retired_adapter_is_not_found(live_server, service_library):
    import shutil

    root, _, library = service_library
    folder = root / "retiree"
    shutil.copytree(library["plain"], folder)
    try:
        live_server.watcher.poll_now()
        stub = live_server.stub()
        assert stub.Generate(request(dialect="retiree"), timeout=30).adapter.name == "retiree"
    finally:
        shutil.rmtree(folder)
    live_server.watcher.poll_now()
    error = rpc_error(stub.Generate, request(dialect="retiree"), timeout=30)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_fallback_error_policy_fails_the_call(live_server, service_library):
    _, routing_path, _ = service_library
    original = routing_path.read_text()
    routing = live_server.server.routing
    try:
        routing_path.write_text(original.replace("fallback: base", "fallback: error   "))
        assert routing.check()
        error = rpc_error(live_server.stub().Generate,
                          request(caller_number="+86 10 5555 1234"), timeout=30)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        error = rpc_error(live_server.stub().Generate,
                          request(caller_number="+86 99 5555 1234"), timeout=30)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        routing_path.write_text(original)
        assert routing.check()


def test_deadline_exceeded_and_the_row_leaves(live_server):
    engine = live_server.engine
    gate = threading.Event()
    engine.fault_hook = lambda step: gate.wait(10)  # the engine stalls: the deadline passes
    try:
        error = rpc_error(live_server.stub().Generate, request(dialect="wuyu"), timeout=0.5)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        engine.fault_hook = None
        gate.set()
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, 30)
    wait_for(lambda: live_server.cache.usage()["version_pins"] == 0, 30)


def test_cancelled_stream_leaves_within_one_step(live_server):
    engine = live_server.engine
    metrics = live_server.server.metrics.registry
    labels = {"adapter": "wuyu", "route": "explicit", "status": "CANCELLED",
              "protocol": "grpc"}

    def cancelled() -> float:
        return metrics.get_sample_value("switchboard_requests_total", labels) or 0.0

    before = cancelled()
    gate, blocked = threading.Event(), []
    call = live_server.stub().GenerateStream(
        request(dialect="wuyu", max_new_tokens=64, request_id="cancel-me"), timeout=60)
    next(call)  # the row is decoding
    engine.fault_hook = lambda step: (blocked.append(step), gate.wait(10))
    wait_for(lambda: bool(blocked), 30)  # the engine holds at step N, planned with our row
    call.cancel()
    wait_for(lambda: cancelled() == before + 1, 30)  # the server has cancelled the request
    engine.fault_hook = None
    gate.set()
    wait_for(lambda: engine.stats()["running"] == 0, 30)
    later = [t.step for t in list(engine.trace) if "cancel-me" in t.rows and t.step > blocked[0]]
    assert later == [], f"the cancelled row took part in steps {later}"


def test_internal_error_names_the_request_id_and_the_server_keeps_serving(live_server,
                                                                          caplog):
    engine = live_server.engine

    def explode(step: int) -> None:
        engine.fault_hook = None
        raise RuntimeError("injected fault")

    engine.fault_hook = explode
    with caplog.at_level(logging.ERROR, logger="switchboard.service"):
        error = rpc_error(live_server.stub().Generate, request(request_id="boom-1"), timeout=30)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "request id boom-1" in error.details()
    assert "injected fault" not in error.details()  # internals stay in the log
    logged = [r for r in caplog.records if r.name == "switchboard.service" and r.exc_info]
    assert logged and "boom-1" in TextFormatter().format(logged[-1])
    assert live_server.stub().Generate(request(), timeout=30).completion_tokens > 0


def test_32_concurrent_mixed_dialect_streams(live_server, expected):
    stub = live_server.stub()
    plans = [({"dialect": "wuyu"}, "wuyu"), ({"caller_number": "+852 2345 6789"}, "cantonese"),
             ({"dialect": "plain"}, "plain"), ({}, None)]
    texts = ["侬今朝吃饭伐?", "我張單幾時到期呀?", "阿拉屋里向电费单子寄错了", "你哋幾點收工?"]
    jobs = [(plans[i % 4], texts[(i // 4) % 4]) for i in range(32)]

    def run(job):
        (fields, _), text = job
        return stream_all(stub, request(text=text, **fields))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for ((_, adapter), text), (streamed, final) in zip(jobs, results, strict=True):
        assert final.adapter.name == (adapter or "")
        assert streamed == final.text
        assert_matches(final.text, expected(adapter, text))
    wait_for(lambda: live_server.cache.usage()["version_pins"] == 0, 30)


# -- admin --------------------------------------------------------------------------------
def test_admin_rpcs(live_server):
    stub = live_server.stub()
    listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
    assert {"wuyu", "cantonese", "plain", "broken"} <= set(listed)
    assert listed["wuyu"].dialect == "wuyu"
    assert listed["wuyu"].default_weight_scale == pytest.approx(0.8, rel=1e-6)
    assert listed["broken"].error and listed["broken"].tier == pb.TIER_DISK

    unloaded = stub.UnloadAdapter(pb.UnloadAdapterRequest(name="plain"), timeout=30)
    assert unloaded.tier == pb.TIER_DISK and unloaded.version == ""
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name="plain"), timeout=30)
    assert loaded.tier in (pb.TIER_HOST, pb.TIER_DEVICE) and loaded.rank == 8
    reloaded = stub.ReloadAdapter(pb.ReloadAdapterRequest(name="plain"), timeout=30)
    assert reloaded.version == loaded.version

    for call, req, code, text in [
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="klingon"), grpc.StatusCode.NOT_FOUND,
         "klingon"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="../etc"),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid adapter name"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="broken"),
         grpc.StatusCode.FAILED_PRECONDITION, "not valid JSON"),
        (stub.UnloadAdapter, pb.UnloadAdapterRequest(name=""),
         grpc.StatusCode.INVALID_ARGUMENT, "name is empty"),
        (stub.ReloadAdapter, pb.ReloadAdapterRequest(name="plain", version="0123456789ab"),
         grpc.StatusCode.NOT_FOUND, "no kept version"),
    ]:
        error = rpc_error(call, req, timeout=30)
        assert error.code() == code and text in error.details(), error.details()


# -- health, reflection, metrics, logs ------------------------------------------------------
def test_health_and_reflection_through_the_standard_clients(live_server):
    channel = live_server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "switchboard.v1.Switchboard"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "switchboard.v1.Switchboard" in set(database.get_services())
    described = database.FindFileContainingSymbol("switchboard.v1.Switchboard")
    assert described.package == "switchboard.v1"


def scrape(live_server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(live_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_page_parses_and_counts_the_calls(live_server):
    def requests(samples, adapter, route, status):
        key = ("switchboard_requests_total",
               (("adapter", adapter), ("protocol", "grpc"), ("route", route),
                ("status", status)))
        return samples.get(key, 0.0)

    stub = live_server.stub()
    before = scrape(live_server)
    for _ in range(3):
        stub.Generate(request(dialect="cantonese"), timeout=30)
    stream_all(stub, request(region="CN-SH"))
    rpc_error(stub.Generate, request(dialect="klingon"), timeout=30)
    after = scrape(live_server)
    assert requests(after, "cantonese", "explicit", "OK") - requests(
        before, "cantonese", "explicit", "OK") == 3
    assert requests(after, "wuyu", "region", "OK") - requests(before, "wuyu", "region", "OK") == 1
    assert requests(after, "(none)", "none", "NOT_FOUND") - requests(
        before, "(none)", "none", "NOT_FOUND") == 1
    tokens = ("switchboard_generated_tokens_total", (("adapter", "cantonese"),))
    assert after[tokens] - before.get(tokens, 0.0) == 3 * 8
    for name in ("switchboard_time_to_first_token_seconds_count",
                 "switchboard_time_per_output_token_seconds_count",
                 "switchboard_request_duration_seconds_count"):
        assert any(key[0] == name for key in after), name
    for gauge in ("switchboard_queue_depth", "switchboard_running_batch_size",
                  "switchboard_adapter_slots_in_use", "switchboard_adapter_host_hits_total",
                  "switchboard_adapter_device_evictions_total",
                  "switchboard_adapter_load_seconds_count"):
        assert (gauge, ()) in after, gauge
    labels = {label for (_, pairs) in after for label, _ in pairs}
    assert labels <= {"adapter", "route", "status", "protocol", "le"}  # nothing about callers


def test_log_line_holds_no_utterance_and_no_full_caller_number(live_server, caplog):
    secret = "侬今朝吃饭伐 SECRET-ACCOUNT-4711"
    with caplog.at_level(logging.INFO, logger="switchboard.service"):
        live_server.stub().Generate(request(text=secret, caller_number="+86 21 5555 1234",
                                            request_id="log-check"), timeout=30)
    lines = [r for r in caplog.records if "log-check" in TextFormatter().format(r)]
    assert lines
    for record in lines:
        for text in (TextFormatter().format(record), JsonFormatter().format(record)):
            assert "SECRET" not in text and "4711" not in text
            assert "55551234" not in text and "5555 1234" not in text
            assert "+8621" in text
    entry = json.loads(JsonFormatter().format(lines[-1]))
    assert entry["request_id"] == "log-check" and entry["route"] == "caller_number"
