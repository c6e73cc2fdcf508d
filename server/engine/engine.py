"""The engine: continuous batching of multi-LoRA requests on its own thread.

Each step (iteration-level scheduling, design decision 3):

1. requests that were cancelled or passed their deadline leave (waiting or running);
2. waiting requests are admitted FCFS among the admissible ones, up to
   ``max_batch_size`` rows: one whose adapter is not resident yet is passed by later
   ones, unless it has waited ``aging_limit_s``, in which case nobody passes it;
3. every decoding row contributes one token, prefilling rows a chunk of their prompt
   within the step's token budget;
4. one forward pass over the packed batch (per-row adapter slot and scale);
5. rows that completed their prompt or decoded get a token (their own sampler and
   seed), text is detokenized and streamed; finished rows leave at once.

The asyncio gRPC loop only submits and reads events (design decision 5); torch runs
here, outside the GIL-bound loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine import cpu_kernels
from server.engine.compiled import CompiledDecoder
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.forward import BatchedLlama, Segment, StepInput
from server.engine.fused import FusedLlama, unfusable_reason
from server.engine.multi_lora import NO_ADAPTER, LoraSegment, LoraSlots, attach_multi_lora
from server.engine.packed_linear import BACKEND_NOTES, gemm_backend
from server.engine.request import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
    TokenChunk,
)
from server.engine.sampling import choose_token, make_generator
from server.errors import EngineStopped, InvalidRequest, QueueFull

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepTrace:
    step: int
    rows: tuple[str, ...]
    """Request ids that took part in this step."""
    prefill_tokens: dict[str, int]
    """Prompt tokens computed this step, by request id (absent: decoding)."""
    started_at: float
    """``time.monotonic()`` when the step began."""
    duration_s: float


@dataclass
class _Row:
    handle: RequestHandle
    submitted_at: float
    kv_row: int = -1
    slots: tuple[tuple[int, float], ...] = ((NO_ADAPTER, 0.0),)
    """(slot, scale) of each adapter of the row once admitted; the base: no slot."""
    admitted_at: float = 0.0
    first_token_at: float | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # tokens not yet in a chunk
    logits: list[torch.Tensor] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.request.prompt_ids)


class Engine:
    """Serves one base model. It wraps the model's target linear layers in place (the
    model then belongs to the engine) and allocates the KV cache and adapter stacks once."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None,
                 *, start: bool = True) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model = model
        self.device = next(model.parameters()).device
        cfg = self.config
        self.decode_path, self.decode_note = choose_decode_path(model, cfg.decode, cfg.gemm)
        self.slots: LoraSlots = attach_multi_lora(
            model, cfg.target_modules, cfg.max_loras, cfg.max_lora_rank
        )
        self.runner: BatchedLlama
        if self.decode_path == "eager":
            self.runner = BatchedLlama(model, cfg.max_batch_size, cfg.max_model_len)
        else:
            fused = FusedLlama(model, cfg.max_batch_size, cfg.max_model_len, cfg.gemm)
            if self.decode_path == "compiled":
                fused.compiled = CompiledDecoder(fused, self.slots, cfg.compiled_batch_sizes)
            self.runner = fused
        self.cache = self.runner.cache
        self.vocab_size = int(self.runner.model.config.vocab_size)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._eos_index = torch.tensor(sorted(i for i in self.eos_ids if i < self.vocab_size),
                                       dtype=torch.long, device=self.device)
        """EOS columns of the logits, masked for rows still under their min_tokens."""

        self.trace: deque[StepTrace] = deque(maxlen=self.config.trace_capacity)
        self.fault_hook: Callable[[int], None] | None = None
        """Called with the step number before each forward; an exception it raises ends
        the rows of that step with an error (tests inject faults through it)."""
        self.steps = 0
        self.admission_rounds = 0
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._drain = False
        self._thread = threading.Thread(target=self._loop, name="switchboard-engine", daemon=True)
        if start:
            self.start()

    # -- public API (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and queue ``request``; raise a domain error if it cannot be taken."""
        self._validate(request)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(request, loop)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.config.max_queue_size:
                raise QueueFull(
                    f"the wait queue is full ({self.config.max_queue_size} requests); retry later"
                )
            self._waiting.append(_Row(handle, time.monotonic()))
            self._cond.notify()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None
                 ) -> GenerationResult:
        """Submit and wait (for blocking callers and tests)."""
        return self.submit(request).result(timeout)

    def is_alive(self) -> bool:
        """The engine loop runs and takes requests."""
        return self._thread.is_alive() and not self._stopping

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine thread; with ``drain``, finish admitted and queued work first."""
        with self._cond:
            self._stopping = True
            self._drain = drain
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        compiled = getattr(self.runner, "compiled", None)
        if compiled is not None:
            compiled.close()

    def stats(self) -> dict[str, int]:
        """Gauges for introspection and tests; all zero-leak checks read these."""
        with self._cond:
            return {
                "running": len(self._running),
                "prefilling": sum(row.prefilling for row in self._running),
                "waiting": len(self._waiting),
                "free_kv_rows": self.cache.free_rows,
                "steps": self.steps,
                "admission_rounds": self.admission_rounds,
            }

    # -- validation -------------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> None:
        cfg = self.config
        prompt = request.prompt_ids
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if any(not 0 <= int(t) < self.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt holds token ids outside [0, {self.vocab_size})")
        request.sampling.validate(cfg.max_new_tokens_limit)
        total = len(prompt) + request.sampling.max_new_tokens
        if total > cfg.max_model_len:
            raise InvalidRequest(
                f"prompt tokens ({len(prompt)}) + max_new_tokens "
                f"({request.sampling.max_new_tokens}) = {total} exceeds max_model_len "
                f"{cfg.max_model_len}"
            )
        scales = [c for _, c in request.adapter_uses()] or [request.weight_scale]
        for scale in scales:
            if not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
                raise InvalidRequest(f"weight_scale must be a finite number >= 0, got {scale}")
            if scale > cfg.max_weight_scale:
                raise InvalidRequest(
                    f"weight_scale {scale} exceeds the limit {cfg.max_weight_scale}")
        if request.composed:
            self._validate_composition(request)
        for adapter, _ in request.adapter_uses():
            if isinstance(adapter, int) and not self.slots.is_loaded(adapter):
                loaded = self.slots.loaded() or "none"
                raise InvalidRequest(f"unknown adapter slot {adapter} (loaded: {loaded})")
        if request.forced_tokens is not None and any(
            not 0 <= int(t) < self.vocab_size for t in request.forced_tokens
        ):
            raise InvalidRequest(f"forced_tokens hold ids outside [0, {self.vocab_size})")

    def _validate_composition(self, request: GenerationRequest) -> None:
        adapters = [adapter for adapter, _ in request.adapter_uses()]
        limit = min(self.config.max_adapters_per_request, self.slots.num_slots)
        if request.adapter is None:
            raise InvalidRequest("composed adapters need a first adapter")
        if len(adapters) > limit:
            raise InvalidRequest(
                f"{len(adapters)} adapters on one request; at most {limit} "
                f"(max_adapters_per_request {self.config.max_adapters_per_request}, "
                f"max_loras {self.slots.num_slots})")
        fixed = [a for a in adapters if isinstance(a, int)]
        if fixed and len(fixed) != len(adapters):
            raise InvalidRequest("a composition is all loaded slots or all cache bindings")
        if len({id(a) for a in adapters} if not fixed else set(fixed)) != len(adapters):
            raise InvalidRequest("the same adapter is composed twice")

    # -- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._running and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not (self._drain and (self._running or self._waiting)):
                    break
            try:
                worked = self.step()
            except Exception:  # a bug outside the guarded forward; keep the thread alive
                log.exception("engine step failed outside the forward pass")
                worked = False
            if not worked:
                with self._cond:
                    self._cond.wait(timeout=0.005)  # only requests waiting for adapters
        self._abort_all("the engine stopped before the request finished")

    def step(self) -> bool:
        """Run one scheduling step; return whether a forward pass ran."""
        now = time.monotonic()
        self._reap(now)
        self._admit(now)
        if not self._running:
            return False
        step_no = self.steps
        self.steps += 1
        rows, step, scored = self._plan()
        if not rows:
            return False
        started_at, started = time.monotonic(), time.perf_counter()
        try:
            if self.fault_hook is not None:
                self.fault_hook(step_no)
            self.slots.set_step([
                LoraSegment(s.start, s.start + s.length, slot, float(scale))
                for r, s in zip(rows, step.segments, strict=True) for slot, scale in r.slots
            ])
            logits = self.runner.forward(step)
        except Exception as exc:
            log.exception("engine step %d failed; ending its %d rows", step_no, len(rows))
            for row in rows:
                self._finish(row, FinishReason.ERROR, error=f"engine step failed: {exc}"[:300])
            return True
        finally:
            self.slots.clear_step()
        prefill = {
            r.request.request_id: s.length for r, s in zip(rows, step.segments, strict=True)
            if r.prefilling
        }
        for row, segment in zip(rows, step.segments, strict=True):
            if row.prefilling:
                row.computed += segment.length
        # Greedy rows without a penalty (most traffic) share one argmax over the batch
        # instead of one small op (and on CUDA one device sync) per row. Rows under their
        # min_tokens have EOS masked first, so the shared argmax and the sampler alike
        # never pick it for them.
        count = len(step.logit_rows)
        if scored:
            self._record_prompt_logprobs(logits[count:], scored)
        choosing = self._mask_eos(logits[:count], [rows[i] for i in step.logit_rows])
        best = choosing.argmax(dim=-1).tolist() if count else []
        for logit_index, seg_index in enumerate(step.logit_rows):
            self._advance(rows[seg_index], choosing[logit_index], best[logit_index])
        self.trace.append(StepTrace(
            step_no, tuple(r.request.request_id for r in rows), prefill, started_at,
            time.perf_counter() - started,
        ))
        return True

    def _reap(self, now: float) -> None:
        with self._cond:
            for row in list(self._waiting):
                reason = _ended(row, now)
                if reason is not None:
                    self._waiting.remove(row)
                    self._finish(row, reason)
        for row in list(self._running):
            reason = _ended(row, now)
            if reason is not None:
                self._finish(row, reason)

    def _admit(self, now: float) -> None:
        """Admit waiting rows, FCFS among the admissible ones.

        The lock guards the queue only: a row's slot acquisition may copy an adapter into
        a device slot, and ``submit`` must not wait for that. Only this thread removes
        rows from the queue, so the snapshot stays valid while the lock is let go.
        """
        with self._cond:
            self.admission_rounds += 1
            waiting = list(self._waiting)
        for row in waiting:
            if len(self._running) >= self.config.max_batch_size or not self.cache.free_rows:
                return
            try:
                slots = self._acquire_slots(row)
            except Exception as exc:  # a broken binding fails its own request only
                with self._cond:
                    self._waiting.remove(row)
                self._finish(row, FinishReason.ERROR, error=f"adapter: {exc}"[:300])
                continue
            if slots is None:
                if now - row.submitted_at > self.config.aging_limit_s:
                    return  # starvation guard: nobody passes a request this old
                continue
            with self._cond:
                self._waiting.remove(row)
            kv_row = self.cache.allocate()
            assert kv_row is not None
            request = row.request
            row.kv_row, row.admitted_at = kv_row, now
            if slots:
                row.slots = tuple(zip(slots, (float(c) for _, c in request.adapter_uses()),
                                      strict=True))
            try:
                row.detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop,
                                                   request.sampling.min_tokens)
                if not request.sampling.greedy:
                    row.generator = make_generator(request.sampling.seed, self.device)
            except Exception as exc:  # fails its own request only; frees its row and slot
                self._finish(row, FinishReason.ERROR, error=f"admission: {exc}"[:300])
                continue
            self._running.append(row)

    def _acquire_slots(self, row: _Row) -> list[int] | None:
        """The slot of each adapter of the row ([] for the base), or None: not yet."""
        request = row.request
        adapter = request.adapter
        if adapter is None:
            return []
        if isinstance(adapter, int):
            return [a for a, _ in request.adapter_uses() if isinstance(a, int)]  # validated
        if not request.composed:
            slot = adapter.try_acquire_slot()
            return None if slot is None else [slot]
        others = [a for a, _ in request.composed]
        return adapter.try_acquire_slots_with(others)  # type: ignore[arg-type]

    def _plan(self) -> tuple[list[_Row], StepInput, list[tuple[_Row, list[int]]]]:
        """The step's rows and input, and for rows scoring their prompt the next-token ids
        whose log-probabilities this step's ``scored_tokens`` give."""
        budget = self.config.max_num_batched_tokens
        rows: list[_Row] = []
        segments: list[Segment] = []
        ids: list[int] = []
        logit_rows: list[int] = []
        scored_tokens: list[int] = []
        scored: list[tuple[_Row, list[int]]] = []
        decoding = [r for r in self._running if not r.prefilling]
        prefilling = [r for r in self._running if r.prefilling]
        for row in decoding:
            position = len(row.request.prompt_ids) + len(row.generated) - 1
            logit_rows.append(len(segments))
            segments.append(Segment(row.kv_row, len(ids), 1, position))
            ids.append(row.generated[-1])
            rows.append(row)
        budget -= len(decoding)
        for row in prefilling:
            prompt = row.request.prompt_ids
            n = min(len(prompt) - row.computed, self.config.prefill_chunk_size, budget)
            if n <= 0:
                break
            if row.computed + n == len(prompt):
                logit_rows.append(len(segments))
            if row.request.prompt_logprobs:
                # The logits at position p score prompt token p + 1 (the last position's
                # logits choose the first new token, as for any row).
                last = min(row.computed + n, len(prompt) - 1)
                scored_tokens.extend(range(len(ids), len(ids) + last - row.computed))
                scored.append((row, prompt[row.computed + 1 : last + 1]))
            segments.append(Segment(row.kv_row, len(ids), n, row.computed))
            ids.extend(prompt[row.computed : row.computed + n])
            rows.append(row)
            budget -= n
        step = StepInput(torch.tensor(ids, device=self.device), segments, logit_rows,
                         scored_tokens)
        return rows, step, [(row, targets) for row, targets in scored if targets]

    def _record_prompt_logprobs(self, logits: torch.Tensor,
                                scored: list[tuple[_Row, list[int]]]) -> None:
        targets = torch.tensor([t for _, ids in scored for t in ids], device=logits.device)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(
            1, targets[:, None]).squeeze(1).tolist()
        offset = 0
        for row, ids in scored:
            row.prompt_logprobs.extend(logprobs[offset : offset + len(ids)])
            offset += len(ids)

    def _mask_eos(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """``logits`` (one row per entry of ``rows``) with the EOS columns at -inf for the
        rows that have generated fewer than their min_tokens; a copy only when some do."""
        held = [i for i, row in enumerate(rows)
                if len(row.generated) < row.request.sampling.min_tokens]
        if not held or not self._eos_index.numel():
            return logits
        index = torch.tensor(held, dtype=torch.long, device=logits.device)
        masked = logits.clone()
        masked[index[:, None], self._eos_index[None, :]] = -math.inf
        return masked

    def _advance(self, row: _Row, logits: torch.Tensor, best: int) -> None:
        """Append the row's next token (``best`` is its logits' argmax) and emit text."""
        request = row.request
        params = request.sampling
        if request.record_logits:
            row.logits.append(logits.detach().to("cpu", copy=True))
        forced = request.forced_tokens
        if forced is not None:
            token = forced[len(row.generated)]
        elif params.greedy and params.repetition_penalty == 1.0:
            token = best
        else:
            seen = torch.tensor(request.prompt_ids + row.generated, device=logits.device) \
                if params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
            token = choose_token(logits, params, seen, row.generator)
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        row.generated.append(token)
        assert row.detok is not None
        reason: FinishReason | None = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = FinishReason.EOS
        else:
            row.pending_ids.append(token)
            text = row.detok.add(token)
            if row.detok.stopped:
                reason = FinishReason.STOP
            if text:
                row.handle.emit(TokenChunk(text, tuple(row.pending_ids)))
                row.pending_ids.clear()
        if reason is None and (
            len(row.generated) >= params.max_new_tokens
            or (forced is not None and len(row.generated) >= len(forced))
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(row, reason)

    def _finish(self, row: _Row, reason: FinishReason, error: str | None = None) -> None:
        """End a row however it ends: flush text, free its KV row and adapter, emit result."""
        if row in self._running:
            self._running.remove(row)
        if row.kv_row >= 0:
            self.cache.release(row.kv_row)
            row.kv_row = -1
        for binding, _ in row.request.adapter_uses():
            if not isinstance(binding, int):
                binding.release()  # exactly once: _finish runs once per request
        if row.detok is not None and reason in (FinishReason.EOS, FinishReason.LENGTH):
            tail = row.detok.finish()
            if tail or row.pending_ids:
                row.handle.emit(TokenChunk(tail, tuple(row.pending_ids)))
        now = time.monotonic()
        request = row.request
        row.handle.emit(GenerationResult(
            request_id=request.request_id,
            text=row.detok.text if row.detok else "",
            token_ids=tuple(row.generated),
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(row.generated),
            queue_time_s=(row.admitted_at or now) - row.submitted_at,
            time_to_first_token_s=(row.first_token_at - row.submitted_at)
            if row.first_token_at else None,
            total_time_s=now - row.submitted_at,
            logits=row.logits if request.record_logits else None,
            prompt_logprobs=tuple(row.prompt_logprobs)
            if request.prompt_logprobs and len(row.prompt_logprobs) == len(request.prompt_ids) - 1
            else None,
            error=error,
            first_token_at=row.first_token_at,
            finished_at=now,
        ))

    def _abort_all(self, message: str) -> None:
        with self._cond:
            rows = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for row in rows:
            self._finish(row, FinishReason.ERROR, error=message)


def _ended(row: _Row, now: float) -> FinishReason | None:
    if row.handle.cancelled:
        return FinishReason.CANCELLED
    deadline = row.request.deadline
    if deadline is not None and now >= deadline:
        return FinishReason.DEADLINE
    return None


def choose_decode_path(model: torch.nn.Module, requested: str, gemm: str = "auto"
                       ) -> tuple[str, str]:
    """The decode path the engine will run for ``requested`` (and GEMM setting ``gemm``),
    and a line saying why."""
    if requested == "eager":
        return "eager", "eager (as configured)"
    reason = unfusable_reason(model)
    if reason is not None:
        return "eager", f"eager ({requested} unavailable: {reason})"
    head: Any = model.lm_head
    backend = gemm_backend(head.weight, gemm)
    kernel = BACKEND_NOTES[backend]
    if backend != "avx2" and gemm == "auto" and head.weight.device.type == "cpu":
        kernel += f"; AVX2 kernel unavailable: {cpu_kernels.unavailable_reason()}"
    if requested == "compiled":
        if head.weight.device.type != "cpu":
            return "fused", f"fused ({kernel} GEMMs; compiled unavailable: CPU only so far)"
        return "compiled", (f"compiled (inductor graphs built in the background; fused "
                            f"with {kernel} GEMMs until each is ready)")
    return requested, f"{requested} ({kernel} GEMMs)"


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
