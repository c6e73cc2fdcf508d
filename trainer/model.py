"""The model being trained: the server's base-model loader plus a PEFT LoRA, and the loss.

The loss projects to the vocabulary only the positions that have a label: with a 49k
vocabulary, ``lm_head`` over every prompt and pad position is most of a small model's
forward, and masked positions would discard it anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from server.basemodel import LoadedBaseModel, load_base_model
from server.errors import InvalidOption
from trainer.config import TrainConfig
from trainer.data import IGNORE
from trainer.plan import RunPlan


def load_for_training(config: TrainConfig, plan: RunPlan) -> tuple[LoadedBaseModel, PeftModel]:
    base = load_base_model(plan.base_model, device=config.device, dtype="float32",
                           quantize=config.quantize)
    model = base.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if plan.init_from is not None:
        folder = plan.init_from
        if not (folder / "adapter_config.json").exists():
            raise InvalidOption(f"init_from: {folder} holds no adapter_config.json")
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    else:
        alpha = config.lora_alpha
        lora = LoraConfig(r=config.lora_rank,
                          lora_alpha=int(alpha) if alpha.is_integer() else alpha,  # type: ignore[arg-type]
                          lora_dropout=config.dropout, target_modules=list(config.target_modules),
                          use_rslora=config.use_rslora, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()  # trainable weights in fp32 (QLoRA too)
            parameter.requires_grad_(True)
    return base, peft_model


def label_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over label tokens and their count.

    Position ``t`` predicts token ``t + 1``; only positions whose next token has a label
    reach ``lm_head``.
    """
    causal: Any = model.get_base_model()
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    hidden = causal.model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                          use_cache=False).last_hidden_state  # [batch, seq, hidden]
    targets = batch["labels"][:, 1:].to(device)  # [batch, seq - 1]
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        raise ValueError("a batch without label tokens")  # encode() drops such rows
    logits = causal.lm_head(hidden[:, :-1][keep])  # [label tokens, vocab]
    return F.cross_entropy(logits.float(), targets[keep]), count
