"""`linewatch run`: a small site's workers in one process tree.

Starts an embedded broker and cache when none are configured, one child process per worker
(capture, score, alert, deliver) with their logs in a run folder, and follows the defects topic to show
events as they happen. With `exit_when_done` it stops once finite sources are fully captured,
scored and alerted, and returns a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kafka import TopicPartition

from pipeline.bus import TOPICS, create_topics, make_consumer, topic_name
from pipeline.config import Settings
from pipeline.logging import get_logger
from pipeline.replay.report import event_line
from schemas import DefectEvent, ScoreMessage

log = get_logger(__name__)

WORKERS = ("capture", "score", "alert", "deliver")


@dataclass
class Summary:
    frames: int = 0
    scores: int = 0
    events: int = 0
    seconds: float = 0.0
    first_score_ts: float | None = None
    last_score_ts: float | None = None
    event_ids: set[str] = field(default_factory=set)
    scored: set[tuple[str, int]] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        if self.first_score_ts is None or self.last_score_ts is None or self.scores < 2:
            return 0.0
        return (self.scores - 1) / max(1e-9, self.last_score_ts - self.first_score_ts)


class Site:
    def __init__(self, settings: Settings, config_file: str | None, replay_session: str | None = None,
                 run_dir: str | None = None, out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self.config_file = config_file
        self.replay_session = replay_session
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="linewatch-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.children: dict[str, subprocess.Popen] = {}
        self.summary = Summary()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- infrastructure -------------------------------------------------------------------------
    def start_infrastructure(self, stack: contextlib.ExitStack) -> dict[str, str]:
        from pipeline.embedded import EmbeddedBroker, EmbeddedRedis

        env: dict[str, str] = {}
        if self.settings.kafka.bootstrap_servers is None:
            broker = stack.enter_context(EmbeddedBroker())
            self.settings.kafka.bootstrap_servers = broker.bootstrap_servers
            self.say(f"embedded Kafka-compatible broker (tansu) at {broker.bootstrap_servers}")
        if self.settings.redis.url is None:
            cache = stack.enter_context(EmbeddedRedis())
            self.settings.redis.url = cache.url
            self.say(f"embedded cache at {cache.url}")
        env["LINEWATCH_KAFKA__BOOTSTRAP_SERVERS"] = self.settings.kafka.bootstrap_servers or ""
        env["LINEWATCH_REDIS__URL"] = self.settings.redis.url or ""
        return env

    def spawn(self, name: str, env: dict[str, str], extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipeline.cli"]
        if self.config_file:
            cmd += ["--config", str(self.config_file)]
        cmd += [name, *extra]
        logfile = (self.run_dir / f"{name}.log").open("ab")
        child_env = {**os.environ, **env}
        if self.settings.metrics.port is not None:
            child_env["LINEWATCH_METRICS__PORT"] = str(self.settings.metrics.port + WORKERS.index(name))
        proc = subprocess.Popen(cmd, env=child_env, stdout=logfile, stderr=subprocess.STDOUT)
        logfile.close()
        return proc

    def stop_children(self, timeout_s: float = 20.0) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def warn_random_weights(self) -> None:
        if self.settings.engine.pretrained == "random":
            bar = "!" * 78
            self.say(f"{bar}\n!! RANDOM WEIGHTS: engine.pretrained is 'random'. Scores, events and masks below\n"
                     f"!! show the pipeline working but MEAN NOTHING. Set engine.pretrained to an\n"
                     f"!! open_clip tag (laion400m_e31) or a checkpoint file for real inspection.\n{bar}")

    def dead_worker(self) -> str | None:
        """Why a long-running child has exited, if one has."""
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None and not (name == "capture" and code == 0):
                return f"worker {name} exited with status {code}; see {self.run_dir / (name + '.log')}"
        return None

    # -- main loop ------------------------------------------------------------------------------
    def run(self, exit_when_done: bool = False) -> int:
        started = time.time()
        self.warn_random_weights()
        with contextlib.ExitStack() as stack:
            env = self.start_infrastructure(stack)
            create_topics(self.settings.kafka, TOPICS)
            stats_file = self.run_dir / "capture-stats.json"
            stats_file.unlink(missing_ok=True)
            capture_args = ["--stats-file", str(stats_file)]
            if self.replay_session:
                capture_args += ["--replay-session", self.replay_session]
            # Scorer and alerter first: the scorer needs its model loaded before frames pile up.
            self.children["score"] = self.spawn("score", env, [])
            self.children["alert"] = self.spawn("alert", env, [])
            # Subscriptions live in Redis: with a configured (not embedded) Redis they are served too.
            self.children["deliver"] = self.spawn("deliver", env, [])
            self.children["capture"] = self.spawn("capture", env, capture_args)
            self.say(f"workers started: {', '.join(f'{n} (pid {p.pid})' for n, p in self.children.items())}; "
                     f"logs in {self.run_dir}")
            stack.callback(self.stop_children)
            try:
                code = self._follow(stats_file, exit_when_done)
            except KeyboardInterrupt:
                self.say("interrupted: stopping workers")
                code = 130
        self.summary.seconds = time.time() - started
        self._print_summary()
        return code

    def _follow(self, stats_file: Path, exit_when_done: bool) -> int:
        kafka = self.settings.kafka
        consumer = make_consumer(kafka, None, [])
        tps = [TopicPartition(topic_name(kafka, t), p) for t in ("scores", "defects")
               for p in sorted(consumer.partitions_for_topic(topic_name(kafka, t)) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        scores_topic = topic_name(kafka, "scores")
        captured: int | None = None
        done_since: float | None = None
        grace = self.settings.alert.quiet_s + 3.0
        try:
            while True:
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for rec in records:
                        if tp.topic == scores_topic:
                            self._on_score(rec.value)
                        else:
                            self._on_event(rec.value)
                problem = self.dead_worker()
                if problem:
                    self.say(problem)
                    return 1
                if captured is None and self.children["capture"].poll() == 0 and stats_file.is_file():
                    stats = json.loads(stats_file.read_text())
                    captured = sum(s["published"] for s in stats.values())
                    self.summary.frames = captured
                    self.say(f"capture finished: {captured} frames published")
                if not exit_when_done or captured is None:
                    continue
                if len(self.summary.scored) >= captured:
                    done_since = done_since or time.monotonic()
                    # Let alerting close the last event after its quiet period.
                    if time.monotonic() - done_since > grace:
                        return 0
        finally:
            consumer.close()

    def _on_score(self, value: bytes) -> None:
        msg = ScoreMessage.model_validate_json(value)
        key = (msg.frame.camera_id, msg.frame.seq)
        if key in self.summary.scored:
            return  # redelivered score
        self.summary.scored.add(key)
        self.summary.scores += 1
        self.summary.latencies_ms.append(msg.latency_ms)
        ts = msg.scored_ts
        self.summary.first_score_ts = min(ts, self.summary.first_score_ts or ts)
        self.summary.last_score_ts = max(ts, self.summary.last_score_ts or ts)

    def _on_event(self, value: bytes) -> None:
        ev = DefectEvent.model_validate_json(value)
        self.summary.event_ids.add(ev.event_id)
        self.summary.events = len(self.summary.event_ids)
        self.say(event_line(ev))

    def _print_summary(self) -> None:
        s = self.summary
        lat = sorted(s.latencies_ms)
        p50 = lat[len(lat) // 2] if lat else 0.0
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else 0.0
        self.say(f"summary: frames={s.frames} scores={s.scores} events={s.events} "
                 f"frames/s={s.frames_per_s:.2f} latency_ms p50={p50:.0f} p95={p95:.0f} "
                 f"wall={s.seconds:.1f}s")
