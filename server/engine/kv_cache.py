"""A slotted KV cache: one preallocated row per running request.

Every layer holds ``K`` and ``V`` of shape ``[max_rows, kv_heads, max_model_len,
head_dim]``, allocated once at start. A request owns one row from admission to finish;
its tokens are written at their positions, so a request joining or leaving the batch
never moves or recomputes anyone else's cache (design decision 3, the "slotted"
design gpt-fast uses). Freeing a row only returns its index: stale values beyond a
row's length are masked out by attention and overwritten by the next owner.
"""

from __future__ import annotations

import torch


class SlottedKVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_rows, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_rows = max_rows
        self.max_len = max_len
        self._free = list(range(max_rows))

    def allocate(self) -> int | None:
        """The lowest free row (keeps running rows packed low), or None when all are taken."""
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def release(self, row: int) -> None:
        if row in self._free or not 0 <= row < self.max_rows:
            raise ValueError(f"KV row {row} is not allocated")
        self._free.append(row)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
