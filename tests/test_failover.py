"""Fast failover (pipeline.runtime.failover): a dead group member is removed by its peers after its
Redis lease, not after the broker's session timeout; a member is never removed on old or missing
evidence (one it never saw beating, beats from before a Redis restart, its own Redis trouble)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from kafka import TopicPartition
from kafka.errors import NoError, NotCoordinatorError
from pydantic import ValidationError

from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.runtime.envelope import Envelope, Record, StageResult
from pipeline.runtime.failover import MemberLeases, WatchState, due_evictions
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from tests.conftest import REPO_ROOT
from tests.streaming_helpers import Background

LEASE_MS = 1000.0


# -- the decision ---------------------------------------------------------------------------------
def healthy_state() -> WatchState:
    return WatchState(healthy_since=0.0)


def test_a_member_seen_beating_then_silent_for_a_lease_is_removed_once() -> None:
    state = healthy_state()
    assert due_evictions({"a": 10_000, "me": 10_000}, "me", 10_500, LEASE_MS, "run1", state, 100.0) == []
    assert state.seen_alive == {"a": "run1"}
    assert due_evictions({"a": 10_000, "me": 11_400}, "me", 11_400, LEASE_MS, "run1", state, 101.0) == ["a"]
    # Once per silence: a member that stays silent (its removal failed, it cannot reach Redis) is
    # left to the broker from then on.
    assert due_evictions({"a": 10_000, "me": 12_000}, "me", 12_000, LEASE_MS, "run1", state, 102.0) == []


def test_a_member_never_seen_beating_is_never_removed() -> None:
    state = healthy_state()
    # Already silent when this watcher first looks (it may have died before anyone saw it alive).
    assert due_evictions({"old": 1_000, "me": 50_000}, "me", 50_000, LEASE_MS, "run1", state, 100.0) == []
    assert state.seen_alive == {}


def test_beats_from_before_a_redis_restart_do_not_count() -> None:
    state = healthy_state()
    due_evictions({"a": 10_000}, "me", 10_200, LEASE_MS, "run1", state, 100.0)
    # Redis came back from a snapshot (new run id) holding a's old beat: not evidence of a death.
    assert due_evictions({"a": 10_000}, "me", 20_000, LEASE_MS, "run2", state, 110.0) == []
    # Once a beats again on the new run, its silence counts.
    due_evictions({"a": 20_100}, "me", 20_200, LEASE_MS, "run2", state, 110.2)
    assert due_evictions({"a": 20_100}, "me", 21_500, LEASE_MS, "run2", state, 111.5) == ["a"]


def test_no_member_is_removed_until_the_watcher_reached_redis_for_a_whole_lease() -> None:
    """After Redis was away from everyone, every beat is old: live members get a lease to beat again."""
    state = WatchState(healthy_since=None)
    due_evictions({"a": 10_000}, "me", 10_200, LEASE_MS, "run1", state, 100.0)
    state.healthy_since = 105.0  # Redis back at 105 s after an outage
    assert due_evictions({"a": 10_000}, "me", 15_000, LEASE_MS, "run1", state, 105.5) == []
    # a beat again within the lease: alive, nothing to do.
    assert due_evictions({"a": 15_300}, "me", 15_600, LEASE_MS, "run1", state, 106.1) == []
    assert state.seen_alive == {"a": "run1"}


def test_the_watcher_never_removes_itself() -> None:
    state = healthy_state()
    due_evictions({"me": 10_000}, "me", 10_100, LEASE_MS, "run1", state, 100.0)
    assert due_evictions({"me": 10_000}, "me", 19_000, LEASE_MS, "run1", state, 109.0) == []


def test_the_lease_must_be_below_the_session_timeout() -> None:
    with pytest.raises(ValidationError, match=r"member_lease_ms \(2000\) must be below kafka\.session_timeout_ms"):
        KafkaSettings(session_timeout_ms=2000, member_lease_ms=2000)
    # The default lease is simply not used where the session timeout is no longer than it.
    assert KafkaSettings(session_timeout_ms=1000).member_lease_ms is None
    assert KafkaSettings(session_timeout_ms=6000).member_lease_ms == 1000


# -- on the real broker and Redis -------------------------------------------------------------------
class CountingStage(Stage):
    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.assigned: list[set[TopicPartition]] = []
        self.revoked_at: list[float] = []  # time.monotonic() of each revocation

    def decode(self, env: Envelope) -> bytes:
        return env.value or b""

    def handle(self, records: Sequence[Record[bytes]]) -> StageResult:
        self.handled.extend(r.message for r in records)
        return StageResult()

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.assigned.append(set(partitions))

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.revoked_at.append(time.monotonic())


# The victim: the same runtime with failover, in a process of its own (SIGKILL spares no thread).
VICTIM = """
import json, sys
from pipeline.config import KafkaSettings
from pipeline.redis_store import connect
from pipeline.config import RedisSettings
from pipeline.runtime.envelope import StageResult
from pipeline.runtime.failover import MemberLeases
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime

class Quiet(Stage):
    def handle(self, records):
        return StageResult()

kafka = KafkaSettings(**json.loads(sys.argv[1]))
redis_settings = RedisSettings(**json.loads(sys.argv[2]))
group = sys.argv[3]
leases = MemberLeases(connect(redis_settings), kafka, group, kafka.member_lease_ms / 1000,
                      key_prefix=redis_settings.key_prefix, worker="victim")
config = RuntimeConfig(name="victim", group_id=group, topics=("in",), producer=False)
StreamRuntime(kafka, config, Quiet(), failover=leases).run()
"""


def member(kafka: KafkaSettings, redis_settings: RedisSettings, client: redis.Redis, group: str,
           stage: Stage) -> tuple[Background, MemberLeases]:
    assert kafka.member_lease_ms is not None
    leases = MemberLeases(client, kafka, group, kafka.member_lease_ms / 1000, key_prefix=redis_settings.key_prefix,
                          worker="survivor")
    config = RuntimeConfig(name="survivor", group_id=group, topics=("in",), producer=False, poll_timeout_ms=200)
    return Background(lambda stop: StreamRuntime(kafka, config, stage, stop=stop, failover=leases).run()), leases


def wait_for(done: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_a_sigkilled_member_s_partitions_move_before_the_session_timeout(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis) -> None:
    """Session timeout 8 s: the broker alone notices the dead member after 8 s + a heartbeat, and
    only then does the survivor give up its assignment to rejoin (13.1 s to hold both partitions).
    Removed after its 1 s lease, the survivor rejoins at once. (How long tansu then holds the
    join, one round of 4 s or, now and then on a loaded machine, more, is the broker's:
    bench/README.md, scenario 1.)"""
    kafka = kafka_settings.model_copy(update={"session_timeout_ms": 8000, "member_lease_ms": 1000})
    group = f"{kafka.topic_prefix}-g"
    create_topics(kafka, names=("in",))
    stage = CountingStage()
    survivor, leases = member(kafka, redis_settings, redis_client, group, stage)
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, kafka.model_dump_json(), redis_settings.model_dump_json(), group],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with survivor:
            wait_for(lambda: stage.assigned and len(stage.assigned[-1]) == 1, "one partition each", 60)
            wait_for(lambda: len(leases.peers()) == 1, "the survivor to see the victim beat", 10)
            # A settled group: a JoinGroup of the victim's still held by tansu (half the session
            # timeout) would add the dead member back after its removal, for the broker to expire.
            rounds = len(stage.assigned)
            time.sleep(kafka.session_timeout_ms / 2000 + 1.0)
            assert len(stage.assigned) == rounds and len(stage.assigned[-1]) == 1, stage.assigned
            revoked_before = len(stage.revoked_at)
            killed = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            wait_for(lambda: len(stage.revoked_at) > revoked_before, "the survivor to rejoin", 30)
            took = stage.revoked_at[revoked_before] - killed
            # Without the removal: the session timeout and more (8.1 s measured); with it: the lease
            # and a look (about 1.2 s). Half the session timeout tells them apart on a loaded machine.
            assert took < kafka.session_timeout_ms / 2000, f"rejoined {took:.1f} s after the kill"
            assert leases.removed == 1
            wait_for(lambda: len(stage.assigned[-1]) == 2, "the survivor to hold both partitions", 40)
            # And it reads the dead member's partition.
            producer = make_producer(kafka)
            for p in range(kafka.partitions):
                producer.send(topic_name(kafka, "in"), value=f"after-{p}".encode(), partition=p)
            producer.flush(30)
            producer.close()
            wait_for(lambda: {b"after-0", b"after-1"} <= set(stage.handled), "both partitions read", 30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)


def test_a_member_that_leaves_is_not_removed_and_its_beat_is_gone(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis) -> None:
    kafka = kafka_settings.model_copy(update={"member_lease_ms": 1000})
    group = f"{kafka.topic_prefix}-g"
    create_topics(kafka, names=("in",))
    a_stage, b_stage = CountingStage(), CountingStage()
    a, a_leases = member(kafka, redis_settings, redis_client, group, a_stage)
    b, b_leases = member(kafka, redis_settings, redis_client, group, b_stage)
    with a:
        b.start()
        wait_for(lambda: len(a_leases.peers()) == 1 and len(b_leases.peers()) == 1, "each to see the other", 60)
        # Settled (tansu keeps a leader that leaves mid-rebalance as leader: the other member's
        # SyncGroup then fails round after round).
        wait_for(lambda: all(st.assigned and len(st.assigned[-1]) == 1 for st in (a_stage, b_stage)),
                 "one partition each", 60)
        b.join()
        key = f"{redis_settings.key_prefix}:group-members:{group}"
        assert redis_client.zcard(key) == 1  # only a's beat is left
        time.sleep(3 * 1.0)
        assert a_leases.removed == 0
        wait_for(lambda: a_stage.assigned and len(a_stage.assigned[-1]) == 2, "a to hold both partitions", 30)
        assert a_leases.removed == 0


def test_a_watch_that_cannot_reach_redis_keeps_the_worker_going(kafka_settings: KafkaSettings) -> None:
    """Redis down: no beat, no removal, the thread goes on; the worker is not concerned."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    leases = MemberLeases(dead, kafka_settings, "g", 1.0, key_prefix="x", worker="w")
    leases.set_member("m-1")
    leases.start()
    time.sleep(1.0)
    assert leases._thread is not None and leases._thread.is_alive()
    assert leases.peers() == [] and leases.removed == 0
    leases.close()


class RecordingCoordinator:
    """An admin client that refuses the first ``failures`` removals (coordinator moving, say)."""

    def __init__(self, failures: int = 0) -> None:
        self.asked: list[str] = []
        self.failures = failures

    def remove_group_members(self, group_id: str, members: list[Any]) -> dict[Any, Any]:
        self.asked.extend(m.member_id for m in members)
        if len(self.asked) <= self.failures:
            raise NotCoordinatorError("coordinator moved")
        return {members[0]: NoError}

    def close(self) -> None:
        pass


def beat(client: redis.Redis, key: str, member: str) -> None:
    seconds, micros = client.time()
    client.zadd(key, {member: seconds * 1000 + micros / 1000})


def test_a_watcher_that_paused_takes_nobody_for_dead_until_a_lease_has_passed(
        kafka_settings: KafkaSettings, redis_client: redis.Redis) -> None:
    """After a pause of its own (Redis slow to answer, the process frozen), the others' beats may
    be as late as its own: they get a whole lease to beat again before anyone is removed."""
    coordinator = RecordingCoordinator()
    prefix = f"{kafka_settings.topic_prefix}-pause"
    key = f"{prefix}:group-members:g"
    leases = MemberLeases(redis_client, kafka_settings, "g", 1.0, key_prefix=prefix, worker="w",
                          admin_factory=lambda: coordinator)  # type: ignore[arg-type,return-value]
    leases.set_member("me")
    for _ in range(7):  # 1.4 s of rounds every 0.2 s, the peer beating: healthy for a lease
        beat(redis_client, key, "peer")
        assert leases.round() == []
        time.sleep(0.2)
    assert leases.peers() == ["peer"]
    time.sleep(1.5)  # this watcher pauses; the peer's beat is 1.7 s old when it looks again
    assert leases.round() == []
    for _ in range(6):  # the peer was alive all along: it beats again within the lease
        beat(redis_client, key, "peer")
        assert leases.round() == []
        time.sleep(0.2)
    assert leases.peers() == ["peer"]
    # Had it not beaten again, it would have been due a lease after the pause, not before.
    time.sleep(1.1)
    assert leases.round() == []  # the first look after another pause: a lease of grace again
    for _ in range(7):
        due = leases.round()
        if due:
            break
        time.sleep(0.2)
    assert due == ["peer"]
    leases.close()
    assert coordinator.asked == []  # the remover was never started: nothing reached the broker


def test_a_removal_the_broker_refused_is_tried_again(kafka_settings: KafkaSettings,
                                                    redis_client: redis.Redis) -> None:
    coordinator = RecordingCoordinator(failures=1)
    prefix = f"{kafka_settings.topic_prefix}-retry"
    key = f"{prefix}:group-members:g"
    leases = MemberLeases(redis_client, kafka_settings, "g", 0.5, key_prefix=prefix, worker="w",
                          admin_factory=lambda: coordinator)  # type: ignore[arg-type,return-value]
    leases.set_member("me")
    beat(redis_client, key, "peer")  # one beat, then silence
    leases.start()
    try:
        wait_for(lambda: leases.removed == 1, "the removal, second try", 10)
        assert coordinator.asked == ["peer", "peer"]
        assert redis_client.zscore(key, "peer") is None
    finally:
        leases.close()



class SlowCoordinator:
    """An admin client whose removals take 3 s (a coordinator under load)."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.begun = threading.Event()

    def remove_group_members(self, group_id: str, members: list[Any]) -> dict[Any, Any]:
        self.begun.set()
        time.sleep(3.0)
        self.asked.extend(m.member_id for m in members)
        return {members[0]: NoError}

    def close(self) -> None:
        pass


def test_a_slow_removal_does_not_silence_the_member_removing(kafka_settings: KafkaSettings,
                                                             redis_client: redis.Redis) -> None:
    """Removals wait on the broker; the beat goes on meanwhile, or this member would be removed next."""
    coordinator = SlowCoordinator()
    key_prefix = f"{kafka_settings.topic_prefix}-slow"
    leases = MemberLeases(redis_client, kafka_settings, "g", 0.5, key_prefix=key_prefix, worker="w",
                          admin_factory=lambda: coordinator)  # type: ignore[arg-type,return-value]
    key = f"{key_prefix}:group-members:g"
    leases.set_member("me")
    seconds, micros = redis_client.time()
    redis_client.zadd(key, {"peer": seconds * 1000 + micros / 1000})  # one beat, then silence
    leases.start()
    try:
        assert coordinator.begun.wait(10), "the silent peer was never removed"
        for _ in range(5):  # the removal takes 3 s: this member beats on all along
            time.sleep(0.5)
            seconds, micros = redis_client.time()
            assert seconds * 1000 + micros / 1000 - (redis_client.zscore(key, "me") or 0) < 500
        wait_for(lambda: leases.removed == 1, "the removal done", 10)
        assert coordinator.asked == ["peer"]
        assert leases.take_rejoin() is True and leases.take_rejoin() is False
    finally:
        leases.close()
    assert redis_client.zscore(key, "me") is None  # a member that leaves takes its beat along
