"""Finding an event's original peak frame: in the frames topic while retained, or in a recording."""

from __future__ import annotations

import time
from pathlib import Path

from kafka import TopicPartition

from pipeline.bus import make_consumer
from pipeline.config import KafkaSettings
from pipeline.recording import iter_recording
from schemas.events import DefectEvent
from schemas.frames import FrameHeader


class FrameNotFoundError(LookupError):
    pass


def frame_from_topic(kafka: KafkaSettings, event: DefectEvent, timeout_s: float = 15.0) -> bytes:
    """The peak frame's JPEG at the event's ``peak_source`` offset; checks camera and seq match."""
    src = event.peak_source
    if src is None:
        raise FrameNotFoundError(f"event {event.event_id} does not say where its peak frame lies "
                                 "(made before linewatch recorded frame offsets): give --recording")
    consumer = make_consumer(kafka, None, [])
    tp = TopicPartition(src.topic, src.partition)
    try:
        consumer.assign([tp])
        first = consumer.beginning_offsets([tp]).get(tp, 0)
        if src.offset < first:
            raise FrameNotFoundError(f"frame {src.topic}:{src.partition}:{src.offset} is no longer retained "
                                     f"(partition starts at {first}): give --recording")
        consumer.seek(tp, src.offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rec in consumer.poll(timeout_ms=500, max_records=1).get(tp, []):
                if rec.offset != src.offset:
                    raise FrameNotFoundError(f"offset {src.offset} of {src.topic}:{src.partition} is gone")
                header = FrameHeader.from_headers(rec.headers)
                if (header.camera_id, header.seq) != (event.camera_id, event.peak_seq):
                    raise FrameNotFoundError(f"offset {src.offset} holds {header.camera_id} seq {header.seq}, "
                                             f"not {event.camera_id} seq {event.peak_seq}")
                return bytes(rec.value)
        raise FrameNotFoundError(f"frame {src.topic}:{src.partition}:{src.offset} not read within {timeout_s} s")
    finally:
        consumer.close()


def frame_from_recording(path: Path, event: DefectEvent) -> bytes:
    """The peak frame from a recording (root, camera folder or segment), by camera, seq and time."""
    for frame in iter_recording(path, event.camera_id, t_from=event.first_ts - 1.0, t_to=event.last_ts + 1.0):
        if frame.seq == event.peak_seq:
            return frame.jpeg()
    raise FrameNotFoundError(f"no frame {event.camera_id} seq {event.peak_seq} in recording {path}")


def peak_frame(kafka: KafkaSettings, event: DefectEvent, recording: Path | None = None) -> bytes:
    if recording is not None:
        return frame_from_recording(recording, event)
    return frame_from_topic(kafka, event)
