"""All configuration, read from environment variables with defaults (README: "Settings")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"Setting {name}={raw!r} must be an integer") from None


@dataclass
class Settings:
    port: int = 9090
    host: str = "0.0.0.0"
    redis_url: str = ""  # empty: `make serve` starts an embedded redis-server
    label_studio_url: str = "http://localhost:8080"
    label_studio_api_key: str = ""
    data_dir: Path = Path("data")
    encoder: str = "default"
    device: str = "auto"
    fine_tune_layers: int = 0
    web_workers: int = 2
    rq_workers: int = 1
    job_timeout: int = 3600
    job_retries: int = 3
    prediction_chunk: int = 1000
    fanout_tasks: int = 20000
    max_length: int = 128
    encode_batch_size: int = 64
    log_level: str = "INFO"
    queue_name: str = "atl"
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    webhook_secret: str = ""
    max_body_mb: int = 20
    retrain_min_interval: int = 2
    ordering: str = "least_confidence"
    batch_size: int = 50
    reconcile_interval: int = 300
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        settings = cls(
            port=_env_int("PORT", 9090),
            host=env.get("HOST", "0.0.0.0"),
            redis_url=env.get("REDIS_URL", ""),
            label_studio_url=env.get("LABEL_STUDIO_URL", "http://localhost:8080").rstrip("/"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
            data_dir=Path(env.get("DATA_DIR", "data")).resolve(),
            encoder=env.get("ENCODER", "default"),
            device=env.get("DEVICE", "auto"),
            fine_tune_layers=_env_int("FINE_TUNE_LAYERS", 0),
            web_workers=_env_int("WEB_WORKERS", 2),
            rq_workers=_env_int("RQ_WORKERS", 1),
            job_timeout=_env_int("JOB_TIMEOUT", 3600),
            job_retries=_env_int("JOB_RETRIES", 3),
            prediction_chunk=_env_int("PREDICTION_CHUNK", 1000),
            fanout_tasks=_env_int("FANOUT_TASKS", 20000),
            max_length=_env_int("MAX_LENGTH", 128),
            encode_batch_size=_env_int("ENCODE_BATCH_SIZE", 64),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            queue_name=env.get("RQ_QUEUE", "atl"),
            basic_auth_user=env.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            webhook_secret=env.get("WEBHOOK_SECRET", ""),
            max_body_mb=_env_int("MAX_BODY_MB", 20),
            retrain_min_interval=_env_int("RETRAIN_MIN_INTERVAL", 2),
            ordering=env.get("ORDERING", "least_confidence"),
            batch_size=_env_int("BATCH_SIZE", 50),
            reconcile_interval=_env_int("RECONCILE_INTERVAL", 300),
        )
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown setting {key}")
            setattr(settings, key, value)
        settings.data_dir = Path(settings.data_dir)
        if bool(settings.basic_auth_user) != bool(settings.basic_auth_pass):
            raise SystemExit("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return settings

    def __repr__(self) -> str:  # never print secrets
        hidden = {"label_studio_api_key", "basic_auth_pass", "webhook_secret"}
        parts = [f"{f.name}={'***' if f.name in hidden and getattr(self, f.name) else getattr(self, f.name)!r}"
                 for f in fields(self)]
        return f"Settings({', '.join(parts)})"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def encoding_cache_path(self) -> Path:
        return self.data_dir / "encodings.sqlite3"
