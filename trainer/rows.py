"""Training rows from CSV/JSONL files, read and checked without torch.

The trainer reads and checks its data before it imports torch or loads a model, so a
wrong path, a missing column or a bad byte is reported at once. Errors name the file
and the line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import InvalidOption


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    where: str
    """``file:line`` for messages."""


def read_rows(path: Path) -> list[Row]:
    """Rows of a ``text,label`` CSV (UTF-8, BOM tolerated) or a JSONL file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidOption(f"data file {path} does not exist") from None
    except OSError as exc:
        raise InvalidOption(f"data file {path} cannot be read ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidOption(f"{path.name} line {line}: not UTF-8 (byte {exc.start})") from None
    rows = _jsonl(path, text) if path.suffix.lower() in (".jsonl", ".json") else _csv(path, text)
    if not rows:
        raise InvalidOption(f"{path.name}: no data rows")
    return rows


def _csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise InvalidOption(f"{path.name}: missing column {missing[0]!r} "
                            f"(found: {', '.join(columns) or 'none'}; need text,label)")
    rows = []
    try:
        for record in reader:
            rows.append(_row(path, reader.line_num, record.get("text"), record.get("label")))
    except csv.Error as exc:
        raise InvalidOption(f"{path.name} line {reader.line_num}: {exc}") from None
    return rows


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidOption(f"{path.name} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InvalidOption(f"{path.name} line {number}: expected an object")
        for key in ("text", "label"):
            if key not in record:
                raise InvalidOption(f"{path.name} line {number}: missing key {key!r}")
        rows.append(_row(path, number, record["text"], record["label"]))
    return rows


def _row(path: Path, line: int, text: Any, label: Any) -> Row:
    for name, value in (("text", text), ("label", label)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidOption(f"{path.name} line {line}: empty {name!r}")
    return Row(str(text), str(label), f"{path.name}:{line}")


def data_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def split(rows: list[Row], share: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded hold-out: (train, validation); at least one row each when share > 0."""
    if share <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = min(len(rows) - 1, max(1, round(len(rows) * share)))
    held = set(order[:count])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
