"""kafka-python workarounds (``pipeline.kafka_compat``), on the real broker.

Without the rejoin latch this test fails: after the subscription change, the poll that starts the
rejoin ends before the JoinGroup is answered, and the member stays "rebalancing" for good, its new
topic never assigned (kafka-python 3.0.12).
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer
from kafka.coordinator.consumer import ConsumerCoordinator

import pipeline.bus  # noqa: F401  (applies the workarounds)
from pipeline.bus import create_topics, topic_name
from pipeline.config import KafkaSettings


def test_the_rejoin_latch_is_applied() -> None:
    assert getattr(ConsumerCoordinator.need_rejoin, "_linewatch_join_latched", False)


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
