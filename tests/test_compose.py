"""The plant deployment in docker/: compose services, health checks, Prometheus and Grafana provisioning."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pipeline import metrics
from pipeline.health import Health

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "linewatch.json"
WORKERS = ("capture", "score", "alert", "deliver", "api")
SERVICES = ("kafka", "redis", *WORKERS, "prometheus", "grafana")
# What the dashboard must chart (metric names as exposed, see pipeline/metrics.py).
CHARTED = ("linewatch_frames_captured_total", "linewatch_frames_published_total", "linewatch_frames_dropped_total",
           "linewatch_scoring_seconds_bucket", "linewatch_batch_size_bucket", "linewatch_consumer_lag",
           "linewatch_prompt_cache_total", "linewatch_events_opened_total", "linewatch_deliveries_total",
           "linewatch_dlq_total")
PROMETHEUS_BUILTINS = {"up"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def exposed_metric_names() -> set[str]:
    """Every sample name the process registry can expose for the metrics defined in pipeline/metrics.py."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_exprs(panels: list[dict[str, Any]]) -> Iterator[str]:
    for panel in panels:
        yield from dashboard_exprs(panel.get("panels", []))  # rows may nest their panels
        for target in panel.get("targets", []):
            yield target["expr"]


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form so the shared anchor merges"
    return env


# -- services -----------------------------------------------------------------------------------
def test_all_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"compose.yaml lacks services {missing}"
    for name in WORKERS:
        assert services[name]["command"] == [name], name


def test_kafka_runs_in_kraft_mode(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["kafka"])
    assert set(str(env["KAFKA_PROCESS_ROLES"]).split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] and env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert not any("ZOOKEEPER" in key for key in env)


def test_score_reserves_a_gpu_and_can_scale(services: dict[str, dict[str, Any]]) -> None:
    score = services["score"]
    assert score["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = score["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices), devices
    # `--scale score=N` needs replicas that do not collide on names or host ports.
    assert "container_name" not in score and "ports" not in score


def test_every_linewatch_service_has_a_healthz_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" not in service or name == "topics":  # topics is a one-shot job, not a worker
            continue
        # The API answers /healthz on its HTTP port; the workers on their metrics port.
        port = "8080" if name == "api" else env_of(service)["LINEWATCH_METRICS__PORT"]
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        command = " ".join(check["test"])
        assert f"127.0.0.1:{port}/healthz" in command, f"{name}: {command}"
    assert {n for n, s in services.items() if "build" in s} == {*WORKERS, "topics"}


def test_workers_share_the_site_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        env = env_of(services[name])
        assert env["LINEWATCH_CONFIG"] == "/config/linewatch.yaml", name
        assert "kafka:9092" in env["LINEWATCH_KAFKA__BOOTSTRAP_SERVERS"], name
        assert "redis://redis:6379/0" in env["LINEWATCH_REDIS__URL"], name
        # Kafka security settings pass through from the shell (README "Deploying on a plant").
        assert {"LINEWATCH_KAFKA__SECURITY_PROTOCOL", "LINEWATCH_KAFKA__SASL_PASSWORD",
                "LINEWATCH_KAFKA__SSL_CAFILE"} <= set(env), name
    api = services["api"]
    assert "8080:8080" in api["ports"]
    assert "LINEWATCH_API__TOKEN" in env_of(api)


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
    assert (DOCKER / "config" / "linewatch.yaml").is_file()


def test_worker_healthcheck_command_probes_healthz(services: dict[str, dict[str, Any]]) -> None:
    """The compose one-liner itself, run against a real Health: 0 while alive, non-zero when stalled."""
    test = services["alert"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    with Health(liveness_timeout_s=0.2) as health:
        port = health.serve(0, host="127.0.0.1")
        script = test[3].replace(":9100/", f":{port}/")
        health.beat()
        assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode == 0
        time.sleep(0.3)  # no beat for longer than the limit: the loop counts as stuck
        assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode != 0


# -- Prometheus and Grafana ---------------------------------------------------------------------
def test_prometheus_scrapes_every_worker(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "linewatch")
    # DNS finds every replica of a scaled service; the API is scraped on its HTTP port.
    ports = {name: str(sd["port"]) for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert set(ports) == set(WORKERS)
    for name in WORKERS:
        expected = "8080" if name == "api" else env_of(services[name])["LINEWATCH_METRICS__PORT"]
        assert ports[name] == expected, name


def test_grafana_provisioning_matches_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "linewatch.yaml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == source["uid"] for p in panels)


def test_dashboard_queries_only_existing_metrics() -> None:
    exposed = exposed_metric_names()
    assert "linewatch_deliveries_total" in exposed and "linewatch_scoring_seconds_bucket" in exposed
    exprs = list(dashboard_exprs(json.loads(DASHBOARD.read_text())["panels"]))
    assert exprs
    queried: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\blinewatch_[a-z0-9_]+", expr))
        selectors = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr)) - {"by", "without"}
        assert names or selectors & PROMETHEUS_BUILTINS, f"no metric in {expr!r}"
        assert selectors <= exposed | PROMETHEUS_BUILTINS, f"{expr!r} selects {selectors - exposed}"
        assert names <= exposed, f"{expr!r} queries unknown {names - exposed}"
        queried |= names
    assert not set(CHARTED) - queried, f"dashboard lacks {set(CHARTED) - queried}"


# -- the real client ----------------------------------------------------------------------------
def _compose_client() -> str | None:
    """Why `docker compose` cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "docker client not installed"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"docker compose plugin not available: {(probe.stderr or probe.stdout).strip().splitlines()[0][:200]}"
    return None


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # --env-file /dev/null: a developer's docker/.env must not change what is validated.
    command = ["docker", "compose", "--env-file", os.devnull, "-f", str(COMPOSE), "config", "--quiet"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_docker_compose_config_validates() -> None:
    reason = _compose_client()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    result = compose_config({**env, "LINEWATCH_API__TOKEN": "test-token"})
    assert result.returncode == 0, result.stderr
    # The api token is required: a missing one must stop compose, not start an open API.
    result = compose_config(env)
    assert result.returncode != 0 and "LINEWATCH_API__TOKEN" in result.stderr
