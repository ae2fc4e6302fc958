"""Operator labels on defect events, and what a false alarm teaches.

``label_event`` is what the API route and ``linewatch events label`` both call:
1. a false alarm's peak frame (frames topic while retained, else a recording) joins the event's
   product class as a new reference set version (scorers pick it up within ``references.poll_s``);
2. the label is kept with the event in the API's event store;
3. it is published on the ``labels`` topic (key: event id) for audit, and counted in metrics.
A failure to teach or to publish is reported on the label, never loses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis
from kafka import KafkaProducer
from kafka.errors import KafkaError
from redis.exceptions import RedisError

from pipeline.api.store import EventStore
from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.config import Settings
from pipeline.engine.engine import list_images
from pipeline.logging import get_logger
from pipeline.metrics import EVENT_LABELS
from pipeline.references.frames import FrameNotFoundError, peak_frame
from pipeline.references.store import ReferenceSet, ReferenceStore
from schemas.events import DefectEvent
from schemas.labels import Label, LabelValue

log = get_logger(__name__)

LABELS_TOPIC = "labels"


class UnknownEventError(KeyError):
    pass


@dataclass
class LabelResult:
    label: Label
    published: bool
    publish_error: str | None = None


def seed_images(settings: Settings, product_class: str) -> list[bytes]:
    """The configured shots_dir images of a class: the base a first taught version starts from,
    so teaching never replaces the start-up references with one frame."""
    shots = settings.engine.shots_dir
    if shots is None:
        return []
    folder = shots / product_class if (shots / product_class).is_dir() else shots
    if not folder.is_dir():
        return []
    paths = list_images(folder)
    if settings.engine.k_shot:
        paths = paths[: settings.engine.k_shot]
    return [p.read_bytes() for p in paths]


def teach(settings: Settings, refs: ReferenceStore, event: DefectEvent, recording: Path | None = None,
          by: str | None = None, note: str | None = None) -> ReferenceSet:
    """Add the event's peak frame to its class's normal reference set (a new current version)."""
    jpeg = peak_frame(settings.kafka, event, recording)
    parent = refs.current(event.product_class)
    images = [jpeg]
    if parent is None:
        images = seed_images(settings, event.product_class) + images
    return refs.create(event.product_class, images, source=f"false_alarm:{event.event_id}", parent=parent,
                       note=note, by=by)


class LabelPublisher:
    """The ``labels`` topic; a producer made on first use (None: no Kafka configured)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: KafkaProducer | None = None

    def publish(self, label: Label) -> None:
        kafka = self.settings.kafka
        if kafka.bootstrap_servers is None:
            raise KafkaError("no kafka.bootstrap_servers configured")
        if self._producer is None:
            create_topics(kafka, names=(LABELS_TOPIC,))
            self._producer = make_producer(kafka)
        future = self._producer.send(topic_name(kafka, LABELS_TOPIC), key=label.event_id.encode(),
                                     value=label.model_dump_json().encode())
        self._producer.flush(timeout=10)
        future.get(timeout=10)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


def label_event(settings: Settings, client: redis.Redis, event_id: str, value: LabelValue, *,
                note: str | None = None, by: str | None = None, recording: Path | None = None,
                teach_references: bool = True, publisher: LabelPublisher | None = None) -> LabelResult:
    prefix = settings.redis.key_prefix
    events = EventStore(client, prefix, settings.api.max_events)
    event = events.event(event_id)
    if event is None:
        raise UnknownEventError(f"no event {event_id!r} in the event store (is `linewatch api` ingesting?)")
    label = Label(event_id=event_id, label=value, note=note, by=by, camera_id=event.camera_id,
                  product_class=event.product_class)
    previous = events.label(event_id) or {}
    if value == "false_alarm" and teach_references:
        if previous.get("label") == "false_alarm" and previous.get("reference_version"):
            label.reference_version = previous["reference_version"]  # already taught: no second version
        else:
            try:
                ref = teach(settings, ReferenceStore(client, prefix), event, recording, by, note)
                label.reference_version = ref.tag
            except (FrameNotFoundError, KafkaError, OSError, ValueError, LookupError) as exc:
                label.teach_error = str(exc)[:300]
                log.warning("false_alarm_not_taught", event_id=event_id, error=label.teach_error)
    events.set_label(event_id, label.model_dump(mode="json"))
    EVENT_LABELS.labels(camera=event.camera_id, product_class=event.product_class, label=value).inc()
    log.info("event_labelled", event_id=event_id, label=value, by=by, camera=event.camera_id,
             reference_version=label.reference_version, teach_error=label.teach_error)
    own = publisher is None
    publisher = publisher or LabelPublisher(settings)
    try:
        publisher.publish(label)
        return LabelResult(label, True)
    except (KafkaError, RedisError) as exc:
        log.warning("label_not_published", event_id=event_id, error=repr(exc))
        return LabelResult(label, False, str(exc)[:300])
    finally:
        if own:
            publisher.close()
