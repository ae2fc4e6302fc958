"""Redis prompt cache and threshold store against a real server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from pipeline.config import RedisSettings
from pipeline.embedded import free_port
from pipeline.engine.prompt_cache import ArrayBundle, MemoryCache, cache_key, decode_bundle
from pipeline.redis_store import RedisPromptCache, ThresholdStore, connect

KEY = cache_key("ball_screw", "winclip", "v1", "fp-abc")


def _bundle() -> ArrayBundle:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.standard_normal((7, 640)).astype(np.float16),
        "abnormal": rng.standard_normal((3, 5, 640)).astype(np.float32),
        "ids": np.arange(9, dtype=np.int64),
    }


def _assert_same(a: ArrayBundle, b: ArrayBundle) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name])


def _never() -> ArrayBundle:
    raise AssertionError("compute must not be called")


def _hits(tier: str) -> float:
    return REGISTRY.get_sample_value("linewatch_prompt_cache_total", {"tier": tier, "outcome": "hit"}) or 0.0


def _cache(settings: RedisSettings, local: MemoryCache | None = None) -> RedisPromptCache:
    local = local if local is not None else MemoryCache()
    return RedisPromptCache(connect(settings), settings.key_prefix, settings.lock_timeout_s, local)


def test_value_is_shared_through_redis(redis_settings: RedisSettings, redis_client: redis.Redis) -> None:
    expected = _bundle()
    worker_a = _cache(redis_settings)
    got = worker_a.get_or_compute(KEY, _bundle)
    assert worker_a.computed == 1
    _assert_same(got, expected)

    stored = redis_client.get(f"{redis_settings.key_prefix}:{KEY}")
    assert stored is not None
    _assert_same(decode_bundle(stored), expected)
    assert not redis_client.exists(f"{redis_settings.key_prefix}:{KEY}:lock")

    # Another "worker" with an empty memory tier reuses the Redis value.
    redis_before = _hits("redis")
    worker_b = _cache(redis_settings)
    _assert_same(worker_b.get_or_compute(KEY, _never), expected)
    assert worker_b.computed == 0
    assert _hits("redis") - redis_before == 1

    # And the memory tier answers without Redis once warm.
    redis_client.delete(f"{redis_settings.key_prefix}:{KEY}")
    memory_before = _hits("memory")
    _assert_same(worker_b.get_or_compute(KEY, _never), expected)
    assert _hits("memory") - memory_before == 1


def test_concurrent_workers_compute_once(redis_settings: RedisSettings) -> None:
    calls = 0
    calls_lock = threading.Lock()

    def slow() -> ArrayBundle:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.5)
        return _bundle()

    workers = [_cache(redis_settings) for _ in range(6)]
    start = threading.Barrier(len(workers))
    results: list[ArrayBundle] = []

    def run(cache: RedisPromptCache) -> None:
        start.wait()
        results.append(cache.get_or_compute(KEY, slow))

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert calls == 1
    assert sum(w.computed for w in workers) == 1
    assert len(results) == len(workers)
    for r in results:
        _assert_same(r, _bundle())


def test_waiter_takes_over_when_lock_holder_dies(
    redis_settings: RedisSettings, redis_client: redis.Redis
) -> None:
    # A crashed worker left its lock behind; it expires after 400 ms.
    redis_client.set(f"{redis_settings.key_prefix}:{KEY}:lock", b"dead-worker", px=400)
    cache = _cache(redis_settings)
    started = time.monotonic()
    _assert_same(cache.get_or_compute(KEY, _bundle), _bundle())
    assert cache.computed == 1
    assert time.monotonic() - started >= 0.3
    assert redis_client.exists(f"{redis_settings.key_prefix}:{KEY}")


def test_compute_error_propagates_and_frees_the_lock(
    redis_settings: RedisSettings, redis_client: redis.Redis
) -> None:
    cache = _cache(redis_settings)

    def broken() -> ArrayBundle:
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        cache.get_or_compute(KEY, broken)
    assert not redis_client.exists(f"{redis_settings.key_prefix}:{KEY}:lock")
    _assert_same(cache.get_or_compute(KEY, _bundle), _bundle())


def test_redis_down_computes_locally_and_warns_once_per_key() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = RedisSettings(url=url, key_prefix="down", socket_timeout_s=0.5)
    # One-entry LRU forces key 1 back to Redis after key 2 evicts it.
    cache = _cache(settings, MemoryCache(max_entries=1))
    started = time.monotonic()
    with capture_logs() as logs:
        first = cache.get_or_compute("k1", _bundle)
        cache.get_or_compute("k2", _bundle)
        cache.get_or_compute("k1", _bundle)
    assert time.monotonic() - started < 5
    _assert_same(first, _bundle())
    assert cache.computed == 3
    warnings = [e for e in logs if e["event"] == "prompt_cache_redis_unavailable"]
    assert sorted(e["key"] for e in warnings) == ["k1", "k2"]
    assert all(e["log_level"] == "warning" for e in warnings)


def test_threshold_store_round_trip(redis_settings: RedisSettings, redis_client: redis.Redis) -> None:
    store = ThresholdStore(redis_client, redis_settings.key_prefix)
    assert store.get("ball_screw") is None
    assert store.all() == {}
    store.set("ball_screw", 0.4375, {"n_normal": 50, "quantile": 0.995})
    store.set("pcb", 0.61, {})
    assert store.get("ball_screw") == 0.4375
    assert store.all() == {"ball_screw": 0.4375, "pcb": 0.61}
    meta = store.meta("ball_screw")
    assert meta is not None and meta["n_normal"] == 50 and meta["threshold"] == 0.4375
    # Another worker sees the same values.
    other = ThresholdStore(connect(redis_settings), redis_settings.key_prefix)
    assert other.get("pcb") == 0.61
