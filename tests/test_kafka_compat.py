"""kafka-python workarounds (``pipeline.kafka_compat``), on the real broker.

Without the rejoin latch the rejoin test fails: after the subscription change, the poll that starts the
rejoin ends before the JoinGroup is answered, and the member stays "rebalancing" for good, its new
topic never assigned (kafka-python 3.0.12). Without the cycle breaker the short-poll test fails:
what the poller's frame held lives on in a cycle of exception, traceback and frames.
"""

from __future__ import annotations

import gc
import time
import weakref

from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.net.selector import NetworkSelector

import pipeline.bus  # noqa: F401  (applies the workarounds)
from pipeline.bus import create_topics, topic_name
from pipeline.config import KafkaSettings


def test_the_workarounds_are_applied() -> None:
    assert getattr(ConsumerCoordinator.need_rejoin, "_linewatch_patched", False)
    assert getattr(NetworkSelector.run, "_linewatch_patched", False)


class _Batch:
    """Stands for what a poller holds meanwhile (the stream runtime: a batch of 1080p frames)."""


def test_what_a_short_poll_s_caller_held_is_freed_when_it_returns(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, names=("in",))
    consumer = KafkaConsumer(**kafka_settings.client_kwargs(), enable_auto_commit=False, fetch_max_wait_ms=2000)
    consumer.assign([TopicPartition(topic_name(kafka_settings, "in"), 0)])

    def poll_holding_a_batch() -> weakref.ref[_Batch]:
        batch = _Batch()
        for _ in range(5):  # the broker holds the (empty) fetch: each poll returns before its answer
            consumer.poll(timeout_ms=0)
        return weakref.ref(batch)

    try:
        consumer.poll(timeout_ms=100)  # the first fetch goes out
        gc.collect()
        gc.disable()  # only reference counting frees things now, as between the rare full collections
        try:
            held = poll_holding_a_batch()
            assert held() is None, "the batch outlived its poller: it is left to the cyclic collector"
        finally:
            gc.enable()
    finally:
        consumer.close()


def test_a_rejoin_that_outlives_its_poll_is_finished_by_the_next_poll(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, names=("in", "other"))
    first, second = topic_name(kafka_settings, "in"), topic_name(kafka_settings, "other")
    consumer = KafkaConsumer(**kafka_settings.client_kwargs(), group_id=f"{kafka_settings.topic_prefix}-g",
                             enable_auto_commit=False, session_timeout_ms=kafka_settings.session_timeout_ms,
                             heartbeat_interval_ms=kafka_settings.heartbeat_interval_ms)
    try:
        consumer.subscribe([first])
        deadline = time.monotonic() + 60
        while not consumer.assignment():
            assert time.monotonic() < deadline, "timed out waiting for the first assignment"
            consumer.poll(timeout_ms=200)
        consumer.subscribe([first, second])
        consumer.poll(timeout_ms=0)  # starts the rejoin; the broker holds the JoinGroup for seconds
        time.sleep(kafka_settings.session_timeout_ms / 1000 + 1)  # the join completes meanwhile
        # Fixed, it takes one more join (the broker holds a JoinGroup for half the session timeout);
        # unfixed, the member stays out of the group until the broker has dropped it (stuck for 20 s and more here).
        started = time.monotonic()
        deadline = started + 10
        while {tp.topic for tp in consumer.assignment()} != {first, second}:
            assert time.monotonic() < deadline, f"still assigned only {sorted(map(str, consumer.assignment()))}"
            consumer.poll(timeout_ms=200)
    finally:
        consumer.close(autocommit=False)
