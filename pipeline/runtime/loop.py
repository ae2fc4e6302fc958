"""One runtime loop under every consuming worker: poll, decode, stage, produce, ack, commit.

:class:`StreamRuntime` owns the consumer, the producer, the commits and the rebalance listener; a
worker is wiring: it builds a :class:`Stage` and a :class:`RuntimeConfig` and calls ``run(stop)``.

Per micro-batch (``max_batch`` records, waiting ``max_wait_ms`` after the first, drawn
round-robin from every partition with records waiting, so one partition's backlog never blinds the
others: see ``_fill``):

1. every record is decoded with its topic's codec (or the stage's own ``decode``) into a
   ``Record``, a ``Reject`` (to the DLQ) or a ``Skip``; with ``decode_workers`` the next batch is
   fetched and decoded in a thread pool while the stage works on the current one;
2. ``stage.handle(records)`` returns outputs and rejects; if it raises, the stage is rolled back
   and the batch retried record by record, and a record that still fails is dead-lettered;
3. outputs are produced asynchronously; a refused output (too large, invalid) dead-letters its
   source record; broker trouble is retried with backoff (the producer is rebuilt when it stays
   broken) until every output is acknowledged;
4. ``stage.after_acked()`` (e.g. persisting alert state), then offsets are committed: without
   waiting on the hot path (``commit_async``, each commit superseding the last), awaited on revoke
   and at stop. A batch's offsets are committed as soon as its outputs are acknowledged, before
   the next batch is handled (see ``_settle_acked``).

Infrastructure errors (broker, Redis) raised by the stage roll the batch back and rewind the
consumer: the worker waits with backoff, readiness says why, liveness stays true, and it resumes
by itself. ``stop`` (SIGINT/SIGTERM through ``stop_on_signals``) ends it after the current batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from kafka import (
    AsyncConsumerRebalanceListener,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.errors import CommitFailedError, KafkaError

from pipeline.bus import create_topics, lag, make_consumer, make_producer, send_dead_letter, topic_partitions
from pipeline.config import KafkaSettings
from pipeline.health import Health
from pipeline.kafka_compat import member_id, request_rejoin, unpark_paused
from pipeline.logging import get_logger
from pipeline.metrics import RUNTIME_BATCH_SECONDS, RUNTIME_DEGRADED, RUNTIME_RECORDS
from pipeline.runtime.envelope import (
    Decoded,
    Envelope,
    Output,
    Record,
    RecordError,
    Reject,
    Skip,
    StageResult,
    first_line,
)
from pipeline.runtime.failover import MemberLeases
from pipeline.runtime.policy import Backoff, is_record_error, is_transient, reason_code
from pipeline.runtime.signals import stop_on_signals
from pipeline.runtime.topics import codec_for, full_name

__all__ = ["RuntimeConfig", "RuntimeStats", "Stage", "StreamRuntime", "stop_on_signals"]

log = get_logger(__name__)

Decoder = Callable[[Envelope], Any]


class Stage:
    """A batch handler; subclasses override ``handle`` and whichever hooks they need.

    Every hook runs in the runtime's thread. The stage never sees a Kafka client.
    """

    def decode(self, env: Envelope) -> Any:
        """Envelope -> message (or a ``Reject``/``Skip``); raise ``RecordError`` to dead-letter.

        Runs in the decode thread pool when the runtime has one. ``None`` here means "use the
        topic's codec" (the default)."""
        return NotImplemented

    def handle(self, records: Sequence[Record[Any]]) -> StageResult:
        raise NotImplementedError

    def on_tick(self) -> StageResult:
        """Called once per loop iteration, records or not (e.g. closing events by wall clock)."""
        return StageResult()

    def after_acked(self) -> None:
        """Every output so far is acknowledged; about to commit (e.g. persist state)."""

    def rollback(self) -> None:
        """``handle`` raised, or its outputs were not acknowledged: forget unsaved changes."""

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        """Partitions this worker now owns (load their state)."""

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions this worker no longer owns (their offsets are already committed)."""

    def committable(self) -> dict[TopicPartition, int] | None:
        """Offsets to commit when the stage settles records itself (asynchronous delivery);
        None: the runtime commits every handled batch."""
        return None

    def commit_floor(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Of the offsets handled so far, those safe to commit: a stage that holds records back
        (e.g. frames waiting for their class) lowers them and returns the rest later."""
        return offsets

    def on_stop(self) -> None:
        """The loop ended: settle what can be settled before the final commit."""

    def busy(self) -> bool:
        """True pauses fetching (the stage has too much in flight)."""
        return False

    def settled(self) -> bool:
        """Nothing in flight: an idle exit may happen."""
        return True


@dataclass
class RuntimeConfig:
    name: str  # the worker: metric label, log field, health check name
    group_id: str | None  # None: manual assignment of every partition, nothing committed
    topics: Sequence[str]  # logical names
    output_topics: Sequence[str] = ()  # created at start with the configured partitions
    max_batch: int = 100
    max_wait_ms: int = 0
    poll_timeout_ms: int = 200
    idle_exit_s: float | None = None
    decode_workers: int = 0  # >0: fetch and decode the next batch while the stage runs
    start: str = "committed"  # manual assignment: "beginning", "end"; or see ``start_offsets``
    start_offsets: dict[TopicPartition, int] | None = None  # manual assignment at these offsets
    end_offsets: dict[TopicPartition, int] | None = None  # stop reading a partition here (exclusive)
    max_pending_batches: int = 1  # 2: a batch's acks are awaited while the stage works on the next
    lag_every_s: float = 15.0
    ack_timeout_s: float = 30.0
    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    producer: bool = True  # False: a read-only worker (no outputs, no DLQ)
    dead_letters: bool = True  # False: rejects are logged and skipped (rescore keeps off live topics)


@dataclass
class RuntimeStats:
    records: int = 0
    rejected: int = 0  # dead letters acknowledged
    reasons: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    outputs: int = 0  # outputs acknowledged
    batches: int = 0
    commits: int = 0
    retries: int = 0


class _TransientError(Exception):
    """Internal: infrastructure failed; rewind and retry after a backoff."""


class _Listener(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls these on the consumer's IO thread while the runtime's thread waits in
    ``poll``: they may await the client's futures, never call its blocking API (``commit`` there
    raises "Cannot block on net.run() from the IO thread itself")."""

    def __init__(self, runtime: StreamRuntime) -> None:
        self._runtime = runtime

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._runtime._on_revoked(set(revoked), commit=True)

    async def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        # Evicted from the group: a commit would be refused (stale generation); the next owner
        # handles these records again.
        await self._runtime._on_revoked(set(lost), commit=False)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._runtime._on_assigned(set(assigned))


@dataclass
class _Pending:
    """Outputs of one batch in flight, and the offsets they free once acknowledged."""

    offsets: dict[TopicPartition, int]
    batch: list[Envelope]
    sends: list[tuple[Output, Reject | None, Any]]


class StreamRuntime:
    def __init__(self, kafka: KafkaSettings, config: RuntimeConfig, stage: Stage, *,
                 health: Health | None = None, stop: threading.Event | None = None,
                 beat: Callable[[], None] | None = None, failover: MemberLeases | None = None) -> None:
        self.kafka = kafka
        if failover is not None and config.group_id is None:
            raise ValueError(f"{config.name}: failover needs a consumer group (group_id is None)")
        self._failover = failover
        self._beat_fn = beat
        self.config = config
        self.stage = stage
        self.health = health
        self.stop = stop or threading.Event()
        self.stats = RuntimeStats()
        self.log = log.bind(worker=config.name, group=config.group_id)
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix=f"{config.name}-decode") \
            if config.decode_workers > 0 else None
        self._assigned: set[TopicPartition] = set()
        self._done: dict[TopicPartition, int] = {}  # handled, acked, not yet committed
        self._committed: dict[TopicPartition, int] = {}
        self._committing: dict[TopicPartition, int] = {}  # sent by commit_async, not confirmed yet
        # (offsets, _done when sent, from_done, response): appended by the consumer's IO thread,
        # read by the runtime's.
        self._commit_results: deque[tuple[dict[TopicPartition, int], dict[TopicPartition, int | None], bool,
                                          Any]] = deque()
        self._batch_s = 0.0  # how long the last batch took to handle
        self._prefetched: list[tuple[Envelope, Future[Decoded] | Decoded]] = []
        # Polled, not yet in a batch: per partition, in offset order (see ``_fill``).
        self._buffer: dict[TopicPartition, deque[Envelope]] = {}
        self._held: set[TopicPartition] = set()  # paused because their buffer is full
        self._served: dict[TopicPartition, int] = {}  # the batch that last drew from it
        self._drawn = 0
        self._pending: list[_Pending] = []
        self._paused = False
        self._finished: set[TopicPartition] = set()  # manual ranges read to their end
        self._degraded: str | None = None
        self._backoff = Backoff()
        self._last_record = time.monotonic()
        self._last_lag = 0.0
        self._started = False
        stage_decode = type(stage).decode is not Stage.decode
        self._decoders: dict[str, Decoder] = {}
        self._stage_decode = stage.decode if stage_decode else None
        if health is not None:
            health.add_check(f"{config.name}_stream", self._readiness, cache_s=0.0)

    # -- public ---------------------------------------------------------------------------------
    @property
    def degraded(self) -> str | None:
        """Why the worker is waiting (broker or Redis trouble), or None while it works."""
        return self._degraded

    @property
    def consumer(self) -> KafkaConsumer | None:
        return self._consumer

    def run(self) -> RuntimeStats:
        """Loop until ``stop`` is set, the idle limit passes, or every manual range is read."""
        try:
            self.start()
            while not self.stop.is_set():
                self.step()
                if self._idle_exit():
                    self.log.info("stream_idle_exit", idle_s=self.config.idle_exit_s)
                    break
                if self.ranges_done:
                    break
        finally:
            self.close()
        return self.stats

    @property
    def ranges_done(self) -> bool:
        ends = self.config.end_offsets
        return ends is not None and set(ends) <= self._finished and not self._buffered() and not self._prefetched

    def start(self) -> None:
        """Create topics and clients, waiting (with backoff) while the broker is unreachable."""
        if self._started:
            return
        names = [*self.config.topics, *self.config.output_topics]
        if self.config.producer and self.config.dead_letters:
            names.append("dlq")
        while not self.stop.is_set():
            try:
                # Topics with the configured partitions, not the broker's auto-creation default.
                create_topics(self.kafka, names=tuple(dict.fromkeys(names)))
                self._consumer = self._make_consumer()
                if self.config.producer:
                    self._producer = make_producer(self.kafka)
                break
            except KafkaError as exc:
                self._wait("broker", f"broker unavailable: {first_line(exc)}")
        self._started = True
        if self._failover is not None:
            self._failover.start()
        self._set_degraded(None)
        self.log.info("stream_started", topics=[full_name(self.kafka, t) for t in self.config.topics])

    def step(self) -> int:
        """One iteration: settle, poll, decode, handle, produce, commit. Returns records handled."""
        self._beat()
        if self._consumer is None:
            self.start()
            if self._consumer is None:
                return 0
        try:
            n = self._step()
            if self._degraded is not None:
                self._set_degraded(None)
            self._backoff.reset()
            return n
        except _TransientError as exc:
            self._wait("transient", str(exc))
            return 0

    def close(self) -> None:
        """Commit what is acknowledged, then close the clients (never raises)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._settle_until(0)
        except Exception as exc:  # left uncommitted: handled again by the next owner
            self.log.warning("stream_final_settle_failed", error=first_line(exc))
        try:
            self.stage.on_stop()
        except Exception as exc:
            self.log.warning("stage_on_stop_failed", error=first_line(exc))
        try:
            self._commit(sync=True)
        except Exception as exc:
            self.log.warning("stream_final_commit_failed", error=first_line(exc))
        if self._failover is not None:
            try:
                self._failover.close()
            except Exception as exc:
                self.log.warning("failover_close_failed", error=first_line(exc))
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception as exc:
                self.log.warning("consumer_close_failed", error=first_line(exc))
            self._consumer = None
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:
                self.log.warning("producer_close_failed", error=first_line(exc))
            self._producer = None
        self.log.info("stream_stopped", **asdict(self.stats))

    # -- the loop ---------------------------------------------------------------------------------
    def _step(self) -> int:
        consumer = self._consumer
        assert consumer is not None
        self._apply_backpressure()
        if self._pending:
            # The last batch's outputs are usually acknowledged by now: commit them before the next
            # batch is handled, so a worker killed during it is not followed by a second handling of
            # this one. The wait is a small share of a batch (an ack takes the producer's linger plus
            # one round trip): a slow (CPU) batch waits for its acks, a fast one hardly waits and its
            # acks are awaited after the next batch (max_pending_batches=2) as before.
            self._settle_acked(min(0.05, 0.05 * self._batch_s))
            self._commit()
        batch = self._prefetched or self._decode_all(self._next_batch(self.config.poll_timeout_ms, wait=True))
        self._prefetched = []
        if self._pool is not None and batch:
            # Overlap: fetch and decode the next batch while the stage works on this one.
            self._prefetched = self._decode_all(self._next_batch(0, wait=False))
        if self.config.group_id is not None and any(item[0].tp not in self._assigned for item in batch):
            # Revoked meanwhile (a poll began the rebalance): not handled here, read again if ours again.
            self._unread([env for env, _ in batch if env.tp not in self._assigned])
            batch = [item for item in batch if item[0].tp in self._assigned]
        started = time.perf_counter()
        results = self._resolve(batch)
        if results:
            self._last_record = time.monotonic()
            self.stats.records += len(results)
            self._handle(results)
            self._batch_s = time.perf_counter() - started
            RUNTIME_BATCH_SECONDS.labels(worker=self.config.name).observe(self._batch_s)
            self.stats.batches += 1
            self._last_record = time.monotonic()  # idle time counts from the end of the work
        else:
            self._settle_until(0)  # nothing new: settle what is in flight so it can be committed
        self._tick()
        self._commit()
        if time.monotonic() - self._last_lag >= self.config.lag_every_s and self._assigned \
                and self.config.group_id is not None:
            try:
                lag(consumer)
            except Exception as exc:  # a metric is no reason to stop
                self.log.debug("lag_failed", error=first_line(exc))
            self._last_lag = time.monotonic()
        return len(results)

    def _next_batch(self, timeout_ms: int, wait: bool) -> list[Envelope]:
        """Up to max_batch records: wait for the first, then at most max_wait_ms for the rest; drawn
        round-robin from the partitions with records waiting, least recently served first."""
        cfg = self.config
        if self._paused:  # backpressure: the stage has too much in flight, nothing new for it
            self._fill(timeout_ms)  # keeps the membership alive; paused partitions bring nothing
            return []
        self._fill(0 if self._buffered() else timeout_ms)
        if wait and 0 < self._buffered() < cfg.max_batch:
            deadline = time.monotonic() + cfg.max_wait_ms / 1000.0
            while self._buffered() < cfg.max_batch and self._fetching():
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    break
                self._fill(left_ms)
        return self._draw()

    def _fill(self, timeout_ms: int) -> int:
        """Poll into the per-partition buffer; returns the records added.

        kafka-python hands out one partition's whole fetch (up to ``max_partition_fetch_bytes``,
        hundreds of small frames) before any record of the next partition. So a partition whose
        buffer holds a batch is paused: the fetcher parks its parsed records (restored on resume,
        not fetched again) and the next poll reaches the other partitions' fetched records. It is
        resumed once its buffer is drawn empty. The buffer holds at most about two batches per
        partition; its records are past the consumer's position but never committed before handled."""
        consumer = self._consumer
        assert consumer is not None
        cfg = self.config
        added = 0
        after_hold = 0  # polls still due after a partition was held
        while True:
            unpark_paused(consumer)
            self._watch_peers(consumer)
            polled = consumer.poll(timeout_ms=timeout_ms, max_records=cfg.max_batch)
            timeout_ms = 0  # then only what is fetched already
            n = 0
            for tp, recs in polled.items():
                if cfg.group_id is not None and tp not in self._assigned:
                    # Revoked meanwhile (a poll began the rebalance): read again if ours again.
                    self._unread([Envelope.from_record(rec) for rec in recs])
                    continue
                end = cfg.end_offsets.get(tp) if cfg.end_offsets is not None else None
                queue = self._buffer.setdefault(tp, deque())
                for rec in recs:
                    if end is not None and rec.offset >= end:
                        break
                    queue.append(Envelope.from_record(rec))
                    n += 1
                if end is not None and consumer.position(tp) >= end:
                    consumer.pause(tp)
                    self._finished.add(tp)
                if len(queue) >= cfg.max_batch and tp not in self._held:
                    consumer.pause(tp)
                    self._held.add(tp)
                    after_hold = 2
            if cfg.end_offsets is not None:
                for tp, end in cfg.end_offsets.items():
                    if tp not in self._finished and consumer.position(tp) >= end:
                        consumer.pause(tp)
                        self._finished.add(tp)
            added += n
            # Twice more after a hold, records or not: the first parks the held partition's records,
            # only the second puts another parked (since resumed) partition's records in line.
            if not polled:
                if after_hold <= 0:
                    return added
                after_hold -= 1
            if not self._fetching():
                return added

    def _watch_peers(self, consumer: KafkaConsumer) -> None:
        """Fast failover: publish this member's id, rejoin at once when a dead peer was removed."""
        if self._failover is None:
            return
        self._failover.set_member(member_id(consumer))
        if self._failover.take_rejoin():
            self.log.info("group_rejoin_after_removal", reason="a member without a beat was removed")
            request_rejoin(consumer)

    def _fetching(self) -> bool:
        """Some partition may still bring records (not held, paused or read to its end)."""
        return not self._paused and any(tp not in self._held and tp not in self._finished for tp in self._assigned)

    def _buffered(self) -> int:
        return sum(len(q) for q in self._buffer.values())

    def _draw(self) -> list[Envelope]:
        """Take a batch round-robin from the buffer; resume the held partitions it emptied."""
        order = sorted((tp for tp, q in self._buffer.items() if q), key=lambda tp: self._served.get(tp, -1))
        if not order:
            return []
        self._drawn += 1
        out: list[Envelope] = []
        while order and len(out) < self.config.max_batch:
            for tp in list(order):
                queue = self._buffer[tp]
                out.append(queue.popleft())
                self._served[tp] = self._drawn
                if not queue:
                    order.remove(tp)
                if len(out) >= self.config.max_batch:
                    break
        self._release([tp for tp in self._held if not self._buffer.get(tp)])
        return out

    def _release(self, tps: Iterable[TopicPartition]) -> None:
        """Held partitions fetch again (unless backpressure or their range's end pauses them)."""
        tps = [tp for tp in tps if tp in self._held]
        self._held.difference_update(tps)
        resume = [tp for tp in tps if tp not in self._finished]
        if resume and not self._paused and self._consumer is not None:
            held = self._consumer.assignment()
            resume = [tp for tp in resume if tp in held]
            if resume:
                self._consumer.resume(*resume)

    def _decoder(self, topic: str) -> Decoder:
        if self._stage_decode is not None:
            return self._stage_decode
        found = self._decoders.get(topic)
        if found is None:
            found = self._decoders[topic] = codec_for(self.kafka, topic)
        return found

    def _decode_one(self, env: Envelope) -> Decoded:
        try:
            out = self._decoder(env.topic)(env)
        except RecordError as exc:
            return Reject(env, exc.reason)
        except Exception as exc:  # whatever a hostile record makes a decoder raise
            return Reject(env, f"decode_failed: {type(exc).__name__}: {first_line(exc)}")
        if isinstance(out, Record | Reject | Skip):
            return out
        return Record(env, out)

    def _decode_all(self, envs: list[Envelope]) -> list[tuple[Envelope, Future[Decoded] | Decoded]]:
        if self._pool is None:
            return [(env, self._decode_one(env)) for env in envs]
        return [(env, self._pool.submit(self._decode_one, env)) for env in envs]

    @staticmethod
    def _resolve(batch: list[tuple[Envelope, Future[Decoded] | Decoded]]) -> list[Decoded]:
        out: list[Decoded] = []
        for env, item in batch:
            if isinstance(item, Future):
                try:
                    item = item.result()
                except Exception as exc:
                    item = Reject(env, f"decode_failed: {first_line(exc)}")
            out.append(item)
        return out

    def _handle(self, decoded: list[Decoded]) -> None:
        records = [d for d in decoded if isinstance(d, Record)]
        rejects = [d for d in decoded if isinstance(d, Reject)]
        skipped = sum(isinstance(d, Skip) for d in decoded)
        self.stats.skipped += skipped
        if skipped:
            RUNTIME_RECORDS.labels(worker=self.config.name, outcome="skipped").inc(skipped)
        offsets = _next_offsets(d.envelope for d in decoded)
        try:
            result = self.stage.handle(records) if records else StageResult()
        except Exception as exc:
            self.stage.rollback()
            if is_transient(exc):
                self._rewind([d.envelope for d in decoded])
                raise _TransientError(f"{type(exc).__name__}: {first_line(exc)}") from exc
            self.log.warning("batch_failed_retrying_singly", records=len(records), error=first_line(exc))
            self.stats.retries += 1
            self._settle_until(0)
            self._handle_singly(records, rejects)
            self._settle_until(0)
            self._done_up_to(offsets)
            return
        result.rejects[:0] = rejects
        self._deliver(result, [d.envelope for d in decoded], offsets)

    def _handle_singly(self, records: list[Record[Any]], rejects: list[Reject]) -> None:
        self._deliver(StageResult(rejects=rejects), [r.envelope for r in records])
        self._settle_until(0)
        for i, rec in enumerate(records):
            try:
                result = self.stage.handle([rec])
            except Exception as exc:
                self.stage.rollback()
                if is_transient(exc):
                    self._rewind([r.envelope for r in records[i:]])
                    raise _TransientError(f"{type(exc).__name__}: {first_line(exc)}") from exc
                result = StageResult(rejects=[Reject(rec.envelope, f"stage_failed: {type(exc).__name__}: "
                                                                    f"{first_line(exc)}")])
            self._deliver(result, [r.envelope for r in records[i:]])
            self._settle_until(0)

    def _tick(self) -> None:
        try:
            result = self.stage.on_tick()
        except Exception as exc:
            self.stage.rollback()
            if is_transient(exc):
                raise _TransientError(f"{type(exc).__name__}: {first_line(exc)}") from exc
            self.log.error("stage_tick_failed", error=first_line(exc))
            return
        if result.outputs or result.rejects:
            self._deliver(result, [])

    # -- producing --------------------------------------------------------------------------------
    def _deliver(self, result: StageResult, batch: list[Envelope],
                 offsets: dict[TopicPartition, int] | None = None) -> None:
        """Produce outputs and dead letters now; settle them (acks, then ``after_acked``, then the
        offsets become committable) once more than ``max_pending_batches - 1`` batches are in flight.

        With ``max_pending_batches=2`` the acks of one batch are awaited while the stage works on the
        next one; commits still wait for every ack of a batch."""
        sends: list[tuple[Output, Reject | None]] = [(o, None) for o in result.outputs]
        sends.extend((Output("dlq", b""), rej) for rej in result.rejects)
        self._pending.append(_Pending(offsets or {}, batch, self._send_all(sends)))
        self._settle_until(self.config.max_pending_batches - 1)

    def _send_all(self, sends: list[tuple[Output, Reject | None]]) -> list[tuple[Output, Reject | None, Any]]:
        """Send each; the third item is the future, or the exception the send raised at once."""
        limit = self.kafka.max_message_bytes
        out: list[tuple[Output, Reject | None, Any]] = []
        for o, rej in sends:
            try:
                if rej is not None:
                    fut: Any = self._send_dead_letter(rej.envelope, rej.reason)
                elif o.size > limit:
                    raise _TooLargeError(f"output of {o.size} bytes > max_message_bytes {limit}")
                else:
                    fut = self._send(o)
            except Exception as exc:
                fut = exc
            out.append((o, rej, fut))
        return out

    def _settle_until(self, keep: int) -> None:
        """Settle the oldest pending batches until at most ``keep`` remain."""
        while len(self._pending) > max(0, keep):
            try:
                self._settle(self._pending[0])
            except _TransientError:
                # Everything after the failed batch is read again too: rewind to it, forget them all.
                self._rewind([env for p in self._pending for env in p.batch])
                self._pending.clear()
                raise
            self._pending.pop(0)

    def _settle_acked(self, wait_s: float) -> None:
        """Settle the oldest pending batches whose outputs are all acknowledged (or refused),
        waiting at most ``wait_s`` in all for their acks."""
        deadline = time.monotonic() + wait_s
        while self._pending:
            for _, _, fut in self._pending[0].sends:
                if getattr(fut, "is_done", True):
                    continue
                with contextlib.suppress(Exception):  # not acknowledged yet, or refused: settled below
                    fut.get(timeout=max(0.0, deadline - time.monotonic()))
                if not fut.is_done:
                    return
            self._settle_until(len(self._pending) - 1)

    def _settle(self, pending: _Pending) -> None:
        """Wait for every ack of one batch, then ``after_acked``, then its offsets are done.

        A refused output dead-letters its source; broker trouble retries with backoff (rebuilding
        the producer when it stays broken). If the stage's post-ack hook fails, the batch is rewound
        and retried (its outputs go out again: at least once, same content)."""
        sends = pending.sends
        attempt = 0
        while sends:
            refused: list[tuple[Output, Reject | None, BaseException]] = []
            for out, rej, fut in sends:
                if isinstance(fut, BaseException):
                    refused.append((out, rej, fut))
                    continue
                try:
                    fut.get(timeout=self.config.ack_timeout_s)
                except Exception as exc:
                    refused.append((out, rej, exc))
                    continue
                self._count(rej)
            again: list[tuple[Output, Reject | None]] = []
            retry: list[tuple[Output, Reject | None]] = []
            error = ""
            for out, rej, exc in refused:
                final = isinstance(exc, _TooLargeError) or is_record_error(exc)
                if rej is None and final and out.source is not None:
                    # This output can never be produced: its input goes to the DLQ with the reason.
                    again.append((Output("dlq", b""), Reject(out.source, f"output_refused: {first_line(exc)}")))
                elif final:
                    self.log.error("output_dropped", topic=out.topic, dead_letter=rej is not None,
                                   error=first_line(exc))
                else:
                    retry.append((out, rej))
                    error = error or f"{type(exc).__name__}: {first_line(exc)}"
            if retry:
                attempt += 1
                if attempt % 3 == 0:
                    self._rebuild_producer(error)
                self._wait("producer", f"{len(retry)} record(s) not acknowledged: {error}")
                if self.stop.is_set() and attempt >= 3:
                    # Stopping: leave the batch uncommitted; the next owner handles it again.
                    self.stage.rollback()
                    raise _TransientError(f"stopped while the broker refused: {error}")
            sends = self._send_all(again + retry)
        try:
            self.stage.after_acked()
        except Exception as exc:
            # Not the record's fault (the outputs are out): roll back, rewind and retry after a wait.
            # The retried batch emits the same outputs again: at least once, same content and ids.
            self.stage.rollback()
            if not is_transient(exc):
                self.log.error("stage_after_acked_failed", error=first_line(exc))
            raise _TransientError(f"{type(exc).__name__}: {first_line(exc)}") from exc
        self._done_up_to(pending.offsets)

    def _count(self, rej: Reject | None) -> None:
        if rej is None:
            self.stats.outputs += 1
            return
        code = reason_code(rej.reason)
        self.stats.rejected += 1
        self.stats.reasons[code] = self.stats.reasons.get(code, 0) + 1
        RUNTIME_RECORDS.labels(worker=self.config.name, outcome="dead_lettered").inc()

    def _send(self, out: Output) -> Any:
        assert self._producer is not None
        return self._producer.send(full_name(self.kafka, out.topic), key=out.key, value=out.value,
                                   headers=list(out.headers))

    def _send_dead_letter(self, env: Envelope, reason: str) -> Any:
        if self._producer is None or not self.config.dead_letters:  # logged and skipped
            self.log.warning("record_skipped", reason=reason[:300], topic=env.topic, offset=env.offset)
            return _Done()
        return send_dead_letter(self._producer, self.kafka, env, reason, stage=self.config.name)

    def _rebuild_producer(self, error: str) -> None:
        """kafka-python's idempotent producer, once marked failed, fails every send for good."""
        self.log.warning("producer_rebuilt", error=error)
        old, self._producer = self._producer, None
        if old is not None:
            try:
                old.close(timeout=1)
            except Exception as exc:
                self.log.debug("producer_close_failed", error=first_line(exc))
        try:
            self._producer = make_producer(self.kafka)
        except KafkaError as exc:
            self.log.warning("producer_create_failed", error=first_line(exc))
            self._producer = _BrokenProducer(exc)  # type: ignore[assignment]

    # -- offsets --------------------------------------------------------------------------------
    def _done_up_to(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            self._done[tp] = max(self._done.get(tp, 0), off)

    def _commit(self, sync: bool = False) -> None:
        """Commit what is done: ``commit_async`` on the hot path (a failed one is sent again by a
        later call, and a later one supersedes it), blocking with ``sync`` (at stop)."""
        consumer = self._consumer
        if consumer is None or self.config.group_id is None:
            self._done.clear()
            return
        self._commit_answers()
        todo, from_done = self._to_commit(force=sync)
        if not todo:
            return
        if sync:
            try:
                consumer.commit(_commit_offsets(todo))
            except CommitFailedError as exc:
                # The group rebalanced meanwhile: the partition's next owner handles these records again.
                self.log.warning("commit_failed_rebalance", error=first_line(exc))
                return
            except KafkaError as exc:
                raise _TransientError(f"commit failed: {first_line(exc)}") from exc
            self._committed_up_to(todo, from_done)
            return
        sent_done = {tp: self._done.get(tp) for tp in todo}

        def answered(_offsets: Any, response: Any) -> None:  # on the consumer's IO thread
            self._commit_results.append((todo, sent_done, from_done, response))

        self._committing.update(todo)
        try:
            consumer.commit_async(_commit_offsets(todo), callback=answered)
        except KafkaError as exc:
            self._commit_results.append((todo, sent_done, from_done, exc))

    def _commit_answers(self) -> None:
        """The broker's answers to ``commit_async``: confirmed offsets are committed; a refused
        commit is sent again by the next ``_commit`` (its offsets are still done)."""
        while self._commit_results:
            todo, sent_done, from_done, response = self._commit_results.popleft()
            todo = {tp: off for tp, off in todo.items() if tp in self._assigned}
            for tp, off in todo.items():
                if self._committing.get(tp) == off:
                    del self._committing[tp]
            if isinstance(response, BaseException):
                self.log.warning("commit_async_failed", error=first_line(response),
                                 offsets={f"{tp.topic}:{tp.partition}": off for tp, off in todo.items()})
                continue
            self._committed.update(todo)
            if from_done:
                for tp in todo:
                    if self._done.get(tp) == sent_done.get(tp):  # nothing done since it was sent
                        self._done.pop(tp, None)
            self.stats.commits += 1

    def _to_commit(self, force: bool = False) -> tuple[dict[TopicPartition, int], bool]:
        """Offsets of owned partitions safe to commit and not committed yet (nor being committed,
        unless ``force``: the commits on revoke and at stop do not count on one in flight); True:
        they come from ``_done`` (not from the stage's ``committable``)."""
        settled = self.stage.committable()
        offsets = settled if settled is not None else self.stage.commit_floor(dict(self._done))
        todo = {tp: off for tp, off in offsets.items() if tp in self._assigned and self._committed.get(tp) != off
                and (force or self._committing.get(tp) != off)}
        return todo, settled is None

    def _committed_up_to(self, todo: dict[TopicPartition, int], from_done: bool) -> None:
        self._committed.update(todo)
        if from_done:
            for tp in todo:
                self._done.pop(tp, None)
        self.stats.commits += 1

    def _rewind(self, envs: Iterable[Envelope]) -> None:
        """Seek back to the first of ``envs`` per partition (and drop the prefetched batch and the
        buffer)."""
        consumer = self._consumer
        first: dict[TopicPartition, int] = {}
        for env in [*envs, *(e for e, _ in self._prefetched), *(e for q in self._buffer.values() for e in q)]:
            first[env.tp] = min(first.get(env.tp, env.offset), env.offset)
        self._prefetched = []
        self._buffer.clear()
        self._release(list(self._held))
        if consumer is None:
            return
        for tp, off in first.items():
            if self.config.group_id is None or tp in self._assigned:
                consumer.seek(tp, off)

    # -- rebalancing ------------------------------------------------------------------------------
    def _make_consumer(self) -> KafkaConsumer:
        cfg = self.config
        consumer = make_consumer(self.kafka, cfg.group_id, [], **cfg.consumer_overrides)
        topics = [full_name(self.kafka, t) for t in cfg.topics]
        if cfg.group_id is not None:
            consumer.subscribe(topics, listener=_Listener(self))
            return consumer
        tps: list[TopicPartition] = []
        for topic in topics:
            tps.extend(topic_partitions(consumer, topic, 30.0, stop=self.stop.is_set))
        if cfg.start_offsets is not None:
            tps = [tp for tp in tps if tp in cfg.start_offsets]
        consumer.assign(tps)
        if cfg.start_offsets is not None:
            for tp in tps:
                consumer.seek(tp, cfg.start_offsets[tp])
        elif cfg.start == "end":
            consumer.seek_to_end(*tps)
            for tp in tps:
                consumer.position(tp)  # resolve the lazy seek now: records after start are seen
        else:
            consumer.seek_to_beginning(*tps)
        self._assigned = set(tps)
        self.stage.on_assigned(set(tps))
        return consumer

    async def _on_revoked(self, revoked: set[TopicPartition], commit: bool) -> None:
        try:
            # Outputs in flight are acknowledged first (their offsets become done). The acks come from
            # the producer's own IO thread: this holds the consumer's loop only as long as they take.
            self._settle_until(0)
            if commit:
                await self._commit_revoked()
        except Exception as exc:  # left uncommitted: the next owner handles these records again
            self.log.warning("commit_on_revoke_failed", error=first_line(exc), lost=not commit)
        # A callback runs inside a poll: the prefetched batch and the buffer are not being handled.
        self._unread([e for e, _ in self._prefetched if e.tp in revoked]
                     + [e for tp in revoked for e in self._buffer.get(tp, ())])
        self._prefetched = [(e, d) for e, d in self._prefetched if e.tp not in revoked]
        held_for_fairness = self._held & revoked
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)
            self._committing.pop(tp, None)
            self._buffer.pop(tp, None)
            self._served.pop(tp, None)
        self._held -= revoked
        self._assigned -= revoked
        if (self._paused or held_for_fairness) and self._consumer is not None:
            # kafka-python also keeps the paused flag of a partition handed back to this member;
            # backpressure starts over (``_paused``) and pauses again while the stage is busy.
            held = self._consumer.assignment()
            kept = [tp for tp in revoked if tp in held and (self._paused or tp in held_for_fairness)]
            if kept:
                self._consumer.resume(*kept)
        self._paused = False
        try:
            self.stage.on_revoked(revoked)
        except Exception as exc:
            self.log.error("stage_on_revoked_failed", error=first_line(exc))
        self.log.info("partitions_revoked", partitions=_names(revoked))

    async def _commit_revoked(self) -> None:
        """Commit what is done before the partitions move: the next owner starts right after it.

        Awaited (Java's commitSync in onPartitionsRevoked): the JoinGroup goes out only once the
        broker has the offsets, whatever order a broker answers one connection's requests in, and a
        failure is known here. The member still holds the current generation, and Kafka accepts its
        commits while the group prepares the rebalance: it refuses them only once every member has
        joined (CompletingRebalance), which waits for this member's JoinGroup."""
        consumer = self._consumer
        if consumer is None:
            return
        self._commit_answers()
        todo, from_done = self._to_commit(force=True)
        if not todo:
            return
        await consumer.commit_async(_commit_offsets(todo))
        self._committed_up_to(todo, from_done)
        self.log.info("committed_on_revoke", offsets={f"{tp.topic}:{tp.partition}": off for tp, off in todo.items()})

    def _unread(self, envs: list[Envelope]) -> None:
        """Records polled but revoked before they were handled: seek back to them while the consumer
        still holds their partition (a rebalance in progress). kafka-python, unlike the Java client,
        keeps the position of a partition the rebalance hands back to the same member, which would
        skip them; a partition that moves away is dropped with its position (its next owner starts
        at the committed offset)."""
        consumer = self._consumer
        if consumer is None or not envs:
            return
        first: dict[TopicPartition, int] = {}
        for env in envs:
            first[env.tp] = min(first.get(env.tp, env.offset), env.offset)
        held = consumer.assignment()
        for tp, off in first.items():
            if tp in held:
                consumer.seek(tp, off)
        self.log.info("revoked_records_unread", records=len(envs),
                      offsets={f"{tp.topic}:{tp.partition}": off for tp, off in first.items() if tp in held})

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        if not self._assigned:
            self._last_record = time.monotonic()  # idle time counts from the first assignment
        self._assigned = set(assigned)
        self.log.info("partitions_assigned", partitions=_names(assigned))
        try:
            self.stage.on_assigned(set(assigned))
        except Exception as exc:
            # Redis down while loading: the stage loads lazily on first sight, tick retries.
            self.log.error("stage_on_assigned_failed", error=first_line(exc))

    def _apply_backpressure(self) -> None:
        busy = self.stage.busy()
        if busy != self._paused and self._assigned and self._consumer is not None:
            # Pausing keeps the group membership alive (polls continue) without fetching more.
            # Partitions held for fairness stay paused until their buffer is drawn.
            tps = [tp for tp in self._assigned if tp not in self._finished and (busy or tp not in self._held)]
            (self._consumer.pause if busy else self._consumer.resume)(*tps)
            self._paused = busy

    # -- health -----------------------------------------------------------------------------------
    def _idle_exit(self) -> bool:
        limit = self.config.idle_exit_s
        if limit is None or not self._assigned or self._prefetched or self._buffered() or self._pending \
                or not self.stage.settled():
            return False
        return time.monotonic() - self._last_record >= limit

    def _beat(self) -> None:
        if self.health is not None:
            self.health.beat()
        if self._beat_fn is not None:
            self._beat_fn()

    def _readiness(self) -> None:
        if self._degraded is not None:
            raise RuntimeError(self._degraded)

    def _set_degraded(self, reason: str | None) -> None:
        if reason != self._degraded:
            if reason is None:
                self.log.info("stream_recovered", was=self._degraded)
            RUNTIME_DEGRADED.labels(worker=self.config.name).set(0 if reason is None else 1)
        self._degraded = reason

    def _wait(self, what: str, reason: str) -> None:
        """Back off while infrastructure is down: liveness keeps beating, readiness says why."""
        self._set_degraded(reason)
        delay = self._backoff.next_delay()
        self.log.warning("stream_waiting", what=what, reason=reason[:300], retry_in_s=round(delay, 2))
        end = time.monotonic() + delay
        while not self.stop.is_set() and time.monotonic() < end:
            self._beat()
            self.stop.wait(min(0.5, max(0.0, end - time.monotonic())))


class _TooLargeError(Exception):
    pass


class _Done:
    """A settled send (nothing to wait for)."""

    def get(self, timeout: float | None = None) -> None:
        return None


class _BrokenProducer:
    """Stands in while a producer cannot be created: every send fails, so the loop retries."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def send(self, *args: Any, **kwargs: Any) -> Any:
        raise self._exc

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self, timeout: float | None = None) -> None:
        return None


def _next_offsets(envs: Iterable[Envelope]) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for env in envs:
        out[env.tp] = max(out.get(env.tp, 0), env.offset + 1)
    return out


def _commit_offsets(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in tps)
