"""One configuration tree for every component.

Values come, in increasing priority, from defaults, an optional YAML file (``--config`` or
``LINEWATCH_CONFIG``), and ``LINEWATCH_*`` environment variables with ``__`` nesting
(``LINEWATCH_KAFKA__BOOTSTRAP_SERVERS=host:9092``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.delivery.proxy import DIRECT, parse_proxy
from pipeline.logging import hide_secrets, hide_url_password
from schemas.frames import PRODUCT_CLASS_PATTERN

Method = Literal["winclip", "alfa", "aprilgan"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]


class Section(BaseModel):
    """A configuration section: an unknown key is an error (a typo must not fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    """Broker connection; no bootstrap servers means `linewatch run` embeds a broker."""

    bootstrap_servers: str | None = None
    topic_prefix: str = "linewatch"
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # tansu answers JoinGroup after half the session timeout, so small values keep joins fast.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    # A group member silent this long in Redis is removed by its peers, so a crashed worker's
    # partitions move in about this time instead of the session timeout (pipeline.runtime.failover).
    # Members beat every fifth of it from a thread of their own. None: only the broker's session
    # timeout. Needs redis.url.
    member_lease_ms: int | None = Field(default=1000, ge=200)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    # kafka-python's default backs off to 30 s between reconnects: a broker back after an outage would
    # go unnoticed that long. A connection attempt every 2 s to a down broker costs nothing.
    reconnect_backoff_max_ms: int = Field(default=2000, ge=50)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @model_validator(mode="after")
    def _lease_below_session(self) -> KafkaSettings:
        lease = self.member_lease_ms
        if lease is not None and lease >= self.session_timeout_ms:
            if "member_lease_ms" in self.model_fields_set:
                raise ValueError(
                    f"kafka.member_lease_ms ({lease}) must be below kafka.session_timeout_ms "
                    f"({self.session_timeout_ms}): the broker would notice a dead member first; set it to null "
                    "to leave that to the broker")
            self.member_lease_ms = None  # the default lease is no faster than this session timeout
        return self

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    def client_kwargs(self) -> dict[str, Any]:
        """Connection options shared by producers, consumers and the admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


class RedisSettings(Section):
    """Cache connection; no URL means `linewatch run` embeds a server."""

    url: str | None = None
    key_prefix: str = "linewatch"
    socket_timeout_s: float = 2.0
    lock_timeout_s: float = 120.0


class LLMSettings(Section):
    """OpenAI-compatible chat-completions endpoint for ALFA prompt generation (optional)."""

    url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 30.0
    retries: int = Field(default=2, ge=0)
    n_prompts: int = Field(default=20, ge=1, le=100)


class EngineSettings(Section):
    method: Method = "winclip"
    backbone: str = "ViT-B-16-plus-240"
    # An open_clip tag, a local checkpoint path, or "random" (tests and plumbing demos only).
    pretrained: str = "laion400m_e31"
    precision: Precision = "auto"
    device: str = "auto"
    # Few-shot references: a folder of normal images per product class (<dir>/<class>/*.jpg or <dir>/*.jpg).
    shots_dir: Path | None = None
    k_shot: int = Field(default=0, ge=0)
    cache_dir: Path | None = None
    # AprilGAN's per-stage linear projections (`linewatch train aprilgan`); unset: untrained stand-ins.
    projections: Path | None = None


class ScoringSettings(Section):
    max_batch: int = Field(default=8, ge=1)
    max_wait_ms: int = Field(default=50, ge=0)
    # Live monitoring wants the present: older frames are skipped. None disables (replays).
    staleness_s: float | None = 10.0
    max_frame_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_frame_pixels: int = Field(default=40_000_000, ge=1)
    map_size: int = Field(default=64, ge=8, le=512)
    group_id: str = "linewatch-score"
    # Threads fetching and decoding the next micro-batch while the current one is on the model.
    decode_workers: int = Field(default=2, ge=0, le=32)
    # Product classes allowed in frame headers; None accepts any well-formed class name. Listed
    # classes are prepared (text embeddings, prompts, references) when the scoring worker starts;
    # frames of any other class go to the DLQ with reason ``unknown_class``.
    classes: list[str] | None = None
    # Classes kept prepared in memory at once without an allowlist (least recently used go first).
    max_classes: int = Field(default=64, ge=1)
    # Live frames stamped further ahead of the scorer's clock than this are refused (bad clock).
    max_future_s: float = Field(default=300.0, ge=0)

    @field_validator("classes")
    @classmethod
    def _class_names(cls, classes: list[str] | None) -> list[str] | None:
        for name in classes or []:
            if not re.fullmatch(PRODUCT_CLASS_PATTERN, name):
                raise ValueError(f"scoring.classes: {name!r} does not match {PRODUCT_CLASS_PATTERN}")
        return classes


class AlertSettings(Section):
    k: int = Field(default=2, ge=1)
    n: int = Field(default=3, ge=1)
    quiet_s: float = Field(default=2.0, ge=0)
    # Wall-clock seconds without any score of a camera before its open event is closed (the camera
    # went silent). Quiet periods are measured on capture time; this only ends events of cameras that
    # stopped sending, so keep it above any scoring lag (batching, rebalances, a busy machine).
    silence_s: float = Field(default=30.0, gt=0)
    default_threshold: float = 0.5
    min_region_area: int = Field(default=16, ge=0)
    group_id: str = "linewatch-alert"
    # Camera debounce states expire after this long without a frame (retired cameras, finished replays).
    state_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    @field_validator("n")
    @classmethod
    def _n_at_least_k(cls, n: int, info: Any) -> int:
        k = info.data.get("k", 1)
        if n < k:
            raise ValueError(f"alert.n ({n}) must be >= alert.k ({k})")
        return n


class DeliverSettings(Section):
    group_id: str = "linewatch-deliver"
    # Webhooks to loopback/private/link-local addresses are refused unless allowed (SSRF guard).
    allow_private_networks: bool = False
    # Where `media: url` links point (the `linewatch api` service), e.g. https://linewatch.plant.local
    public_base_url: str | None = None
    reload_s: float = Field(default=2.0, gt=0)
    # Events read but not yet delivered to every matching subscription; reading pauses beyond it.
    max_in_flight: int = Field(default=500, ge=1)
    # How long acknowledged deliveries are remembered, so a restarted worker does not re-send them.
    ledger_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Deliveries queued for one subscription; beyond it they are dead-lettered (`backlog_full`), so a
    # slow subscriber cannot hold the global limit above and stall the others.
    max_in_flight_per_subscription: int = Field(default=100, ge=1)
    # Consecutive failed attempts that open a subscription's circuit: its deliveries then go to dead
    # letters (`circuit_open`) at once, until a probe every `circuit_probe_s` gets an answer.
    circuit_failures: int = Field(default=5, ge=1)
    circuit_probe_s: float = Field(default=5.0, gt=0)
    # How much of a webhook's answer is read; the rest is not.
    max_response_bytes: int = Field(default=64 * 1024, ge=0)
    # Dead letters kept per subscription; the oldest go beyond it.
    max_dead_letters: int = Field(default=10_000, ge=1)
    # HTTP proxy for webhooks, http://[user:password@]host:port; None: HTTPS_PROXY / HTTP_PROXY from
    # the environment; "direct": none, whatever the environment says (`pipeline.delivery.proxy`).
    webhook_proxy: str | None = None
    # Webhook hosts reached without the proxy (names with their subdomains, IPs, CIDR blocks, "*",
    # optional ":port"); None: NO_PROXY from the environment.
    webhook_no_proxy: list[str] | None = None

    @field_validator("webhook_proxy")
    @classmethod
    def _proxy_usable(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() not in ("", DIRECT):
            parse_proxy(value, "")  # pydantic names the field
        return value


class ApiSettings(Section):
    # Loopback unless asked: the dashboard shows the plant's frames. Containers set 0.0.0.0.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer token for the JSON API and the dashboard; the API refuses to start without one.
    token: str | None = None
    group_id: str = "linewatch-api"
    # Events kept in Redis for the dashboard and the API (oldest dropped beyond this).
    max_events: int = Field(default=10_000, ge=1)
    # Cameras shown: a camera silent for camera_ttl_s is dropped, and at most max_cameras are kept.
    camera_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    max_cameras: int = Field(default=1000, ge=1)


class CaptureSettings(Section):
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    resize_width: int | None = None
    max_buffered_frames: int = Field(default=64, ge=1)
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Managed capture (`linewatch capture` with Redis): a worker's camera leases expire this long after
    # it stops renewing them, so another worker takes its cameras over within about this time.
    lease_s: float = Field(default=10.0, ge=1.0)
    # How often a worker looks at the camera registry and the leases.
    registry_poll_s: float = Field(default=1.0, gt=0)
    # A camera with no frame for this long is dark: `camera_down` to subscriptions, `camera_up` on return.
    dark_after_s: float = Field(default=30.0, gt=0)
    # The deliver workers also report `camera_down` for a registry camera no capture worker holds
    # (none alive, or none taking it) once its last frame is dark_after_s old.
    watchdog: bool = True


class CameraConfig(Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    line: str = "line-1"
    product_class: str
    source: str
    fps: float | None = Field(default=None, gt=0)
    loop: bool = False
    # Areas never alarmed on (fixtures, serial numbers): polygons of [x, y] in 0..1 of the frame size.
    ignore_regions: list[list[tuple[float, float]]] = []
    # Overrides the product class's threshold for this camera (the API can change it live).
    threshold: float | None = None

    @field_validator("ignore_regions")
    @classmethod
    def _polygons(cls, value: list[list[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
        for i, poly in enumerate(value):
            if len(poly) < 3:
                raise ValueError(f"ignore region {i} has {len(poly)} points; a polygon needs at least 3")
            if any(not (0.0 <= c <= 1.0) for point in poly for c in point):
                raise ValueError(f"ignore region {i}: coordinates are fractions of the frame, 0..1")
        return value
    # Scoring in [rows, cols] tiles overlapping by a fraction of a tile, so small defects in large
    # frames are not squeezed into one model input; maps are stitched back (max in overlaps).
    tiles: tuple[int, int] = (1, 1)
    tile_overlap: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("tiles")
    @classmethod
    def _tiles_positive(cls, tiles: tuple[int, int]) -> tuple[int, int]:
        if min(tiles) < 1:
            raise ValueError(f"tiles must be [rows, cols] of at least 1, got {list(tiles)}")
        return tiles


class ReferenceSettings(BaseModel):
    """Versioned normal reference sets in Redis (``linewatch references``, false-alarm teaching)."""

    # Most memory rows per bank (patches, and each WinCLIP window scale) after greedy coreset.
    max_patches: int = Field(default=4096, ge=16)
    # How often a scorer checks whether a class's reference version changed (one Redis read).
    poll_s: float = Field(default=1.0, gt=0)


class MetricsSettings(Section):
    port: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LINEWATCH_", env_nested_delimiter="__", extra="forbid", yaml_file=None,
        env_parse_none_str="null",  # LINEWATCH_SCORING__STALENESS_S=null disables the limit
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    engine: EngineSettings = EngineSettings()
    llm: LLMSettings = LLMSettings()
    scoring: ScoringSettings = ScoringSettings()
    alert: AlertSettings = AlertSettings()
    capture: CaptureSettings = CaptureSettings()
    deliver: DeliverSettings = DeliverSettings()
    api: ApiSettings = ApiSettings()
    metrics: MetricsSettings = MetricsSettings()
    references: ReferenceSettings = ReferenceSettings()
    cameras: list[CameraConfig] = []
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE or os.environ.get("LINEWATCH_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


_CONFIG_FILE: str | None = None


class ConfigError(ValueError):
    """Configuration that cannot be used; the message is one line naming the file (or variable) and key."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model a validation error location points into (list indices skipped)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _yaml_data(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (kafka:, engine:, cameras: ...), "
                          f"got {type(data).__name__}")
    return data


def _in_data(data: Any, loc: tuple[int | str, ...]) -> bool:
    for part in loc:
        found = (isinstance(part, int) and isinstance(data, list) and part < len(data)) or (
            isinstance(part, str) and isinstance(data, dict) and part in data)
        if found:
            data = data[part]
        else:
            return False
    return True


def describe_error(err: dict[str, Any], config_path: str | None, data: dict[str, Any]) -> str:
    """One validation error as `FILE: section.key: problem (did you mean ...?)`."""
    loc = tuple(err.get("loc", ()))
    key = _dotted(loc) or "(top level)"
    env_name = "LINEWATCH_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))
    if config_path and (_in_data(data, loc) or (err.get("type") == "missing" and _in_data(data, loc[:-1]))):
        origin = f"{config_path}: "
    elif any(k.upper().startswith(env_name) for k in os.environ):
        origin = f"{env_name}: "
    else:
        origin = f"{config_path}: " if config_path else ""
    if err.get("type") == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
        return f"{origin}{key}: unknown key ({hint})"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    scalar_input = "input" in err and not isinstance(err["input"], dict | list)
    if scalar_input and err.get("type") not in ("missing", "value_error"):
        msg += f" (got {err['input']!r})"
    return f"{origin}{key}: {msg}"


def _resolve_paths(settings: Settings, config_path: str, data: dict[str, Any]) -> None:
    """Relative paths written in the config file mean "next to the config file", wherever the
    command runs from (URLs and device indexes are left alone)."""
    base = Path(config_path).parent

    def resolve(value: str) -> str:
        path = Path(value).expanduser()
        return value if path.is_absolute() else os.path.normpath(base / path)

    cams = data.get("cameras")
    if isinstance(cams, list) and len(cams) == len(settings.cameras):
        for cam, raw in zip(settings.cameras, cams, strict=True):
            src = cam.source.strip()
            if isinstance(raw, dict) and "source" in raw and not src.isdigit() and "://" not in src:
                cam.source = resolve(src)
    engine = data.get("engine") if isinstance(data.get("engine"), dict) else {}
    for name in ("shots_dir", "cache_dir"):
        value = getattr(settings.engine, name)
        if name in engine and value is not None and not value.is_absolute():
            setattr(settings.engine, name, Path(resolve(str(value))))
    pretrained = settings.engine.pretrained
    if "pretrained" in engine and pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
        settings.engine.pretrained = resolve(pretrained)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree; a missing config file is an error, not a silent default.

    Validation problems raise ConfigError with one line per first problem naming the file (or
    environment variable) and the dotted key, with "did you mean" for misspelt keys.
    """
    global _CONFIG_FILE
    path = str(config_file) if config_file else os.environ.get("LINEWATCH_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = _yaml_data(path) if path else {}
    _CONFIG_FILE = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # Unknown keys first: a misspelt key is usually why a required value looks missing.
        errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
        first = describe_error(dict(errors[0]), path, data)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None
    finally:
        _CONFIG_FILE = None
    if path:
        _resolve_paths(settings, path, data)
    # Whatever logs or prints later (an exception quoting a client's options) shows *** instead.
    hide_url_password(settings.redis.url)
    hide_url_password(settings.deliver.webhook_proxy)
    hide_secrets(settings.kafka.sasl_password, settings.api.token, settings.llm.api_key)
    return settings
