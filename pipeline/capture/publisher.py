"""The capture side's frame publisher: non-blocking, bounded, dropping the oldest frame when full.

It satisfies ``pipeline.capture.stage.FramePublisher``; one instance serves every camera thread of
a capture worker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from pipeline.bus import Headers, make_producer, topic_name
from pipeline.config import KafkaSettings
from pipeline.logging import get_logger
from pipeline.metrics import FRAMES_DROPPED, FRAMES_PUBLISHED
from pipeline.runtime.policy import is_record_error

log = get_logger(__name__)

# A producer whose sends failed this many times in a row is closed and created anew.
REBUILD_AFTER_FAILURES = 20


@dataclass(slots=True)
class _Pending:
    camera_id: str
    value: bytes
    headers: Headers


class DroppingPublisher:
    """Non-blocking frame publisher for capture workers.

    ``offer`` appends to a bounded buffer and returns at once; when the buffer is full the OLDEST
    frame is dropped (live monitoring wants the newest). One background thread owns the producer,
    (re)creates it while the broker is unreachable, and keeps at most ``max_in_flight`` frames
    unacknowledged, so memory is bounded by ``max_buffered + max_in_flight`` frames.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = "frames",
        max_buffered: int = 64,
        max_in_flight: int = 8,
        connect_retry_s: float = 1.0,
        **producer_overrides: Any,
    ) -> None:
        if max_buffered < 1 or max_in_flight < 1:
            raise ValueError("max_buffered and max_in_flight must be >= 1")
        self.topic = topic_name(kafka, topic)
        self.max_buffered = max_buffered
        self.max_in_flight = max_in_flight
        self._kafka = kafka
        self._retry_s = connect_retry_s
        # Short blocking limits: the sender thread must notice close() and an absent broker quickly.
        self._overrides = {"bootstrap_timeout_ms": 2000, "max_block_ms": 5000, **producer_overrides}
        self._cond = threading.Condition()
        self._buffer: deque[_Pending] = deque()
        self._in_flight = 0
        self._stop = False
        self._closed = False
        self._producer: KafkaProducer | None = None
        self._published: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        # Consecutive failed sends: kafka-python's idempotent producer, once marked failed (e.g. the
        # broker came back with its state lost), fails every send for good; it is rebuilt instead.
        self._failures = 0
        self._broken: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"publisher-{self.topic}", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------
    def offer(self, camera_id: str, value: bytes, headers: Headers) -> bool:
        """Queue a frame; False when this call had to drop a frame (an older one, or this one if closed)."""
        with self._cond:
            if self._closed:
                self._count_drop(camera_id, "closed")
                return False
            dropped = False
            if len(self._buffer) >= self.max_buffered:
                self._count_drop(self._buffer.popleft().camera_id, "backpressure")
                dropped = True
            self._buffer.append(_Pending(camera_id, value, list(headers)))
            self._cond.notify_all()
        return not dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything offered so far is acked or dropped; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buffer and self._in_flight == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Drain for up to ``timeout`` seconds, then stop; frames still buffered count as dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._producer is not None:
            self._producer.close(timeout=max(0.1, deadline - time.monotonic()))
        with self._cond:
            while self._buffer:
                self._count_drop(self._buffer.popleft().camera_id, "shutdown")
        log.info("publisher_closed", topic=self.topic, published=self.published, dropped=self.dropped)

    @property
    def published(self) -> dict[str, int]:
        with self._cond:
            return dict(self._published)

    @property
    def dropped(self) -> dict[str, int]:
        with self._cond:
            return dict(self._dropped)

    @property
    def buffered(self) -> int:
        with self._cond:
            return len(self._buffer)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def broken(self) -> str | None:
        """Why sends keep failing (the producer is being rebuilt), or None while frames get through."""
        with self._cond:
            return self._broken

    def check(self) -> None:
        """A readiness check: raises while sends keep failing."""
        reason = self.broken
        if reason is not None:
            raise RuntimeError(reason)

    def __enter__(self) -> DroppingPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _count_drop(self, camera_id: str, reason: str) -> None:
        # Caller holds self._cond.
        self._dropped[camera_id] = self._dropped.get(camera_id, 0) + 1
        FRAMES_DROPPED.labels(camera=camera_id, reason=reason).inc()

    def _ensure_producer(self) -> KafkaProducer | None:
        warned = False
        while self._producer is None:
            with self._cond:
                if self._stop:
                    return None
            try:
                producer = make_producer(self._kafka, **self._overrides)
                with self._cond:
                    if self._stop:  # close() ran while we were connecting
                        producer.close(timeout=1)
                        return None
                    self._producer = producer
                log.info("publisher_connected", topic=self.topic)
            except KafkaError as exc:
                # Keep capturing meanwhile: offer() drops oldest frames while we cannot send.
                (log.debug if warned else log.warning)("publisher_broker_unavailable", error=str(exc))
                warned = True
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, self._retry_s)
        return self._producer

    def _next(self) -> _Pending | None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._stop or (self._buffer and self._in_flight < self.max_in_flight)
            )
            if self._stop:
                return None
            self._in_flight += 1
            return self._buffer.popleft()

    def _rebuild_if_failing(self) -> None:
        with self._cond:
            failing = self._failures >= REBUILD_AFTER_FAILURES
            if failing:
                self._failures = 0
        if failing and self._producer is not None:
            log.warning("publisher_producer_rebuilt", topic=self.topic, reason=self.broken)
            producer, self._producer = self._producer, None
            try:
                producer.close(timeout=1)
            except Exception as exc:
                log.debug("publisher_close_failed", error=repr(exc))

    def _run(self) -> None:
        while True:
            self._rebuild_if_failing()
            producer = self._ensure_producer()
            item = self._next() if producer is not None else None
            if producer is None or item is None:
                return
            try:
                future = producer.send(
                    self.topic, key=item.camera_id.encode(), value=item.value, headers=item.headers
                )
            except KafkaTimeoutError as exc:
                # Metadata not available in time: the frame is now the oldest; keep it if room.
                log.warning("publisher_send_blocked", camera=item.camera_id, error=str(exc))
                with self._cond:
                    self._in_flight -= 1
                    if len(self._buffer) < self.max_buffered:
                        self._buffer.appendleft(item)
                    else:
                        self._count_drop(item.camera_id, "backpressure")
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._stop, self._retry_s)
                continue
            except Exception as exc:  # e.g. MessageSizeTooLargeError: this frame can never be sent
                log.error("publisher_send_failed", camera=item.camera_id, error=repr(exc))
                self._on_error(item.camera_id, exc)
                continue
            future.add_callback(self._on_ack, item.camera_id)
            future.add_errback(self._on_error, item.camera_id)

    def _on_ack(self, camera_id: str, _metadata: Any) -> None:
        FRAMES_PUBLISHED.labels(camera=camera_id).inc()
        with self._cond:
            if self._broken is not None:
                log.info("publisher_recovered", topic=self.topic)
            self._failures, self._broken = 0, None
        self._settle(camera_id, "published")

    def _on_error(self, camera_id: str, exc: BaseException) -> None:
        log.warning("publisher_delivery_failed", camera=camera_id, error=repr(exc))
        if not is_record_error(exc):
            with self._cond:
                self._failures += 1
                if self._failures >= REBUILD_AFTER_FAILURES:
                    self._broken = f"{self._failures} sends failed in a row: {exc!r}"[:300]
        self._settle(camera_id, None)

    def _settle(self, camera_id: str, outcome: str | None) -> None:
        with self._cond:
            self._in_flight -= 1
            if outcome == "published":
                self._published[camera_id] = self._published.get(camera_id, 0) + 1
            else:
                self._count_drop(camera_id, "send_failed")
            self._cond.notify_all()
