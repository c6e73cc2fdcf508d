"""Training data: read CSV/JSONL rows, turn them into masked token sequences, batch them.

Prompts come from ``build_prompt`` (the server's own code) and answers from
``build_answer`` (label + EOS, EOS kept in the loss so the model learns to stop). Errors
name the file and the line. Rows longer than ``max_seq_length`` are cut at the end and
counted; rows whose prompt alone fills ``max_seq_length`` would have no answer left and
are dropped, with a count (a batch of only masked tokens would give a NaN loss).
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

import torch

from server.errors import InvalidOption
from server.formats.prompt import build_answer, build_prompt

IGNORE = -100


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    where: str
    """``file:line`` for messages."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """``IGNORE`` where no loss is taken (the prompt, when masked)."""
    prompt_len: int
    row: Row


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int
    dropped: int


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


def encode(rows: list[Row], tokenizer: Any, template: str, max_seq_length: int,
           mask_prompt: bool) -> Encoded:
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        prompt = build_prompt(template, row.text, tokenizer)
        answer = build_answer(row.label, tokenizer)
        if len(prompt) >= max_seq_length:
            dropped += 1
            continue
        ids = prompt + answer
        if len(ids) > max_seq_length:
            ids = ids[:max_seq_length]
            truncated += 1
        labels = ([IGNORE] * len(prompt) if mask_prompt else list(prompt)) + ids[len(prompt):]
        examples.append(Example(ids, labels, len(prompt), row))
    return Encoded(examples, truncated, dropped)


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


def length_grouped_batches(examples: list[Example], batch_size: int, seed: int
                           ) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a seeded random order.

    Shuffle, cut into windows of 50 batches, sort each window by length, cut it into
    batches, then shuffle the batches: random across epochs, padded little within.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (pad: IGNORE)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
