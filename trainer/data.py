"""Training data as tokens: rows (``trainer.rows``) become masked token sequences, batched.

Prompts come from ``build_prompt`` (the server's own code) and answers from
``build_answer`` (label + EOS, EOS kept in the loss so the model learns to stop). Rows
longer than ``max_seq_length`` are cut at the end and counted; rows whose prompt alone
fills ``max_seq_length`` would have no answer left and are dropped, with a count (a
batch of only masked tokens would give a NaN loss).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from server.formats.prompt import build_answer, build_prompt
from trainer.rows import Row

IGNORE = -100


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
