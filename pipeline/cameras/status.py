"""Publishing `CameraStatus` messages on the camera-status topic (capture workers and the watchdog)."""

from __future__ import annotations

from kafka import KafkaProducer

from pipeline.bus import make_producer, topic_name
from pipeline.config import Settings
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus


class StatusPublisher:
    """CameraStatus messages on the camera-status topic, keyed by camera, acknowledged before returning."""

    def __init__(self, settings: Settings) -> None:
        self._kafka = settings.kafka
        self._producer: KafkaProducer | None = None
        # It runs inside the supervisor's round: a broker outage must not hold up lease renewals.
        self._timeout_s = min(5.0, settings.capture.lease_s / 4)

    def __call__(self, status: CameraStatus) -> None:
        if self._producer is None:
            self._producer = make_producer(self._kafka, max_block_ms=int(self._timeout_s * 1000))
        self._producer.send(topic_name(self._kafka, CAMERA_STATUS_TOPIC), key=status.camera_id.encode(),
                            value=status.to_json().encode()).get(timeout=self._timeout_s)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
