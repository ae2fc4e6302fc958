"""One configuration tree for every component.

Values come, in increasing priority, from defaults, an optional YAML file (``--config`` or
``LINEWATCH_CONFIG``), and ``LINEWATCH_*`` environment variables with ``__`` nesting
(``LINEWATCH_KAFKA__BOOTSTRAP_SERVERS=host:9092``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

Method = Literal["winclip", "alfa", "aprilgan"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]


class KafkaSettings(BaseModel):
    """Broker connection; no bootstrap servers means `linewatch run` embeds a broker."""

    bootstrap_servers: str | None = None
    topic_prefix: str = "linewatch"
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # tansu answers JoinGroup after half the session timeout, so small values keep joins fast.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    def client_kwargs(self) -> dict[str, Any]:
        """Connection options shared by producers, consumers and the admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
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


class RedisSettings(BaseModel):
    """Cache connection; no URL means `linewatch run` embeds a server."""

    url: str | None = None
    key_prefix: str = "linewatch"
    socket_timeout_s: float = 2.0
    lock_timeout_s: float = 120.0


class LLMSettings(BaseModel):
    """OpenAI-compatible chat-completions endpoint for ALFA prompt generation (optional)."""

    url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 30.0
    retries: int = Field(default=2, ge=0)
    n_prompts: int = Field(default=20, ge=1, le=100)


class EngineSettings(BaseModel):
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


class ScoringSettings(BaseModel):
    max_batch: int = Field(default=8, ge=1)
    max_wait_ms: int = Field(default=50, ge=0)
    # Live monitoring wants the present: older frames are skipped. None disables (replays).
    staleness_s: float | None = 10.0
    max_frame_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_frame_pixels: int = Field(default=40_000_000, ge=1)
    map_size: int = Field(default=64, ge=8, le=512)
    group_id: str = "linewatch-score"


class AlertSettings(BaseModel):
    k: int = Field(default=2, ge=1)
    n: int = Field(default=3, ge=1)
    quiet_s: float = Field(default=2.0, ge=0)
    default_threshold: float = 0.5
    min_region_area: int = Field(default=16, ge=0)
    group_id: str = "linewatch-alert"

    @field_validator("n")
    @classmethod
    def _n_at_least_k(cls, n: int, info: Any) -> int:
        k = info.data.get("k", 1)
        if n < k:
            raise ValueError(f"alert.n ({n}) must be >= alert.k ({k})")
        return n


class DeliverSettings(BaseModel):
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


class ApiSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer token for the JSON API and the dashboard; the API refuses to start without one.
    token: str | None = None
    group_id: str = "linewatch-api"
    # Events kept in Redis for the dashboard and the API (oldest dropped beyond this).
    max_events: int = Field(default=10_000, ge=1)


class CaptureSettings(BaseModel):
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    resize_width: int | None = None
    max_buffered_frames: int = Field(default=64, ge=1)
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0


class CameraConfig(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    line: str = "line-1"
    product_class: str
    source: str
    fps: float | None = Field(default=None, gt=0)
    loop: bool = False


class MetricsSettings(BaseModel):
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


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree; a missing config file is an error, not a silent default."""
    global _CONFIG_FILE
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    _CONFIG_FILE = str(config_file) if config_file else None
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE = None
