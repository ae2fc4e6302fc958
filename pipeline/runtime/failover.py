"""Fast failover of a consumer group: a member that dies is removed from the group by its peers.

The broker notices a dead member only when its session times out, and a group member's partitions
wait that long (plus, on tansu, half the session timeout more for the rejoin). Each member of a
group therefore also beats in Redis, from its own thread, every fifth of ``lease_s``: a sorted set
per group, member id -> Redis server time. Every member also watches the others. A peer silent
longer than ``lease_s`` is removed from the group with a LeaveGroup on its behalf (KIP-345's
admin removal; kafka-python's ``remove_group_members``), and the watcher rejoins at once, so the
dead member's partitions move after about ``lease_s`` instead of the session timeout.

A member is only ever removed by a watcher that

- saw it beat within its lease, on the same Redis server run (a Redis restarted from a snapshot
  brings back old beats: none of them counts until the member beats again),
- has itself reached Redis without a failure for at least one lease (after Redis was away from
  everyone, every beat is old: the live members get a lease to beat again first),

and only once per silence: a member that cannot reach Redis but still reaches the broker is
removed once, rejoins, and is left to the broker's session timeout from then on. A member removed
while alive (its process frozen longer than the lease) finds its partitions gone on its next
heartbeat, rejoins, and the batch it had in hand is handled again by the new owner (at least once).
Redis trouble never stops the worker: beats and watching resume by themselves.

:func:`due_evictions` is the decision, pure; :class:`MemberLeases` is the thread and the I/O.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from kafka import KafkaAdminClient
from kafka.admin import MemberToRemove
from kafka.errors import UnknownMemberIdError

from pipeline.config import KafkaSettings, Settings
from pipeline.logging import get_logger
from pipeline.metrics import GROUP_MEMBERS_REMOVED

__all__ = ["MemberLeases", "WatchState", "due_evictions", "member_leases"]

log = get_logger(__name__)

# Beats of members nobody removed (gone before anyone saw them beat) are dropped after this many leases.
_FORGET_AFTER_LEASES = 30
# Removals of one silent member tried before it is left to the broker's session timeout.
_REMOVE_ATTEMPTS = 3


@dataclass
class WatchState:
    """What one watcher has seen: the members it saw beating, on which Redis run, and since when its
    own connection to Redis has been healthy (``time.monotonic()``; None while it is failing)."""

    seen_alive: dict[str, str] = field(default_factory=dict)  # member id -> Redis run id
    healthy_since: float | None = None


def due_evictions(beats: Mapping[str, float], me: str | None, now_ms: float, lease_ms: float, run_id: str,
                  state: WatchState, monotonic_now: float) -> list[str]:
    """The members to remove now, updating ``state``: ``beats`` maps member id -> last beat (Redis
    server time, ms), ``now_ms`` is the Redis server time now; ``me`` is never removed."""
    due: list[str] = []
    for member, beat_ms in beats.items():
        if member == me:
            continue
        if now_ms - beat_ms <= lease_ms:
            state.seen_alive[member] = run_id
        elif state.seen_alive.get(member) == run_id:
            due.append(member)
    healthy = state.healthy_since is not None and monotonic_now - state.healthy_since >= lease_ms / 1000.0
    if not healthy:
        return []
    for member in due:
        state.seen_alive.pop(member, None)  # once per silence
    # Members whose beats are gone (removed by another watcher, left) need not be remembered.
    for member in [m for m in state.seen_alive if m not in beats]:
        del state.seen_alive[member]
    return due


class MemberLeases:
    """One group member's beat in Redis and its watch over the others (see the module docstring).

    The stream runtime calls :meth:`set_member` with its consumer's member id after each poll and
    :meth:`take_rejoin` before each, and rejoins when it returns True.
    """

    def __init__(self, client: redis.Redis, kafka: KafkaSettings, group_id: str, lease_s: float, *,
                 key_prefix: str, worker: str, close_client: bool = False,
                 admin_factory: Callable[[], KafkaAdminClient] | None = None) -> None:
        self._client = client
        self._close_client = close_client
        self.group_id = group_id
        self.lease_s = lease_s
        self._period = lease_s / 5
        self.worker = worker
        self._key = f"{key_prefix}:group-members:{group_id}"
        self._admin_factory = admin_factory or (
            lambda: KafkaAdminClient(**kafka.client_kwargs(), client_id=f"linewatch-{worker}-failover"))
        self._admin: KafkaAdminClient | None = None
        self._admin_lock = threading.Lock()  # the remover uses it, close() closes it
        self._member: str | None = None
        self._beaten: str | None = None  # the id whose beats are in Redis
        self._state = WatchState()
        self._state_lock = threading.Lock()  # peers() and the remover touch what the thread updates
        self._attempts: dict[str, int] = {}  # removals tried per silent member
        self._rejoin = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Removals wait on the broker (up to its request timeout): never in the beating thread, or a
        # slow coordinator would silence this member and get it removed in turn. A daemon: a removal
        # in flight never holds up the process's exit.
        self._removals: queue.Queue[tuple[str, float, str] | None] = queue.Queue()
        self._remover: threading.Thread | None = None
        self._failing: str | None = None
        self.removed = 0
        # The longest time between two beats that reached Redis: how close this member came to
        # being taken for dead (logged at close; a value near the lease says the lease is too short).
        self.longest_beat_gap_s = 0.0
        self._last_beat: float | None = None
        self.log = log.bind(worker=worker, group=group_id)

    # -- the runtime's side ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.worker}-failover", daemon=True)
            self._remover = threading.Thread(target=self._remove_loop, name=f"{self.worker}-failover-remove",
                                             daemon=True)
            self._thread.start()
            self._remover.start()

    def set_member(self, member_id: str | None) -> None:
        """This member's id in the group; an empty or None id (rebalancing) keeps the last one beating."""
        if member_id:
            self._member = member_id

    def peers(self) -> list[str]:
        """The other members this one has seen beating (and would remove once silent)."""
        with self._state_lock:
            return sorted(self._state.seen_alive)

    def take_rejoin(self) -> bool:
        """True once after a peer was removed: the caller should rejoin the group now."""
        if self._rejoin.is_set():
            self._rejoin.clear()
            return True
        return False

    def close(self) -> None:
        """Stop beating and drop this member's beat (a member leaving is not a member dying)."""
        self._stop.set()
        self._removals.put(None)
        for thread in (self._thread, self._remover):
            if thread is not None:
                thread.join(2.0)
        # Redis away: the beat lapses, and removing a member that already left is UNKNOWN_MEMBER_ID.
        with contextlib.suppress(redis.RedisError):
            if self._beaten is not None:
                self._client.zrem(self._key, self._beaten)
        # A removal still waiting on the broker keeps the admin client; the process or the next
        # garbage collection ends it.
        if self._admin_lock.acquire(timeout=0.5):
            try:
                if self._admin is not None:
                    with contextlib.suppress(Exception):
                        self._admin.close()
                    self._admin = None
            finally:
                self._admin_lock.release()
        if self._close_client and (self._remover is None or not self._remover.is_alive()):
            self._client.close()
        self.log.info("failover_stopped", removed=self.removed, longest_beat_gap_s=round(self.longest_beat_gap_s, 3),
                      lease_s=self.lease_s)

    # -- the beating thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.round()
            except Exception as exc:  # the watch must outlive anything: a dead one would get us removed
                self._failed(f"{type(exc).__name__}: {exc}")

    def round(self) -> list[str]:
        """One beat and one look at the others; returns the members found dead (queued for removal)."""
        member = self._member
        try:
            beats, now_ms, run_id = self._beat_and_read(member)
        except redis.RedisError as exc:
            self._failed(f"redis: {exc}")
            return []
        beat_at = time.monotonic()
        stalled = self._last_beat is not None and beat_at - self._last_beat > 2 * self._period
        if self._last_beat is not None and member is not None:
            self.longest_beat_gap_s = max(self.longest_beat_gap_s, beat_at - self._last_beat)
        self._last_beat = beat_at
        if self._state.healthy_since is None or stalled:
            # Redis answered after a pause (or this process was frozen): the others' beats may be
            # as late as ours. Nobody is taken for dead until a whole lease has passed since.
            self._state.healthy_since = beat_at
        if self._failing is not None:
            self.log.info("failover_watch_recovered", was=self._failing)
            self._failing = None
        with self._state_lock:
            due = due_evictions(beats, member, now_ms, self.lease_s * 1000, run_id, self._state, beat_at)
        for dead in due:
            self._removals.put((dead, (now_ms - beats[dead]) / 1000.0, run_id))
        return due

    def _beat_and_read(self, member: str | None) -> tuple[dict[str, float], float, str]:
        seconds, micros = self._client.time()
        now_ms = seconds * 1000 + micros / 1000
        run_id = str(self._client.info("server").get("run_id", ""))
        pipe = self._client.pipeline(transaction=False)
        if member is not None:
            if self._beaten is not None and self._beaten != member:
                pipe.zrem(self._key, self._beaten)
            pipe.zadd(self._key, {member: now_ms})
        pipe.zremrangebyscore(self._key, "-inf", now_ms - _FORGET_AFTER_LEASES * self.lease_s * 1000)
        pipe.zrange(self._key, 0, -1, withscores=True)
        pipe.expire(self._key, int(_FORGET_AFTER_LEASES * self.lease_s) + 60)
        results = pipe.execute()
        if member is not None:
            self._beaten = member
        raw: list[tuple[bytes, float]] = results[-2]
        return {m.decode(): score for m, score in raw}, now_ms, run_id

    def _failed(self, reason: str) -> None:
        self._state.healthy_since = None
        self._last_beat = None  # an outage is not a gap in this member's beating
        if reason != self._failing:
            self.log.warning("failover_watch_failing", error=reason,
                             consequence="dead members are left to the broker's session timeout")
            self._failing = reason

    # -- the removing thread ----------------------------------------------------------------------
    def _remove_loop(self) -> None:
        while (item := self._removals.get()) is not None and not self._stop.is_set():
            self._remove(*item)

    def _remove(self, member: str, silent_s: float, run_id: str) -> bool:
        """Remove a silent member; a failed removal is tried again on the next rounds, up to
        ``_REMOVE_ATTEMPTS`` times, after which it is left to the broker's session timeout."""
        try:
            removed = self._remove_from_group(member, silent_s)
        except Exception as exc:  # in a thread of its own: unlogged, it would vanish
            attempts = self._attempts.get(member, 0) + 1
            self._attempts[member] = attempts
            again = attempts < _REMOVE_ATTEMPTS
            self.log.warning("group_member_remove_failed", member=member, silent_s=round(silent_s, 2),
                             error=f"{type(exc).__name__}: {exc}", attempt=attempts, again=again)
            if again:
                with self._state_lock:  # due again on the next round, if still silent
                    self._state.seen_alive[member] = run_id
                return False
            removed = False
        self._attempts.pop(member, None)
        # Once per silence (a beat left behind is forgotten in time anyway).
        with contextlib.suppress(redis.RedisError):
            self._client.zrem(self._key, member)
        return removed

    def _remove_from_group(self, member: str, silent_s: float) -> bool:
        with self._admin_lock:
            if self._stop.is_set():
                return False
            if self._admin is None:
                self._admin = self._admin_factory()
            result: dict[Any, Any] = self._admin.remove_group_members(
                self.group_id, [MemberToRemove(member_id=member, reason=f"no beat for {silent_s:.1f}s")])
        error = next(iter(result.values()), None)
        if error is UnknownMemberIdError:  # another watcher was first, or it had left
            self.log.info("group_member_already_gone", member=member, silent_s=round(silent_s, 2))
            return False
        if error is not None and error.errno != 0:
            raise error(f"LeaveGroup on behalf of {member} refused")
        self.removed += 1
        # Rejoin now rather than on a heartbeat's answer (a second later, or on tansu up to the
        # session timeout); only after the removal, or the join could still count the dead member in.
        self._rejoin.set()
        GROUP_MEMBERS_REMOVED.labels(worker=self.worker).inc()
        self.log.warning("group_member_removed", member=member, silent_s=round(silent_s, 2),
                         lease_s=self.lease_s)
        return True


def member_leases(settings: Settings, group_id: str, worker: str) -> MemberLeases | None:
    """The fast failover of a worker in ``group_id``, or None without Redis or with
    ``kafka.member_lease_ms`` unset (the broker's session timeout alone)."""
    lease_ms = settings.kafka.member_lease_ms
    if lease_ms is None or not settings.redis.url:
        return None
    from pipeline.redis_store import connect

    # Its own client, answering within a fifth of the lease or failing (a failure is an outage: see
    # WatchState.healthy_since), so that a slow Redis is never mistaken for silent members.
    redis_settings = settings.redis.model_copy(update={"socket_timeout_s": min(settings.redis.socket_timeout_s,
                                                                                 lease_ms / 5000.0)})
    return MemberLeases(connect(redis_settings), settings.kafka, group_id, lease_ms / 1000.0,
                        key_prefix=settings.redis.key_prefix, worker=worker, close_client=True)
