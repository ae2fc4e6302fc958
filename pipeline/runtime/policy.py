"""The one error policy of every stream worker.

- A record that cannot be handled (decode, stage, building or producing its output) goes to the DLQ
  with its reason and the worker goes on (see ``loop.StreamRuntime``).
- Infrastructure that is down (broker, Redis) is not the record's fault: the batch is rolled back
  and retried with backoff, readiness turns false, liveness stays true, and the worker never exits.
- A dead-letter copy always fits the producer's request limit: a large value is cut and headers
  carry the original size and sha256.
"""

from __future__ import annotations

import hashlib
import random
import time

import redis
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from pipeline.runtime.envelope import Envelope, Headers
from schemas import DeadLetter

DLQ_HEADER_KEY = "linewatch-dlq"
DLQ_SIZE_HEADER = "linewatch-dlq-original-size"
DLQ_SHA256_HEADER = "linewatch-dlq-original-sha256"
# Record batch framing, the DeadLetter header and kafka-python's size estimate all need room.
DLQ_OVERHEAD_BYTES = 16 * 1024
# Original headers larger than this are left out of the copy (their size still counts in the hash).
MAX_COPIED_HEADER_BYTES = 64 * 1024

# Errors the broker gives for this record and never for another: retrying cannot help.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
    InvalidTimestampError, InvalidTopicError,
)


def is_record_error(exc: BaseException) -> bool:
    """The output itself is refused (too large, invalid): dead-letter its source, do not retry."""
    return isinstance(exc, RECORD_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """Infrastructure trouble (broker or Redis unreachable, timeouts): wait and retry the batch."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.BusyLoadingError):
        return True
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN", "READONLY")):
        return True
    if isinstance(exc, KafkaError):
        return not is_record_error(exc)
    return isinstance(exc, ConnectionError | TimeoutError)


def reason_code(reason: str) -> str:
    """The part of a reason before the first colon: a bounded metric label."""
    return reason.split(":", 1)[0].strip()[:64] or "unknown"


class Backoff:
    """Exponential backoff with jitter: 0.2 s doubling up to ``max_s``."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 5.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2 ** min(self.failures, 16)))
        self.failures += 1
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.failures = 0


def dead_letter_copy(env: Envelope, reason: str, stage: str, limit_bytes: int,
                     now: float | None = None) -> tuple[bytes | None, Headers]:
    """Value and headers of the DLQ copy of ``env``, together within ``limit_bytes``.

    The value is kept whole when it fits, else cut to what fits; the original headers ride along
    when small. Either way the ``linewatch-dlq`` header (a ``DeadLetter``) records the original
    size and sha256, so the cut copy can still be matched with the original.
    """
    value = env.value
    original_size = len(value) if value is not None else 0
    digest = hashlib.sha256(value or b"").hexdigest()
    kept_headers = [(k, v) for k, v in env.headers
                    if k not in (DLQ_HEADER_KEY, DLQ_SIZE_HEADER, DLQ_SHA256_HEADER)]
    overhead = min(DLQ_OVERHEAD_BYTES, limit_bytes // 2)
    if sum(len(k) + len(v or b"") for k, v in kept_headers) > min(MAX_COPIED_HEADER_BYTES, limit_bytes // 4):
        kept_headers = []
    headers_size = sum(len(k) + len(v or b"") for k, v in kept_headers)
    room = max(0, limit_bytes - overhead - headers_size - len(env.key or b""))
    truncated = value is not None and len(value) > room
    if truncated:
        value = value[:room]  # type: ignore[index]
    letter = DeadLetter(
        reason=reason[:1000], stage=stage, source_topic=env.topic, source_partition=env.partition,
        source_offset=env.offset, key=env.key_text[:256] if env.key_text else None,
        ts=time.time() if now is None else now, original_size=original_size, sha256=digest,
        truncated=truncated,
    )
    headers: Headers = (*kept_headers, (DLQ_HEADER_KEY, letter.model_dump_json().encode()),
                        (DLQ_SIZE_HEADER, str(original_size).encode()), (DLQ_SHA256_HEADER, digest.encode()))
    return value, headers
