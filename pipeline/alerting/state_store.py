"""Camera debounce states in Redis: one JSON value per camera and session.

Key layout: ``{prefix}:alert:state:{camera_id}:{session}`` where session is the replay session id
or ``live``. Camera ids cannot contain ``:`` (see ``CAMERA_ID_PATTERN``), so the key parses back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import redis

from pipeline.alerting.debounce import CameraState
from pipeline.logging import get_logger

log = get_logger(__name__)

StateKey = tuple[str, str | None]
LIVE = "live"
DEFAULT_TTL_S = 7 * 24 * 3600.0  # alert.state_ttl_s


class CameraStateStore:
    """Load and save many camera states in one round trip each (MGET / pipelined SET)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float | None = DEFAULT_TTL_S) -> None:
        self._client = client
        self._prefix = f"{prefix}:alert:state"
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
