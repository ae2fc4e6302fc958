"""What the runtime hands to stages and takes back from them: broker records as plain values.

An :class:`Envelope` is one consumed record (value, headers, key, broker timestamp, topic,
partition, offset) with no Kafka client attached, so stages are unit-tested by building envelopes
by hand. Decoding an envelope gives a :class:`Record` (typed message), a :class:`Reject` (goes to
the DLQ with its reason) or a :class:`Skip` (dropped on purpose, e.g. a stale frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kafka import TopicPartition

T = TypeVar("T")
Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Envelope:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int = -1  # the broker's timestamp (create or append time); -1 when unknown

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def key_text(self) -> str | None:
        return self.key.decode("utf-8", "replace") if self.key is not None else None

    @property
    def size(self) -> int:
        """Bytes on the wire, roughly: value, key and headers."""
        return (len(self.value or b"") + len(self.key or b"")
                + sum(len(k) + len(v or b"") for k, v in self.headers))

    @classmethod
    def from_record(cls, rec: Any) -> Envelope:
        """From a kafka-python ``ConsumerRecord``."""
        return cls(topic=rec.topic, partition=rec.partition, offset=rec.offset, value=rec.value, key=rec.key,
                   headers=tuple((k, v) for k, v in (rec.headers or [])),
                   timestamp_ms=rec.timestamp if isinstance(rec.timestamp, int) else -1)


class RecordError(Exception):
    """Raised by a codec or stage for a record that can never be handled: ``code: detail``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = f"{code}: {detail}"


@dataclass(frozen=True, slots=True)
class Record(Generic[T]):
    """A decoded record: the typed message and where it came from."""

    envelope: Envelope
    message: T


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that goes to the DLQ; ``reason`` is ``code: detail``."""

    envelope: Envelope
    reason: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A record dropped on purpose (counted, committed, not dead-lettered)."""

    envelope: Envelope
    reason: str


Decoded = Record[Any] | Reject | Skip


@dataclass(frozen=True, slots=True)
class Output:
    """A record a stage wants produced. ``topic`` is a logical name ("scores") or a full one.

    ``source`` is the input it was made from: if the output can never be produced (too large, refused
    by the broker), that input goes to the DLQ with the reason.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = ()
    source: Envelope | None = None

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key or b"") + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(slots=True)
class StageResult:
    """What a stage made of a batch: outputs to produce and records to dead-letter."""

    outputs: list[Output] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def extend(self, other: StageResult) -> None:
        self.outputs.extend(other.outputs)
        self.rejects.extend(other.rejects)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
