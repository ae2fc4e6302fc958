"""Every topic of linewatch and its codec, declared once.

Workers name topics by their logical name ("frames"); :func:`full_name` adds the configured prefix.
A codec turns an :class:`Envelope` into its typed message or raises :class:`RecordError` with the
reason the record goes to the DLQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.config import KafkaSettings
from pipeline.runtime.envelope import Envelope, RecordError
from schemas import DeadLetter, FrameHeader
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

Codec = Callable[[Envelope], Any]


def brief(exc: BaseException) -> str:
    """One line for a validation error: how many, and the first with where it is."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "<root>"
        return f"{exc.error_count()} error(s), first at {where}: {first['msg']}"[:300]
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def json_codec(model: Any, code: str) -> Codec:
    def decode(env: Envelope) -> Any:
        if not env.value:
            raise RecordError("empty", "record has no value")
        try:
            return model.model_validate_json(env.value)
        except (ValidationError, ValueError, TypeError) as exc:
            raise RecordError(code, brief(exc)) from None

    return decode


def frame_header_codec(env: Envelope) -> FrameHeader:
    """Only the frame's header: decoding the image is the scoring stage's job (it knows the limits)."""
    try:
        return FrameHeader.from_headers(list(env.headers))
    except (ValidationError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise RecordError("bad_header", brief(exc)) from None


def dead_letter_codec(env: Envelope) -> DeadLetter:
    from pipeline.bus import read_dead_letter

    try:
        return read_dead_letter(list(env.headers))
    except (ValidationError, ValueError) as exc:
        raise RecordError("bad_dead_letter", brief(exc)) from None


@dataclass(frozen=True)
class Topic:
    name: str  # logical name
    codec: Codec
    doc: str


FRAMES = Topic("frames", frame_header_codec, "camera frames: key camera id, value JPEG/PNG, header FrameHeader JSON")
SCORES = Topic("scores", json_codec(ScoreMessage, "invalid_score"), "ScoreMessage JSON per scored frame")
DEFECTS = Topic("defects", json_codec(DefectEvent, "invalid_event"), "DefectEvent JSON per open/close")
DLQ = Topic("dlq", dead_letter_codec, "dead letters: the (cut) original value, DeadLetter JSON header")
CAMERA_STATUS = Topic(CAMERA_STATUS_TOPIC, json_codec(CameraStatus, "invalid_camera_status"),
                      "CameraStatus JSON when a camera goes dark or comes back")

TOPICS: dict[str, Topic] = {t.name: t for t in (FRAMES, SCORES, DEFECTS, DLQ, CAMERA_STATUS)}
LIVE_TOPICS: tuple[str, ...] = tuple(TOPICS)


def full_name(kafka: KafkaSettings, name: str) -> str:
    """The topic's name on the broker; idempotent, so a full name passes through unchanged."""
    return name if name.startswith(f"{kafka.topic_prefix}.") else kafka.topic(name)


def logical_name(kafka: KafkaSettings, name: str) -> str:
    prefix = f"{kafka.topic_prefix}."
    return name[len(prefix):] if name.startswith(prefix) else name


def codec_for(kafka: KafkaSettings, topic: str) -> Codec:
    """The codec of a (logical or full) topic name; unknown topics decode to the raw value."""
    found = TOPICS.get(logical_name(kafka, topic))
    return found.codec if found is not None else (lambda env: env.value)
