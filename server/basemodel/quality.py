"""Perplexity on a fixed English paragraph: a quick check that a base model is intact.

A broken GGUF conversion or a bad quantization still loads and still generates text;
its perplexity on ordinary English is what gives it away.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

REFERENCE_PARAGRAPH = (
    "The city library opens at nine in the morning and closes at six in the evening. "
    "Visitors can borrow up to five books at a time, and most loans last three weeks. "
    "If you need a book for longer, you can renew it online or ask at the front desk. "
    "Children's stories are on the ground floor, while history and science are upstairs. "
    "On Saturdays, volunteers read aloud to young children, and the reading room is quiet "
    "enough for students preparing for their exams."
)


def perplexity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str = REFERENCE_PARAGRAPH
) -> float:
    """exp(mean next-token cross-entropy) of ``text`` under ``model``."""
    import torch

    ids = tokenizer.encode(text, add_special_tokens=False)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
    return math.exp(float(out.loss))
