"""Recording camera frames to disk as time segments, with retention by size and age.

- :mod:`~pipeline.recording.segments`: the folder layout, segment names and discovery;
- :mod:`~pipeline.recording.writer`: :class:`Recorder` writes frames into segments;
- :mod:`~pipeline.recording.retention`: whole closed segments deleted by age and total size;
- :mod:`~pipeline.recording.reader`: :func:`iter_recording` reads a recording back in capture-time order;
- :mod:`~pipeline.recording.from_camera`: recording a camera through the capture stage;
- :mod:`~pipeline.recording.from_topic`: recording the frames topic on the stream runtime.
"""

from pipeline.recording.from_camera import RecorderPublisher, record_from_source
from pipeline.recording.from_topic import RecordStage, default_group_id, record_from_topic
from pipeline.recording.reader import RecordedFrame, iter_recording
from pipeline.recording.retention import SegmentInfo, enforce_retention
from pipeline.recording.segments import DEFAULT_SEGMENT_S, last_recorded_seq, segment_name, slot_start
from pipeline.recording.writer import DEFAULT_RETENTION_EVERY, Recorder, RecordStats, SegmentWriter

__all__ = [
    "DEFAULT_RETENTION_EVERY",
    "DEFAULT_SEGMENT_S",
    "RecordStage",
    "RecordStats",
    "RecordedFrame",
    "Recorder",
    "RecorderPublisher",
    "SegmentInfo",
    "SegmentWriter",
    "default_group_id",
    "enforce_retention",
    "iter_recording",
    "last_recorded_seq",
    "record_from_source",
    "record_from_topic",
    "segment_name",
    "slot_start",
]
