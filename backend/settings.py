"""All configuration, read from environment variables with defaults (README: "Settings").

One typed class on pydantic-settings: each field is one environment variable (its name in
upper case, or the alias given), with its type and default. The README's settings table and
`.env.example` list exactly these fields with these defaults (tests/test_deploy_files.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Printed as *** in repr and logs when set.
SECRETS = frozenset({"label_studio_api_key", "basic_auth_pass", "webhook_secret"})


class Settings(BaseSettings):
    """The backend's settings; `Settings.from_env()` reads them, `Settings(**values)` for tests."""

    # An empty variable (`PORT=` in an env file) means "use the default", as unset does.
    model_config = SettingsConfigDict(env_ignore_empty=True, extra="forbid",
                                      validate_by_name=True, validate_by_alias=True)

    port: int = 9090
    # Loopback unless asked: `make serve` on a laptop is not reachable from the network.
    # The Docker image and compose set HOST=0.0.0.0.
    host: str = "127.0.0.1"
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
    # MB of vectors a worker keeps from its retrains' cache reads (model/encoding_cache.py); 0: off.
    encoding_memo_mb: int = Field(256, ge=0)
    # Image projects (<Image> objects): "default" is the packaged EfficientNet-Lite0.
    image_encoder: str = "default"
    image_fetch_timeout: float = Field(30.0, gt=0)  # seconds without a byte from the image's server
    image_max_bytes: int = Field(50 * 1024 * 1024, ge=1)  # a larger image file is that task's error
    # With FINE_TUNE_LAYERS > 0: image files kept on disk (MB) so each version re-reads them locally.
    image_bytes_cache_mb: int = Field(2048, ge=0)
    log_level: str = "INFO"
    log_format: str = "text"  # read by backend.logs.configure_logging
    queue_name: str = Field("atl", validation_alias="RQ_QUEUE")
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    webhook_secret: str = ""
    max_body_mb: int = 20
    retrain_min_interval: int = 2
    # model.orderings.DEFAULT_ORDERING (why there), not imported: it pulls scipy into every
    # process that reads a setting; a test in tests/test_orderings.py keeps the two equal.
    ordering: str = "margin"
    batch_size: int = 50
    reconcile_interval: int = 300
    # When a project's first version goes live, set its sampling to "Uncertainty sampling"
    # so "Label All Tasks" serves our order (once; the owner may change it afterwards).
    uncertainty_sampling: bool = True
    # Superseded model versions whose predictions stay in Label Studio (for a rollback).
    keep_prediction_versions: int = Field(1, ge=0)
    # Superseded versions with more predictions than this are left for a person to delete at a
    # quiet time (backend.publish.superseded_plan says why); 0 = no limit.
    prune_max_predictions: int = Field(2000, ge=0)
    # ...and are deleted by the reconcile, one version per run, once the project has had no
    # new model version for this many minutes (nobody annotating); 0 = never.
    prune_idle_minutes: float = Field(30.0, ge=0)
    # Before a project's first annotation, publish a cold-start order (backend/cold_start.py).
    cold_start: bool = True
    cold_start_order: str = "kmeans"

    @field_validator("cold_start_order")
    @classmethod
    def _known_order(cls, value: str) -> str:
        from model.cold_start import ORDERS

        if value not in ORDERS:
            raise ValueError(f"must be one of {', '.join(ORDERS)}")
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).resolve()

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _basic_auth_pair(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return self

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets `field`."""
        return cls.model_fields[field].validation_alias or field.upper()

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Settings from the environment; `overrides` (attribute names) win over it.

        A value that cannot be used stops the program with a message naming the variable.
        """
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown setting {', '.join(sorted(unknown))}")
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SystemExit(_explain(exc)) from None

    def __repr_args__(self):  # never print secrets
        for name, value in super().__repr_args__():
            yield name, ("***" if name in SECRETS and value else value)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def encoding_cache_path(self) -> Path:
        return self.data_dir / "encodings.sqlite3"


def _explain(exc: ValidationError) -> str:
    """One line per bad setting, in the words of the environment variable."""
    env_names = {field: Settings.env_name(field) for field in Settings.model_fields}
    env_names.update({env: env for env in list(env_names.values())})
    lines = []
    for error in exc.errors():
        name = env_names.get(str(error["loc"][0])) if error["loc"] else None
        if name is None:  # a check across fields; its message says what to do
            lines.append(error["msg"].removeprefix("Value error, "))
        elif error["type"] == "int_parsing":
            lines.append(f"Setting {name}={error['input']!r} must be an integer")
        else:
            lines.append(f"Setting {name}={error['input']!r}: {error['msg']}")
    return "\n".join(lines)
