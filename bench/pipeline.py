"""End-to-end pipeline throughput and latency on the embedded broker and cache (CPU engine).

    python bench/pipeline.py [--cameras 2] [--frames 24] [--method alfa] [--fps 1.0]

1. engine only: the same frames scored in micro-batches straight through the engine;
2. end to end at full speed: all cameras' frames published at once through the broker, the
   scoring worker and the alert worker; frames/s from first publication to last score. As
   deployed, each worker is its own process (`linewatch score`, `linewatch alert`) with the same
   engine settings; ``--in-process`` runs them as threads of this process instead (they then
   share one GIL with the measuring consumer, which costs the model throughput);
3. latency at a sustainable pace (cameras x fps): p50/p95 from capture to score and to event.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition

# This file is named like the package: put the repository root, not bench/, first on the path.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.config import (
    AlertSettings,
    EngineSettings,
    KafkaSettings,
    RedisSettings,
    ScoringSettings,
    Settings,
)
from pipeline.embedded import EmbeddedBroker, EmbeddedRedis
from pipeline.engine.engine import AnomalyEngine
from pipeline.imaging import encode_jpeg, read_image
from schemas import DefectEvent, FrameHeader, ScoreMessage
from workers.alert import run_alert
from workers.score import run_score

DATA = Path(os.environ.get("LINEWATCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data/ball_screw"))


class Follower:
    """Reads scores and defects in a thread, recording arrival times."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.scores: dict[tuple[str, int], tuple[float, ScoreMessage]] = {}
        self.events: list[tuple[float, DefectEvent]] = []
        self.stop = threading.Event()
        self.kafka = kafka
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers, enable_auto_commit=False)
        tps = [TopicPartition(topic_name(self.kafka, t), p) for t in ("scores", "defects")
               for p in range(self.kafka.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        scores_topic = topic_name(self.kafka, "scores")
        while not self.stop.is_set():
            for tp, recs in consumer.poll(timeout_ms=100).items():
                now = time.time()
                for r in recs:
                    if tp.topic == scores_topic:
                        m = ScoreMessage.model_validate_json(r.value)
                        self.scores.setdefault((m.frame.camera_id, m.frame.seq), (now, m))
                    else:
                        self.events.append((now, DefectEvent.model_validate_json(r.value)))
        consumer.close()

    def wait_for(self, keys: set[tuple[str, int]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= self.scores.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(keys - self.scores.keys())} frames without scores")
            time.sleep(0.05)


def publish(producer, kafka, camera: str, seq: int, jpeg: bytes, shape: tuple[int, int]) -> float:
    ts = time.time()
    header = FrameHeader(camera_id=camera, line_id="bench", product_class="ball_screw", seq=seq, capture_ts=ts,
                         width=shape[1], height=shape[0])
    producer.send(topic_name(kafka, "frames"), key=camera.encode(), value=jpeg, headers=header.to_header())
    return ts


def spawn_worker(name: str, settings: Settings) -> subprocess.Popen:
    """`linewatch <name>` in its own process, configured through the environment."""
    env = {
        **os.environ,
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "LINEWATCH_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "LINEWATCH_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "LINEWATCH_REDIS__URL": settings.redis.url or "",
        "LINEWATCH_ENGINE__METHOD": settings.engine.method,
        "LINEWATCH_ENGINE__BACKBONE": settings.engine.backbone,
        "LINEWATCH_ENGINE__PRETRAINED": settings.engine.pretrained,
        "LINEWATCH_ENGINE__PRECISION": settings.engine.precision,
        "LINEWATCH_SCORING__MAX_BATCH": str(settings.scoring.max_batch),
        "LINEWATCH_SCORING__MAX_WAIT_MS": str(settings.scoring.max_wait_ms),
        "LINEWATCH_SCORING__STALENESS_S": "null",
        "LINEWATCH_ALERT__K": str(settings.alert.k),
        "LINEWATCH_ALERT__N": str(settings.alert.n),
        "LINEWATCH_ALERT__QUIET_S": str(settings.alert.quiet_s),
        "LINEWATCH_ALERT__SILENCE_S": str(settings.alert.silence_s),
        "LINEWATCH_ALERT__DEFAULT_THRESHOLD": str(settings.alert.default_threshold),
    }
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", name], env=env)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--frames", type=int, default=24, help="frames per camera")
    parser.add_argument("--fps", type=float, default=None, help="per camera in the latency phase (default: half "
                        "of engine capacity)")
    parser.add_argument("--method", default="alfa")
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--in-process", action="store_true", help="workers as threads, not processes")
    args = parser.parse_args()

    paths = sorted((DATA / "test" / "good").glob("*.jpg")) + sorted((DATA / "test" / "pitting").glob("*.jpg"))
    images = [read_image(str(p)) for p in paths[: max(8, args.frames)]]
    jpegs = [encode_jpeg(im) for im in images]
    engine = AnomalyEngine(EngineSettings(method=args.method, backbone=args.backbone, pretrained="random",
                                          precision=args.precision))
    engine.prepare("ball_screw")
    n_total = args.cameras * args.frames
    frames = [images[i % len(images)] for i in range(n_total)]
    engine.score(frames[: args.max_batch], "ball_screw")  # warm-up
    start = time.perf_counter()
    scores = []
    for i in range(0, n_total, args.max_batch):
        scores += [r.image_score for r in engine.score(frames[i : i + args.max_batch], "ball_screw")]
    engine_fps = n_total / (time.perf_counter() - start)

    with EmbeddedBroker() as broker, EmbeddedRedis() as cache:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="bench", partitions=4)
        settings = Settings(kafka=kafka, redis=RedisSettings(url=cache.url),
                            engine=engine.settings,
                            scoring=ScoringSettings(max_batch=args.max_batch, max_wait_ms=50, staleness_s=None),
                            alert=AlertSettings(k=2, n=3, quiet_s=1.0, silence_s=1.0,
                                                default_threshold=float(np.median(scores))))
        create_topics(kafka)
        stop = threading.Event()
        if args.in_process:
            workers = [threading.Thread(target=run_score, args=(settings, stop), kwargs={"engine": engine},
                                        daemon=True),
                       threading.Thread(target=run_alert, args=(settings, stop), daemon=True)]
            for w in workers:
                w.start()
            children: list[subprocess.Popen] = []
        else:
            workers = []
            children = [spawn_worker(name, settings) for name in ("score", "alert")]
        follower = Follower(kafka)
        producer = make_producer(kafka)
        shape = images[0].shape[:2]
        # Warm-up: the consumer group has joined once this frame is scored.
        publish(producer, kafka, "warmup", 0, jpegs[0], shape)
        producer.flush()
        follower.wait_for({("warmup", 0)}, 300)

        t0 = time.time()
        keys = set()
        for i in range(args.frames):
            for c in range(args.cameras):
                publish(producer, kafka, f"cam-{c}", i, jpegs[(i + c) % len(jpegs)], shape)
                keys.add((f"cam-{c}", i))
        producer.flush()
        follower.wait_for(keys, 600)
        e2e_fps = n_total / (max(follower.scores[k][0] for k in keys) - t0)

        fps = args.fps or max(0.1, 0.5 * engine_fps / args.cameras)
        captured: dict[tuple[str, int], float] = {}
        lat_keys = set()
        period = 1.0 / fps
        next_t = time.monotonic()
        for i in range(args.frames):
            for c in range(args.cameras):
                seq = 1000 + i
                captured[(f"cam-{c}", seq)] = publish(producer, kafka, f"cam-{c}", seq, jpegs[(i + c) % len(jpegs)],
                                                      shape)
                lat_keys.add((f"cam-{c}", seq))
            producer.flush()
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
        follower.wait_for(lat_keys, 600)
        time.sleep(settings.alert.quiet_s + 1.5)
        score_lat = [1000 * (follower.scores[k][0] - captured[k]) for k in lat_keys]
        event_lat = [1000 * (arrived - captured[(ev.camera_id, ev.last_seq)]) for arrived, ev in follower.events
                     if ev.status == "open" and (ev.camera_id, ev.last_seq) in captured]
        stop.set()
        follower.stop.set()
        for w in workers:
            w.join(30)
        for child in children:
            child.send_signal(signal.SIGINT)
            child.wait(30)
        producer.close()

    print(f"method {args.method} ({engine.precision.name}), backbone {args.backbone}, {os.cpu_count()} cpus, "
          f"{args.cameras} cameras x {args.frames} frames {images[0].shape[1]}x{images[0].shape[0]}, "
          f"max_batch {args.max_batch}, workers {'as threads' if args.in_process else 'as processes'}")
    print(f"engine only          : {engine_fps:8.2f} frames/s")
    print(f"end to end (full spd): {e2e_fps:8.2f} frames/s  ({100 * e2e_fps / engine_fps:.0f}% of engine only)")
    print(f"latency phase        : {args.cameras} cameras x {fps:.2f} fps")
    print(f"capture -> score     : p50 {pct(score_lat, 50):8.0f} ms   p95 {pct(score_lat, 95):8.0f} ms")
    print(f"capture -> event     : p50 {pct(event_lat, 50):8.0f} ms   p95 {pct(event_lat, 95):8.0f} ms  "
          f"({len(event_lat)} events)")


if __name__ == "__main__":
    main()
