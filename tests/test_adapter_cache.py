"""Adapter tiers, pins, off-thread loads, hot reload, rollback, retirement, stress."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from server.basemodel import load_base_model
from server.engine.request import GenerationRequest, GenerationResult
from server.engine.sampling import SamplingParams
from server.errors import AdapterCorrupt, AdapterNotFound
from server.formats.manifest import ADAPTER_WEIGHTS_FILE
from tests.adapter_fixtures import serve
from tests.lora_helpers import OracleRun, PeftOracle, assert_same_greedy
from tests.polling import wait_for
from tests.support import (
    ALL_TARGETS,
    add_manifest,
    make_random_adapter,
    publish,
    run_client_threads,
)


def assert_matches_reference(reference: OracleRun, result: GenerationResult) -> None:
    assert_same_greedy(reference.tokens, reference.margins(), result.token_ids)


@pytest.fixture(scope="module")
def library(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """64 random adapters of mixed ranks and targets on the tiny model."""
    out = tmp_path_factory.mktemp("library")
    return {
        f"a{i:02d}": make_random_adapter(
            tiny_model_dir, out / f"a{i:02d}", rank=(2, 4, 8, 16)[i % 4],
            targets=ALL_TARGETS if i % 3 else ("q_proj", "v_proj"), seed=1000 + i, b_std=0.5)
        for i in range(64)
    }


def _root_with(tmp_path: Path, library: dict[str, Path], names: list[str]) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    for name in names:
        shutil.copytree(library[name], root / name)
    return root


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["侬今朝吃饭伐?", "Where is my parcel?", "你食咗飯未呀?", "Refund order 4471 please",
             "阿拉明朝见", "The bill is wrong"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_stress_64_adapters_over_8_slots(tiny_model_dir, library, tmp_path, tokenizer):
    names = sorted(library)
    root = _root_with(tmp_path, library, names)
    served = serve(tiny_model_dir, root, max_loras=8, max_cpu_adapters=24)
    prompts = _prompts(tokenizer)
    try:
        oracle = PeftOracle(served.loaded.model.__class__.from_pretrained(tiny_model_dir),
                            library)
        # The 64 adapters really differ from each other.
        outputs = torch.stack([oracle.logits(prompts[0], n, 1.0) for n in names])
        distance = torch.cdist(outputs, outputs, p=float("inf"))
        assert float(distance[~torch.eye(64, dtype=torch.bool)].min()) >= 0.1

        rng = random.Random(7)
        jobs = [(rng.choice(names), rng.choice([0.5, 1.0, 1.5]), rng.randrange(len(prompts)))
                for _ in range(200)]
        references = {job: oracle.greedy(prompts[job[2]], job[0], job[1], 6) for job in set(jobs)}

        results: dict[int, GenerationResult] = {}
        errors: list[BaseException] = []

        def client(indexes: list[int]) -> None:
            try:
                handles = []
                for i in indexes:
                    name, scale, p = jobs[i]
                    lease = served.cache.lease(name)
                    handles.append((i, served.engine.submit(GenerationRequest(
                        prompts[p], SamplingParams(max_new_tokens=6), adapter=lease,
                        weight_scale=scale))))
                for i, handle in handles:
                    results[i] = handle.result(timeout=300)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        run_client_threads(client, 200, threads=8, timeout=600)
        assert not errors, errors[0]
        assert len(results) == 200
        for i, job in enumerate(jobs):
            assert_matches_reference(references[job], results[i])

        usage = served.cache.usage()
        assert usage["version_pins"] == 0 and usage["slot_pins"] == 0
        assert usage["slots_in_use"] <= 8 and usage["host_entries"] <= 24
        stats = served.cache.stats
        assert stats.device_evictions > 0 and stats.host_evictions > 0
        assert served.engine.stats()["free_kv_rows"] == 8
    finally:
        served.close()


def test_stress_small_on_the_default_model(default_model, tmp_path, tokenizer):
    base = Path(default_model.info.model_path)
    out = tmp_path / "made"
    library = {f"d{i}": make_random_adapter(base, out / f"d{i}", rank=(4, 8)[i % 2],
                                            targets=("q_proj", "v_proj"), seed=i)
               for i in range(6)}
    root = _root_with(tmp_path, library, sorted(library))
    served = serve("default", root, max_loras=3, max_cpu_adapters=6)
    prompts = _prompts(tokenizer)
    try:
        # PEFT injects its layers into the model it wraps: give it a copy of its own.
        oracle = PeftOracle(load_base_model("default", dtype="float32").model, library)
        rng = random.Random(3)
        jobs = [(rng.choice(sorted(library)), rng.choice([0.5, 1.0]), rng.randrange(6))
                for _ in range(16)]
        handles = [served.engine.submit(GenerationRequest(
            prompts[p], SamplingParams(max_new_tokens=4), adapter=served.cache.lease(n),
            weight_scale=s)) for n, s, p in jobs]
        for (n, s, p), handle in zip(jobs, handles, strict=True):
            assert_matches_reference(oracle.greedy(prompts[p], n, s, 4), handle.result(300))
        assert served.cache.usage()["version_pins"] == 0
    finally:
        served.close()


def test_loads_happen_off_the_engine_thread(tiny_model_dir, library, tmp_path, tokenizer):
    root = _root_with(tmp_path, library, ["a00", "a01"])
    served = serve(tiny_model_dir, root)
    try:
        slow_started = threading.Event()

        def delay(name: str) -> None:
            if name == "a01":
                slow_started.set()
                time.sleep(1.0)  # the injected slow disk: a fault, not a wait in the test

        served.cache.load_hook = delay
        busy = served.engine.submit(GenerationRequest(
            _prompts(tokenizer)[0], SamplingParams(max_new_tokens=200, ignore_eos=True),
            adapter=served.cache.lease("a00")))
        wait_for(lambda: served.engine.steps > 3)
        began = time.monotonic()
        lease = served.cache.lease("a01")  # blocks this thread for the injected second
        ended = time.monotonic()
        assert slow_started.is_set() and ended - began >= 1.0
        during = [s for s in served.engine.trace if began <= s.started_at <= ended]
        assert len(during) >= 10  # the engine kept stepping the other row meanwhile
        lease.release()
        busy.cancel()
        busy.result(60)
    finally:
        served.close()


def test_a_slow_adapter_root_never_stalls_the_engine(tiny_model_dir, library, tmp_path,
                                                      tokenizer, monkeypatch):
    """Listing adapters and looking up an unknown name scan the adapter roots; on a slow
    (network) file system each scan here takes 200 ms. Rows keep finishing and joining
    (each release and slot claim takes the cache's lock) while scans run: the engine
    keeps stepping through every scan."""
    root = _root_with(tmp_path, library, ["a00", "a01"])
    served = serve(tiny_model_dir, root, max_loras=2)
    scans: list[tuple[float, float]] = []
    real_names = served.store.names

    def slow_names() -> list[str]:
        began = time.monotonic()
        time.sleep(0.2)  # the injected slow file system, not a wait in the test
        names = real_names()
        scans.append((began, time.monotonic()))
        return names

    stop = threading.Event()
    errors: list[BaseException] = []

    def feed() -> None:  # short calls, so leases are released and slots claimed often
        handles = []
        try:
            for i in range(10_000):
                if stop.is_set():
                    break
                handles.append(served.engine.submit(GenerationRequest(
                    _prompts(tokenizer)[i % 6], SamplingParams(max_new_tokens=2),
                    adapter=served.cache.lease(("a00", "a01")[i % 2]))))
                if len(handles) >= 4:
                    handles.pop(0).result(60)
            for handle in handles:
                handle.result(60)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    feeder = threading.Thread(target=feed)
    try:
        feeder.start()
        wait_for(lambda: served.engine.steps > 10)
        monkeypatch.setattr(served.store, "names", slow_names)
        for _ in range(2):
            assert [info.name for info in served.cache.list_adapters()] == ["a00", "a01"]
        with pytest.raises(AdapterNotFound, match="no adapter named 'ghost'"):
            served.cache.lease("ghost")
        assert len(scans) == 3
        for began, ended in scans:
            during = [s for s in served.engine.trace if began <= s.started_at <= ended]
            assert len(during) >= 10, f"{len(during)} engine steps during a 200 ms scan"
    finally:
        stop.set()
        feeder.join(60)
        served.close()
    assert not errors, errors[0]
    assert served.cache.usage()["version_pins"] == 0


def test_concurrent_requests_for_a_cold_adapter_load_it_once(tiny_model_dir, library,
                                                             tmp_path):
    root = _root_with(tmp_path, library, ["a05"])
    served = serve(tiny_model_dir, root)
    try:
        calls: list[str] = []
        gate = threading.Event()

        def hook(name: str) -> None:
            calls.append(name)
            gate.wait(30)  # hold the load until all 8 callers are waiting on it

        served.cache.load_hook = hook
        leases = []
        threads = [threading.Thread(target=lambda: leases.append(served.cache.lease("a05")))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: served.cache.stats.host_misses == 8)
        gate.set()
        for thread in threads:
            thread.join(30)
        assert calls == ["a05"] and served.cache.stats.loads == 1
        assert len({lease.version for lease in leases}) == 1
        for lease in leases:
            lease.release()
    finally:
        served.close()


def test_a_cancelled_waiter_does_not_cancel_a_shared_queued_load(tiny_model_dir, library,
                                                                 tmp_path):
    """A request that goes away while its adapter's load is still queued (every loader
    thread busy) must not cancel the load the others share, nor poison the adapter."""
    root = _root_with(tmp_path, library, ["a06", "a07", "a08"])
    served = serve(tiny_model_dir, root)
    try:
        gate = threading.Event()
        served.cache.load_hook = lambda name: gate.wait(30) if name != "a08" else None
        busy = [threading.Thread(target=lambda n=n: served.cache.lease(n).release())
                for n in ("a06", "a07")]  # both loader threads held
        for thread in busy:
            thread.start()
        wait_for(lambda: served.cache.usage()["loading"] == 2)

        async def give_up() -> None:
            task = asyncio.ensure_future(served.cache.lease_async("a08"))
            await asyncio.sleep(0)  # the load of a08 is queued behind the held two
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(give_up())
        gate.set()
        served.cache.lease("a08", timeout=30).release()  # loads; not a cancelled future
        for thread in busy:
            thread.join(30)
        assert served.cache.usage()["version_pins"] == 0
    finally:
        served.close()


def test_requests_wait_for_a_slot_without_blocking_resident_adapters(
    tiny_model_dir, library, tmp_path, tokenizer
):
    root = _root_with(tmp_path, library, ["a00", "a01", "a02"])
    served = serve(tiny_model_dir, root, max_loras=2)
    prompts = _prompts(tokenizer)
    long = SamplingParams(max_new_tokens=120, ignore_eos=True)
    try:
        holders = [served.engine.submit(GenerationRequest(prompts[i], long,
                                                          adapter=served.cache.lease(n)))
                   for i, n in enumerate(["a00", "a01"])]
        wait_for(lambda: served.cache.usage()["slot_pins"] == 2)
        waiting = served.engine.submit(GenerationRequest(
            prompts[2], SamplingParams(max_new_tokens=4), adapter=served.cache.lease("a02")))
        resident = served.engine.submit(GenerationRequest(
            prompts[3], SamplingParams(max_new_tokens=4), adapter=served.cache.lease("a00")))
        assert resident.result(60).completion_tokens == 4  # passed the waiting request
        assert not waiting.done.is_set() and not any(h.done.is_set() for h in holders)
        holders[1].cancel()  # frees a01's slot
        result = waiting.result(60)
        assert result.completion_tokens == 4 and result.error is None
        holders[0].cancel()
        holders[0].result(60)
        assert served.cache.usage()["slot_pins"] == 0
    finally:
        served.close()


def test_hot_reload_in_flight_finish_on_old_new_get_new(
    tiny_model_dir, library, tmp_path, tokenizer
):
    root = tmp_path / "adapters"
    root.mkdir()
    served = serve(tiny_model_dir, root)
    fingerprint = served.loaded.base_fingerprint
    publish(library["a03"], root / "hot", fingerprint)
    prompts = _prompts(tokenizer)
    try:
        oracle = PeftOracle(served.loaded.model.__class__.from_pretrained(tiny_model_dir),
                            {"v1": library["a03"], "v2": library["a07"]})
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        v1_refs = [oracle.greedy(prompts[i % 6], "v1", 1.0, 40) for i in range(8)]
        old_version = served.cache.lease("hot")
        old_version.release()
        in_flight = [served.engine.submit(GenerationRequest(
            prompts[i % 6], params, adapter=served.cache.lease("hot"))) for i in range(8)]
        wait_for(lambda: served.cache.usage()["slot_pins"] == 8)

        publish(library["a07"], root / "hot", fingerprint)  # new weights, manifest last
        served.watcher.poll_now()
        wait_for(lambda: served.cache.info("hot").version != old_version.version)
        assert not all(h.done.is_set() for h in in_flight)  # swapped while decoding

        after = served.engine.submit(GenerationRequest(
            prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True),
            adapter=served.cache.lease("hot")))
        assert_matches_reference(oracle.greedy(prompts[0], "v2", 1.0, 10), after.result(60))
        for ref, handle in zip(v1_refs, in_flight, strict=True):
            assert_matches_reference(ref, handle.result(120))  # finished on the old version
        info = served.cache.info("hot")
        assert info.previous_version == old_version.version
        assert served.cache.usage()["slot_pins"] == 0

        # Rollback to the kept previous version.
        served.cache.reload("hot", version=old_version.version[:12])
        rolled = served.cache.lease("hot")
        assert rolled.version == old_version.version
        rolled.release()
    finally:
        served.close()


def test_folder_without_manifest_is_taken_once_stable(tiny_model_dir, library, tmp_path):
    root = _root_with(tmp_path, library, ["a04"])
    served = serve(tiny_model_dir, root)
    try:
        first = served.cache.lease("a04")
        first.release()
        shutil.copy(library["a08"] / ADAPTER_WEIGHTS_FILE, root / "a04" / ADAPTER_WEIGHTS_FILE)
        shutil.copy(library["a08"] / "adapter_config.json", root / "a04" / "adapter_config.json")
        served.watcher.poll_now()  # changed since the last poll: maybe still being written
        assert served.cache.stats.loads == 1
        served.watcher.poll_now()  # unchanged across two polls: accepted
        wait_for(lambda: served.cache.info("a04").version not in (None, first.version))
    finally:
        served.close()


def test_failed_reload_keeps_the_old_version(tiny_model_dir, library, tmp_path, tokenizer):
    root = tmp_path / "adapters"
    root.mkdir()
    served = serve(tiny_model_dir, root)
    publish(library["a02"], root / "keep", served.loaded.base_fingerprint)
    try:
        good = served.cache.lease("keep")
        good.release()
        # A complete publish of a broken adapter: the manifest matches the broken bytes.
        (root / "keep" / ADAPTER_WEIGHTS_FILE).write_bytes(b"broken")
        add_manifest(root / "keep", served.loaded.base_fingerprint)
        with pytest.raises(AdapterCorrupt):
            served.cache.reload("keep")
        info = served.cache.info("keep")
        assert info.version == good.version and "unreadable safetensors" in (info.error or "")
        lease = served.cache.lease("keep")
        assert lease.version == good.version
        result = served.engine.generate(GenerationRequest(
            _prompts(tokenizer)[0], SamplingParams(max_new_tokens=3), adapter=lease), 60)
        assert result.completion_tokens == 3
        served.watcher.poll_now()  # the same broken files are not retried on every poll
        assert served.cache.stats.load_failures == 1
    finally:
        served.close()


def test_removed_folder_retires_the_adapter(tiny_model_dir, library, tmp_path, tokenizer):
    root = _root_with(tmp_path, library, ["a06"])
    served = serve(tiny_model_dir, root)
    try:
        running = served.engine.submit(GenerationRequest(
            _prompts(tokenizer)[1], SamplingParams(max_new_tokens=30, ignore_eos=True),
            adapter=served.cache.lease("a06")))
        wait_for(lambda: served.cache.usage()["slot_pins"] == 1)
        shutil.rmtree(root / "a06")
        served.watcher.poll_now()
        with pytest.raises(AdapterNotFound, match="no adapter named 'a06'"):
            served.cache.lease("a06")
        assert running.result(60).completion_tokens == 30  # in flight: finished
        wait_for(lambda: served.cache.usage()["host_entries"] == 0)
    finally:
        served.close()


def test_unload_then_next_use_loads_again(tiny_model_dir, library, tmp_path):
    root = _root_with(tmp_path, library, ["a09", "a11"])
    served = serve(tiny_model_dir, root)
    try:
        assert served.cache.preload(["a09", "a11", "missing"]) == {
            "missing": "no adapter named 'missing' (available: a09, a11)"}
        assert served.cache.info("a09").tier == "host"
        served.cache.unload("a09")
        assert served.cache.info("a09").tier == "disk"
        served.cache.lease("a09").release()
        assert served.cache.stats.loads == 3
        listing = {info.name: info for info in served.cache.list_adapters()}
        assert set(listing) == {"a09", "a11"}
        assert listing["a11"].rank == 16 and listing["a11"].pinned == 0
        assert listing["a11"].targets == tuple(sorted(ALL_TARGETS))
    finally:
        served.close()


def test_the_servers_poller_picks_up_a_publish(tiny_model_dir, library, tmp_path):
    from tests.service_fixtures import server_config, start_server

    root = tmp_path / "adapters"
    root.mkdir()
    fingerprint = load_base_model(tiny_model_dir).base_fingerprint
    publish(library["a12"], root / "live", fingerprint)
    routing = tmp_path / "routing.yaml"
    routing.write_text("default: base\n")
    server = start_server(server_config(tiny_model_dir, root, routing, metrics_port=-1,
                                        poll_interval_s=0.05))
    try:
        first = server.cache.info("live").version
        assert first is not None
        publish(library["a13"], root / "live", fingerprint)
        wait_for(lambda: server.cache.info("live").version not in (None, first))
        assert server.cache.info("live").previous_version == first
    finally:
        server.stop()


def test_held_adapters_follow_a_residency_decided_elsewhere(tiny_model_dir, library, tmp_path):
    """A cluster replica: Ray Serve's multiplexing LRU decides which adapters stay, the
    cache follows (``hold``/``let_go``), and a slot in use is never taken."""
    names = ["a00", "a01", "a02", "a03"]
    served = serve(tiny_model_dir, _root_with(tmp_path, library, names), max_loras=2,
                   max_cpu_adapters=2)
    cache = served.cache

    def use(name: str, keep: bool = False):
        lease = cache.lease(name, timeout=30)
        assert lease.try_acquire_slot() is not None
        if not keep:
            lease.release()
        return lease

    try:
        cache.hold(["a00"])
        for name in names:  # a00 is the least recently used, but held
            use(name)
        tiers = {name: cache.info(name).tier for name in names}
        assert tiers["a00"] == "device", tiers  # neither its slot nor its host copy went
        assert tiers["a01"] == "disk" and tiers["a03"] == "device"
        assert cache.held() == ["a00"]

        running = use("a03", keep=True)  # a call holds a03's slot
        cache.let_go(["a00"])
        assert cache.held() == [] and cache.info("a00").tier == "device"  # kept until needed
        use("a02")  # a slot is needed: the let-go adapter's, not the one in use
        assert cache.info("a00").tier != "device"
        assert cache.info("a03").tier == "device"
        running.release()
    finally:
        served.close()
