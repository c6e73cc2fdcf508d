"""Routing table: number normalization, longest prefix, regions, validation, reload."""

from __future__ import annotations

import re

import pytest

from server.errors import InvalidOption, InvalidRequest
from server.service.config import REPO_ROOT
from server.service.routing import (
    Route,
    RoutingTable,
    RoutingTableFile,
    normalize_number,
    normalize_region,
)

TABLE = RoutingTable.from_dict({
    "default": "base",
    "national_prefix": "+86",
    "caller_numbers": {"+8621": "wuyu", "+86512": "wuyu", "+852": "cantonese",
                       "+86": "mandarin", "+8620": "cantonese"},
    "regions": {"CN-SH": "wuyu", "HK": "cantonese", "CN-GD": "cantonese"},
})


@pytest.mark.parametrize(("raw", "expected"), [
    ("+86 21 5555 1234", "+862155551234"),
    ("0086-21-5555-1234", "+862155551234"),
    ("021 5555 1234", "+862155551234"),  # national, with national_prefix +86
    ("+852 2345 6789", "+85223456789"),
    ("(+86) 512.6666.7777", "+8651266667777"),
])
def test_numbers_are_normalized(raw, expected):
    assert normalize_number(raw, "+86") == expected


@pytest.mark.parametrize("raw", ["hello", "+86 21 abc", "+", "12345", "+86#21", "+" + "1" * 30])
def test_malformed_numbers_are_refused(raw):
    with pytest.raises(InvalidRequest, match="caller_number"):
        normalize_number(raw)


@pytest.mark.parametrize(("kwargs", "adapter", "route", "detail"), [
    ({"dialect": "plain", "caller_number": "+8621 5555 1234"}, "plain", Route.EXPLICIT, "plain"),
    ({"caller_number": "+86 21 5555 1234"}, "wuyu", Route.CALLER_NUMBER, "+8621"),
    ({"caller_number": "+86 512 6666 7777"}, "wuyu", Route.CALLER_NUMBER, "+86512"),
    ({"caller_number": "+86 138 0000 1111"}, "mandarin", Route.CALLER_NUMBER, "+86"),
    ({"caller_number": "+852 2345 6789", "region": "CN-SH"}, "cantonese",
     Route.CALLER_NUMBER, "+852"),
    ({"caller_number": "+1 212 555 0100", "region": "CN-SH"}, "wuyu", Route.REGION, "CN-SH"),
    ({"region": "hk"}, "cantonese", Route.REGION, "CN-HK"),
    ({"region": "CN-BJ"}, None, Route.DEFAULT, "default"),
    ({}, None, Route.DEFAULT, "default"),
])
def test_route_order(kwargs, adapter, route, detail):
    decision = TABLE.route(**kwargs)
    assert (decision.adapter, decision.route, decision.detail) == (adapter, route, detail)


def test_mobile_numbers_fall_through_a_table_of_area_codes():
    table = RoutingTable.from_dict({"caller_numbers": {"+8621": "wuyu"},
                                    "regions": {"CN-GD": "cantonese"}, "default": "plain"})
    assert table.route(caller_number="+86 138 1234 5678").route == Route.DEFAULT
    assert table.route(caller_number="+86 138 1234 5678", region="CN-GD").adapter == "cantonese"


def test_region_aliases():
    assert normalize_region("MO") == "CN-MO"
    assert normalize_region(" cn-sh ") == "CN-SH"
    with pytest.raises(InvalidRequest, match="region"):
        normalize_region("Shanghai!")


@pytest.mark.parametrize(("data", "message"), [
    ({"defualt": "base"}, "unknown key 'defualt'"),
    ({"fallback": "retry"}, "fallback must be 'base' or 'error'"),
    ({"caller_numbers": {"8621": "wuyu"}}, "caller_numbers key '8621'"),
    ({"caller_numbers": {"+8621": "../etc"}}, r"caller_numbers\[\+8621\] must be"),
    ({"regions": {"Shanghai": "wuyu"}}, "regions key 'Shanghai'"),
    ({"regions": {"HK": "cantonese", "CN-HK": "cantonese"}}, "lists CN-HK twice"),
    ({"prompt_template": "no placeholder"}, "prompt_template"),
    ({"caller_numbers": ["+8621"]}, "caller_numbers must be a mapping"),
])
def test_invalid_tables_name_the_problem(data, message):
    with pytest.raises(InvalidOption, match=message):
        RoutingTable.from_dict(data)


def test_shipped_table_covers_wu_and_cantonese_areas():
    table = RoutingTable.load(REPO_ROOT / "server" / "routing.yaml")
    for number in ("+86 21 5555 1234", "+86 512 1111 2222", "+86 571 1111 2222",
                   "+86 574 1111 2222", "+86 510 1111 2222"):  # Shanghai..Wuxi
        assert table.route(caller_number=number).adapter == "wuyu", number
    for number in ("+86 20 1111 2222", "+86 755 1111 2222", "+86 757 1111 2222",
                   "+86 769 1111 2222", "+852 2345 6789", "+853 2888 1234"):
        assert table.route(caller_number=number).adapter == "cantonese", number
    assert table.route(caller_number="+86 138 0000 1111").route == Route.DEFAULT
    assert table.route(region="MO").adapter == "cantonese"
    assert table.route(region="CN-ZJ").adapter == "wuyu"


def test_table_file_reloads_on_change_and_keeps_the_old_table_on_a_bad_edit(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text('caller_numbers: {"+8621": wuyu}\n')
    watched = RoutingTableFile(path)
    assert watched.table.route(caller_number="+862155551234").adapter == "wuyu"
    assert not watched.check()  # unchanged
    path.write_text('caller_numbers: {"+8621": cantonese}\ndefault: plain\n')
    assert watched.check()
    assert watched.table.route(caller_number="+862155551234").adapter == "cantonese"
    path.write_text("caller_numbers: {+8621: [oops\n")
    assert not watched.check()
    assert "not valid YAML" in (watched.last_error or "")
    assert watched.table.default == (("plain", None),)  # the previous table stays in force


def test_a_table_without_a_template_gives_the_base_model_the_callers_words():
    """No prompt_template: base calls get the utterance and a newline, not a Wu prompt."""
    from server.formats.prompt import render_prompt
    from trainer.config import TrainConfig

    table = RoutingTable.from_dict({"default": "base"})
    assert render_prompt(table.prompt_template, " 侬好 ") == "侬好\n"
    assert TrainConfig(metadata_path="x.csv", name="x").prompt_template == table.prompt_template


def test_a_composition_is_a_routing_target():
    table = RoutingTable.from_dict({
        "caller_numbers": {"+8621": ["wuyu", {"name": "telecom_terms", "scale": 0.6}]},
        "regions": {"CN-GD": ["cantonese", "telecom_terms"]}, "default": "base"})
    decision = table.route(caller_number="+86 21 5555 1234")
    assert decision.uses == (("wuyu", None), ("telecom_terms", 0.6))
    assert decision.adapter == "wuyu" and decision.label == "wuyu+telecom_terms"
    assert table.route(region="CN-GD").uses == (("cantonese", None), ("telecom_terms", None))
    assert table.adapters() == {"wuyu", "cantonese", "telecom_terms"}
    assert table.compositions() == {"wuyu+telecom_terms", "cantonese+telecom_terms"}
    explicit = table.route(adapters=(("plain", 1.0), ("wuyu", None)))
    assert explicit.route == Route.EXPLICIT and explicit.detail == "plain+wuyu"


@pytest.mark.parametrize(("target", "words"), [
    ([], "composes 1 to 8 adapters, got 0"),
    (["wuyu", "wuyu"], "lists wuyu twice"),
    (["wuyu", {"name": "x", "scale": -1}], "default[1].scale must be a number >= 0"),
    (["wuyu", {"name": "x", "weight": 1}], "default[1] has unknown key 'weight'"),
    (["wuyu", 7], "default[1] must be an adapter name"),
])
def test_bad_compositions_in_a_table_name_the_entry(target, words):
    with pytest.raises(InvalidOption, match=re.escape(words)):
        RoutingTable.from_dict({"default": target})
