"""Redis-backed state: the shared prompt-embedding cache and calibrated per-class thresholds."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from pipeline.config import RedisSettings
from pipeline.engine.prompt_cache import ArrayBundle, MemoryCache, decode_bundle, encode_bundle
from pipeline.logging import get_logger
from pipeline.metrics import PROMPT_CACHE

log = get_logger(__name__)

PROMPT_TTL_S = 30 * 24 * 3600.0

# Delete the lock only if we still own it: an expired lock may already belong to another worker.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def connect(settings: RedisSettings) -> redis.Redis:
    """A bytes-in/bytes-out client; one quick retry so an absent server fails fast."""
    if not settings.url:
        raise ValueError("redis.url is not set (embed a server with pipeline.embedded.EmbeddedRedis)")
    return redis.Redis.from_url(
        settings.url,
        decode_responses=False,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        health_check_interval=30,
    )


class RedisPromptCache:
    """Two-tier PromptCache: process LRU, then Redis shared by every worker.

    On a shared miss one worker computes under a Redis lock while the others poll for its result.
    Redis trouble never propagates: the bundle is computed locally instead (errors from
    ``compute`` itself do propagate).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        lock_timeout_s: float = 120.0,
        local: MemoryCache | None = None,
        poll_interval_s: float = 0.05,
        ttl_s: float | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._lock_timeout_s = lock_timeout_s
        self._local = local if local is not None else MemoryCache()
        self._poll_s = poll_interval_s
        self._ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self._release = client.register_script(_RELEASE_LUA)
        self._warned: set[str] = set()
        self._mutex = threading.Lock()
        self.computed = 0

    @classmethod
    def from_settings(cls, settings: RedisSettings, local: MemoryCache | None = None) -> RedisPromptCache:
        # Entries expire so classes seen once (or only from hostile headers) do not stay for ever;
        # an expired entry is simply computed again.
        return cls(connect(settings), settings.key_prefix, settings.lock_timeout_s, local, ttl_s=PROMPT_TTL_S)

    def redis_key(self, key: str) -> str:
        return f"{self._prefix}:{key}"

    def get_or_compute(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle:
        value = self._local.get(key)
        PROMPT_CACHE.labels(tier="memory", outcome="hit" if value is not None else "miss").inc()
        if value is not None:
            return value
        try:
            value = self._shared(key, compute)
        except RedisError as exc:
            self._warn_once(key, exc)
            value = None
        if value is None:
            value = self._compute(compute)
        self._local.put(key, value)
        return value

    # -- internals ----------------------------------------------------------------------------
    def _compute(self, compute: Callable[[], ArrayBundle]) -> ArrayBundle:
        value = compute()
        with self._mutex:
            self.computed += 1
        return value

    def _fetch(self, vkey: str) -> ArrayBundle | None:
        data = self._client.get(vkey)
        if data is None:
            return None
        try:
            return decode_bundle(bytes(data))
        except ValueError as exc:
            # A corrupt entry is a miss; the next SET overwrites it.
            log.warning("prompt_cache_corrupt_entry", key=vkey, error=str(exc))
            return None

    def _shared(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle | None:
        """The Redis tier; None means "compute locally". Raises RedisError only before computing."""
        vkey = self.redis_key(key)
        lock_key = f"{vkey}:lock"
        value = self._fetch(vkey)
        PROMPT_CACHE.labels(tier="redis", outcome="hit" if value is not None else "miss").inc()
        if value is not None:
            return value
        # A few rounds: if a lock holder dies, one of the waiters takes over the computation.
        for _ in range(3):
            token = uuid.uuid4().hex
            if self._client.set(lock_key, token, nx=True, px=int(self._lock_timeout_s * 1000)):
                return self._compute_and_publish(vkey, lock_key, token, compute)
            value = self._wait_for(vkey, lock_key)
            if value is not None:
                PROMPT_CACHE.labels(tier="redis", outcome="hit").inc()
                return value
        return None

    def _compute_and_publish(
        self, vkey: str, lock_key: str, token: str, compute: Callable[[], ArrayBundle]
    ) -> ArrayBundle:
        try:
            value = self._compute(compute)
            try:
                self._client.set(vkey, encode_bundle(value), px=self._ttl_ms)
            except RedisError as exc:
                self._warn_once(vkey, exc)
            return value
        finally:
            try:
                self._release(keys=[lock_key], args=[token])
            except RedisError as exc:
                # The lock expires on its own after lock_timeout_s.
                self._warn_once(lock_key, exc)

    def _wait_for(self, vkey: str, lock_key: str) -> ArrayBundle | None:
        deadline = time.monotonic() + self._lock_timeout_s + 1.0
        while time.monotonic() < deadline:
            time.sleep(self._poll_s)
            value = self._fetch(vkey)
            if value is not None:
                return value
            if not self._client.exists(lock_key):
                # The holder set the value before releasing, so look once more.
                return self._fetch(vkey)
        return None

    def _warn_once(self, key: str, exc: BaseException) -> None:
        with self._mutex:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning("prompt_cache_redis_unavailable", key=key, error=repr(exc), fallback="local compute")


class ThresholdStore:
    """Calibrated per-product-class thresholds in one Redis hash, plus JSON metadata per class."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = f"{prefix}:thresholds"
        self._meta_key = f"{prefix}:thresholds:meta"

    def get(self, product_class: str) -> float | None:
        raw = self._client.hget(self._key, product_class)
        return float(raw) if raw is not None else None

    def set(self, product_class: str, value: float, meta: dict[str, Any] | None = None) -> None:
        record = {**(meta or {}), "threshold": float(value), "updated_ts": time.time()}
        pipe = self._client.pipeline(transaction=True)  # value and metadata change together
        pipe.hset(self._key, product_class, repr(float(value)))
        pipe.hset(self._meta_key, product_class, json.dumps(record, default=str))
        pipe.execute()
        log.info("threshold_set", product_class=product_class, threshold=float(value))

    def meta(self, product_class: str) -> dict[str, Any] | None:
        raw = self._client.hget(self._meta_key, product_class)
        return json.loads(raw) if raw is not None else None

    def all(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self._client.hgetall(self._key).items()}
