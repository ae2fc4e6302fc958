"""Durable delivery state in Redis: subscriptions, the delivery ledger, dead letters, replay opt-ins.

Keys (``p`` is ``redis.key_prefix``):
    p:subs                      hash  subscription id -> Subscription JSON
    p:deliver:done:<sub>:<id>   str   outcome of an acknowledged/dead-lettered/coalesced delivery (TTL)
    p:deliver:dead:<sub>        hash  delivery id -> DeadDelivery JSON (at most max_dead_letters)
    p:deliver:deadidx:<sub>     zset  delivery id by failed_at: the oldest dead letters go first
    p:deliver:owed:<sub>        zset  dead letters redriven by the worker itself (circuit_open, backlog_full)
    p:deliver:state:<sub>       hash  camera id -> newest transition delivered {"at", "status", "event_id"}
    p:deliver:rate:<sub>        hash  camera id -> {"last": event time, "coalesced": n}
    p:replay:alerts             set   replay sessions whose events may reach subscriptions
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from pipeline.logging import get_logger
from schemas.subscriptions import DeadDelivery, Subscription

log = get_logger(__name__)


class SubscriptionStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = f"{prefix}:subs"

    def put(self, sub: Subscription) -> None:
        self._client.hset(self._key, sub.id, sub.model_dump_json())

    def add(self, sub: Subscription) -> None:
        """Create; an existing id is an error so a typo cannot overwrite another subscription."""
        if not self._client.hsetnx(self._key, sub.id, sub.model_dump_json()):
            raise ValueError(f"subscription {sub.id!r} already exists (remove it first)")

    def get(self, sub_id: str) -> Subscription:
        raw = self._client.hget(self._key, sub_id)
        if raw is None:
            raise KeyError(f"no subscription {sub_id!r}")
        return Subscription.model_validate_json(raw)

    def remove(self, sub_id: str) -> bool:
        return bool(self._client.hdel(self._key, sub_id))

    def all(self) -> dict[str, Subscription]:
        """Every stored subscription; an unreadable entry is logged and left out, not fatal."""
        subs: dict[str, Subscription] = {}
        for raw_id, raw in self._client.hgetall(self._key).items():
            sub_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            try:
                subs[sub_id] = Subscription.model_validate_json(raw)
            except ValidationError as exc:
                log.error("subscription_unreadable", subscription=sub_id, error=str(exc)[:300])
        return dict(sorted(subs.items()))


@dataclass(frozen=True)
class RateState:
    last: float | None
    coalesced: int


class DeliveryLedger:
    """What happened to each (subscription, delivery id), so restarts neither lose nor re-send."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float = 7 * 24 * 3600.0,
                 max_dead: int = 10_000) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self.max_dead = max_dead

    def _done_key(self, sub_id: str, delivery_id: str) -> str:
        return f"{self._prefix}:deliver:done:{sub_id}:{delivery_id}"

    def _dead_key(self, sub_id: str) -> str:
        return f"{self._prefix}:deliver:dead:{sub_id}"

    def _rate_key(self, sub_id: str) -> str:
        return f"{self._prefix}:deliver:rate:{sub_id}"

    def _index_key(self, sub_id: str) -> str:
        return f"{self._prefix}:deliver:deadidx:{sub_id}"

    def _owed_key(self, sub_id: str) -> str:
        return f"{self._prefix}:deliver:owed:{sub_id}"

    # -- queries -------------------------------------------------------------------------------
    def outcome(self, sub_id: str, delivery_id: str) -> str | None:
        raw = self._client.get(self._done_key(sub_id, delivery_id))
        return raw.decode() if raw is not None else None

    def rate(self, sub_id: str, camera_id: str) -> RateState:
        raw = self._client.hget(self._rate_key(sub_id), camera_id)
        if raw is None:
            return RateState(None, 0)
        data = json.loads(raw)
        return RateState(data.get("last"), int(data.get("coalesced", 0)))

    def pending_coalesced(self, sub_id: str) -> dict[str, int]:
        """Per camera, messages held back by the rate limit and not yet reported in a message."""
        out: dict[str, int] = {}
        for cam, raw in self._client.hgetall(self._rate_key(sub_id)).items():
            count = int(json.loads(raw).get("coalesced", 0))
            if count:
                out[cam.decode()] = count
        return out

    def dead_count(self, sub_id: str) -> int:
        return int(self._client.hlen(self._dead_key(sub_id)))

    def owed(self, sub_id: str, limit: int = 50) -> list[DeadDelivery]:
        """The oldest dead letters the worker redrives by itself once the subscriber answers again."""
        ids = [i.decode() for i in self._client.zrange(self._owed_key(sub_id), 0, limit - 1)]
        if not ids:
            return []
        raws = self._client.hmget(self._dead_key(sub_id), ids)
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:  # redriven by hand or evicted meanwhile
            self._client.zrem(self._owed_key(sub_id), *gone)
        return [DeadDelivery.model_validate_json(raw) for raw in raws if raw is not None]

    def dead(self, sub_id: str) -> list[DeadDelivery]:
        entries = [DeadDelivery.model_validate_json(raw) for raw in self._client.hvals(self._dead_key(sub_id))]
        return sorted(entries, key=lambda d: d.failed_at)

    # -- transitions: each is one MULTI so a crash never leaves half of it --------------------
    def record_coalesced(self, sub_id: str, camera_id: str, delivery_id: str, state: RateState) -> None:
        """Hold a message back; ``state`` is the camera's rate state the decision was made on."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._rate_key(sub_id), camera_id,
                  json.dumps({"last": state.last, "coalesced": state.coalesced + 1}))
        pipe.set(self._done_key(sub_id, delivery_id), "coalesced", px=self._ttl_ms)
        pipe.execute()

    def record_sent(self, sub_id: str, camera_id: str, delivery_id: str, at: float | None,
                    dead: DeadDelivery | None = None, owed: bool = False) -> None:
        """A message left (or was dead-lettered): it counts for the rate limit and is never re-sent.

        ``owed``: a dead letter the worker redrives by itself when the subscriber is back.
        """
        pipe = self._client.pipeline(transaction=True)
        if at is not None:
            pipe.hset(self._rate_key(sub_id), camera_id, json.dumps({"last": at, "coalesced": 0}))
        if dead is not None:
            pipe.hset(self._dead_key(sub_id), delivery_id, dead.model_dump_json())
            pipe.zadd(self._index_key(sub_id), {delivery_id: dead.failed_at})
            if owed:
                pipe.zadd(self._owed_key(sub_id), {delivery_id: dead.failed_at})
        pipe.set(self._done_key(sub_id, delivery_id), "dead" if dead else "delivered", px=self._ttl_ms)
        pipe.execute()
        if dead is not None:
            self._cap_dead(sub_id)

    def _cap_dead(self, sub_id: str) -> None:
        """Keep at most ``max_dead`` dead letters (counted with HLEN); the oldest go, with a log line."""
        excess = self.dead_count(sub_id) - self.max_dead
        if excess <= 0:
            return
        dropped = [i.decode() for i, _ in self._client.zpopmin(self._index_key(sub_id), excess)]
        if dropped:
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(self._dead_key(sub_id), *dropped)
            pipe.zrem(self._owed_key(sub_id), *dropped)
            pipe.execute()
            log.error("dead_letters_evicted", subscription=sub_id, count=len(dropped), cap=self.max_dead,
                      oldest=dropped[0])

    def redriven(self, sub_id: str, delivery_id: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._dead_key(sub_id), delivery_id)
        pipe.zrem(self._index_key(sub_id), delivery_id)
        pipe.zrem(self._owed_key(sub_id), delivery_id)
        pipe.set(self._done_key(sub_id, delivery_id), "delivered", px=self._ttl_ms)
        pipe.execute()

    def update_dead(self, dead: DeadDelivery, owed: bool | None = None) -> None:
        """Store a dead letter again after a failed redrive; ``owed`` False stops the worker's own redrives."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._dead_key(dead.subscription_id), dead.delivery_id, dead.model_dump_json())
        if owed is False:
            pipe.zrem(self._owed_key(dead.subscription_id), dead.delivery_id)
        pipe.execute()

    def forget(self, sub_id: str) -> None:
        """Drop a removed subscription's dead letters and rate state (done markers expire)."""
        self._client.delete(self._dead_key(sub_id), self._rate_key(sub_id), self._index_key(sub_id),
                            self._owed_key(sub_id), f"{self._prefix}:deliver:state:{sub_id}")


@dataclass(frozen=True)
class CameraTransition:
    at: float
    status: str
    event_id: str


class CameraStates:
    """Per subscription and camera, the newest transition delivered, for channels that carry the
    present (MQTT retained state, OPC UA reject signal): a late or redriven old transition must not
    overwrite a newer one."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    def _key(self, sub_id: str) -> str:
        return f"{self._prefix}:deliver:state:{sub_id}"

    def advance(self, sub_id: str, camera_id: str, new: CameraTransition) -> tuple[CameraTransition, bool]:
        """(the newest transition now, whether ``new`` is it). One lane per subscription writes."""
        raw = self._client.hget(self._key(sub_id), camera_id)
        if raw is not None:
            old = CameraTransition(**json.loads(raw))
            # Same time: a closing message sorts after the opening of the same event.
            if (old.at, old.status == "closed") > (new.at, new.status == "closed"):
                return old, False
        self._client.hset(self._key(sub_id), camera_id, json.dumps(new.__dict__))
        return new, True


class ReplayAlerts:
    """Replay sessions started with ``--alerts``: only their events may reach subscriptions."""

    def __init__(self, client: redis.Redis, prefix: str, cache_s: float = 2.0) -> None:
        self._client = client
        self._key = f"{prefix}:replay:alerts"
        self._cache_s = cache_s
        self._enabled: set[str] = set()
        self._not_enabled: dict[str, float] = {}

    def enable(self, session: str) -> None:
        self._client.sadd(self._key, session)

    def enabled(self, session: str) -> bool:
        # Opting in is one-way, so positives are cached for good; negatives only briefly, so a
        # session is read once per few seconds rather than once per event.
        if session in self._enabled:
            return True
        checked = self._not_enabled.get(session)
        if checked is not None and time.monotonic() - checked < self._cache_s:
            return False
        if self._client.sismember(self._key, session):
            self._enabled.add(session)
            self._not_enabled.pop(session, None)
            return True
        self._not_enabled[session] = time.monotonic()
        return False
