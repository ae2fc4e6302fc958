"""Deliver worker: wiring of the delivery dispatcher onto the stream runtime (defects -> subscriptions).

The stage hands each event to the dispatcher's per-subscription lanes; the runtime commits only
offsets that every matching lane has settled (delivered, coalesced or dead-lettered), and pauses
fetching while too many events are in flight instead of buffering. Beside it run the camera-status
delivery (camera_down/up to subscriptions) and the camera watchdog (`pipeline.cameras.watchdog`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kafka import TopicPartition

from pipeline.cameras.status import StatusPublisher
from pipeline.cameras.watchdog import CameraWatchdog
from pipeline.config import Settings
from pipeline.delivery.camera_status import CameraStatusStage
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts, SubscriptionStore
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from pipeline.runtime.envelope import Envelope, Record, RecordError, Reject, StageResult
from pipeline.runtime.failover import member_leases
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.runtime.topics import DEFECTS
from schemas.events import DefectEvent

log = get_logger(__name__)


@dataclass
class DeliverStats:
    records: int = 0
    invalid: int = 0
    fanned_out: int = 0
    commits: int = 0


class DeliverStage(Stage):
    """Events -> dispatcher lanes; offsets become committable as the lanes settle them."""

    def __init__(self, dispatcher: Dispatcher, store: SubscriptionStore, max_in_flight: int, reload_s: float,
                 lanes_stop: threading.Event) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.max_in_flight = max_in_flight
        self.reload_s = reload_s
        self.lanes_stop = lanes_stop
        self.fanned_out = 0
        self.invalid = 0
        self._last_reload = float("-inf")

    def decode(self, env: Envelope) -> Any:
        # An invalid event still takes its place in the partition's settle order (as settled).
        try:
            return Record(env, DEFECTS.codec(env))
        except RecordError as exc:
            return Record(env, exc)

    def handle(self, records: Sequence[Record[Any]]) -> StageResult:
        self._reload()
        rejects: list[Reject] = []
        for rec in records:
            env = rec.envelope
            event = rec.message if isinstance(rec.message, DefectEvent) else None
            if event is None:
                self.invalid += 1
                rejects.append(Reject(env, rec.message.reason if isinstance(rec.message, RecordError)
                                      else "invalid_event: not an event"))
            self.fanned_out += self.dispatcher.submit(env.tp, env.offset, event)
        return StageResult(rejects=rejects)

    def on_tick(self) -> StageResult:
        self._reload()
        return StageResult()

    def _reload(self) -> None:
        if time.monotonic() - self._last_reload >= self.reload_s:
            self.dispatcher.set_subscriptions(self.store.all())
            self._last_reload = time.monotonic()

    def committable(self) -> dict[TopicPartition, int]:
        return dict(self.dispatcher.tracker.committable())  # type: ignore[arg-type]

    def busy(self) -> bool:
        return self.dispatcher.tracker.in_flight() >= self.max_in_flight

    def settled(self) -> bool:
        return self.dispatcher.tracker.in_flight() == 0

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.dispatcher.tracker.forget(partitions)

    def on_stop(self) -> None:
        # Lanes stop retrying; what they settled so far is committed by the runtime, the rest redelivered.
        self.lanes_stop.set()
        self.dispatcher.close()


def run_deliver(settings: Settings, stop: threading.Event, idle_exit_s: float | None = None,
                poll_timeout_ms: int = 200, max_records: int = 200, health: Health | None = None) -> DeliverStats:
    """Run until ``stop`` is set (or idle for ``idle_exit_s`` with nothing in flight).

    ``health`` gets the broker and Redis readiness checks and a beat per loop iteration.
    """
    if health is not None:
        watch_dependencies(health, settings)
    client = connect(settings.redis)
    prefix = settings.redis.key_prefix
    senders = SenderFactory(settings, client)
    lanes_stop = threading.Event()
    dispatcher = Dispatcher(settings.deliver, DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s),
                            ReplayAlerts(client, prefix), senders, lanes_stop)
    # Camera health (camera_down/up) to subscriptions: a second runtime on its own topic and group.
    status_stop = threading.Event()
    status_stage = CameraStatusStage(settings, client, senders, status_stop)
    status_runtime = StreamRuntime(settings.kafka, CameraStatusStage.runtime_config(settings, poll_timeout_ms),
                                   status_stage, stop=status_stop)
    status_thread = threading.Thread(target=status_runtime.run, name="camera-status-runtime", daemon=True)
    status_thread.start()
    # The camera watchdog (cameras no capture worker holds) lives here: it must not die with the
    # capture workers, a site always runs deliver workers, and a camera_down reaches nobody without
    # one anyway (the alert worker also always runs, but would add a second process the alarm
    # depends on). Its own thread: a slow subscriber holding up the camera-status runtime must not
    # delay noticing a blind line. Several deliver workers: the Redis down marker keeps it once only.
    watchdog_publisher = StatusPublisher(settings)  # its producer is made on the first camera_down
    watchdog_thread: threading.Thread | None = None
    if settings.capture.watchdog:
        watchdog = CameraWatchdog(settings, client, watchdog_publisher)
        watchdog_thread = threading.Thread(target=watchdog.run, args=(status_stop,), name="camera-watchdog",
                                           daemon=True)
        watchdog_thread.start()
    stage = DeliverStage(dispatcher, SubscriptionStore(client, prefix), settings.deliver.max_in_flight,
                         settings.deliver.reload_s, lanes_stop)
    config = RuntimeConfig(name="deliver", group_id=settings.deliver.group_id, topics=("defects",),
                           max_batch=max_records, poll_timeout_ms=poll_timeout_ms, idle_exit_s=idle_exit_s)
    try:
        rs = StreamRuntime(settings.kafka, config, stage, health=health, stop=stop,
                           failover=member_leases(settings, settings.deliver.group_id, "deliver")).run()
    finally:
        status_stop.set()
        status_thread.join(15.0)
        if watchdog_thread is not None:
            watchdog_thread.join(15.0)
        watchdog_publisher.close()
        stage.on_stop()
        senders.close()
        client.close()
    stats = DeliverStats(records=rs.records, invalid=stage.invalid, fanned_out=stage.fanned_out,
                         commits=rs.commits)
    log.info("deliver_worker_stopped", **asdict(stats))
    return stats
