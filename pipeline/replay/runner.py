"""`linewatch replay` end to end: publish in the background, follow the session, write the report."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from redis.exceptions import RedisError
from tqdm import tqdm

from pipeline.bus import make_producer
from pipeline.config import Settings
from pipeline.delivery.store import ReplayAlerts
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from pipeline.replay.deliveries import await_deliveries
from pipeline.replay.inputs import ReplayInput
from pipeline.replay.replay import Published, SessionFollower, publish_frames
from pipeline.replay.report import RunSummary, write_report
from pipeline.site import close_wait_s
from schemas.events import DefectEvent

log = get_logger(__name__)

# After the last frame is accounted for and no event is open: how long no record of the session
# may arrive before the run is over (the alert worker may still be opening an event).
SETTLE_S = 2.0
# After the run: how long the deliver worker may take to settle the session's deliveries (retries included).
DELIVERY_WAIT_S = 60.0


def new_session(kind: str = "replay") -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def run_replay(settings: Settings, source: ReplayInput, source_desc: str, report_dir: Path, *,
               speed: float | None, alerts: bool = False, session: str | None = None,
               stop: threading.Event | None = None, progress: bool = True,
               first_score_timeout_s: float = 600.0, stall_timeout_s: float = 120.0,
               worker_check: Callable[[], str | None] | None = None,
               on_event: Callable[[DefectEvent], None] | None = None,
               delivery_wait_s: float = DELIVERY_WAIT_S) -> tuple[RunSummary, Path]:
    """Replay ``source`` through the deployed workers; returns the summary and the report path.

    ``worker_check`` (for embedded workers) returns an error when a worker died, ending the run.
    Stalls end the run too, with ``complete=False`` and a note saying what was missing. With
    ``alerts``, the summary counts what the deliver worker did with the session's events (waiting up to
    ``delivery_wait_s`` for it once the run is complete).
    """
    stop = stop or threading.Event()
    session = session or new_session()
    started = time.monotonic()
    summary = RunSummary(kind="replay", session=session, source=source_desc, speed=speed)
    if alerts:
        client = connect(settings.redis)
        try:
            ReplayAlerts(client, settings.redis.key_prefix).enable(session)
        finally:
            client.close()
    follower = SessionFollower(settings.kafka, session, on_event)
    producer = make_producer(settings.kafka)
    published = Published()
    publisher = threading.Thread(target=publish_frames, name="replay-publish", daemon=True,
                                 args=(source, producer, settings.kafka, session, speed, stop, published),
                                 # A video's loaders hold every frame's bytes: keep none of them.
                                 kwargs={"keep_loaders": source.reloadable})
    log.info("replay_started", session=session, source=source_desc, speed=speed, alerts=alerts)
    publisher.start()
    close_wait = close_wait_s(settings.alert)
    bar = tqdm(total=source.total, unit="frame", desc=session, disable=not progress, file=sys.stderr)
    last_seen = time.monotonic()
    try:
        while True:
            if follower.poll(timeout_ms=200):
                last_seen = time.monotonic()
            bar.update(follower.accounted - bar.n)
            idle = time.monotonic() - last_seen
            note = _finished(published, follower, idle, stall_timeout_s, first_score_timeout_s, stop,
                             worker_check, close_wait)
            if note is not None:
                if note:
                    summary.complete = False
                    summary.notes.append(note)
                break
        if alerts:
            _count_deliveries(settings, follower, summary, stop, delivery_wait_s if summary.complete else 0.0)
    finally:
        stop.set()  # ends the publisher if the run ended early
        publisher.join(30)
        bar.close()
        producer.close(timeout=5)
        follower.close()
    summary.frames_published = published.frames
    summary.frames_scored = len(follower.scores)
    summary.frames_rejected = len(follower.rejected)
    summary.events = len(follower.events)
    summary.span_s = published.span_s
    summary.publish_s = published.seconds
    summary.wall_s = time.monotonic() - started

    def lookup(camera: str, seq: int) -> bytes | None:
        load = published.loaders.get((camera, seq))
        return load() if load else None

    path = write_report(report_dir, summary, list(follower.scores.values()), list(follower.events.values()),
                        lookup)
    log.info("replay_finished", session=session, frames=summary.frames_published, scored=summary.frames_scored,
             events=summary.events, complete=summary.complete, report=str(path))
    return summary, path


def _count_deliveries(settings: Settings, follower: SessionFollower, summary: RunSummary, stop: threading.Event,
                      wait_s: float) -> None:
    try:
        counts = await_deliveries(settings, follower.transitions, stop, wait_s)
    except (RedisError, OSError, ValueError) as exc:
        summary.notes.append(f"deliveries not counted: {type(exc).__name__}: {exc}")
        return
    summary.deliveries = counts.as_dict()
    summary.dead_letter_subscriptions = counts.dead_subscriptions
    if counts.pending:
        summary.notes.append(f"{counts.pending} deliveries still pending after {wait_s:.0f} s "
                             f"(is a deliver worker running?)")


def _finished(published: Published, follower: SessionFollower, idle_s: float, stall_timeout_s: float,
              first_score_timeout_s: float, stop: threading.Event,
              worker_check: Callable[[], str | None] | None, close_wait: float = 0.0) -> str | None:
    """None: keep going; "": done and complete; otherwise why the run ends incomplete.

    ``close_wait``: how long alerting may take to close the last event once frames stop."""
    if published.error:
        return f"publishing failed: {published.error}"
    if worker_check is not None:
        problem = worker_check()
        if problem:
            return problem
    if published.done and follower.accounted >= published.frames and follower.open_events == 0:
        return "" if idle_s >= SETTLE_S else None
    if stop.is_set() and not published.done:
        return None  # the publisher is winding down; its stats come next
    if stop.is_set():
        return "interrupted"
    # The model may still be loading before the first score: allow that longer.
    limit = stall_timeout_s if follower.scores else max(stall_timeout_s, first_score_timeout_s)
    missing = published.frames - follower.accounted
    if missing <= 0:
        limit = max(limit, close_wait)  # only events are left: give alerting its time to close them
    if published.done and idle_s >= limit:
        if missing > 0:
            return f"stalled: {missing} frame(s) never scored within {limit:.0f} s (are score workers running?)"
        return f"{follower.open_events} event(s) still open after {limit:.0f} s (is an alert worker running?)"
    return None
