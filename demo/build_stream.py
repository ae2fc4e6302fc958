"""Build the demo's recorded stream from the ball screw images in ../shared/data.

Writes demo/stream/frame_NNNN.jpg (640 px wide) plus index.jsonl with 4 fps capture times, and
demo/references/ with two normal reference images. Run from the repository root:
    python demo/build_stream.py [--data ../shared/data/ball_screw]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2

# (folder, count): good stretches with two bursts of pitted parts, like a line with a bad batch.
PLAN = [("test/good", 10), ("test/pitting", 6), ("test/good", 8), ("test/pitting", 6), ("test/good", 6)]
WIDTH = 640
FPS = 4.0
START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def resized(path: Path) -> bytes:
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    img = cv2.resize(img, (WIDTH, round(h * WIDTH / w)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/ball_screw")
    parser.add_argument("--out", default="demo")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    stream = out / "stream"
    shutil.rmtree(stream, ignore_errors=True)
    stream.mkdir(parents=True)
    used: dict[str, int] = {}
    index = []
    for folder, count in PLAN:
        files = sorted((data / folder).glob("*.jpg"))
        start = used.get(folder, 0)
        for src in files[start : start + count]:
            seq = len(index)
            name = f"frame_{seq:04d}.jpg"
            (stream / name).write_bytes(resized(src))
            index.append({"file": name, "capture_ts": START_TS + seq / FPS, "source": f"{folder}/{src.name}"})
        used[folder] = start + count
    (stream / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    refs = out / "references" / "ball_screw"
    shutil.rmtree(refs, ignore_errors=True)
    refs.mkdir(parents=True)
    for src in sorted((data / "train/good").glob("*.jpg"))[:2]:
        (refs / src.name).write_bytes(resized(src))
    shutil.copy(data / "LICENSE.txt", out / "LICENSE-data.txt")


if __name__ == "__main__":
    main()
