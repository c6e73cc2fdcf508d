"""One forward pass over a packed, ragged batch with a slotted KV cache.

transformers' model classes expect a rectangular batch and a cache object whose API
changes between 5.x releases (``past_key_values`` → ``cache``). Continuous batching
needs rows at different positions, some prefilling a chunk and some decoding one
token, so the engine drives the LLaMA forward itself (design decision 4), reusing the
model's own modules: embeddings, RMSNorms, rotary embedding, the (possibly quantized,
possibly LoRA-wrapped) linear layers and the MLP. Tests check it against the model's
own forward.

Tokens of all rows are packed into ``[num_tokens, hidden]``; only attention looks at
rows: decoding rows attend together in one batched SDPA call, each prefilling chunk
in its own (usually one or two per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kv_cache import SlottedKVCache
from server.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Segment:
    """The tokens one row contributes to a step."""

    kv_row: int
    start: int  # index of the first token in the packed batch
    length: int  # tokens this step (1 when decoding)
    position: int  # position of the first token in the row's sequence


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [tokens] long
    segments: list[Segment]
    logit_rows: list[int]  # indexes into segments whose last token needs logits
    scored_tokens: list[int] = field(default_factory=list)
    """Further token indexes whose logits are wanted (prompt scoring), returned after the
    ``logit_rows`` ones."""

    def logit_tokens(self, device: torch.device) -> torch.Tensor:
        """Indexes of the tokens whose logits the forward returns, in order."""
        last = [self.segments[i].start + self.segments[i].length - 1 for i in self.logit_rows]
        return torch.tensor(last + self.scored_tokens, device=device, dtype=torch.long)


def kv_write_index(rows: torch.Tensor, positions: torch.Tensor, kv_heads: int,
                   max_len: int) -> torch.Tensor:
    """Where each (token, KV head) lands in a layer's cache viewed as ``[rows * kv_heads *
    max_len, head_dim]``: one ``index_copy_`` writes a whole step's keys (or values)."""
    offsets = torch.arange(kv_heads, device=rows.device) * max_len
    return ((rows * kv_heads * max_len + positions)[:, None] + offsets).reshape(-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _AttentionPlan:
    """Index tensors and masks for one step, shared by every layer."""

    def __init__(self, step: StepInput, device: torch.device) -> None:
        positions: list[int] = []
        rows: list[int] = []
        for seg in step.segments:
            positions.extend(range(seg.position, seg.position + seg.length))
            rows.extend([seg.kv_row] * seg.length)
        self.positions = torch.tensor(positions, device=device)  # [tokens]
        self.token_rows = torch.tensor(rows, device=device)  # [tokens]

        decode = [s for s in step.segments if s.length == 1]
        self.prefill = [s for s in step.segments if s.length > 1]
        self.decode_tokens: torch.Tensor | None = None
        if decode:
            self.decode_tokens = torch.tensor([s.start for s in decode], device=device)
            kv_rows = [s.kv_row for s in decode]
            self.decode_len = max(s.position for s in decode) + 1
            first = kv_rows[0]
            # A contiguous run of rows is a view of the cache; otherwise gather.
            self.decode_slice = (
                slice(first, first + len(kv_rows))
                if kv_rows == list(range(first, first + len(kv_rows)))
                else None
            )
            self.decode_rows = torch.tensor(kv_rows, device=device)
            pos = torch.tensor([s.position for s in decode], device=device)
            keys = torch.arange(self.decode_len, device=device)
            self.decode_mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # [B,1,1,L]
        self.prefill_masks: list[torch.Tensor | None] = []
        for seg in self.prefill:
            if seg.position == 0:
                self.prefill_masks.append(None)  # plain causal
                continue
            total = seg.position + seg.length
            q_pos = torch.arange(seg.position, total, device=device)
            keys = torch.arange(total, device=device)
            self.prefill_masks.append(keys[None, :] <= q_pos[:, None])  # [n, total]


def prefill_attention(out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, plan: _AttentionPlan, scale: float) -> torch.Tensor:
    """Attention of each prefill chunk over its own row (``out``'s chunk rows written)."""
    gqa = q.shape[1] != keys.shape[1]
    for seg, mask in zip(plan.prefill, plan.prefill_masks, strict=True):
        end = seg.position + seg.length
        q_p = q[seg.start : seg.start + seg.length].transpose(0, 1)[None]  # [1,H,n,hd]
        k_p = keys[seg.kv_row : seg.kv_row + 1, :, :end].to(q.dtype)
        v_p = values[seg.kv_row : seg.kv_row + 1, :, :end].to(q.dtype)
        o = F.scaled_dot_product_attention(
            q_p, k_p, v_p, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=gqa,
        )
        out[seg.start : seg.start + seg.length] = o[0].transpose(0, 1)
    return out


class BatchedLlama:
    """Runs a LLaMA-family ``*ForCausalLM`` over packed ragged batches."""

    def __init__(self, model: nn.Module, max_rows: int, max_len: int) -> None:
        """Allocates the KV cache (``max_rows`` rows of ``max_len`` positions) for ``model``."""
        self.model: Any = model
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(model, "lm_head"):
            raise UnsupportedArchitecture(f"{type(model).__name__} is not a LLaMA-family model")
        self.inner: Any = inner
        config: Any = model.config
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // config.num_attention_heads)
        device = next(model.parameters()).device
        dtype = inner.embed_tokens.weight.dtype  # quantized bases keep float embeddings
        self.cache = SlottedKVCache(int(config.num_hidden_layers), max_rows, self.num_kv_heads,
                                    max_len, self.head_dim, dtype, device)
        head = model.lm_head
        # On the CPU, MKL computes the vocabulary projection twice as fast as W @ x^T
        # (big operand on the left) than as x @ W^T once a few rows need logits
        # (measured: 16 rows x 49152 x 576, 41 -> 21 ms). Same math; plain fp32/bf16
        # Linear heads only, CPU only (cuBLAS does not care).
        self._head_weight: torch.Tensor | None = None
        if (type(head) is nn.Linear and head.bias is None
                and head.weight.device.type == "cpu" and head.weight.dtype.is_floating_point):
            self._head_weight = head.weight

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits ``[len(step.logit_rows), vocab]`` for the last token of those rows, then
        those of ``step.scored_tokens``."""
        device = step.input_ids.device
        plan = _AttentionPlan(step, device)
        hidden = self.inner.embed_tokens(step.input_ids)  # [tokens, hidden]
        cos, sin = self.inner.rotary_emb(hidden[None], plan.positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [tokens, 1, head_dim]
        num_tokens = hidden.shape[0]

        for index, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            residual = hidden
            h = layer.input_layernorm(hidden)
            q = attn.q_proj(h).view(num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(num_tokens, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.cache.keys[index], self.cache.values[index]
            keys[plan.token_rows, :, plan.positions] = k.to(keys.dtype)
            values[plan.token_rows, :, plan.positions] = v.to(values.dtype)
            out = self._attention(q, keys, values, plan, attn.scaling)  # [tokens, heads, hd]
            hidden = residual + attn.o_proj(out.reshape(num_tokens, -1))
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))

        final = self.inner.norm(hidden.index_select(0, step.logit_tokens(device)))
        if self._head_weight is not None:
            return torch.matmul(self._head_weight, final.t()).t().float()  # [rows, vocab]
        return self.model.lm_head(final).float()

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   plan: _AttentionPlan, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        gqa = self.num_heads != self.num_kv_heads
        if plan.decode_tokens is not None:
            length = plan.decode_len
            if plan.decode_slice is not None:
                k_d = keys[plan.decode_slice, :, :length]  # [B, kv_heads, L, hd] view
                v_d = values[plan.decode_slice, :, :length]
            else:
                k_d = keys.index_select(0, plan.decode_rows)[:, :, :length]
                v_d = values.index_select(0, plan.decode_rows)[:, :, :length]
            q_d = q.index_select(0, plan.decode_tokens).unsqueeze(2)  # [B, heads, 1, hd]
            o = F.scaled_dot_product_attention(
                q_d, k_d.to(q.dtype), v_d.to(q.dtype), attn_mask=plan.decode_mask,
                scale=scale, enable_gqa=gqa,
            )
            out.index_copy_(0, plan.decode_tokens, o.squeeze(2))
        return prefill_attention(out, q, keys, values, plan, scale)
