"""``ignore_eos`` and ``min_tokens`` (vLLM's fields for fixed-length replies): the
engine's EOS mask, stop strings under min_tokens, and the fields on gRPC, the OpenAI
API, the Python clients and ``switchboard loadtest --ignore-eos``.

The shared tiny model never ends a reply at EOS (SmolLM2's pad token is its EOS, whose
tied embedding row is zero, so its logit stays below the best token's). These tests run
on an "EOS-first" variant instead: every token's embedding gets one constant component,
EOS's twice as much; the residual stream keeps it, and the tied head puts EOS about 30
logits above any other token at every position. Unasked, every reply is then a single
EOS, so a reply of any other length shows a field at work.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
import torch
from openai import OpenAI
from transformers import LlamaForCausalLM

from clients.aio import AsyncSwitchboardClient
from clients.client import SwitchboardClient
from protos.switchboard.v1 import switchboard_pb2 as pb
from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.request import FinishReason, GenerationRequest
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequest
from server.service.config import REPO_ROOT
from tests.service_fixtures import UTTERANCE, LiveServer, server_config, start_server
from tests.tiny_llama import build_tiny_llama


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """The tiny LLaMA whose every next token is EOS (see the module docstring)."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("eos-first"), tokenizer)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight  # tied with the head
        embeddings[:, 0] = 4.0
        embeddings[tokenizer.eos_token_id, 0] = 8.0
    model.save_pretrained(folder)
    return folder


# -- engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "fused"])
def eos_engine(request, eos_model_dir: Path):
    loaded = load_base_model(eos_model_dir, dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=8, max_model_len=256, max_loras=1, max_lora_rank=8,
        decode=request.param), start=False)
    yield engine
    engine.stop()


def test_min_tokens_masks_eos_per_row_in_one_batch(eos_engine, tokenizer):
    """Rows with and without min_tokens share a step: the greedy rows' shared argmax, a
    penalised greedy row and a sampled row each keep EOS away exactly until their own
    min_tokens, and a row without one still ends at EOS at once."""
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("Caller 7 says: the bill is wrong again.")
    cases = {
        "plain": SamplingParams(max_new_tokens=8),
        "greedy_min5": SamplingParams(max_new_tokens=8, min_tokens=5),
        "penalised_min3": SamplingParams(max_new_tokens=8, min_tokens=3,
                                         repetition_penalty=1.3),
        "sampled_min4": SamplingParams(max_new_tokens=8, min_tokens=4, temperature=1.0,
                                       seed=11),
        "min_is_max": SamplingParams(max_new_tokens=4, min_tokens=4),
        "ignore_eos": SamplingParams(max_new_tokens=7, ignore_eos=True),
    }
    # Queued before the engine thread starts, so all are admitted into the same steps.
    handles = {name: eos_engine.submit(GenerationRequest(list(prompt), params))
               for name, params in cases.items()}
    eos_engine.start()
    results = {name: handle.result(120) for name, handle in handles.items()}

    assert results["plain"].token_ids == (eos,)
    assert results["plain"].finish_reason == FinishReason.EOS
    for name, minimum in (("greedy_min5", 5), ("penalised_min3", 3), ("sampled_min4", 4)):
        tokens = results[name].token_ids
        assert len(tokens) == minimum + 1 and tokens[-1] == eos, (name, tokens)
        assert eos not in tokens[:-1], (name, tokens)
        assert results[name].finish_reason == FinishReason.EOS
    assert len(results["min_is_max"].token_ids) == 4
    assert eos not in results["min_is_max"].token_ids
    assert results["min_is_max"].finish_reason == FinishReason.LENGTH
    assert results["ignore_eos"].token_ids == (eos,) * 7  # EOS, but it does not end
    assert results["ignore_eos"].finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize(("changes", "field"), [
    ({"min_tokens": 9}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": True}, "min_tokens"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_min_tokens_and_ignore_eos_out_of_range_name_the_field(changes, field):
    with pytest.raises(InvalidRequest) as caught:
        SamplingParams(max_new_tokens=8, **changes).validate(64)
    assert caught.value.param == field and field in str(caught.value)


def test_a_stop_string_within_the_first_min_tokens_does_not_end_the_reply(tokenizer):
    """vLLM's rule: a stop string ends the reply only once completed by a token after
    the first min_tokens; one lying in the text of those tokens is kept."""
    ids = tokenizer.encode("one STOP two STOP three", add_special_tokens=False)
    first = next(k for k in range(1, len(ids) + 1) if "STOP" in tokenizer.decode(ids[:k]))

    def reply(min_tokens: int) -> str:
        detok = IncrementalDetokenizer(tokenizer, ("STOP",), min_tokens)
        for token in ids:
            detok.add(token)
            if detok.stopped:
                break
        detok.finish()
        return detok.text

    assert reply(0) == reply(first - 1) == "one "  # completed by token min_tokens + 1
    assert reply(first) == "one STOP two "  # completed within the first min_tokens


# -- service -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_server(eos_model_dir: Path, service_library):
    root, routing, _ = service_library
    server = start_server(server_config(eos_model_dir, root, routing, preload=(),
                                        metrics_port=-1))
    yield server
    server.stop()


def generate(server: LiveServer, **fields) -> pb.GenerateResponse:
    return server.stub().Generate(pb.GenerateRequest(text=UTTERANCE, **fields), timeout=60)


def test_grpc_ignore_eos_generates_exactly_max_new_tokens(eos_server):
    unasked = generate(eos_server, max_new_tokens=6)
    assert (unasked.completion_tokens, unasked.finish_reason) == (1, pb.FINISH_REASON_EOS)
    fixed = generate(eos_server, max_new_tokens=6, ignore_eos=True)
    assert (fixed.completion_tokens, fixed.finish_reason) == (6, pb.FINISH_REASON_LENGTH)
    at_least = generate(eos_server, max_new_tokens=6, min_tokens=3)
    assert (at_least.completion_tokens, at_least.finish_reason) == (4, pb.FINISH_REASON_EOS)
    stream = list(eos_server.stub().GenerateStream(pb.GenerateRequest(
        text=UTTERANCE, max_new_tokens=5, ignore_eos=True), timeout=60))
    assert sum(m.tokens for m in stream if not m.HasField("final")) == 5
    assert stream[-1].final.completion_tokens == 5


@pytest.mark.parametrize("min_tokens", [7, -1])
def test_grpc_min_tokens_out_of_range_is_invalid_argument(eos_server, min_tokens):
    with pytest.raises(grpc.RpcError) as caught:
        generate(eos_server, max_new_tokens=6, min_tokens=min_tokens)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_tokens" in caught.value.details()


def test_openai_api_takes_vllms_ignore_eos_and_min_tokens(eos_server):
    api = OpenAI(base_url=eos_server.server.http_url, api_key="unused", max_retries=0,
                 timeout=60)
    unasked = api.completions.create(model="base", prompt=UTTERANCE, max_tokens=6)
    assert unasked.usage.completion_tokens == 1
    fixed = api.completions.create(model="base", prompt=UTTERANCE, max_tokens=6,
                                   extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 6 and fixed.choices[0].finish_reason == "length"
    chat = api.chat.completions.create(
        model="base", max_completion_tokens=5, extra_body={"min_tokens": 2},
        messages=[{"role": "user", "content": UTTERANCE}])
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "stop"
    for body, param in (({"ignore_eos": "yes"}, "ignore_eos"),
                        ({"min_tokens": 9}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(model="base", prompt=UTTERANCE, max_tokens=6,
                                   extra_body=body)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param, caught.value.body


def test_python_clients_send_ignore_eos_and_min_tokens(eos_server):
    with SwitchboardClient(eos_server.address) as client:
        assert client.generate(UTTERANCE, max_new_tokens=6,
                               ignore_eos=True).completion_tokens == 6
        assert client.generate(UTTERANCE, max_new_tokens=6).completion_tokens == 1

    async def run() -> tuple[int, int]:
        client = AsyncSwitchboardClient(eos_server.address)
        try:
            fixed = await client.generate(UTTERANCE, max_new_tokens=4, ignore_eos=True)
            at_least = await client.generate(UTTERANCE, max_new_tokens=6, min_tokens=2)
            return fixed.completion_tokens, at_least.completion_tokens
        finally:
            await client.close()

    assert asyncio.run(run()) == (4, 3)


def loadtest(server: LiveServer, *flags: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "loadtest", "--target", server.address,
         "--requests", "8", "--concurrency", "4", "--max-new-tokens", "5", "--mix", "base=1",
         "--json", "--quiet", *flags],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_loadtest_ignore_eos_makes_every_reply_max_new_tokens_long(eos_server):
    assert loadtest(eos_server)["tokens"] == 8  # one EOS per reply
    report = loadtest(eos_server, "--ignore-eos", "--stream")
    assert report["ok"] == 8 and report["tokens"] == 8 * 5 and report["ignore_eos"] is True
