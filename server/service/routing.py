"""The routing table: which adapter answers a call, from dialect, caller number or region.

Order, first match wins:

1. an explicit ``dialect`` (an adapter name);
2. the longest prefix in ``caller_numbers`` matching the normalized caller number
   (spaces, dashes, dots and brackets dropped; ``00`` becomes ``+``; with
   ``national_prefix`` set, a national number ``0…`` becomes ``+<country>…``). Mobile
   numbers such as ``+86 13…`` carry no area code, so a table with area prefixes only
   lets them fall through;
3. ``regions``: an ISO 3166-2 code (``CN-SH``); ``HK`` and ``MO`` are aliases of
   ``CN-HK`` and ``CN-MO``;
4. ``default``: ``base`` (the base model) or an adapter name.

A target is ``base``, an adapter name, or a composition: a list of adapters, each a
name or ``{name: ..., scale: ...}`` (``[wuyu, {name: telecom_terms, scale: 0.6}]``),
served together on one request (the first adapter's template wraps the text).

A routed adapter that is missing or refused is handled by ``fallback``: ``base``
answers with the base model (the response says so), ``error`` fails the request. The
table is a YAML file, validated as a whole (a bad table never replaces a good one) and
reloaded when it changes (:class:`RoutingTableFile`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from server.errors import InvalidOption, InvalidRequest
from server.formats.files import read_yaml_mapping
from server.formats.manifest import ADAPTER_NAME_RE
from server.formats.prompt import DEFAULT_PROMPT_TEMPLATE, validate_template

log = logging.getLogger(__name__)

BASE = "base"
"""Route target meaning "the base model, no adapter"."""

_NUMBER_RE = re.compile(r"^\+[0-9]{2,20}$")
_PREFIX_RE = re.compile(r"^\+[0-9]{1,15}$")
_REGION_RE = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
_DROPPED = str.maketrans("", "", " -.()\t")
REGION_ALIASES = {"HK": "CN-HK", "MO": "CN-MO"}
_KEYS = ("default", "fallback", "prompt_template", "national_prefix", "caller_numbers",
         "regions")


class Route(StrEnum):
    EXPLICIT = "explicit"
    CALLER_NUMBER = "caller_number"
    REGION = "region"
    DEFAULT = "default"
    FALLBACK = "fallback"


AdapterUse = tuple[str, float | None]
"""An adapter and its scale (None: the manifest's ``default_weight_scale``)."""
Target = tuple[AdapterUse, ...]
"""What a call is served with: () is the base model, one use a single adapter, more a
composition."""
MAX_COMPOSED = 8
"""Adapters one routing target may compose (the server's own limit may be lower)."""


@dataclass(frozen=True)
class RouteDecision:
    uses: Target
    """The adapters (with scales) to serve with; () for the base model."""
    route: Route
    detail: str
    """What matched: the dialect, the number prefix, the region or ``default``."""

    @property
    def adapter(self) -> str | None:
        """The first adapter's name, or None for the base model."""
        return self.uses[0][0] if self.uses else None

    @property
    def label(self) -> str:
        """The adapters' names joined with ``+`` (``wuyu+telecom_terms``)."""
        return "+".join(name for name, _ in self.uses)


def normalize_number(number: str, national_prefix: str | None = None) -> str:
    """``"0086 21-5555 1234"`` → ``"+862155551234"``; raise InvalidRequest if malformed."""
    cleaned = number.translate(_DROPPED)
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    elif cleaned.startswith("0") and national_prefix:
        cleaned = national_prefix + cleaned[1:]
    if not _NUMBER_RE.match(cleaned):
        raise InvalidRequest(  # never quoted: a caller number must not reach the logs
            "caller_number is not a phone number in international form "
            "(+<country code><number>, digits only besides spaces and dashes)"
        )
    return cleaned


def normalize_region(region: str) -> str:
    code = region.strip().upper()
    code = REGION_ALIASES.get(code, code)
    if not _REGION_RE.match(code):
        raise InvalidRequest(
            f"region {region[:16]!r} is not an ISO 3166-2 code such as CN-SH or CN-GD"
        )
    return code


def _target(value: Any, where: str) -> Target:
    if isinstance(value, list):
        return _composition(value, where)
    if not isinstance(value, str) or not (value == BASE or ADAPTER_NAME_RE.fullmatch(value)):
        raise InvalidOption(
            f"routing table: {where} must be '{BASE}', an adapter name "
            f"([a-z0-9][a-z0-9_-]{{0,63}}) or a list of adapters, got {str(value)[:40]!r}"
        )
    return () if value == BASE else ((value, None),)


def _composition(items: list[Any], where: str) -> Target:
    if not 1 <= len(items) <= MAX_COMPOSED:
        raise InvalidOption(f"routing table: {where} composes 1 to {MAX_COMPOSED} adapters, "
                            f"got {len(items)}")
    uses: list[AdapterUse] = []
    for i, item in enumerate(items):
        name, scale = (item, None) if isinstance(item, str) else (None, None)
        if isinstance(item, dict):
            unknown = set(item) - {"name", "scale"}
            if unknown:
                raise InvalidOption(f"routing table: {where}[{i}] has unknown key "
                                    f"{sorted(unknown, key=str)[0]!r} (valid: name, scale)")
            name, scale = item.get("name"), item.get("scale")
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise InvalidOption(f"routing table: {where}[{i}] must be an adapter name or "
                                f"{{name: ..., scale: ...}}, got {str(item)[:40]!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                                  or not math.isfinite(scale) or scale < 0):
            raise InvalidOption(f"routing table: {where}[{i}].scale must be a number >= 0, "
                                f"got {str(scale)[:20]!r}")
        if any(name == used for used, _ in uses):
            raise InvalidOption(f"routing table: {where} lists {name} twice")
        uses.append((name, None if scale is None else float(scale)))
    return tuple(uses)


@dataclass(frozen=True)
class RoutingTable:
    default: Target = ()
    """Adapters for calls nothing matches; () is the base model."""
    fallback: str = "base"
    """``base`` or ``error``: what happens when the routed adapter cannot serve."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """Template for ``text`` on the base model and on adapters without a manifest."""
    national_prefix: str | None = None
    """E.g. ``+86``: national numbers (``021…``) are read as ``+8621…``."""
    caller_numbers: dict[str, Target] = field(default_factory=dict)
    """Number prefix (``+8621``) → its target."""
    regions: dict[str, Target] = field(default_factory=dict)
    """ISO 3166-2 code → its target."""

    @classmethod
    def from_dict(cls, data: Any, source: str = "routing table") -> RoutingTable:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidOption(f"{source}: top level must be a mapping")
        unknown = sorted(set(data) - set(_KEYS), key=str)
        if unknown:
            raise InvalidOption(
                f"{source}: unknown key {unknown[0]!r} (valid: {', '.join(_KEYS)})"
            )
        fallback = data.get("fallback", "base")
        if fallback not in ("base", "error"):
            raise InvalidOption(f"{source}: fallback must be 'base' or 'error', got {fallback!r}")
        template = data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
        try:
            validate_template(template)
        except Exception as exc:
            raise InvalidOption(f"{source}: prompt_template: {exc}") from None
        national = data.get("national_prefix")
        if national is not None and (not isinstance(national, str)
                                     or not _PREFIX_RE.match(national)):
            raise InvalidOption(f"{source}: national_prefix must look like '+86', "
                                f"got {str(national)[:20]!r}")
        numbers: dict[str, Target] = {}
        for prefix, target in _mapping(data, "caller_numbers", source).items():
            key = str(prefix).translate(_DROPPED)
            if key.startswith("00"):
                key = "+" + key[2:]
            if not _PREFIX_RE.match(key):
                raise InvalidOption(f"{source}: caller_numbers key {str(prefix)[:24]!r} must "
                                    "be '+' and digits, e.g. '+8621'")
            if key in numbers:
                raise InvalidOption(f"{source}: caller_numbers lists {key} twice")
            numbers[key] = _target(target, f"caller_numbers[{key}]")
        regions: dict[str, Target] = {}
        for code, target in _mapping(data, "regions", source).items():
            try:
                key = normalize_region(str(code))
            except InvalidRequest:
                raise InvalidOption(f"{source}: regions key {str(code)[:16]!r} is not an "
                                    "ISO 3166-2 code such as CN-SH") from None
            if key in regions:
                raise InvalidOption(f"{source}: regions lists {key} twice (aliases count)")
            regions[key] = _target(target, f"regions[{key}]")
        return cls(default=_target(data.get("default", BASE), "default"), fallback=fallback,
                   prompt_template=template, national_prefix=national,
                   caller_numbers=numbers, regions=regions)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTable:
        path = Path(path)
        data = read_yaml_mapping(path, "routing table")
        return cls.from_dict(data, f"routing table {path.name}")

    def targets(self) -> list[Target]:
        return [self.default, *self.caller_numbers.values(), *self.regions.values()]

    def adapters(self) -> set[str]:
        """Every adapter the table can route to."""
        return {name for target in self.targets() for name, _ in target}

    def compositions(self) -> set[str]:
        """The labels (``wuyu+telecom_terms``) of the compositions the table names."""
        return {"+".join(n for n, _ in t) for t in self.targets() if len(t) > 1}

    def route(self, dialect: str = "", caller_number: str = "", region: str = "",
              adapters: Target = ()) -> RouteDecision:
        """The adapters for a call; raise InvalidRequest for a malformed number or region.

        Every given field is validated, even one a higher-priority field makes moot, so a
        client bug shows up at once rather than when routing changes. ``adapters`` (a
        composition the call names) and ``dialect`` are explicit routes.
        """
        number = normalize_number(caller_number, self.national_prefix) if caller_number else ""
        code = normalize_region(region) if region else ""
        if adapters:
            return RouteDecision(adapters, Route.EXPLICIT, "+".join(n for n, _ in adapters))
        if dialect:  # "base" names the base model, as it does in the table
            return RouteDecision(() if dialect == BASE else ((dialect, None),), Route.EXPLICIT,
                                 dialect)
        if number:
            for end in range(len(number), 1, -1):
                prefix = number[:end]
                if prefix in self.caller_numbers:
                    return RouteDecision(self.caller_numbers[prefix], Route.CALLER_NUMBER,
                                         prefix)
        if code and code in self.regions:
            return RouteDecision(self.regions[code], Route.REGION, code)
        return RouteDecision(self.default, Route.DEFAULT, "default")


def _mapping(data: dict[str, Any], key: str, source: str) -> dict[Any, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidOption(f"{source}: {key} must be a mapping")
    return value


class RoutingTableFile:
    """A :class:`RoutingTable` read from a YAML file and reloaded when the file changes.

    ``check()`` (called by a poller, or by tests) rereads the file when its size or
    mtime changed; an invalid new table is logged and the previous one stays in force.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._table = RoutingTable.load(self.path)
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def table(self) -> RoutingTable:
        with self._lock:
            return self._table

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def check(self) -> bool:
        """Reload if the file changed; True when a new table took effect."""
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp
        try:
            table = RoutingTable.load(self.path)
        except InvalidOption as exc:
            self.last_error = str(exc)
            log.error("routing table not reloaded, the previous one stays: %s", exc)
            return False
        with self._lock:
            self._table = table
            self.reloads += 1
            self.last_error = None
        log.info("routing table reloaded from %s", self.path)
        return True
