"""Helpers for streaming tests: publish frames, read topics, run workers in threads."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer

from pipeline.bus import create_topics, make_producer, topic_name, topic_partitions
from pipeline.config import (
    AlertSettings,
    DeliverSettings,
    EngineSettings,
    KafkaSettings,
    RedisSettings,
    ScoringSettings,
    Settings,
)
from pipeline.engine.engine import AnomalyEngine
from pipeline.imaging import encode_jpeg
from schemas import FrameHeader
from tests.engine_helpers import SMALL, backbone


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """Ctrl-C every worker process still running, then wait for each; kill the ones that hang."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()


def small_engine(method: str = "winclip", cache: Any = None) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(method=method, backbone=SMALL, pretrained="random", precision="fp32")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp, cache=cache)


def site_settings(kafka: KafkaSettings, redis: RedisSettings | None = None, **scoring: Any) -> Settings:
    """Small-engine settings; consumer groups are named after the test's topic prefix, because a
    group shared with an earlier test (on the one session broker) can hold up the next join."""
    prefix = kafka.topic_prefix
    return Settings(
        kafka=kafka,
        redis=redis or RedisSettings(),
        engine=EngineSettings(backbone=SMALL, pretrained="random", precision="fp32"),
        scoring=ScoringSettings(**{"max_batch": 8, "max_wait_ms": 100, "staleness_s": None,
                                   "group_id": f"{prefix}-score", **scoring}),
        alert=AlertSettings(group_id=f"{prefix}-alert"),
        deliver=DeliverSettings(group_id=f"{prefix}-deliver"),
    )


def frame_header(camera: str, seq: int, image: np.ndarray, **kw: Any) -> FrameHeader:
    fields: dict[str, Any] = {"camera_id": camera, "line_id": "line-1", "product_class": "ball_screw", "seq": seq,
                              "capture_ts": time.time(), "width": image.shape[1], "height": image.shape[0]}
    fields.update(kw)
    return FrameHeader(**fields)


def publish_frames(kafka: KafkaSettings, frames: list[tuple[str, int, np.ndarray]], **header_kw: Any) -> None:
    """(camera, seq, rgb) tuples -> frames topic, like the capture worker does."""
    create_topics(kafka)
    producer = make_producer(kafka)
    for camera, seq, image in frames:
        header = frame_header(camera, seq, image, **header_kw)
        producer.send(topic_name(kafka, "frames"), key=camera.encode(), value=encode_jpeg(image),
                      headers=header.to_header())
    producer.flush()
    producer.close()


def read_topic(kafka: KafkaSettings, name: str, min_count: int, timeout_s: float = 60.0,
               until: Callable[[list], bool] | None = None) -> list:
    """All records of a topic (manual assignment, from the start) once min_count are there."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    topic = topic_name(kafka, name)
    deadline = time.monotonic() + timeout_s
    tps = topic_partitions(consumer, topic, timeout_s)
    if not tps:
        consumer.close()
        raise TimeoutError(f"topic {topic} has no partitions after {timeout_s} s")
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records: list = []
    try:
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                records.extend(recs)
            if len(records) >= min_count and (until is None or until(records)):
                break
    finally:
        consumer.close()
    return records


class Background:
    """Run a worker function ``fn(*args, stop, **kwargs)`` in a thread; ``join`` stops it and joins,
    ``wait`` joins a worker that ends by itself (idle exit). Both re-raise the worker's error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.stop = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.name = getattr(fn, "__name__", "worker")

        def target() -> None:
            try:
                self.result = fn(*args, self.stop, **kwargs)
            except BaseException as exc:  # surfaced by join()/wait()
                self.error = exc

        self.thread = threading.Thread(target=target, name=self.name, daemon=True)

    def start(self) -> Background:
        self.thread.start()
        return self

    def __enter__(self) -> Background:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.join()

    def wait(self, timeout: float = 60.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(15)
            pytest.fail(f"{self.name} did not exit within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def join(self, timeout: float = 60.0) -> Any:
        self.stop.set()
        return self.wait(timeout)
