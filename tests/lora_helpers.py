"""Real PEFT adapters with random weights, and PEFT as the oracle for LoRA outputs.

Adapters are made with PEFT itself (``init_lora_weights=False``, then B ~ N(0, std)),
saved in the PEFT format, and read back by Switchboard like any trained adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

MARGIN = 1e-3


def top2_margins(logits: Sequence[torch.Tensor]) -> list[float]:
    """Top-1 minus top-2 logit at each step (small: the greedy choice is a coin flip)."""
    return [float(v[0] - v[1]) for v in (torch.topk(x, 2).values for x in logits)]


def assert_same_greedy(reference: Sequence[int], margins: Sequence[float],
                       tokens: Sequence[int]) -> bool:
    """The engine's tolerance rule: greedy ``tokens`` equal ``reference`` except after a
    step whose reference top-2 margin was under 1e-3. Returns whether they diverged."""
    for step, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            assert margins[step] < MARGIN, f"diverged at step {step} (margin {margins[step]})"
            return True
    assert len(tokens) == len(reference)
    return False


@dataclass(frozen=True)
class OracleRun:
    tokens: list[int]
    logits: list[torch.Tensor]  # one [vocab] per generated token

    def margins(self) -> list[float]:
        return top2_margins(self.logits)


class PeftOracle:
    """One PEFT model holding several adapters; runs one request alone, as PEFT would."""

    def __init__(self, base_model: torch.nn.Module, adapters: dict[str, Path]) -> None:
        names = list(adapters)
        first = names[0]
        self.model = PeftModel.from_pretrained(base_model, adapters[first], adapter_name=first)
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()

    def _set(self, adapter: str, scale: float) -> None:
        self._set_many([(adapter, scale)])

    def _set_many(self, uses: Sequence[tuple[str, float]]) -> None:
        """Activate every adapter of ``uses`` together, each at its own scale (PEFT sums
        the active adapters' terms: the composition semantics)."""
        self.model.base_model.set_adapter([name for name, _ in uses])
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                for name, scale in uses:
                    if name in module.scaling:
                        module.set_scale(name, scale)

    @torch.no_grad()
    def greedy_composed(self, prompt: list[int], uses: Sequence[tuple[str, float]],
                        max_new_tokens: int) -> OracleRun:
        """Greedy with several adapters active at once (each scaled)."""
        self._set_many(uses)
        ids = torch.tensor([prompt], device=self.model.device)
        out = self.model.generate(input_ids=ids, max_new_tokens=max_new_tokens,
                                  do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        return OracleRun(tokens, [x[0].float().cpu() for x in out.logits])

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, scale: float, max_new_tokens: int
               ) -> OracleRun:
        ids = torch.tensor([prompt], device=self.model.device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
        if adapter is None:
            with self.model.disable_adapter():
                out = self.model.generate(input_ids=ids, **kwargs)
        else:
            self._set(adapter, scale)
            out = self.model.generate(input_ids=ids, **kwargs)
        tokens = out.sequences[0, len(prompt):].tolist()
        return OracleRun(tokens, [x[0].float().cpu() for x in out.logits])

    @torch.no_grad()
    def _all_logits(self, prompt: list[int], adapter: str | None, scale: float) -> torch.Tensor:
        ids = torch.tensor([prompt], device=self.model.device)
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(input_ids=ids).logits[0].float().cpu()
        self._set(adapter, scale)
        return self.model(input_ids=ids).logits[0].float().cpu()

    def logits(self, prompt: list[int], adapter: str | None, scale: float) -> torch.Tensor:
        """Last-position logits for ``prompt``."""
        return self._all_logits(prompt, adapter, scale)[-1]

    def prompt_logprobs(self, prompt: list[int], adapter: str | None,
                        scale: float) -> torch.Tensor:
        """log p(prompt[i] | prompt[:i]) for i >= 1."""
        logprobs = torch.log_softmax(self._all_logits(prompt, adapter, scale)[:-1], dim=-1)
        return logprobs.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
