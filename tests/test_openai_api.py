"""OpenAI bodies → call fields: JSON types checked field by field, the field named."""

from __future__ import annotations

import pytest

from server.errors import AdapterNotFound, InvalidRequest
from server.service.openai_api import parse_body, parse_chat, parse_completion

BASES = ("base", "SmolLM2-135M-Instruct")


def test_named_model_base_and_auto() -> None:
    assert parse_completion({"model": "wuyu", "prompt": "hi"}, BASES).fields.dialect == "wuyu"
    for base in BASES:
        assert parse_completion({"model": base, "prompt": "hi"}, BASES).fields.dialect == "base"
    auto = parse_completion({"model": "auto", "prompt": "hi", "region": "CN-SH",
                             "weight_scale": 1}, BASES).fields
    assert (auto.dialect, auto.region, auto.weight_scale) == ("", "CN-SH", 1.0)


def test_completion_prompt_is_templated_unless_raw() -> None:
    fields = parse_completion({"model": "wuyu", "prompt": "hi"}, BASES).fields
    assert (fields.text, fields.prompt) == ("hi", None)
    raw = parse_completion({"model": "wuyu", "prompt": "hi", "raw_prompt": True}, BASES)
    assert (raw.fields.text, raw.fields.prompt) == (None, "hi")


def test_chat_content_parts_and_the_developer_role() -> None:
    parsed = parse_chat({"model": "wuyu", "stream": True,
                         "stream_options": {"include_usage": True},
                         "messages": [{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": [
                                          {"type": "text", "text": "Hel"},
                                          {"type": "text", "text": "lo"}]}]}, BASES)
    assert parsed.fields.messages == (("system", "Be brief."), ("user", "Hello"))
    assert parsed.stream and parsed.include_usage


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "wuyu", "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": "wuyu", "prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "wuyu", "prompt": "hi", "temperature": "0"}, "temperature"),
    ({"model": "wuyu", "prompt": "hi", "stop": [1]}, "stop"),
    ({"model": "wuyu", "prompt": "hi", "n": 3}, "n"),
    ({"model": "wuyu", "prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
    ({"model": "wuyu", "prompt": "hi", "caller_number": "+8621"}, "caller_number"),
    ({"model": 7, "prompt": "hi"}, "model"),
    ({"model": "wuyu", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "wuyu", "prompt": "hi", "timeout_s": 0}, "timeout_s"),
    ({"model": "wuyu", "prompt": "hi", "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_wrong_types_name_their_field(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_completion(body, BASES)
    assert caught.value.param == param, str(caught.value)


def test_a_name_no_adapter_can_have_is_not_found() -> None:
    with pytest.raises(AdapterNotFound):
        parse_completion({"model": "Not An Adapter", "prompt": "hi"}, BASES)


def test_bad_json_and_out_of_range_numbers() -> None:
    for raw in (b"{", b"\xff", b"[" * 100_000, b'{"n": ' + b"9" * 5000 + b"}"):
        with pytest.raises(InvalidRequest):
            parse_body(raw)
    with pytest.raises(InvalidRequest, match="the body must be a JSON object"):
        parse_body(b"[]")
    with pytest.raises(InvalidRequest) as caught:
        parse_completion({"model": "wuyu", "prompt": "hi", "temperature": 10**400}, BASES)
    assert caught.value.param == "temperature"
