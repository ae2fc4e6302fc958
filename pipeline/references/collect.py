"""Frames the line produces, for `references collect` and `calibrate`: from the frames topic or a recording."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kafka import TopicPartition

from pipeline.bus import make_consumer, topic_name, topic_partitions
from pipeline.config import KafkaSettings
from pipeline.imaging import decode_image
from pipeline.recording import iter_recording
from pipeline.references.coreset import subsample_memory
from pipeline.references.store import ReferenceSet, ReferenceStore
from schemas.frames import FrameHeader

COLLECT_CHUNK = 32

if TYPE_CHECKING:
    from pipeline.engine.engine import AnomalyEngine


def frames_from_topic(kafka: KafkaSettings, camera_id: str, n: int, retained: bool = False,
                      timeout_s: float = 120.0, say: Callable[[str], None] | None = None) -> list[bytes]:
    """``n`` frames of one camera: the next ones published (default), or the last ones still retained."""
    topic = topic_name(kafka, "frames")
    consumer = make_consumer(kafka, None, [])
    try:
        deadline = time.monotonic() + timeout_s
        tps = topic_partitions(consumer, topic, timeout_s)
        if not tps:
            raise LookupError(f"topic {topic} does not exist (is capture running?)")
        consumer.assign(tps)
        if retained:
            return _last_retained(consumer, tps, camera_id, n)
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)
        found: list[bytes] = []
        last_say = time.monotonic()
        while len(found) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(found)} of {n} frames of camera {camera_id!r} in {timeout_s:.0f} s")
            for recs in consumer.poll(timeout_ms=500).values():
                found.extend(bytes(r.value) for r in recs if _camera_of(r) == camera_id)
            if say is not None and time.monotonic() - last_say > 5:
                say(f"waiting for frames of camera {camera_id}: {len(found)}/{n}")
                last_say = time.monotonic()
        return found[:n]
    finally:
        consumer.close()


def _camera_of(rec: object) -> str | None:
    try:
        return FrameHeader.from_headers(getattr(rec, "headers", None)).camera_id
    except ValueError:
        return None


def _last_retained(consumer: object, tps: list[TopicPartition], camera_id: str, n: int) -> list[bytes]:
    begin = consumer.beginning_offsets(tps)  # type: ignore[attr-defined]
    end = consumer.end_offsets(tps)  # type: ignore[attr-defined]
    found: list[tuple[int, bytes]] = []
    for tp in tps:
        if end[tp] <= begin[tp]:
            continue
        consumer.seek(tp, begin[tp])  # type: ignore[attr-defined]
        while consumer.position(tp) < end[tp]:  # type: ignore[attr-defined]
            for recs in consumer.poll(timeout_ms=1000).values():  # type: ignore[attr-defined]
                found.extend((r.timestamp, bytes(r.value)) for r in recs if _camera_of(r) == camera_id)
        consumer.pause(tp)  # type: ignore[attr-defined]
    if not found:
        raise LookupError(f"no retained frames of camera {camera_id!r}")
    found.sort(key=lambda x: x[0])
    return [v for _, v in found[-n:]]


def frames_from_recording(path: Path, camera_id: str | None = None, n: int | None = None) -> list[bytes]:
    """A recording's frames (one camera or all), evenly thinned to ``n`` when given."""
    frames = list(iter_recording(path, camera_id))
    if not frames:
        raise LookupError(f"no frames in recording {path}" + (f" for camera {camera_id}" if camera_id else ""))
    if n is not None and len(frames) > n:
        keep = np.linspace(0, len(frames) - 1, n).round().astype(int)
        frames = [frames[i] for i in sorted(set(keep.tolist()))]
    return [f.jpeg() for f in frames]


def collect(engine: AnomalyEngine, store: ReferenceStore, product_class: str, images: list[bytes],
            max_patches: int, source: str, note: str | None = None, by: str | None = None,
            ) -> tuple[ReferenceSet, dict[str, int], dict[str, int]]:
    """A new current version from ``images``; returns it with the rows per bank before/after coreset."""
    # In chunks, re-bounded whenever the memory doubles past the budget, so N frames never need
    # N frames' features at once (the result is a coreset of coresets: a close approximation).
    total: dict[str, int] = {}
    bounded: dict[str, np.ndarray] = {}
    for start in range(0, len(images), COLLECT_CHUNK):
        part = engine.reference_features([decode_image(b) for b in images[start:start + COLLECT_CHUNK]])
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v.shape[0])
        bounded = {k: np.concatenate([bounded[k], v]) if k in bounded else v for k, v in part.items()}
        if any(v.shape[0] > 2 * max_patches for v in bounded.values()):
            bounded = subsample_memory(bounded, max_patches)
    bounded = subsample_memory(bounded, max_patches)
    ref = store.create(product_class, images, source, note=note, by=by,
                       memory={"method": engine.method, "fingerprint": engine.fingerprint, "arrays": bounded})
    return ref, total, {k: int(v.shape[0]) for k, v in bounded.items()}
