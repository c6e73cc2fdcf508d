"""The fused decode path: the same step as :class:`BatchedLlama`, in fewer, faster ops.

Measured on the default model (``docs/benchmarks.md``), a decode step's time goes to the
matrix products, and MKL runs the skinny decode shapes far below what this CPU can do.
So this runner, built once from the model's own weights:

- concatenates q,k,v into one weight and gate,up into another (one GEMM each), and
  runs every base GEMM, the vocabulary head included, through :class:`PackedLinear`
  (the project's AVX2 kernel or oneDNN, weights prepacked, on the CPU; ``F.linear``
  elsewhere);
- adds each row's LoRA term into its target's columns of the fused output, with the
  per-target stacks and GEMMs of :class:`MultiLoraLinear` (two per target an adapter
  uses; a target no loaded adapter uses costs nothing). Stacks laid out for the fused
  output (one ``A`` GEMM per group, a block-diagonal ``B``) were measured slower: the
  zero blocks are read from memory on every step, and q,v-only adapters leave k's;
- uses ``F.rms_norm``, one rotary for q and k together from a cos/sin table computed
  once, KV writes as one ``index_copy_`` per tensor with indexes built once per step,
  and the decode attention mask built once per step, not per layer.

The semantics, KV cache and prefill handling are those of :class:`BatchedLlama`, which
stays the ``eager`` path; the oracle tests run on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import cpu_kernels
from server.engine.forward import (
    BatchedLlama,
    StepInput,
    _AttentionPlan,
    kv_write_index,
    prefill_attention,
)
from server.engine.multi_lora import MultiLoraLinear
from server.engine.packed_linear import PackedLinear

if TYPE_CHECKING:
    from server.engine.compiled import CompiledDecoder

FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
"""Projections the fused path computes as one GEMM, in fused-output order."""


def unfusable_reason(model: nn.Module) -> str | None:
    """Why the fused path cannot run ``model`` (None: it can)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a LLaMA-family model"
    config: Any = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the fused MLP is SiLU-gated)"
    rope_type = str(getattr(getattr(inner, "rotary_emb", None), "rope_type", "default"))
    if "dynamic" in rope_type:
        return f"rope type {rope_type!r} changes with sequence length"
    for layer in layers:
        for parent_name, kinds in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                   ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            parent = getattr(layer, parent_name, None)
            for kind in kinds:
                linear = _base_linear(getattr(parent, kind, None))
                if type(linear) is not nn.Linear:
                    return f"{kind} is a {type(linear).__name__}, not a float nn.Linear " \
                           "(quantized bases decode on the eager path)"
    head = model.lm_head
    if type(head) is not nn.Linear or not head.weight.dtype.is_floating_point:
        return "the vocabulary head is not a float nn.Linear"
    return None


def _base_linear(module: Any) -> Any:
    return getattr(module, "base", module)  # a MultiLoraLinear wraps its base linear


def _fused_weight(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = torch.cat([
        lin.bias.detach() if lin.bias is not None
        else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
        for lin in linears
    ])
    return weight, bias


def _lora_targets(parent: nn.Module, kinds: tuple[str, ...]
                  ) -> list[tuple[MultiLoraLinear, int]]:
    """The LoRA-wrapped targets among ``kinds`` and where their columns start."""
    targets, column = [], 0
    for kind in kinds:
        module = getattr(parent, kind)
        if isinstance(module, MultiLoraLinear):
            targets.append((module, column))
        column += int(module.out_features)
    return targets


def _add_lora(y: torch.Tensor, x: torch.Tensor,
              targets: list[tuple[MultiLoraLinear, int]]) -> None:
    """``y += `` each target's LoRA term in its own columns of the fused output ``y``."""
    for target, column in targets:
        if target.max_rank:
            target.add_lora(y[:, column : column + target.out_features], x)


@dataclass
class _FusedLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear
    lora: dict[str, list[tuple[MultiLoraLinear, int]]]  # group -> (target, first column)
    scaling: float  # attention's softmax scale


class _StepIndexes(_AttentionPlan):
    """The eager path's per-step plan, plus what the fused layers share: the rotary rows
    and the KV write indexes."""

    def __init__(self, runner: FusedLlama, step: StepInput) -> None:
        super().__init__(step, step.input_ids.device)
        self.cos = runner.cos[self.positions].unsqueeze(1)  # [tokens, 1, head_dim]
        self.sin = runner.sin_signed[self.positions].unsqueeze(1)
        self.kv_index = kv_write_index(self.token_rows, self.positions, runner.num_kv_heads,
                                       runner.cache.max_len)
        starts = [s.start for s in step.segments if s.length == 1]
        self.decode_count = len(starts)
        self.decode_is_prefix = starts == list(range(len(starts)))
        # What the CPU attention kernel reads instead of a mask: each decoding row's
        # visible length (its position + 1).
        self.decode_lengths = torch.tensor(
            [s.position + 1 for s in step.segments if s.length == 1], dtype=torch.int64
        ) if runner.attention_kernel is not None and starts else None


class FusedLlama(BatchedLlama):
    """:class:`BatchedLlama` with fused projections, prepacked GEMMs and fewer index ops.

    Build it after ``attach_multi_lora``: it reads the LoRA wrappers' stacks. The fused
    weights are built once from the model's own (which it keeps: tools that read the
    model still work).
    """

    def __init__(self, model: nn.Module, max_rows: int, max_len: int,
                 gemm: str = "auto") -> None:
        super().__init__(model, max_rows, max_len)
        reason = unfusable_reason(model)
        if reason is not None:
            raise ValueError(f"the fused path cannot run this model: {reason}")
        inner, config = self.inner, self.model.config
        self.hidden_size = int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.layers: list[_FusedLayer] = []
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                lora = {name: _lora_targets(attn if name in ("qkv", "o") else mlp, kinds)
                        for name, kinds in FUSED_GROUPS.items()}
                self.layers.append(_FusedLayer(
                    input_norm=layer.input_layernorm.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    qkv=PackedLinear(*_fused_weight([_base_linear(getattr(attn, k))
                                                     for k in FUSED_GROUPS["qkv"]]), gemm),
                    o=PackedLinear(*_fused_weight([_base_linear(attn.o_proj)]), gemm),
                    gate_up=PackedLinear(*_fused_weight([_base_linear(getattr(mlp, k))
                                                         for k in FUSED_GROUPS["gate_up"]]),
                                         gemm),
                    down=PackedLinear(*_fused_weight([_base_linear(mlp.down_proj)]), gemm),
                    lora=lora,
                    scaling=float(attn.scaling),
                ))
            head = self.model.lm_head
            self.head = PackedLinear(head.weight.detach(),
                                     None if head.bias is None else head.bias.detach(), gemm)
            self.final_norm = inner.norm.weight.detach()
            device = head.weight.device
            positions = torch.arange(max_len, device=device)
            probe = torch.zeros(1, 1, self.head_dim, dtype=self.cache.keys[0].dtype,
                                device=device)
            cos, sin = inner.rotary_emb(probe, positions[None])
            half = self.head_dim // 2
            self.cos = cos[0].contiguous()  # [max_len, head_dim]
            # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]: one op, not four.
            self.sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self.compiled: CompiledDecoder | None = None
        """Set on the ``compiled`` path: pure decode steps go through its graphs."""
        cache_keys = self.cache.keys[0]
        self.attention_kernel = cpu_kernels.kernel() if (
            gemm == "auto" and cache_keys.device.type == "cpu"
            and cache_keys.dtype == torch.float32 and cache_keys.is_contiguous()
            and cpu_kernels.attention_fits(self.num_heads, self.num_kv_heads, self.head_dim)
        ) else None
        """Decode attention on the project's CPU kernel (``decode_attention.c``): 1.3-2x
        torch's SDPA here; None elsewhere (SDPA)."""

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits ``[len(step.logit_rows), vocab]`` for the last token of those rows, then
        those of ``step.scored_tokens``."""
        if self.compiled is not None:
            logits = self.compiled.try_run(step)
            if logits is not None:
                return logits
        idx = _StepIndexes(self, step)
        hidden = self.inner.embed_tokens(step.input_ids)  # [tokens, hidden]
        tokens = hidden.shape[0]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        width = self.hidden_size
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(hidden, (width,), layer.input_norm, self.eps)
            qkv = layer.qkv(h)
            _add_lora(qkv, h, layer.lora["qkv"])
            qkv = qkv.view(tokens, heads + 2 * kv_heads, hd)
            qk = qkv[:, : heads + kv_heads]
            qk = qk * idx.cos + qk.roll(hd // 2, dims=-1) * idx.sin
            keys, values = self.cache.keys[index], self.cache.values[index]
            keys.view(-1, hd).index_copy_(
                0, idx.kv_index, qk[:, heads:].reshape(-1, hd).to(keys.dtype))
            values.view(-1, hd).index_copy_(
                0, idx.kv_index, qkv[:, heads + kv_heads :].reshape(-1, hd).to(values.dtype))
            out = self._fused_attention(qk[:, :heads], keys, values, idx, layer.scaling)
            out = out.reshape(tokens, heads * hd)
            o = layer.o(out)
            _add_lora(o, out, layer.lora["o"])
            hidden = hidden + o
            h = F.rms_norm(hidden, (width,), layer.post_norm, self.eps)
            gate_up = layer.gate_up(h)
            _add_lora(gate_up, h, layer.lora["gate_up"])
            act = F.silu(gate_up[:, : self.intermediate]).mul_(gate_up[:, self.intermediate :])
            down = layer.down(act)
            _add_lora(down, act, layer.lora["down"])
            hidden = hidden + down

        if step.logit_rows == list(range(len(step.logit_rows))) and idx.decode_is_prefix \
                and len(step.logit_rows) == idx.decode_count == tokens \
                and not step.scored_tokens:
            last_hidden = hidden  # a pure decode step: every token needs its logits
        else:
            last_hidden = hidden.index_select(0, step.logit_tokens(hidden.device))
        final = F.rms_norm(last_hidden, (width,), self.final_norm, self.eps)
        return self.head(final).float()

    def _fused_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         idx: _StepIndexes, scale: float) -> torch.Tensor:
        if not idx.prefill and idx.decode_is_prefix:
            return self._decode_attention(q, keys, values, idx, scale)
        out = torch.empty_like(q)
        if idx.decode_tokens is not None:
            o = self._decode_attention(q.index_select(0, idx.decode_tokens), keys, values,
                                       idx, scale)
            out.index_copy_(0, idx.decode_tokens, o)
        return prefill_attention(out, q, keys, values, idx, scale)

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          idx: _StepIndexes, scale: float) -> torch.Tensor:
        """Attention of one query token per decoding row: ``q`` ``[B, heads, hd]``.

        The query heads sharing a KV head are its query rows (``[B, kv_heads, group,
        hd]``), so no KV head is repeated: at B=64 that is 0.48 ms per layer instead of
        SDPA's ``enable_gqa`` at 0.85 ms. Heads are grouped the way ``repeat_kv`` orders
        them (query head ``h`` reads KV head ``h // group``).
        """
        length = idx.decode_len
        if self.attention_kernel is not None and idx.decode_lengths is not None:
            return self.attention_kernel.decode_attention(
                q, keys, values, idx.decode_rows, idx.decode_lengths, length, scale)
        if idx.decode_slice is not None:
            k_d = keys[idx.decode_slice, :, :length]  # [B, kv_heads, L, hd] view
            v_d = values[idx.decode_slice, :, :length]
        else:
            k_d = keys[:, :, :length].index_select(0, idx.decode_rows)
            v_d = values[:, :, :length].index_select(0, idx.decode_rows)
        rows = q.shape[0]
        q_g = q.reshape(rows, self.num_kv_heads, self.num_heads // self.num_kv_heads,
                        self.head_dim)
        o = F.scaled_dot_product_attention(
            q_g, k_d.to(q.dtype), v_d.to(q.dtype), attn_mask=idx.decode_mask, scale=scale)
        return o.reshape(rows, self.num_heads, self.head_dim)
