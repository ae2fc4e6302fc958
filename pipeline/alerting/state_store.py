"""Where camera debounce states and thresholds live: small protocols, Redis and in-memory.

Redis key layout: ``{prefix}:alert:state:{camera_id}:{session}`` where session is the replay
session id or ``live`` (camera ids cannot contain ``:``, see ``CAMERA_ID_PATTERN``), and a
partition index ``{prefix}:alert:partition:{topic}:{partition}``: a set of the state keys whose
scores arrive on that partition, so a worker taking the partition over loads their states (and
closes their open events) without waiting for another score.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import redis

from pipeline.alerting.debounce import CameraState
from pipeline.logging import get_logger

log = get_logger(__name__)

StateKey = tuple[str, str | None]
LIVE = "live"
# Index entries expire with the states: a camera silent this long is forgotten by the index too.
DEFAULT_TTL_S = 7 * 24 * 3600.0  # alert.state_ttl_s
INDEX_TTL_S = DEFAULT_TTL_S


class StateStore(Protocol):
    def load_many(self, keys: Sequence[StateKey]) -> dict[StateKey, CameraState]: ...

    def save_many(self, states: Iterable[CameraState]) -> int: ...

    def index(self, partition: str, keys: Iterable[StateKey]) -> None:
        """Remember that ``keys`` arrive on ``partition`` (``topic:number``)."""

    def indexed(self, partition: str) -> list[StateKey]:
        """Every state key remembered for ``partition``."""


class Thresholds(Protocol):
    def get(self, product_class: str) -> float | None: ...

    def all(self) -> Mapping[str, float]: ...


class MemoryThresholds:
    """Thresholds from a dict (rescore, tests)."""

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self._values = dict(values or {})

    def get(self, product_class: str) -> float | None:
        return self._values.get(product_class)

    def all(self) -> Mapping[str, float]:
        return dict(self._values)


class MemoryStateStore:
    """States in this process, serialized like in Redis so a load never aliases a cached state."""

    def __init__(self) -> None:
        self._states: dict[StateKey, str] = {}
        self._index: dict[str, set[StateKey]] = {}
        self._lock = threading.Lock()

    def load_many(self, keys: Sequence[StateKey]) -> dict[StateKey, CameraState]:
        with self._lock:
            raws = {k: self._states.get(k) for k in keys}
        return {k: CameraState.from_dict(json.loads(raw)) for k, raw in raws.items() if raw is not None}

    def save_many(self, states: Iterable[CameraState]) -> int:
        n = 0
        with self._lock:
            for state in states:
                self._states[state.key] = json.dumps(state.to_dict())
                n += 1
        return n

    def index(self, partition: str, keys: Iterable[StateKey]) -> None:
        with self._lock:
            self._index.setdefault(partition, set()).update(keys)

    def indexed(self, partition: str) -> list[StateKey]:
        with self._lock:
            return sorted(self._index.get(partition, ()), key=lambda k: (k[0], k[1] or ""))


class CameraStateStore:
    """Load and save many camera states in one round trip each (MGET / pipelined SET)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float | None = DEFAULT_TTL_S) -> None:
        self._client = client
        self._prefix = f"{prefix}:alert:state"
        self._index_prefix = f"{prefix}:alert:partition"
        # Expiry so states of retired cameras and finished replay sessions do not pile up forever;
        # every save renews it, so only a camera silent that long starts afresh.
        self._ttl_ms = int(ttl_s * 1000) if ttl_s else None

    def redis_key(self, key: StateKey) -> str:
        camera_id, session = key
        return f"{self._prefix}:{camera_id}:{session if session is not None else LIVE}"

    def load_many(self, keys: Sequence[StateKey]) -> dict[StateKey, CameraState]:
        """States found for ``keys``; absent or unreadable ones are simply missing from the result."""
        if not keys:
            return {}
        raws = self._client.mget([self.redis_key(k) for k in keys])
        out: dict[StateKey, CameraState] = {}
        for key, raw in zip(keys, raws, strict=True):
            if raw is None:
                continue
            try:
                state = CameraState.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError) as exc:
                # Starting fresh beats wedging the camera; the next save overwrites the bad value.
                log.error("alert_state_unreadable", camera=key[0], session=key[1], error=repr(exc))
                continue
            if state.key != key:
                log.error("alert_state_key_mismatch", camera=key[0], session=key[1], stored=state.key)
                continue
            out[key] = state
        return out

    def load(self, key: StateKey) -> CameraState | None:
        return self.load_many([key]).get(key)

    def save_many(self, states: Iterable[CameraState]) -> int:
        """Write states in one pipelined round trip; returns how many were written."""
        pipe = self._client.pipeline(transaction=False)
        n = 0
        for state in states:
            pipe.set(self.redis_key(state.key), json.dumps(state.to_dict(), separators=(",", ":")),
                     px=self._ttl_ms)
            n += 1
        if n:
            pipe.execute()
        return n

    def save(self, state: CameraState) -> None:
        self.save_many([state])

    def delete(self, key: StateKey) -> None:
        self._client.delete(self.redis_key(key))

    def index(self, partition: str, keys: Iterable[StateKey]) -> None:
        members = [_member(k) for k in keys]
        if not members:
            return
        name = f"{self._index_prefix}:{partition}"
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(name, *members)
        pipe.expire(name, int(INDEX_TTL_S))
        pipe.execute()

    def indexed(self, partition: str) -> list[StateKey]:
        out: list[StateKey] = []
        for raw in self._client.smembers(f"{self._index_prefix}:{partition}"):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            camera, _, session = text.partition(":")
            out.append((camera, None if session == LIVE else session))
        return sorted(out, key=lambda k: (k[0], k[1] or ""))


def _member(key: StateKey) -> str:
    return f"{key[0]}:{key[1] if key[1] is not None else LIVE}"
