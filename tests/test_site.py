"""`linewatch run` and its configuration as a plant's engineer meets them: subprocesses, real
embedded broker and cache, signals, one-line errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from pipeline.embedded import free_port

REPO = Path(__file__).resolve().parent.parent
CLASS = "ball_screw"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without LINEWATCH_* settings (a broker of the test session must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(extra)
    return env


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), cwd=REPO)


def write_stream(images: Path, folder: Path, count: int, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True)
    for i, p in enumerate(sorted(images.glob("*.jpg"))[:count]):
        cv2.imwrite(str(folder / f"f{i:02d}.jpg"), cv2.resize(cv2.imread(str(p)), size))
    return folder


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    # A zombie is dead but unreaped (its parent has exited; init reaps it).
    return stat.exists() and stat.read_text().split()[2] != "Z"


class RunningSite:
    """`linewatch run` in the background, read line by line until a marker appears."""

    def __init__(self, cfg: Path, data_dir: Path, run_dir: Path, *extra: str) -> None:
        self.api_port = free_port()
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "run", "--data-dir", str(data_dir),
             "--run-dir", str(run_dir), "--api-port", str(self.api_port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=REPO)
        self.lines: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def until(self, marker: str, timeout_s: float = 240) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if marker in line:
                return line
        raise AssertionError(f"{marker!r} never printed:\n{self.text}")

    def exports(self) -> dict[str, str]:
        """What the join hint's file sets (the console shows the credentials as ***)."""
        assert f". {self.data_dir / 'site.env'}" in self.text, self.text
        return dict(re.findall(r"export (LINEWATCH_\w+)=(\S+)", (self.data_dir / "site.env").read_text()))

    def terminate(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=90)
        self.lines.append(out)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def site_config(tmp_path: Path, stream: Path, **extra_yaml: str) -> Path:
    cfg = tmp_path / "site.yaml"
    # Relative source: read from the config file's folder, whatever the working directory.
    cfg.write_text(
        "engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
        "deliver: {allow_private_networks: true}\n"
        + "".join(f"{k}: {v}\n" for k, v in extra_yaml.items())
        + f"cameras:\n  - {{id: cam-1, product_class: {CLASS}, source: {stream.name}, fps: 2, loop: true}}\n"
    )
    return cfg


# -- configuration: strict and early -------------------------------------------------------------
def test_a_typo_in_a_section_is_one_line_with_did_you_mean_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("alert:\n  defualt_threshold: 0.63\ncameras: []\n")
    proc = cli("--config", str(cfg), "run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"{cfg}: alert.defualt_threshold: unknown key (did you mean default_threshold?)" in proc.stderr
    assert "embedded" not in proc.stdout


def test_a_typo_in_a_camera_names_its_index(tmp_path: Path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("cameras:\n  - {id: c, product_class: x, source: s, fsp: 3}\n")
    proc = cli("--config", str(cfg), "topics", "create")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cameras[0].fsp: unknown key (did you mean fps?)" in proc.stderr


def test_a_missing_source_is_reported_before_anything_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "site.yaml"
    cfg.parent.mkdir()
    cfg.write_text("engine: {pretrained: random}\n"
                   f"cameras:\n  - {{id: cam-1, product_class: {CLASS}, source: recordings/cam-1}}\n")
    proc = cli("--config", str(cfg), "run", "--data-dir", str(tmp_path / "data"), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Resolved next to the config file, not the working directory, and said plainly.
    assert f"source {tmp_path / 'conf' / 'recordings' / 'cam-1'} does not exist" in proc.stderr
    assert proc.stdout == ""  # no broker, cache, model or worker was started


def test_an_uncached_tag_offline_fails_at_once_with_the_fix(tmp_path: Path, shared_data: Path) -> None:
    stream = write_stream(shared_data / "test" / "good", tmp_path / "stream", 1, (64, 32))
    cfg = site_config(tmp_path, stream)
    cfg.write_text(cfg.read_text().replace("ViT-S-32, pretrained: random", "ViT-B-32, pretrained: laion400m_e31"))
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    started = time.monotonic()
    proc = cli("--config", str(cfg), "run", "--data-dir", str(tmp_path / "data"), env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not in the local cache" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "local checkpoint file" in proc.stderr and "'random'" in proc.stderr
    assert proc.stdout == ""
    assert time.monotonic() - started < 50  # not a minute of download retries


# -- a running site ------------------------------------------------------------------------------
def test_run_serves_joins_stops_on_sigterm_and_keeps_subscriptions(shared_data: Path, tmp_path: Path) -> None:
    stream = write_stream(shared_data / "test" / "good", tmp_path / "stream", 2, (160, 64))
    cfg = site_config(tmp_path, stream)
    data_dir = tmp_path / "data"
    site = RunningSite(cfg, data_dir, tmp_path / "run1")
    try:
        dashboard = site.until("dashboard: ")
        assert f"http://127.0.0.1:{site.api_port}/?token=" in dashboard
        started = site.until("workers started")
        assert "loading model" in site.text
        pids = [int(p) for p in re.findall(r"pid (\d+)", started)]
        assert len(pids) == 5  # score, alert, deliver, api, capture
        broker_port = int(re.search(r"broker \(tansu\) at 127\.0\.0\.1:(\d+)", site.text).group(1))  # type: ignore[union-attr]
        joined = site.exports()
        assert {"LINEWATCH_CONFIG", "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", "LINEWATCH_REDIS__URL",
                "LINEWATCH_API__TOKEN"} <= set(joined)
        # Piped output is a log: the generated token stays in the file.
        assert joined["LINEWATCH_API__TOKEN"] not in site.text and "export LINEWATCH_API__TOKEN=***" in site.text
        # Another shell joins with the printed exports; allow_private_networks comes from the same file.
        env = clean_env(**joined)
        add = subprocess.run([sys.executable, "-m", "pipeline.cli", "subscriptions", "add", "lead",
                              "--webhook", "http://127.0.0.1:9/hook"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=REPO)
        assert add.returncode == 0, add.stdout + add.stderr
        out = site.terminate()
    finally:
        site.kill()
    assert "SIGTERM: stopping workers" in out, site.text
    assert "summary: frames=" in out and "deliveries:" in out, site.text
    assert site.proc.returncode == 130
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "a worker outlived SIGTERM"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker_port), timeout=1).close()

    # A restart on the same data folder still has the subscription (and the same dashboard token).
    again = RunningSite(cfg, data_dir, tmp_path / "run2")
    try:
        again.until("workers started")
        assert again.exports()["LINEWATCH_API__TOKEN"] == joined["LINEWATCH_API__TOKEN"]
        listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "subscriptions", "list"],
                                capture_output=True, text=True, timeout=60, env=clean_env(**again.exports()),
                                cwd=REPO)
        assert listed.returncode == 0, listed.stderr
        assert "lead" in listed.stdout
        again.terminate()
    finally:
        again.kill()


def test_run_on_the_demo_config_scores_the_live_stream(tmp_path: Path) -> None:
    """The demo's recorded stream played live is stamped with the present: frames are scored, not stale.

    A small backbone keeps the test short; the source, its pacing and the staleness limit are the demo's.
    """
    # From another folder: the demo's `source: stream` is read next to its config file.
    env = clean_env(LINEWATCH_ENGINE__BACKBONE="ViT-S-32", LINEWATCH_ENGINE__METHOD="winclip",
                    PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--config", str(REPO / "demo" / "linewatch.yaml"), "run",
         "--exit-when-done", "--no-api", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"summary: frames=(\d+) scores=(\d+) events=\d+ stale=(\d+)", proc.stdout)
    assert summary, proc.stdout
    frames, scores, stale = map(int, summary.groups())
    assert frames == 36 and scores > 0 and scores + stale == frames, proc.stdout
    assert "queue wait" in proc.stdout
