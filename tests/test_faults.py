"""The fast scenarios of the fault campaign (bench/faults.py, issue 15) at reduced size: workers as
processes on their own broker and Redis; nothing lost, nothing duplicated, every worker alive."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO_ROOT


def _load_faults() -> ModuleType:
    # bench/ is not a package (and holds a pipeline.py): load the file by path.
    spec = importlib.util.spec_from_file_location("bench_faults", REPO_ROOT / "bench" / "faults.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


faults = _load_faults()


def check(row: Any) -> None:
    text = faults.format_row(row)
    assert not row.problems, text
    assert row.frames_lost in (None, 0), text
    assert row.events_duplicated in (None, 0), text
    assert row.events_never_closed in (None, 0), text
    assert row.events_emitted == row.events_expected, text
    assert row.ok, text


def test_a_sigkilled_scorer_loses_no_frame_and_duplicates_no_event(tmp_path: Path) -> None:
    """One camera per partition: the survivor is busy with its own when the victim dies.

    The stall per camera is held to the runtime's design bound (member lease, tansu's join wait and
    four of the run's slowest batches: see ``stall_design_bound``), with room for a loaded machine;
    the issue's "session timeout plus one batch" is checked in the full-size row (bench/README.md)."""
    row = faults.scenario_scorer_kill(keep_logs=tmp_path, size=(2, 9))
    check(row)
    assert row.frames_sent == row.frames_scored == 18
    assert row.events_expected == 6
    stalls = row.measured["camera_stalls"]
    assert len(stalls) == 2, faults.format_row(row)
    bound = faults.stall_design_bound(row.measured["batch_max_s"]) + 5.0  # + scheduling on a loaded machine
    assert max(stalls.values()) <= bound, faults.format_row(row)


def test_a_sigkilled_alert_worker_is_replaced_without_losing_or_reopening_events(tmp_path: Path) -> None:
    row = faults.scenario_alert_kill(keep_logs=tmp_path, size=(3, 4))
    check(row)
    assert row.events_expected == 12


@pytest.mark.parametrize("size", [(60, 15)])
def test_hostile_records_are_dead_lettered_once_and_valid_frames_scored_once(
        tmp_path: Path, size: tuple[int, int]) -> None:
    row = faults.scenario_hostile(keep_logs=tmp_path, size=size)
    check(row)
    assert row.dead_lettered == size[0]
    assert row.frames_scored == row.frames_sent == size[1] + 1 and row.scores_duplicated == 0
    assert row.peak_rss_mb["score"] > 0
    assert row.extra["huge_20mb"] == 2  # real 20 MB payloads among the oversized ones
