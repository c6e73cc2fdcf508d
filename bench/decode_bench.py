"""Decode speed: ms per decode step against transformers and against the machine's limits.

In one process and one run, on the default model (fp32 unless ``--dtype``):

- ms per decode step at B in {1, 16, 64}, all at the same context (64-token prompts,
  then the timed steps), for (i) transformers' eager forward with its own KV cache,
  (ii) the engine with no adapters, (iii) the engine with 8 mixed rank-8 q,v adapters
  (rows cycle through 8 adapters and the base) -- on the configured decode path, and
  (iii) again with oneDNN GEMMs instead of the AVX2 kernel (``engine.gemm: onednn``, the
  default before the kernel) and on the ``eager`` path, the engine before the fused path
  existed. An engine step is ``Engine.step()``: planning, the forward pass, sampling
  and detokenizing;
- the machine: fp32 GEMM GFLOP/s (a 3072^3 matmul on all threads) and copy GB/s (bytes
  read + written by a 256 MiB copy between tensors filled with data), and from those
  the roofline per B: max(weight bytes / copy rate, 2 * params * B / GEMM rate);
- prefill throughput (tokens/s) of one 256-token prompt, engine and transformers;
- p50 latency of one short call alone through the engine (24-token prompt, 8 new
  tokens, greedy; 20 calls) and through a real server: ``switchboard loadtest
  --concurrency 1`` with the README's utterance on the shipped ``wuyu`` adapter (the
  server-reported time, arrival to end, and the client's beside it);
- nf4 and int8 bases (which decode on the eager path): ms per mixed step at B=1 and 16.

``--profile`` also prints a ``torch.profiler`` table of one B=16 mixed step per path.

    python -m bench.decode_bench [--device auto] [--dtype float32] [--skip-grpc]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import device_description, print_table, target, write_results
from server.basemodel import load_base_model
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.peft_adapter import read_peft_adapter
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.service.config import REPO_ROOT
from tests.support import make_random_adapter, spawn_server

BATCHES = (1, 16, 64)
CONTEXT = 64
STEPS = {1: 8, 16: 4, 64: 2}  # timed decode steps per round, per batch size
ROUNDS = 5  # configs take turns, round by round; the median round is reported
WARMUP_STEPS = 2
MAX_NEW = WARMUP_STEPS + ROUNDS * max(STEPS.values()) + 8
NUM_ADAPTERS = 8
PREFILL_TOKENS = 256
README_UTTERANCE = "侬今朝吃饭伐?"
QV = ("q_proj", "v_proj")


def machine_rates(device: torch.device) -> tuple[float, float]:
    """(GEMM GFLOP/s, copy GB/s) measured here, now."""
    n = 3072
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    runs = []
    for _ in range(3):
        started = _now(device)
        torch.matmul(a, b)
        runs.append(_now(device) - started)
    gflops = 2 * n**3 / min(runs) / 1e9
    # Both tensors hold data: untouched pages of torch.empty read as the zero page.
    src = torch.randn(64 * 2**20, device=device)  # 256 MiB of fp32
    dst = torch.ones_like(src)
    dst.copy_(src)
    runs = []
    for _ in range(5):
        started = _now(device)
        dst.copy_(src)
        runs.append(_now(device) - started)
    copy_gb_s = 2 * src.numel() * src.element_size() / min(runs) / 1e9
    return gflops, copy_gb_s


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def weight_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: every linear weight, the head included."""
    total_bytes = params = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total_bytes += module.weight.numel() * module.weight.element_size()
            params += module.weight.numel()
    return total_bytes, params


def prompts_for(tokenizer, count: int, length: int) -> list[list[int]]:
    text = ("The customer called about a parcel that was delivered to the wrong address in "
            "Pudong, and asked for a refund of the delivery fee. ")
    ids = tokenizer.encode(text * 40, add_special_tokens=False)
    return [ids[i % 7 : i % 7 + length] for i in range(count)]


# -- decode steppers: each config holds B rows at the same context, timed in rounds -----
class HFDecode:
    """transformers' eager forward with its own ``DynamicCache``."""

    def __init__(self, model, tokenizer, batch: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model, self.device = model, device
        ids = torch.tensor(prompts_for(tokenizer, batch, CONTEXT), device=device)
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def steps(self, count: int) -> float:
        started = _now(self.device)
        with torch.inference_mode():
            for _ in range(count):
                out = self.model(input_ids=self.token, cache=self.cache, use_cache=True)
                self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (_now(self.device) - started) / count * 1000

    def close(self) -> None:
        del self.cache


class EngineDecode:
    """``Engine.step()`` with ``batch`` rows decoding (the engine's thread not running)."""

    def __init__(self, engine: Engine, batch: int, mixed: bool) -> None:
        self.engine = engine
        sampling = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
        self.handles = [
            engine.submit(GenerationRequest(ids, sampling, weight_scale=1.0,
                                            adapter=_adapter_of(i) if mixed else None))
            for i, ids in enumerate(prompts_for(engine.tokenizer, batch, CONTEXT))
        ]
        while engine.stats()["prefilling"] or engine.stats()["waiting"]:
            engine.step()

    def steps(self, count: int) -> float:
        started = _now(self.engine.device)
        for _ in range(count):
            self.engine.step()
        return (_now(self.engine.device) - started) / count * 1000

    def close(self) -> None:
        for handle in self.handles:
            handle.cancel()
        while self.engine.stats()["running"]:
            self.engine.step()


def _adapter_of(row: int) -> int | None:
    """Rows cycle through the base and the 8 adapters' slots."""
    slot = row % (NUM_ADAPTERS + 1) - 1
    return None if slot < 0 else slot


def decode_rounds(steppers: dict[str, Any], batch: int) -> dict[str, float]:
    """Median ms per step of each config over interleaved rounds (same context in each)."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for stepper in steppers.values():
        stepper.steps(WARMUP_STEPS)
    for _ in range(ROUNDS):
        for name, stepper in steppers.items():
            times[name].append(stepper.steps(STEPS[batch]))
    for stepper in steppers.values():
        stepper.close()
    return {name: statistics.median(values) for name, values in times.items()}


def profile_step(engine: Engine, batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    from server.engine import cpu_kernels

    # The project's C kernels are ctypes calls, which torch.profiler does not see: label
    # them for this profile only (the product pays nothing for it).
    kernel_class = cpu_kernels._Kernel
    originals = {name: getattr(kernel_class, name) for name in ("matmul", "decode_attention")}

    def labelled(name: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"switchboard::{name}"):
                return call(*args, **kwargs)
        return run

    stepper = EngineDecode(engine, batch, mixed=True)
    stepper.steps(WARMUP_STEPS)
    try:
        for name, call in originals.items():
            setattr(kernel_class, name, labelled(name, call))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stepper.steps(3)
    finally:
        for name, call in originals.items():
            setattr(kernel_class, name, call)
    stepper.close()
    print(f"\nprofile: {engine.decode_note}, B={batch}, mixed adapters (3 steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def hf_prefill_s(model, ids: list[int], device: torch.device) -> float:
    batch = torch.tensor([ids], device=device)
    with torch.inference_mode():
        started = _now(device)
        model(input_ids=batch, use_cache=True, logits_to_keep=1)
        return _now(device) - started


def attach_compiled(engine: Engine, timeout: float = 1800) -> dict[str, float]:
    """Give ``engine`` (fused) the compiled path and build its mixed-adapter graphs for
    every benchmarked batch size now (compile seconds by variant)."""
    from server.engine.compiled import CompiledDecoder

    runner: Any = engine.runner
    compiled = CompiledDecoder(runner, engine.slots, BATCHES, prebuild_base=False)
    runner.compiled = compiled
    engine.decode_path = "compiled"
    variants = [compiled.variant(b, adapted=True) for b in BATCHES]
    print(f"compiling {len(variants)} decode graphs ...", flush=True)
    assert compiled.wait_ready(variants, timeout), compiled.failures
    return {f"B={key[0]}": round(sec, 1) for key, sec in compiled.compile_seconds.items()
            if key is not None}


def engine_prefill_s(engine: Engine, ids: list[int]) -> float:
    """One request of ``ids`` and 1 new token: its prefill step (and one sample)."""
    handle = engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=1)))
    started = _now(engine.device)
    while not handle.done.is_set():
        engine.step()
    return _now(engine.device) - started


def prefill_rounds(hf_model, engines: dict[str, Engine], device: torch.device
                   ) -> dict[str, float]:
    """Tokens/s for one 256-token prompt, configs interleaved, median of the rounds."""
    ids = prompts_for(next(iter(engines.values())).tokenizer, 1, PREFILL_TOKENS)[0]
    runs: dict[str, list[float]] = {"hf_eager": [], **{name: [] for name in engines}}
    for round_index in range(ROUNDS + 1):
        timings = {"hf_eager": hf_prefill_s(hf_model, ids, device)}
        timings.update({name: engine_prefill_s(e, ids) for name, e in engines.items()})
        if round_index:  # the first round warms up
            for name, seconds in timings.items():
                runs[name].append(seconds)
    return {name: PREFILL_TOKENS / statistics.median(values) for name, values in runs.items()}


# -- engine ---------------------------------------------------------------------------------
def make_engine(source: str, device: str, dtype: str | None, quantize: str, decode: str,
                adapters: list[Path], max_batch: int = max(BATCHES), gemm: str = "auto"
                ) -> Engine:
    loaded = load_base_model(source, device=device, dtype=dtype, quantize=quantize)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch_size=max_batch, max_num_batched_tokens=max(512, max_batch),
        max_model_len=max(PREFILL_TOKENS + 8, CONTEXT + MAX_NEW), max_loras=NUM_ADAPTERS,
        max_lora_rank=16, decode=decode, gemm=gemm,
    ), start=False)
    for slot, path in enumerate(adapters):
        engine.slots.load(slot, read_peft_adapter(path))
    return engine


def single_call_p50_ms(engine: Engine, adapters_loaded: bool) -> float:
    ids = prompts_for(engine.tokenizer, 1, 24)[0]
    times = []
    engine.start()
    for i in range(21):
        result = engine.generate(GenerationRequest(
            ids, SamplingParams(max_new_tokens=8, ignore_eos=True),
            adapter=0 if adapters_loaded else None), timeout=120)
        if i:  # the first call is a warm-up
            times.append(result.total_time_s * 1000)
    engine.stop()
    return statistics.median(times)


def grpc_single_call(workdir: Path, decode: str = "fused") -> dict[str, Any]:
    """``switchboard loadtest --concurrency 1``: the README's utterance, wuyu, 20 calls.

    On the compiled path, a first call asks for the wuyu graph at batch size 1, and the
    20 calls start once the server's log says it is ready (the base graphs build first).
    """
    prompts = workdir / "readme.txt"
    prompts.write_text(README_UTTERANCE + "\n", encoding="utf-8")
    log_path = workdir / f"server-{decode}.log"
    started = time.perf_counter()
    server = spawn_server(["--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--set",
                           f"engine.decode={decode}"], log_path)
    serving_s = time.perf_counter() - started

    def loadtest(requests: int) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "clients.cli", "loadtest", "--target", server.address,
             "--concurrency", "1", "--requests", str(requests), "--mix", "wuyu=1",
             "--prompts", str(prompts), "--json", "--quiet"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    try:
        if decode == "compiled":
            loadtest(1)
            deadline = time.monotonic() + 1800
            while "B=1 rank" not in log_path.read_text():
                assert time.monotonic() < deadline, "the wuyu graph was not built in 30 min"
                time.sleep(2)
        report = loadtest(20)
    finally:
        server.process.terminate()
        server.process.wait(120)
    assert report["errors"] == {}, report["errors"]
    ready = [line for line in log_path.read_text().splitlines() if "decode path ready" in line]
    return {"server_ms": report["server_ms"], "latency_ms": report["latency_ms"],
            "tokens": report["tokens"],
            "seconds_to_serving": round(serving_s, 1),
            "startup_log": ready[-1] if ready else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-grpc", action="store_true")
    parser.add_argument("--skip-quantized", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true")
    parser.add_argument("--suffix", default="", help="results file suffix (e.g. _cuda)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="switchboard-decode-bench-"))
    hf = load_base_model("default", device=args.device, dtype=args.dtype)
    device = hf.model.device
    print(f"device {device_description(device)}; making {NUM_ADAPTERS} adapters ...", flush=True)
    adapters = [make_random_adapter(copy.deepcopy(hf.model), workdir / f"a{i}", 8, QV, seed=i)
                for i in range(NUM_ADAPTERS)]
    gflops, copy_gb_s = machine_rates(device)
    weight_bytes, params = weight_stats(hf.model)

    engines = {name: make_engine("default", args.device, args.dtype, "none", path, adapters,
                                 gemm=gemm)
               for name, path, gemm in (("base", "fused", "auto"), ("mixed", "fused", "auto"),
                                        ("mixed_onednn", "fused", "onednn"),
                                        ("mixed_eager", "eager", "auto"),
                                        ("mixed_compiled", "fused", "auto"))}
    if engines["mixed"].decode_note == engines["mixed_onednn"].decode_note:
        del engines["mixed_onednn"]  # no AVX2 kernel here: the default already is oneDNN
    compile_seconds = attach_compiled(engines["mixed_compiled"]) \
        if device.type == "cpu" and not args.skip_compiled else {}
    if not compile_seconds:
        del engines["mixed_compiled"]
    ms: dict[str, dict[str, float]] = {}
    for batch in BATCHES:
        print(f"decode steps, B={batch} ...", flush=True)
        ms[str(batch)] = decode_rounds({
            "hf_eager": HFDecode(hf.model, hf.tokenizer, batch, device),
            "engine_base": EngineDecode(engines["base"], batch, mixed=False),
            "engine_mixed": EngineDecode(engines["mixed"], batch, mixed=True),
            **({"engine_mixed_onednn": EngineDecode(engines["mixed_onednn"], batch, mixed=True)}
               if "mixed_onednn" in engines else {}),
            "engine_mixed_eager_path": EngineDecode(engines["mixed_eager"], batch, mixed=True),
            **({"engine_mixed_compiled": EngineDecode(engines["mixed_compiled"], batch,
                                                      mixed=True)}
               if "mixed_compiled" in engines else {}),
        }, batch)
    if args.profile:
        profile_step(engines["mixed"], 16)
        profile_step(engines["mixed_eager"], 16)
    prefill = prefill_rounds(hf.model, {
        "engine": engines["mixed"], "engine_eager_path": engines["mixed_eager"],
        **({"engine_onednn": engines["mixed_onednn"]} if "mixed_onednn" in engines else {}),
    }, device)
    single = single_call_p50_ms(engines["mixed"], adapters_loaded=True)
    single_onednn = single_call_p50_ms(engines["mixed_onednn"], adapters_loaded=True) \
        if "mixed_onednn" in engines else None
    single_eager = single_call_p50_ms(engines["mixed_eager"], adapters_loaded=True)
    single_compiled = single_call_p50_ms(engines["mixed_compiled"], adapters_loaded=True) \
        if "mixed_compiled" in engines else None
    decode_path = engines["mixed"].decode_note
    del engines, hf

    quantized: dict[str, dict[str, float]] = {}
    if device.type == "cpu" and not args.skip_quantized:
        for quantize in ("int8", "nf4"):
            print(f"{quantize} base ...", flush=True)
            engine = make_engine("default", args.device, args.dtype, quantize, "fused",
                                 adapters, max_batch=16)
            quantized[quantize] = {"decode_path": engine.decode_path}
            for batch in (1, 16):
                quantized[quantize][str(batch)] = round(decode_rounds(
                    {"mixed": EngineDecode(engine, batch, mixed=True)}, batch)["mixed"], 2)
            del engine

    grpc = None if args.skip_grpc else grpc_single_call(workdir)
    grpc_compiled = None if args.skip_grpc or args.skip_compiled or device.type != "cpu" \
        else grpc_single_call(workdir, "compiled")

    roofline = {str(b): max(weight_bytes / (copy_gb_s * 1e9),
                            2 * params * b / (gflops * 1e9)) * 1000 for b in BATCHES}
    ratios = {b: ms[b]["engine_mixed"] / ms[b]["hf_eager"] for b in ms}
    targets = {
        "engine_mixed_over_hf_b16": target(ratios["16"], 0.5, higher_is_better=False),
        "engine_mixed_over_hf_b1": target(ratios["1"], 0.6, higher_is_better=False),
        "engine_mixed_over_hf_b64": target(ratios["64"], 0.7, higher_is_better=False),
        "roofline_over_engine_mixed_b16": target(roofline["16"] / ms["16"]["engine_mixed"],
                                                 0.30),
        "prefill_engine_over_hf": target(prefill["engine"] / prefill["hf_eager"], 1.0),
        "single_call_p50_ms": target(single, 500, higher_is_better=False),
    }
    if grpc is not None:
        targets["grpc_single_call_p50_ms"] = target(grpc["server_ms"]["p50"], 600,
                                                    higher_is_better=False)
    payload = {
        "device": device_description(device),
        "decode_path": decode_path,
        "workload": {"context_tokens": CONTEXT, "timed_steps_per_round": STEPS,
                     "rounds": f"{ROUNDS}, configs interleaved; median round reported",
                     "adapters": f"{NUM_ADAPTERS} x rank 8, q_proj+v_proj; rows cycle "
                                 "through them and the base",
                     "engine_step": "Engine.step(): plan, forward, sample, detokenize"},
        "ms_per_step": {b: {k: round(v, 2) for k, v in row.items()} for b, row in ms.items()},
        "roofline_ms": {b: round(v, 2) for b, v in roofline.items()},
        "gemm_gflops": round(gflops, 1),
        "copy_gb_s": round(copy_gb_s, 2),
        "weight_bytes": weight_bytes,
        "prefill_tokens_per_s": {k: round(v, 1) for k, v in prefill.items()},
        "single_call_p50_ms": round(single, 1),
        "single_call_p50_ms_eager_path": round(single_eager, 1),
        "single_call_p50_ms_onednn": None if single_onednn is None else round(single_onednn, 1),
        "single_call_p50_ms_compiled_path": None if single_compiled is None
        else round(single_compiled, 1),
        "compiled_graph_compile_s": compile_seconds,
        "quantized_ms_per_mixed_step": quantized,
        "targets": targets,
    }
    if grpc is not None:
        payload["grpc_single_call_p50_ms"] = grpc["server_ms"]["p50"]  # server-reported
        payload["grpc_single_call_client_p50_ms"] = grpc["latency_ms"]["p50"]
        payload["grpc_single_call"] = grpc
    if grpc_compiled is not None:
        payload["grpc_single_call_p50_ms_compiled_path"] = grpc_compiled["server_ms"]["p50"]
        payload["grpc_single_call_compiled_path"] = grpc_compiled
    path = write_results("decode", payload, args.suffix)
    rows = [(f"B={b} {k}", f"{v:.1f} ms") for b, row in ms.items() for k, v in row.items()]
    rows += [(f"B={b} roofline", f"{v:.1f} ms") for b, v in roofline.items()]
    rows += [("GEMM", f"{gflops:.1f} GFLOP/s"), ("copy", f"{copy_gb_s:.2f} GB/s")]
    rows += [(f"prefill {k}", f"{v:.0f} tokens/s") for k, v in prefill.items()]
    rows += [("single call p50", f"{single:.0f} ms (eager path {single_eager:.0f} ms)")]
    if grpc is not None:
        rows += [("gRPC single call p50", f"{grpc['server_ms']['p50']:.0f} ms server-reported, "
                                          f"{grpc['latency_ms']['p50']:.0f} ms at the client")]
    if grpc_compiled is not None:
        rows += [("gRPC single call p50, compiled",
                  f"{grpc_compiled['server_ms']['p50']:.0f} ms server-reported")]
    if single_compiled is not None:
        rows += [("single call p50, compiled", f"{single_compiled:.0f} ms")]
    rows += [(name, f"{t['value']} {t['direction']} {t['target']}: "
                    f"{'met' if t['met'] else 'NOT MET'}") for name, t in targets.items()]
    print_table(f"decode ({decode_path}) -> {path}", rows)


if __name__ == "__main__":
    main()
