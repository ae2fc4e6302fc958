"""Recording from the frames topic: a consumer group on the stream runtime feeding the recorder."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import KafkaSettings, Settings
from pipeline.imaging import sniff_encoding
from pipeline.logging import get_logger
from pipeline.recording.segments import DEFAULT_SEGMENT_S
from pipeline.recording.writer import Recorder, RecordStats
from pipeline.runtime.envelope import Envelope, Record, RecordError, Skip, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.runtime.topics import FRAMES
from schemas.frames import FrameRef

_log = get_logger(__name__)


def default_group_id(kafka: KafkaSettings, camera_id: str | None) -> str:
    """The recorder's consumer group: one per topic prefix and camera, so a restart resumes."""
    return f"{kafka.topic_prefix}-record-{camera_id or 'all'}"


class RecordStage(Stage):
    """Frames of the wanted camera(s) -> the recorder; other cameras and replays are skipped."""

    def __init__(self, recorder: Recorder, camera_id: str | None, max_frames: int | None,
                 stop: threading.Event) -> None:
        self.recorder = recorder
        self.camera_id = camera_id
        self.max_frames = max_frames
        self.stop = stop

    def decode(self, env: Envelope) -> Record[FrameRef] | Skip:
        stats = self.recorder.stats
        key = env.key_text
        if self.camera_id is not None and key is not None and key != self.camera_id:
            stats.ignored += 1  # cheap check first: most records of a busy topic are other cameras'
            return Skip(env, "other_camera")
        try:
            header = FRAMES.codec(env)
        except RecordError:
            stats.skipped += 1
            raise
        if (self.camera_id is not None and header.camera_id != self.camera_id) or header.replay_session is not None:
            # Replayed frames are re-published recordings, not camera footage.
            stats.ignored += 1
            return Skip(env, "not_recorded")
        # Files are written as .jpg and replayed as JPEG: the bytes must be one, whatever the header says.
        if not env.value or header.encoding != "jpeg" or sniff_encoding(env.value) != "jpeg":
            stats.skipped += 1
            raise RecordError("unusable_frame", f"encoding {header.encoding}, {len(env.value or b'')} bytes")
        return Record(env, header.ref())

    def handle(self, records: Sequence[Record[FrameRef]]) -> StageResult:
        for rec in records:
            if self.max_frames is not None and self.recorder.stats.frames >= self.max_frames:
                break
            self.recorder.write(rec.envelope.value or b"", rec.message)
        if self.max_frames is not None and self.recorder.stats.frames >= self.max_frames:
            self.stop.set()
        return StageResult()


def record_from_topic(
    settings: Settings,
    camera_id: str | None,
    root: str | Path,
    stop: threading.Event,
    max_frames: int | None = None,
    *,
    segment_s: float = DEFAULT_SEGMENT_S,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
    group_id: str | None = None,
    idle_exit_s: float | None = None,
    poll_timeout_ms: int = 200,
) -> RecordStats:
    """Record frames of ``camera_id`` (None: every camera) from the frames topic.

    Runs on the stream runtime in its own consumer group (default ``default_group_id``): offsets
    are committed after the frames of a batch are written, so a restarted recorder resumes where it
    stopped; a new group starts at the earliest retained record. Redelivered frames are dropped by
    seq. JPEG values are written as received. Records without a valid frame header go to the DLQ;
    frames of replay sessions are ignored. Runs until ``stop`` is set, ``max_frames`` were written,
    or no record arrived for ``idle_exit_s`` once partitions were assigned.
    """
    kafka = settings.kafka
    if kafka.bootstrap_servers is None:
        raise ValueError("no Kafka bootstrap servers configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    group = group_id or default_group_id(kafka, camera_id)
    recorder = Recorder(root, camera_id, segment_s=segment_s, max_bytes=max_bytes, max_age_s=max_age_s)
    _log.info("record_started", root=str(root), camera=camera_id or "*", group=group)
    # With a frame limit, one record per batch: the runtime commits whole batches.
    config = RuntimeConfig(name="record", group_id=group, topics=("frames",), idle_exit_s=idle_exit_s,
                           poll_timeout_ms=poll_timeout_ms, max_batch=1 if max_frames is not None else 100)
    try:
        StreamRuntime(kafka, config, RecordStage(recorder, camera_id, max_frames, stop), stop=stop).run()
    finally:
        recorder.close()
    return recorder.stats
