"""bench/gpu.sh, the one-command GPU benchmark, in its CPU small-size mode.

No GPU is available to the test suite: this runs every step of the script (bare forward at two
batch sizes, WinCLIP and ALFA engine-only, end to end through embedded tansu with 1 and 2 scorer
processes) at toy sizes on the CPU, so the script a GPU machine runs is known to work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_every_step_in_cpu_small_mode(tmp_path: Path) -> None:
    out = tmp_path / "figures"
    proc = subprocess.run(["bash", "bench/gpu.sh", "--device", "cpu", "--small", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu.sh: done" in proc.stdout
    bare = json.loads((out / "bare.json").read_text())
    assert sorted(r["batch"] for r in bare) == [1, 2] and all(r["fps"] > 0 for r in bare)
    engine = json.loads((out / "engine.json").read_text())
    assert sorted(r["method"] for r in engine) == ["alfa", "winclip"] and all(r["fps"] > 0 for r in engine)
    e2e = [r for r in json.loads((out / "e2e-alfa.json").read_text()) if r["phase"] == "e2e"]
    assert sorted(r["workers"] for r in e2e) == [1, 2]
    assert all(r["fps"] > 0 and r["size"] == "320x240" and r["forward"] == "real" for r in e2e)
    # The scorers' CPU per frame, read from /proc; NaN when a toy run's measured scores all came in
    # one poll (no span to divide by), which the 2-worker run of 8 frames can hit.
    assert all(r["cpu_ms"] > 0 or math.isnan(r["cpu_ms"]) for r in e2e)
    assert any(r["cpu_ms"] > 0 for r in e2e)
