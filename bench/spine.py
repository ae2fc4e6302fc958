"""The scoring spine at camera resolution: worker frames/s against a bare forward, per-stage costs.

    python bench/spine.py [all|bare|engine|stages|e2e] [--methods alfa winclip] [--backbone ViT-B-32]
                          [--sizes 640x480 1920x1080 2448x2048] [--batch 8] [--device auto]

- bare:   the backbone's bare ``encode_image`` (the engine's precision) at each ``--batches`` size;
- engine: ``AnomalyEngine.score`` on decoded frames (engine only, no broker);
- stages: the scoring worker's path in this process, stage by stage, on the embedded broker:
          fetch (consume a micro-batch), decode (accept + scaled decode), preprocess, forward,
          post-process, encode (score message + JSON), produce (send + broker ack), per frame;
          with the real forward and with a forward that costs nothing (the ceiling);
- e2e:    ``linewatch score`` processes (``--workers 1 2 4`` of them in one consumer group) fed
          frames already waiting on the embedded tansu broker; frames/s from the first score to
          the last, and the processes' CPU ms per frame over that span (``cpu_ms``: moves less
          with other processes' load than frames/s), with the real forward and with the free one.
``all`` (the default) runs bare at ``--batch``, stages and e2e for every size and method, and prints
each worker figure as a ratio to the bare forward measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition

# This file is named like the package: put the repository root, not bench/, first on the path.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.bus import create_topics, make_consumer, make_producer, topic_name
from pipeline.config import EngineSettings, KafkaSettings, ScoringSettings, Settings
from pipeline.embedded import EmbeddedBroker
from pipeline.engine.engine import AnomalyEngine, FrameScore, _crop, frame_size
from pipeline.engine.tiling import UNTILED, plan_tiles
from pipeline.imaging import encode_jpeg
from pipeline.runtime.envelope import Envelope
from pipeline.scoring.stage import Frame, ScoringStage
from schemas import FrameHeader, ScoreMessage

CLASS = "ball_screw"
DATA = Path(os.environ.get("LINEWATCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data/ball_screw"))
STAGES = ("fetch", "decode", "preprocess", "forward", "postprocess", "encode", "produce")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def source_images(n: int) -> list[np.ndarray]:
    """Real ball screw frames where the shared data is, else smooth synthetic textures."""
    paths = sorted((DATA / "test" / "pitting").glob("*.jpg")) + sorted((DATA / "test" / "good").glob("*.jpg"))
    if paths:
        return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths[:n]]
    rng = np.random.default_rng(0)
    return [(cv2.resize(rng.random((40, 60, 3)).astype(np.float32), (1130, 460)) * 255).astype(np.uint8)
            for _ in range(n)]


def camera_jpegs(size: tuple[int, int], n: int = 4) -> list[bytes]:
    """n distinct JPEG frames of size (width, height), as a camera would send them (quality 90)."""
    return [encode_jpeg(cv2.resize(im, size, interpolation=cv2.INTER_CUBIC)) for im in source_images(n)]


def make_engine(args: argparse.Namespace, method: str) -> AnomalyEngine:
    settings = EngineSettings(method=method, backbone=args.backbone, pretrained="random", precision=args.precision,
                              device=args.device)
    engine = AnomalyEngine(settings)
    engine.prepare(CLASS)
    return engine


def free_forward(engine: AnomalyEngine) -> None:
    """Replace the model forward with one that costs nothing (a fixed random grid per frame)."""
    gh, gw = engine.backbone.grid_size
    rng = torch.Generator().manual_seed(0)
    grid = torch.rand(1, gh, gw, generator=rng).to(engine.device)

    def forward(batch: torch.Tensor, product_class: str) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.shape[0]
        return torch.full((b,), 0.5, device=engine.device), grid.expand(b, gh, gw)

    engine._forward = forward  # type: ignore[method-assign]


def timed(fn: object, iters: int, device: torch.device) -> float:
    fn()  # type: ignore[operator]
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()  # type: ignore[operator]
    sync(device)
    return (time.perf_counter() - start) / iters


def bare_fps(engine: AnomalyEngine, batch: int, iters: int) -> float:
    """frames/s of the backbone's encode_image at this batch, in the engine's precision."""
    bb = engine.alfa.image_backbone
    h, w = engine.input_size
    x = torch.randn(batch, 3, h, w, device=engine.device).to(bb.dtype)
    with torch.inference_mode(), engine._autocast():  # type: ignore[attr-defined]
        sec = timed(lambda: bb.visual(x), iters, engine.device)  # encode_image, without the text tower
    return batch / sec


# -- stages, in this process ------------------------------------------------------------------------
def publish(producer: object, topic: str, jpegs: list[bytes], size: tuple[int, int], n: int, cameras: int = 8,
            ) -> None:
    for i in range(n):
        camera = f"cam-{i % cameras}"
        header = FrameHeader(camera_id=camera, line_id="bench", product_class=CLASS, seq=i, capture_ts=time.time(),
                             width=size[0], height=size[1])
        producer.send(topic, key=camera.encode(), value=jpegs[i % len(jpegs)], headers=header.to_header())  # type: ignore[attr-defined]
    producer.flush()  # type: ignore[attr-defined]


def poll_batch(consumer: KafkaConsumer, batch: int, max_wait_ms: int, idle_timeout_ms: int) -> list[Envelope]:
    """Up to ``batch`` records as the runtime fetches them: wait for the first (at most
    idle_timeout_ms), then at most max_wait_ms for the rest."""
    out: list[Envelope] = []
    timeout_ms = idle_timeout_ms
    deadline: float | None = None
    while len(out) < batch:
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=batch - len(out))
        out.extend(Envelope.from_record(r) for recs in polled.values() for r in recs)
        if not out:
            return out
        if deadline is None:
            deadline = time.monotonic() + max_wait_ms / 1000.0
        timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if timeout_ms == 0:
            break
    return out


def stage_costs(engine: AnomalyEngine, kafka: KafkaSettings, size: tuple[int, int], jpegs: list[bytes], n: int,
                batch: int) -> tuple[dict[str, float], float]:
    """Seconds per frame of each stage of the worker's path, and the path's frames/s.

    The runtime's hooks in one thread, stage by stage: ``ScoringStage.decode`` per record (the
    runtime's decode pool runs the same), the engine's ``score`` split into preprocess, forward
    and post-process, the score message as ``ScoringStage.handle`` builds it, then send and ack.
    """
    create_topics(kafka, names=("frames", "scores"))
    producer = make_producer(kafka)
    publish(producer, topic_name(kafka, "frames"), jpegs, size, n)
    consumer = make_consumer(kafka, f"{kafka.topic_prefix}-stages", [topic_name(kafka, "frames")])
    stage = ScoringStage(engine, ScoringSettings(staleness_s=None, max_batch=batch))
    stage.prepare_classes([CLASS])
    scores_topic = topic_name(kafka, "scores")
    spent: dict[str, float] = defaultdict(float)
    done = 0
    warm = False
    while done < n:
        t0 = time.perf_counter()
        envelopes = poll_batch(consumer, batch, 50, idle_timeout_ms=5000)
        if not envelopes:
            raise TimeoutError(f"waited 5 s for frames; {done} of {n} came")
        t1 = time.perf_counter()
        decoded = [stage.decode(env) for env in envelopes]
        frames = [f for f in decoded if isinstance(f, Frame)]
        if len(frames) != len(envelopes):
            raise RuntimeError(f"frames refused: {[f for f in decoded if not isinstance(f, Frame)]}")
        ready, failed = stage._ready(frames)  # decoded already: no work, as in the runtime
        if failed:
            raise RuntimeError(f"frames failed to decode: {failed}")
        t2 = time.perf_counter()
        images = [r.image for r in ready]
        sizes = [frame_size(im) for im in images]  # type: ignore[arg-type]
        plans = [plan_tiles(s, engine.input_size, UNTILED) for s in sizes]
        crops = [_crop(im, box, s) for im, s, p in zip(images, sizes, plans, strict=True) for box in p.crops]  # type: ignore[arg-type]
        x = engine._prepare(crops)
        sync(engine.device)
        t3 = time.perf_counter()
        scores, grid = engine._forward(x, CLASS)
        sync(engine.device)
        t4 = time.perf_counter()
        maps, frame_scores = engine._postprocess(grid, scores, plans)
        t5 = time.perf_counter()
        scored = [(r.frame, stage._stamp(r.frame, stage._message(r, FrameScore(s, m, p.frame_size))))
                  for r, s, m, p in zip(ready, frame_scores, maps, plans, strict=True)]
        outputs = stage._result(scored, []).outputs
        t6 = time.perf_counter()
        futures = [producer.send(scores_topic, key=o.key, value=o.value) for o in outputs]
        producer.flush()
        for fut in futures:
            fut.get(timeout=30)
        t7 = time.perf_counter()
        if not warm:  # the first batch pays one-off costs (allocations, the consumer's join)
            warm = True
            n -= len(envelopes)
            continue
        for name, sec in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6), strict=True):
            spent[name] += sec
        done += len(envelopes)
    consumer.close()
    producer.close()
    per_frame = {k: spent[k] / done for k in STAGES}
    return per_frame, done / sum(spent.values())


# -- end to end: linewatch score processes -------------------------------------------------------------
def worker_env(args: argparse.Namespace, method: str, kafka: KafkaSettings, free: bool) -> dict[str, str]:
    return {
        **os.environ,
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers or "",
        "LINEWATCH_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "LINEWATCH_KAFKA__PARTITIONS": str(kafka.partitions),
        "LINEWATCH_ENGINE__METHOD": method,
        "LINEWATCH_ENGINE__BACKBONE": args.backbone,
        "LINEWATCH_ENGINE__PRETRAINED": "random",
        "LINEWATCH_ENGINE__PRECISION": args.precision,
        "LINEWATCH_ENGINE__DEVICE": args.device,
        "LINEWATCH_SCORING__MAX_BATCH": str(args.batch),
        "LINEWATCH_SCORING__MAX_WAIT_MS": "20",
        "LINEWATCH_SCORING__STALENESS_S": "null",
        "LINEWATCH_BENCH_FREE_FORWARD": "1" if free else "0",
    }


def serve() -> None:
    """One scoring worker configured from the environment (a child of e2e); the free forward on request."""
    from pipeline.logging import configure_logging
    from workers.score import run_score

    configure_logging("warning")
    settings = Settings()
    engine = AnomalyEngine(settings.engine)
    engine.prepare(CLASS)
    if os.environ.get("LINEWATCH_BENCH_FREE_FORWARD") == "1":
        free_forward(engine)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_score(settings, stop, engine=engine)


def cpu_seconds(children: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU seconds the scorer processes have used so far (Linux /proc; nan elsewhere)."""
    total = 0
    for child in children:
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def read_scores(kafka: KafkaSettings, n: int, timeout: float, children: list[subprocess.Popen[bytes]] | None = None,
                ) -> tuple[list[float], list[tuple[int, float]]]:
    """Arrival times of the first n scores on the scores topic, and after each poll that brought some,
    (scores so far, the scorers' CPU seconds so far); fails at once if a scorer died."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False)
    tps = [TopicPartition(topic_name(kafka, "scores"), p) for p in range(kafka.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    arrived: list[float] = []
    cpu: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(arrived) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for scores; {len(arrived)} of {n} came")
            dead = [c.returncode for c in children or [] if c.poll() is not None]
            if dead:
                raise RuntimeError(f"a scorer process exited (status {dead[0]}); {len(arrived)} of {n} scores came")
            polled = consumer.poll(timeout_ms=200)
            now = time.perf_counter()
            for recs in polled.values():
                for r in recs:
                    ScoreMessage.model_validate_json(r.value)
                    arrived.append(now)
            if polled and children:
                cpu.append((len(arrived), cpu_seconds(children)))
    finally:
        consumer.close()
    return arrived, cpu


def e2e_fps(args: argparse.Namespace, method: str, broker: EmbeddedBroker, prefix: str, size: tuple[int, int],
            jpegs: list[bytes], n: int, workers: int, free: bool) -> tuple[float, float]:
    """Frames/s of `workers` scorer processes over n waiting frames, first score to last, and their
    CPU ms per frame over the same span (other processes' load changes it less than frames/s)."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix,
                          partitions=max(4, workers))
    create_topics(kafka, names=("frames", "scores", "dlq"))
    producer = make_producer(kafka)
    publish(producer, topic_name(kafka, "frames"), jpegs, size, n, cameras=max(8, 2 * workers))
    producer.close()
    env = worker_env(args, method, kafka, free)
    children = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve"], env=env)
                for _ in range(workers)]
    try:
        arrived, cpu = read_scores(kafka, n, timeout=args.timeout, children=children)
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
    # Skip the first batch of each worker: model warm-up and the group's join are not throughput.
    skip = min(len(arrived) // 2, args.batch * workers)
    fps = (len(arrived) - 1 - skip) / max(1e-9, arrived[-1] - arrived[skip])
    # The CPU sample taken with the poll that brought score `skip` up to the last one: the same span.
    (first, cpu0), (last, cpu1) = next(m for m in cpu if m[0] > skip), cpu[-1]
    return fps, (1000 * (cpu1 - cpu0) / (last - first) if last > first else float("nan"))


# -- main ---------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["all", "bare", "engine", "stages", "e2e", "serve"])
    parser.add_argument("--methods", nargs="+", default=["alfa", "winclip"])
    parser.add_argument("--backbone", default="ViT-B-32")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(640, 480), (1920, 1080), (2448, 2048)])
    parser.add_argument("--batch", type=int, default=8, help="micro-batch of the worker and the bare forward")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="bare: batch sizes (default --batch)")
    parser.add_argument("--frames", type=int, default=32, help="frames per phase with the real forward")
    parser.add_argument("--free-frames", type=int, default=240, help="frames per phase with the free forward")
    parser.add_argument("--workers", nargs="+", type=int, default=[1], help="e2e: scorer processes")
    parser.add_argument("--iters", type=int, default=4, help="bare/engine: timed iterations")
    parser.add_argument("--no-free", action="store_true", help="skip the free-forward phases")
    parser.add_argument("--no-real", action="store_true", help="skip the real-forward worker phases")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.what == "serve":
        serve()
        return

    results: list[dict[str, object]] = []

    def report(row: dict[str, object]) -> None:
        results.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    print(f"# {args.backbone}, device {args.device}, precision {args.precision}, batch {args.batch}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", flush=True)
    for method in args.methods:
        engine = make_engine(args, method)
        print(f"## {method}: device {engine.device}, precision {engine.precision.name}, "
              f"input {engine.input_size}", flush=True)
        bare: dict[int, float] = {}
        if args.what in ("all", "bare", "stages", "e2e"):
            for b in args.batches or [args.batch]:
                bare[b] = bare_fps(engine, b, args.iters)
                report({"phase": "bare", "method": method, "batch": b, "fps": bare[b]})
        ref = bare.get(args.batch)
        if args.what == "engine":
            for b in args.batches or [args.batch]:
                frames = [cv2.resize(im, args.sizes[0], interpolation=cv2.INTER_AREA) for im in source_images(b)]
                frames = (frames * (b // len(frames) + 1))[:b]
                if engine.device.type == "cuda":  # as the GPU path has them: decoded on the device (nvjpeg)
                    frames = [torch.from_numpy(f).permute(2, 0, 1).contiguous().to(engine.device) for f in frames]
                sec = timed(lambda f=frames, e=engine: e.score(f, CLASS), args.iters, engine.device)
                report({"phase": "engine", "method": method, "batch": b, "size": "x".join(map(str, args.sizes[0])),
                        "fps": b / sec})
            continue
        if args.what == "bare":
            continue
        with EmbeddedBroker() as broker:
            for size in args.sizes:
                label = f"{size[0]}x{size[1]}"
                jpegs = camera_jpegs(size)
                modes = ([] if args.no_real else [("real", args.frames)]) + \
                    ([] if args.no_free else [("free", args.free_frames)])
                if args.what in ("all", "stages"):
                    for mode, n in modes:
                        eng = make_engine(args, method) if mode == "free" else engine
                        if mode == "free":
                            free_forward(eng)
                        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers,
                                              topic_prefix=f"st-{method}-{label}-{mode}", partitions=4)
                        around = mode == "real" and ref is not None
                        before = bare_fps(engine, args.batch, args.iters) if around else 0.0
                        per_frame, fps = stage_costs(eng, kafka, size, jpegs, n, args.batch)
                        row: dict[str, object] = {"phase": "stages", "method": method, "size": label, "forward": mode,
                                                  "fps": fps}
                        if around:  # this machine is shared: the bare forward right before and after
                            now = (before + bare_fps(engine, args.batch, args.iters)) / 2
                            row["bare_fps"], row["x_bare"] = now, fps / now
                        row.update({f"{k}_ms": 1000 * v for k, v in per_frame.items()})
                        report(row)
                if args.what in ("all", "e2e"):
                    for workers in args.workers:
                        for mode, n in modes:
                            around = mode == "real" and ref is not None
                            before = bare_fps(engine, args.batch, args.iters) if around else 0.0
                            fps, cpu_ms = e2e_fps(args, method, broker, f"e2e-{method}-{label}-{mode}-{workers}",
                                                  size, jpegs, max(n, 4 * args.batch * workers), workers,
                                                  mode == "free")
                            row = {"phase": "e2e", "method": method, "size": label, "forward": mode,
                                   "workers": workers, "fps": fps, "cpu_ms": cpu_ms}
                            if around:
                                now = (before + bare_fps(engine, args.batch, args.iters)) / 2
                                row["bare_fps"], row["x_bare"] = now, fps / now
                            report(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
