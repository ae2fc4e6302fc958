"""Fault campaign: workers as processes on a real broker and a real Redis, under faults (issue 15).

    python bench/faults.py [--scenario NAME] [--small] [--keep-logs DIR]

Every scenario starts its own embedded tansu broker and its own Redis (valkey/redis-server on a
free port, so it can be killed and restarted), runs the workers as deployed
(`python -m pipeline.cli score|alert|deliver|capture`, configured through LINEWATCH_* variables)
with the small random-weight backbone (ViT-S-32) and small frames, injects its fault and prints one
table row: frames sent/scored/lost/duplicated scores; events expected/emitted/duplicated/never
closed; deliveries expected/made/dead-lettered; recovery (the longest stall of the output after the
fault); the peak RSS of each worker (VmHWM from /proc).

"Duplicated scores" are score records for a frame already scored: at-least-once delivery allows
them after a SIGKILL (the killed batch was scored but not committed); the promise checked is that
no frame is lost and no (event id, status) is emitted twice. ``Row.ok`` says whether a row keeps
the promises; tests/test_faults.py runs the fast scenarios (1, 2, 7) through these functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

# This directory holds a file named like the package (pipeline.py): the repository root goes first.
ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import itertools

from pipeline.bus import create_topics, make_producer, read_dead_letter
from pipeline.config import KafkaSettings
from pipeline.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from pipeline.imaging import encode_jpeg, encode_png, quantize_map
from pipeline.logging import configure_logging
from schemas import FrameRef, ScoreMessage
from schemas.events import DefectEvent
from schemas.frames import FRAME_HEADER_KEY

SMALL_BACKBONE = "ViT-S-32"
Headers = list[tuple[str, bytes]]


# -- results --------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    note: str = ""
    frames_sent: int | None = None
    frames_scored: int | None = None
    frames_lost: int | None = None
    scores_duplicated: int | None = None
    events_expected: int | None = None
    events_emitted: int | None = None
    events_duplicated: int | None = None
    events_never_closed: int | None = None
    deliveries_expected: int | None = None
    deliveries_made: int | None = None
    dead_lettered: int | None = None
    recovery_s: float | None = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)  # raw figures for tests, not printed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.frames_lost and not self.events_duplicated \
            and not self.events_never_closed and (self.events_expected is None
                                                  or self.events_emitted == self.events_expected)


COLUMNS = ["scenario", "frames sent/scored/lost/dup", "events exp/emit/dup/open", "deliv exp/made/dlq",
           "recovery s", "peak RSS MB", "ok", "notes"]


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def format_row(row: Row) -> str:
    frames = "/".join(_n(v) for v in (row.frames_sent, row.frames_scored, row.frames_lost, row.scores_duplicated))
    events = "/".join(_n(v) for v in (row.events_expected, row.events_emitted, row.events_duplicated,
                                      row.events_never_closed))
    deliv = "/".join(_n(v) for v in (row.deliveries_expected, row.deliveries_made, row.dead_lettered))
    rss = " ".join(f"{k}:{v:.0f}" for k, v in row.peak_rss_mb.items()) or "-"
    extra = "; ".join(f"{k}={v}" for k, v in row.extra.items())
    notes = "; ".join(x for x in (row.note, extra, *row.problems) if x)
    rec = "-" if row.recovery_s is None else f"{row.recovery_s:.1f}"
    return "| " + " | ".join([row.scenario, frames, events, deliv, rec, rss, "yes" if row.ok else "NO", notes]) + " |"


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


# -- the rig: broker, Redis, worker processes ------------------------------------------------------
def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the peak resident set) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    peak_mb: float = 0.0


class Rig:
    """One broker, one restartable Redis, worker processes with logs and sampled peak RSS."""

    def __init__(self, workdir: Path, partitions: int = 2, **env: str) -> None:
        self.workdir = workdir
        self.prefix = f"f-{uuid.uuid4().hex[:8]}"
        self.broker = EmbeddedBroker().start()
        self.redis_port = free_port()
        self.redis = EmbeddedRedis(port=self.redis_port).start()
        self.kafka = KafkaSettings(bootstrap_servers=self.broker.bootstrap_servers, topic_prefix=self.prefix,
                                   partitions=partitions, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                                   request_timeout_ms=10_000)
        create_topics(self.kafka)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
        self.env.update({
            "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "LINEWATCH_KAFKA__TOPIC_PREFIX": self.prefix,
            "LINEWATCH_KAFKA__PARTITIONS": str(partitions),
            "LINEWATCH_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "LINEWATCH_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "LINEWATCH_REDIS__URL": self.redis.url,
            "LINEWATCH_REDIS__KEY_PREFIX": self.prefix,
            "LINEWATCH_REDIS__SOCKET_TIMEOUT_S": "2.0",
            "LINEWATCH_ENGINE__BACKBONE": SMALL_BACKBONE,
            "LINEWATCH_ENGINE__PRETRAINED": "random",
            "LINEWATCH_ENGINE__PRECISION": "fp32",
            "LINEWATCH_SCORING__MAX_BATCH": "4",
            "LINEWATCH_SCORING__MAX_WAIT_MS": "100",
            "LINEWATCH_SCORING__STALENESS_S": "null",
            "LINEWATCH_SCORING__GROUP_ID": f"{self.prefix}-score",
            "LINEWATCH_ALERT__GROUP_ID": f"{self.prefix}-alert",
            "LINEWATCH_DELIVER__GROUP_ID": f"{self.prefix}-deliver",
            **env,
        })
        self.workers: list[Worker] = []
        self._tails: dict[str, tuple[KafkaConsumer, list[int]]] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            for w in self.workers:
                if w.proc.poll() is None:
                    w.peak_mb = max(w.peak_mb, peak_rss_mb(w.proc.pid) or 0.0)

    def start(self, name: str, args: list[str], **env: str) -> Worker:
        log = self.workdir / f"{len(self.workers):02d}-{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env={**self.env, **env},
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        w = Worker(name, proc, log)
        self.workers.append(w)
        return w

    def kill(self, w: Worker) -> None:
        w.peak_mb = max(w.peak_mb, peak_rss_mb(w.proc.pid) or 0.0)
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(15)

    def stop(self, w: Worker, timeout: float = 60) -> int | None:
        """SIGTERM and wait; the worker's exit code (None: it had to be killed)."""
        if w.proc.poll() is not None:
            return w.proc.returncode
        w.peak_mb = max(w.peak_mb, peak_rss_mb(w.proc.pid) or 0.0)
        w.proc.send_signal(signal.SIGTERM)
        try:
            return w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(10)
            return None

    def alive(self, w: Worker) -> bool:
        return w.proc.poll() is None

    def tail(self, w: Worker, n: int = 2000) -> str:
        return w.log.read_text(errors="replace")[-n:]

    def log_events(self, w: Worker, event: str) -> list[dict[str, Any]]:
        out = []
        for line in w.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event:
                    out.append(rec)
        return out

    def peaks(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in self.workers:
            out[w.name] = max(out.get(w.name, 0.0), w.peak_mb)
        return out

    def settings_redis(self) -> Any:
        from pipeline.config import RedisSettings

        return RedisSettings(url=self.redis.url, key_prefix=self.prefix)

    def restart_redis(self, down_s: float) -> None:
        self.redis.stop()
        time.sleep(down_s)
        self.redis = EmbeddedRedis(port=self.redis_port).start()

    def close(self) -> None:
        self._stop.set()
        for consumer, _ in self._tails.values():
            consumer.close(autocommit=False)
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)
        self.redis.stop()
        self.broker.stop()

    # -- topics -------------------------------------------------------------------------------------
    def _partitions(self, name: str) -> list[TopicPartition]:
        return [TopicPartition(self.kafka.topic(name), p) for p in range(self.kafka.partitions)]

    def _from_start(self, name: str) -> KafkaConsumer:
        """A consumer of no group, assigned every partition of a topic, at its beginning."""
        consumer = KafkaConsumer(**self.kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
        try:
            tps = self._partitions(name)
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
        except BaseException:
            consumer.close(autocommit=False)
            raise
        return consumer

    def read(self, name: str) -> list[Any]:
        """Every record now in a topic (up to its end offsets)."""
        consumer = self._from_start(name)
        try:
            tps = self._partitions(name)
            # tansu answers the latest offset as the last batch's first offset + 1 (Kafka: the last
            # record's + 1): past it, read on until a poll brings nothing.
            ends = consumer.end_offsets(tps)
            out: list[Any] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = [rec for recs in consumer.poll(timeout_ms=300).values() for rec in recs]
                out.extend(got)
                if not got and all(consumer.position(tp) >= ends[tp] for tp in tps):
                    break
            return out
        finally:
            consumer.close(autocommit=False)

    def record_times(self, name: str, limit: int) -> list[float]:
        """CreateTime (s) of the first ``limit`` records of a topic, in the order read."""
        consumer = self._from_start(name)
        try:
            out: list[float] = []
            deadline = time.monotonic() + 2
            while len(out) < limit and time.monotonic() < deadline:
                out += [rec.timestamp / 1000 for recs in consumer.poll(timeout_ms=300).values() for rec in recs]
            return out
        finally:
            consumer.close(autocommit=False)

    def caught_up(self, group: str, name: str) -> bool:
        """The group has committed up to the topic's end offsets (tansu's may fall short of the last
        record by one producer batch: see ``read``)."""
        consumer = KafkaConsumer(**self.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
        try:
            tps = self._partitions(name)
            ends = consumer.end_offsets(tps)
            return all((consumer.committed(tp) or 0) >= ends[tp] for tp in tps)
        finally:
            consumer.close(autocommit=False)

    def count(self, name: str) -> int:
        """How many records a topic holds, each read once by a consumer kept per topic (the DLQ of
        scenario 7 holds hundreds of MB: read whole every half second it took the bench minutes of CPU).
        Not from the end offsets: tansu answers the last record's offset, not the one after it."""
        tail = self._tails.get(name)
        if tail is None:
            tail = self._tails[name] = (self._from_start(name), [0])
        consumer, seen = tail
        while got := sum(len(recs) for recs in consumer.poll(timeout_ms=300).values()):
            seen[0] += got
        return seen[0]

    def scores(self) -> list[ScoreMessage]:
        return [ScoreMessage.model_validate_json(r.value) for r in self.read("scores")]

    def events(self) -> list[DefectEvent]:
        return [DefectEvent.model_validate_json(r.value) for r in self.read("defects")]

    def dead_letters(self, topic: str = "dlq") -> list[tuple[Any, Any]]:
        return [(read_dead_letter(r.headers), r) for r in self.read(topic)]

    def send(self, records: list[tuple[str, bytes, Headers]], topic: str = "frames",
             **producer_kw: Any) -> list[Any]:
        producer = make_producer(self.kafka, **producer_kw)
        try:
            futures = [producer.send(self.kafka.topic(topic), key=k.encode(), value=v, headers=h)
                       for k, v, h in records]
            producer.flush(timeout=120)
            return [f.get(timeout=60) for f in futures]
        finally:
            producer.close()


@contextlib.contextmanager
def rig(keep_logs: Path | None = None, **kw: Any) -> Iterator[Rig]:
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    r = Rig(workdir, **kw)
    try:
        yield r
    finally:
        r.close()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for f in workdir.iterdir():
                shutil.copy(f, keep_logs / f"{r.prefix}-{f.name}")
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- frames and scores ----------------------------------------------------------------------------
def frame_headers(camera: str, seq: int, width: int, height: int, **kw: Any) -> Headers:
    fields: dict[str, Any] = {"camera_id": camera, "line_id": "line-1", "product_class": "ball_screw",
                              "seq": seq, "capture_ts": time.time(), "width": width, "height": height,
                              "schema_version": 1, "encoding": "jpeg"}
    fields.update(kw)
    return [(FRAME_HEADER_KEY, json.dumps(fields).encode())]


def image(width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def valid_frames(cameras: int, per_camera: int, width: int = 96, height: int = 72, seq0: int = 0,
                 capture_ts: Callable[[int], float] | None = None,
                 camera_ids: list[str] | None = None) -> list[tuple[str, bytes, Headers]]:
    jpegs = [encode_jpeg(image(width, height, s)) for s in range(4)]
    ts = capture_ts or (lambda _seq: time.time())
    ids = camera_ids or [f"cam-{c}" for c in range(cameras)]
    return [(ids[c], jpegs[(s + c) % 4], frame_headers(ids[c], seq0 + s, width, height, capture_ts=ts(seq0 + s)))
            for s in range(per_camera) for c in range(len(ids))]


def spread_cameras(n: int, partitions: int) -> list[str]:
    """``n`` camera ids (cam-0, cam-1, ...) chosen so that the producer's key hash (murmur2, as the
    Java client) puts as many on each partition: cam-0..cam-3 all land on one of two partitions."""
    from kafka.partitioner.default import murmur2

    per: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for i in itertools.count():
        name = f"cam-{i}"
        p = (murmur2(name.encode()) & 0x7FFFFFFF) % partitions
        if len(per[p]) < math.ceil(n / partitions):
            per[p].append(name)
        if sum(map(len, per.values())) >= n:
            return sorted((c for cams in per.values() for c in cams), key=lambda c: int(c[4:]))
    raise AssertionError("unreachable")


def bursts(t0: float, size: int = 3, gap_s: float = 2.0, step_s: float = 0.2) -> Callable[[int], float]:
    """Capture times in bursts of ``size`` frames ``step_s`` apart, bursts ``gap_s`` apart: with every
    frame anomalous and quiet_s below the gap, each burst is one event (opened and closed on capture
    time, so a slow scorer does not split or merge events)."""
    return lambda seq: t0 + (seq // size) * gap_s + (seq % size) * step_s


def frame_accounting(row: Row, sent_keys: set[tuple[str, int]], scores: list[ScoreMessage]) -> None:
    counts = Counter((m.frame.camera_id, m.frame.seq) for m in scores)
    row.frames_sent = len(sent_keys)
    row.frames_scored = len(set(counts) & sent_keys)
    row.frames_lost = len(sent_keys - set(counts))
    row.scores_duplicated = sum(n - 1 for k, n in counts.items() if k in sent_keys)


def event_accounting(row: Row, expected: int, events: list[DefectEvent]) -> None:
    pairs = Counter((e.event_id, e.status) for e in events)
    opened = {e.event_id for e in events if e.status == "open"}
    closed = {e.event_id for e in events if e.status == "closed"}
    row.events_expected = expected
    row.events_emitted = len(opened)
    row.events_duplicated = sum(n - 1 for n in pairs.values())
    row.events_never_closed = len(opened - closed)


def max_gap(times: list[float], after: float) -> float:
    """Longest wait for output after ``after`` (the stall the fault caused)."""
    ts = sorted(t for t in times if t >= after)
    if not ts:
        return math.nan
    return max([ts[0] - after] + [b - a for a, b in itertools.pairwise(ts)])


# -- scenario 1: a scorer SIGKILLed mid-batch while another runs -------------------------------------
SESSION_TIMEOUT_S = 6.0  # the rig's kafka.session_timeout_ms
LEASE_S = (KafkaSettings().member_lease_ms or 0) / 1000  # the workers' default (fast failover)


def assigned_partitions(r: Rig, w: Worker) -> set[int] | None:
    """The frames-topic partitions a worker holds now, per its log (None: never assigned yet)."""
    state: set[int] | None = None
    topic = r.kafka.topic("frames")
    for line in w.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if not isinstance(rec, dict) or rec.get("event") not in ("partitions_assigned", "partitions_revoked"):
                continue
            parts = {int(p.rpartition(":")[2]) for p in rec.get("partitions", []) if p.rpartition(":")[0] == topic}
            # Eager rebalancing: an assignment replaces the last one, a revocation empties it.
            state = parts if rec["event"] == "partitions_assigned" else (state or set()) - parts
    return state


def log_times(w: Worker, event: str) -> list[float]:
    """When a worker logged ``event`` (epoch seconds, from its log's timestamps)."""
    from datetime import datetime

    out = []
    for line in w.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(datetime.fromisoformat(rec["timestamp"]).timestamp())
    return out


def batch_times(times: list[float], within_s: float = 0.05) -> list[float]:
    """Intervals between batch completions: the scores of one batch are stamped within ms of each
    other, so arrivals closer than ``within_s`` are one batch; on a backlog the batches run back to back."""
    ends: list[float] = []
    for t in sorted(times):
        if ends and t - ends[-1] < within_s:
            ends[-1] = t
        else:
            ends.append(t)
    return [b - a for a, b in itertools.pairwise(ends)]


def camera_stalls(scores: list[ScoreMessage], sent: set[tuple[str, int]]) -> dict[str, float]:
    """Per camera, the longest wait between two of its frames scored for the first time (by score
    arrival, the scorer's stamp): a re-score of a frame already scored is no progress for the camera."""
    first: dict[tuple[str, int], float] = {}
    for m in scores:
        key = (m.frame.camera_id, m.frame.seq)
        if key in sent:
            first[key] = min(first.get(key, m.scored_ts), m.scored_ts)
    per_cam: dict[str, list[float]] = {}
    for (cam, _seq), ts in first.items():
        per_cam.setdefault(cam, []).append(ts)
    return {cam: max((b - a for a, b in itertools.pairwise(sorted(ts))), default=0.0)
            for cam, ts in sorted(per_cam.items())}


def stall_design_bound(batch_s: float) -> float:
    """The longest stall this runtime can cause on tansu, part by part (each seen in the row's
    stall_parts_s): the victim's batch in progress (1 batch); the survivor finding the victim
    silent in Redis for its member lease (+ a fifth of it between looks, + a second of scheduling)
    and removing it, then finishing its own batch (1 batch) before it rejoins; tansu answering the
    JoinGroup after half the session timeout (Kafka answers once every member rejoined); the
    survivor re-scoring the victim's last batch, produced but not committed (the scorer commits a
    batch once the next one is handled: 1 batch), then its killed batch (1 batch). Without the
    lease (kafka.member_lease_ms null) the broker's session timeout takes its place."""
    return 1.2 * LEASE_S + 1.0 + SESSION_TIMEOUT_S / 2 + 4 * batch_s


def scenario_scorer_kill(small: bool = True, keep_logs: Path | None = None,
                         size: tuple[int, int] | None = None) -> Row:
    cameras, per_camera = size or ((3, 12) if small else (4, 60))
    row = Row("1 scorer SIGKILL", note=f"{cameras} cams x {per_camera} frames 96x72 (backlog), 2 scorers "
              f"(one partition and half the cameras each) + alert; session timeout {SESSION_TIMEOUT_S:.0f} s, "
              f"member lease {LEASE_S:g} s")
    # Every frame is anomalous (threshold below any score) and frames come in bursts of 3 on capture
    # time: one event per burst; the last burst of each camera is closed by silence.
    with rig(keep_logs, LINEWATCH_ALERT__DEFAULT_THRESHOLD="-1.0", LINEWATCH_ALERT__K="2",
             LINEWATCH_ALERT__N="3", LINEWATCH_ALERT__QUIET_S="1.0", LINEWATCH_ALERT__SILENCE_S="20.0") as r:
        a = r.start("score", ["score"])
        b = r.start("score", ["score"])
        alert = r.start("alert", ["alert"])
        # Both scorers loaded and in the group, one partition each, before any frame: the stall
        # measured is the kill's, not a model load.
        wait_until(lambda: all(assigned_partitions(r, w) for w in (a, b)) or not (r.alive(a) and r.alive(b)),
                   "both scorers holding a partition", 300)
        # Cameras on both partitions: the survivor is busy (and warm) when the victim dies.
        frames = valid_frames(cameras, per_camera, capture_ts=bursts(time.time() - 3600),
                              camera_ids=spread_cameras(cameras, r.kafka.partitions))
        n_events = cameras * math.ceil(per_camera / 3)
        sent = {(json.loads(h[0][1])["camera_id"], json.loads(h[0][1])["seq"]) for _, _, h in frames}
        metas = r.send(frames)
        frames_on = Counter(m.partition for m in metas)
        # The victim holds the partition with more frames: it is mid-batch when killed.
        victim, survivor = sorted((a, b), key=lambda w: -sum(frames_on[p] for p in assigned_partitions(r, w) or ()))
        victim_cams = sorted({k for (k, _, _), m in zip(frames, metas, strict=True)
                              if m.partition in (assigned_partitions(r, victim) or ())})
        # Mid-batch: the victim's first batch is out (uncommitted: the scorer commits a batch once the
        # next one is handled), its next one is in the model.
        wait_until(lambda: any(m.frame.camera_id in victim_cams for m in r.scores()) or not r.alive(victim),
                   "the victim's first scores", 300)
        killed_at = time.time()
        r.kill(victim)
        row.extra["scored_before_kill"] = len(r.read("scores"))
        row.extra["killed_holding"] = ",".join(victim_cams) or "no camera"

        def missing() -> set[tuple[str, int]]:
            return sent - {(m.frame.camera_id, m.frame.seq) for m in r.scores()}

        try:
            wait_until(lambda: not missing(), "every frame scored after the kill", 400)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; missing {sorted(missing())[:10]}") from None
        scores = r.scores()
        # The stall: the longest wait for the next score (stamped by the scorer) after the kill.
        row.recovery_s = max_gap([m.scored_ts for m in scores], killed_at)
        # Per camera against the promise: session timeout (the dead member noticed) plus one batch
        # (the survivor's, measured on the backlog it holds after the takeover).
        stalls = camera_stalls(scores, sent)
        revoked = next((t for t in log_times(survivor, "partitions_revoked") if t > killed_at), math.nan)
        assigned = next((t for t in log_times(survivor, "partitions_assigned") if t > revoked), math.nan)
        after = batch_times([m.scored_ts for m in scores if m.scored_ts > assigned])
        batch_s = float(np.median(after)) if after else math.nan
        bound = SESSION_TIMEOUT_S + batch_s
        worst = max(stalls, key=lambda c: stalls[c])
        row.extra["camera_stall_max_s"] = f"{worst} {stalls[worst]:.1f}"
        row.extra["camera_stalls_s"] = " ".join(f"{c}:{v:.1f}" for c, v in stalls.items())
        row.extra["batch_s"] = f"{batch_s:.2f} (max {max(after):.2f})" if after else "-"
        row.extra["stall_bound_s"] = round(bound, 1)
        row.extra["stall_within_bound"] = "yes" if stalls[worst] <= bound else "NO"
        row.extra["stall_design_bound_s"] = round(stall_design_bound(max(after, default=math.nan)), 1)
        # Where the stall went: the survivor noticing the dead member, the group's join, its first batch.
        theirs = [m for m in scores if m.frame.camera_id in victim_cams]
        before_kill = {(m.frame.camera_id, m.frame.seq) for m in theirs if m.scored_ts <= killed_at}
        last_before = max((m.scored_ts for m in theirs if m.scored_ts <= killed_at), default=math.nan)
        first_after = min((m.scored_ts for m in theirs if m.scored_ts > killed_at), default=math.nan)
        first_new = min((m.scored_ts for m in theirs if m.scored_ts > killed_at
                         and (m.frame.camera_id, m.frame.seq) not in before_kill), default=math.nan)
        parts = {"last_score_to_kill": killed_at - last_before, "kill_to_revoke": revoked - killed_at,
                 "join": assigned - revoked, "to_first_score": first_after - assigned,
                 "rescored_to_first_new": first_new - first_after}
        row.extra["stall_parts_s"] = " ".join(f"{k}:{v:.1f}" for k, v in parts.items())
        wait_until(lambda: len({e.event_id for e in r.events() if e.status == "closed"}) >= n_events,
                   "every event closed", 180)
        time.sleep(2.0)
        frame_accounting(row, sent, r.scores())
        event_accounting(row, n_events, r.events())
        for w in (survivor, alert):
            if not r.alive(w):
                row.problems.append(f"{w.name} died: {r.tail(w, 300)}")
            r.stop(w)
        row.peak_rss_mb = r.peaks()
        row.measured.update(camera_stalls=stalls, stall_bound_s=bound, batch_s=batch_s,
                            batch_max_s=max(after, default=math.nan), stall_parts_s=parts)
    return row


# -- scenario 2: an alert worker SIGKILLed mid-stream, a new one started ------------------------------
def score_message(camera: str, seq: int, score: float, ts: float) -> ScoreMessage:
    m = np.full((32, 32), 0.05, np.float32)
    m[8:16, 20:28] = score
    png, lo, hi = quantize_map(m, 16)
    return ScoreMessage(
        frame=FrameRef(camera_id=camera, line_id="line-1", product_class="ball_screw", seq=seq, capture_ts=ts,
                       width=64, height=64),
        image_score=score, anomaly_map_png=png, map_min=lo, map_max=hi, thumbnail_jpeg=_THUMB,
        model_fingerprint="faults", method="winclip", latency_ms=1.0, scored_ts=time.time())


_THUMB = encode_jpeg(np.full((24, 32, 3), 90, np.uint8))


def scenario_alert_kill(small: bool = True, keep_logs: Path | None = None,
                        size: tuple[int, int] | None = None) -> Row:
    cameras, cycles = size or ((4, 6) if small else (8, 20))
    # One cycle per event: 3 hot scores (k=2 of n=3 opens), then 6 cool ones 0.5 s apart on capture
    # time (quiet_s 1.0 closes it).
    pattern = [0.9, 0.9, 0.9] + [0.1] * 6
    row = Row("2 alert SIGKILL", note=f"{cameras} cams x {cycles} events, one score per camera every 0.25 s")
    with rig(keep_logs, LINEWATCH_ALERT__DEFAULT_THRESHOLD="0.5", LINEWATCH_ALERT__K="2", LINEWATCH_ALERT__N="3",
             LINEWATCH_ALERT__QUIET_S="1.0", LINEWATCH_ALERT__SILENCE_S="30.0") as r:
        t0 = time.time() - 3600
        msgs = [(f"cam-{c}", score_message(f"cam-{c}", seq, s, t0 + 0.5 * seq))
                for seq, s in enumerate(pattern * cycles) for c in range(cameras)]
        first = r.start("alert", ["alert"])
        producer = make_producer(r.kafka)
        done = threading.Event()

        def publish() -> None:
            for i, (cam, m) in enumerate(msgs):
                producer.send(r.kafka.topic("scores"), key=cam.encode(), value=m.model_dump_json().encode())
                if i % cameras == cameras - 1:
                    producer.flush()
                    time.sleep(0.25)
            producer.flush()
            done.set()

        threading.Thread(target=publish, daemon=True).start()
        total = cameras * cycles
        wait_until(lambda: len(r.events()) >= max(2, total // 2) or not r.alive(first), "half of the events",
                   300)
        killed_at = time.time()
        r.kill(first)
        before = len(r.events())
        row.extra["event_records_before_kill"] = before
        if done.is_set() or before >= 2 * total:
            row.problems.append("the kill did not land mid-stream")
        second = r.start("alert", ["alert"])
        wait_until(lambda: done.is_set() and len({e.event_id for e in r.events() if e.status == "closed"}) >= total,
                   "every event closed by the replacement", 300)
        row.recovery_s = time.time() - killed_at  # upper bound: until the replacement closed every event
        time.sleep(2.0)
        event_accounting(row, total, r.events())
        row.frames_sent = len(msgs)
        row.extra["records_in"] = "scores (published directly)"
        producer.close()
        if r.stop(second) != 0:
            row.problems.append(f"replacement did not stop cleanly: {r.tail(second, 300)}")
        row.peak_rss_mb = r.peaks()
    return row


# -- scenario 7: hostile records interleaved with valid frames ---------------------------------------
HUGE_BYTES = 20 * 1024 * 1024  # the "20 MB payloads"


def hostile_records(n: int, limit_bytes: int, huge: int = 0) -> list[tuple[str, tuple[str, bytes, Headers]]]:
    """``n`` hostile records cycling through the kinds of issue 15, each with its expected reason code;
    the first ``huge`` of the over-the-limit kind carry a real 20 MB payload, the others the limit + 4 KB."""
    from tests.hostile_frames import jpeg_bomb  # the builders shared with the unit and worker tests

    img = image(96, 72, 9)
    jpeg, png = encode_jpeg(img), encode_png(img)
    ok = {"width": 96, "height": 72}
    h = frame_headers
    bomb = jpeg_bomb(100_000 // 8, 100_000 // 8, pad_bytes=200_000)
    big = jpeg[:2] + b"\xff\xfe" + bytes(limit_bytes + 4096)  # over scoring.max_frame_bytes
    huge_payload = jpeg[:2] + b"\xff\xfe" + bytes(HUGE_BYTES)
    kinds: list[tuple[str, Callable[[int], tuple[str, bytes, Headers]]]] = [
        ("undecodable", lambda i: ("cam-t", jpeg[: len(jpeg) // 3], h("cam-t", i, **ok))),
        ("unknown_format", lambda i: ("cam-u", b"GIF89a" + bytes(64), h("cam-u", i, **ok))),
        ("encoding_mismatch", lambda i: ("cam-p", png, h("cam-p", i, **ok))),
        # i // 20: how many of this kind came before (the kinds cycle).
        ("oversized", lambda i: ("cam-big", huge_payload if i // 20 < huge else big, h("cam-big", i, **ok))),
        ("oversized", lambda i: ("cam-bomb", bomb, h("cam-bomb", i, width=64, height=48))),
        # Beyond the header schema's bounds: refused as a bad header before any size arithmetic.
        ("bad_header", lambda i: ("cam-dim", jpeg, h("cam-dim", i, width=100_000, height=100_000))),
        ("bad_header", lambda i: ("cam-m", jpeg, [])),
        ("bad_header", lambda i: ("cam-j", jpeg, [(FRAME_HEADER_KEY, b"{not json")])),
        ("bad_header", lambda i: ("cam-8", jpeg, [(FRAME_HEADER_KEY, b"\xff\xfe\x00garbage")])),
        ("bad_header", lambda i: ("cam-v", jpeg, h("cam-v", i, schema_version=99, **ok))),
        ("bad_header", lambda i: ("a/b", jpeg, h("a/b", i, **ok))),
        ("bad_header", lambda i: ("..", jpeg, h("..", i, **ok))),
        ("bad_header", lambda i: (".", jpeg, h(".", i, **ok))),
        ("bad_header", lambda i: ("cam\x07", jpeg, h("cam\x07\n", i, **ok))),
        ("bad_header", lambda i: ("cam-s", jpeg, h("cam-s", 10**30, **ok))),
        ("bad_header", lambda i: ("cam-n", jpeg, h("cam-n", -5 - i, **ok))),
        ("bad_header", lambda i: ("cam-nan", jpeg, [(FRAME_HEADER_KEY, json.dumps(
            {**json.loads(h("cam-nan", i, **ok)[0][1]), "capture_ts": math.nan}).encode())])),
        ("bad_header", lambda i: ("cam-e", jpeg, h("cam-e", i, capture_ts=1e300, **ok))),
        ("unknown_class", lambda i: ("cam-c", jpeg, h("cam-c", i, product_class="walnut", **ok))),
        ("empty", lambda i: ("cam-z", b"", h("cam-z", i, **ok))),
    ]
    assert len(kinds) == 20
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1](i)) for i in range(n)]


def scenario_hostile(small: bool = True, keep_logs: Path | None = None,
                     size: tuple[int, int] | None = None, huge: int | None = None) -> Row:
    n_hostile, n_valid = size or ((200, 50) if small else (2000, 500))
    huge = (2 if small else 10) if huge is None else huge
    limit = 1024 * 1024
    # The broker and the clients take 24 MB records (a site that allows large frames): the 20 MB
    # payloads reach the scorer, which refuses them before decoding.
    message_bytes = 24 * 1024 * 1024
    row = Row("7 hostile input", note=f"{n_hostile} hostile + {n_valid} valid 96x72; oversized payloads: {huge} of "
              f"20 MB, the rest {limit // 1024 + 4} KB, over a 1 MB scoring.max_frame_bytes "
              f"(kafka.max_message_bytes 24 MB)")
    with rig(keep_logs, LINEWATCH_SCORING__CLASSES='["ball_screw"]', LINEWATCH_SCORING__MAX_BATCH="8",
             LINEWATCH_SCORING__MAX_FRAME_BYTES=str(limit), LINEWATCH_KAFKA__MAX_MESSAGE_BYTES=str(message_bytes)) as r:
        r.kafka.max_message_bytes = message_bytes
        hostile = hostile_records(n_hostile, limit, huge)
        row.extra["huge_20mb"] = sum(len(rec[1]) > HUGE_BYTES for _, rec in hostile)
        valid = valid_frames(1, n_valid)
        sent: list[tuple[str | None, tuple[str, bytes, Headers]]] = []
        per = max(1, n_hostile // n_valid)
        for i, v in enumerate(valid):
            sent.append((None, v))
            sent.extend(hostile[i * per:(i + 1) * per])
        sent.extend(hostile[len(valid) * per:])
        scorer = r.start("score", ["score"])
        metas = r.send([rec for _, rec in sent])
        hostile_keys = {(m.partition, m.offset): reason for m, (reason, _) in zip(metas, sent, strict=True)
                        if reason is not None}
        valid_keys = {(json.loads(h[0][1])["camera_id"], json.loads(h[0][1])["seq"]) for _, _, h in valid}
        wait_until(lambda: r.count("dlq") >= len(hostile_keys) or not r.alive(scorer),
                   "every hostile record in the DLQ", 600)
        wait_until(lambda: valid_keys <= {(m.frame.camera_id, m.frame.seq) for m in r.scores()}
                   or not r.alive(scorer), "every valid frame scored", 600)
        # Still alive: one more frame after all of that is scored.
        r.send(valid_frames(1, 1, seq0=10_000))
        wait_until(lambda: ("cam-0", 10_000) in {(m.frame.camera_id, m.frame.seq) for m in r.scores()}
                   or not r.alive(scorer), "one more frame scored", 300)
        valid_keys.add(("cam-0", 10_000))
        frame_accounting(row, valid_keys, r.scores())
        letters = Counter()
        reasons: dict[tuple[int, int], str] = {}
        for letter, _ in r.dead_letters():
            key = (letter.source_partition, letter.source_offset)
            letters[key] += 1
            reasons[key] = letter.reason.split(":", 1)[0]
        missing = set(hostile_keys) - set(letters)
        twice = [k for k, n in letters.items() if n > 1]
        wrong = {k: (reasons.get(k), want) for k, want in hostile_keys.items()
                 if want is not None and k in reasons and reasons[k] != want}
        stray = set(letters) - set(hostile_keys)
        row.dead_lettered = sum(letters.values())
        row.extra["hostile"] = len(hostile_keys)
        row.extra["dlq_reasons"] = dict(Counter(reasons.values()))
        if missing:
            row.problems.append(f"{len(missing)} hostile records not in the DLQ")
        if twice:
            row.problems.append(f"{len(twice)} dead-lettered twice")
        if wrong:
            sample = list(wrong.values())[:3]
            row.problems.append(f"{len(wrong)} with another reason than expected, e.g. {sample}")
        if stray:
            row.problems.append(f"{len(stray)} valid frames dead-lettered")
        if row.scores_duplicated:
            row.problems.append(f"{row.scores_duplicated} duplicate scores without any fault")
        if not r.alive(scorer):
            row.problems.append(f"scorer died: {r.tail(scorer, 400)}")
        r.stop(scorer)
        row.peak_rss_mb = r.peaks()
    return row


# -- paced live frames -----------------------------------------------------------------------------
class Pacer:
    """Live frames from ``cameras`` in bursts of 3 (0.2 s apart, a 2 s pause between bursts), stamped
    with the real capture time, until stopped; with every frame anomalous each burst is one event."""

    def __init__(self, r: Rig, cameras: int) -> None:
        self.r, self.cameras = r, cameras
        self.sent: set[tuple[str, int]] = set()
        self.bursts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.jpegs = [encode_jpeg(image(96, 72, s)) for s in range(4)]

    def _run(self) -> None:
        producer = make_producer(self.r.kafka)
        seq = 0
        while not self.stop.is_set():
            for i in range(3):
                for c in range(self.cameras):
                    cam = f"cam-{c}"
                    producer.send(self.r.kafka.topic("frames"), key=cam.encode(), value=self.jpegs[(seq + c) % 4],
                                  headers=frame_headers(cam, seq, 96, 72, capture_ts=time.time()))
                    self.sent.add((cam, seq))
                producer.flush()
                seq += 1
                time.sleep(0.2 if i < 2 else 2.0)
            self.bursts += 1
        producer.close()

    def __enter__(self) -> Pacer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def scored_keys(r: Rig) -> set[tuple[str, int]]:
    return {(m.frame.camera_id, m.frame.seq) for m in r.scores()}


# -- scenario 3: every scorer down, then back ------------------------------------------------------
def scenario_scorers_down(small: bool = True, keep_logs: Path | None = None) -> Row:
    cameras, down_s, staleness = (2, 15.0, 8.0) if small else (2, 30.0, 10.0)
    row = Row("3 scorers down", note=f"{cameras} live cams ~1.2 fps each, scorer down {down_s:.0f} s "
              f"(+ its model load), staleness_s {staleness:.0f}")
    with rig(keep_logs, LINEWATCH_SCORING__STALENESS_S=str(staleness)) as r:
        first = r.start("score", ["score"])
        with Pacer(r, cameras) as pacer:
            wait_until(lambda: len(r.read("scores")) >= 4 or not r.alive(first), "the first scores", 300)
            r.stop(first)
            down_at = time.time()
            time.sleep(down_s)
            second = r.start("score", ["score"])

            def fresh_score() -> bool:
                return any(m.scored_ts > down_at and m.scored_ts - m.frame.capture_ts < staleness
                           and m.frame.capture_ts > down_at + down_s for m in r.scores())

            wait_until(lambda: fresh_score() or not r.alive(second), "a fresh frame scored after the restart", 300)
            row.recovery_s = min(m.scored_ts for m in r.scores() if m.frame.capture_ts > down_at + down_s
                                 and m.scored_ts > down_at) - (down_at + down_s)
            time.sleep(6.0)
        time.sleep(staleness + 4)
        code = r.stop(second)
        stale = sum(int(e.get("stale", 0)) for w in r.workers for e in r.log_events(w, "score_worker_stopped"))
        frame_accounting(row, pacer.sent, r.scores())
        row.frames_lost = (row.frames_lost or 0) - stale  # skipped as stale and counted: shed, not lost
        row.extra["stale_skipped"] = stale
        late = [m.scored_ts - m.frame.capture_ts for m in r.scores() if m.frame.capture_ts > down_at + down_s + 30]
        if late:
            row.extra["age_at_score_after_recovery_p95_s"] = round(float(np.percentile(late, 95)), 1)
        if code != 0:
            row.problems.append(f"scorer did not stop cleanly ({code})")
        if stale == 0:
            row.problems.append("no frame was skipped as stale: the outage did not reach the staleness limit")
        if row.frames_lost:
            row.problems.append(f"{row.frames_lost} frames neither scored nor counted as stale")
        row.peak_rss_mb = r.peaks()
    return row


# -- scenario 4: Redis killed and restarted mid-stream ----------------------------------------------
def scenario_redis_restart(small: bool = True, keep_logs: Path | None = None) -> Row:
    cameras, run_s, down_s = (2, 30.0, 5.0) if small else (3, 90.0, 20.0)
    row = Row("4 Redis restart", note=f"{cameras} live cams ~1.2 fps, Redis down {down_s:.0f} s, back empty; "
              "scorer + alert")
    with rig(keep_logs, LINEWATCH_ALERT__DEFAULT_THRESHOLD="-1.0", LINEWATCH_ALERT__K="2",
             LINEWATCH_ALERT__N="3", LINEWATCH_ALERT__QUIET_S="1.0", LINEWATCH_ALERT__SILENCE_S="30.0",
             LINEWATCH_SCORING__STALENESS_S="null") as r:
        scorer = r.start("score", ["score"])
        alert = r.start("alert", ["alert"])
        with Pacer(r, cameras) as pacer:
            wait_until(lambda: len(r.read("scores")) >= 4 or not r.alive(scorer), "the first scores", 300)
            time.sleep(run_s / 2)
            killed_at = time.time()
            r.restart_redis(down_s)
            time.sleep(run_s / 2)
        sent = set(pacer.sent)
        n_events = pacer.bursts * cameras
        # The last burst may have been cut short: it is still one event per camera.
        if any(seq % 3 for _, seq in sent):
            n_events = len({seq // 3 for _, seq in sent}) * cameras
        try:
            wait_until(lambda: sent <= scored_keys(r), "every frame scored", 300)
            wait_until(lambda: len({e.event_id for e in r.events() if e.status == "closed"}) >= n_events,
                       "every event closed", 120)
        except TimeoutError as exc:
            row.problems.append(str(exc))
        row.recovery_s = max_gap([m.scored_ts for m in r.scores()], killed_at)
        frame_accounting(row, sent, r.scores())
        event_accounting(row, n_events, r.events())
        for w in (scorer, alert):
            if not r.alive(w):
                row.problems.append(f"{w.name} died: {r.tail(w, 300)}")
            elif r.stop(w) != 0:
                row.problems.append(f"{w.name} did not stop cleanly")
        row.peak_rss_mb = r.peaks()
    return row


# -- scenario 6: a webhook subscriber down, then slow, beside a healthy one ------------------------
def scenario_webhook_outage(small: bool = True, keep_logs: Path | None = None) -> Row:
    from pipeline.delivery.filters import delivery_id
    from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
    from pipeline.redis_store import connect
    from tests.test_deliver import event, webhook
    from tests.webhook_receiver import WebhookReceiver

    down_s, slow_s, delay_s, rate = (20.0, 15.0, 2.0, 1.0) if small else (60.0, 30.0, 5.0, 1.0)
    row = Row("6 webhook outage", note=f"subscriber down {down_s:.0f} s (connection refused), then {delay_s:.0f} s "
              f"per request for {slow_s:.0f} s, beside a healthy one; {rate:.0f} event/s")
    secret = "faults-webhook-secret-0123"
    with rig(keep_logs, LINEWATCH_DELIVER__ALLOW_PRIVATE_NETWORKS="true") as r, \
            WebhookReceiver(secret) as healthy:
        bad_port = free_port()
        client = connect(r.settings_redis())
        store = SubscriptionStore(client, r.prefix)
        channel = {"secret": secret, "timeout_s": 3.0 + delay_s, "max_attempts": 3, "backoff_initial_s": 0.5,
                   "backoff_max_s": 2.0}
        store.add(webhook("healthy", healthy.url, channel=channel))
        store.add(webhook("flaky", f"http://127.0.0.1:{bad_port}/hook", channel=channel))
        deliver = r.start("deliver", ["deliver"])
        producer = make_producer(r.kafka)
        published: dict[str, float] = {}
        events = []

        def emit(n: int) -> None:
            for _ in range(n):
                ev = event(f"cam-{len(events) % 3}", first_seq=len(events) * 10, ts=time.time())
                events.append(ev)
                producer.send(r.kafka.topic("defects"), key=ev.camera_id.encode(), value=ev.model_dump_json().encode())
                producer.flush()
                published[delivery_id(ev)] = time.time()
                time.sleep(1.0 / rate)

        emit(int(down_s * rate))
        bad = WebhookReceiver(secret, port=bad_port).__enter__()
        try:
            bad.delay_s = delay_s
            back_at = time.time()
            emit(int(slow_s * rate))
            bad.delay_s = 0.0
            keys = {delivery_id(ev) for ev in events}
            ledger = DeliveryLedger(client, r.prefix)

            def settled() -> bool:
                dead = {d.delivery_id for d in ledger.dead("flaky")}
                return keys <= set(healthy.accepted_keys) and keys <= set(bad.accepted_keys) | dead

            try:
                wait_until(settled, "every event delivered to the healthy one, delivered or dead-lettered to the "
                           "flaky one", 300)
            except TimeoutError as exc:
                row.problems.append(str(exc))
            dead = {d.delivery_id for d in ledger.dead("flaky")}
            row.deliveries_expected = 2 * len(keys)
            row.deliveries_made = len(set(healthy.accepted_keys) & keys) + len(set(bad.accepted_keys) & keys)
            row.dead_lettered = len(dead)
            lat = [healthy_at - published[k] for k, healthy_at in arrivals(healthy) if k in published]
            if lat:
                row.extra["healthy_delay_p50_s"] = round(float(np.percentile(lat, 50)), 2)
                row.extra["healthy_delay_max_s"] = round(max(lat), 2)
            before = len(set(bad.accepted_keys))
            # Redrive the dead letters once through the CLI, as an operator would.
            proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "subscriptions", "redrive", "flaky"],
                                  env=r.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            row.extra["redrive"] = (proc.stdout.strip().splitlines() or ["?"])[0]
            row.extra["redelivered"] = len(set(bad.accepted_keys)) - before
            row.deliveries_made = len(set(healthy.accepted_keys) & keys) + len(set(bad.accepted_keys) & keys)
            if not keys <= set(bad.accepted_keys):
                row.problems.append(f"{len(keys - set(bad.accepted_keys))} events never reached the flaky one "
                                    f"after the redrive")
            if healthy.duplicates or bad.duplicates:
                row.problems.append(f"duplicate deliveries: healthy {healthy.duplicates}, flaky {bad.duplicates}")
            row.extra["flaky_back_after_s"] = round(back_at - min(published.values()), 1)
        finally:
            bad.__exit__(None, None, None)
        producer.close()
        if not r.alive(deliver):
            row.problems.append(f"deliver died: {r.tail(deliver, 300)}")
        r.stop(deliver)
        client.close()
        row.peak_rss_mb = r.peaks()
    return row


def arrivals(rx: Any) -> list[tuple[str, float]]:
    """(delivery key, arrival time) of each accepted request, in order."""
    return [(req.key, req.at) for req in rx.requests if req.signature_ok and 200 <= req.status < 300 and req.key]


# -- scenario 5: the broker down under the capture workers ------------------------------------------
def scenario_broker_down(small: bool = True, keep_logs: Path | None = None) -> Row:
    """tansu restarted on the same port. Where tansu's memory storage differs from Apache Kafka: a
    restarted tansu has lost every topic, record and committed group offset (Kafka keeps its log and
    the __consumer_offsets topic on disk, so topics and offsets survive a broker restart). The rig
    re-creates the topics after the restart, as they would still exist on Kafka; frames published
    before the outage are then gone from tansu and are counted from the capture worker's own stats."""
    cameras, fps, down_s, run_s = (2, 5.0, 10.0, 10.0) if small else (4, 5.0, 30.0, 20.0)
    row = Row("5 broker down", note=f"{cameras} looping cams x {fps:.0f} fps 96x72 under capture, tansu down "
              f"{down_s:.0f} s, restarted empty on the same port (topics re-created), max_buffered_frames 64")
    with tempfile.TemporaryDirectory() as tmp, rig(keep_logs) as r:
        folder = Path(tmp) / "frames"
        folder.mkdir()
        for s in range(4):
            (folder / f"f{s}.jpg").write_bytes(encode_jpeg(image(96, 72, s)))
        cfg = Path(tmp) / "site.yaml"
        cfg.write_text("cameras:\n" + "".join(
            f"  - {{id: cam-{c}, product_class: ball_screw, source: '{folder}', fps: {fps}, loop: true}}\n"
            for c in range(cameras)))
        capture = r.start("capture", ["capture"], LINEWATCH_CONFIG=str(cfg))
        wait_until(lambda: len(r.read("frames")) >= 10 or not r.alive(capture), "frames from the capture worker", 120)
        time.sleep(run_s / 2)
        port = r.broker.port
        before = len(r.read("frames"))
        r.broker.stop()
        down_at = time.time()
        time.sleep(down_s)
        r.broker = EmbeddedBroker(port=port).start()
        back_at = time.time()
        create_topics(r.kafka)

        def resumed() -> float | None:
            """When the first record of the re-created topic was sent (its CreateTime), once there
            are a few. Not ``r.read``: a topic written 20 times a second never reads to its end."""
            try:
                stamps = r.record_times("frames", limit=5)
            except Exception:  # the broker is still electing/creating: try again
                return None
            return min(stamps) if len(stamps) >= 5 else None

        first = wait_until(lambda: resumed() or (None if r.alive(capture) else -1.0),
                           "publishing to resume by itself", 120)
        row.recovery_s = first - back_at if first > 0 else None
        recovered = r.log_events(capture, "publisher_recovered")
        if recovered:
            at = datetime.fromisoformat(recovered[-1]["timestamp"].replace("Z", "+00:00")).timestamp()
            row.extra["publisher_recovered_after_s"] = round(at - back_at, 2)
        time.sleep(run_s / 2)
        code = r.stop(capture)
        after = len(r.read("frames"))
        finished = r.log_events(capture, "capture_finished")
        closed = r.log_events(capture, "publisher_closed")
        captured = sum(int(e.get("captured") or 0) for e in finished)
        published = sum(sum(e.get("published", {}).values()) for e in closed)
        dropped = sum(sum(e.get("dropped", {}).values()) for e in closed)
        stats = finished and closed
        row.frames_sent = captured
        row.extra.update({"published": published, "dropped_oldest": dropped, "in_topic_before": before,
                          "in_topic_after_restart": after, "down_s": round(back_at - down_at, 1)})
        if not stats:
            row.problems.append(f"no capture stats (exit {code}): {r.tail(capture, 300)}")
        elif captured != published + dropped:
            row.problems.append(f"captured {captured} != published {published} + dropped {dropped}")
            row.frames_lost = captured - published - dropped
        else:
            row.frames_lost = 0
        if dropped == 0:
            row.problems.append("nothing dropped: the outage did not fill the buffer")
        if after == 0:
            row.problems.append("publishing did not resume")
        row.peak_rss_mb = r.peaks()
    return row


# -- scenario 8: load -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def scenario_load(small: bool = True, keep_logs: Path | None = None) -> Row:
    cameras, fps, duration = (4, 1.0, 30.0) if small else (16, 5.0, 120.0)
    staleness = 10.0
    row = Row("8 load", note=f"{cameras} cams x {fps:g} fps of 1920x1080 JPEG for {duration:.0f} s, one CPU scorer "
              f"(max_batch 8), staleness_s {staleness:.0f}" + (" (REDUCED from 16 x 5 fps x 120 s)" if small else ""))
    # The CPU engine, as the issue asks, even on a machine with a GPU (device "auto" would take it).
    with rig(keep_logs, LINEWATCH_SCORING__STALENESS_S=str(staleness), LINEWATCH_SCORING__MAX_BATCH="8",
             LINEWATCH_ENGINE__DEVICE="cpu") as r:
        scorer = r.start("score", ["score"])
        # A smooth frame with a little texture: ~100-200 KB as JPEG, like a real 1080p camera frame.
        yy, xx = np.mgrid[0:1080, 0:1920]
        base = np.stack([(xx // 8) % 256, (yy // 5) % 256, ((xx + yy) // 12) % 256], -1).astype(np.uint8)
        jpegs = [encode_jpeg(np.clip(base.astype(int) + np.random.default_rng(s).integers(-8, 8, base.shape), 0, 255)
                             .astype(np.uint8)) for s in range(3)]
        row.extra["jpeg_kb"] = len(jpegs[0]) // 1024
        # Wait for the model: a fresh warm-up frame every 5 s (older ones go stale) until one is scored.
        warm = [0]

        def ready() -> bool:
            if r.read("scores") or not r.alive(scorer):
                return True
            warm[0] += 1
            if warm[0] % 10 == 1:
                r.send([("warm", jpegs[0], frame_headers("warm", warm[0], 1920, 1080))])
            return False

        wait_until(ready, "the scorer to be ready", 300)
        producer = make_producer(r.kafka)
        sent: set[tuple[str, int]] = set()
        start = time.time()
        rss_samples: list[float] = []
        seq = 0
        while time.time() - start < duration:
            tick = time.time()
            for c in range(cameras):
                cam = f"cam-{c}"
                producer.send(r.kafka.topic("frames"), key=cam.encode(), value=jpegs[(seq + c) % 3],
                              headers=frame_headers(cam, seq, 1920, 1080, capture_ts=time.time()))
                sent.add((cam, seq))
            seq += 1
            if seq % max(1, int(fps * 5)) == 0:
                rss_samples.append(rss_mb(scorer.proc.pid) or 0.0)
            time.sleep(max(0.0, 1.0 / fps - (time.time() - tick)))
        producer.flush()
        producer.close()
        end = time.time()
        done_at_end = {(m.frame.camera_id, m.frame.seq) for m in r.scores()} & sent
        # What is left is scored or skipped as stale once the scorer has read it; a slow machine takes
        # longer than the staleness limit to read the backlog (stale frames too are fetched and read).
        drain_start = time.time()
        wait_until(lambda: r.caught_up(f"{r.prefix}-score", "frames") or not r.alive(scorer),
                   "the scorer to read every frame sent", 600)
        time.sleep(5)  # the last producer batch, past tansu's end offset
        row.extra["drain_s"] = round(time.time() - drain_start, 1)
        code = r.stop(scorer)
        stale = sum(int(e.get("stale", 0)) for e in r.log_events(scorer, "score_worker_stopped"))
        scores = [m for m in r.scores() if (m.frame.camera_id, m.frame.seq) in sent]
        frame_accounting(row, sent, scores)
        # Warm-up frames that went stale while the model loaded are not part of the load.
        warm_sent = (warm[0] + 9) // 10
        warm_scored = len({m.frame.seq for m in r.scores() if m.frame.camera_id == "warm"})
        stale -= max(0, warm_sent - warm_scored)
        row.frames_lost = (row.frames_lost or 0) - stale
        lat = [m.scored_ts - m.frame.capture_ts for m in scores]
        in_window = [m for m in scores if m.scored_ts <= end]
        row.extra.update({
            "offered_fps": round(cameras * fps, 1),
            "scored_fps": round(len(in_window) / max(1e-9, end - start), 2),
            "stale_skipped": stale,
            "lag_at_end_frames": len(sent) - len(done_at_end),
            "capture_to_score_p50_s": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "capture_to_score_p95_s": round(float(np.percentile(lat, 95)), 2) if lat else None,
            "scorer_rss_mb_samples": [round(x) for x in rss_samples],
        })
        if code != 0:
            row.problems.append(f"scorer did not stop cleanly ({code})")
        if row.frames_lost:
            row.problems.append(f"{row.frames_lost} frames neither scored nor counted as stale")
        row.peak_rss_mb = r.peaks()
    return row


SCENARIOS: dict[str, Callable[..., Row]] = {
    "scorer_kill": scenario_scorer_kill,
    "alert_kill": scenario_alert_kill,
    "hostile": scenario_hostile,
    "scorers_down": scenario_scorers_down,
    "redis_restart": scenario_redis_restart,
    "broker_down": scenario_broker_down,
    "webhook_outage": scenario_webhook_outage,
    "load": scenario_load,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                        help="run only this one (repeatable); default: all, in priority order")
    parser.add_argument("--small", action="store_true", help="reduced sizes (as the test suite runs them)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the worker logs here")
    args = parser.parse_args()
    configure_logging("warning")
    names = args.scenario or list(SCENARIOS)
    print(f"{os.cpu_count()} cpus, backbone {SMALL_BACKBONE} (random weights), {'small' if args.small else 'full'}")
    print(table_header(), flush=True)
    failed = False
    for name in names:
        started = time.monotonic()
        try:
            row = SCENARIOS[name](small=args.small, keep_logs=args.keep_logs)
        except Exception as exc:  # one scenario's failure is a row, not the end of the campaign
            row = Row(name, problems=[f"{type(exc).__name__}: {str(exc)[:300]}"])
        row.extra["wall_s"] = round(time.monotonic() - started)
        failed |= not row.ok
        print(format_row(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
