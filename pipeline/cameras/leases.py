"""Camera leases in Redis: at most one capture worker captures a camera at any time.

A lease is ``SET key "<owner>|<token>" NX PX lease_ms``. The token comes from a counter that only
grows (a fencing token: every grant of a lease gets a larger one), and renewal and release are Lua
scripts that act only while the key still holds the caller's own value, so a worker whose lease
expired and went to another one can neither extend nor delete the new holder's lease.

The holder also fences itself: it counts a lease as valid only until ``lease_s`` minus a safety
margin after the moment it *sent* its last successful acquire or renew. Redis expires the key
``lease_s`` after it *received* that command, so the holder always stops capturing before another
worker can acquire the camera (clock rates agree far better than the margin).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

# KEYS[1] lease key, KEYS[2] fencing counter; ARGV[1] owner, ARGV[2] lease ms.
# Returns the token when the caller holds the lease afterwards (new grant, or its own lease extended).
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  if sep and string.sub(current, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(current, sep + 1))
  end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

# KEYS[1] lease key; ARGV[1] "<owner>|<token>", ARGV[2] lease ms. 1 when renewed, 0 when lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass
class Lease:
    camera_id: str
    owner: str
    token: int
    # time.monotonic() until which the holder may act on the lease.
    valid_until: float

    @property
    def value(self) -> str:
        return f"{self.owner}|{self.token}"

    def valid(self) -> bool:
        return time.monotonic() < self.valid_until


class LeaseManager:
    """Acquire, renew and release camera leases for one owner (a capture worker)."""

    def __init__(self, client: redis.Redis, prefix: str, owner: str, lease_s: float,
                 safety: float = 0.2) -> None:
        if "|" in owner:
            raise ValueError(f"lease owner must not contain '|': {owner!r}")
        self._client = client
        self._prefix = prefix
        self.owner = owner
        self.lease_s = lease_s
        self._lease_ms = int(lease_s * 1000)
        # The holder gives up this fraction of the lease early (network delay, scheduling, clock rate).
        self._valid_s = lease_s * (1.0 - safety)
        self._fence_key = f"{prefix}:camera-lease-token"
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def key(self, camera_id: str) -> str:
        return f"{self._prefix}:camera-lease:{camera_id}"

    def acquire(self, camera_id: str) -> Lease | None:
        sent = time.monotonic()
        token = self._acquire(keys=[self.key(camera_id), self._fence_key], args=[self.owner, self._lease_ms])
        if token is None:
            return None
        return Lease(camera_id, self.owner, int(token), sent + self._valid_s)

    def renew(self, lease: Lease) -> bool:
        """Extend the lease; False when it is lost (expired and possibly taken by another worker)."""
        sent = time.monotonic()
        if self._renew(keys=[self.key(lease.camera_id)], args=[lease.value, self._lease_ms]) == 1:
            lease.valid_until = sent + self._valid_s
            return True
        lease.valid_until = 0.0
        return False

    def release(self, lease: Lease) -> bool:
        lease.valid_until = 0.0
        return self._release(keys=[self.key(lease.camera_id)], args=[lease.value]) == 1

    def holders(self, camera_ids: list[str]) -> dict[str, tuple[str, int] | None]:
        """Who holds each camera's lease now (owner, token), or None."""
        if not camera_ids:
            return {}
        raw = self._client.mget([self.key(c) for c in camera_ids])
        out: dict[str, tuple[str, int] | None] = {}
        for cid, value in zip(camera_ids, raw, strict=True):
            if value is None:
                out[cid] = None
            else:
                owner, _, token = value.decode().rpartition("|")
                out[cid] = (owner, int(token))
        return out


class WorkerDirectory:
    """Capture workers alive now (heartbeats in a sorted set), for sharing cameras fairly."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float) -> None:
        self._client = client
        self._key = f"{prefix}:capture-workers"
        self._ttl_s = ttl_s

    def beat(self, worker: str) -> None:
        now = time.time()
        pipe = self._client.pipeline(transaction=True)
        pipe.zadd(self._key, {worker: now})
        pipe.zremrangebyscore(self._key, "-inf", now - self._ttl_s)
        pipe.execute()

    def leave(self, worker: str) -> None:
        self._client.zrem(self._key, worker)

    def alive(self) -> list[str]:
        return sorted(m.decode() for m in self._client.zrangebyscore(self._key, time.time() - self._ttl_s, "+inf"))


class FixedClaims:
    """Cameras a fixed capture worker (``--camera``, ``linewatch run``: no leases) captures now.

    One key per camera, set by the worker every round and lapsing ``ttl_s`` after its last one, so
    the camera watchdog leaves these cameras to that worker while it lives and reports them once it
    is gone. Unlike a lease it excludes nobody: fixed capture never asked for exclusion.
    """

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._release = client.register_script(_RELEASE)

    def key(self, camera_id: str) -> str:
        return f"{self._prefix}:camera-fixed:{camera_id}"

    def claim(self, worker: str, camera_ids: list[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for cid in camera_ids:
            pipe.set(self.key(cid), worker, px=self._ttl_ms)
        pipe.execute()

    def release(self, worker: str, camera_ids: list[str]) -> None:
        """Drop this worker's claims (another worker's claim on the same camera stays)."""
        for cid in camera_ids:
            self._release(keys=[self.key(cid)], args=[worker])

    def claimed(self, camera_ids: list[str]) -> dict[str, str | None]:
        """The fixed capture worker claiming each camera now, or None."""
        if not camera_ids:
            return {}
        raw = self._client.mget([self.key(c) for c in camera_ids])
        return {cid: v.decode() if v is not None else None for cid, v in zip(camera_ids, raw, strict=True)}
