"""Camera status to subscriptions: `camera_down` / `camera_up` messages as notifications.

A blind line is a defect too, so every subscription whose line, camera and product class filters
match the camera receives them, whatever its status, score or area filters say (those describe
defect events). Rate limits do not apply (they would hide a camera_up). Deliveries go through the
subscription's own channel sender with its retry policy; the ledger remembers them, so a
redelivered message is not sent twice. A delivery that fails every attempt is logged and counted
(``linewatch_deliveries_total{outcome="failed"}``), not dead-lettered: dead letters are defect events,
and a stale camera_down is of no use by the time someone redrives it.

`CameraStatusDelivery` is self-contained (its own consumer group on the camera-status topic and
its own thread); the deliver worker only starts and closes it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from typing import Any

import redis
from kafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from pipeline.bus import close_clients, commit_offsets, create_topics, make_consumer, next_offsets
from pipeline.config import Settings
from pipeline.delivery.attempts import RetryPolicy, deliver
from pipeline.delivery.channels import Sender
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.logging import get_logger
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus
from schemas.subscriptions import Notification, Subscription, SubscriptionFilter

log = get_logger(__name__)


def wants_camera_status(flt: SubscriptionFilter, status: CameraStatus) -> bool:
    """Line, camera (glob) and product class filters; the defect-only criteria do not apply."""
    if flt.lines and status.line_id not in flt.lines:
        return False
    if flt.cameras and not any(fnmatchcase(status.camera_id, p) for p in flt.cameras):
        return False
    return not flt.product_classes or status.product_class in flt.product_classes


def camera_notification(sub_id: str, status: CameraStatus) -> Notification:
    """The notification body: ``status`` is camera_down/camera_up; ``event`` carries the camera's details."""
    event: dict[str, Any] = {"event_id": status.status_id, **status.model_dump(mode="json")}
    return Notification(subscription_id=sub_id, delivery_id=status.status_id, status=status.status,
                        event=event, sent_at=time.time())


class CameraStatusDelivery:
    """Consumes the camera-status topic (group ``<deliver.group_id>-camera-status``) into subscriptions."""

    def __init__(self, settings: Settings, client: redis.Redis, make_sender: Any, stop: threading.Event,
                 poll_timeout_ms: int = 200) -> None:
        prefix = settings.redis.key_prefix
        self.settings = settings
        self.store = SubscriptionStore(client, prefix)
        self.ledger = DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s)
        self.make_sender = make_sender
        self.stop = stop
        self.delivered = 0
        self._poll_timeout_ms = poll_timeout_ms
        self._senders: dict[str, tuple[Subscription, Sender]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="camera-status")
        self._thread = threading.Thread(target=self._run, name="camera-status-delivery", daemon=True)
        self._log = log.bind(worker="deliver", topic=CAMERA_STATUS_TOPIC)

    def start(self) -> CameraStatusDelivery:
        self._thread.start()
        return self

    def close(self, timeout: float = 15.0) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def _sender(self, sub: Subscription) -> Sender:
        held = self._senders.get(sub.id)
        if held is not None and held[0] == sub:
            return held[1]
        if held is not None:
            held[1].close()
        sender = self.make_sender(sub)
        self._senders[sub.id] = (sub, sender)
        return sender

    def handle(self, status: CameraStatus) -> bool:
        """Deliver to every matching subscription, in parallel (a slow one delays no other).

        False when a delivery was interrupted by ``stop``: the message stays uncommitted."""
        subs = [s for s in self.store.all().values() if wants_camera_status(s.filters, status)]
        todo = [s for s in subs if self.ledger.outcome(s.id, status.status_id) is None]
        futures = [self._pool.submit(self._deliver_one, sub, status) for sub in todo]
        return all([f.result() for f in futures])

    def _deliver_one(self, sub: Subscription, status: CameraStatus) -> bool:
        notification = camera_notification(sub.id, status)
        outcome = deliver(self._sender(sub), notification, RetryPolicy.for_subscription(sub), sub.channel.type,
                          self.stop)
        if outcome.interrupted:
            return False
        if not outcome.delivered:
            self._log.error("camera_status_delivery_failed", subscription=sub.id, delivery=status.status_id,
                            attempts=outcome.attempts, error=outcome.error)
        self.ledger.record_sent(sub.id, status.camera_id, status.status_id, None)
        return True

    def _run(self) -> None:
        kafka = self.settings.kafka
        try:
            create_topics(kafka, names=(CAMERA_STATUS_TOPIC,))
        except KafkaError as exc:
            self._log.warning("topic_check_failed", error=repr(exc))
        consumer = make_consumer(kafka, f"{self.settings.deliver.group_id}-camera-status", [CAMERA_STATUS_TOPIC])
        self._log.info("camera_status_delivery_started")
        try:
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=self._poll_timeout_ms).values():
                    done = []
                    for rec in records:
                        try:
                            status = CameraStatus.model_validate_json(rec.value)
                        except (ValidationError, ValueError) as exc:
                            self._log.warning("camera_status_invalid", offset=rec.offset, error=str(exc)[:200])
                            done.append(rec)
                            continue
                        if not self._handle_until_done(status):
                            break  # stopping: the rest is redelivered after a restart
                        done.append(rec)
                    if done:
                        try:
                            commit_offsets(consumer, next_offsets(done))
                        except CommitFailedError as exc:  # rebalanced: the new owner delivers (ledger dedups)
                            self._log.warning("camera_status_commit_failed", error=str(exc))
        except Exception:
            self._log.exception("camera_status_delivery_crashed")
        finally:
            close_clients(consumer, None, "deliver-camera-status")
            self._pool.shutdown(wait=False, cancel_futures=True)
            for _, sender in self._senders.values():
                sender.close()

    def _handle_until_done(self, status: CameraStatus) -> bool:
        delay = 0.5
        while not self.stop.is_set():
            try:
                if not self.handle(status):
                    return False
                self.delivered += 1
                return True
            except redis.RedisError as exc:
                self._log.warning("camera_status_retry", camera=status.camera_id, error=repr(exc), retry_in_s=delay)
            if self.stop.wait(delay):
                break
            delay = min(delay * 2, 30.0)
        return False
