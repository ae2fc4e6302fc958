"""`linewatch run`: a small site's workers in one process tree.

Starts an embedded broker and cache when none are configured (the cache keeps its data in the
site's data folder), one child process per worker (score, alert, deliver, api, then capture once
the scorer is ready) with their logs in a run folder, prints how to join the site from another
shell, and follows the scores and defects topics to show events as they happen. SIGINT or SIGTERM
stops every child and prints the summary; with `exit_when_done` it stops once finite sources are
fully captured and handled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from pipeline.bus import TOPICS, create_topics, topic_name
from pipeline.config import AlertSettings, KafkaSettings, Settings
from pipeline.embedded import _die_with_parent, free_port
from pipeline.logging import get_logger, hide_secrets, redact, redact_url
from pipeline.replay.report import event_line
from pipeline.runtime.envelope import Record, StageResult
from pipeline.runtime.follow import Follower
from schemas import DefectEvent, ScoreMessage

log = get_logger(__name__)

WORKERS = ("capture", "score", "alert", "deliver", "api")
# Past this long without a first score, the console says what the scorer is still doing.
FIRST_SCORE_NOTE_S = 5.0
PROGRESS_EVERY_S = 15.0


def default_data_dir() -> Path:
    """$XDG_STATE_HOME/linewatch, else ~/.local/state/linewatch."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "linewatch"


def close_wait_s(alert: AlertSettings) -> float:
    """How long after the last frame the last event may take to close: alerting closes it after
    ``quiet_s`` of capture time, or after ``silence_s`` of wall clock once the camera sends nothing."""
    return max(alert.quiet_s, alert.silence_s) + 3.0


class ResultsFollower(Follower):
    """The scores and defect events the workers produce from now on, handed to two callbacks."""

    def __init__(self, kafka: KafkaSettings, on_score: Callable[[ScoreMessage], None],
                 on_event: Callable[[DefectEvent], None]) -> None:
        self._on_score = on_score
        self._on_event = on_event
        super().__init__(kafka, "site-follow", ("scores", "defects"))

    def handle(self, records: Sequence[Record[ScoreMessage | DefectEvent]]) -> StageResult:
        for rec in records:
            if isinstance(rec.message, ScoreMessage):
                self._on_score(rec.message)
            else:
                self._on_event(rec.message)
        return StageResult()


class Stopped(Exception):  # noqa: N818 (a request, not an error)
    """SIGTERM (or SIGINT) asked the site to stop."""


@dataclass
class Summary:
    frames: int = 0
    scores: int = 0
    events: int = 0
    stale: int = 0
    rejected: int = 0
    seconds: float = 0.0
    first_score_ts: float | None = None
    last_score_ts: float | None = None
    event_ids: set[str] = field(default_factory=set)
    scored: set[tuple[str, int]] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    # From the score worker's metrics: engine seconds and frames per batch.
    scoring_s: float = 0.0
    batches: int = 0
    batch_frames: float = 0.0
    deliveries: dict[str, int] = field(default_factory=dict)

    capture_started_ts: float | None = None

    @property
    def frames_per_s(self) -> float:
        """Scored frames per second from the start of capture to the last score."""
        start = self.capture_started_ts or self.first_score_ts
        if start is None or self.last_score_ts is None or not self.scores:
            return 0.0
        return self.scores / max(1e-3, self.last_score_ts - start)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition summed by metric name and by `name{outcome=...}` (enough here)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name] = out.get(name, 0.0) + value
        outcome = re.search(r'outcome="([^"]*)"', labels)
        if outcome:
            key = f"{name}{{outcome={outcome.group(1)}}}"
            out[key] = out.get(key, 0.0) + value
    return out


class Site:
    def __init__(self, settings: Settings, config_file: str | None, replay_session: str | None = None,
                 run_dir: str | None = None, data_dir: str | Path | None = None, api: bool = True,
                 out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self.config_file = str(Path(config_file).resolve()) if config_file else None
        self.replay_session = replay_session
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="linewatch-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # None: an embedded cache that keeps nothing (replay's embedded site); `run` passes a folder.
        self.data_dir = Path(data_dir) if data_dir else None
        self.with_api = api
        self.out = out
        self.children: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.summary = Summary()
        self.started = time.time()
        self._lock: IO[str] | None = None
        self._stale_said = 0
        self.stats_file: Path | None = None

    def say(self, text: str) -> None:
        # The console is often a log file (journald, CI): no URL credentials, token or password.
        self.out.write(redact(text) + "\n")
        self.out.flush()

    # -- infrastructure -------------------------------------------------------------------------
    def lock_data_dir(self) -> None:
        """One site per data folder: two caches on the same append-only file would corrupt it."""
        if self.data_dir is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.data_dir / "site.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ValueError(f"another `linewatch run` is using the data folder {self.data_dir}; "
                             f"stop it or pass --data-dir") from None

    def start_infrastructure(self, stack: contextlib.ExitStack) -> dict[str, str]:
        from pipeline.embedded import EmbeddedBroker, EmbeddedRedis

        env: dict[str, str] = {}
        if self.settings.kafka.bootstrap_servers is None:
            broker = stack.enter_context(EmbeddedBroker())
            self.settings.kafka.bootstrap_servers = broker.bootstrap_servers
            self.say(f"embedded Kafka-compatible broker (tansu) at {broker.bootstrap_servers} "
                     f"(in memory: topics start empty at every run)")
        if self.settings.redis.url is None:
            cache = stack.enter_context(EmbeddedRedis(data_dir=self.data_dir / "cache" if self.data_dir else None))
            self.settings.redis.url = cache.url
            if cache.data_dir is not None:
                self.say(f"embedded cache at {cache.url} (kept in {cache.data_dir}: subscriptions, thresholds, "
                         f"references and labels survive a restart)")
            else:
                self.say(f"embedded cache at {cache.url} (in memory)")
        env["LINEWATCH_KAFKA__BOOTSTRAP_SERVERS"] = self.settings.kafka.bootstrap_servers or ""
        env["LINEWATCH_REDIS__URL"] = self.settings.redis.url or ""
        if self.config_file:
            # Every child (and a joining shell) reads the same file: one setting means one thing.
            env["LINEWATCH_CONFIG"] = self.config_file
        # No camera watchdog in deliver: the site itself stops when its capture dies, and starts capture
        # only once the model is loaded, so the watchdog would report every camera down meanwhile.
        env["LINEWATCH_CAPTURE__WATCHDOG"] = os.environ.get("LINEWATCH_CAPTURE__WATCHDOG", "false")
        return env

    def api_token(self) -> str:
        """The configured token, else one kept in the data folder (so a bookmarked dashboard keeps working)."""
        token = self._api_token()
        hide_secrets(token)
        return token

    def _api_token(self) -> str:
        if self.settings.api.token:
            return self.settings.api.token
        if self.data_dir is None:
            return secrets.token_urlsafe(24)
        path = self.data_dir / "api-token"
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
            if token:
                return token
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token

    def spawn(self, name: str, env: dict[str, str], extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipeline.cli"]
        if self.config_file:
            cmd += ["--config", self.config_file]
        cmd += [name, *extra]
        logfile = (self.run_dir / f"{name}.log").open("ab")
        child_env = {**os.environ, **env}
        if name in self.ports:
            child_env["LINEWATCH_METRICS__PORT"] = str(self.ports[name])
        elif self.settings.metrics.port is not None and name != "api":
            child_env["LINEWATCH_METRICS__PORT"] = str(self.settings.metrics.port + WORKERS.index(name))
        # Own process group: a signal for the site reaches the child only through stop_children,
        # in order; PDEATHSIG ends the child if the site is killed outright.
        proc = subprocess.Popen(cmd, env=child_env, stdout=logfile, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        logfile.close()
        return proc

    def stop_children(self, timeout_s: float = 20.0) -> None:
        # Capture first (no new frames), the api last (it shows what the others finish).
        order = [n for n in ("capture", "score", "alert", "deliver", "api") if n in self.children]
        for name in order:
            proc = self.children[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for name in order:
            proc = self.children[name]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Anything the worker itself started lives in its group: make sure it is gone too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def warn_random_weights(self) -> None:
        if self.settings.engine.pretrained == "random":
            bar = "!" * 78
            self.say(f"{bar}\n!! RANDOM WEIGHTS: engine.pretrained is 'random'. Scores, events and masks below\n"
                     f"!! show the pipeline working but MEAN NOTHING. Set engine.pretrained to an\n"
                     f"!! open_clip tag (laion400m_e31) or a checkpoint file for real inspection.\n{bar}")

    def dead_worker(self) -> str | None:
        """Why a long-running child has exited, if one has (with the last line of its log)."""
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None and not (name == "capture" and code == 0):
                logfile = self.run_dir / f"{name}.log"
                return f"worker {name} exited with status {code}: {_last_error(logfile)} (log: {logfile})"
        return None

    # -- probes ---------------------------------------------------------------------------------
    def _get(self, port: int, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return 0, ""

    def metrics(self, name: str) -> dict[str, float]:
        port = self.ports.get(name)
        if port is None or name not in self.children or self.children[name].poll() is not None:
            return {}
        status, body = self._get(port, "/metrics")
        return parse_metrics(body) if status == 200 else {}

    def wait_for_scorer(self) -> None:
        """Capture starts once the scorer has loaded its model and joined its group, so the first
        frames measure scoring, not model loading, and a live source's frames are not stale on arrival."""
        t0 = time.monotonic()
        self.say("loading model… (score worker; capture starts when it is ready)")
        last_note = t0
        while True:
            problem = self.dead_worker()
            if problem:
                raise _WorkerDiedError(problem)
            status, body = self._get(self.ports["score"], "/readyz")
            if status == 200:
                break
            if time.monotonic() - last_note >= PROGRESS_EVERY_S:
                last_note = time.monotonic()
                failing: dict[str, str] = {}
                with contextlib.suppress(ValueError, AttributeError):
                    failing = dict(json.loads(body).get("failing", {}))
                # The loop starts after the model: "not started" adds nothing while it loads.
                failing.pop("loop", None)
                doing = "loading the model and preparing the cameras' classes" if failing.pop(
                    "model_loaded", None) or not failing else "waiting for the scorer"
                others = "; ".join(f"{k}: {v}" for k, v in failing.items())
                self.say(f"still {doing} ({time.monotonic() - t0:.0f}s){'; ' + others if others else ''}")
            time.sleep(0.3)
        self.say(f"scorer ready (model loaded) in {time.monotonic() - t0:.1f}s; starting capture")

    # -- main loop ------------------------------------------------------------------------------
    def run(self, exit_when_done: bool = False) -> int:
        self.started = time.time()
        self.lock_data_dir()
        self.warn_random_weights()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, _frame: object) -> None:
            # Further signals while stopping are ignored: the shutdown below is already under way.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            raise Stopped(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, on_signal)
        code = 0
        try:
            with contextlib.ExitStack() as stack:
                try:
                    env = self.start_infrastructure(stack)
                    create_topics(self.settings.kafka, TOPICS)
                    # Every worker serves /metrics and /readyz: the site waits on and reads them.
                    base = self.settings.metrics.port
                    self.ports = {n: (base + WORKERS.index(n) if base is not None else free_port())
                                  for n in WORKERS if n != "api"}
                    results = ResultsFollower(self.settings.kafka, self._on_score, self._on_event)
                    stack.callback(results.close)
                    # After the workers stop (callbacks run last-in first-out): the scores and events
                    # of their last batch, before the broker goes.
                    stack.callback(self._drain, results)
                    stack.callback(self.stop_children)
                    self.children["score"] = self.spawn("score", env, [])
                    self.children["alert"] = self.spawn("alert", env, [])
                    self.children["deliver"] = self.spawn("deliver", env, [])
                    if self.with_api:
                        self.start_api(env)
                    self.print_join(env)
                    self.wait_for_scorer()
                    stats_file = self.stats_file = self.run_dir / "capture-stats.json"
                    stats_file.unlink(missing_ok=True)
                    capture_args = ["--stats-file", str(stats_file)]
                    if self.replay_session:
                        capture_args += ["--replay-session", self.replay_session]
                    self.children["capture"] = self.spawn("capture", env, capture_args)
                    self.summary.capture_started_ts = time.time()
                    self.say(f"workers started: "
                             f"{', '.join(f'{n} (pid {p.pid})' for n, p in self.children.items())}; "
                             f"logs in {self.run_dir}")
                    code = self._follow(results, stats_file, exit_when_done)
                except (KeyboardInterrupt, Stopped) as exc:
                    self.say(f"{exc or 'SIGINT'}: stopping workers…")
                    code = 130
                except _WorkerDiedError as exc:
                    self.say(str(exc))
                    code = 1
                finally:
                    # While the workers still answer: what they counted that the topics do not show.
                    self._collect_metrics()
        except (KeyboardInterrupt, Stopped):
            code = 130
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._lock is not None:
                self._lock.close()
        self.summary.seconds = time.time() - self.started
        self._print_summary()
        return code

    def start_api(self, env: dict[str, str]) -> None:
        api = self.settings.api
        token = self.api_token()
        env["LINEWATCH_API__TOKEN"] = token
        env["LINEWATCH_API__HOST"] = api.host
        env["LINEWATCH_API__PORT"] = str(api.port)
        self.children["api"] = self.spawn("api", env, [])
        host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
        where = f"  (API listening on {api.host}:{api.port})"
        if self.out.isatty():
            # The link carries the token only for a person at a terminal (as `linewatch api`).
            self.out.write(f"dashboard: http://{host}:{api.port}/?token={token}{where}\n")
            self.out.flush()
        else:
            self.say(f"dashboard: http://{host}:{api.port}/?token=***{where}; the token is in site.env")

    def print_join(self, env: dict[str, str]) -> None:
        """The exports with credentials go to a file only its owner reads; the console shows them as ***."""
        names = ["LINEWATCH_CONFIG", "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", "LINEWATCH_REDIS__URL",
                 "LINEWATCH_API__TOKEN"]
        lines = [f"export {n}={shlex.quote(env[n])}" for n in names if env.get(n)]
        shown = {**{n: shlex.quote(v) for n, v in env.items()}, "LINEWATCH_API__TOKEN": "***",
                 "LINEWATCH_REDIS__URL": shlex.quote(redact_url(env.get("LINEWATCH_REDIS__URL", "")))}
        shown_lines = [f"export {n}={shown[n]}" for n in names if env.get(n)]
        site_env = (self.data_dir or self.run_dir) / "site.env"
        try:
            fd = os.open(site_env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a file left by an older run keeps its mode otherwise
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(lines) + "\n")
            how = f"run `. {site_env}`, which sets (credentials shown as ***)"
        except OSError as exc:
            how = f"set (credentials shown as ***; {site_env} could not be written: {exc.strerror})"
        self.say(f"to join this site from another shell (`linewatch subscriptions ...`, `linewatch calibrate`), "
                 f"{how}:\n" + "\n".join(f"  {ln}" for ln in shown_lines))

    def _drain(self, results: ResultsFollower, quiet_s: float = 1.5, max_s: float = 10.0) -> None:
        """Read what the stopped workers produced last, until the topics are quiet."""
        deadline = time.monotonic() + max_s
        quiet_since = time.monotonic()
        with contextlib.suppress(Exception):  # the broker may be gone; the summary then says less
            while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
                if results.poll(300):
                    quiet_since = time.monotonic()
        if not self.summary.frames and self.stats_file is not None and self.stats_file.is_file():
            # Stopped before capture finished: capture wrote its counts on the way out.
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                stats = json.loads(self.stats_file.read_text())
                self.summary.frames = sum(s["published"] for s in stats.values())

    def _follow(self, results: ResultsFollower, stats_file: Path, exit_when_done: bool) -> int:
        captured: int | None = None
        done_since: float | None = None
        grace = close_wait_s(self.settings.alert)
        next_metrics = time.monotonic() + 5.0
        capture_started = time.monotonic()
        noted_join = False
        while True:
            results.poll(500)
            problem = self.dead_worker()
            if problem:
                self.say(problem)
                return 1
            if not noted_join and not self.summary.scores and \
                    time.monotonic() - capture_started > FIRST_SCORE_NOTE_S:
                noted_join = True
                # Frames are not lost meanwhile: a new group reads the topic from its start.
                self.say("waiting for consumer group join… (the scorer's first batch; frames wait in the topic)")
            if time.monotonic() >= next_metrics or (captured is not None and exit_when_done):
                next_metrics = time.monotonic() + 5.0
                self._collect_metrics()
            if captured is None and self.children["capture"].poll() == 0 and stats_file.is_file():
                stats = json.loads(stats_file.read_text())
                captured = sum(s["published"] for s in stats.values())
                self.summary.frames = captured
                self.say(f"capture finished: {captured} frames published")
            if not exit_when_done or captured is None:
                continue
            handled = len(self.summary.scored) + self.summary.stale + self.summary.rejected
            if handled >= captured:
                done_since = done_since or time.monotonic()
                # Let alerting close the last event (by quiet period, or by silence once frames stop).
                if time.monotonic() - done_since > grace:
                    return 0

    def _mine(self, replay_session: str | None, ts: float) -> bool:
        """Only this run's frames and events: topics and the cache may hold earlier runs'."""
        if self.replay_session is not None:
            return replay_session == self.replay_session
        return replay_session is None and ts >= self.started - 1.0

    def _on_score(self, msg: ScoreMessage) -> None:
        if not self._mine(msg.frame.replay_session, msg.frame.capture_ts):
            return
        key = (msg.frame.camera_id, msg.frame.seq)
        if key in self.summary.scored:
            return  # redelivered score
        self.summary.scored.add(key)
        self.summary.scores += 1
        self.summary.latencies_ms.append(msg.latency_ms)
        ts = msg.scored_ts
        self.summary.first_score_ts = min(ts, self.summary.first_score_ts or ts)
        self.summary.last_score_ts = max(ts, self.summary.last_score_ts or ts)

    def _on_event(self, ev: DefectEvent) -> None:
        if not self._mine(ev.replay_session, ev.last_ts):
            return
        self.summary.event_ids.add(ev.event_id)
        self.summary.events = len(self.summary.event_ids)
        self.say(event_line(ev))

    def _collect_metrics(self) -> None:
        s = self.summary
        score = self.metrics("score")
        if score:
            s.stale = int(score.get("linewatch_frames_stale_total", s.stale))
            s.rejected = int(score.get("linewatch_dlq_total", s.rejected))
            s.scoring_s = score.get("linewatch_scoring_seconds_sum", s.scoring_s)
            s.batches = int(score.get("linewatch_scoring_seconds_count", s.batches))
            s.batch_frames = score.get("linewatch_batch_size_sum", s.batch_frames)
        if s.stale > self._stale_said:
            self._stale_said = s.stale
            self.say(f"{s.stale} frames skipped as stale so far: captured more than scoring.staleness_s="
                     f"{self.settings.scoring.staleness_s}s before the scorer reached them "
                     f"(scorer too slow for the frame rate, clocks apart, or old timestamps)")
        deliver = self.metrics("deliver")
        if deliver:
            s.deliveries = {k.split("outcome=", 1)[1].rstrip("}"): int(v) for k, v in deliver.items()
                            if k.startswith("linewatch_deliveries_total{")}

    def _print_summary(self) -> None:
        s = self.summary
        lat = sorted(s.latencies_ms)
        p50 = lat[len(lat) // 2] if lat else 0.0
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else 0.0
        self.say(f"summary: frames={s.frames} scores={s.scores} events={s.events} stale={s.stale} "
                 f"rejected={s.rejected} frames/s={s.frames_per_s:.2f} wall={s.seconds:.1f}s")
        if s.batches:
            per_batch = 1000 * s.scoring_s / s.batches
            per_frame = per_batch / max(1.0, s.batch_frames / s.batches)
            self.say(f"  latency_ms (capture to score) p50={p50:.0f} p95={p95:.0f}: scoring {per_batch:.0f} ms per "
                     f"batch of {s.batch_frames / s.batches:.1f} frames ({per_frame:.0f} ms/frame), queue wait "
                     f"p50≈{max(0.0, p50 - per_batch):.0f} ms")
        else:
            self.say(f"  latency_ms (capture to score) p50={p50:.0f} p95={p95:.0f}")
        if s.stale:
            self.say(f"  {s.stale} frames were skipped as stale (older than scoring.staleness_s="
                     f"{self.settings.scoring.staleness_s}s when the scorer reached them); see score.log")
        if s.rejected:
            self.say(f"  {s.rejected} frames went to the dead-letter topic "
                     f"({topic_name(self.settings.kafka, 'dlq')}); see score.log")
        d = s.deliveries
        if d:
            self.say(f"  deliveries: delivered={d.get('delivered', 0)} dead-lettered={d.get('failed', 0)} "
                     f"retried={d.get('retry', 0)} coalesced={d.get('coalesced', 0)}"
                     + ("; see `linewatch subscriptions dead-letters ID`" if d.get("failed") else ""))
        else:
            self.say("  deliveries: none (no subscription matched, or none configured)")


class _WorkerDiedError(Exception):
    """A worker exited while the site waited for it."""


def _last_error(logfile: Path) -> str:
    """The most telling line of a worker log: its last error message, not a whole traceback."""
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("linewatch ") and ": error: " in text:
            return text.split(": error: ", 1)[1]
        with contextlib.suppress(ValueError, AttributeError):
            rec = json.loads(text)
            if rec.get("level") in ("error", "critical") or rec.get("exception"):
                return str(rec.get("error") or rec.get("event"))[:300]
    return lines[-1][:300] if lines else "empty log"
