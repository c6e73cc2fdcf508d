"""Composition through the live server (tiny model): ``adapters`` on gRPC (unary and
streaming), a composition as a routing target, the CLI's ``--adapter NAME[@SCALE]``,
the Python client and the OpenAI API's ``extra_body``, with answers checked against PEFT
with the same adapters active, metrics labels, and bad input with the field named."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from clients.cli import main as cli
from clients.client import SwitchboardClient
from clients.errors import SwitchboardError
from protos.switchboard.v1 import switchboard_pb2 as pb
from server.formats.prompt import build_prompt
from tests.lora_helpers import MARGIN
from tests.service_fixtures import SCALES, UTTERANCE, WUYU_TEMPLATE, assert_matches
from tests.test_http_api import calls_counted, client

PAIR = [("wuyu", None), ("plain", 0.5)]


@pytest.fixture(scope="module")
def composed_reference(oracle, tokenizer):
    """PEFT with wuyu (its manifest's 0.8) and plain (0.5) active, greedy, 8 tokens."""
    prompt = build_prompt(WUYU_TEMPLATE, UTTERANCE, tokenizer)
    run = oracle.greedy_composed(prompt, [("wuyu", SCALES["wuyu"]), ("plain", 0.5)], 8)
    tokens = [t for t in run.tokens if t != tokenizer.eos_token_id]
    unsure = next((i for i, m in enumerate(run.margins()) if m < MARGIN), len(tokens))
    return tokenizer.decode(tokens), tokenizer.decode(tokens[:unsure])


def refs(uses) -> list[pb.AdapterRef]:
    return [pb.AdapterRef(name=n) if c is None else pb.AdapterRef(name=n, weight_scale=c)
            for n, c in uses]


def test_grpc_composition_matches_peft_and_reports_every_adapter(live_server,
                                                                 composed_reference):
    stub = live_server.stub()
    reply = stub.Generate(pb.GenerateRequest(text=UTTERANCE, adapters=refs(PAIR)), timeout=60)
    assert_matches(reply.text, composed_reference)
    assert [(a.name, round(a.weight_scale, 3)) for a in reply.adapters] == \
        [("wuyu", 0.8), ("plain", 0.5)]
    assert all(len(a.version) == 64 for a in reply.adapters)
    assert reply.adapter.name == "wuyu" and reply.route == pb.ROUTE_EXPLICIT
    assert reply.route_detail == "wuyu+plain" and reply.prompt_template == WUYU_TEMPLATE
    streamed = list(stub.GenerateStream(pb.GenerateRequest(text=UTTERANCE,
                                                           adapters=refs(PAIR)), timeout=60))
    assert "".join(m.text for m in streamed[:-1]) == streamed[-1].final.text == reply.text
    assert len(streamed[-1].final.adapters) == 2


def test_a_composition_of_one_adapter_is_the_single_adapter_path(live_server):
    stub = live_server.stub()
    single = stub.Generate(pb.GenerateRequest(text=UTTERANCE, dialect="wuyu"), timeout=60)
    one = stub.Generate(pb.GenerateRequest(text=UTTERANCE, adapters=refs([("wuyu", None)])),
                        timeout=60)
    assert one.text == single.text and one.weight_scale == single.weight_scale
    assert [a.name for a in one.adapters] == [a.name for a in single.adapters] == ["wuyu"]


def test_a_routing_table_composition_serves_and_is_labelled(live_server, composed_reference):
    before = calls_counted(live_server, adapter="wuyu+plain", route="caller_number",
                           status="OK", protocol="grpc")
    reply = live_server.stub().Generate(pb.GenerateRequest(
        text=UTTERANCE, caller_number="+86 57 5555 1234"), timeout=60)
    assert reply.route == pb.ROUTE_CALLER_NUMBER and reply.route_detail == "+8657"
    assert [(a.name, round(a.weight_scale, 3)) for a in reply.adapters] == \
        [("wuyu", 0.8), ("plain", 0.5)]
    assert_matches(reply.text, composed_reference)
    assert calls_counted(live_server, adapter="wuyu+plain", route="caller_number",
                         status="OK", protocol="grpc") == before + 1
    # a composition the table does not name gets the bounded label
    before = calls_counted(live_server, adapter="composed", route="explicit", status="OK",
                           protocol="grpc")
    live_server.stub().Generate(pb.GenerateRequest(
        text=UTTERANCE, adapters=refs([("cantonese", 1.0), ("plain", None)])), timeout=60)
    assert calls_counted(live_server, adapter="composed", route="explicit", status="OK",
                         protocol="grpc") == before + 1


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"dialect": "wuyu", "adapters": refs(PAIR)}, grpc.StatusCode.INVALID_ARGUMENT,
     "set either dialect or adapters, not both"),
    ({"adapters": refs([("wuyu", None), ("klingon", None)])}, grpc.StatusCode.NOT_FOUND,
     "klingon"),
    ({"adapters": refs([("wuyu", None), ("wuyu", 0.5)])}, grpc.StatusCode.INVALID_ARGUMENT,
     "adapters: wuyu is given twice"),
    ({"adapters": refs([("wuyu", None), ("plain", -1.0)])}, grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[1].weight_scale must be a finite number >= 0"),
    ({"adapters": refs([(n, None) for n in ("wuyu", "plain", "cantonese", "a", "b")])},
     grpc.StatusCode.INVALID_ARGUMENT, "adapters: at most 4 per call, got 5"),
    ({"adapters": refs([("Wu Yu", None)])}, grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[0].name 'Wu Yu' is not an adapter name"),
    ({"adapters": refs(PAIR), "weight_scale": 0.5}, grpc.StatusCode.INVALID_ARGUMENT,
     "give each adapter its own weight_scale"),
])
def test_bad_compositions_are_refused_with_the_field_named(live_server, fields, code, words):
    with pytest.raises(grpc.RpcError) as failure:
        live_server.stub().Generate(pb.GenerateRequest(text=UTTERANCE, **fields), timeout=60)
    assert failure.value.code() == code
    assert words in failure.value.details()
    usage = live_server.cache.usage()
    assert usage["version_pins"] == 0  # a refused composition leaves no lease behind


def test_python_client_and_cli_compose(live_server, composed_reference, capsys):
    with SwitchboardClient(live_server.address) as switchboard:
        result = switchboard.generate(UTTERANCE, adapters=["wuyu", "plain@0.5"])
        assert [(a.name, round(a.weight_scale, 3)) for a in result.adapters] == \
            [("wuyu", 0.8), ("plain", 0.5)]
        assert_matches(result.text, composed_reference)
        same = switchboard.generate(UTTERANCE, adapters=[("wuyu", None), ("plain", 0.5)])
        assert same.text == result.text
        with pytest.raises(SwitchboardError) as failure:
            switchboard.generate(UTTERANCE, adapters=["wuyu", "wuyu"])
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    code = cli(["generate", "--target", live_server.address, "--adapter", "wuyu",
                "--adapter", "plain@0.5", UTTERANCE])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == result.text.strip()
    assert "wuyu@0.8" in err and "plain@0.5" in err
    with pytest.raises(SystemExit):
        cli(["generate", "--target", live_server.address, "--adapter", "plain@x", "hi"])
    assert "the scale after '@' must be a number" in capsys.readouterr().err
    code = cli(["generate", "--json", "--target", live_server.address, "--adapter", "wuyu",
                "--adapter", "plain@0.5", UTTERANCE])
    assert code == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)["adapters"]] == \
        ["wuyu", "plain"]


def test_openai_api_composes_through_extra_body(live_server, composed_reference):
    api = client(live_server)
    reply = api.completions.create(
        model="auto", prompt=UTTERANCE, max_tokens=8,
        extra_body={"adapters": ["wuyu", {"name": "plain", "weight_scale": 0.5}]})
    assert reply.model == "wuyu+plain"
    assert_matches(reply.choices[0].text, composed_reference)
    extra = reply.model_extra["switchboard"]
    assert [(a["name"], round(a["weight_scale"], 3)) for a in extra["adapters"]] == \
        [("wuyu", 0.8), ("plain", 0.5)]
    with pytest.raises(openai.BadRequestError) as failure:
        api.completions.create(model="wuyu", prompt=UTTERANCE, max_tokens=8,
                               extra_body={"adapters": ["wuyu", "plain"]})
    assert failure.value.body["param"] == "adapters"
    assert "only with model 'auto'" in failure.value.body["message"]
