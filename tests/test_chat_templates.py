"""Chat through an adapter: a conversation sent to an adapter with a prompt template is
served the way the adapter was trained (its last user message through the template),
so one user message gets the same answer on chat, completions and gRPC. Against a live
server with the shipped adapters and routing table on the default model."""

from __future__ import annotations

from typing import Any

import pytest

from protos.switchboard.v1 import switchboard_pb2 as pb
from server.engine.config import EngineConfig
from server.service.config import REPO_ROOT
from tests.service_fixtures import LiveServer, server_config, start_server
from tests.test_http_api import client

TOKENS = 12
CASES = [  # (OpenAI model, gRPC fields, the utterance, the adapter that must answer)
    ("cantonese", {"dialect": "cantonese"}, "我張單幾時到期呀?", "cantonese"),
    ("wuyu", {"dialect": "wuyu"}, "侬今朝吃饭伐?", "wuyu"),
    ("telecom_terms", {"dialect": "telecom_terms"}, "侬个流量用光了伐?", "telecom_terms"),
    ("auto", {"caller_number": "+86 21 5555 1234"}, "侬今朝吃饭伐?", "wuyu"),
]


@pytest.fixture(scope="module")
def shipped() -> Any:
    """The shipped adapters and routing table on the default model."""
    server = start_server(server_config(
        REPO_ROOT / "server", REPO_ROOT / "adapters", REPO_ROOT / "server" / "routing.yaml",
        base_model="default", preload=("all",), engine=EngineConfig(
            max_batch_size=4, max_model_len=256, max_loras=4, max_lora_rank=64,
            max_new_tokens_limit=32)))
    yield server
    server.stop()


@pytest.mark.parametrize(("model", "routed", "utterance", "adapter"), CASES,
                         ids=[c[0] for c in CASES])
def test_one_user_message_gets_the_same_answer_on_chat_completions_and_grpc(
        shipped: LiveServer, model: str, routed: dict[str, str], utterance: str,
        adapter: str) -> None:
    api = client(shipped)
    extra = {k: v for k, v in routed.items() if k != "dialect"}
    chat = api.chat.completions.create(
        model=model, max_completion_tokens=TOKENS, extra_body=extra,
        messages=[{"role": "user", "content": utterance}])
    completion = api.completions.create(model=model, prompt=utterance, max_tokens=TOKENS,
                                        extra_body=extra)
    grpc_reply = shipped.stub().Generate(pb.GenerateRequest(
        text=utterance, max_new_tokens=TOKENS, **routed), timeout=120)
    assert chat.model == completion.model == grpc_reply.adapter.name == adapter
    answer = grpc_reply.text
    assert answer and chat.choices[0].message.content == completion.choices[0].text == answer
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens == \
        grpc_reply.prompt_tokens
    assert chat.model_extra["switchboard"]["template_source"] == "adapter"


def test_system_and_earlier_turns_do_not_reach_an_adapter(shipped: LiveServer) -> None:
    """Only the last user message goes through the template (docs/reliability.md)."""
    api = client(shipped)
    alone = api.chat.completions.create(
        model="cantonese", max_completion_tokens=TOKENS,
        messages=[{"role": "user", "content": "我張單幾時到期呀?"}])
    longer = api.chat.completions.create(
        model="cantonese", max_completion_tokens=TOKENS,
        messages=[{"role": "system", "content": "You are a helpful agent."},
                  {"role": "user", "content": "你好"},
                  {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "我張單幾時到期呀?"}])
    assert longer.choices[0].message.content == alone.choices[0].message.content
    assert longer.usage.prompt_tokens == alone.usage.prompt_tokens


def test_the_base_model_keeps_its_chat_template(shipped: LiveServer) -> None:
    reply = client(shipped).chat.completions.create(
        model="base", max_completion_tokens=4,
        messages=[{"role": "user", "content": "Hello"}])
    assert reply.model_extra["switchboard"]["template_source"] == "chat"
