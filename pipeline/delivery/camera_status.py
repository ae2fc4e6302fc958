"""Camera status to subscriptions: `camera_down` / `camera_up` messages as notifications.

A blind line is a defect too, so every subscription whose line, camera and product class filters
match the camera receives them, whatever its status, score or area filters say (those describe
defect events). Rate limits do not apply (they would hide a camera_up). Deliveries go through the
subscription's own channel sender with its retry policy; the ledger remembers them, so a
redelivered message is not sent twice. A delivery that fails every attempt is logged and counted
(``linewatch_deliveries_total{outcome="failed"}``), not dead-lettered: dead letters are defect events,
and a stale camera_down is of no use by the time someone redrives it.

`CameraStatusStage` is a stream-runtime stage on the camera-status topic (its own consumer group,
``<deliver.group_id>-camera-status``); the deliver worker runs it beside the defects runtime.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from typing import Any

import redis

from pipeline.config import Settings
from pipeline.delivery.attempts import RetryPolicy, deliver
from pipeline.delivery.channels import Sender
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.logging import get_logger
from pipeline.runtime.envelope import Record, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage
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


class CameraStatusStage(Stage):
    """camera-status records -> every matching subscription's channel; settled before the commit."""

    def __init__(self, settings: Settings, client: redis.Redis, make_sender: Any, stop: threading.Event) -> None:
        prefix = settings.redis.key_prefix
        self.store = SubscriptionStore(client, prefix)
        self.ledger = DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s)
        self.make_sender = make_sender
        self.stop = stop
        self.delivered = 0
        self._senders: dict[str, tuple[Subscription, Sender]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="camera-status")
        self._log = log.bind(worker="deliver", topic=CAMERA_STATUS_TOPIC)

    @staticmethod
    def runtime_config(settings: Settings, poll_timeout_ms: int = 200) -> RuntimeConfig:
        return RuntimeConfig(name="deliver-camera-status", group_id=f"{settings.deliver.group_id}-camera-status",
                             topics=(CAMERA_STATUS_TOPIC,), max_batch=50, poll_timeout_ms=poll_timeout_ms)

    def _sender(self, sub: Subscription) -> Sender:
        held = self._senders.get(sub.id)
        if held is not None and held[0] == sub:
            return held[1]
        if held is not None:
            held[1].close()
        sender = self.make_sender(sub)
        self._senders[sub.id] = (sub, sender)
        return sender

    def handle(self, records: Sequence[Record[Any]]) -> StageResult:
        # Redis trouble raises out of here: the runtime retries the batch with backoff (transient).
        for rec in records:
            if not self.deliver_status(rec.message):
                # Transient to the runtime: rewound and left uncommitted, so a restart delivers it.
                raise TimeoutError("stopping before the camera status was delivered")
            self.delivered += 1
        return StageResult()

    def deliver_status(self, status: CameraStatus) -> bool:
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

    def on_stop(self) -> None:
        self.stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for _, sender in self._senders.values():
            sender.close()
