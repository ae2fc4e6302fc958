"""Managed capture: how fast camera changes and capture-worker deaths take effect.

    python bench/camera_failover.py [--cameras 4] [--lease-s 10] [--rounds 3]

On the embedded broker and cache, with image-folder cameras (loop, 5 fps) and two
`linewatch capture` processes:

1. pick-up: `cameras add` to the first frame of the new camera on the frames topic;
2. failover: SIGKILL of the worker holding cameras to (a) the lease moving to the other worker and
   (b) the first frame the survivor captured; a new worker is started for the next round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

# Put the repository root, not bench/, first on the path.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.bus import create_topics, topic_name
from pipeline.cameras.leases import LeaseManager
from pipeline.cameras.registry import CameraRegistry
from pipeline.config import CameraConfig, KafkaSettings, RedisSettings
from pipeline.embedded import EmbeddedBroker, EmbeddedRedis
from pipeline.redis_store import connect
from schemas.frames import FrameHeader

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "ball_screw" / "train" / "good"


def wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Frames:
    def __init__(self, kafka: KafkaSettings) -> None:
        create_topics(kafka, names=("frames",))
        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
        topic = topic_name(kafka, "frames")
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)

    def first_after(self, camera: str, after: float, timeout: float = 120) -> float:
        """Wall time the first frame of ``camera`` captured after ``after`` was seen here."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for recs in self.consumer.poll(timeout_ms=50).values():
                for r in recs:
                    h = FrameHeader.from_headers(r.headers)
                    if h.camera_id == camera and h.capture_ts > after:
                        return time.time()
        raise SystemExit(f"no frame of {camera}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--lease-s", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lw-failover-"))
    folder = work / "cam"
    folder.mkdir()
    for src in sorted(IMAGES.glob("*.jpg"))[:4]:
        shutil.copy(src, folder / src.name)
    with EmbeddedBroker() as broker, EmbeddedRedis() as cache:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="bench", partitions=2)
        rs = RedisSettings(url=cache.url, key_prefix="bench")
        cams = [CameraConfig(id=f"c{i}", product_class="ball_screw", source=str(folder), fps=5, loop=True)
                for i in range(args.cameras)]
        cfg = work / "site.yaml"
        cfg.write_text(json.dumps({"capture": {"resize_width": 128, "lease_s": args.lease_s},
                                   "cameras": [c.model_dump(mode="json") for c in cams]}))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")},
               "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers or "",
               "LINEWATCH_KAFKA__TOPIC_PREFIX": "bench", "LINEWATCH_REDIS__URL": cache.url,
               "LINEWATCH_REDIS__KEY_PREFIX": "bench", "LINEWATCH_LOG_LEVEL": "warning"}

        def spawn() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "capture"],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        client = connect(rs)
        leases = LeaseManager(client, "bench", "-", args.lease_s)
        registry = CameraRegistry(client, "bench")
        frames = Frames(kafka)
        ids = [c.id for c in cams]
        procs = [spawn(), spawn()]
        pickup, moved, resumed = [], [], []
        try:
            wait(lambda: len({h[0] for h in leases.holders(ids).values() if h}) == 2
                 and all(leases.holders(ids).values()), 120, "both workers holding cameras")
            for n in range(args.rounds):
                cid = f"added-{n}"
                t0 = time.time()
                registry.add(CameraConfig(id=cid, product_class="ball_screw", source=str(folder), fps=5, loop=True))
                pickup.append(frames.first_after(cid, t0) - t0)
                ids.append(cid)
                holders = leases.holders(ids)
                victim_owner = holders[ids[0]][0]  # type: ignore[index]
                victim = next(p for p in procs if f"-{p.pid}-" in victim_owner)
                theirs = [c for c, h in holders.items() if h and h[0] == victim_owner]
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                t0 = time.time()
                wait(lambda v=victim_owner, t=theirs: all((h := leases.holders([c])[c]) and h[0] != v for c in t),
                     120, "the cameras to move")
                moved.append(time.time() - t0)
                resumed.append(max(frames.first_after(c, t0) for c in theirs) - t0)
                procs.remove(victim)
                procs.append(spawn())
                wait(lambda: len({h[0] for h in leases.holders(ids).values() if h}) == 2, 120, "rebalance")
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait(30)
            client.close()
    med = statistics.median
    print(f"cameras={args.cameras}(+{args.rounds} added) lease_s={args.lease_s} rounds={args.rounds}")
    print(f"pick-up (cameras add -> first frame):  median {med(pickup):.2f} s  max {max(pickup):.2f} s")
    print(f"failover (kill -> lease moved):        median {med(moved):.2f} s  max {max(moved):.2f} s")
    print(f"failover (kill -> frames again):       median {med(resumed):.2f} s  max {max(resumed):.2f} s")


if __name__ == "__main__":
    main()
