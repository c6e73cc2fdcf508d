"""Batched multi-LoRA linear layers and the slot API that loads adapters into them.

Every targeted base linear (``q_proj`` ... ``down_proj``) is wrapped in a
:class:`MultiLoraLinear` holding preallocated stacks for ``num_slots`` adapters. A
forward pass carries, per token, the slot of its row (or none) and the row's
``weight_scale``; requests for different adapters and scales share one batch and the
base weights are never modified.

Layout, and why it differs from the design card's ``[slots, r_max, in]``: the stacks
are rank-major, ``A: [r_max, slots, in]`` and ``B^T: [r_max, slots, out]``. Then the
first ``r`` ranks of *every* slot form one contiguous block, so with ``r_eff`` = the
largest rank currently loaded, ``A[:r_eff]`` flattens to ``[r_eff * slots, in]`` as a
view and the whole LoRA term is two dense GEMMs over all slots at once (a "dense
BGMV"). On a CPU the decode step is bound by memory traffic, so reading
``r_eff`` rather than ``r_max`` ranks matters, and a handful of large GEMMs beat a
gather or a loop over slots, whose per-op overhead dominates at decode batch sizes.
Columns of slots a token does not use are zeroed by a per-step mask. That dense path
serves decode tokens; a prefill chunk (many tokens, one slot) is computed on its own
slot's ranks only, since the dense path would multiply its FLOPs by ``num_slots``.
Each adapter's scaling (``alpha / r``) is folded into ``A`` when its slot is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from server.engine.peft_adapter import LoraModule, PeftAdapter
from server.errors import (
    AdapterRankError,
    AdapterShapeMismatch,
    AdapterTargetMismatch,
    InvalidRequest,
)

NO_ADAPTER = -1


def _rank_major(scales: torch.Tensor, rank: int, device: torch.device) -> torch.Tensor:
    """``[tokens, slots]`` scales as the dense mask's rank-major columns ``[tokens,
    rank * slots]`` (column ``r * slots + s`` is slot ``s``'s scale), on ``device``."""
    tokens, slots = scales.shape
    return scales.unsqueeze(1).expand(tokens, rank, slots).reshape(tokens, rank * slots) \
        .to(device)


@dataclass(frozen=True)
class LoraSegment:
    """A run of tokens of one row: ``[start, end)`` all use ``slot`` at ``scale``."""

    start: int
    end: int
    slot: int
    scale: float


@dataclass(frozen=True)
class LoraStep:
    """Per-step routing shared by all wrapped layers of one model.

    Decode tokens (one per row; base rows too, at scale 0, so that they stay a prefix
    when base and adapter rows decode together) go through the dense path: ``dense_mask`` is
    ``[dense_tokens, rank * num_slots]`` (rank-major, like the stacks); for a token of
    a row using slot ``s`` at scale ``c``, column ``r * num_slots + s`` holds ``c`` for
    every ``r < rank`` and all else is 0. ``dense_index`` lists those tokens (None: they
    are the first ``dense_mask.shape[0]`` tokens, a slice). Prefill chunks are long runs
    of one slot, so each is a :class:`LoraSegment` computed on its own slot only: the
    dense path would spend ``num_slots`` times the FLOPs on them.

    When the decode tokens use only some slots (one caller, or callers of one dialect),
    ``used_slots`` lists them and ``used_mask`` is ``dense_mask`` restricted to their
    columns (``[dense_tokens, rank * len(used_slots)]``, rank-major): the layers then
    read only those slots' stacks, not all ``num_slots`` (one rank-16 adapter on all
    seven targets alone: 1/8 of 156 MB per step with 8 slots). ``dense_mask`` keeps
    every slot's columns for the compiled graphs, whose inputs are the whole stacks.
    """

    dense_mask: torch.Tensor | None
    dense_index: torch.Tensor | None
    rank: int
    segments: tuple[LoraSegment, ...]
    used_slots: tuple[int, ...] | None = None
    used_index: torch.Tensor | None = None
    used_mask: torch.Tensor | None = None


class LoraStepState:
    """Holder of the current :class:`LoraStep`; None means a pure base forward."""

    def __init__(self) -> None:
        self.step: LoraStep | None = None


class MultiLoraLinear(nn.Module):
    """A base linear plus every row's own LoRA term, over packed tokens ``[tokens, in]``.

    Semantics (the reference loop this must equal), for token ``t`` of a row with
    adapters ``(s_1, c_1) ... (s_k, c_k)`` (slot and scale each; k = 0 for the base,
    k = 1 unless the request composes several)::

        y[t] = base(x[t])
        for s, c in adapters(t):
            y[t] += c * scaling[s] * B[s] @ (A[s] @ x[t])

    where ``A[s]`` is ``[r_s, in]``, ``B[s]`` is ``[out, r_s]`` (zero-padded to
    ``r_max``) and ``scaling[s]`` is ``alpha_s / r_s`` (``/ sqrt(r_s)`` with rsLoRA).
    """

    lora_a: torch.Tensor
    lora_b_t: torch.Tensor

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b_t: torch.Tensor,
                 state: LoraStepState):
        """``lora_a`` ``[r_max, slots, in]`` and ``lora_b_t`` ``[r_max, slots, out]`` are this
        layer's part of its :class:`LoraStack` (views, zero-filled)."""
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)  # type: ignore[arg-type]
        self.out_features = int(base.out_features)  # type: ignore[arg-type]
        self.num_slots = int(lora_a.shape[1])
        self.state = state
        # Views into the stack shared by every layer of this kind, so that loading an
        # adapter is a few copies per kind rather than two per layer; scaling is folded
        # into A at load time.
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b_t", lora_b_t, persistent=False)
        # Rank of what each slot holds for *this* layer (0: the adapter skips it). A layer
        # no loaded adapter targets costs nothing: q,v-only adapters leave the MLP alone.
        self.slot_ranks = [0] * self.num_slots

    @property
    def max_rank(self) -> int:
        return max(self.slot_ranks)

    def _dense_stacks(self, step: LoraStep, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``A`` and ``B^T`` rows the dense path multiplies: ``[rank * k, in]`` and
        ``[rank * k, out]``, rank-major over the step's ``k`` used slots (all of them, a
        view; one, a strided view; some, a gathered copy of only theirs)."""
        if step.used_slots is None or step.used_index is None:
            rows = rank * self.num_slots
            return (self.lora_a[:rank].view(rows, self.in_features),
                    self.lora_b_t[:rank].view(rows, self.out_features))
        if len(step.used_slots) == 1:
            slot = step.used_slots[0]
            return self.lora_a[:rank, slot], self.lora_b_t[:rank, slot]
        rows = rank * len(step.used_slots)
        return (self.lora_a[:rank].index_select(1, step.used_index).view(rows, self.in_features),
                self.lora_b_t[:rank].index_select(1, step.used_index)
                .view(rows, self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tokens, in]
        y = self.base(x)  # [tokens, out]
        self.add_lora(y, x)
        return y

    def add_lora(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """``y += `` every token's LoRA term, in place (``y`` may be a column slice of a
        fused projection's output: the fused path calls this per target)."""
        step = self.state.step
        if step is None:
            return
        rank = min(step.rank, self.max_rank)
        if step.dense_mask is not None and rank > 0:
            a, b = self._dense_stacks(step, rank)  # [rank * used slots, in / out]
            count = step.dense_mask.shape[0]
            full = step.used_mask if step.used_mask is not None else step.dense_mask
            mask = full[:, : a.shape[0]]  # rank-major: the first `rank` ranks' columns
            xd = x[:count] if step.dense_index is None else x.index_select(0, step.dense_index)
            h = torch.matmul(xd.to(a.dtype), a.t()).mul_(mask)  # [dense, rank*slots]
            if step.dense_index is None and y.dtype == h.dtype:
                y[:count].addmm_(h, b)  # in place: no [dense, out] temporary
            elif step.dense_index is None:
                y[:count] += (h @ b).to(y.dtype)
            else:
                y.index_add_(0, step.dense_index, (h @ b).to(y.dtype))
        for seg in step.segments:
            rank = self.slot_ranks[seg.slot]
            if rank == 0:
                continue
            a_s = self.lora_a[:rank, seg.slot]  # [rank, in] (strided view)
            b_s = self.lora_b_t[:rank, seg.slot]  # [rank, out]
            h = torch.matmul(x[seg.start : seg.end].to(a_s.dtype), a_s.t())  # [n, rank]
            y[seg.start : seg.end] += (torch.matmul(h, b_s) * seg.scale).to(y.dtype)

def _compute_dtype(base: nn.Module) -> torch.dtype:
    # bitsandbytes layers store packed uint8/int8 weights; LoRA runs in the compute dtype.
    compute = getattr(base, "compute_dtype", None)
    if isinstance(compute, torch.dtype):
        return compute
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


@dataclass
class LoraStack:
    """One kind of target (``q_proj``, ...) across all layers that share its shape.

    ``a`` is ``[layers, r_max, slots, in]`` and ``b_t`` ``[layers, r_max, slots, out]``;
    layer ``i``'s :class:`MultiLoraLinear` holds ``a[i]`` and ``b_t[i]``.
    """

    names: list[str]
    layers: list[MultiLoraLinear]
    a: torch.Tensor
    b_t: torch.Tensor

    def held_rank(self, slot: int) -> int:
        return max(layer.slot_ranks[slot] for layer in self.layers)

    def zero(self, slot: int, start: int, end: int) -> None:
        if end > start:
            self.a[:, start:end, slot].zero_()
            self.b_t[:, start:end, slot].zero_()

    def set_ranks(self, slot: int, ranks: list[int]) -> None:
        for layer, rank in zip(self.layers, ranks, strict=True):
            layer.slot_ranks[slot] = rank  # a list item: no nn.Module.__setattr__ here

    def load(self, slot: int, modules: list[LoraModule | None]) -> None:
        """Write one adapter's matrices for this kind into ``slot`` (callers hold no_grad).

        The common case (every layer adapted at one rank) is one stacked copy for A and
        one for B whatever the layer count; ``layers_to_transform`` or ``rank_pattern``
        adapters take a per-layer path. A is scaled in float32 and rounded once.
        """
        held = self.held_rank(slot)
        ranks = [0 if m is None else m.rank for m in modules]
        present = [m for m in modules if m is not None]
        if len(present) == len(modules) and len(set(ranks)) == 1:
            rank = ranks[0]
            self.zero(slot, rank, held)
            scalings = torch.tensor([m.scaling for m in present], dtype=torch.float32,
                                    device=self.a.device).view(-1, 1, 1)
            self.a[:, :rank, slot].copy_(torch.stack([m.a for m in present]).float() * scalings)
            self.b_t[:, :rank, slot].copy_(torch.stack([m.b for m in present]).transpose(1, 2))
        else:
            self.zero(slot, 0, held)
            for i, module in enumerate(modules):
                if module is not None:
                    self.a[i, : module.rank, slot].copy_(module.a.float() * module.scaling)
                    self.b_t[i, : module.rank, slot].copy_(module.b.t())
        self.set_ranks(slot, ranks)

    def clear(self, slot: int) -> None:
        self.zero(slot, 0, self.held_rank(slot))
        self.set_ranks(slot, [0] * len(self.layers))


class LoraSlots:
    """The slot API the adapter cache drives: load into a slot, clear it.

    Loading is ``copy_`` into the preallocated stacks of every wrapped layer; a module
    the adapter does not target stays zero for that slot. Which adapter owns a slot is
    the adapter cache's record alone; here a slot only has a rank (0: empty).
    """

    def __init__(self, stacks: list[LoraStack], state: LoraStepState,
                 num_slots: int, r_max: int) -> None:
        self.stacks = stacks
        self.layers = {name: layer for stack in stacks
                       for name, layer in zip(stack.names, stack.layers, strict=True)}
        self.state = state
        self.num_slots = num_slots
        self.r_max = r_max
        self._ranks = [0] * num_slots

    def check_compatible(self, adapter: PeftAdapter) -> None:
        """Raise the :class:`AdapterIncompatible` kind naming the first thing that does not fit."""
        for name, module in adapter.modules.items():
            if not 0 < module.rank <= self.r_max:
                raise AdapterRankError(
                    f"{adapter.path.name}: '{name}' has rank {module.rank}; ranks must be in "
                    f"1..{self.r_max} (max_lora_rank)"
                )
        for name, module in adapter.modules.items():
            layer = self.layers.get(name)
            if layer is None:
                served = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in self.layers}))
                raise AdapterTargetMismatch(
                    f"{adapter.path.name}: targets '{name[:120]}', which this base does not "
                    f"have or serve (served: {served})"
                )
            expected_a = (module.rank, layer.in_features)
            expected_b = (layer.out_features, module.rank)
            if tuple(module.a.shape) != expected_a or tuple(module.b.shape) != expected_b:
                raise AdapterShapeMismatch(
                    f"{adapter.path.name}: '{name}' has A{tuple(module.a.shape)} "
                    f"B{tuple(module.b.shape)}, base needs A{expected_a} B{expected_b}"
                )

    def load(self, slot: int, adapter: PeftAdapter) -> None:
        """Copy ``adapter`` into ``slot`` of every wrapped layer (zero where it has nothing).

        Per target kind, not per layer: a seven-target adapter on a 30-layer model is 420
        matrices, and one Python call per matrix, not the bytes, dominated cold loads.
        Only ranks the slot held and the new adapter does not overwrite are cleared, so
        loading costs what the adapter weighs, not what ``max_lora_rank`` allows.
        """
        self._check_slot(slot)
        self.check_compatible(adapter)
        with torch.no_grad():
            for stack in self.stacks:
                stack.load(slot, [adapter.modules.get(name) for name in stack.names])
        self._ranks[slot] = adapter.rank

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            for stack in self.stacks:
                stack.clear(slot)
        self._ranks[slot] = 0

    def is_loaded(self, slot: int) -> bool:
        return 0 <= slot < self.num_slots and self._ranks[slot] > 0

    def max_loaded_rank(self) -> int:
        return max(self._ranks)

    def loaded(self) -> list[int]:
        return [slot for slot in range(self.num_slots) if self._ranks[slot] > 0]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise InvalidRequest(f"unknown adapter slot {slot} (slots: 0..{self.num_slots - 1})")

    def set_step(self, segments: list[LoraSegment]) -> None:
        """Route this step: one :class:`LoraSegment` per row and adapter, in packed-token
        order (a composed row gives one per adapter, over the same tokens).

        Rows without an adapter (slot -1) are skipped; single-token rows (decoding) share
        the dense path, where a composed row's token has one column group per adapter;
        longer ones (prefill chunks) get one segment per adapter, each on its own slot.
        """
        # Base rows decoding beside adapter rows join the dense path at scale 0 (their term
        # is exactly zero): the dense tokens then stay a prefix, a slice rather than a gather.
        dense: dict[int, int] = {}  # token index -> row of the mask
        for seg in segments:
            if seg.end - seg.start == 1:
                dense.setdefault(seg.start, len(dense))
        adapted = [s for s in segments if s.end - s.start == 1 and s.slot != NO_ADAPTER]
        long = tuple(s for s in segments if s.slot != NO_ADAPTER and s.end - s.start > 1)
        if not adapted and not long:
            self.state.step = None
            return
        mask = index = used_mask = used_index = None
        used_slots: tuple[int, ...] | None = None
        rank = max(self._ranks[s.slot] for s in adapted) if adapted else 0
        if adapted:
            dtype = next(iter(self.layers.values())).lora_a.dtype
            device = self.state_device
            per_slot = torch.zeros(len(dense), self.num_slots, dtype=dtype)  # [dense, slots]
            for seg in adapted:
                per_slot[dense[seg.start], seg.slot] += seg.scale
            mask = _rank_major(per_slot, rank, device)
            starts = list(dense)
            if starts != list(range(len(dense))):
                index = torch.tensor(starts, device=device)
            used = sorted({seg.slot for seg in adapted})
            if len(used) < self.num_slots:
                used_slots = tuple(used)
                used_index = torch.tensor(used, device=device)
                used_mask = _rank_major(per_slot[:, used], rank, device)
        self.state.step = LoraStep(mask, index, rank, long, used_slots, used_index, used_mask)

    @property
    def state_device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_a.device

    def clear_step(self) -> None:
        self.state.step = None


def attach_multi_lora(model: nn.Module, target_modules: Iterable[str], num_slots: int,
                      r_max: int) -> LoraSlots:
    """Wrap every linear of ``model`` whose last name is in ``target_modules``.

    Call it once the model sits on its device: the layers' stacks are views into one
    :class:`LoraStack` per kind, a sharing that moving the model would break.
    """
    targets = set(target_modules)
    state = LoraStepState()
    found: dict[tuple, list[tuple[nn.Module, str, str, nn.Module]]] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and not isinstance(child, MultiLoraLinear):
                full = f"{name}.{child_name}" if name else child_name
                weight = next(child.parameters())
                key = (child_name, int(child.in_features), int(child.out_features),  # type: ignore[arg-type]
                       _compute_dtype(child), weight.device)
                found.setdefault(key, []).append((module, child_name, full, child))
    if not found:
        raise AdapterTargetMismatch(f"no module of the base model is named {sorted(targets)}")
    stacks = []
    for (_, in_features, out_features, dtype, device), members in found.items():
        count = len(members)
        a = torch.zeros(count, r_max, num_slots, in_features, dtype=dtype, device=device)
        b_t = torch.zeros(count, r_max, num_slots, out_features, dtype=dtype, device=device)
        layers = []
        for i, (parent, child_name, _, child) in enumerate(members):
            layer = MultiLoraLinear(child, a[i], b_t[i], state)
            setattr(parent, child_name, layer)
            layers.append(layer)
        stacks.append(LoraStack([m[2] for m in members], layers, a, b_t))
    return LoraSlots(stacks, state, num_slots, r_max)
