"""bench/spine.py's stages phase at a toy size: the worker's path timed stage by stage.

The phase reaches into the scoring stage and the engine (decode, preprocess, forward,
post-process, score message) and broke silently once when the worker's loop moved onto the
stream runtime; this runs it with the real and the free forward on a small random backbone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "decode", "preprocess", "forward", "postprocess", "encode", "produce")


def test_stages_phase_times_every_stage_with_the_real_and_the_free_forward(tmp_path: Path) -> None:
    out = tmp_path / "stages.json"
    proc = subprocess.run(
        [sys.executable, "bench/spine.py", "stages", "--methods", "winclip", "--backbone", "ViT-S-32",
         "--sizes", "320x240", "--batch", "2", "--frames", "4", "--free-frames", "6", "--iters", "1",
         "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["forward"]: r for r in json.loads(out.read_text()) if r["phase"] == "stages"}
    assert sorted(rows) == ["free", "real"]
    for row in rows.values():
        assert row["method"] == "winclip" and row["size"] == "320x240" and row["fps"] > 0
        assert all(row[f"{s}_ms"] >= 0 for s in STAGES)
        # Every frame was fetched, decoded, preprocessed, turned into a message and acknowledged.
        assert all(row[f"{s}_ms"] > 0 for s in ("fetch", "decode", "preprocess", "encode", "produce"))
    assert rows["free"]["forward_ms"] < rows["real"]["forward_ms"] / 10  # the forward was replaced
    assert rows["real"]["x_bare"] > 0
