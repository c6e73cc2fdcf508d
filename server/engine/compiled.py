"""The compiled decode path: pure decode steps through inductor graphs, weights frozen.

Measured on this CPU (docs/benchmarks.md, "Decode"), the fused path's step on oneDNN
is bound by GEMM kernels that read the weights at a third of the memory rate; inductor's
C++ GEMM template, which needs the weights frozen as constants, reads them near the
memory rate (one row: 42.9 ms per mixed step against 85.3 fused on oneDNN; at 16 rows
167 vs 190, at 64 it loses). The fused path's own AVX2 kernels (``cpu_kernels``) have
since reached that rate without compiling (one row: 36 ms), so this path is kept as an
option, not the default. Compiling costs 2-3.5 minutes per graph on 2 cores, so graphs
are built in a background thread, one per *variant*: (batch bucket, loaded LoRA rank,
targets in use). A step whose variant is not ready yet runs on the fused path (and asks for it); a
request never waits for a compile.

A graph takes one decode token per row (rows padded to the bucket), the KV cache (read
only: it returns each layer's new K and V rows, which the caller writes), the rows'
adapter scales and the adapters' stacks as inputs; the attention length is a dynamic
dimension (rounded up to a multiple of 16), so the context does not multiply graphs.
Prefill steps and steps mixing prefill and decode run on the fused path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.forward import StepInput, kv_write_index
from server.engine.fused import FUSED_GROUPS, FusedLlama, _base_linear, _fused_weight
from server.engine.multi_lora import LoraSlots, MultiLoraLinear

log = logging.getLogger(__name__)

LENGTH_STEP = 16
"""Attention lengths are padded to a multiple of this (fewer distinct shapes)."""
VariantKey = tuple[int, int, tuple[str, ...]]  # (bucket, rank, targets in use)


class _DecodeGraph(nn.Module):
    """One decode step of ``bucket`` rows; the model's weights and biases are its (frozen)
    parameters."""

    def __init__(self, runner: FusedLlama, kinds: tuple[str, ...], rank: int) -> None:
        super().__init__()
        inner = runner.inner

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach(), requires_grad=False)

        self.embed = frozen(inner.embed_tokens.weight)
        self.qkv, self.o = nn.ParameterList(), nn.ParameterList()
        self.gate_up, self.down = nn.ParameterList(), nn.ParameterList()
        self.norm1, self.norm2 = nn.ParameterList(), nn.ParameterList()
        biases: dict[str, list[torch.Tensor | None]] = {group: [] for group in FUSED_GROUPS}
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for group, group_kinds in FUSED_GROUPS.items():
                parent = attn if group in ("qkv", "o") else mlp
                weight, bias = _fused_weight([_base_linear(getattr(parent, k))
                                              for k in group_kinds])
                getattr(self, group).append(frozen(weight))
                biases[group].append(bias)
            self.norm1.append(frozen(layer.input_layernorm.weight))
            self.norm2.append(frozen(layer.post_attention_layernorm.weight))
        # A base with projection biases (``attention_bias``, ``mlp_bias``, Qwen2's q/k/v)
        # adds them here as the fused path does; None where a group has none (the graph
        # then has no add for it).
        self.qkv_bias = _bias_list(biases["qkv"])
        self.o_bias = _bias_list(biases["o"])
        self.gate_up_bias = _bias_list(biases["gate_up"])
        self.down_bias = _bias_list(biases["down"])
        self.final_norm = frozen(inner.norm.weight)
        head = runner.model.lm_head
        self.head = frozen(head.weight)
        self.head_bias = None if head.bias is None else frozen(head.bias)
        self.cos = frozen(runner.cos)
        self.sin = frozen(runner.sin_signed)
        self.heads, self.kv_heads, self.head_dim = (runner.num_heads, runner.num_kv_heads,
                                                    runner.head_dim)
        self.hidden_size, self.intermediate = runner.hidden_size, runner.intermediate
        self.eps = runner.eps
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.num_layers = len(inner.layers)
        self.rank = rank
        # Where each target's columns start in its fused output, in ``kinds`` order.
        columns: dict[str, tuple[str, int, int]] = {}
        for group, group_kinds in FUSED_GROUPS.items():
            start = 0
            parent = inner.layers[0].self_attn if group in ("qkv", "o") else inner.layers[0].mlp
            for kind in group_kinds:
                width = int(getattr(parent, kind).out_features)
                columns[kind] = (group, start, width)
                start += width
        self.lora_columns = [columns[kind] for kind in kinds]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_rows: torch.Tensor,
                mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                scales: torch.Tensor | None, lora_a: list[torch.Tensor],
                lora_b: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor],
                                                     list[torch.Tensor]]:
        rows = ids.shape[0]
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        width = self.hidden_size
        hidden = F.embedding(ids, self.embed)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        lora_mask = None
        if scales is not None:  # [rows, slots] -> rank-major [rows, rank * slots]
            slots = scales.shape[1]
            lora_mask = scales[:, None, :].expand(rows, self.rank, slots) \
                .reshape(rows, self.rank * slots)
        cached = mask.shape[1] - 1
        new_keys, new_values = [], []
        per_layer = len(self.lora_columns)
        for i in range(self.num_layers):
            adapters = [(col, lora_a[i * per_layer + j], lora_b[i * per_layer + j])
                        for j, col in enumerate(self.lora_columns)]
            h = F.rms_norm(hidden, (width,), self.norm1[i], self.eps)
            qkv = _with_lora(F.linear(h, self.qkv[i], _at(self.qkv_bias, i)), h, "qkv",
                             adapters, lora_mask)
            qkv = qkv.view(rows, heads + 2 * kv_heads, hd)
            qk = qkv[:, : heads + kv_heads]
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            k_new, v_new = qk[:, heads:], qkv[:, heads + kv_heads :]
            new_keys.append(k_new)
            new_values.append(v_new)
            k_all = torch.cat([keys[i][:, :, :cached].index_select(0, kv_rows),
                               k_new.unsqueeze(2)], dim=2)  # [rows, kv_heads, cached+1, hd]
            v_all = torch.cat([values[i][:, :, :cached].index_select(0, kv_rows),
                               v_new.unsqueeze(2)], dim=2)
            q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, hd)
            out = F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask[:, None, None, :], scale=self.scaling,
            ).reshape(rows, heads * hd)
            o = F.linear(out, self.o[i], _at(self.o_bias, i))
            hidden = hidden + _with_lora(o, out, "o", adapters, lora_mask)
            h = F.rms_norm(hidden, (width,), self.norm2[i], self.eps)
            gate_up = F.linear(h, self.gate_up[i], _at(self.gate_up_bias, i))
            gate_up = _with_lora(gate_up, h, "gate_up", adapters, lora_mask)
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            down = F.linear(act, self.down[i], _at(self.down_bias, i))
            hidden = hidden + _with_lora(down, act, "down", adapters, lora_mask)
        final = F.rms_norm(hidden, (width,), self.final_norm, self.eps)
        return F.linear(final, self.head, self.head_bias), new_keys, new_values


def _bias_list(biases: list[torch.Tensor | None]) -> nn.ParameterList | None:
    """Each layer's (frozen) bias of one fused group; None when no layer has one."""
    if all(b is None for b in biases):
        return None
    # ``_fused_weight`` gives a layer without a bias None while another layer has one.
    return nn.ParameterList(
        nn.Parameter(torch.zeros_like(next(x for x in biases if x is not None))
                     if b is None else b.detach(), requires_grad=False)
        for b in biases)


def _at(biases: nn.ParameterList | None, layer: int) -> torch.Tensor | None:
    """Layer ``layer``'s bias in ``biases`` (None: the group has none)."""
    return None if biases is None else biases[layer]


def _with_lora(y: torch.Tensor, x: torch.Tensor, group: str,
               adapters: list[tuple[tuple[str, int, int], torch.Tensor, torch.Tensor]],
               mask: torch.Tensor | None) -> torch.Tensor:
    """``y`` plus the LoRA term of every target of ``group`` in its columns."""
    if mask is None:
        return y
    for (target_group, start, width), a, b in adapters:
        if target_group == group:
            term = (x @ a.t()) * mask @ b  # [rows, width]
            y = torch.cat([y[:, :start], y[:, start : start + width] + term,
                           y[:, start + width :]], dim=1)
    return y


class CompiledDecoder:
    """Ready compiled graphs by variant, and the background thread that builds them."""

    def __init__(self, runner: FusedLlama, slots: LoraSlots, batch_sizes: tuple[int, ...],
                 prebuild_base: bool = True) -> None:
        """Starts the compile thread; with ``prebuild_base`` it first builds every bucket's
        graph without adapters (the ones with adapters are built when a step needs them)."""
        self.runner, self.slots = runner, slots
        limit = runner.cache.max_rows
        self.buckets = sorted({min(b, limit) for b in batch_sizes} | {limit}) \
            if batch_sizes else [limit]
        self._ready: dict[VariantKey, Callable[..., Any]] = {}
        self._requested: set[VariantKey] = set()
        self._queue: queue.Queue[VariantKey | None] = queue.Queue()
        self._lock = threading.Lock()
        self.failures: dict[VariantKey, str] = {}
        self.compile_seconds: dict[VariantKey, float] = {}
        self.steps_run = 0
        """Steps that went through a compiled graph."""
        self._thread = threading.Thread(target=self._compile_loop, name="switchboard-compile",
                                        daemon=True)
        self._thread.start()
        if prebuild_base:
            for bucket in self.buckets:
                self.request((bucket, 0, ()))

    # -- which variant a step needs -----------------------------------------------------
    def variant(self, rows: int, adapted: bool) -> VariantKey | None:
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:
            return None
        if not adapted:
            return (bucket, 0, ())
        return (bucket, self.slots.max_loaded_rank(), tuple(self._kinds_in_use()))

    def _kinds_in_use(self) -> list[str]:
        used = {name.rsplit(".", 1)[-1] for name, layer in self.slots.layers.items()
                if layer.max_rank}
        return [kind for kinds in FUSED_GROUPS.values() for kind in kinds if kind in used]

    def request(self, key: VariantKey) -> None:
        with self._lock:
            if key in self._requested:
                return
            self._requested.add(key)
        self._queue.put(key)

    def is_ready(self, key: VariantKey) -> bool:
        return key in self._ready

    def wait_ready(self, keys: list[VariantKey], timeout: float) -> bool:
        """For tests and benchmarks: whether every key compiled within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        for key in keys:
            self.request(key)
        while time.monotonic() < deadline:
            if all(k in self._ready or k in self.failures for k in keys):
                return all(k in self._ready for k in keys)
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self._queue.put(None)

    # -- running a step -----------------------------------------------------------------
    def try_run(self, step: StepInput) -> torch.Tensor | None:
        """Logits of a pure decode step through a ready graph; None: run it another way."""
        segments = step.segments
        rows = len(segments)
        if any(s.length != 1 for s in segments) or step.logit_rows != list(range(rows)) \
                or step.scored_tokens:
            return None
        lora = self.slots.state.step
        if lora is not None and (lora.segments or lora.dense_index is not None
                                 or lora.dense_mask is None):
            return None
        key = self.variant(rows, lora is not None)
        if key is None:
            return None
        graph = self._ready.get(key)
        if graph is None:
            self.request(key)
            return None
        bucket, rank, _ = key
        device = step.input_ids.device
        pad = bucket - rows
        ids = step.input_ids
        positions = torch.tensor([s.position for s in segments] + [0] * pad, device=device)
        kv_rows = torch.tensor([s.kv_row for s in segments] + [segments[0].kv_row] * pad,
                               device=device)
        # Fresh tensors made here, under inference mode, like the traced ones: dynamo guards
        # on each input's dispatch keys and strides.
        ids = torch.cat([ids, ids.new_zeros(pad)])
        # Cache entries each row reads: its positions before this token, padded; at most
        # max_len - 1 (a row at the last position has that many), which keeps the slice
        # below the whole cache, the range the graph was compiled for.
        longest = max(s.position for s in segments)
        cached = min(max(LENGTH_STEP, -(-longest // LENGTH_STEP) * LENGTH_STEP),
                     self.runner.cache.max_len - 1)
        keys_pos = torch.arange(cached + 1, device=device)
        mask = keys_pos[None, :] < positions[:, None]
        mask[:, cached] = True  # the row's own new token
        scales, lora_a, lora_b = self._lora_inputs(lora, rank, key[2], pad)
        cache = self.runner.cache
        logits, new_keys, new_values = graph(ids, positions, kv_rows, mask, cache.keys,
                                             cache.values, scales, lora_a, lora_b)
        index = kv_write_index(torch.tensor([s.kv_row for s in segments], device=device),
                               positions[:rows], self.runner.num_kv_heads, cache.max_len)
        hd = self.runner.head_dim
        for layer in range(len(cache.keys)):
            cache.keys[layer].view(-1, hd).index_copy_(
                0, index, new_keys[layer][:rows].reshape(-1, hd).to(cache.keys[layer].dtype))
            cache.values[layer].view(-1, hd).index_copy_(
                0, index, new_values[layer][:rows].reshape(-1, hd)
                .to(cache.values[layer].dtype))
        self.steps_run += 1
        return logits[:rows].float()

    def _lora_inputs(self, lora: Any, rank: int, kinds: tuple[str, ...], pad: int
                     ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        if lora is None:
            return None, [], []
        slots = self.slots.num_slots
        # Rank-major: the first ``slots`` columns are rank 0's, one scale per slot.
        scales = lora.dense_mask[:, :slots]
        scales = torch.cat([scales, scales.new_zeros(pad, slots)])
        lora_a, lora_b = self._stack_views(rank, kinds)
        return scales, lora_a, lora_b

    def _stack_views(self, rank: int, kinds: tuple[str, ...]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's ``A`` and ``B^T`` views ``[rank * slots, features]`` of ``kinds``."""
        slots = self.slots.num_slots
        lora_a: list[torch.Tensor] = []
        lora_b: list[torch.Tensor] = []
        if rank:
            for layer_targets in self._targets_by_layer(kinds):
                for target in layer_targets:
                    lora_a.append(target.lora_a[:rank].reshape(rank * slots, -1))
                    lora_b.append(target.lora_b_t[:rank].reshape(rank * slots, -1))
        return lora_a, lora_b

    def _targets_by_layer(self, kinds: tuple[str, ...]) -> list[list[MultiLoraLinear]]:
        out = []
        for layer in self.runner.inner.layers:
            targets = []
            for kind in kinds:
                parent = layer.self_attn if hasattr(layer.self_attn, kind) else layer.mlp
                module = getattr(parent, kind)
                assert isinstance(module, MultiLoraLinear)
                targets.append(module)
            out.append(targets)
        return out

    # -- compiling ----------------------------------------------------------------------
    def _compile_loop(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            started = time.perf_counter()
            try:
                self._ready[key] = self._compile(key)
            except Exception as exc:  # the fused path keeps serving this variant
                self.failures[key] = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("compiling the decode graph failed; that variant stays on the "
                            "fused path", extra={"fields": {"variant": _describe(key),
                                                            "error": self.failures[key]}})
                continue
            self.compile_seconds[key] = time.perf_counter() - started
            log.info("compiled decode graph ready", extra={"fields": {
                "variant": _describe(key), "compile_s": round(self.compile_seconds[key], 1)}})

    def _trace_inputs(self, bucket: int, rank: int, kinds: tuple[str, ...]) -> tuple:
        """Inputs shaped like a step of ``bucket`` rows (made the way ``try_run`` makes
        them, so that the graph's guards hold for every real step)."""
        device = self.runner.cache.keys[0].device
        ids = torch.zeros(bucket, dtype=torch.long, device=device)
        positions = torch.full((bucket,), LENGTH_STEP, dtype=torch.long, device=device)
        kv_rows = torch.zeros(bucket, dtype=torch.long, device=device)
        mask = torch.ones(bucket, LENGTH_STEP + 1, dtype=torch.bool, device=device)
        torch._dynamo.mark_dynamic(mask, 1, min=LENGTH_STEP + 1,
                                   max=self.runner.cache.max_len)
        scales = torch.zeros(bucket, self.slots.num_slots, dtype=self.runner.cos.dtype,
                             device=device) if rank else None
        lora_a, lora_b = self._stack_views(rank, kinds)
        cache = self.runner.cache
        return ids, positions, kv_rows, mask, cache.keys, cache.values, scales, lora_a, lora_b

    def _compile(self, key: VariantKey) -> Callable[..., Any]:
        import torch._inductor.config as inductor_config

        # One cache entry per variant on the same forward code object.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        inductor_config.freezing = True
        inductor_config.max_autotune = True
        inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
        bucket, rank, kinds = key
        module = _DecodeGraph(self.runner, kinds, rank).eval()
        # dynamic=None (not False, which ignores mark_dynamic): only the attention length
        # is symbolic; every other shape is fixed by the variant, so nothing recompiles.
        graph = torch.compile(module, dynamic=None)
        with torch.inference_mode():  # as the engine calls it: dynamo guards on that too
            graph(*self._trace_inputs(bucket, rank, kinds))
        return graph


def _describe(key: VariantKey) -> str:
    bucket, rank, kinds = key
    return f"B={bucket} " + (f"rank {rank} on {','.join(kinds)}" if rank else "base")
